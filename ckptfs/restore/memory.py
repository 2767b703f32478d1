"""Page contents into a helper's fresh maps: the hot path of a restore.

Private anonymous maps (nearly all of a process's memory) are filled with userfaultfd: the
task makes a userfaultfd (injected call), the restorer takes it over pidfd_getfd and
registers the maps for missing pages, and UFFDIO_COPY puts each saved range in place. That
allocates every page and copies into it in one kernel loop: no page fault, no zeroing of a
page about to be overwritten, which is most of what writing into fresh pages costs (1 GiB:
UFFDIO_COPY about 0.3 s against 0.5 s for process_vm_writev, here). The maps are unregistered
and the descriptor closed before the task runs, so it never sees the userfaultfd.

Everything else (copy-on-write pages of private file maps, shared anonymous memory) goes in
with process_vm_writev in batches of up to IOV_MAX pieces, the target faulting its own pages
in ahead (madvise MADV_POPULATE_WRITE) when a map is mostly filled.

A tree's chunk files are mapped straight into the restorer (MAP_POPULATE) so the only copy is
page cache -> target; any other Source is read with read_memory on a second thread while the
previous batch is written (read and write overlap).

start_fill() returns while the copy runs on threads of its own (a Filling): the restorer
meanwhile makes the task's other injected calls (none of which touch its memory), and
join()s before anything runs. The copy is the restore's one big cost, CPU-bound on every
core: a 256 MiB fill takes ~120 ms of CPU on one thread here, ~75 ms on two.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import KernelError, RestoreFailed
from ..inject import IOV_MAX, NR, vm_writev

USE_UFFD = True            # False: everything through process_vm_writev (benchmark comparisons)
BATCH_BYTES = 32 << 20
NR_MADVISE, MADV_POPULATE_WRITE = 28, 23
WRITERS = max(1, min(4, os.cpu_count() or 1))
MAP_FAILED = 2**64 - 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def fill(source, pid: int, new_pid: int, vmas, where, *, inj=None, populate=(), uffd=(),
         ranges=None) -> int:
    """Write every saved page of `vmas` (of checkpoint task `pid`) into `new_pid`; bytes.
    start_fill(...).join(): see there."""
    return start_fill(source, pid, new_pid, vmas, where, inj=inj, populate=populate, uffd=uffd,
                      ranges=ranges).join()


def start_fill(source, pid: int, new_pid: int, vmas, where, *, inj=None, populate=(), uffd=(),
               ranges=None, background: bool = False) -> "Filling":
    """Start writing every saved page of `vmas` into `new_pid`; the Filling to join.

    With `inj` (the task's injector): maps listed in `uffd` (by start address; fresh private
    anonymous maps with no page present) are filled through a userfaultfd, on COPIERS threads
    that keep running after this returns (the caller does the task's other work meanwhile
    and must join() before the task runs: join also unregisters the maps). Maps listed in
    `populate` are faulted in by the task itself with madvise(MADV_POPULATE_WRITE), one
    batch ahead, on its own CPU, while this thread copies the previous batch into pages
    already present: fresh-page faults inside process_vm_writev cost four times as much.
    `ranges` ({map start: [PageRange]}) spares listing the chunks again. `background`: with
    no userfaultfd part, the rest goes on its own thread all the same (process_vm_writev,
    no populate)."""
    def ranges_of(vma):
        return ranges[vma.start] if ranges is not None else source.page_ranges(pid, vma)
    pieces = [(r.start, r.end - r.start, vma) for vma in vmas for r in ranges_of(vma)]
    direct = [p for p in pieces if p[2].start in uffd] if inj is not None else []
    rest = [p for p in pieces if inj is None or p[2].start not in uffd]
    filling = Filling()
    if direct:
        maps = {(v.start, v.end) for _, _, v in direct}
        u = Uffd(inj, new_pid, maps, where(direct[0][2]))
        try:
            u.open()
        except KernelError as e:
            if e.errno not in UFFD_MISSING:
                raise
            rest, populate = pieces, set(populate) | {s for s, _ in maps}   # slower, same result
        else:
            # All in the background: the rest (copy-on-write pages of file maps, a few
            # hundred KiB) goes with process_vm_writev, which needs no injected call.
            def work() -> int:
                return (_fill_rest(source, pid, new_pid, rest, where, None, (), filling.stop)
                        + _fill_direct(source, pid, direct, where, u, filling.stop))
            filling.start(u, work)
            return filling
    if background and rest:
        filling.start(None, lambda: _fill_rest(source, pid, new_pid, rest, where, None, (),
                                               filling.stop))
        return filling
    filling.bytes += _fill_rest(source, pid, new_pid, rest, where, inj, populate)
    return filling


class Fillings(list):
    """Several Fillings of one task, joined and cancelled together."""

    @property
    def error(self) -> BaseException | None:
        return next((f.error for f in self if f.error is not None), None)

    def join(self) -> int:
        total, first = 0, None
        for f in self:             # every one joined (maps unregistered) before raising
            try:
                total += f.join()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first
        return total

    def cancel(self) -> None:
        for f in self:
            f.cancel()


def _fill_rest(source, pid, new_pid, rest, where, inj, populate, stop=None) -> int:
    if not rest or stop is not None and stop.is_set():
        return 0
    if hasattr(source, "chunk_path") and inj is not None:
        return _fill_populating(source, pid, new_pid, rest, where, inj, set(populate))
    if hasattr(source, "chunk_path"):
        return _fill_from_chunks(source, pid, new_pid, rest, where)
    return _fill_pipelined(source, pid, new_pid, rest, where)


class Filling:
    """The userfaultfd part of a fill, copying on its own threads until join().

    join() waits, unregisters the maps and closes the userfaultfd, and raises the copy's
    error (a KernelError naming the map's file); cancel() stops the copy at the next piece
    and waits, for a restore that failed elsewhere (its own error goes to `error`)."""

    def __init__(self):
        self.bytes = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._uffd: Uffd | None = None
        self._thread: threading.Thread | None = None

    def start(self, u: "Uffd | None", work) -> None:
        self._uffd = u

        def run():
            try:
                self.bytes += work()
            except BaseException as e:     # handed to join(), which raises it
                self.error = e
        self._thread = threading.Thread(target=run, name="ckptfs-fill", daemon=True)
        self._thread.start()

    def join(self) -> int:
        self._wait()
        if self.error is not None:
            raise self.error
        return self.bytes

    def cancel(self) -> None:
        self.stop.set()
        self._wait(raise_errors=False)

    def _wait(self, raise_errors: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._uffd is not None:
            u, self._uffd = self._uffd, None
            try:
                u.close(raise_errors=raise_errors and self.error is None)
            except BaseException as e:
                self.error = self.error or e


# -- userfaultfd ----------------------------------------------------------------------------
UFFD_API = 0xAA
UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_COPY = (0xC018AA3F, 0xC020AA00,
                                                               0x8010AA01, 0xC028AA03)
UFFDIO_REGISTER_MODE_MISSING = 1
NR_USERFAULTFD, NR_PIDFD_GETFD = 323, 438
UFFD_MISSING = (errno.ENOSYS, errno.EPERM, errno.EACCES)    # no userfaultfd here: fall back
COPIERS = max(2, min(4, os.cpu_count() or 2))   # UFFDIO_COPY runs on the calling thread's CPU


class Uffd:
    """A userfaultfd of the task behind `inj`, held by the restorer, with `maps` (start, end)
    registered for missing pages from open() (or entering `with`) until close()."""

    def __init__(self, inj, pid: int, maps, where: str):
        self.inj, self.pid, self.where = inj, pid, where
        self.maps = sorted(maps)
        self.fd = -1
        self.registered: list[tuple[int, int]] = []

    def open(self) -> None:
        """Make the userfaultfd and register the maps (undone if any step fails)."""
        try:
            self._open()
            self._ioctl(UFFDIO_API, struct.pack("<3Q", UFFD_API, 0, 0), "UFFDIO_API")
            for start, end in self.maps:
                self._ioctl(UFFDIO_REGISTER, struct.pack("<4Q", start, end - start,
                                                         UFFDIO_REGISTER_MODE_MISSING, 0),
                            f"UFFDIO_REGISTER {start:#x}-{end:#x}")
                self.registered.append((start, end))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Uffd":
        if self.fd < 0:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close(raise_errors=exc[0] is None)

    def _open(self) -> None:
        """The task makes the userfaultfd (one belongs to the mm of whoever creates it)."""
        theirs = self.inj.call(NR_USERFAULTFD, os.O_CLOEXEC, step="userfaultfd", path=self.where)
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError as e:
            raise KernelError(f"pidfd_open({self.pid})", e.errno, path=self.where,
                              step="userfaultfd") from None
        try:
            fd = _libc.syscall(NR_PIDFD_GETFD, pidfd, theirs, 0)
            if fd < 0:
                raise KernelError(f"pidfd_getfd of the userfaultfd of {self.pid}",
                                  ctypes.get_errno(), path=self.where, step="userfaultfd")
            self.fd = fd
        finally:
            os.close(pidfd)
            self.inj.call(NR["close"], theirs, step="userfaultfd", path=self.where)

    def _ioctl(self, request: int, arg: bytes, what: str) -> bytes:
        buf = ctypes.create_string_buffer(arg, len(arg))
        if _libc.ioctl(self.fd, request, buf) != 0:
            raise KernelError(f"{what} on the userfaultfd of {self.pid}", ctypes.get_errno(),
                              path=self.where, step="fill memory")
        return buf.raw

    def copy(self, local: int, remote: int, n: int, where: str) -> int:
        """UFFDIO_COPY of n bytes at our `local` to the task's `remote`; the kernel may stop
        early (EAGAIN while the map changes): it says how far it got, the rest is retried."""
        done = 0
        while done < n:
            buf = ctypes.create_string_buffer(struct.pack("<4Qq", remote + done, local + done,
                                                          n - done, 0, 0), 40)
            ok = _libc.ioctl(self.fd, UFFDIO_COPY, buf) == 0
            err = 0 if ok else ctypes.get_errno()
            got = struct.unpack_from("<q", buf.raw, 32)[0]
            if got > 0:
                done += got
            elif not ok and err != 11:       # EAGAIN: retry the rest
                raise KernelError(f"UFFDIO_COPY of {n - done} bytes to {remote + done:#x} in "
                                  f"{self.pid}", err, path=where, step="fill memory")
        return done

    def close(self, raise_errors: bool = False) -> None:
        while self.registered:
            start, end = self.registered.pop()
            buf = ctypes.create_string_buffer(struct.pack("<2Q", start, end - start), 16)
            if _libc.ioctl(self.fd, UFFDIO_UNREGISTER, buf) != 0 and raise_errors:
                raise KernelError(f"UFFDIO_UNREGISTER {start:#x}-{end:#x} of {self.pid}",
                                  ctypes.get_errno(), path=self.where, step="fill memory")
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fill_direct(source, pid, pieces, where, u: Uffd, stop: threading.Event) -> int:
    """Pieces copied with UFFDIO_COPY by COPIERS threads (ctypes drops the GIL): straight
    from each mapped chunk file, or from read_memory's buffers for other Sources. A set
    `stop` ends it at the next piece (the restore failed elsewhere)."""
    if hasattr(source, "chunk_path"):
        def one(piece) -> int:
            if stop.is_set():
                return 0
            addr, n, vma = piece
            local = _map_file(source.chunk_path(pid, vma, addr - vma.start), n)
            try:
                return u.copy(local, addr, n, where(vma))
            finally:
                _libc.munmap(local, n)
        if len(pieces) < 2:
            return sum(map(one, pieces))
        with ThreadPoolExecutor(COPIERS, thread_name_prefix="ckptfs-uffd") as pool:
            return sum(pool.map(one, pieces))

    def write(local, remote, where_) -> int:
        if stop.is_set():
            return 0
        return sum(u.copy(la, ra, n, where_) for (la, n), (ra, _) in zip(local, remote))
    return _fill_pipelined(source, pid, 0, pieces, where, write=write)


def _fill_from_chunks(source, pid, new_pid, pieces, where) -> int:
    """Batches of chunk files, written by WRITERS threads at once: most of the cost is the
    target's page faults (zeroing fresh pages) inside process_vm_writev, which run on the
    calling thread's CPU, so two writers use two cores (ctypes drops the GIL)."""
    batches = _batches(source, pid, pieces, where)

    def write(batch) -> int:
        return _write_batch(new_pid, batch)
    if len(batches) < 2:
        return sum(map(write, batches))
    with ThreadPoolExecutor(WRITERS, thread_name_prefix="ckptfs-fill") as pool:
        return sum(pool.map(write, batches))


def _batches(source, pid, pieces, where) -> list[list]:
    batches, batch, size = [], [], 0
    for addr, n, vma in pieces:
        batch.append((source.chunk_path(pid, vma, addr - vma.start), addr, n, where(vma), vma))
        size += n
        if len(batch) == IOV_MAX or size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches


def _write_batch(new_pid: int, batch) -> int:
    held = []
    try:
        for path, _addr, n, _, _ in batch:
            held.append((_map_file(path, n), n))
        return _write(new_pid, held, [(a, n) for _, a, n, _, _ in batch], batch[0][3])
    finally:
        _unmap(held)


def _runs(batch, populate: set) -> list[tuple[int, int]]:
    """Contiguous address runs of a batch that lie in maps to populate."""
    runs: list[list[int]] = []
    for _, addr, n, _, vma in batch:
        if vma.start not in populate:
            continue
        if runs and runs[-1][1] == addr:
            runs[-1][1] = addr + n
        else:
            runs.append([addr, addr + n])
    return [(a, b - a) for a, b in runs]


def _fill_populating(source, pid, new_pid, pieces, where, inj, populate) -> int:
    batches = _batches(source, pid, pieces, where)
    todo = [_runs(b, populate) for b in batches]
    for addr, n in todo[0] if todo else []:
        inj.syscall(NR_MADVISE, addr, n, MADV_POPULATE_WRITE)
    total = 0
    for i, batch in enumerate(batches):
        ahead = todo[i + 1] if i + 1 < len(todo) else []
        if ahead:
            inj.start(NR_MADVISE, ahead[0][0], ahead[0][1], MADV_POPULATE_WRITE)
        try:
            half = (len(batch) + 1) // 2
            if half and len(batch) > 1:
                with ThreadPoolExecutor(2) as pool:
                    total += sum(pool.map(lambda b: _write_batch(new_pid, b),
                                          (batch[:half], batch[half:])))
            else:
                total += _write_batch(new_pid, batch)
        finally:
            if ahead:
                inj.finish()       # a failed populate only means slower faults later
        for addr, n in ahead[1:]:
            inj.syscall(NR_MADVISE, addr, n, MADV_POPULATE_WRITE)
    return total


def _map_file(path: str, n: int) -> int:
    """The chunk file mapped read-only and shared with the page cache (MAP_POPULATE: one
    fault-in for the whole file); its address. A private or writable map would copy it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(f"open chunk {path}", e.errno, path=path, step="fill memory") from None
    try:
        size = os.fstat(fd).st_size
        if size != n:
            raise RestoreFailed(f"chunk is {size} bytes, want {n}", path=path, step="fill memory")
        addr = _libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, 0)
        if addr in (None, MAP_FAILED):
            raise KernelError(f"mmap chunk {path}", ctypes.get_errno(), path=path,
                              step="fill memory")
        return addr
    finally:
        os.close(fd)


def _unmap(held: list) -> None:
    while held:
        _libc.munmap(*held.pop())


def _fill_pipelined(source, pid, new_pid, pieces, where, write=None) -> int:
    """Reader thread: read_memory into buffers; this thread: process_vm_writev them (or
    `write(local, remote, where)` them)."""
    write = write or (lambda local, remote, w: _write(new_pid, local, remote, w))
    q: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def reader():
        try:
            batch, size = [], 0
            for addr, n, vma in pieces:
                batch.append((addr, source.read_memory(pid, addr, n), vma))
                size += n
                if len(batch) == IOV_MAX or size >= BATCH_BYTES:
                    q.put(batch)
                    batch, size = [], 0
            if batch:
                q.put(batch)
        except BaseException as e:   # handed to the writer, which raises it
            failure.append(e)
        finally:
            q.put(None)

    t = threading.Thread(target=reader, name="ckptfs-restore-reader", daemon=True)
    t.start()
    total = 0
    while (batch := q.get()) is not None:
        # The address of each bytes object's own buffer: no copy (the kernel only reads it).
        local = [(ctypes.cast(ctypes.c_char_p(d), ctypes.c_void_p).value, len(d))
                 for _, d, _ in batch]
        remote = [(addr, len(d)) for addr, d, _ in batch]
        total += write(local, remote, where(batch[0][2]))
    t.join()
    if failure:
        raise failure[0]
    return total


def _write(pid: int, local, remote, where: str) -> int:
    want = sum(n for _, n in local)
    got = vm_writev(pid, local, remote)
    if got != want:
        raise RestoreFailed(f"wrote {got} of {want} bytes of memory (a map is missing or "
                            "read-only)", path=where, step="fill memory")
    return got
