"""epoll, signalfd and timerfd descriptors in the tree: the files of fds/<n>/, both directions.

render(src, fdi, tname, sub) -> the files of fds/<n>/ beyond type/flags/open_file ({} for
another kind); load(ts, base, key, flags, word) -> (fd type value, file id) for a `type`
word in WORDS. One file per value (docs/FORMAT.md, fds/<n>/):

    eventpoll   targets/<tfd>/events   EPOLLIN|EPOLLET ...   (eventpoll_tfd_entry.events)
                targets/<tfd>/data     0x...  the cookie epoll_wait hands back (.data)
                <tfd> is the watched descriptor's number in the task that holds the epoll;
                no targets/ directory: nothing is watched
    signalfd    sigmask                0x0000000000000400: bit n-1 = signal n (signalfd_entry)
    timerfd     clock                  CLOCK_MONOTONIC ...  (timerfd_entry.clockid)
                ticks                  expirations not read yet
                settime_flags          TFD_TIMER_ABSTIME|TFD_TIMER_CANCEL_ON_SET or 0
                value, interval        seconds.nanoseconds; value is the time LEFT until the
                                       next expiration when captured (0.000000000: disarmed)
    tty         path                   the terminal's path (/dev/pts/3), tty_file_entry.regf_id
                rdev                   its device, major:minor (136:3): restore reopens the
                                       path only if it is still that terminal. Whose
                                       controlling terminal it is lives with the task, not
                                       the descriptor: tasks/<pid>/ctty and, for the session
                                       leader, tasks/<pid>/tty_pgrp (restore/linux.py _ctty)
    memfd       name                   the memfd_create name (without /memfd:)
                inode                  the memfd's inode: descriptions with one inode share
                                       one memfd (memfd_file_entry.inode_id)
                pos                    the description's offset
                seals                  F_SEAL_SEAL|F_SEAL_WRITE ... or 0
                contents               the whole file (binary)

A memfd a task maps is one object with the descriptors of the same inode (CRIU: the VMA's
shmid names a memfd file entry): maps/<range>/memfd holds its inode, and its name, seals and
contents are those of a descriptor with that inode, or, when only maps reach it, of
memfds/<inode>/{name,seals,contents} (mapped_memfds, render_memfd_object,
load_memfd_object). A shared memfd map saves no pages of its own.
"""
from __future__ import annotations

import os

from . import flags as F
from . import pb

EPOLL_EVENTS = {"EPOLLIN": 0x1, "EPOLLPRI": 0x2, "EPOLLOUT": 0x4, "EPOLLERR": 0x8,
                "EPOLLHUP": 0x10, "EPOLLNVAL": 0x20, "EPOLLRDNORM": 0x40, "EPOLLRDBAND": 0x80,
                "EPOLLWRNORM": 0x100, "EPOLLWRBAND": 0x200, "EPOLLMSG": 0x400,
                "EPOLLRDHUP": 0x2000, "EPOLLEXCLUSIVE": 1 << 28, "EPOLLWAKEUP": 1 << 29,
                "EPOLLONESHOT": 1 << 30, "EPOLLET": 1 << 31}
TFD_SETTIME = {"TFD_TIMER_ABSTIME": 1, "TFD_TIMER_CANCEL_ON_SET": 2}
WORDS = {"eventpoll": "EVENTPOLL", "signalfd": "SIGNALFD", "timerfd": "TIMERFD",
         "memfd": "MEMFD", "tty": "TTY"}
SEALS = {"F_SEAL_SEAL": 1, "F_SEAL_SHRINK": 2, "F_SEAL_GROW": 4, "F_SEAL_WRITE": 8,
         "F_SEAL_FUTURE_WRITE": 0x10, "F_SEAL_EXEC": 0x20}
F_GET_SEALS = 1034
MEMFD_PREFIX = "/memfd:"


class MemfdState:
    """What a memfd's file holds beyond memfd_file_entry (CRIU keeps it in memfd_inode_entry
    and a shmem pagemap): its name, seals and whole contents."""

    def __init__(self, name: str, seals: int, contents):
        self.name, self.seals = name, seals
        self._contents = contents          # bytes, a path in a tree, or a callable

    def contents(self) -> bytes:
        if isinstance(self._contents, bytes):
            return self._contents
        if callable(self._contents):
            return self._contents()
        with open(self._contents, "rb") as f:
            return f.read()


class HeldMemfd:
    """A tree's mapped memfd (maps/<range>/memfd) whose contents a descriptor's files hold:
    the state of the first descriptor memfd with that inode, found when first asked (the
    descriptors may be read after the maps)."""

    def __init__(self, ts, inode: int, where: str):
        self.ts, self.inode, self.where = ts, inode, where

    def _held(self) -> MemfdState:
        for fid, state in self.ts.memfds.items():
            fe = self.ts.file(fid)
            if state is not self and fe.HasField("memfd") and fe.memfd.inode_id == self.inode \
                    and not isinstance(state, HeldMemfd):
                return state
        from .errors import BadTree
        raise BadTree(f"mapped memfd {self.inode}: no descriptor holds it and memfds/"
                      f"{self.inode}/ is missing", path=self.where)

    name = property(lambda self: self._held().name)
    seals = property(lambda self: self._held().seals)

    def contents(self) -> bytes:
        return self._held().contents()


def memfd_state(src, file_id: int, where: str = "") -> MemfdState:
    """The name, seals and contents of memfd `file_id` (a descriptor's or a map's): a tree
    keeps them in its files (TreeSource.memfds), a live process is asked through
    /proc/PID/fd/N or /proc/PID/map_files/<range>."""
    kept = getattr(src, "memfds", {}).get(file_id)
    if kept is not None:
        return kept
    if hasattr(src, "memfd"):                  # ImageSource: memfd.img + a shmem pagemap
        inode, data = src.memfd(file_id)
        return MemfdState(inode.name, inode.seals, data)
    refs = getattr(getattr(src, "_files", None), "refs", None)   # LiveSource's file table
    if refs is None or file_id not in refs:
        from .errors import Unsupported
        raise Unsupported(f"this checkpoint keeps no contents for memfd file {file_id}",
                          path=where, step="memfd")
    return _live_memfd(refs[file_id].path)


def _live_memfd(proc_path: str) -> MemfdState:
    from .capture import files as C, procfs
    link = procfs.readlink(proc_path)
    name = procfs.strip_deleted(link)[0][len(MEMFD_PREFIX):]
    fd = os.open(proc_path, os.O_RDONLY | os.O_CLOEXEC)   # a new description: no offset moves
    try:
        import fcntl
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    finally:
        os.close(fd)
    return MemfdState(name, seals, lambda: C.read_whole(proc_path))


def held_memfd_inodes(src) -> set[int]:
    """Inodes of the memfds some task's descriptor holds (their contents go with it)."""
    from .tree import DEAD_STATES
    out = set()
    for pid in src.pids():
        if src.core(pid).tc.task_state in DEAD_STATES:
            continue
        for fdi in src.fdinfo(pid):
            if fdi.type == pb.fd_types.Value("MEMFD"):
                out.add(src.file(fdi.id).memfd.inode_id)
    return out


def mapped_memfds(src) -> dict[int, int]:
    """inode -> a map's file id, for every memfd a task maps and no descriptor holds: the
    tree keeps those once in memfds/<inode>/ (CRIU: memfd.img + its shmem pagemap)."""
    from .tree import DEAD_STATES, FILE_MAPS
    out: dict[int, int] = {}
    for pid in src.pids():
        if src.core(pid).tc.task_state in DEAD_STATES:
            continue
        for v in src.mm(pid).vmas:
            if v.status & FILE_MAPS and v.status & F.VMA_STATUS["VMA_AREA_MEMFD"]:
                fe = src.file(v.shmid)
                if fe.HasField("memfd"):
                    out.setdefault(fe.memfd.inode_id, v.shmid)
    if not out:
        return out
    held = held_memfd_inodes(src)
    return {ino: fid for ino, fid in out.items() if ino not in held}


def render_memfd_object(src, file_id: int) -> dict[str, object]:
    """memfds/<inode>/: name, seals and contents of a memfd only maps reach."""
    state = memfd_state(src, file_id)
    return {"name": state.name, "seals": F.render_bits(state.seals, SEALS),
            "contents": state.contents()}


def load_memfd_object(ts, inode: int):
    """The MemfdState memfds/<inode>/ describes (BadTree naming a missing file)."""
    from . import tree as T
    from .errors import BadTree
    d = f"memfds/{inode}"
    if not os.path.isfile(ts._p(f"{d}/contents")):
        raise BadTree(f"mapped memfd {inode} has no saved contents", path=ts._p(f"{d}/contents"))
    return MemfdState(ts._read(f"{d}/name", T.STR), ts._read(f"{d}/seals", T.bits(SEALS)),
                      ts._p(f"{d}/contents"))


def _clocks() -> dict[str, int]:
    from . import tree as T
    return T.CLOCKS


def _nsec(sec: int, nsec: int) -> str:
    return f"{sec}.{nsec:09d}"


# -- render: Source -> files ----------------------------------------------------------------
def render(src, fdi, tname: str, sub) -> dict[str, object]:
    if sub is not None and tname == "MEMFD":
        return _render_memfd(src, fdi, sub)
    if sub is not None and tname == "TTY":
        return _render_tty(src, sub)
    if sub is None or tname not in RENDER:
        return {}
    return RENDER[tname](sub)


def _render_epoll(e) -> dict[str, object]:
    out: dict[str, object] = {}
    for t in e.tfd:
        # a number can be watched twice only if it was closed and reused while the first file
        # stayed open elsewhere: restore could not tell the two apart, so neither does the tree
        if f"targets/{t.tfd}/events" in out:
            from .errors import Unsupported
            raise Unsupported(f"descriptor {t.tfd} is watched twice (two files under one "
                              "number)", step="eventpoll")
        out[f"targets/{t.tfd}/events"] = F.render_bits(t.events, EPOLL_EVENTS)
        out[f"targets/{t.tfd}/data"] = f"0x{t.data:x}"
    return out


def _render_signalfd(s) -> dict[str, object]:
    return {"sigmask": F.render_sigset(s.sigmask)}


def _render_timerfd(t) -> dict[str, object]:
    clocks = {v: k for k, v in _clocks().items()}
    return {"clock": clocks.get(t.clockid, str(t.clockid)), "ticks": t.ticks,
            "settime_flags": F.render_bits(t.settime_flags, TFD_SETTIME),
            "value": _nsec(t.vsec, t.vnsec), "interval": _nsec(t.isec, t.insec)}


def _render_memfd(src, fdi, m) -> dict[str, object]:
    state = memfd_state(src, fdi.id)
    return {"name": state.name, "inode": m.inode_id, "pos": m.pos,
            "seals": F.render_bits(state.seals, SEALS), "contents": state.contents()}


def _render_tty(src, t) -> dict[str, object]:
    out: dict[str, object] = {"rdev": f"{os.major(t.tty_info_id)}:{os.minor(t.tty_info_id)}"}
    if t.HasField("regf_id") and t.regf_id:
        out["path"] = src.file(t.regf_id).reg.name
    return out


RENDER = {"EVENTPOLL": _render_epoll, "SIGNALFD": _render_signalfd, "TIMERFD": _render_timerfd}


# -- load: files -> Source ------------------------------------------------------------------
def load(ts, base: str, key: tuple, flags: int, word: str):
    """(fd type value, file id) of the entry fds/<n>/ describes."""
    kind = WORDS[word]
    sub_name = {"EVENTPOLL": "epfd", "SIGNALFD": "sgfd", "TIMERFD": "tfd", "MEMFD": "memfd",
                "TTY": "tty"}[kind]

    def make(fid):
        fe = pb.file_entry(type=pb.fd_types.Value(kind), id=fid)
        sub = getattr(fe, sub_name)
        sub.id, sub.flags = fid, flags
        sub.fown.SetInParent()
        LOAD[kind](ts, base, sub)
        return fe
    return pb.fd_types.Value(kind), ts._file_id(key, make)


def _load_epoll(ts, base: str, e) -> None:
    from . import tree as T
    from .errors import BadTree
    where = f"{base}/targets"
    names = [n for n in os.listdir(ts._p(where)) if not n.startswith(".")] \
        if ts._exists(where) else []
    bad = [n for n in names if not n.isdigit()]
    if bad:
        raise BadTree(f"epoll target {bad[0]!r} is not a descriptor number", path=ts._p(where))
    for n in sorted(names, key=int):
        t = e.tfd.add(id=e.id, tfd=int(n))
        t.events = ts._read(f"{where}/{n}/events", T.bits(EPOLL_EVENTS))
        t.data = ts._read(f"{where}/{n}/data", T.HEX)


def _load_signalfd(ts, base: str, s) -> None:
    from . import tree as T
    s.sigmask = ts._read(f"{base}/sigmask", T.SIGSET)


def _load_timerfd(ts, base: str, t) -> None:
    from . import tree as T
    t.clockid = ts._read(f"{base}/clock", T.names(_clocks()))
    t.ticks = ts._read(f"{base}/ticks", T.DEC)
    t.settime_flags = ts._read(f"{base}/settime_flags", T.bits(TFD_SETTIME))
    t.vsec, t.vnsec = ts._read(f"{base}/value", T.NSEC)
    t.isec, t.insec = ts._read(f"{base}/interval", T.NSEC)


def _load_memfd(ts, base: str, m) -> None:
    from . import tree as T
    from .errors import BadTree
    m.pos, m.inode_id = ts._read(f"{base}/pos", T.DEC), ts._read(f"{base}/inode", T.DEC)
    contents = ts._p(f"{base}/contents")
    if not os.path.isfile(contents):
        raise BadTree("a memfd needs its contents", path=contents)
    state = MemfdState(ts._read(f"{base}/name", T.STR),
                       ts._read(f"{base}/seals", T.bits(SEALS)), contents)
    if not hasattr(ts, "memfds"):
        ts.memfds = {}
    ts.memfds[m.id] = state


def _load_tty(ts, base: str, t) -> None:
    from . import tree as T
    from .errors import BadTree
    text = ts._read(f"{base}/rdev", T.STR).strip()
    try:
        major, minor = (int(x) for x in text.split(":"))
    except ValueError:
        raise BadTree(f"rdev {text!r} is not major:minor", path=ts._p(f"{base}/rdev")) from None
    t.tty_info_id = os.makedev(major, minor)
    if ts._exists(f"{base}/path"):
        t.regf_id = ts._reg_id(ts._read(f"{base}/path", T.STR), t.flags, key=("tty", base))


LOAD = {"EVENTPOLL": _load_epoll, "SIGNALFD": _load_signalfd, "TIMERFD": _load_timerfd,
        "MEMFD": _load_memfd, "TTY": _load_tty}
