"""Parsers of Linux /proc files, and the one reader that turns a vanished process into ProcessGone.

Parsers are pure (text in, plain data out) so they can be tested on recorded text. Only
`read_text` / `read_bytes` / `readlink` touch the filesystem; they map ENOENT/ESRCH to
errors.ProcessGone (the process or thread went away) and keep every other errno.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import re
import struct

from ..errors import KernelError, NoAccess, ProcessGone

_GONE = (errno.ENOENT, errno.ESRCH)


# -- reading ------------------------------------------------------------------------------
def os_error(e: OSError, path: str, step: str):
    if e.errno in _GONE:
        return ProcessGone("process is gone", path=path, step=step)
    if e.errno in (errno.EACCES, errno.EPERM):
        return NoAccess(f"no access: {e.strerror}", path=path, step=step)
    return KernelError(step, e.errno, path=path, step=step)


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb", buffering=0) as f:
            chunks = []
            while True:
                b = f.read(1 << 20)
                if not b:
                    return b"".join(chunks)
                chunks.append(b)
    except OSError as e:
        raise os_error(e, path, "read") from None


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8", "surrogateescape")


def readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as e:
        raise os_error(e, path, "readlink") from None


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise os_error(e, path, "listdir") from None


def stat(path: str, *, follow: bool = True) -> os.stat_result:
    try:
        return os.stat(path, follow_symlinks=follow)
    except OSError as e:
        raise os_error(e, path, "stat") from None


# -- /proc/PID/stat -----------------------------------------------------------------------
def parse_stat(text: str) -> list[str]:
    """Fields of /proc/PID/stat, indexed as proc(5) numbers them (1 = pid, 2 = comm, 3 = state).

    comm may hold spaces and parentheses, so it is cut at the last ')'. Index 0 is unused.
    """
    open_, close = text.index("("), text.rindex(")")
    return ["", text[:open_].strip(), text[open_ + 1:close]] + text[close + 2:].split()


# -- /proc/PID/status ---------------------------------------------------------------------
def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def status_ints(value: str) -> list[int]:
    """`Uid:`, `Gid:`, `Groups:` lines: whitespace separated decimals."""
    return [int(v) for v in value.split()]


# -- /proc/PID/maps and smaps -------------------------------------------------------------
@dataclasses.dataclass
class MapLine:
    start: int
    end: int
    perms: str            # "rw-p"
    pgoff: int            # bytes
    dev: tuple[int, int]  # (major, minor)
    inode: int
    path: str             # as shown, "" for anonymous; may end in " (deleted)"
    vmflags: frozenset = frozenset()

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def prot(self) -> int:
        return sum(bit for c, bit in zip(self.perms[:3], (1, 2, 4)) if c != "-")


def _map_header(line: str) -> MapLine:
    parts = line.split(None, 5)
    start, end = parts[0].split("-")
    major, minor = parts[3].split(":")
    return MapLine(int(start, 16), int(end, 16), parts[1], int(parts[2], 16),
                   (int(major, 16), int(minor, 16)), int(parts[4]),
                   parts[5].strip() if len(parts) > 5 else "")


def _is_header(line: str) -> bool:
    head = line.split(" ", 1)[0]
    return "-" in head and ":" not in head


def parse_maps(text: str) -> list[MapLine]:
    """/proc/PID/maps, or /proc/PID/smaps (then each entry also gets its VmFlags)."""
    out: list[MapLine] = []
    for line in text.splitlines():
        if not line:
            continue
        if _is_header(line):
            out.append(_map_header(line))
        elif line.startswith("VmFlags:") and out:
            out[-1].vmflags = frozenset(line[8:].split())
    return out


# -- /proc/PID/fdinfo/N -------------------------------------------------------------------
def parse_fdinfo(text: str) -> dict[str, str]:
    """Key/value lines; repeated keys (tfd, inotify, lock) are collected under `key + 's'`
    as a list of the raw lines' values. `pos` and `flags` (octal) are always present."""
    out: dict = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key in ("tfd", "inotify", "fanotify", "lock"):
            out.setdefault(key + "s", []).append(value)
        else:
            out[key] = value
    return out


def fdinfo_flags(info: dict) -> int:
    return int(info["flags"], 8)


# -- /proc/PID/cgroup and mountinfo -------------------------------------------------------
@dataclasses.dataclass
class CgroupLine:
    hierarchy: int
    controllers: tuple[str, ...]   # () for the v2 unified hierarchy
    path: str


def parse_cgroup(text: str) -> list[CgroupLine]:
    out = []
    for line in text.splitlines():
        if not line:
            continue
        hier, ctrls, path = line.split(":", 2)
        out.append(CgroupLine(int(hier), tuple(c for c in ctrls.split(",") if c), path))
    return out


@dataclasses.dataclass
class Mount:
    mnt_id: int
    parent_id: int
    dev: tuple[int, int]
    root: str
    mount_point: str
    options: str
    fstype: str
    source: str
    super_options: str


_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo and fstab escape blank, tab, newline and backslash as \\ooo octal."""
    return _OCTAL.sub(lambda m: chr(int(m[1], 8)), field) if "\\" in field else field


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        if not line:
            continue
        left, _, right = line.partition(" - ")
        f = left.split()
        fstype, source, sopts = (right.split(" ", 2) + ["", ""])[:3]
        major, minor = f[2].split(":")
        out.append(Mount(int(f[0]), int(f[1]), (int(major), int(minor)), unescape(f[3]),
                         unescape(f[4]), f[5], fstype, unescape(source), sopts))
    return out


# -- small files --------------------------------------------------------------------------
def parse_auxv(data: bytes) -> list[int]:
    """/proc/PID/auxv as u64 words (pairs of type, value; the AT_NULL pair included)."""
    n = len(data) // 8
    words = list(struct.unpack(f"<{n}Q", data[:n * 8]))
    # The kernel pads the file with zero pairs after AT_NULL on some versions: keep one pair.
    for i in range(0, len(words) - 1, 2):
        if words[i] == 0:
            return words[:i + 2]
    return words


def parse_ns_link(link: str) -> tuple[str, int]:
    """`uts:[4026531838]` -> ("uts", 4026531838)."""
    kind, _, rest = link.partition(":[")
    return kind, int(rest.rstrip("]"))


def parse_fd_link(link: str) -> tuple[str, int] | None:
    """`pipe:[123]` -> ("pipe", 123); `anon_inode:[eventfd]` -> ("anon_inode:[eventfd]", 0);
    a path -> None."""
    if link.startswith("/"):
        return None
    kind, sep, rest = link.partition(":[")
    if sep and rest.rstrip("]").isdigit():
        return kind, int(rest.rstrip("]"))
    return link, 0


def parse_cpuinfo_flags(text: str) -> tuple[str, ...]:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return tuple(value.split())
    return ()


def parse_sigset(hex_text: str) -> int:
    return int(hex_text, 16)


DELETED = " (deleted)"


def strip_deleted(path: str) -> tuple[str, bool]:
    if path.endswith(DELETED):
        return path[:-len(DELETED)], True
    return path, False


# -- /proc/net tables (sockets by inode) --------------------------------------------------
@dataclasses.dataclass
class UnixSock:
    inode: int
    type: int
    state: int      # SS_* socket state from the table (1 unconnected, 3 connected)
    flags: int      # __SO_ACCEPTCON 0x10000 = listening
    path: str


def parse_net_unix(text: str) -> dict[int, UnixSock]:
    out = {}
    for line in text.splitlines()[1:]:
        f = line.split(None, 7)
        if len(f) < 7:
            continue
        inode = int(f[6])
        out[inode] = UnixSock(inode, int(f[4], 16), int(f[5], 16), int(f[3], 16),
                              f[7] if len(f) > 7 else "")
    return out


@dataclasses.dataclass
class InetSock:
    inode: int
    src: tuple[bytes, int]
    dst: tuple[bytes, int]
    state: int      # TCP_* state number


def _inet_addr(text: str) -> tuple[bytes, int]:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    # The kernel prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return raw, int(port, 16)


def parse_net_inet(text: str) -> dict[int, InetSock]:
    out = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        inode = int(f[9])
        out[inode] = InetSock(inode, _inet_addr(f[1]), _inet_addr(f[2]), int(f[3], 16))
    return out


def parse_net_inodes(text: str, column: int) -> set[int]:
    """Inode column of a /proc/net table without a richer parser (netlink, packet)."""
    out = set()
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > column and f[column].isdigit():
            out.add(int(f[column]))
    return out


# -- /proc/PID/timers (POSIX timers: identity, not values) --------------------------------
SIGEV_KINDS = {"signal": 0, "none": 1, "thread": 2}
SIGEV_THREAD_ID = 4


@dataclasses.dataclass
class PosixTimer:
    it_id: int
    signo: int
    sival_ptr: int
    sigev_notify: int        # SIGEV_* (SIGEV_THREAD_ID when aimed at one thread)
    notify_pid: int
    clock_id: int


def parse_timers(text: str) -> list[PosixTimer]:
    out, cur = [], {}
    for line in text.splitlines() + ["ID: end"]:
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "ID" and cur:
            signo, ptr = cur["signal"].split("/")
            kind, _, who = cur["notify"].partition("/")
            whom, _, pid = who.partition(".")
            notify = SIGEV_KINDS.get(kind, 0) | (SIGEV_THREAD_ID if whom == "tid" else 0)
            out.append(PosixTimer(int(cur["ID"]), int(signo), int(ptr, 16), notify,
                                  int(pid or 0), int(cur["ClockID"])))
            cur = {}
        if key:
            cur[key] = value
    return out
