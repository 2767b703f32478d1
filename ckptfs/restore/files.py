"""Open file descriptions, made in the restorer and handed to the restored tasks.

The restorer opens every file object of the checkpoint itself (one open file description per
file id, so descriptors that shared a description — dup'ed, or inherited over fork — share
one again, offset and flags included), fills pipes with their queued bytes, makes memfds for
shared anonymous memory and sockets (restore/sockets.py). A helper takes a description with
pidfd_getfd(2) on a pidfd of the restorer and dup3s it to its number. Everything here is
closed when the restore ends.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import subprocess
import sys
import tempfile
import time

from .. import flags as F
from ..errors import KernelError, RestoreFailed
from ..capture import files as capture_files
from .sockets import Sockets

O_ACCMODE = 3
OPEN_DROP = os.O_CREAT | os.O_TRUNC | os.O_EXCL | F.O_CLOEXEC   # meaningful at open time only
F_SETPIPE_SZ = 1031
PIPE_MAX = 1 << 20          # the most an unprivileged pipe may hold here
EFD_FLAGS = os.O_NONBLOCK | 0o2000000 | 1     # EFD_NONBLOCK | EFD_CLOEXEC | EFD_SEMAPHORE


class FileTable:
    """Restorer-side descriptors, keyed by what they stand for; close() ends them all."""

    def __init__(self, source, log):
        self.source, self.log = source, log
        self._by_key: dict[tuple, int] = {}
        self._pipes: dict[int, tuple[int, int]] = {}
        self._sockets = Sockets(source)

    def use_netns(self, ns_path: str) -> None:
        """Sockets made from now on belong to this network namespace (/proc/PID/ns/net of a
        task), not the restorer's: for tasks restored into a namespace of their own."""
        self._sockets.netns = ns_path

    def close(self) -> None:
        self._sockets.close()
        fds = list(self._by_key.values()) + [fd for pair in self._pipes.values() for fd in pair]
        self._by_key.clear()
        self._pipes.clear()
        for fd in fds:
            os.close(fd)

    def _cached(self, key: tuple, make) -> int:
        if key not in self._by_key:
            self._by_key[key] = make()
        return self._by_key[key]

    # -- paths ------------------------------------------------------------------------------
    def path(self, path: str, flags: int, *, where: str, step: str) -> int:
        """A description of `path` opened with `flags` (shared by every caller asking the same)."""
        return self._cached(("path", path, flags), lambda: _open(path, flags, where, step))

    def description(self, file_id: int, *, where: str) -> int:
        """The open file description of a descriptor's file id."""
        return self._cached(("id", file_id), lambda: self._make(file_id, where))

    def _make(self, file_id: int, where: str) -> int:
        fe = self.source.file(file_id)
        kind = F.FD_TYPES
        if fe.type == kind["REG"] and self.source.file_deleted(file_id):
            return self._reopen(self.ghost(file_id, where=where), fe.reg, where)
        if fe.type == kind["REG"]:
            return self._reg(fe.reg, where)
        if fe.type == kind["PIPE"]:
            return self._pipe_end(fe.pipe.pipe_id, fe.pipe.flags, where)
        if fe.type == kind["FIFO"]:
            reg = self.source.file(fe.fifo.regf_id).reg
            return self._fifo(reg, fe.fifo.pipe_id, where)
        if fe.type == kind["EVENTFD"]:
            return os.eventfd(fe.efd.counter, (fe.efd.flags & EFD_FLAGS) | os.EFD_CLOEXEC)
        if fe.type in (kind["UNIXSK"], kind["INETSK"]):
            return self._sockets.make(fe, where)
        if fe.type == kind["SIGNALFD"]:
            return _signalfd(fe.sgfd, where)
        if fe.type == kind["TIMERFD"]:
            return _timerfd(fe.tfd, where)
        if fe.type == kind["EVENTPOLL"]:
            return self._eventpoll(fe.epfd, where)
        if fe.type == kind["MEMFD"]:
            return self._memfd(fe.memfd, where)
        if fe.type == kind["TTY"]:
            return self._tty(fe.tty, where)
        raise RestoreFailed(f"file type {fe.type} is not supported", path=where, step="open files")

    def _reg(self, reg, where: str) -> int:
        return self._reg_at(reg.name, reg, where)

    # -- deleted files --------------------------------------------------------------------
    def ghost(self, file_id: int, *, where: str) -> int:
        """An O_PATH descriptor of the re-made deleted file that `file_id` stands for: one
        file per ghost (tree.ghost_of), so the descriptors and maps of one deleted inode are
        one inode again; each user opens /proc/self/fd/<it> anew with its own flags and
        offset. O_PATH, not O_RDWR: a writer would stop it from becoming an exe (EACCES)."""
        from ..tree import ghost_of
        ghost = ghost_of(self.source, file_id)
        return self._cached(("ghost", ghost), lambda: self._make_ghost(ghost, where))

    def _make_ghost(self, ghost: int, where: str) -> int:
        """A file that was unlinked while open: its saved contents go into a new file, which
        is opened and unlinked again, so the task holds an unlinked file once more
        ("/path (deleted)" in /proc/PID/fd and maps, no link left).

        The new file is made at the recorded path when that name is free (the /proc link then
        reads exactly as before), else under a hidden name in the same directory, else in the
        temporary directory if that directory is gone."""
        reg = self.source.file(ghost).reg
        data = self.source.file_contents(ghost)
        if reg.HasField("size") and len(data) != reg.size:
            raise RestoreFailed(f"deleted file's contents are {len(data)} bytes, the checkpoint "
                                f"recorded {reg.size}", path=where + "/contents",
                                step="deleted file")
        mode = reg.mode & 0o7777 if reg.HasField("mode") else 0o600
        path, wfd = _create_ghost(reg.name, mode, where)
        try:
            try:
                os.fchmod(wfd, mode)
                _write_all(wfd, data)
            except OSError as e:
                raise KernelError(f"write deleted file's contents to {path}", e.errno,
                                  path=where, step="deleted file") from None
            return _open(f"/proc/self/fd/{wfd}", os.O_PATH | os.O_CLOEXEC, where,
                         "deleted file")
        finally:
            os.close(wfd)
            os.unlink(path)

    def _reopen(self, ghost: int, reg, where: str) -> int:
        """A new description of the re-made file `ghost` with the descriptor's flags, offset."""
        return self._reg_at(f"/proc/self/fd/{ghost}", reg, where)

    def _reg_at(self, path: str, reg, where: str) -> int:
        fd = _open(path, (reg.flags & ~OPEN_DROP) | os.O_CLOEXEC | os.O_NOCTTY, where,
                   "open files")
        if reg.pos:
            os.lseek(fd, reg.pos, os.SEEK_SET)
        return fd

    # -- pipes ------------------------------------------------------------------------------
    def _pipe(self, pipe_id: int, where: str) -> tuple[int, int]:
        """The pipe standing for `pipe_id`, holding its saved bytes."""
        if pipe_id not in self._pipes:
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._pipes[pipe_id] = (r, w)
            self._fill(w, self.source.pipe_data(pipe_id), where)
        return self._pipes[pipe_id]

    def _fill(self, w: int, data: bytes, where: str) -> None:
        if not data:
            return
        if len(data) > 65536:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, min(PIPE_MAX, len(data)))
            except OSError as e:
                raise KernelError(f"pipe holds {len(data)} bytes; cannot grow it", e.errno,
                                  path=where, step="pipe data") from None
        n = os.write(w, data)
        if n != len(data):
            raise RestoreFailed(f"pipe took {n} of {len(data)} queued bytes", path=where,
                                step="pipe data")

    def _pipe_end(self, pipe_id: int, flags: int, where: str) -> int:
        """A new description of one end of the pipe, with the descriptor's own flags."""
        r, w = self._pipe(pipe_id, where)
        end = w if flags & O_ACCMODE == os.O_WRONLY else r
        return _open(f"/proc/self/fd/{end}", (flags & ~OPEN_DROP) | os.O_CLOEXEC, where,
                     "open pipe")

    def _fifo(self, reg, pipe_id: int, where: str) -> int:
        # O_RDWR never blocks on a FIFO; it keeps both ends alive while the real one is opened.
        keep = self._cached(("fifo", reg.name), lambda: _open(reg.name, os.O_RDWR | os.O_CLOEXEC
                                                              | os.O_NONBLOCK, where, "open fifo"))
        if ("fifo-data", pipe_id) not in self._by_key:
            self._by_key[("fifo-data", pipe_id)] = os.dup(keep)
            data = self.source.pipe_data(pipe_id)
            if not _fifo_holds(keep, data, reg.name, where):
                self._fill(keep, data, where)
        return _open(f"/proc/self/fd/{keep}", (reg.flags & ~OPEN_DROP) | os.O_CLOEXEC, where,
                     "open fifo")

    # -- terminals --------------------------------------------------------------------------
    def _tty(self, t, where: str) -> int:
        """The same terminal opened again by its path (a pty slave of this host, its master
        held by someone else): refused unless the path is still that very device. Never as
        a controlling terminal (O_NOCTTY): the session leader takes it in its own step
        (open_ctty/take_ctty/set_foreground below, driven by restore/linux.py)."""
        rdev = f"{os.major(t.tty_info_id)}:{os.minor(t.tty_info_id)}"
        if t.tty_info_id in NOT_REOPENED:
            raise RestoreFailed(f"{NOT_REOPENED[t.tty_info_id]} (rdev {rdev}) cannot be opened "
                                "again as the same terminal", path=where, step="tty")
        if not t.HasField("regf_id") or not t.regf_id:
            raise RestoreFailed(f"terminal {rdev} has no path", path=where + "/path", step="tty")
        path = self.source.file(t.regf_id).reg.name
        fd = _open(path, (t.flags & ~OPEN_DROP) | os.O_NOCTTY | os.O_CLOEXEC, where + "/path",
                   "tty")
        s = os.fstat(fd)
        if not stat.S_ISCHR(s.st_mode) or s.st_rdev != t.tty_info_id or not os.isatty(fd):
            os.close(fd)
            raise RestoreFailed(f"{path} is now device {os.major(s.st_rdev)}:"
                                f"{os.minor(s.st_rdev)}, not the terminal {rdev} the "
                                "checkpoint had", path=where + "/path", step="tty")
        return fd

    # -- memfd ----------------------------------------------------------------------------
    def _memfd(self, m, where: str) -> int:
        """A description of the memfd standing for inode `m.inode_id` (one memfd per inode:
        two opens of one memfd share its contents again), at the recorded offset."""
        fd = self.memfd(m, where)
        desc = _open(f"/proc/self/fd/{fd}", (m.flags & ~OPEN_DROP) | os.O_CLOEXEC, where,
                     "open memfd")
        if m.pos:
            os.lseek(desc, m.pos, os.SEEK_SET)
        return desc

    def memfd(self, m, where: str) -> int:
        """The memfd standing for inode `m.inode_id`, made once from the name, seals and
        contents of entry `m` (a descriptor's or a map's): descriptors and maps of one memfd
        use it through /proc/self/fd/<it>, so writes through one show in the others."""
        return self._cached(("memfd", m.inode_id), lambda: _make_memfd(self.source, m, where))

    # -- epoll -----------------------------------------------------------------------------
    def _eventpoll(self, e, where: str) -> int:
        """A new epoll watching what the checkpoint's did, under the same numbers.

        The kernel keys a watch on (file, descriptor number at EPOLL_CTL_ADD): fdinfo shows
        that number, and the task's later EPOLL_CTL_MOD/DEL look it up by its own number. So
        each target is added under the number the task knows it by, with the description the
        task will get for that number (made here first). The restorer's own numbers are in
        use, so a short-lived helper process places the descriptors at those numbers and adds
        them; the watches stay as long as the files do (closing a number does not end one)."""
        ep = _sys(SYS_EPOLL_CREATE1, os.O_CLOEXEC, what="epoll_create1", where=where)
        if not e.tfd:
            return ep
        try:
            table = self._owner_table(e.id, where)
            items = []
            for t in e.tfd:
                if t.tfd not in table:
                    raise RestoreFailed(f"epoll watches descriptor {t.tfd}, which the task does "
                                        "not hold (closed while its file stayed open elsewhere)",
                                        path=f"{where}/targets/{t.tfd}", step="eventpoll")
                local = self.description(table[t.tfd], where=f"{where}/targets/{t.tfd}")
                items.append((local, t.tfd, t.events, t.data))
            _epoll_add(ep, items, where)
        except BaseException:
            os.close(ep)
            raise
        return ep

    def _owner_table(self, file_id: int, where: str) -> dict[int, int]:
        """fd number -> file id in the first task that holds `file_id` (its targets' numbers
        are that table's)."""
        dead = (F.TASK_STATES["zombie"], F.TASK_STATES["dead"])
        for entry in self.source.pstree():
            if self.source.core(entry.pid).tc.task_state in dead:
                continue              # a zombie keeps no table
            table = {fdi.fd: fdi.id for fdi in self.source.fdinfo(entry.pid)}
            if file_id in table.values():
                return table
        raise RestoreFailed(f"no task holds epoll file {file_id}", path=where, step="eventpoll")

    # -- shared anonymous memory ------------------------------------------------------------
    def shmem(self, key: tuple, size: int, where: str) -> tuple[int, bool]:
        """A memfd standing for one shared anonymous object; (fd, made_now)."""
        made = key not in self._by_key
        fd = self._cached(key, lambda: os.memfd_create("ckptfs-shmem", os.MFD_CLOEXEC))
        if made or os.fstat(fd).st_size < size:
            os.ftruncate(fd, max(size, os.fstat(fd).st_size))
        return fd, made


# -- signalfd, timerfd, epoll: kernel calls Python 3.11 has no wrapper for ----------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_TIMERFD_CREATE, SYS_TIMERFD_SETTIME, SYS_SIGNALFD4, SYS_EPOLL_CREATE1 = 283, 286, 289, 291
TFD_IOC_SET_TICKS = 0x40085400          # _IOW('T', 0, u64): needs CONFIG_CHECKPOINT_RESTORE
TFD_TIMER_ABSTIME = 1
ALARM_BASE = {8: 0, 9: 7}               # *_ALARM clocks count as REALTIME / BOOTTIME


def _sys(nr: int, *args, what: str, where: str) -> int:
    r = _libc.syscall(nr, *args)
    if r < 0:
        raise KernelError(what, ctypes.get_errno(), path=where, step="open files")
    return r


def _signalfd(s, where: str) -> int:
    mask = ctypes.c_uint64(s.sigmask)
    return _sys(SYS_SIGNALFD4, -1, ctypes.byref(mask), 8, (s.flags & os.O_NONBLOCK) | os.O_CLOEXEC,
                what=f"signalfd4(mask 0x{s.sigmask:016x})", where=where)


def _timerfd(t, where: str) -> int:
    """A timerfd on the same clock, holding the unread expirations and armed for the time
    that was left (from now), with the same period. An absolute timer stays absolute: its
    deadline is now + what was left, on its own clock."""
    fd = _sys(SYS_TIMERFD_CREATE, t.clockid, (t.flags & os.O_NONBLOCK) | os.O_CLOEXEC,
              what=f"timerfd_create(clock {t.clockid})", where=where)
    try:
        if t.ticks:
            try:
                fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", t.ticks))
            except OSError as e:
                raise KernelError(f"set timerfd ticks to {t.ticks}", e.errno,
                                  path=where + "/ticks", step="timerfd") from None
        value = t.vsec * 10**9 + t.vnsec
        interval = t.isec * 10**9 + t.insec
        if not value and interval:
            # fdinfo shows 0 left for a periodic timer that expired and was not read since
            # (the kernel moves it on at the next read): it is armed, due a period from now
            value = interval
        if value:
            if t.settime_flags & TFD_TIMER_ABSTIME:
                value += time.clock_gettime_ns(ALARM_BASE.get(t.clockid, t.clockid))
            spec = struct.pack("<4q", *divmod(interval, 10**9), *divmod(value, 10**9))
            buf = ctypes.create_string_buffer(spec, len(spec))
            _sys(SYS_TIMERFD_SETTIME, fd, t.settime_flags, buf, None,
                 what="timerfd_settime", where=where + "/value")
    except BaseException:
        os.close(fd)
        raise
    return fd


MFD_ALLOW_SEALING, F_ADD_SEALS = 2, 1033
# terminals whose path gives another terminal than the one the task had
NOT_REOPENED = {os.makedev(5, 0): "/dev/tty (the opener's controlling terminal)",
                os.makedev(5, 2): "a pseudo-terminal master (/dev/ptmx makes a new pair)"}


# -- controlling terminal (restore/linux.py's ctty step) ------------------------------------
TIOCSCTTY, TIOCSPGRP = 0x540E, 0x5410
PTS_MAJORS = range(136, 144)       # Unix98 pty slaves: /dev/pts/<(major-136)*256 + minor>


def ctty_path(rdev: int, where: str) -> str:
    """The path of controlling terminal `rdev` on this host: only a pty slave has one that
    does not depend on the opener (/dev/tty would be the restorer's own terminal)."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major not in PTS_MAJORS:
        raise RestoreFailed(f"controlling terminal {major}:{minor} is not a pseudo-terminal "
                            "slave: only those are made again", path=where, step="ctty")
    return f"/dev/pts/{(major - PTS_MAJORS.start) * 256 + minor}"


def open_ctty(rdev: int, where: str) -> int:
    """The controlling terminal `rdev` opened by the restorer (O_NOCTTY: it is the task's,
    not ours), refused naming `where` when its path is gone or is now another device."""
    path = ctty_path(rdev, where)
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(f"controlling terminal {want}: open {path}", e.errno, path=where,
                          step="ctty") from None
    s = os.fstat(fd)
    if not stat.S_ISCHR(s.st_mode) or s.st_rdev != rdev or not os.isatty(fd):
        os.close(fd)
        raise RestoreFailed(f"{path} is now device {os.major(s.st_rdev)}:{os.minor(s.st_rdev)}, "
                            f"not the controlling terminal {want} the checkpoint had",
                            path=where, step="ctty")
    return fd


def take_ctty(inj, task_fd: int, where: str) -> None:
    """Inside session leader `inj` (no controlling terminal yet): terminal `task_fd` becomes
    its session's controlling terminal. Done before the leader forks the rest of its session
    (a task gets its controlling terminal from its parent at fork, TIOCSCTTY sets only the
    caller's). EPERM: the terminal is still another session's."""
    from ..inject import NR
    try:
        inj.call(NR["ioctl"], task_fd, TIOCSCTTY, 0, step="ctty TIOCSCTTY", path=where)
    except KernelError as e:
        if e.errno != errno.EPERM:
            raise
        raise KernelError("TIOCSCTTY refused: the terminal is still the controlling "
                          "terminal of another session (the original's, if it still runs: "
                          "it is not stolen), or the task has one already",
                          e.errno, path=where, step="ctty TIOCSCTTY") from None


def set_foreground(inj, task_fd: int, pgrp: int, where: str) -> None:
    """Inside the session leader, whose controlling terminal `task_fd` is: `pgrp` (a group
    of its session, numbered as the task's pid namespace numbers it) becomes the foreground.
    The leader is the foreground right after TIOCSCTTY, so this raises no SIGTTOU."""
    from ..inject import NR
    inj.reset_scratch()
    arg = inj.put(struct.pack("<i", pgrp))
    inj.call(NR["ioctl"], task_fd, TIOCSPGRP, arg, step="ctty TIOCSPGRP", path=where)


def make_ctty(inj, task_fd: int, pgrp: int | None, where: str) -> None:
    """Both at once (a leader without other tasks in its session)."""
    take_ctty(inj, task_fd, where)
    if pgrp:
        set_foreground(inj, task_fd, pgrp, where.rsplit("/", 1)[0] + "/tty_pgrp")


def _make_memfd(source, m, where: str) -> int:
    """memfd_create with the recorded name, the contents written, then the seals (last:
    F_SEAL_WRITE would refuse the writes)."""
    from .. import fdkinds
    state = fdkinds.memfd_state(source, m.id, where)
    try:
        fd = os.memfd_create(state.name, os.MFD_CLOEXEC | MFD_ALLOW_SEALING)
    except OSError as e:
        raise KernelError(f"memfd_create({state.name!r})", e.errno, path=where + "/name",
                          step="memfd") from None
    try:
        _write_all(fd, state.contents())
        if state.seals:
            fcntl.fcntl(fd, F_ADD_SEALS, state.seals)
    except OSError as e:
        os.close(fd)
        raise KernelError(f"fill memfd {state.name!r} (seals 0x{state.seals:x})", e.errno,
                          path=where, step="memfd") from None
    return fd


# Run by a helper (python -I -S -c) that gets the epoll and its targets by pass_fds:
# argv = epoll fd, then (our fd, wanted number, events, data) per target. Every passed
# descriptor is first copied above all the numbers involved, so placing one never
# overwrites another; a failure names the number and errno on the report descriptor.
_EPOLL_HELPER = r"""
import ctypes, fcntl, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
a = [int(x) for x in sys.argv[1:]]
items = [a[i:i + 4] for i in range(1, len(a), 4)]
top = max([a[0], 2] + [x for it in items for x in it[:2]]) + 1
up = lambda fd: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)
report = up(2)
try:
    ep = up(a[0])
    moved = {src: up(src) for src, *_ in items}
    for src, dst, events, data in items:
        os.dup2(moved[src], dst, inheritable=False)
        ev = ctypes.create_string_buffer(struct.pack("<IQ", events, data), 12)
        if libc.epoll_ctl(ep, 1, dst, ev) < 0:
            os.write(report, b"%d %d\n" % (dst, ctypes.get_errno()))
            os._exit(1)
except BaseException as e:      # never onto fd 2: it may be a target by now
    os.write(report, repr(e).encode())
    os._exit(1)
os._exit(0)
"""


def _epoll_add(ep: int, items: list[tuple[int, int, int, int]], where: str) -> None:
    argv = [sys.executable, "-I", "-S", "-c", _EPOLL_HELPER, str(ep)]
    argv += [str(x) for item in items for x in item]
    fds = {ep} | {local for local, *_ in items}
    r = subprocess.run(argv, pass_fds=sorted(fds), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    if r.returncode:
        words = r.stderr.decode(errors="replace").split()
        if len(words) == 2 and all(w.isdigit() for w in words):
            raise KernelError(f"epoll_ctl(EPOLL_CTL_ADD, {words[0]})", int(words[1]),
                              path=f"{where}/targets/{words[0]}", step="eventpoll")
        raise RestoreFailed(f"epoll helper failed ({r.returncode}): "
                            f"{r.stderr.decode(errors='replace').strip()}", path=where,
                            step="eventpoll")


def _fifo_holds(fd: int, data: bytes, name: str, where: str) -> bool:
    """True if the FIFO already holds exactly `data`: it is the original's own pipe (same
    host, the original frozen with it open), so queueing the bytes again would double them.
    Bytes of its own that are not the saved ones are refused rather than mixed with them."""
    held = capture_files.pipe_peek(f"/proc/self/fd/{fd}")
    if held == data or not held:
        return bool(held)
    raise RestoreFailed(f"FIFO {name} already holds {len(held)} bytes that are not the "
                        f"{len(data)} saved ones", path=where, step="fifo data")


def _open(path: str, flags: int, where: str, step: str) -> int:
    try:
        return os.open(path, flags)
    except OSError as e:
        raise KernelError(f"open {path}", e.errno, path=where, step=step) from None


GHOST_TRIES = 100


def _create_ghost(name: str, mode: int, where: str) -> tuple[str, int]:
    """A new, empty file for a deleted file's contents; (path, descriptor open for writing)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    folder, base = os.path.split(name)
    if not os.path.isdir(folder):
        folder = tempfile.gettempdir()
    names = [name] + [os.path.join(folder, f".{base}.ckptfs-ghost-{os.getpid()}-{i}")
                      for i in range(GHOST_TRIES)]
    for path in names:
        try:
            return path, os.open(path, flags, mode)
        except FileExistsError:
            continue
        except OSError as e:
            raise KernelError(f"create {path} for a deleted file", e.errno, path=where,
                              step="deleted file") from None
    raise RestoreFailed(f"no free name for a deleted file near {name}", path=where,
                        step="deleted file")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
