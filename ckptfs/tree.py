"""The tree: a checkpoint rendered as small files (docs/FORMAT.md), and a tree read back.

One table per directory kind maps a file name to a place in the CRIU messages and a codec,
and the same table serves both directions: `render` (Source -> nodes) and `TreeSource`
(directory -> Source). The nodes know nothing about FUSE; fs.py adapts them, `write_tree`
copies them into a directory.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from typing import Callable, Iterator

import xxhash

from . import flags as F
from . import manifest, pb, sockets
from .errors import BadTree, CkptError, ProcessGone
from .model import DEFAULT_CHUNK, PAGE_SIZE, Isolation, Meta, PageRange, Source

CTL_FILES = ("ctl", "status")   # the mount's, not the checkpoint's


# -- codecs: value <-> one line of text ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Codec:
    render: Callable[[object], str]
    parse: Callable[[str], object]
    binary: bool = False


def _int(base: int):
    def parse(text: str):
        return int(text.strip(), base if base != 16 else 0)
    return parse


HEX = Codec(lambda v: f"0x{v:x}", _int(16))
DEC = Codec(lambda v: str(v), _int(10))
OCT = Codec(lambda v: f"{v:04o}", _int(8))
STR = Codec(lambda v: v, lambda t: t)
SIGSET = Codec(F.render_sigset, _int(16))
CAPS = Codec(lambda words: f"0x{(words[0] if words else 0) | ((words[1] if len(words) > 1 else 0) << 32):016x}",
             lambda t: (lambda v: [v & 0xFFFFFFFF, v >> 32])(int(t.strip(), 16)))
DECLIST = Codec(lambda v: " ".join(str(x) for x in v), lambda t: [int(x) for x in t.split()])
PROT = Codec(F.render_prot, F.parse_prot)
OPEN = Codec(F.render_open_flags, F.parse_open_flags)
AUXV = Codec(lambda words: b"".join(w.to_bytes(8, "little") for w in words),
             lambda b: [int.from_bytes(b[i:i + 8], "little") for i in range(0, len(b) - 7, 8)],
             binary=True)
BLOB = Codec(lambda b: b, lambda b: b, binary=True)


def bits(table: dict[str, int]) -> Codec:
    return Codec(lambda v: F.render_bits(v, table), lambda t: F.parse_bits(t, table))


def names(table: dict[str, int]) -> Codec:
    rev = {v: k for k, v in table.items()}
    return Codec(lambda v: rev.get(v, str(v)),
                 lambda t: table[t.strip()] if t.strip() in table else int(t.strip(), 0))


def _limit(v: int) -> str:
    return "unlimited" if v == F.RLIM_INFINITY else str(v)


RLIMIT = Codec(lambda r: f"{_limit(r.cur)} {_limit(r.max)}",
               lambda t: [F.RLIM_INFINITY if w == "unlimited" else int(w) for w in t.split()])
HANDLER = Codec(lambda v: {0: "SIG_DFL", 1: "SIG_IGN"}.get(v, f"0x{v:x}"),
                lambda t: {"SIG_DFL": 0, "SIG_IGN": 1}.get(t.strip()) if t.strip() in ("SIG_DFL", "SIG_IGN")
                else int(t.strip(), 16))


def encode(codec: Codec, value) -> bytes:
    return codec.render(value) if codec.binary else (codec.render(value) + "\n").encode()


def decode(codec: Codec, data: bytes, path: str):
    try:
        if codec.binary:
            return codec.parse(data)
        text = data.decode()
        if not text.endswith("\n"):
            raise ValueError("no newline at end")
        return codec.parse(text[:-1])
    except BadTree as e:
        raise BadTree(str(e).split(": ", 1)[-1], path=path) from None
    except (ValueError, KeyError, UnicodeDecodeError, IndexError) as e:
        shown = data[:60]
        raise BadTree(f"bad value {shown!r} ({e})", path=path) from None


# -- dotted paths into messages ------------------------------------------------------------
def get_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def has_path(obj, dotted: str) -> bool:
    """True if every optional step of the path is set (required fields always count)."""
    for part in dotted.split("."):
        if hasattr(obj, "DESCRIPTOR"):
            fd = obj.DESCRIPTOR.fields_by_name.get(part)
            if fd is not None and not fd.is_repeated and fd.has_presence \
                    and not fd.is_required and not obj.HasField(part):
                return False
        elif isinstance(obj, dict):
            return part in obj and obj[part] is not None
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


def _required(fd) -> bool:
    return fd.is_required


def set_path(obj, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for part in head:
        obj = getattr(obj, part)
    current = getattr(obj, last, None)
    if hasattr(current, "extend") and not isinstance(current, (str, bytes)):
        del current[:]
        current.extend(value)
    else:
        setattr(obj, last, value)


# -- the tables ------------------------------------------------------------------------------
# (file name, dotted path in the task context, codec). The context has: ps (pstree_entry),
# core (leader's core_entry), mm, fs, and the names exe/cwd/root resolved from file ids.
TASK_FIELDS = [
    ("comm", "core.tc.comm", STR),
    ("ppid", "ps.ppid", DEC), ("pgid", "ps.pgid", DEC), ("sid", "ps.sid", DEC),
    ("state", "core.tc.task_state", names(F.TASK_STATES)),
    ("exit_code", "core.tc.exit_code", DEC),
    ("personality", "core.tc.personality", HEX),
    ("flags", "core.tc.flags", HEX),
    ("loginuid", "core.tc.loginuid", DEC),
    ("oom_score_adj", "core.tc.oom_score_adj", DEC),
    ("exe", "names.exe", STR), ("cwd", "names.cwd", STR), ("root", "names.root", STR),
    ("umask", "fs.umask", OCT),
    *[(f"creds/{n}", f"core.thread_core.creds.{n}", DEC)
      for n in ("uid", "gid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid")],
    ("creds/groups", "core.thread_core.creds.groups", DECLIST),
    *[(f"creds/{n}", f"core.thread_core.creds.{n}", CAPS)
      for n in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb")],
    ("creds/secbits", "core.thread_core.creds.secbits", HEX),
    ("creds/no_new_privs", "core.thread_core.creds.no_new_privs", DEC),
    *[(f"mm/{n}", f"mm.mm_{n}", HEX)
      for n in ("start_code", "end_code", "start_data", "end_data", "start_stack", "start_brk",
                "brk", "arg_start", "arg_end", "env_start", "env_end")],
    ("mm/auxv", "mm.mm_saved_auxv", AUXV),
    ("mm/dumpable", "mm.dumpable", DEC),
    # controlling terminal (major:minor) and, for a session leader, its foreground group
    ("ctty", "names.ctty", STR), ("tty_pgrp", "names.tty_pgrp", DEC),
]

THREAD_FIELDS = [
    *[(f"regs/{name}", f"core.thread_info.gpregs.{crit}", HEX) for name, crit in F.GP_REGS],
    ("sigmask", "sigmask", SIGSET),
    ("comm", "core.thread_core.comm", STR),
    ("clear_tid_addr", "core.thread_info.clear_tid_addr", HEX),
    ("pdeath_sig", "core.thread_core.pdeath_sig", DEC),
    ("futex_rla", "core.thread_core.futex_rla", HEX),
    ("futex_rla_len", "core.thread_core.futex_rla_len", DEC),
    ("sigaltstack/sp", "core.thread_core.sas.ss_sp", HEX),
    ("sigaltstack/size", "core.thread_core.sas.ss_size", DEC),
    ("sigaltstack/flags", "core.thread_core.sas.ss_flags", bits(F.SS_FLAGS)),
    ("rseq/abi_pointer", "core.thread_core.rseq_entry.rseq_abi_pointer", HEX),
    ("rseq/abi_size", "core.thread_core.rseq_entry.rseq_abi_size", DEC),
    ("rseq/signature", "core.thread_core.rseq_entry.signature", HEX),
]

VMA_FIELDS = [
    ("prot", "vma.prot", PROT),
    ("flags", "vma.flags", bits(F.MAP_FLAGS)),
    ("status", "vma.status", bits(F.VMA_STATUS)),
    ("pgoff", "vma.pgoff", HEX),
    ("path", "names.path", STR),
    ("madv", "vma.madv", bits(F.MADV_BITS)),
    ("fdflags", "vma.fdflags", OPEN),
    ("shmid", "vma.shmid", DEC),
]
DERIVED = {"shmid"}  # required in CRIU, but only some maps carry the file (the rest derive it)
SHMEM_STATUS = F.VMA_STATUS["VMA_ANON_SHARED"] | F.VMA_STATUS["VMA_AREA_SYSVIPC"]

SIGACTION_FIELDS = [("handler", "sa.sigaction", HANDLER), ("flags", "sa.flags", bits(F.SA_FLAGS)),
                    ("restorer", "sa.restorer", HEX), ("mask", "sa.mask", SIGSET)]

LIMIT_NAMES = ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cpuset.cpus", "io.max")
NS_KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")

FD_TYPE_WORDS = {"PIPE": "pipe", "FIFO": "fifo", "INETSK": "socket", "UNIXSK": "socket",
                 "PACKETSK": "socket", "NETLINKSK": "socket", "TTY": "tty", "EVENTFD": "eventfd",
                 "EVENTPOLL": "eventpoll", "SIGNALFD": "signalfd", "TIMERFD": "timerfd",
                 "INOTIFY": "inotify", "FANOTIFY": "fanotify", "MEMFD": "memfd",
                 "PIDFD": "pidfd", "NS": "ns"}
REG_MODE_WORDS = {stat.S_IFDIR: "dir", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}
# file_entry sub-message that carries each fd type
FD_SUBMSG = {"REG": "reg", "PIPE": "pipe", "FIFO": "fifo", "EVENTFD": "efd", "INETSK": "isk",
             "UNIXSK": "usk", "TTY": "tty", "MEMFD": "memfd", "EVENTPOLL": "epfd",
             "SIGNALFD": "sgfd", "TIMERFD": "tfd", "NS": "nsf", "PIDFD": "pidfd"}


class _Ctx:
    """Attribute bag the tables' dotted paths walk."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


# -- nodes -----------------------------------------------------------------------------------
class Node:
    mode = 0o444
    mtime = 0.0


class File(Node):
    """A file whose whole content is produced at once (small text or binary state)."""

    def __init__(self, produce: Callable[[], bytes], mode: int = 0o444):
        self._produce, self.mode = produce, mode

    def content(self) -> bytes:
        return self._produce()

    def size(self) -> int:
        return len(self.content())

    def read(self, offset: int, size: int) -> bytes:
        return self.content()[offset:offset + size]


class Chunk(Node):
    """A memory chunk: a cell of one VMA, read straight from the source."""
    mode = 0o600

    def __init__(self, source: Source, pid: int, addr: int, length: int):
        self.source, self.pid, self.addr, self.length = source, pid, addr, length

    def size(self) -> int:
        return self.length

    def read(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.length - offset))
        return self.source.read_memory(self.pid, self.addr + offset, size) if size else b""


class Epoch:
    """When cached listings go stale: at every state change (`bump`), and after `ttl` seconds
    while the source runs."""

    def __init__(self, source: Source, ttl: float = 1.0):
        self.source, self.ttl, self.n = source, ttl, 0

    def bump(self) -> None:
        self.n += 1

    def stamp(self) -> tuple[int, float]:
        return self.n, time.monotonic()

    def fresh(self, stamp: tuple[int, float]) -> bool:
        n, t = stamp
        return n == self.n and (self.source.frozen or time.monotonic() - t < self.ttl)


class Dir(Node):
    mode = 0o555

    def __init__(self, entries: Callable[[], dict[str, Node]], mode: int = 0o555,
                 epoch: Epoch | None = None):
        self._entries, self.mode, self.epoch = entries, mode, epoch
        self._cached: tuple | None = None

    def entries(self) -> dict[str, Node]:
        if self.epoch is None:
            return self._entries()
        cached = self._cached
        if cached is not None and self.epoch.fresh(cached[0]):
            return cached[1]
        stamp = self.epoch.stamp()
        value = self._entries()
        self._cached = (stamp, value)
        return value


def _dir_from_paths(files: dict[str, Node], mode: int = 0o555) -> Dir:
    """Nest 'a/b' names into sub-directories."""
    top: dict[str, Node] = {}
    subs: dict[str, dict[str, Node]] = {}
    for name, node in files.items():
        head, _, rest = name.partition("/")
        if rest:
            subs.setdefault(head, {})[rest] = node
        else:
            top[head] = node
    for head, sub in subs.items():
        top[head] = _dir_from_paths(sub, mode)
    return Dir(lambda: top, mode)


# -- rendering a Source ------------------------------------------------------------------------
class Renderer:
    """Builds the node tree of a Source. Directory listings are computed when asked."""

    def __init__(self, source: Source, chunk_size: int = DEFAULT_CHUNK, epoch: Epoch | None = None):
        self.source, self.chunk_size = source, chunk_size
        self.epoch = epoch or Epoch(source)

    def dir(self, entries, mode: int = 0o555) -> Dir:
        return Dir(entries, mode, self.epoch)

    def root(self, extra: dict[str, Node] | None = None) -> Dir:
        def entries():
            e = {"isolation": self.dir(self.isolation_entries),
                 "tasks": self.dir(lambda: {str(p): self.dir(self._task_lazy(p)) for p in self.source.pids()})}
            if ghost_ids(self.source):
                e["ghosts"] = self.dir(self.ghost_entries)
            if _mapped_memfds(self.source):
                e["memfds"] = self.dir(self.memfd_entries)
            e.update(extra or {})
            return e
        return self.dir(entries)

    # isolation/
    def isolation_entries(self) -> dict[str, Node]:
        iso = self.source.isolation()
        return _dir_from_paths(render_isolation(iso)).entries()

    # tasks/<pid>/
    def _task_lazy(self, pid: int):
        return lambda: self.task_entries(pid)

    def _task_ctx(self, pid: int) -> _Ctx:
        src = self.source
        ps = next(e for e in src.pstree() if e.pid == pid)
        mm, fs = src.mm(pid), src.fs(pid)
        names = {"exe": _file_name(src, mm.exe_file_id), "cwd": _file_name(src, fs.cwd_id),
                 "root": _file_name(src, fs.root_id), **src.task_tty(pid)}
        return _Ctx(ps=ps, core=src.core(pid), mm=mm, fs=fs, names=names)

    def task_entries(self, pid: int) -> dict[str, Node]:
        if self.source.core(pid).tc.task_state in DEAD_STATES:
            return self.zombie_entries(pid)
        files: dict[str, Node] = {}
        ctx = self._task_ctx(pid)  # one per listing: the listing's epoch keeps it fresh
        for name, dotted, codec in TASK_FIELDS:
            files[name] = self._field_node(lambda: ctx, dotted, codec)
        files = {n: f for n, f in files.items() if f is not None}
        if _is_ghost(self.source, ctx.mm.exe_file_id):
            files["exe_ghost"] = File(lambda: f"{ghost_of(self.source, ctx.mm.exe_file_id)}\n".encode())
        shared = self._table_shared_with(pid)
        if shared is not None:
            files["files_shared_with"] = File(lambda: f"{shared}\n".encode())
        for i, rname in enumerate(F.RLIMITS):
            files[f"rlimits/{rname}"] = File(self._rlimit(pid, i))
        top = _dir_from_paths(files).entries()
        top["sigactions"] = self.dir(lambda: self.sigaction_entries(pid))
        top["threads"] = self.dir(lambda: {str(t): self.dir(self._thread_lazy(pid, t))
                                      for t in self.source.threads(pid)})
        top["maps"] = self.dir(lambda: self.map_entries(pid))
        top["fds"] = self.dir(lambda: self.fd_entries(pid))
        top["timers"] = self.dir(lambda: _dir_from_paths(timer_files(self.source.core(pid).tc)).entries())
        top["pending"] = self.dir(lambda: pending_files(self.source.core(pid).tc.signals_s))
        return top

    def zombie_entries(self, pid: int) -> dict[str, Node]:
        """A zombie is only its identity and exit status: no memory, files or threads."""
        ctx = _Ctx(ps=next(e for e in self.source.pstree() if e.pid == pid), core=self.source.core(pid))
        return {name: File(lambda d=dotted, c=codec: encode(c, get_path(ctx, d)))
                for name, dotted, codec in TASK_FIELDS if name in ZOMBIE_FILES}

    def _field_node(self, ctx_fn, dotted: str, codec: Codec) -> Node | None:
        """A file for a field; None (no file) if the field is an unset optional."""
        ctx = ctx_fn()
        if not has_path(ctx, dotted):
            return None
        value = get_path(ctx, dotted)
        if value is None:
            return None
        return File(lambda: encode(codec, get_path(ctx_fn(), dotted)))

    def _rlimit(self, pid: int, i: int):
        def produce():
            rl = self.source.core(pid).tc.rlimits.rlimits
            return encode(RLIMIT, rl[i]) if i < len(rl) else b"unlimited unlimited\n"
        return produce

    def _table_shared_with(self, pid: int) -> int | None:
        """The lowest pid of the live tasks sharing pid's descriptor table (CLONE_FILES),
        when it shares one. Frozen trees only: on a running one every other task's core
        would be read (and stopped for) at each listing, and such a tree never restores."""
        src = self.source
        if not src.frozen:
            return None
        try:
            mine = src.ids(pid).files_id
        except NotImplementedError:     # a source that cannot tell (FreeBSD)
            return None
        if not mine:
            return None
        sharers = [pid]
        for t in src.pstree():
            try:
                if t.pid != pid and src.ids(t.pid).files_id == mine and \
                        src.core(t.pid).tc.task_state not in DEAD_STATES:
                    sharers.append(t.pid)
            except ProcessGone:
                continue        # a short-lived child of a running tree, gone since the listing
        return min(sharers) if len(sharers) > 1 else None

    def sigaction_entries(self, pid: int) -> dict[str, Node]:
        out = {}
        acts = self.source.core(pid).tc.sigactions
        for signo, sa in zip(F.SIGACTION_SIGNALS, acts):
            if sa.sigaction or sa.flags or sa.restorer or sa.mask:
                ctx = _Ctx(sa=sa)
                out[F.SIGNAL_NAMES[signo]] = _dir_from_paths(
                    {n: File(lambda d=d, c=c, x=ctx: encode(c, get_path(x, d)))
                     for n, d, c in SIGACTION_FIELDS})
        return out

    # threads/<tid>/
    def _thread_lazy(self, pid: int, tid: int):
        return lambda: self.thread_entries(pid, tid)

    def _thread_ctx(self, pid: int, tid: int) -> _Ctx:
        core = self.source.core(tid)
        leader = tid == pid
        mask = core.tc.blk_sigset if leader else core.thread_core.blk_sigset
        return _Ctx(core=core, sigmask=mask)

    def thread_entries(self, pid: int, tid: int) -> dict[str, Node]:
        files = {}
        ctx = self._thread_ctx(pid, tid)
        for name, dotted, codec in THREAD_FIELDS:
            node = self._field_node(lambda: ctx, dotted, codec)
            if node is not None:
                files[name] = node
        files["fpu"] = File(lambda: _fpu_bytes(self.source.core(tid)), mode=0o600)
        entries = _dir_from_paths(files).entries()
        entries["pending"] = self.dir(lambda: pending_files(self.source.core(tid).thread_core.signals_p))
        entries["regs"].mode = 0o700
        for node in entries["regs"].entries().values():
            node.mode = 0o600
        return entries

    # maps/<start>-<end>/
    def map_entries(self, pid: int) -> dict[str, Node]:
        mm = self.source.mm(pid)
        return {f"{v.start:x}-{v.end:x}": self.dir(self._vma_lazy(pid, v)) for v in mm.vmas}

    def _vma_lazy(self, pid: int, vma):
        return lambda: self.vma_entries(pid, vma)

    def vma_entries(self, pid: int, vma) -> dict[str, Node]:
        ctx = _Ctx(vma=vma, names={"path": vma_path(self.source, vma)})
        files = {}
        for name, dotted, codec in VMA_FIELDS:
            if name == "shmid" and not vma.status & SHMEM_STATUS:
                continue  # file maps name their object by path
            if has_path(ctx, dotted) and not (name in ("madv", "fdflags") and not get_path(ctx, dotted)):
                files[name] = File(lambda d=dotted, c=codec: encode(c, get_path(ctx, d)))
        if vma.status & FILE_MAPS and vma.status & MEMFD_MAP:
            inode = self.source.file(vma.shmid).memfd.inode_id
            files["memfd"] = File(lambda: f"{inode}\n".encode())
        if vma.status & FILE_MAPS and _is_ghost(self.source, vma.shmid, vma):
            ghost = ghost_of(self.source, vma.shmid)
            files["ghost"] = File(lambda: f"{ghost}\n".encode())
        entries = _dir_from_paths(files).entries()
        entries["pages"] = self.dir(lambda: self.chunk_entries(pid, vma), mode=0o700)
        return entries

    # memfds/<inode>/
    def memfd_entries(self) -> dict[str, Node]:
        """One directory per memfd that only maps reach (no descriptor holds it), its name,
        seals and contents saved once however many maps and tasks use it."""
        from . import fdkinds
        out = {}
        for inode, fid in sorted(_mapped_memfds(self.source).items()):
            values = fdkinds.render_memfd_object(self.source, fid)
            out[str(inode)] = _dir_from_paths(
                {k: File(lambda v=v: v if isinstance(v, bytes) else (str(v) + "\n").encode(),
                         mode=0o600 if k == "contents" else 0o444)
                 for k, v in values.items()})
        return out

    # ghosts/<id>/
    def ghost_entries(self) -> dict[str, Node]:
        """One directory per deleted file that a task maps or runs, its contents saved once
        however many maps and tasks use it."""
        src, out = self.source, {}
        for fid in sorted(ghost_ids(src)):
            reg = src.file(fid).reg
            files = {"contents": File(_once(src, lambda f=fid: src.file_contents(f)), mode=0o600)}
            if reg.HasField("mode"):
                files["mode"] = File(lambda m=reg.mode: f"0{m:o}\n".encode())
            out[str(fid)] = _dir_from_paths(files)
        return out

    def chunk_entries(self, pid: int, vma) -> dict[str, Node]:
        if vma.status & F.VMA_STATUS["VMA_FILE_SHARED"] and vma.status & MEMFD_MAP:
            return {}       # the memfd's contents hold them (a CRIU image has them as pages)
        cells = chunk_cells(self.source.page_ranges(pid, vma), vma.start, vma.end, self.chunk_size)
        return {hex(off): Chunk(self.source, pid, vma.start + off, length) for off, length in cells}

    # fds/<n>/
    def fd_entries(self, pid: int) -> dict[str, Node]:
        out = {}
        for fdi in self.source.fdinfo(pid):
            values = fd_values(self.source, fdi)
            # binary values (file contents, queued pipe and socket data) are the process's
            # data: owner-only, as memory is
            out[str(fdi.fd)] = _dir_from_paths(
                {k: File(lambda v=v: v, 0o600) if isinstance(v, bytes)
                 else File(lambda v=v: (str(v) + "\n").encode()) for k, v in values.items()})
        return out


FILE_MAPS = F.VMA_STATUS["VMA_FILE_PRIVATE"] | F.VMA_STATUS["VMA_FILE_SHARED"]
MEMFD_MAP = F.VMA_STATUS["VMA_AREA_MEMFD"]


def _mapped_memfds(src: Source) -> dict[int, int]:
    """fdkinds.mapped_memfds; a running tree whose tasks come and go shows what it can."""
    from . import fdkinds
    try:
        return fdkinds.mapped_memfds(src)
    except ProcessGone:
        if src.frozen:
            raise
        return {}


def _is_ghost(src: Source, file_id: int, vma=None) -> bool:
    """A deleted regular file a map or the exe link reaches (memfds are no files)."""
    if vma is not None and vma.status & F.VMA_STATUS["VMA_AREA_MEMFD"]:
        return False
    fe = src.file(file_id)
    return fe.HasField("reg") and src.file_deleted(file_id)


def ghost_of(src: Source, file_id: int) -> int:
    """The ghost (ghosts/<id>) a deleted file id stands for: the descriptors and maps of one
    deleted inode have file ids of their own (flags, offset) but one ghost. A source without
    `file_ghost` keeps one ghost per id."""
    same = getattr(src, "file_ghost", None)
    return same(file_id) if same is not None else file_id


def ghost_ids(src: Source) -> set[int]:
    """File ids of the deleted files the tasks map or run (CRIU's ghost files)."""
    out: set[int] = set()
    try:
        pids = src.pids()
    except ProcessGone:
        if src.frozen:
            raise
        return out          # a running tree whose root exited: the tasks show why
    for pid in pids:
        try:
            if src.core(pid).tc.task_state in DEAD_STATES:
                continue
            mm = src.mm(pid)
            ids = [mm.exe_file_id] + [v.shmid for v in mm.vmas if v.status & FILE_MAPS
                                      and not v.status & F.VMA_STATUS["VMA_AREA_MEMFD"]]
            out.update(ghost_of(src, i) for i in ids if _is_ghost(src, i))
        except ProcessGone:
            if src.frozen:
                raise
            # a running tree's short-lived task exited since the listing: it maps nothing now
    return out


def _once(src: Source, produce: Callable[[], bytes]) -> Callable[[], bytes]:
    """`produce` called once on a frozen source (a reader takes a big file piece by piece)."""
    kept: list[bytes] = []

    def get() -> bytes:
        if not src.frozen:
            return produce()
        if not kept:
            kept.append(produce())
        return kept[0]
    return get


def _file_name(src: Source, file_id: int) -> str:
    fe = src.file(file_id)
    return fe.reg.name if fe.HasField("reg") else ""


def vma_path(src: Source, vma) -> str:
    st = vma.status
    for bit, name in ((F.VMA_STATUS["VMA_AREA_VDSO"], "[vdso]"), (F.VMA_STATUS["VMA_AREA_VVAR"], "[vvar]"),
                      (F.VMA_STATUS["VMA_AREA_VSYSCALL"], "[vsyscall]"),
                      (F.VMA_STATUS["VMA_AREA_HEAP"], "[heap]")):
        if st & bit:
            return name
    file_bits = F.VMA_STATUS["VMA_FILE_PRIVATE"] | F.VMA_STATUS["VMA_FILE_SHARED"]
    if st & file_bits:
        fe = src.file(vma.shmid)
        if fe.HasField("memfd"):
            from . import fdkinds
            return fdkinds.MEMFD_PREFIX + fdkinds.memfd_state(src, vma.shmid).name
        if fe.HasField("reg"):
            return fe.reg.name
    if vma.flags & F.MAP_FLAGS["MAP_GROWSDOWN"]:
        return "[stack]"
    return ""


def _whole(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def chunk_cells(ranges: list[PageRange], start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, length) of every grid cell of the map that holds at least one saved page."""
    cells: list[int] = []
    for r in ranges:
        first = (r.start - start) // chunk
        last = (r.end - 1 - start) // chunk
        for c in range(first, last + 1):
            if not cells or cells[-1] != c:
                cells.append(c)
    return [(c * chunk, min(chunk, end - start - c * chunk)) for c in sorted(set(cells))]


def _fpu_bytes(core) -> bytes:
    from . import xsave
    return xsave.join(core.thread_info.fpregs)


def fd_values(src: Source, fdi) -> dict[str, object]:
    """The files of fds/<n>/ as name -> value (str/int rendered as a line, bytes raw)."""
    fe = src.file(fdi.id)
    tname = pb.fd_types.Name(fdi.type)
    shared = {"open_file": fdi.id}  # descriptors (of any task) with one number share an open file
    cloexec = F.O_CLOEXEC if fdi.flags & F.FD_CLOEXEC else 0
    sub = getattr(fe, FD_SUBMSG[tname]) if tname in FD_SUBMSG and fe.HasField(FD_SUBMSG[tname]) else None
    out: dict[str, object] = {}
    if tname == "REG":
        r = sub
        out["type"] = REG_MODE_WORDS.get(stat.S_IFMT(r.mode), "file") if r.HasField("mode") else "file"
        out["path"] = r.name
        out["flags"] = F.render_open_flags(r.flags | cloexec)
        out["pos"] = r.pos
        if r.HasField("mode"):
            out["mode"] = f"0{r.mode:o}"
        if r.HasField("size"):
            out["size"] = r.size
        if src.file_deleted(fdi.id):
            out["deleted"] = 1
            ghost = ghost_of(src, fdi.id)
            if ghost in ghost_ids(src):
                out["ghost"] = ghost        # also mapped: its contents are ghosts/<id>'s
            else:
                out["contents"] = src.file_contents(fdi.id)
        return {**out, **shared}
    out["type"] = FD_TYPE_WORDS.get(tname, "other")
    if tname in ("PIPE", "FIFO") and sub is not None:
        out["path"] = f"pipe:[{sub.pipe_id}]" if tname == "PIPE" else _file_name(src, sub.regf_id)
        flags = sub.flags if tname == "PIPE" else _reg_flags(src, sub.regf_id)
        out["flags"] = F.render_open_flags(flags | cloexec)
        out["pipe_id"] = sub.pipe_id
        out["data"] = src.pipe_data(sub.pipe_id)
    elif tname == "EVENTFD" and sub is not None:
        out["flags"] = F.render_open_flags(sub.flags | cloexec)
        out["count"] = sub.counter
    else:
        out["flags"] = F.render_open_flags((getattr(sub, "flags", 0) if sub is not None else 0) | cloexec)
        out.update(sockets.render(src, fdi, tname, sub))
        from . import fdkinds     # (a local import keeps the module list of tree.py as it is)
        out.update(fdkinds.render(src, fdi, tname, sub))
    return {**out, **shared}


def _reg_flags(src: Source, file_id: int) -> int:
    fe = src.file(file_id)
    return fe.reg.flags if fe.HasField("reg") else 0


def render_isolation(iso: Isolation) -> dict[str, Node]:
    files: dict[str, Node] = {}

    def text(v):
        return File(lambda: (str(v) + "\n").encode())
    if iso.hostname is not None:
        files["uts/hostname"] = text(iso.hostname)
    if iso.domainname is not None:
        files["uts/domainname"] = text(iso.domainname)
    for kind, ino in sorted(iso.namespaces.items()):
        files[f"ns/{kind}"] = text(ino)
    files["own"] = text(" ".join(iso.own_namespaces) or "none")
    if iso.cgroup is not None:
        files["cgroup/path"] = text(iso.cgroup)
    for name, value in sorted(iso.limits.items()):
        files[f"limits/{name}"] = text(value)
    from .isolation import render_extra
    for rel, content in render_extra(iso).items():     # tmpfs contents may hold secrets
        files[rel] = File(lambda c=content: c if isinstance(c, bytes) else c.encode(),
                          0o600 if rel.startswith("tmpfs/") else 0o444)
    return files


# -- timers and pending signals ------------------------------------------------------------------
DEAD_STATES = (F.TASK_STATES["dead"], F.TASK_STATES["zombie"])
ZOMBIE_FILES = ("comm", "ppid", "pgid", "sid", "state", "exit_code")
SIGEV = {"SIGEV_SIGNAL": 0, "SIGEV_NONE": 1, "SIGEV_THREAD": 2, "SIGEV_THREAD_ID": 4}
CLOCKS = {"CLOCK_REALTIME": 0, "CLOCK_MONOTONIC": 1, "CLOCK_PROCESS_CPUTIME_ID": 2,
          "CLOCK_THREAD_CPUTIME_ID": 3, "CLOCK_BOOTTIME": 7, "CLOCK_REALTIME_ALARM": 8,
          "CLOCK_BOOTTIME_ALARM": 9, "CLOCK_TAI": 11}
USEC = Codec(lambda v: f"{v[0]}.{v[1]:06d}", lambda t: [int(x) for x in (t.strip() + ".0").split(".")[:2]])
NSEC = Codec(lambda v: f"{v[0]}.{v[1]:09d}", lambda t: [int(x) for x in (t.strip() + ".0").split(".")[:2]])
ITIMERS = ("real", "virt", "prof")
# posix_timer_entry: file -> (field, codec); interval/value are pairs of fields
POSIX_FIELDS = [("clock", "clock_id", names(CLOCKS)), ("signal", "si_signo", names(F.SIGNALS)),
                ("notify", "it_sigev_notify", names(SIGEV)), ("sival", "sival_ptr", HEX),
                ("overrun", "overrun", DEC), ("notify_thread", "notify_thread_id", DEC)]


def _text(codec: Codec, value) -> File:
    return File(lambda: encode(codec, value))


def timer_files(tc) -> dict[str, Node]:
    """timers/{real,virt,prof}/{interval,value} (only armed ones) and timers/posix/<id>/..."""
    files: dict[str, Node] = {}
    for kind in ITIMERS:
        it = getattr(tc.timers, kind)
        if it.isec or it.iusec or it.vsec or it.vusec:
            files[f"{kind}/interval"] = _text(USEC, (it.isec, it.iusec))
            files[f"{kind}/value"] = _text(USEC, (it.vsec, it.vusec))
    for pt in tc.timers.posix:
        base = f"posix/{pt.it_id}/"
        for name, field, codec in POSIX_FIELDS:
            if field != "notify_thread_id" or pt.HasField(field):
                files[base + name] = _text(codec, getattr(pt, field))
        files[base + "interval"] = _text(NSEC, (pt.isec, pt.insec))
        files[base + "value"] = _text(NSEC, (pt.vsec, pt.vnsec))
    return files


def pending_files(queue) -> dict[str, Node]:
    """pending/<n>: each queued signal as its raw 128-byte siginfo, in queue order."""
    return {str(i): File(lambda b=e.siginfo: bytes(b)) for i, e in enumerate(queue.signals)}


# -- walking and writing ---------------------------------------------------------------------
def walk(node: Dir, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """(relative path, node) for every file and directory, directories before their contents."""
    for name, child in sorted(node.entries().items()):
        path = f"{prefix}{name}"
        yield path, child
        if isinstance(child, Dir):
            yield from walk(child, path + "/")


def manifest_bytes(source: Source, root: int, chunk_size: int,
                   files: dict[str, tuple[int, str]] | None) -> bytes:
    meta = dataclasses.asdict(source.meta())
    meta["xfeatures"] = hex(meta["xfeatures"])
    meta["cpu_flags"] = list(meta["cpu_flags"])
    state = "frozen" if source.frozen else "running"
    return manifest.build(meta, root, source.pids(), chunk_size, state,
                          files if source.frozen else None)


def checksummed_files(top: Dir) -> dict[str, tuple[int, str]]:
    """Every checkpoint file of a tree (not manifest/ctl/status) with size and checksum."""
    out = {}
    for path, node in walk(top):
        if isinstance(node, Dir) or path in CTL_FILES or path == "manifest":
            continue
        h = xxhash.xxh3_64()
        size = 0
        for piece in _pieces(node):
            h.update(piece)
            size += len(piece)
        out[path] = (size, h.hexdigest())
    return out


def _pieces(node: Node, step: int = 8 << 20) -> Iterator[bytes]:
    if isinstance(node, Chunk):
        for off in range(0, node.size(), step):
            yield node.read(off, step)
    else:
        yield node.content()


def write_tree(source: Source, out_dir: str, chunk_size: int = DEFAULT_CHUNK) -> dict[str, tuple[int, str]]:
    """Write the tree of `source` into out_dir (created); returns the manifest's file table."""
    os.makedirs(out_dir, exist_ok=True)
    if os.listdir(out_dir):
        raise CkptError("directory is not empty", path=out_dir, step="dump")
    top = Renderer(source, chunk_size).root()
    files: dict[str, tuple[int, str]] = {}
    for path, node in walk(top):
        dest = os.path.join(out_dir, path)
        if isinstance(node, Dir):
            os.mkdir(dest)
            continue
        h, size = xxhash.xxh3_64(), 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, node.mode | 0o200)
        try:
            for piece in _pieces(node):
                os.write(fd, piece)
                h.update(piece)
                size += len(piece)
        finally:
            os.close(fd)
        files[path] = (size, h.hexdigest())
    _write_small(out_dir, "ctl", b"", 0o600)
    _write_small(out_dir, "status", b"frozen\n" if source.frozen else b"running\n", 0o444)
    _write_small(out_dir, "manifest", manifest_bytes(source, source.pids()[0], chunk_size, files), 0o444)
    return files


def _write_small(d: str, name: str, data: bytes, mode: int) -> None:
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    os.chmod(os.path.join(d, name), mode)


# -- reading a tree back ---------------------------------------------------------------------
class TreeSource(Source):
    """A tree directory as a Source. Text is parsed up front (every error names its file);
    memory stays in the chunk files and is read on demand."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.manifest = manifest.load(os.path.join(self.root, "manifest"))
        self.frozen = self.manifest.get("state") == "frozen"
        self.chunk_size = int(self.manifest.get("chunk_size", DEFAULT_CHUNK))
        self._files: dict[int, object] = {}
        self._file_ids: dict[tuple, int] = {}
        self._pipes: dict[int, bytes] = {}
        self._ghosts: dict[int, str] = {}   # file id of a deleted file -> its contents file
        self._ghost_of: dict[int, int] = {}  # descriptor's file id -> its ghost's (fds/<n>/ghost)
        self.socket_queues: dict[int, list[str]] = {}   # socket file id -> its queue/<n> files
        self.tcp_streams: dict[int, tuple] = {}         # file id -> (tcp_stream_entry, outq file)
        self._lock = threading.Lock()
        self._chunks: dict[str, list[str]] | None = None        # frozen: pages dir -> chunks
        self._ranges: dict[tuple, list[PageRange]] = {}         # frozen: (pid, start, end) -> ranges
        self._tasks = {pid: self._load_task(pid) for pid in self._task_pids()}
        self._pstree = self._order_pstree()

    # files --------------------------------------------------------------------------------
    def _p(self, *parts) -> str:
        # Joined by hand: tree-relative parts never start with "/" (os.path.join's one
        # difference), and a restore asks for ~1300 paths, where join's cost shows.
        return "/".join((self.root, *map(str, parts)))

    def _read(self, rel: str, codec: Codec, *, missing=BadTree):
        """The decoded value of one file; a missing file raises `missing` (a BadTree by
        default; pass None to get None back). Tree text files are small: one read."""
        path = self._p(rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if missing is None:
                return None
            raise BadTree("missing file", path=path) from None
        try:
            data = os.read(fd, 1 << 16)
            if len(data) == 1 << 16:    # a short read of a regular file is its end
                data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        finally:
            os.close(fd)
        return decode(codec, data, path)

    def _exists(self, rel: str) -> bool:
        return os.path.lexists(self._p(rel))

    def _task_pids(self) -> list[int]:
        listed = [int(p) for p in self.manifest.get("tasks", [])]
        try:
            present = sorted(int(n) for n in os.listdir(self._p("tasks")) if n.isdigit())
        except FileNotFoundError:
            raise BadTree("missing directory", path=self._p("tasks")) from None
        if listed and sorted(listed) != present:
            raise BadTree(f"manifest lists tasks {sorted(listed)} but the tree has {present}",
                          path=self._p("manifest"))
        if not present:
            raise BadTree("no tasks", path=self._p("tasks"))
        return listed or present

    def _file_id(self, key: tuple, make: Callable[[int], object]) -> int:
        if key not in self._file_ids:
            fid = len(self._file_ids) + 1
            self._file_ids[key] = fid
            self._files[fid] = make(fid)
        return self._file_ids[key]

    def _reg_id(self, name: str, flags: int = 0, pos: int = 0, key=None, mode=None, size=None) -> int:
        def make(fid):
            fe = pb.file_entry(type=pb.fd_types.Value("REG"), id=fid)
            fe.reg.id, fe.reg.flags, fe.reg.pos, fe.reg.name = fid, flags, pos, name
            fe.reg.fown.SetInParent()
            if mode is not None:
                fe.reg.mode = mode
            if size is not None:
                fe.reg.size = size
            return fe
        return self._file_id(key or ("path", name), make)

    # tasks ---------------------------------------------------------------------------------
    def _load_task(self, pid: int) -> _Ctx:
        base = f"tasks/{pid}"
        ctx = _Ctx(ps=pb.pstree_entry(pid=pid), core=pb.core_entry(mtype=pb.march.Value("X86_64")),
                   mm=pb.mm_entry(), fs=pb.fs_entry(), names={})
        state = self._read(f"{base}/state", names(F.TASK_STATES))
        if state in DEAD_STATES:
            return self._load_zombie(ctx, base)
        self._fill(ctx, base, TASK_FIELDS)
        ctx.core.tc.rlimits.SetInParent()
        for name in F.RLIMITS:
            cur, mx = self._read(f"{base}/rlimits/{name}", RLIMIT)
            ctx.core.tc.rlimits.rlimits.add(cur=cur, max=mx)
        self._load_sigactions(ctx.core.tc, f"{base}/sigactions")
        self._load_timers(ctx.core.tc.timers, f"{base}/timers")
        self._load_pending(ctx.core.tc.signals_s, f"{base}/pending")
        ctx.mm.exe_file_id = self._map_file_id(base, "exe_ghost", ctx.names["exe"])
        ctx.fs.cwd_id = self._reg_id(ctx.names["cwd"])
        ctx.fs.root_id = self._reg_id(ctx.names["root"])
        ctx.threads = self._load_threads(pid, ctx)
        ctx.ps.threads.extend(sorted(ctx.threads))
        ctx.vmas = self._load_maps(pid, ctx.mm)
        ctx.fdinfo = self._load_fds(pid)
        ctx.files_shared_with = self._read(f"{base}/files_shared_with", DEC, missing=None)
        return ctx

    def _load_zombie(self, ctx: _Ctx, base: str) -> _Ctx:
        for name, dotted, codec in TASK_FIELDS:
            if name in ZOMBIE_FILES:
                set_path(ctx, dotted, self._read(f"{base}/{name}", codec))
        tc = ctx.core.tc
        tc.personality, tc.flags, tc.blk_sigset = 0, 0, 0
        ctx.ps.threads.append(ctx.ps.pid)
        ctx.threads, ctx.vmas, ctx.fdinfo = {ctx.ps.pid: ctx.core}, [], []
        return ctx

    def _load_timers(self, timers, base: str) -> None:
        for kind in ITIMERS:
            it = getattr(timers, kind)
            it.isec = it.iusec = it.vsec = it.vusec = 0
            if self._exists(f"{base}/{kind}"):
                it.isec, it.iusec = self._read(f"{base}/{kind}/interval", USEC)
                it.vsec, it.vusec = self._read(f"{base}/{kind}/value", USEC)
        posix = self._p(f"{base}/posix")
        for name in sorted(os.listdir(posix), key=_int_or_name) if os.path.isdir(posix) else []:
            tb = f"{base}/posix/{name}"
            if not name.isdigit():
                raise BadTree(f"timer id {name!r} is not a number", path=self._p(tb))
            pt = timers.posix.add(it_id=int(name))
            for fname, field, codec in POSIX_FIELDS:
                if fname != "notify_thread" or self._exists(f"{tb}/{fname}"):
                    setattr(pt, field, self._read(f"{tb}/{fname}", codec))
            pt.isec, pt.insec = self._read(f"{tb}/interval", NSEC)
            pt.vsec, pt.vnsec = self._read(f"{tb}/value", NSEC)

    def _load_pending(self, queue, base: str) -> None:
        path = self._p(base)
        for name in sorted(os.listdir(path), key=_int_or_name) if os.path.isdir(path) else []:
            data = self._read(f"{base}/{name}", BLOB)
            if len(data) != 128:
                raise BadTree(f"siginfo is {len(data)} bytes, not 128", path=self._p(base, name))
            queue.signals.add(siginfo=data)

    def _fill(self, ctx, base: str, table, present: set[str] | None = None) -> None:
        """Table fields from the files under `base`; `present` (the directory's listing, when
        the caller has it) spares trying to open the optional files that are not there."""
        for name, dotted, codec in table:
            rel = f"{base}/{name}"
            value = None if present is not None and name not in present \
                else self._read(rel, codec, missing=None)
            if value is None:
                if name not in DERIVED and _is_required_path(ctx, dotted):
                    raise BadTree("missing file", path=self._p(rel))
                continue
            if dotted.startswith("names."):
                ctx.names[dotted[6:]] = value
            elif dotted == "sigmask":
                ctx.sigmask = value
            else:
                try:
                    set_path(ctx, dotted, value)
                except (ValueError, TypeError) as e:
                    raise BadTree(f"value out of range: {value!r} ({e})", path=self._p(rel)) from None

    def _load_sigactions(self, tc, base: str) -> None:
        present = set(os.listdir(self._p(base))) if self._exists(base) else set()
        unknown = present - {F.SIGNAL_NAMES[s] for s in F.SIGACTION_SIGNALS}
        if unknown:
            raise BadTree(f"unknown signal name {sorted(unknown)[0]!r}", path=self._p(base))
        for signo in F.SIGACTION_SIGNALS:
            sa = tc.sigactions.add(sigaction=0, flags=0, restorer=0, mask=0)
            name = F.SIGNAL_NAMES[signo]
            if name in present:
                self._fill(_Ctx(sa=sa), f"{base}/{name}", SIGACTION_FIELDS)

    def _load_threads(self, pid: int, task: _Ctx) -> dict[int, object]:
        base = f"tasks/{pid}/threads"
        tids = sorted(int(t) for t in os.listdir(self._p(base)) if t.isdigit()) if self._exists(base) else []
        if pid not in tids:
            raise BadTree(f"thread-group leader {pid} has no thread directory", path=self._p(base))
        out = {}
        from . import xsave
        for tid in tids:
            core = task.core if tid == pid else pb.core_entry(mtype=pb.march.Value("X86_64"))
            if tid != pid:
                core.thread_core.creds.CopyFrom(task.core.thread_core.creds)
            ctx = _Ctx(core=core, sigmask=0)
            self._fill(ctx, f"{base}/{tid}", THREAD_FIELDS)
            self._load_pending(core.thread_core.signals_p, f"{base}/{tid}/pending")
            core.thread_info.gpregs.mode = pb.user_x86_regs_mode.Value("NATIVE")
            if tid == pid:
                core.tc.blk_sigset = ctx.sigmask
            else:
                core.thread_core.blk_sigset = ctx.sigmask
            path = self._p(f"{base}/{tid}/fpu")
            try:
                core.thread_info.fpregs.CopyFrom(xsave.split(self._read(f"{base}/{tid}/fpu", BLOB)))
            except CkptError:
                raise
            except Exception as e:
                raise BadTree(f"bad xsave area ({e})", path=path) from None
            out[tid] = core
        return out

    def _load_maps(self, pid: int, mm) -> list:
        base = f"tasks/{pid}/maps"
        names = os.listdir(self._p(base)) if self._exists(base) else []
        vmas = []
        for name in names:
            try:
                start, end = (int(x, 16) for x in name.split("-"))
            except ValueError:
                raise BadTree(f"map directory name {name!r} is not <start>-<end>", path=self._p(base, name)) from None
            if start >= end or start % PAGE_SIZE or end % PAGE_SIZE or end > 1 << 64:
                raise BadTree(f"bad address range {name!r}", path=self._p(base, name))
            vma = pb.vma_entry(start=start, end=end, shmid=0, fd=-1)
            ctx = _Ctx(vma=vma, names={})
            try:
                present = set(os.listdir(self._p(base, name)))
            except NotADirectoryError:
                raise BadTree("a map must be a directory", path=self._p(base, name)) from None
            self._fill(ctx, f"{base}/{name}", VMA_FIELDS, present)
            if vma.status & SHMEM_STATUS and "shmid" not in present:
                raise BadTree("shared anonymous map without shmid", path=self._p(base, name, "shmid"))
            if vma.status & FILE_MAPS and vma.status & MEMFD_MAP:
                vma.shmid = self._memfd_map_id(f"{base}/{name}", present)
            elif vma.status & FILE_MAPS:
                vma.shmid = self._map_file_id(
                    f"{base}/{name}", "ghost" if "ghost" in present else None,
                    ctx.names.get("path", ""), vma.fdflags if vma.HasField("fdflags") else 0)
            vmas.append(vma)
        vmas.sort(key=lambda v: v.start)
        for a, b in zip(vmas, vmas[1:]):
            if a.end > b.start:
                raise BadTree(f"maps {a.start:x}-{a.end:x} and {b.start:x}-{b.end:x} overlap",
                              path=self._p(base))
        mm.vmas.extend(vmas)
        return vmas

    def _map_file_id(self, base: str, ghost: str | None, name: str, flags: int = 0) -> int:
        """File id of a mapped file or the exe: by name, or, when `base/ghost` names a saved
        deleted file (ghosts/<n>), that file (one id for every map and task using it)."""
        n = self._read(f"{base}/{ghost}", DEC, missing=None) if ghost else None
        if n is None:
            return self._reg_id(name, flags)
        return self._ghost_file(n, name)

    def _memfd_map_id(self, base: str, present: set) -> int:
        """File id of a mapped memfd (maps/<range>/memfd = its inode): one MEMFD entry per
        inode; its name, seals and contents are memfds/<inode>/'s, or else those of the
        descriptor holding that memfd (fdkinds.HeldMemfd)."""
        from . import fdkinds
        if "memfd" not in present:
            raise BadTree("a memfd map needs its memfd's inode", path=self._p(base, "memfd"))
        inode = self._read(f"{base}/memfd", DEC)

        def make(fid):
            fe = pb.file_entry(type=pb.fd_types.Value("MEMFD"), id=fid)
            fe.memfd.id, fe.memfd.inode_id = fid, inode
            fe.memfd.flags, fe.memfd.pos = os.O_RDWR, 0
            fe.memfd.fown.SetInParent()
            if not hasattr(self, "memfds"):
                self.memfds = {}
            self.memfds[fid] = fdkinds.load_memfd_object(self, inode) \
                if self._exists(f"memfds/{inode}") else \
                fdkinds.HeldMemfd(self, inode, self._p(base, "memfd"))
            return fe
        return self._file_id(("memfd-map", inode), make)

    def _ghost_file(self, n: int, name: str) -> int:
        """The file id of ghosts/<n> (one for every map, task and descriptor naming it)."""
        d = f"ghosts/{n}"
        if not self._exists(f"{d}/contents"):
            raise BadTree(f"deleted file {n} has no saved contents", path=self._p(d, "contents"))
        mode = self._read(f"{d}/mode", _OCTMODE, missing=None)
        fid = self._reg_id(name, key=("ghost", n), mode=mode,
                           size=os.path.getsize(self._p(d, "contents")))
        self._ghosts[fid] = self._p(d, "contents")
        return fid

    def _load_fds(self, pid: int) -> list:
        base = f"tasks/{pid}/fds"
        fds = sorted(int(n) for n in os.listdir(self._p(base)) if n.isdigit()) if self._exists(base) else []
        return [self._load_fd(pid, f"{base}/{fd}", fd) for fd in fds]

    def _load_fd(self, pid: int, base: str, fd: int):
        word = self._read(f"{base}/type", STR)
        key = ("open", self._read(f"{base}/open_file", DEC)) if self._exists(f"{base}/open_file") \
            else ("fd", pid, fd)
        flags = self._read(f"{base}/flags", OPEN)
        fdflags = F.FD_CLOEXEC if flags & F.O_CLOEXEC else 0
        flags &= ~F.O_CLOEXEC
        fdi = pb.fdinfo_entry(flags=fdflags, fd=fd)
        if word in ("file", "dir", "chr", "blk"):
            mode = self._read(f"{base}/mode", _OCTMODE) if self._exists(f"{base}/mode") else None
            size = self._read(f"{base}/size", DEC) if self._exists(f"{base}/size") else None
            fdi.id = self._reg_id(self._read(f"{base}/path", STR), flags, self._read(f"{base}/pos", DEC),
                                  key=key, mode=mode, size=size)
            fdi.type = pb.fd_types.Value("REG")
            if self._exists(f"{base}/ghost"):      # deleted and also mapped: ghosts/<n>
                ghost = self._ghost_file(self._read(f"{base}/ghost", DEC),
                                         self._files[fdi.id].reg.name)
                self._ghost_of[fdi.id] = ghost
                self._ghosts[fdi.id] = self._ghosts[ghost]
            elif self._exists(f"{base}/deleted") and self._read(f"{base}/deleted", DEC):
                self._ghosts[fdi.id] = self._p(f"{base}/contents")
                if not self._exists(f"{base}/contents"):
                    raise BadTree("a deleted file needs its contents", path=self._ghosts[fdi.id])
        elif word in ("pipe", "fifo"):
            pipe_id = self._read(f"{base}/pipe_id", DEC)
            if self._exists(f"{base}/data"):
                self._pipes.setdefault(pipe_id, self._read(f"{base}/data", BLOB))
            fdi.type = pb.fd_types.Value(word.upper())
            fdi.id = self._pipe_file(word, pid, fd, pipe_id, flags, base, key)
        elif word == "eventfd":
            count = self._read(f"{base}/count", DEC)

            def make(fid):
                fe = pb.file_entry(type=pb.fd_types.Value("EVENTFD"), id=fid)
                fe.efd.id, fe.efd.flags, fe.efd.counter = fid, flags, count
                fe.efd.fown.SetInParent()
                return fe
            fdi.type, fdi.id = pb.fd_types.Value("EVENTFD"), self._file_id(key, make)
        elif word in ("eventpoll", "signalfd", "timerfd", "memfd", "tty"):      # fdkinds.WORDS
            from . import fdkinds
            fdi.type, fdi.id = fdkinds.load(self, base, key, flags, word)
        elif word == "socket" and (got := sockets.load(self, base, key, flags)) is not None:
            fdi.type, fdi.id = got
        else:
            kind = {"socket": "UNIXSK"}.get(word, "UND")
            fdi.type = pb.fd_types.Value(kind)
            fdi.id = self._file_id(key, lambda fid: pb.file_entry(type=fdi.type, id=fid))
            self._unsupported = getattr(self, "_unsupported", []) + [(self._p(base), word)]
        return fdi

    def _pipe_file(self, word, pid, fd, pipe_id, flags, base, key) -> int:
        def make(fid):
            fe = pb.file_entry(type=pb.fd_types.Value(word.upper()), id=fid)
            sub = fe.pipe if word == "pipe" else fe.fifo
            sub.id, sub.pipe_id = fid, pipe_id
            if word == "pipe":
                sub.flags = flags
                sub.fown.SetInParent()
            else:
                sub.regf_id = self._reg_id(self._read(f"{base}/path", STR), flags, key=("fifo", pid, fd))
            return fe
        return self._file_id(key, make)

    def _order_pstree(self) -> list:
        by_pid = {pid: t.ps for pid, t in self._tasks.items()}
        order, seen = [], set()

        def visit(pid):
            if pid in seen:
                return
            seen.add(pid)
            ppid = by_pid[pid].ppid
            if ppid in by_pid:
                visit(ppid)
            order.append(by_pid[pid])
        root = int(self.manifest.get("root", min(by_pid)))
        if root not in by_pid:
            raise BadTree(f"root task {root} has no directory", path=self._p("manifest"))
        visit(root)
        for pid in sorted(by_pid):
            visit(pid)
        return order

    # Source interface ------------------------------------------------------------------------
    def meta(self) -> Meta:
        s = dict(self.manifest.get("source", {}))
        s["xfeatures"] = int(str(s.get("xfeatures", "0")), 0)
        s["cpu_flags"] = tuple(s.get("cpu_flags", ()))
        known = {f.name for f in dataclasses.fields(Meta)}
        return Meta(**{k: v for k, v in s.items() if k in known})

    def pstree(self):
        return self._pstree

    def core(self, tid: int):
        for t in self._tasks.values():
            if tid in t.threads:
                return t.threads[tid]
        raise KeyError(tid)

    def ids(self, pid: int):
        order = list(self._tasks)
        n = 2 + order.index(pid)
        shared = getattr(self._tasks[pid], "files_shared_with", None)
        files_id = 2 + order.index(shared) if shared in self._tasks else n
        return pb.task_kobj_ids_entry(vm_id=n, files_id=files_id, fs_id=n, sighand_id=n)

    def mm(self, pid: int):
        return self._tasks[pid].mm

    def fs(self, pid: int):
        return self._tasks[pid].fs

    def fdinfo(self, pid: int):
        return self._tasks[pid].fdinfo

    def file(self, file_id: int):
        return self._files[file_id]

    def pipe_data(self, pipe_id: int) -> bytes:
        return self._pipes.get(pipe_id, b"")

    def socket_queue(self, file_id: int) -> list[bytes]:
        return [_whole(p) for p in self.socket_queues.get(file_id, [])]

    def task_tty(self, pid: int) -> dict:
        names = self._tasks[pid].names
        return {k: names[k] for k in ("ctty", "tty_pgrp") if k in names}

    def tcp_stream(self, file_id: int):
        kept = self.tcp_streams.get(file_id)
        return None if kept is None else (kept[0], _whole(kept[1]))

    def file_deleted(self, file_id: int) -> bool:
        """A deleted file's id (saved contents), or a memfd's (never linked anywhere)."""
        return file_id in self._ghosts or self._files[file_id].HasField("memfd")

    def file_contents(self, file_id: int) -> bytes:
        with open(self._ghosts[file_id], "rb") as f:
            return f.read()

    def file_ghost(self, file_id: int) -> int:
        """The ghost a deleted file id stands for (tree.ghost_of)."""
        return self._ghost_of.get(file_id, file_id)

    def unsupported(self) -> list[tuple[str, str]]:
        """(fd directory, type) of descriptors restore cannot handle."""
        return list(getattr(self, "_unsupported", []))

    def chunk_path(self, pid: int, vma, offset: int) -> str:
        return self._p(f"tasks/{pid}/maps/{vma.start:x}-{vma.end:x}/pages/{hex(offset)}")

    def _chunk_names(self, pid: int, vma) -> list[str]:
        """A frozen tree's chunks are the ones its manifest lists (a stray file is not memory);
        otherwise the files present, without rsync's hidden temp files."""
        rel = f"tasks/{pid}/maps/{vma.start:x}-{vma.end:x}/pages/"
        if self.frozen and "files" in self.manifest:
            return self._chunk_index().get(rel, [])
        try:
            return [n for n in os.listdir(self._p(rel)) if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def _chunk_index(self) -> dict[str, list[str]]:
        """Pages directory (relative, with its slash) -> the chunk names the frozen manifest
        lists there: one pass over the manifest instead of one per map."""
        if self._chunks is None:
            index: dict[str, list[str]] = {}
            for rel in self.manifest["files"]:
                head, sep, name = rel.rpartition("/pages/")
                if sep and "/" not in name:
                    index.setdefault(head + sep, []).append(name)
            self._chunks = index
        return self._chunks

    @staticmethod
    def _chunk_size(path: str) -> int:
        """The chunk file's own size (an edit after the manifest was sealed shows here)."""
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            raise BadTree("missing chunk (listed in the manifest)", path=path) from None

    def page_ranges(self, pid: int, vma) -> list[PageRange]:
        """Saved ranges of a map, one per chunk; a frozen tree's are computed once (plan,
        map and fill all ask)."""
        key = (pid, vma.start, vma.end)
        if key in self._ranges:
            return list(self._ranges[key])
        rel = f"tasks/{pid}/maps/{vma.start:x}-{vma.end:x}/pages/"
        out = []
        for name in self._chunk_names(pid, vma):
            path = self._p(rel + name)
            try:
                off = int(name, 16)
            except ValueError:
                raise BadTree(f"chunk name {name!r} is not a hex offset", path=path) from None
            want = min(self.chunk_size, vma.end - vma.start - off)
            if off % self.chunk_size or want <= 0:
                raise BadTree(f"chunk offset {name} is not a cell of this map", path=path)
            size = self._chunk_size(path)
            if size != want:
                raise BadTree(f"chunk is {size} bytes, the map needs {want}", path=path)
            out.append(PageRange(vma.start + off, vma.start + off + size))
        out.sort(key=lambda r: r.start)
        if self.frozen:
            self._ranges[key] = out
        return list(out)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        vma = next((v for v in self._tasks[pid].vmas if v.start <= addr < v.end), None)
        if vma is None:
            raise BadTree(f"address 0x{addr:x} is in no map", path=self._p(f"tasks/{pid}/maps"))
        out = bytearray()
        while size > 0:
            off = (addr - vma.start) // self.chunk_size * self.chunk_size
            within = addr - vma.start - off
            n = min(size, self.chunk_size - within, vma.end - addr)
            path = self.chunk_path(pid, vma, off)
            try:
                with open(path, "rb") as f:
                    f.seek(within)
                    piece = f.read(n)
            except FileNotFoundError:
                piece = b""
            out += piece + bytes(n - len(piece))
            addr, size = addr + n, size - n
        return bytes(out)

    def isolation(self) -> Isolation:
        iso = Isolation()
        rd = lambda rel: self._read(f"isolation/{rel}", STR)  # noqa: E731
        if self._exists("isolation/uts/hostname"):
            iso.hostname = rd("uts/hostname")
        if self._exists("isolation/uts/domainname"):
            iso.domainname = rd("uts/domainname")
        for kind in NS_KINDS:
            if self._exists(f"isolation/ns/{kind}"):
                iso.namespaces[kind] = self._read(f"isolation/ns/{kind}", DEC)
        if self._exists("isolation/own"):
            own = rd("own").split()
            iso.own_namespaces = tuple(k for k in own if k != "none")
        if self._exists("isolation/cgroup/path"):
            iso.cgroup = rd("cgroup/path")
        for name in LIMIT_NAMES:
            if self._exists(f"isolation/limits/{name}"):
                iso.limits[name] = rd(f"limits/{name}")
        from .isolation import load_extra

        def read(rel):
            path = self._p("isolation", rel)
            if not os.path.isfile(path):
                return None
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()

        def listdir(rel):
            path = self._p("isolation", rel)
            return sorted(os.listdir(path)) if os.path.isdir(path) else []
        try:
            return load_extra(iso, read, listdir, lambda rel: self._p("isolation", rel))
        except CkptError as e:      # the records name tree-relative files: name them whole
            if not e.path or os.path.isabs(e.path):
                raise
            err = BadTree(str(e).replace(e.path, self._p(e.path), 1))
            err.path, err.step = self._p(e.path), e.step
            raise err from e


def _int_or_name(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


_OCTMODE = Codec(lambda v: f"0{v:o}", _int(8))


# Sub-messages CRIU restore always needs: a missing file below them is an incomplete tree.
ALWAYS_PRESENT = {"tc", "thread_core", "thread_info", "gpregs", "creds", "fpregs"}


def _is_required_path(ctx, dotted: str) -> bool:
    """A table entry whose field is required in its message must have a file."""
    if dotted.startswith("names.") or dotted == "sigmask":
        return dotted in ("names.exe", "names.cwd", "names.root", "sigmask")
    *head, last = dotted.split(".")
    obj = ctx
    for part in head:
        if hasattr(obj, "DESCRIPTOR") and part not in ALWAYS_PRESENT:
            if not _required(obj.DESCRIPTOR.fields_by_name[part]):
                return False
        obj = getattr(obj, part)
    return _required(obj.DESCRIPTOR.fields_by_name[last])
