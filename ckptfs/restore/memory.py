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

from ..errors import KernelError, RestoreFailed
from ..inject import IOV_MAX, vm_writev

BATCH_BYTES = 64 << 20


def fill(source, pid: int, new_pid: int, vmas, where) -> int:
    """Write every saved page of `vmas` (of checkpoint task `pid`) into `new_pid`; bytes."""
    pieces = [(r.start, r.end - r.start, vma) for vma in vmas
              for r in source.page_ranges(pid, vma)]
    if hasattr(source, "chunk_path"):
        return _fill_from_chunks(source, pid, new_pid, pieces, where)
    return _fill_pipelined(source, pid, new_pid, pieces, where)


def _fill_from_chunks(source, pid, new_pid, pieces, where) -> int:
    total, local, remote, held, size = 0, [], [], [], 0
    for addr, n, vma in pieces:
        path = source.chunk_path(pid, vma, addr - vma.start)
        m = _map_file(path, n, where(vma))
        held.append(m)
        local.append((ctypes.addressof(ctypes.c_char.from_buffer(m)), n))
        remote.append((addr, n))
        size += n
        if len(local) == IOV_MAX or size >= BATCH_BYTES:
            total += _write(new_pid, local, remote, where(vma))
            _release(held)
            local, remote, held, size = [], [], [], 0
    if local:
        total += _write(new_pid, local, remote, "memory")
        _release(held)
    return total


def _map_file(path: str, n: int, where: str) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError(f"open chunk {path}", e.errno, path=path, step="fill memory") from None
    try:
        if os.fstat(fd).st_size != n:
            raise RestoreFailed(f"chunk is {os.fstat(fd).st_size} bytes, want {n}", path=path,
                                step="fill memory")
        # A private writable view lets ctypes take its address; nothing is ever written to it.
        return mmap.mmap(fd, n, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _release(held: list) -> None:
    # ctypes views pin the buffers; drop them before closing.
    for m in held:
        try:
            m.close()
        except BufferError:
            pass
    held.clear()


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
