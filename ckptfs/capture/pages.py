"""Which pages of a live process hold data, and reading them.

Page ranges come from the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7+), which returns
merged ranges by category in one call; without it, /proc/PID/pagemap is read in large preads
and only the top byte of each 64-bit entry is looked at (bits 56..63: 63 present, 62 swapped,
61 file-backed or shared), which Python can slice and translate in C speed.

Memory is read with process_vm_readv (no stop needed, any thread may call it); pages it cannot
read (PROT_NONE, faults) are retried through /proc/PID/mem, which ignores protections. A page
that neither can read (a file map past the end of its file: the process itself would get
SIGBUS there) reads as zeros: it has no contents to save.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading

from ..errors import KernelError, ProcessGone
from ..model import PAGE_SIZE, PageRange

_libc = ctypes.CDLL(None, use_errno=True)

# PAGEMAP_SCAN categories (uapi linux/fs.h).
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGEMAP_SCAN = 0xC0606610          # _IOWR('f', 16, struct pm_scan_arg) with sizeof = 96

# What to keep of a VMA (CRIU's rule, criu-image-format.md 4.7).
ANON = "anon"                      # private anonymous: present or swapped, not the zero page
FILE_PRIVATE = "file_private"      # as ANON, and only pages no longer backed by the file (COWed)
SHARED = "shared"                  # shared anonymous / memfd: every present or swapped page


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

# Per mode: (category_inverted, category_mask) for PAGEMAP_SCAN, and the pagemap top-byte
# predicate for the fallback.
_SCAN_RULES = {
    ANON: (PAGE_IS_PFNZERO, PAGE_IS_PFNZERO),
    FILE_PRIVATE: (PAGE_IS_PFNZERO | PAGE_IS_FILE, PAGE_IS_PFNZERO | PAGE_IS_FILE),
    SHARED: (0, 0),
}
_TOP_PRESENT, _TOP_SWAPPED, _TOP_FILE = 0x80, 0x40, 0x20
_TOP_RULES = {
    ANON: lambda b: bool(b & (_TOP_PRESENT | _TOP_SWAPPED)),
    FILE_PRIVATE: lambda b: bool(b & (_TOP_PRESENT | _TOP_SWAPPED)) and not b & _TOP_FILE,
    SHARED: lambda b: bool(b & (_TOP_PRESENT | _TOP_SWAPPED)),
}
_TOP_TABLES = {mode: bytes(1 if rule(b) else 0 for b in range(256))
               for mode, rule in _TOP_RULES.items()}

_VEC_LEN = 4096                    # regions per ioctl call
_PAGEMAP_CHUNK = 1 << 20           # pagemap entries per pread in the fallback (4 GiB of VA)


def _oserror(step: str, path: str, err: int) -> Exception:
    if err in (errno.ESRCH, errno.ENOENT):
        return ProcessGone("process is gone", step=step, path=path)
    return KernelError(step, err, step=step, path=path)


def merge(ranges) -> list[PageRange]:
    """Sorted (start, end) pairs -> PageRanges with touching neighbours joined."""
    out: list[list[int]] = []
    for start, end in ranges:
        if out and out[-1][1] == start:
            out[-1][1] = end
        elif end > start:
            out.append([start, end])
    return [PageRange(s, e) for s, e in out]


class Pagemap:
    """Present-page ranges of one process. Thread-safe (one fd, positional reads/ioctls)."""

    scan_works: bool | None = None     # class-wide: PAGEMAP_SCAN answered once

    def __init__(self, pid: int):
        self.path = f"/proc/{pid}/pagemap"
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _oserror("open", self.path, e.errno) from None
        self._vec = (_Region * _VEC_LEN)()
        self._lock = threading.Lock()   # the region vector is shared

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def ranges(self, start: int, end: int, mode: str) -> list[PageRange]:
        if Pagemap.scan_works is not False:
            got = self._scan(start, end, mode)
            if got is not None:
                return got
        return self._read(start, end, mode)

    # -- PAGEMAP_SCAN ------------------------------------------------------------------------
    def _scan(self, start: int, end: int, mode: str) -> list[PageRange] | None:
        inverted, mask = _SCAN_RULES[mode]
        arg = _ScanArg(size=ctypes.sizeof(_ScanArg), start=start, end=end,
                       vec=ctypes.addressof(self._vec), vec_len=_VEC_LEN,
                       category_inverted=inverted, category_mask=mask,
                       category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                       return_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
        found = []
        with self._lock:
            while arg.start < end:
                n = _libc.ioctl(self._fd, PAGEMAP_SCAN, ctypes.byref(arg))
                if n < 0:
                    err = ctypes.get_errno()
                    if err in (errno.ENOTTY, errno.EINVAL) and not found:
                        Pagemap.scan_works = False
                        return None
                    raise _oserror("PAGEMAP_SCAN", self.path, err)
                Pagemap.scan_works = True
                found.extend((self._vec[i].start, self._vec[i].end) for i in range(n))
                if arg.walk_end <= arg.start:
                    break
                arg.start = arg.walk_end
        return merge(found)

    # -- pagemap file ------------------------------------------------------------------------
    def _read(self, start: int, end: int, mode: str) -> list[PageRange]:
        table = _TOP_TABLES[mode]
        found = []
        page = start // PAGE_SIZE
        last = end // PAGE_SIZE
        while page < last:
            n = min(_PAGEMAP_CHUNK, last - page)
            try:
                data = os.pread(self._fd, n * 8, page * 8)
            except OSError as e:
                raise _oserror("pread", self.path, e.errno) from None
            if not data:
                raise ProcessGone("pagemap read returned nothing", step="pread", path=self.path)
            keep = data[7::8].translate(table)
            found.extend((s * PAGE_SIZE, e * PAGE_SIZE) for s, e in _runs(keep, page))
            page += len(data) // 8
        return merge(found)


def _runs(flags: bytes, base: int):
    """(first, past-last) page numbers of each run of 1s in a 0/1 byte string."""
    i, n = 0, len(flags)
    while i < n:
        s = flags.find(b"\x01", i)
        if s < 0:
            return
        e = flags.find(b"\x00", s)
        e = n if e < 0 else e
        yield base + s, base + e
        i = e


# -- memory: reading into a fresh bytes object ------------------------------------------------
# CPython lets C code fill a bytes object between creating it and handing it out (os.read
# does exactly that); ctypes reaches the same API. The data starts at the end of the fixed
# part of the object (bytes.__basicsize__ counts the trailing NUL, hence - 1).
_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.restype = ctypes.py_object
_PyBytes_FromStringAndSize.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_BYTES_DATA = bytes.__basicsize__ - 1


def _new_bytes(size: int) -> bytes:
    return _PyBytes_FromStringAndSize(None, size)


def _bytes_address(b: bytes) -> int:
    return id(b) + _BYTES_DATA


def _writable(view: memoryview) -> memoryview:
    """A writable view of the same memory (our own fresh bytes object is read-only)."""
    if not view.readonly:
        return view
    return memoryview((ctypes.c_char * len(view)).from_address(
        _bytes_address(view.obj))).cast("B")


# -- memory ------------------------------------------------------------------------------
class Memory:
    """Reads another process's memory; any thread, in parallel, no ptrace stop needed."""

    def __init__(self, pid: int):
        self.pid = pid
        self.path = f"/proc/{pid}/mem"
        self._mem_fd = -1
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._mem_fd >= 0:
                os.close(self._mem_fd)
                self._mem_fd = -1

    def read(self, addr: int, size: int) -> bytes:
        """`size` bytes at `addr`, read straight into a new bytes object (no zeroing, no copy)."""
        out = _new_bytes(size)
        if size:
            self._fill(addr, _bytes_address(out), memoryview(out).cast("B"), size)
        return out

    def read_into(self, addr: int, buf) -> int:
        """Fill the writable buffer `buf` with memory at `addr`; returns its length."""
        view = memoryview(buf).cast("B")
        size = len(view)
        if size == 0:
            return 0
        self._fill(addr, ctypes.addressof((ctypes.c_char * size).from_buffer(view)), view, size)
        return size

    def _fill(self, addr: int, base: int, view: memoryview, size: int) -> None:
        done = self._vm_readv(addr, base, size)
        while done < size:          # the rest, from the first page process_vm_readv refused
            done += self._mem_read(addr + done, view, done, size - done)

    def _vm_readv(self, addr: int, base: int, size: int) -> int:
        local, remote = _IoVec(base, size), _IoVec(addr, size)
        n = _libc.process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessGone("process is gone", step="process_vm_readv", path=self.path)
        if err in (errno.EFAULT, errno.EIO, errno.ENOMEM):
            return 0
        raise KernelError("process_vm_readv", err, step="process_vm_readv", path=self.path)

    def _fd(self) -> int:
        with self._lock:
            if self._mem_fd < 0:
                try:
                    self._mem_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise _oserror("open", self.path, e.errno) from None
            return self._mem_fd

    def _mem_read(self, addr: int, whole: memoryview, off: int, size: int) -> int:
        """Read from /proc/PID/mem up to the end of the page that fails; zero that page."""
        fd = self._fd()
        view = _writable(whole)[off:]
        try:
            n = os.preadv(fd, [view[:size]], addr)
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EFAULT):
                raise _oserror("pread", self.path, e.errno) from None
            n = 0
        if n > 0:
            return n
        if n == 0 and not self._alive():
            raise ProcessGone("process is gone", step="pread", path=self.path)
        # Unreadable page: zeros to its end (see the module docstring).
        stop = min(size, PAGE_SIZE - addr % PAGE_SIZE)
        view[:stop] = bytes(stop)
        return stop

    def _alive(self) -> bool:
        return os.path.exists(f"/proc/{self.pid}/task/{self.pid}")
