"""The files of a container's own tmpfs mounts: carried in the tree, put back before its
tasks run.

A tmpfs lives in memory: without this, a restored container finds its /run or /scratch
empty, and a task with a file open there cannot get it back. At capture, the files are read
through /proc/<init>/root/<mount point> (the container's own mount namespace, as its init
sees it), without crossing into mounts below. In the tree:

    isolation/tmpfs/<n>/target      /scratch            which line of isolation/mounts
    isolation/tmpfs/<n>/index       one line per entry: kind mode uid gid path [what]
                                        d 01777 0 0 .           (the mount's root itself)
                                        f 0644 1000 1000 notes/a.txt
                                        l 0777 0 0 current notes/a.txt    (symlink target)
                                        p 0600 0 0 queue                  (a fifo)
                                        c 0666 0 0 null 1:3               (device major:minor)
                                        s 0755 0 0 app.sock               (a unix socket's name)
    isolation/tmpfs/<n>/files/<path>  the bytes of each `f` entry, as a plain file

Paths use fstab's octal escapes (\\040 for a blank). Owners are as the container sees them
(through its user namespace's maps when it has one). Two names of one inode come back as two
files; times are not kept. A unix socket's name is listed but not made again: only a bind()
makes a socket, and whoever restores the listening socket binds that name itself. A tmpfs
whose files add up to more than LIMIT bytes (CKPTFS_TMPFS_LIMIT) is refused, naming the file.

A restore fills each tmpfs right after the namespace init mounts it (create.py), before any
later mount and before any task exists: directories, then files and links, then owners and
modes (deepest first, so a read-only directory is finished last).
"""
from __future__ import annotations

import dataclasses
import os
import stat
from typing import Callable

from ..capture.procfs import unescape
from ..errors import BadTree, KernelError, Unsupported

LIMIT = int(os.environ.get("CKPTFS_TMPFS_LIMIT", 64 << 20))
TREE_DIR = "isolation/tmpfs"
KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
         stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFSOCK: "s"}
NODE_TYPES = {"p": stat.S_IFIFO, "c": stat.S_IFCHR, "b": stat.S_IFBLK}


class Blob(bytes):
    """Binary tree content where text is expected: its encode() is itself."""

    def encode(self, *_args, **_kw) -> bytes:
        return bytes(self)


@dataclasses.dataclass
class Entry:
    kind: str           # d f l p c b s
    path: str           # relative to the mount point; "." is the mount's root
    mode: int           # permission bits (07777)
    uid: int
    gid: int
    what: str = ""      # symlink target, or "major:minor" of a device


@dataclasses.dataclass
class Contents:
    """The entries of one tmpfs, with their bytes in memory (`data`, from a capture) or in
    a directory of plain files (`dir`, a tree's isolation/tmpfs/<n>/files)."""
    entries: list[Entry]
    data: dict[str, bytes] | None = None
    dir: str | None = None
    tree: str = TREE_DIR      # the tree directory it came from, for messages

    def read(self, path: str) -> bytes:
        if self.data is not None:
            return self.data[path]
        with open(os.path.join(self.dir, path), "rb") as f:
            return f.read()


# -- capture ----------------------------------------------------------------------------------
IdMap = Callable[[int, int], "tuple[int, int]"]   # host (uid, gid) -> the container's view


def capture(root: str, budget: int, ids: IdMap = lambda u, g: (u, g)) -> tuple[Contents, int]:
    """The files below `root` (a path reaching the mount point through /proc/PID/root) on its
    own filesystem; returns them and the bytes left of `budget`."""
    top = _lstat(root)
    entries, data = [_entry("d", ".", top, ids)], {}
    stack = ["."]
    while stack:
        rel = stack.pop()
        for de in sorted(_scandir(os.path.join(root, rel)), key=lambda d: d.name):
            path = os.path.normpath(os.path.join(rel, de.name))
            full = os.path.join(root, path)
            st = _lstat(full)
            if st.st_dev != top.st_dev:
                # another mount on a directory here: its mount point stays, its files do not
                # (the hidden directory's own mode cannot be seen: the mount's root's is kept)
                entries.append(_entry("d", path, st, ids))
                continue
            kind = KINDS[stat.S_IFMT(st.st_mode)]
            what = ""
            if kind == "d":
                stack.append(path)
            elif kind == "f":
                budget -= st.st_size
                if budget < 0:
                    raise Unsupported(f"the tmpfs files add up to more than {LIMIT} bytes "
                                      "(CKPTFS_TMPFS_LIMIT)", path=full, step="capture tmpfs")
                data[path] = _read(full)
            elif kind == "l":
                what = os.readlink(full)
            elif kind in "cb":
                what = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            entries.append(_entry(kind, path, st, ids, what))
    return Contents(entries, data=data), budget


def _entry(kind: str, path: str, st: os.stat_result, ids: IdMap, what: str = "") -> Entry:
    uid, gid = ids(st.st_uid, st.st_gid)
    return Entry(kind, path, stat.S_IMODE(st.st_mode), uid, gid, what)


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as e:
        raise KernelError("cannot stat a tmpfs entry", e.errno, path=path,
                          step="capture tmpfs") from e


def _scandir(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as e:
        raise KernelError("cannot list a tmpfs directory", e.errno, path=path,
                          step="capture tmpfs") from e


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise KernelError("cannot read a tmpfs file", e.errno, path=path,
                          step="capture tmpfs") from e


# -- tree files --------------------------------------------------------------------------------
def _esc(s: str) -> str:
    from . import escape
    return escape(s)


def index_line(e: Entry) -> str:
    fields = [e.kind, f"0{e.mode:o}", str(e.uid), str(e.gid), _esc(e.path)]
    return " ".join(fields + ([_esc(e.what)] if e.what else []))


def render(mounts: list) -> dict[str, str]:
    files: dict[str, str] = {}
    n = 0
    for m in mounts:
        if m.contents is None:
            continue
        n += 1
        d = f"tmpfs/{n}/"
        files[d + "target"] = m.target + "\n"
        files[d + "index"] = "".join(index_line(e) + "\n" for e in m.contents.entries)
        for e in m.contents.entries:
            if e.kind == "f":
                files[d + "files/" + e.path] = Blob(m.contents.read(e.path))
    return files


def parse_index(text: str, where: str) -> list[Entry]:
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        f = line.split()
        bad = lambda why: BadTree(f"line {no} {line!r}: {why}", path=where)  # noqa: E731
        if len(f) not in (5, 6) or f[0] not in "dflpcbs" or len(f[0]) != 1:
            raise bad("expected 'kind mode uid gid path [what]' with kind one of d f l p c b s")
        try:
            mode, uid, gid = int(f[1], 8), int(f[2]), int(f[3])
        except ValueError:
            raise bad("mode must be octal, uid and gid decimal") from None
        path, what = unescape(f[4]), unescape(f[5]) if len(f) == 6 else ""
        if os.path.isabs(path) or ".." in path.split("/") or mode > 0o7777:
            raise bad("path must stay inside the mount, mode within 07777")
        if (f[0] in "lcb") != bool(what) or (f[0] in "cb" and not _devno(what)):
            raise bad("a symlink needs its target, a device its major:minor, nothing else one")
        out.append(Entry(f[0], os.path.normpath(path), mode, uid, gid, what))
    return out


def _devno(what: str) -> bool:
    parts = what.split(":")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def attach(mounts: list | None, read, listdir, locate) -> None:
    """Put each isolation/tmpfs/<n>/ on the Mount whose mount point its target names."""
    for n in listdir("tmpfs"):
        where = f"{TREE_DIR}/{n}"
        target = read(f"tmpfs/{n}/target")
        if target is None:
            raise BadTree("missing file", path=f"{where}/target")
        target = target.strip()
        m = next((m for m in mounts or [] if m.target == target and m.fstype == "tmpfs"
                  and not m.is_bind), None)
        if m is None:
            raise BadTree(f"{target!r} is no tmpfs line of isolation/mounts",
                          path=f"{where}/target")
        index = read(f"tmpfs/{n}/index")
        if index is None:
            raise BadTree("missing file", path=f"{where}/index")
        m.contents = Contents(parse_index(index, f"{where}/index"), dir=locate(f"tmpfs/{n}/files"),
                              tree=where)


# -- restore (runs in the namespace init, right after the tmpfs is mounted) --------------------
def to_config(c: Contents, staged: str) -> dict:
    return {"dir": c.dir or staged, "tree": c.tree,
            "entries": [dataclasses.astuple(e) for e in c.entries]}


def stage(c: Contents, into: str) -> None:
    """Write in-memory contents as plain files below `into` (for the init to copy)."""
    for e in c.entries:
        if e.kind == "f":
            path = os.path.join(into, e.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(c.data[e.path])


def entries_of(cfg: dict) -> list[Entry]:
    return [Entry(*t) for t in cfg["entries"]]


def fill(target: str, cfg: dict, open_src: Callable | None = None) -> None:
    """Re-create the entries below the freshly mounted `target`. `open_src(path)`: the
    recorded bytes of a regular file as a binary file object (default: from cfg["dir"])."""
    entries = entries_of(cfg)
    tree = cfg["tree"]
    open_src = open_src or (lambda p: open(os.path.join(cfg["dir"], p), "rb"))
    for e in sorted(entries, key=lambda e: e.path.count("/")):
        path = os.path.join(target, e.path)
        try:
            _make(e, path, open_src)
        except OSError as err:
            src = f"{tree}/files/{e.path}" if e.kind == "f" else f"{tree}/index"
            raise KernelError(f"cannot re-create {path} ({index_line(e)!r})", err.errno,
                              path=src, step="fill tmpfs") from err
    for e in sorted(entries, key=lambda e: -e.path.count("/")):
        if e.kind == "s":
            continue
        path = os.path.join(target, e.path)
        try:
            os.lchown(path, e.uid, e.gid)
            if e.kind != "l":
                os.chmod(path, e.mode)   # after chown, which clears set-id bits
        except OSError as err:
            raise KernelError(f"cannot set owner and mode of {path} ({index_line(e)!r})",
                              err.errno, path=f"{tree}/index", step="fill tmpfs") from err


def _make(e: Entry, path: str, open_src: Callable) -> None:
    if e.kind == "d":
        if e.path != ".":
            os.mkdir(path, 0o700)
    elif e.kind == "f":
        with open_src(e.path) as src, open(path, "xb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    elif e.kind == "l":
        os.symlink(e.what, path)
    elif e.kind == "s":
        pass        # bound again by the socket's own restore, if it is restored
    else:
        major, minor = (int(x) for x in e.what.split(":")) if e.what else (0, 0)
        os.mknod(path, 0o600 | NODE_TYPES[e.kind], os.makedev(major, minor))
