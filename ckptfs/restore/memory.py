"""Page contents into a helper's fresh maps: the hot path of a restore.

The pages go in with process_vm_writev (one copy, kernel to kernel, ~5 GB/s) in batches of up
to IOV_MAX pieces. A tree's chunk files are mapped straight into the restorer (MAP_POPULATE)
so the only copy is page cache -> target; any other Source is read with read_memory on a
second thread while the previous batch is written (read and write overlap).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

from ..errors import KernelError, RestoreFailed
from ..inject import IOV_MAX, vm_writev

BATCH_BYTES = 32 << 20
NR_MADVISE, MADV_POPULATE_WRITE = 28, 23
WRITERS = max(1, min(4, os.cpu_count() or 1))
MAP_FAILED = 2**64 - 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def fill(source, pid: int, new_pid: int, vmas, where, *, inj=None, populate=()) -> int:
    """Write every saved page of `vmas` (of checkpoint task `pid`) into `new_pid`; bytes.

    With `inj` (the task's injector), maps listed in `populate` (by start address) are
    faulted in by the task itself with madvise(MADV_POPULATE_WRITE), one batch ahead, on its
    own CPU, while this thread copies the previous batch into pages already present:
    fresh-page faults inside process_vm_writev would cost four times as much."""
    pieces = [(r.start, r.end - r.start, vma) for vma in vmas
              for r in source.page_ranges(pid, vma)]
    if hasattr(source, "chunk_path") and inj is not None:
        return _fill_populating(source, pid, new_pid, pieces, where, inj, set(populate))
    if hasattr(source, "chunk_path"):
        return _fill_from_chunks(source, pid, new_pid, pieces, where)
    return _fill_pipelined(source, pid, new_pid, pieces, where)


def _fill_from_chunks(source, pid, new_pid, pieces, where) -> int:
    """Batches of chunk files, written by WRITERS threads at once: most of the cost is the
    target's page faults (zeroing fresh pages) inside process_vm_writev, which run on the
    calling thread's CPU, so two writers use two cores (ctypes drops the GIL)."""
    batches, batch, size = [], [], 0
    for addr, n, vma in pieces:
        batch.append((source.chunk_path(pid, vma, addr - vma.start), addr, n, where(vma)))
        size += n
        if len(batch) == IOV_MAX or size >= BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)

    def write(batch) -> int:
        held = []
        try:
            for path, _addr, n, _ in batch:
                held.append((_map_file(path, n), n))
            return _write(new_pid, held, [(a, n) for _, a, n, _ in batch], batch[0][3])
        finally:
            _unmap(held)
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


def _fill_pipelined(source, pid, new_pid, pieces, where) -> int:
    """Reader thread: read_memory into buffers; this thread: process_vm_writev them."""
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
        total += _write(new_pid, local, remote, where(batch[0][2]))
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
