"""Which pages of a live process were written since the last pass (for pre-copy migration).

Method 1, "uffd-wp+pagemap-scan" (Linux 6.7+; this kernel has no soft-dirty):
  A userfaultfd in asynchronous write-protect mode (UFFD_FEATURE_WP_ASYNC) makes the kernel
  clear a page's uffd-wp bit by itself on the first write after protection, with no message
  and no handler. PAGEMAP_SCAN on /proc/PID/pagemap then lists the pages whose bit is clear
  (PAGE_IS_WRITTEN) and, with PM_SCAN_WP_MATCHING, protects them again in the same walk, so
  "what was written" and "start the next period" are one atomic step: `reset()`.
  A userfaultfd acts on the mm of the process that created it, so it is created *inside* the
  target: one thread is seized and interrupted for a moment, made to call
  userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY) (USER_MODE_ONLY needs no privilege
  while vm.unprivileged_userfaultfd = 0; async faults never reach the handler, so the
  user-mode restriction costs nothing), the descriptor is copied to us with pidfd_getfd, closed
  in the target, and the thread is let go. From then on everything (UFFDIO_API, REGISTER,
  the scans) happens from our side; the target does not notice beyond one write fault per
  page per pass. Closing our descriptor (the only one left) unregisters every range and
  clears every uffd-wp bit and marker: the process is exactly as before.
Method 2, "checksum": xxh3 of every chunk cell's present pages, compared between passes.
  Works everywhere, costs a full memory read per pass, and is chunk-granular.

Which VMAs are watched: every writable one (the chunk files hold private and shared-anonymous
memory; written pages of shared *file* maps belong to the file and are not tracked). A VMA
never seen before in that exact shape (start, end, perms, offset, inode, path) counts as
written whole once: its history is unknown. A registered VMA that later loses PROT_WRITE stays
registered and keeps being scanned (writes made before the mprotect are not lost). A VMA that
refuses registration (another userfaultfd owns it, a special mapping) falls back to checksums.

Facts (include/uapi/linux/userfaultfd.h, include/uapi/linux/fs.h; checked on 6.18):
  userfaultfd = syscall 323; UFFD_USER_MODE_ONLY = 1; UFFD_API = 0xAA;
  UFFD_FEATURE_WP_UNPOPULATED = 1<<13, UFFD_FEATURE_WP_ASYNC = 1<<15;
  struct uffdio_api {u64 api, features, ioctls}            UFFDIO_API = _IOWR(0xAA, 0x3F, 24)
  struct uffdio_range {u64 start, len}                      UFFDIO_UNREGISTER = _IOR(0xAA, 0x01, 16)
  struct uffdio_register {range; u64 mode, ioctls}          UFFDIO_REGISTER = _IOWR(0xAA, 0x00, 32)
  UFFDIO_REGISTER_MODE_WP = 1<<1
  PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg (12 x u64 = 96 bytes));
  struct page_region {u64 start, end, categories}; PAGE_IS_WRITTEN = 1<<1;
  PM_SCAN_WP_MATCHING = 1<<0, PM_SCAN_CHECK_WPASYNC = 1<<1 (fail with EPERM on a VMA not
  registered for async wp instead of skipping it silently).
  Only category_mask = return_mask = PAGE_IS_WRITTEN is used: the scan's fast path, correct
  also on kernels that misreport other masks for zapped pages.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import os
import re
import threading
import time
from typing import Callable

import xxhash

from .. import ptrace
from ..errors import CkptError, KernelError, ProcessGone
from ..model import DEFAULT_CHUNK, PAGE_SIZE
from . import procfs
from .pages import ANON, Memory, Pagemap, _oserror

UFFD_METHOD = "uffd-wp+pagemap-scan"
CHECKSUM_METHOD = "checksum"

NR_USERFAULTFD = 323
NR_PIDFD_GETFD = 438
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """The kernel's _IOC(): dir in bits 30-31 (1 write, 2 read), size 16-29, type 8-15."""
    return direction << 30 | size << 16 | kind << 8 | nr


_IOW, _IOR = 1, 2
UFFDIO_API = _ioc(_IOR | _IOW, 0xAA, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_IOR | _IOW, 0xAA, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_IOR, 0xAA, 0x01, 16)
PAGEMAP_SCAN = _ioc(_IOR | _IOW, ord("f"), 16, 96)


def _u64s(*names):
    return [(n, ctypes.c_uint64) for n in names]


class UffdioApi(ctypes.Structure):
    _fields_ = _u64s("api", "features", "ioctls")


class UffdioRange(ctypes.Structure):
    _fields_ = _u64s("start", "len")


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange)] + _u64s("mode", "ioctls")


class PmScanArg(ctypes.Structure):
    _fields_ = _u64s("size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
                     "category_inverted", "category_mask", "category_anyof_mask", "return_mask")


class PageRegion(ctypes.Structure):
    _fields_ = _u64s("start", "end", "categories")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long

VEC_LEN = 1024                     # regions returned per PAGEMAP_SCAN call
O_CLOEXEC, O_NONBLOCK = 0o2000000, 0o4000
SPECIAL = ("[vsyscall]", "[vvar]", "[vvar_vclock]", "[vdso]", "[uprobes]")
SHARED_ANON_PREFIXES = ("/dev/zero", "/SYSV", "/memfd:", "[anon_shmem")

Range = tuple[int, int]


class TrackingUnavailable(CkptError):
    """uffd-wp write tracking cannot be set up for this process (the reason says why)."""
    errno = errno.EOPNOTSUPP


def _ioctl(fd: int, request: int, arg, *, step: str, path: str) -> int:
    ret = _libc.ioctl(fd, request, ctypes.byref(arg))
    if ret < 0:
        raise KernelError(step, ctypes.get_errno(), step=step, path=path)
    return ret


# -- VMAs -----------------------------------------------------------------------------------
def _tracked(m: procfs.MapLine) -> bool:
    """A VMA whose written pages end up in chunk files."""
    if m.path in SPECIAL:
        return False
    if m.shared and m.path and not m.path.startswith(SHARED_ANON_PREFIXES):
        return False          # shared file map: the file holds those pages
    return True


def _identity(m: procfs.MapLine) -> tuple:
    return (m.start, m.end, m.perms, m.pgoff, m.inode, m.path)


def read_maps(pid: int) -> list[procfs.MapLine]:
    return procfs.parse_maps(procfs.read_text(f"/proc/{pid}/maps"))


def _merge(ranges: list[Range]) -> list[Range]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        elif e > s:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _covered(intervals: list[Range], start: int, end: int) -> bool:
    """True if [start, end) overlaps any of the (sorted, merged) intervals."""
    return any(s < end and start < e for s, e in intervals)


# -- getting a userfaultfd of the target's mm --------------------------------------------------
def _pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(ctypes.c_long(NR_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(fd),
                            ctypes.c_uint(0))
        if got < 0:
            raise KernelError(f"pidfd_getfd({pid}, {fd})", ctypes.get_errno(),
                              step="pidfd_getfd", path=f"/proc/{pid}/fd/{fd}")
        return got
    finally:
        os.close(pidfd)


def _wait_interrupt_stop(tid: int) -> None:
    """Wait for the PTRACE_INTERRUPT stop; signals that come first are delivered as usual."""
    while True:
        _, status = ptrace.wait(tid)
        if not os.WIFSTOPPED(status):
            raise ProcessGone(f"thread {tid} ended while being stopped", path=f"/proc/{tid}",
                              step="PTRACE_INTERRUPT")
        if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
            return
        ptrace.cont(tid, 0 if ptrace.stop_event(status) else os.WSTOPSIG(status))


def seized_injector(pid: int):
    """Context manager: an Injector on thread `pid`, seized and interrupted by this thread
    for the duration, then given its registers back and detached."""
    from ..inject import Injector

    @contextlib.contextmanager
    def stopped():
        ptrace.seize(pid)
        try:
            ptrace.interrupt(pid)
            _wait_interrupt_stop(pid)
            inj = Injector(pid)
            try:
                yield inj
            finally:
                inj.close()
        finally:
            ptrace.detach(pid)
    return stopped()


def userfaultfd_of(pid: int, injector: Callable | None = None) -> int:
    """A userfaultfd bound to the mm of `pid`, as a descriptor of ours (see module doc).
    `injector(pid)` gives a context manager yielding an ckptfs.inject.Injector on a stopped
    thread; default: seize and interrupt the main thread on this thread."""
    from ..inject import NR
    flags = O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY
    with (injector or seized_injector)(pid) as inj:
        theirs = inj.call(NR_USERFAULTFD, flags, step="userfaultfd (injected)",
                          path=f"/proc/{pid}")
        try:
            return _pidfd_getfd(pid, theirs)
        finally:
            inj.call(NR["close"], theirs, step="close userfaultfd (injected)",
                     path=f"/proc/{pid}/fd/{theirs}")


# -- the tracker -----------------------------------------------------------------------------
class DirtyTracker:
    """Pages of process `pid` written since the last `reset()`.

    `written_ranges()` looks without disturbing; `reset()` returns what was written since the
    previous reset and starts the next period in one atomic step (use its result when a
    write must never fall between two calls). Before the first reset every watched VMA counts
    as written. Ranges are page aligned, sorted, and never cross a VMA boundary.
    Thread-safe. `close()` leaves the process exactly as it was.
    """

    def __init__(self, source_or_pid, *, chunk_size: int = DEFAULT_CHUNK, method: str = "auto",
                 injector: Callable | None = None):
        self.pid = source_or_pid if isinstance(source_or_pid, int) else source_or_pid.pids()[0]
        self.chunk_size = chunk_size
        self.path = f"/proc/{self.pid}/pagemap"
        self.reason = ""               # why uffd-wp is not in use, if it is not
        self._lock = threading.Lock()
        self._uffd = self._pm_fd = -1
        self._registered: list[Range] = []      # merged intervals believed registered
        self._seen: set[tuple] = set()          # VMA identities of the last pass
        self._sums: dict[tuple[int, int], int] = {}   # (vma start, cell offset) -> xxh3
        self._vec = (PageRegion * VEC_LEN)()
        self._memory = Memory(self.pid)
        self._pagemap = Pagemap(self.pid)
        self.maps: list[procfs.MapLine] = []
        self.method = CHECKSUM_METHOD
        try:
            self._start(method, injector)
        except BaseException:
            self.close()            # nothing registered or open is left behind
            raise

    def _start(self, method: str, injector) -> None:
        if method in ("auto", UFFD_METHOD):
            try:
                self._open_uffd(injector)
                self.method = UFFD_METHOD
            except (TrackingUnavailable, KernelError) as e:
                if method == UFFD_METHOD:
                    raise
                self.reason = str(e)
        elif method != CHECKSUM_METHOD:
            raise ValueError(f"unknown tracking method {method!r}")
        self._pending = self._pass(protect=True, commit=False)   # baseline: the first period

    # -- public ------------------------------------------------------------------------------
    def written_ranges(self) -> list[Range]:
        """Ranges written since the last reset (or since start), without starting a period."""
        with self._lock:
            return _merge_per_vma(self._pending + self._pass(protect=False, commit=False),
                                  self.maps)

    def reset(self) -> list[Range]:
        """Start a new period; returns the ranges written during the one that ends."""
        with self._lock:
            found = self._pending + self._pass(protect=True, commit=True)
            self._pending = []
            return _merge_per_vma(found, self.maps)

    def vmas(self) -> list[Range]:
        """The VMAs of the last pass (all of them, watched or not)."""
        return [(m.start, m.end) for m in self.maps]

    def close(self) -> None:
        """Unregister every range and drop the descriptor: no uffd-wp bit or marker remains."""
        with self._lock:
            if self._uffd >= 0:
                try:
                    self._unregister_all()
                finally:
                    os.close(self._uffd)
                    self._uffd = -1
            if self._pm_fd >= 0:
                os.close(self._pm_fd)
                self._pm_fd = -1
            self._memory.close()
            self._pagemap.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- setup -------------------------------------------------------------------------------
    def _open_uffd(self, injector) -> None:
        if not os.path.exists(f"/proc/{self.pid}"):
            raise ProcessGone(f"process {self.pid} is gone", path=f"/proc/{self.pid}")
        try:
            self._uffd = userfaultfd_of(self.pid, injector)
        except KernelError as e:
            raise TrackingUnavailable(f"cannot create a userfaultfd in the target: {e}",
                                      path=f"/proc/{self.pid}", step="userfaultfd") from None
        api = UffdioApi(api=UFFD_API, features=UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
        if _libc.ioctl(self._uffd, UFFDIO_API, ctypes.byref(api)) < 0:
            err = ctypes.get_errno()
            os.close(self._uffd)
            self._uffd = -1
            raise TrackingUnavailable(f"UFFDIO_API refuses WP_ASYNC: {os.strerror(err)}",
                                      path=f"/proc/{self.pid}", step="UFFDIO_API")
        try:
            self._pm_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:        # a child that ended after its userfaultfd was made
            raise _oserror("open", self.path, e.errno) from None

    def _register(self, m: procfs.MapLine) -> bool:
        reg = UffdioRegister(range=UffdioRange(m.start, m.end - m.start), mode=UFFDIO_REGISTER_MODE_WP)
        if _libc.ioctl(self._uffd, UFFDIO_REGISTER, ctypes.byref(reg)) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.EBUSY, errno.EPERM, errno.ENOMEM):
            return False      # not eligible (special map, another uffd owns it, vanished)
        raise KernelError(f"UFFDIO_REGISTER {m.start:#x}-{m.end:#x}", err,
                          step="UFFDIO_REGISTER", path=self.path)

    def _unregister_all(self) -> None:
        for s, e in self._registered:
            rng = UffdioRange(s, e - s)
            if _libc.ioctl(self._uffd, UFFDIO_UNREGISTER, ctypes.byref(rng)) < 0:
                err = ctypes.get_errno()
                if err not in (errno.ENOMEM, errno.EINVAL, errno.ESRCH):  # unmapped since, or gone
                    raise KernelError(f"UFFDIO_UNREGISTER {s:#x}-{e:#x}", err,
                                      step="UFFDIO_UNREGISTER", path=self.path)
        self._registered = []

    # -- one pass ----------------------------------------------------------------------------
    def _pass(self, *, protect: bool, commit: bool) -> list[Range]:
        """Written ranges of every VMA now; with `protect`, re-protect what was found and
        register new VMAs. `commit` records this pass's VMA shapes and checksums."""
        maps = read_maps(self.pid)
        found: list[Range] = []
        registered: list[Range] = []
        sums: dict[tuple[int, int], int] = {}
        seen = set()
        for m in maps:
            seen.add(_identity(m))
            new = _identity(m) not in self._seen
            if new:
                found.append((m.start, m.end))
            if not _tracked(m):
                continue
            got = self._vma_written(m, protect, registered, sums)
            if not new:
                found += got
        if protect:
            self._registered = _merge(registered) if self._uffd >= 0 else []
            self.maps = maps
            if commit or not self._seen:
                self._seen, self._sums = seen, sums
        return found

    def _vma_written(self, m, protect, registered, sums) -> list[Range]:
        writable = "w" in m.perms
        if self._uffd >= 0 and (writable or _covered(self._registered, m.start, m.end)):
            if not _covered(self._registered, m.start, m.end) and protect and writable:
                if not self._register(m):
                    return self._checksummed(m, sums)
            got = self._scan(m.start, m.end, protect)
            if got is not None:
                registered.append((m.start, m.end))
                return got
            # Not registered after all: a VMA replaced at the same place since the last pass.
            if writable and protect and self._register(m):
                registered.append((m.start, m.end))
                self._scan(m.start, m.end, protect)
            return [(m.start, m.end)]
        if self._uffd < 0 and writable:
            return self._checksummed(m, sums)
        return []

    def _scan(self, start: int, end: int, protect: bool) -> list[Range] | None:
        """PAGEMAP_SCAN for written pages; None if the VMA is not registered for async wp."""
        flags = PM_SCAN_CHECK_WPASYNC | (PM_SCAN_WP_MATCHING if protect else 0)
        arg = PmScanArg(size=ctypes.sizeof(PmScanArg), flags=flags, start=start, end=end,
                        vec=ctypes.addressof(self._vec), vec_len=VEC_LEN,
                        category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN)
        out: list[Range] = []
        while arg.start < end:
            n = _libc.ioctl(self._pm_fd, PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EPERM:
                    return None
                if err == errno.ESRCH:
                    raise ProcessGone(f"process {self.pid} is gone", path=self.path,
                                      step="PAGEMAP_SCAN")
                raise KernelError(f"PAGEMAP_SCAN {start:#x}-{end:#x}", err, step="PAGEMAP_SCAN",
                                  path=self.path)
            out.extend((self._vec[i].start, self._vec[i].end) for i in range(n))
            if arg.walk_end <= arg.start:
                break
            arg.start = arg.walk_end
        return out

    # -- checksum fallback ---------------------------------------------------------------------
    def _checksummed(self, m, sums) -> list[Range]:
        """Cells of `m` whose present pages hash differently from the last committed pass."""
        out = []
        present = self._pagemap.ranges(m.start, m.end, ANON)
        for off in range(0, m.end - m.start, self.chunk_size):
            lo, hi = m.start + off, min(m.end, m.start + off + self.chunk_size)
            h = xxhash.xxh3_64()
            for r in present:
                s, e = max(r.start, lo), min(r.end, hi)
                if s < e:
                    h.update(s.to_bytes(8, "little"))
                    h.update(self._memory.read(s, e - s))
            digest = h.intdigest()
            if digest != self._sums.get((m.start, off)):
                out.append((lo, hi))
            sums[(m.start, off)] = digest
        return out


def _merge_per_vma(ranges: list[Range], maps) -> list[Range]:
    """Merge overlapping/touching ranges, then cut them at VMA boundaries."""
    bounds = sorted({m.start for m in maps} | {m.end for m in maps})
    out = []
    for s, e in _merge(ranges):
        i = bisect.bisect_right(bounds, s)
        while i < len(bounds) and bounds[i] < e:
            out.append((s, bounds[i]))
            s = bounds[i]
            i += 1
        out.append((s, e))
    return out


def page_count(ranges: list[Range]) -> int:
    return sum(e - s for s, e in ranges) // PAGE_SIZE


# -- chunk mtimes for the mount ----------------------------------------------------------------
def _salt() -> int:
    """Nanoseconds shared by every stamp of one mount: 1 .. 999999999, random."""
    return int.from_bytes(os.urandom(4), "little") % (10**9 - 1) + 1


CHUNK_PATH = re.compile(r"^/tasks/(\d+)/maps/([0-9a-f]+)-([0-9a-f]+)/pages/0x([0-9a-f]+)$")


def chunk_key(path: str) -> tuple[int, int, int] | None:
    """(pid, vma start, cell offset) of a chunk file path of the tree, else None."""
    m = CHUNK_PATH.match(path)
    return (int(m[1]), int(m[2], 16), int(m[4], 16)) if m else None


class ChunkClock:
    """mtimes for chunk files such that rsync's quick check (size + mtime) skips exactly the
    chunks with no page written since the pass that stamped them.

    A pass (`new_pass()`) asks every tracker what was written since the previous pass and
    stamps those cells, or whole VMAs, with one fresh stamp. Stamps are whole seconds
    (rsync may compare seconds only) and strictly increasing: each is max(now, last + 1 s),
    so a stamp is never given twice even when passes come faster than one per second.

    Why this never loses a write, wherever the pass boundaries fall: a copy tool stats a
    chunk (stamp S, from a pass at time B) before it reads it, so the bytes it copies include
    every write before B. Any write after B is found by the next pass and gets a stamp
    newer than S, so the next copy sees a different mtime. Late or repeated boundaries
    (someone's `ls` during an rsync) only cause extra copies. What no pass has looked at yet
    (a VMA or process the trackers do not know) gets a fresh stamp of its own, memoized until
    the next pass, so it cannot collide with a stamp given before.

    Stamps may run ahead of the clock when passes come faster than one a second. So that a
    later mount of the same process cannot hand out a second some earlier copy carries, the
    nanoseconds of every stamp are a number drawn per mount (`salt`); `ckptfs migrate` has
    rsync compare nanoseconds (--modify-window=-1).

    The mount calls `new_pass()` on every readdir of its root: every rsync, cp or tar run
    starts there, so each run is one pass, with no command needed; the scan costs well
    under a millisecond per VMA.
    """

    def __init__(self, trackers: dict[int, DirtyTracker], chunk_size: int = DEFAULT_CHUNK,
                 clock: Callable[[], float] = time.time):
        self.trackers, self.chunk_size, self._now = dict(trackers), chunk_size, clock
        self._lock = threading.Lock()
        self._last = int(self._now())
        self.salt = _salt()
        self.base = self._last * 10**9 + self.salt
        self._cells: dict[tuple[int, int, int], int] = {}
        self._vmas: dict[tuple[int, int], int] = {}
        self._known: dict[int, set[int]] = {pid: set() for pid in trackers}
        self._provisional: dict[tuple, int] = {}
        self.passes: list[dict] = []          # per pass: stamp, dirty cells, written bytes

    @property
    def method(self) -> str:
        return ",".join(sorted({t.method for t in self.trackers.values()})) or "none"

    def _fresh(self) -> int:
        self._last = max(int(self._now()), self._last + 1)
        return self._last * 10**9 + self.salt

    def mtime(self, pid: int, vma_start: int, offset: int) -> int:
        """The chunk's mtime in ns."""
        with self._lock:
            if vma_start not in self._known.get(pid, ()):
                key = (pid, vma_start)
                if key not in self._provisional:
                    self._provisional[key] = self._fresh()
                return self._provisional[key]
            return max(self._vmas.get((pid, vma_start), self.base),
                       self._cells.get((pid, vma_start, offset - offset % self.chunk_size),
                                       self.base))

    def new_pass(self) -> dict:
        """Stamp what was written since the last pass. Returns this pass's figures."""
        with self._lock:
            stamp, cells, written = 0, 0, 0
            for pid, tracker in self.trackers.items():
                try:
                    ranges = tracker.reset()
                except ProcessGone:
                    continue            # the process ended: nothing more will be written
                if ranges and not stamp:
                    stamp = self._fresh()
                n, w = self._stamp(pid, tracker, ranges, stamp)
                cells, written = cells + n, written + w
            self._provisional.clear()
            info = {"stamp": stamp, "dirty_cells": cells, "written_bytes": written}
            self.passes.append(info)
            return info

    def _stamp(self, pid, tracker, ranges, stamp) -> tuple[int, int]:
        vmas = tracker.vmas()
        self._known[pid] = {s for s, _ in vmas}
        starts = [s for s, _ in vmas]
        cells, written = 0, 0
        for s, e in ranges:
            i = bisect.bisect_right(starts, s) - 1
            if i < 0 or e > vmas[i][1]:
                continue                # not inside a VMA of this pass (gone meanwhile)
            vs, ve = vmas[i]
            written += e - s
            if (s, e) == (vs, ve):
                self._vmas[(pid, vs)] = stamp
                cells += -(-(ve - vs) // self.chunk_size)
                continue
            first = (s - vs) // self.chunk_size
            last = (e - 1 - vs) // self.chunk_size
            for c in range(first, last + 1):
                self._cells[(pid, vs, c * self.chunk_size)] = stamp
            cells += last - first + 1
        return cells, written

    def close(self) -> None:
        for t in self.trackers.values():
            t.close()


def clock_for(pids: list[int], chunk_size: int = DEFAULT_CHUNK, **kw) -> ChunkClock:
    """Trackers for every process of a tree (create before anything else traces them)."""
    trackers = {}
    try:
        for pid in pids:
            try:
                trackers[pid] = DirtyTracker(pid, chunk_size=chunk_size, **kw)
            except ProcessGone:
                continue    # a short-lived child that ended meanwhile: nothing to track
    except BaseException:
        for t in trackers.values():
            t.close()
        raise
    return ChunkClock(trackers, chunk_size)
