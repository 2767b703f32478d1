"""Open file descriptions, made in the restorer and handed to the restored tasks.

The restorer opens every file object of the checkpoint itself (one open file description per
file id, so descriptors that shared a description — dup'ed, or inherited over fork — share
one again, offset and flags included), fills pipes with their queued bytes, makes memfds for
shared anonymous memory and sockets (restore/sockets.py). A helper takes a description with
pidfd_getfd(2) on a pidfd of the restorer and dup3s it to its number. Everything here is
closed when the restore ends.
"""
from __future__ import annotations

import fcntl
import os
import tempfile

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
            return self._ghost(file_id, fe.reg, where)
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
        raise RestoreFailed(f"file type {fe.type} is not supported", path=where, step="open files")

    def _reg(self, reg, where: str) -> int:
        return self._reg_at(reg.name, reg, where)

    # -- deleted files --------------------------------------------------------------------
    def _ghost(self, file_id: int, reg, where: str) -> int:
        """A file that was unlinked while open: its saved contents go into a new file, which
        is opened with the recorded flags and offset and unlinked again, so the task holds
        an unlinked file once more ("/path (deleted)" in /proc/PID/fd, no link left).

        The new file is made at the recorded path when that name is free (the /proc link then
        reads exactly as before), else under a hidden name in the same directory, else in the
        temporary directory if that directory is gone. One file per file id: two separate
        opens of one deleted file come back as two files (the tree keeps no inode)."""
        data = self.source.file_contents(file_id)
        if reg.HasField("size") and len(data) != reg.size:
            raise RestoreFailed(f"deleted file's contents are {len(data)} bytes, the checkpoint "
                                f"recorded {reg.size}", path=where + "/contents",
                                step="deleted file")
        path, wfd = _create_ghost(reg.name, reg.mode & 0o7777 if reg.HasField("mode") else 0o600,
                                  where)
        try:
            try:
                os.fchmod(wfd, reg.mode & 0o7777 if reg.HasField("mode") else 0o600)
                _write_all(wfd, data)
            except OSError as e:
                raise KernelError(f"write deleted file's contents to {path}", e.errno,
                                  path=where, step="deleted file") from None
            fd = self._reg_at(path, reg, where)
        finally:
            os.close(wfd)
            os.unlink(path)
        return fd

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

    # -- shared anonymous memory ------------------------------------------------------------
    def shmem(self, key: tuple, size: int, where: str) -> tuple[int, bool]:
        """A memfd standing for one shared anonymous object; (fd, made_now)."""
        made = key not in self._by_key
        fd = self._cached(key, lambda: os.memfd_create("ckptfs-shmem", os.MFD_CLOEXEC))
        if made or os.fstat(fd).st_size < size:
            os.ftruncate(fd, max(size, os.fstat(fd).st_size))
        return fd, made


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
