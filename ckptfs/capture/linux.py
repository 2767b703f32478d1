"""LiveSource: a running Linux process tree (a pid and all its descendants) as a model.Source.

Reads come from procfs, ptrace and a few syscalls aimed at the target (kcmp, prlimit,
get_robust_list, process_vm_readv, pidfd_getfd). Browsing never keeps a process stopped:
a thread's registers are taken in a brief seize / interrupt / read / detach. `freeze()` stops
every thread of the tree with PTRACE_SEIZE + PTRACE_INTERRUPT (invisible to the parent and
to job control) until `thaw()`; while frozen, answers are cached so the tree reads as one
consistent state.

Every ptrace request goes through a ptrace.Tracer (the thread that attached must issue them).
A process is held as (pid, starttime): a pid reused by another process reads as ProcessGone.

Fields procfs cannot show (CRIU gets them from its parasite) are read at freeze() by making
each stopped thread execute system calls (ckptfs.inject): prctl(PR_GET_TID_ADDRESS),
sigaltstack, rt_sigaction for the 62 signals, getitimer, timer_gettime/timer_getoverrun for
the POSIX timers /proc/PID/timers lists, prctl(PR_GET_SECUREBITS / PR_GET_DUMPABLE /
PR_GET_PDEATHSIG / PR_GET_CHILD_SUBREAPER / PR_GET_THP_DISABLE); pending signals are peeked
(PTRACE_PEEKSIGINFO). A running (unfrozen) tree is never injected into; there these fields
keep CRIU's defaults: clear_tid_addr 0, itimers 0, no POSIX timers, no pending signals,
handlers of caught signals 0 (ignored ones are SIG_IGN, from /proc status SigIgn), no
sigaltstack, secbits 0, dumpable guessed from /proc ownership.
A thread stopped by job control (SIGSTOP) is not injected into either (running injected
calls would end its stop); `warnings` lists every field left at its default while frozen.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import signal
import struct
import threading
import time

from .. import flags as lf
from .. import inject, pb, ptrace, xsave
from ..errors import CkptError, KernelError, ProcessGone, Unsupported
from ..model import Isolation, Meta, PageRange, Source
from . import files, pages, procfs

PF_KTHREAD = 0x00200000
SIGTRAP = 5
SYS_GET_ROBUST_LIST, SYS_TGKILL = 274, 234
NS_KINDS = ("pid", "net", "ipc", "uts", "time", "mnt", "user", "cgroup")   # CRIU's id order
_NS_FIELD = {k: f"{k}_ns_id" for k in NS_KINDS}
STOP_TIMEOUT = 10.0
FREEZE_PASSES = 50      # a tree that still grows after this many rounds is refused
V = lf.VMA_STATUS
M = lf.MAP_FLAGS

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class AlreadyTraced(CkptError):
    """Another tracer (debugger, strace, CRIU) holds the process: ptrace refuses a second."""
    errno = errno.EBUSY


class NotCapturable(Unsupported):
    """Zombies and kernel threads have no user state to capture."""


# -- ptrace work: these run on the tracer thread -------------------------------------------
@dataclasses.dataclass
class Stopped:
    pid: int
    group_sig: int = 0          # job-control stop signal if the thread was stopped (state T)
    signals: list = dataclasses.field(default_factory=list)   # swallowed, re-sent on release
    siginfos: list = dataclasses.field(default_factory=list)  # their 128-byte siginfo_t


@dataclasses.dataclass
class ThreadRegs:
    regs: dict
    xstate: bytes
    sigmask: int
    rseq: tuple | None          # (abi_pointer, abi_size, signature) or None
    group_sig: int = 0


def _wait_stop(tid: int, pid: int) -> Stopped:
    """Wait for the PTRACE_EVENT_STOP of an interrupted thread. A signal-delivery-stop that
    comes first is remembered (re-sent on release) and passed over with PTRACE_CONT(0):
    the pending interrupt then stops the thread before it runs any user code."""
    stop = Stopped(pid)
    deadline, nap = time.monotonic() + STOP_TIMEOUT, 0.0001
    while True:
        got = ptrace.wait(tid, nohang=True)
        if got is None:
            if time.monotonic() > deadline:
                raise KernelError(f"thread {tid} did not stop within {STOP_TIMEOUT}s",
                                  errno.ETIMEDOUT, step="waitpid", path=f"/proc/{tid}")
            time.sleep(nap)
            nap = min(nap * 2, 0.01)
            continue
        status = got[1]
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise ProcessGone(f"thread {tid} exited", step="waitpid", path=f"/proc/{tid}")
        sig = os.WSTOPSIG(status)
        if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
            stop.group_sig = 0 if sig == SIGTRAP else sig
            return stop
        stop.signals.append(sig)
        stop.siginfos.append(_getsiginfo(tid))
        ptrace.cont(tid, 0)


PTRACE_GETSIGINFO = 0x4202
PTRACE_PEEKSIGINFO_SHARED = 1
SIGINFO_SIZE = 128


class _PeekArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


def _getsiginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    ptrace._call(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf), step="PTRACE_GETSIGINFO")
    return buf.raw


def peek_siginfo(tid: int, shared: bool) -> list[bytes]:
    """Pending signals (siginfo_t each) of a stopped thread, or of its process (`shared`),
    left queued (PTRACE_PEEKSIGINFO)."""
    out: list[bytes] = []
    batch = 32
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
    while True:
        args = _PeekArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
        n = ptrace._call(ptrace.PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args),
                         ctypes.addressof(buf), step="PTRACE_PEEKSIGINFO")
        if n <= 0:
            return out
        out += [buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n)]


def _seize(tid: int) -> None:
    try:
        ptrace.seize(tid)
    except KernelError as e:
        if e.errno != errno.EPERM:
            raise
        # EPERM: another tracer, no permission -- or a thread already on its way out.
        try:
            st = procfs.parse_status(procfs.read_text(f"/proc/{tid}/status"))
        except ProcessGone:
            raise ProcessGone(f"thread {tid} exited", step="PTRACE_SEIZE", path=f"/proc/{tid}") from None
        if st.get("State", "?")[0] in "ZX" and st.get("TracerPid", "0") == "0":
            raise ProcessGone(f"thread {tid} is exiting", step="PTRACE_SEIZE", path=f"/proc/{tid}") from None
        raise AlreadyTraced(f"PTRACE_SEIZE of thread {tid} refused (EPERM): traced by "
                            f"{st.get('TracerPid', '?')} or not permitted", path=f"/proc/{tid}",
                            step="PTRACE_SEIZE", err=errno.EPERM) from None


def _stop_threads(todo: list[tuple[int, int]]) -> dict[int, Stopped]:
    """Seize all, interrupt all, then wait for each: the threads stop at about the same time.
    Threads that vanish on the way are left out."""
    seized = []
    for pid, tid in todo:
        try:
            _seize(tid)
            seized.append((pid, tid))
        except ProcessGone:
            continue
    out = {}
    for pid, tid in seized:
        try:
            ptrace.interrupt(tid)
            out[tid] = _wait_stop(tid, pid)
        except ProcessGone:
            continue
    return out


def _release(tid: int, stop: Stopped) -> None:
    for sig in stop.signals:    # queued while still stopped; delivered once detached
        if _libc.syscall(SYS_TGKILL, stop.pid, tid, sig) < 0 and ctypes.get_errno() != errno.ESRCH:
            raise KernelError(f"tgkill({stop.pid}, {tid}, {sig})", ctypes.get_errno(), step="tgkill")
    try:
        ptrace.detach(tid)
    except ProcessGone:
        pass    # the thread exited while stopped: nothing left to release


def _read_regs(tid: int, group_sig: int = 0) -> ThreadRegs:
    rseq = ptrace.get_rseq(tid)
    return ThreadRegs(ptrace.get_regs(tid), ptrace.get_xstate(tid), ptrace.get_sigmask(tid),
                      (rseq.rseq_abi_pointer, rseq.rseq_abi_size, rseq.signature)
                      if rseq.rseq_abi_pointer else None, group_sig)


def _peek_regs(pid: int, tid: int) -> ThreadRegs:
    """Registers of a running thread: stopped only for the time of the reads."""
    stop = _stop_threads([(pid, tid)]).get(tid)
    if stop is None:
        raise ProcessGone(f"thread {tid} is gone", step="PTRACE_SEIZE", path=f"/proc/{tid}")
    try:
        return _read_regs(tid, stop.group_sig)
    finally:
        _release(tid, stop)


def _tgid_of(tid: int) -> int:
    try:
        return int(procfs.parse_status(procfs.read_text(f"/proc/{tid}/status"))["Tgid"])
    except ProcessGone:
        return 0


PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_GET_SECUREBITS = 2, 3, 27
PR_GET_CHILD_SUBREAPER, PR_GET_THP_DISABLE = 37, 42
ITIMERS = ("real", "virt", "prof")     # ITIMER_REAL 0, ITIMER_VIRTUAL 1, ITIMER_PROF 2


@dataclasses.dataclass
class Extras:
    """What only the thread itself can tell (obtained by injected system calls)."""
    clear_tid_addr: int = 0
    sas: tuple | None = None                 # (sp, flags, size)
    secbits: int = 0
    pdeath_sig: int = 0
    sigactions: list | None = None           # 62 (handler, flags, restorer, mask), leader only
    itimers: list | None = None              # 3 (isec, iusec, vsec, vusec), leader only
    dumpable: int | None = None
    child_subreaper: bool | None = None
    thp_disabled: bool | None = None
    posix_timers: list | None = None         # (PosixTimer, overrun, isec, insec, vsec, vnsec)
    pending_thread: list = dataclasses.field(default_factory=list)   # siginfo_t bytes
    pending_shared: list = dataclasses.field(default_factory=list)   # leader only
    warnings: list = dataclasses.field(default_factory=list)


def _try(extras: Extras, what: str, fn):
    """One injected query; a refused call (seccomp, old kernel) leaves the default and a note."""
    try:
        return fn()
    except KernelError as e:
        extras.warnings.append(f"{what}: {e}")
        return None


def _int_out(inj: "inject.Injector", option: int) -> int:
    buf = inj.scratch(8)
    inj.prctl(option, buf, 0, 0, 0)
    return struct.unpack("<i", inj.read(buf, 4))[0]


def _pending_only(tid: int, leader: bool) -> Extras:
    return Extras(pending_thread=peek_siginfo(tid, False),
                  pending_shared=peek_siginfo(tid, True) if leader else [])


SYS_TIMER_GETTIME, SYS_TIMER_GETOVERRUN = 224, 225


def _timer_values(ex: Extras, inj: "inject.Injector", timers) -> list:
    out = []
    for t in timers:
        buf = inj.scratch(32)
        got = _try(ex, f"timer {t.it_id}", lambda: inj.call(SYS_TIMER_GETTIME, t.it_id, buf))
        isec, insec, vsec, vnsec = struct.unpack("<4q", inj.read(buf, 32)) if got is not None \
            else (0, 0, 0, 0)
        overrun = _try(ex, f"timer {t.it_id} overrun",
                       lambda: inj.call(SYS_TIMER_GETOVERRUN, t.it_id)) or 0
        out.append((t, overrun, isec, insec, vsec, vnsec))
    return out


def _inject_extras(tid: int, leader: bool, timers=()) -> tuple[Extras, list[int]]:
    """Run the queries in a stopped thread (tracer thread); (extras, signals that arrived)."""
    ex = _pending_only(tid, leader)
    inj = inject.Injector(tid)
    try:
        ex.clear_tid_addr = _try(ex, "clear_tid_addr", inj.get_tid_address) or 0
        ex.sas = _try(ex, "sigaltstack", inj.sigaltstack)
        ex.secbits = _try(ex, "secbits", lambda: inj.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)) or 0
        ex.pdeath_sig = _try(ex, "pdeath_sig", lambda: _int_out(inj, PR_GET_PDEATHSIG)) or 0
        if leader:
            ex.sigactions = [_try(ex, f"sigaction {sig}", lambda s=sig: inj.sigaction(s))
                             or (0, 0, 0, 0) for sig in lf.SIGACTION_SIGNALS]
            ex.itimers = [_try(ex, f"itimer {n}", lambda w=w: inj.getitimer(w)) or (0, 0, 0, 0)
                          for w, n in enumerate(ITIMERS)]
            ex.dumpable = _try(ex, "dumpable", lambda: inj.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
            sub = _try(ex, "child_subreaper", lambda: _int_out(inj, PR_GET_CHILD_SUBREAPER))
            ex.child_subreaper = None if sub is None else bool(sub)
            thp = _try(ex, "thp_disabled", lambda: inj.prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0))
            ex.thp_disabled = None if thp is None else bool(thp)
            ex.posix_timers = _timer_values(ex, inj, timers)
    finally:
        inj.close()
    return ex, list(inj.pending)


# -- small syscalls ------------------------------------------------------------------------
def robust_list(tid: int) -> tuple[int, int]:
    head, size = ctypes.c_uint64(), ctypes.c_size_t()
    if _libc.syscall(SYS_GET_ROBUST_LIST, tid, ctypes.byref(head), ctypes.byref(size)) < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessGone("thread is gone", step="get_robust_list", path=f"/proc/{tid}")
        raise KernelError(f"get_robust_list({tid})", err, step="get_robust_list")
    return head.value, size.value


def rlimits(pid: int) -> list[tuple[int, int]]:
    """(soft, hard) per resource, in RLIMIT_* order, from /proc/PID/limits: one read, and it
    works for another uid's process (prlimit(pid) wants CAP_SYS_RESOURCE for that)."""
    path = f"/proc/{pid}/limits"
    rows = procfs.read_text(path).splitlines()[1:]   # rows come in resource number order
    if len(rows) != len(lf.RLIMITS):
        raise CkptError(f"{len(rows)} limits, want {len(lf.RLIMITS)}", step="read limits",
                        path=path)
    return [tuple(_limit(word, path) for word in row[LIMITS_NAME_WIDTH:].split()[:2])
            for row in rows]


LIMITS_NAME_WIDTH = 26        # the kernel prints the name left-aligned in 25 columns + a blank


def _limit(word: str, path: str) -> int:
    if word == "unlimited":
        return lf.RLIM_INFINITY
    try:
        return int(word)
    except ValueError:
        raise CkptError(f"limit {word!r} is not a number", step="read limits",
                        path=path) from None


def _cap_words(hex_text: str) -> list[int]:
    v = int(hex_text, 16)
    return [v & 0xFFFFFFFF, v >> 32]


def creds_from_status(status: dict) -> "pb.creds_entry":
    uid, gid = procfs.status_ints(status["Uid"]), procfs.status_ints(status["Gid"])
    c = pb.creds_entry(uid=uid[0], euid=uid[1], suid=uid[2], fsuid=uid[3],
                       gid=gid[0], egid=gid[1], sgid=gid[2], fsgid=gid[3], secbits=0,
                       no_new_privs=int(status.get("NoNewPrivs", "0")))
    for field, key in (("cap_inh", "CapInh"), ("cap_prm", "CapPrm"), ("cap_eff", "CapEff"),
                       ("cap_bnd", "CapBnd"), ("cap_amb", "CapAmb")):
        getattr(c, field).extend(_cap_words(status.get(key, "0")))
    c.groups.extend(procfs.status_ints(status.get("Groups", "")))
    return c


def sigactions_from_status(status: dict) -> list:
    """62 sa_entry: ignored signals as SIG_IGN; caught ones' handlers are not in procfs (0)."""
    ign = procfs.parse_sigset(status.get("SigIgn", "0"))
    return [pb.sa_entry(sigaction=1 if ign >> (sig - 1) & 1 else 0, flags=0, restorer=0, mask=0)
            for sig in lf.SIGACTION_SIGNALS]


def _itimers(values=None):
    """task_timers_entry from 3 (isec, iusec, vsec, vusec); zeros if unknown."""
    values = values or [(0, 0, 0, 0)] * 3
    real, virt, prof = (pb.itimer_entry(isec=a, iusec=b, vsec=c, vusec=d) for a, b, c, d in values)
    return pb.task_timers_entry(real=real, virt=virt, prof=prof)


# -- VMAs ---------------------------------------------------------------------------------
_SPECIAL_VMAS = {   # name -> status (flags are MAP_PRIVATE|MAP_ANONYMOUS for all)
    "[vdso]": V["VMA_AREA_REGULAR"] | V["VMA_AREA_VDSO"] | V["VMA_ANON_PRIVATE"],
    "[vvar]": V["VMA_AREA_REGULAR"] | V["VMA_AREA_VVAR"] | V["VMA_ANON_PRIVATE"],
    "[vvar_vclock]": V["VMA_AREA_REGULAR"] | V["VMA_AREA_VVAR"] | V["VMA_ANON_PRIVATE"],
    "[vsyscall]": V["VMA_AREA_VSYSCALL"] | V["VMA_ANON_PRIVATE"],
    "[heap]": V["VMA_AREA_REGULAR"] | V["VMA_AREA_HEAP"] | V["VMA_ANON_PRIVATE"],
}
_VMFLAG_MAP = {"gd": M["MAP_GROWSDOWN"], "lo": M["MAP_LOCKED"], "nr": M["MAP_NORESERVE"],
               "ht": M["MAP_HUGETLB"]}
_PRIVATE_ANON = M["MAP_PRIVATE"] | M["MAP_ANONYMOUS"]
_SHARED_ANON = M["MAP_SHARED"] | M["MAP_ANONYMOUS"]
_LINK_MODE_FLAGS = {0o400: os.O_RDONLY, 0o200: os.O_WRONLY, 0o600: os.O_RDWR}


def vma_kind(m: procfs.MapLine) -> str:
    """special | anon | shared_anon | sysv | memfd | file."""
    path = m.path
    if path in _SPECIAL_VMAS:
        return "special"
    if path == "" or path.startswith(("[stack", "[anon:")):
        return "shared_anon" if m.shared else "anon"
    if path.startswith("[anon_shmem:") or (m.shared and path == "/dev/zero (deleted)"):
        return "shared_anon"
    if path.startswith("/SYSV"):
        return "sysv"
    if path.startswith("/memfd:"):
        return "memfd"
    return "file"


def classify(m: procfs.MapLine) -> tuple[int, int]:
    """(status, flags) of a VMA as CRIU records it (criu-image-format.md 4.6)."""
    kind = vma_kind(m)
    reg = V["VMA_AREA_REGULAR"]
    if kind == "special":
        status, flags = _SPECIAL_VMAS[m.path], _PRIVATE_ANON
    elif kind == "anon":
        status, flags = reg | V["VMA_ANON_PRIVATE"], _PRIVATE_ANON
    elif kind == "shared_anon":
        status, flags = reg | V["VMA_ANON_SHARED"], _SHARED_ANON
    elif kind == "sysv":
        status, flags = reg | V["VMA_AREA_SYSVIPC"] | V["VMA_ANON_SHARED"], M["MAP_SHARED"]
    else:
        status = reg | (V["VMA_FILE_SHARED"] if m.shared else V["VMA_FILE_PRIVATE"])
        status |= V["VMA_AREA_MEMFD"] if kind == "memfd" else 0
        flags = M["MAP_SHARED"] if m.shared else M["MAP_PRIVATE"]
    for code, bit in _VMFLAG_MAP.items():
        if code in m.vmflags:
            flags |= bit
    return status, flags


def madv_of(m: procfs.MapLine) -> int:
    return sum(lf.MADV_BITS[name] for code, name in lf.VMFLAG_MADV.items() if code in m.vmflags)


def page_mode(status: int) -> str | None:
    """Which pages of a VMA are saved (pages.ANON / FILE_PRIVATE / SHARED), "whole" for the
    vDSO, None for none (vvar, vsyscall, shared file and memfd maps: their data lives in the
    file)."""
    if status & (V["VMA_AREA_VVAR"] | V["VMA_AREA_VSYSCALL"]):
        return None
    if status & V["VMA_AREA_VDSO"]:
        return "whole"
    if status & (V["VMA_ANON_SHARED"] | V["VMA_AREA_SYSVIPC"]):
        return pages.SHARED
    if status & V["VMA_FILE_SHARED"]:
        return None         # a memfd's too: its contents go once with the memfd (fdkinds)
    if status & V["VMA_FILE_PRIVATE"]:
        return pages.FILE_PRIVATE
    return pages.ANON


# -- the source ---------------------------------------------------------------------------
class LiveSource(Source):
    """A live process tree. Thread-safe; call close() (or use `with`) when done."""

    def __init__(self, pid: int, *, tracer: ptrace.Tracer | None = None):
        self.root = pid
        self._own_tracer = tracer is None
        self._tracer = tracer or ptrace.Tracer()
        self._lock = threading.RLock()     # freeze and thaw
        self._small = threading.Lock()     # short sections only: never held while computing
        self._key_locks: dict = {}
        self._gen = 0                      # moves at every freeze and thaw
        self._starts: dict[int, int] = {}
        self._stops: dict[int, Stopped] = {}
        self._cache: dict = {}
        self._files = files.Files()
        self._pagemaps: dict[int, pages.Pagemap] = {}
        self._mems: dict[int, pages.Memory] = {}
        self._kobj_ids: dict[str, list[tuple[int, int]]] = {}
        self._ns_ids: dict[int, int] = {}
        self._extras: dict[int, Extras] = {}
        self.warnings: list[str] = []    # fields left at their defaults in this frozen state
        self.frozen = False
        try:
            self._refuse_uncapturable(pid)
        except BaseException:
            self.close()
            raise

    def _refuse_uncapturable(self, pid: int) -> None:
        if pid == os.getpid():
            raise NotCapturable(f"{pid} is this ckptfs process itself", path=f"/proc/{pid}")
        stat = self._stat(pid)
        if int(stat[9]) & PF_KTHREAD:
            raise NotCapturable(f"{pid} is a kernel thread", path=f"/proc/{pid}")
        if stat[3] in ("Z", "X"):
            raise NotCapturable(f"{pid} is a zombie (state {stat[3]})", path=f"/proc/{pid}")
        self._check_tracer(pid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.frozen:
            self.thaw()
        for obj in list(self._pagemaps.values()) + list(self._mems.values()):
            obj.close()
        self._pagemaps.clear()
        self._mems.clear()
        if self._own_tracer:
            self._tracer.close()
            self._own_tracer = False

    # -- identity ----------------------------------------------------------------------------
    def _stat(self, pid: int, tid: int | None = None) -> list[str]:
        """/proc stat fields of a process (or thread), checked against the start time first
        seen, so that a reused pid reads as ProcessGone."""
        path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
        fields = procfs.parse_stat(procfs.read_text(path))
        key = pid if tid is None else (pid, tid)
        start = int(fields[22])
        known = self._starts.setdefault(key, start)
        if known != start:
            raise ProcessGone(f"pid {pid} now names another process", path=path, step="stat")
        return fields

    def _check(self, pid: int) -> None:
        """ProcessGone if `pid` now names another process. Not looked at for a process we
        hold frozen: a traced task that dies stays a zombie until its tracer waits for it,
        so its pid cannot be reused meanwhile (saves a /proc read per chunk read)."""
        if self.frozen and pid in self._stops:
            return
        self._stat(pid)

    def _status(self, pid: int, tid: int | None = None) -> dict:
        path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
        return procfs.parse_status(procfs.read_text(path))

    def _check_tracer(self, pid: int) -> None:
        tracer = int(self._status(pid).get("TracerPid", "0"))
        if tracer and _tgid_of(tracer) != os.getpid():   # TracerPid names the tracing thread
            raise AlreadyTraced(f"process {pid} is already traced by {tracer} (EBUSY)",
                                path=f"/proc/{pid}/status", step="TracerPid", err=errno.EBUSY)

    def _cached(self, key, fn):
        """While frozen, each answer is computed once (one consistent state). Different
        answers are computed at the same time (a chunk read never waits behind an smaps
        walk); a thread asking for an answer being computed waits for it. An answer computed
        across a thaw is not kept (`_gen` moved)."""
        if not self.frozen:
            return fn()
        gen = self._gen
        try:
            return self._cache[key]
        except KeyError:
            pass
        with self._small:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._cache:
                return self._cache[key]
            value = fn()
            with self._small:
                if self._gen == gen:
                    self._cache[key] = value
            return value

    # -- freeze / thaw -----------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop every thread of the tree (repeating until no new thread or child appears)."""
        with self._lock:
            if self.frozen:
                return
            self._check_tracer(self.root)
            try:
                for _ in range(FREEZE_PASSES):
                    todo = [(pid, tid) for pid, tids in self._walk(live_only=True)
                            for tid in tids if tid not in self._stops]
                    if not todo:
                        break
                    self._stops.update(self._tracer.call(_stop_threads, todo))
                    if self.root not in self._stops:
                        raise ProcessGone(f"process {self.root} is gone", step="freeze",
                                          path=f"/proc/{self.root}")
                else:
                    raise KernelError(f"the tree of {self.root} kept growing or threads refused "
                                      f"to stop after {FREEZE_PASSES} passes: {todo[:5]}",
                                      errno.EAGAIN, step="freeze", path=f"/proc/{self.root}")
                self._files.forget_fds()
                regs, self._extras, self.warnings = self._gather_extras()
                with self._small:
                    self._gen += 1
                    self._cache.clear()
                    self._cache.update(regs)
                self.frozen = True      # only now: nothing is computed without the extras
            except BaseException:
                self.frozen = False
                self._release_all()
                raise

    def _gather_extras(self) -> tuple[dict, dict, list]:
        """Registers first (the state to save), then the injected queries, thread by thread:
        (cache entries of the registers, extras by thread, warnings)."""
        regs, extras, warnings = {}, {}, []
        for tid, stop in self._stops.items():
            regs[("regs", tid)] = self._tracer.call(_read_regs, tid, stop.group_sig)
            if stop.group_sig:
                warnings.append(f"thread {tid} is stopped by signal {stop.group_sig}: "
                                "injected fields left at their defaults")
                extras[tid] = self._tracer.call(_pending_only, tid, tid == stop.pid)
                extras[tid].pending_thread[:0] = stop.siginfos
                continue
            leader = tid == stop.pid
            timers = procfs.parse_timers(procfs.read_text(f"/proc/{tid}/timers")) if leader else ()
            ex, pending = self._tracer.call(_inject_extras, tid, leader, timers)
            ex.pending_thread = stop.siginfos + ex.pending_thread   # dequeued by our stop
            stop.signals += pending
            extras[tid] = ex
            warnings += [f"thread {tid}: {w}" for w in ex.warnings]
        return regs, extras, warnings

    def thaw(self) -> None:
        """Let every thread run again, untraced, re-sending signals that arrived meanwhile."""
        with self._lock:
            self._release_all()
            self.frozen = False
            with self._small:
                self._gen += 1
                self._cache.clear()
                self._key_locks.clear()
            self._extras = {}

    def alive(self) -> bool:
        """The root process still exists (not a zombie, not a reused pid)."""
        try:
            return self._stat(self.root)[3] not in ("Z", "X")
        except ProcessGone:
            return False

    def kill(self, pids: list[int] | None = None) -> None:
        """SIGKILL every task (children first) after a move. Their established TCP
        connections go into repair mode first, so the kill sends no FIN or RST to peers that
        now talk to the restored copy (what CRIU does to a dumped task)."""
        pids = list(pids if pids is not None else self.pids())
        for pid in reversed(pids):
            try:
                files.silence_connections(pid, set(pids))
            except (ProcessGone, FileNotFoundError, ProcessLookupError):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _release_all(self) -> None:
        stops, self._stops = self._stops, {}
        self._tracer.call(lambda: [_release(tid, s) for tid, s in stops.items()])

    # -- process tree -------------------------------------------------------------------------
    def _threads(self, pid: int) -> list[int]:
        tids = sorted(int(t) for t in procfs.listdir(f"/proc/{pid}/task"))
        return [pid] + [t for t in tids if t != pid] if pid in tids else tids

    def _children(self, pid: int, tids: list[int]) -> list[int]:
        out = []
        for tid in tids:
            try:
                out += [int(c) for c in procfs.read_text(f"/proc/{pid}/task/{tid}/children").split()]
            except ProcessGone:
                continue    # that thread exited; its children moved to another thread
        return out

    def _walk(self, live_only: bool = False) -> list[tuple[int, list[int]]]:
        """(pid, threads) of the root and every descendant, parents first. Our own process
        (and what it started) is left out: `ckptfs mount $$` runs below the shell it shows."""
        out, queue = [], [self.root]
        while queue:
            pid = queue.pop(0)
            if pid == os.getpid():
                continue
            try:
                stat = self._stat(pid)
                tids = self._threads(pid)
            except ProcessGone:
                if pid == self.root:
                    raise
                continue
            if live_only and stat[3] in ("Z", "X"):
                continue
            out.append((pid, tids))
            queue += self._children(pid, tids)
        return out

    def pstree(self) -> list:
        return self._cached("pstree", self._pstree)

    def _pstree(self) -> list:
        out = []
        for pid, tids in self._walk():
            try:
                stat = self._stat(pid)
            except ProcessGone:
                if pid == self.root or self.frozen:
                    raise
                continue            # a short-lived child of a running tree, gone since the walk
            e = pb.pstree_entry(pid=pid, ppid=int(stat[4]), pgid=int(stat[5]), sid=int(stat[6]))
            e.threads.extend(tids)
            out.append(e)
        return out

    def task_tty(self, pid: int) -> dict[str, object]:
        """The controlling terminal of `pid` for the tree (tasks/<pid>/ctty, tty_pgrp):
        {"ctty": "136:3"} from /proc/PID/stat field 7 (tty_nr, the kernel's new_encode_dev,
        which os.major/os.minor decode), plus {"tty_pgrp": N} (field 8, the terminal's
        foreground group) for the session leader, which re-makes the terminal on restore.
        Empty when the task has no controlling terminal."""
        stat = self._stat(pid)
        tty_nr, tpgid, sid = int(stat[7]), int(stat[8]), int(stat[6])
        if not tty_nr:
            return {}
        out: dict[str, object] = {"ctty": f"{os.major(tty_nr)}:{os.minor(tty_nr)}"}
        if sid == pid and tpgid > 0:
            out["tty_pgrp"] = tpgid
        return out

    def _tgid(self, tid: int) -> int:
        for e in self.pstree():
            if tid in e.threads:
                return e.pid
        raise ProcessGone(f"thread {tid} is not in the tree of {self.root}", path=f"/proc/{tid}")

    # -- registers ---------------------------------------------------------------------------
    def thread_regs(self, tid: int) -> ThreadRegs:
        """Registers, xsave area, signal mask and rseq of one thread."""
        return self._cached(("regs", tid), lambda: self._thread_regs(tid))

    def _thread_regs(self, tid: int) -> ThreadRegs:
        pid = self._tgid(tid)
        self._stat(pid, tid)
        stop = self._stops.get(tid)
        if stop is not None:
            return self._tracer.call(_read_regs, tid, stop.group_sig)
        self._check_tracer(pid)
        return self._tracer.call(_peek_regs, pid, tid)

    def core(self, tid: int):
        return self._cached(("core", tid), lambda: self._core(tid))

    def _core(self, tid: int):
        pid = self._tgid(tid)
        stat = self._stat(pid)
        core = pb.core_entry(mtype=pb.core_entry.X86_64)
        if stat[3] in ("Z", "X"):
            core.tc.CopyFrom(self._task_core(pid, stat, None, dead=True))
            return core
        tr = self.thread_regs(tid)
        ti = core.thread_info
        ex = self._extras.get(tid)
        ti.clear_tid_addr = ex.clear_tid_addr if ex else 0
        for tree_name, criu_name in lf.GP_REGS:
            setattr(ti.gpregs, criu_name, tr.regs[tree_name])
        ti.gpregs.mode = pb.NATIVE
        ti.fpregs.CopyFrom(xsave.split(tr.xstate))
        if tid == pid:
            core.tc.CopyFrom(self._task_core(pid, stat, tr))
        core.thread_core.CopyFrom(self._thread_core(pid, tid, tr))
        return core

    def _task_core(self, pid: int, stat: list[str], tr: ThreadRegs | None, dead: bool = False):
        status = self._status(pid)
        stopped = tr.group_sig if tr else 0
        state = lf.TASK_STATES["dead"] if dead else \
            lf.TASK_STATES["stopped"] if stopped else lf.TASK_STATES["alive"]
        tc = pb.task_core_entry(
            task_state=state, exit_code=int(stat[52]) if dead and len(stat) > 52 else 0,
            personality=int(procfs.read_text(f"/proc/{pid}/personality").strip(), 16),
            flags=int(stat[9]), blk_sigset=tr.sigmask if tr else 0, comm=stat[2],
            loginuid=int(procfs.read_text(f"/proc/{pid}/loginuid").strip()),
            oom_score_adj=int(procfs.read_text(f"/proc/{pid}/oom_score_adj").strip()))
        if stopped:
            tc.stop_signo = stopped
        if dead:
            return tc
        ex = self._extras.get(pid)
        tc.timers.CopyFrom(_itimers(ex.itimers if ex and ex.itimers else None))
        timers = ex.posix_timers if ex and ex.posix_timers else []
        for t, overrun, isec, insec, vsec, vnsec in timers:
            p = tc.timers.posix.add(it_id=t.it_id, clock_id=t.clock_id, si_signo=t.signo,
                                    it_sigev_notify=t.sigev_notify, sival_ptr=t.sival_ptr,
                                    overrun=overrun, isec=isec, insec=insec, vsec=vsec,
                                    vnsec=vnsec)
            if t.sigev_notify & procfs.SIGEV_THREAD_ID:
                p.notify_thread_id = t.notify_pid
        tc.rlimits.rlimits.extend(pb.rlimit_entry(cur=c, max=m) for c, m in rlimits(pid))
        if ex and ex.sigactions:
            tc.sigactions.extend(pb.sa_entry(sigaction=h, flags=f, restorer=r, mask=m)
                                 for h, f, r, m in ex.sigactions)
        else:
            tc.sigactions.extend(sigactions_from_status(status))
        if ex and ex.child_subreaper is not None:
            tc.child_subreaper = ex.child_subreaper
        if ex and ex.pending_shared:
            tc.signals_s.signals.extend(pb.siginfo_entry(siginfo=b) for b in ex.pending_shared)
        return tc

    def _thread_core(self, pid: int, tid: int, tr: ThreadRegs):
        stat = self._stat(pid, tid)
        rla, rla_len = robust_list(tid)
        t = pb.thread_core_entry(futex_rla=rla, futex_rla_len=rla_len,
                                 sched_nice=int(stat[19]), sched_policy=int(stat[41]),
                                 sched_prio=int(stat[40]),
                                 comm=procfs.read_text(f"/proc/{pid}/task/{tid}/comm").rstrip("\n"))
        if tid != pid:
            t.blk_sigset = tr.sigmask
        t.creds.CopyFrom(creds_from_status(self._status(pid, tid)))
        ex = self._extras.get(tid)
        if ex:
            t.creds.secbits = ex.secbits
            if ex.pdeath_sig:
                t.pdeath_sig = ex.pdeath_sig
            if ex.pending_thread:
                t.signals_p.signals.extend(pb.siginfo_entry(siginfo=b) for b in ex.pending_thread)
            if ex.sas:
                sp, flags, size = ex.sas
                t.sas.CopyFrom(pb.thread_sas_entry(ss_sp=sp, ss_size=size, ss_flags=flags))
        if tr.rseq:
            t.rseq_entry.CopyFrom(pb.rseq_entry(rseq_abi_pointer=tr.rseq[0],
                                                rseq_abi_size=tr.rseq[1], signature=tr.rseq[2]))
        return t

    # -- memory map --------------------------------------------------------------------------
    def maps(self, pid: int) -> list[procfs.MapLine]:
        """/proc/PID/smaps entries (with VmFlags)."""
        return self._cached(("maps", pid), lambda: self._maps(pid))

    def _maps(self, pid: int) -> list[procfs.MapLine]:
        self._check(pid)
        return procfs.parse_maps(procfs.read_text(f"/proc/{pid}/smaps"))

    def mm(self, pid: int):
        return self._cached(("mm", pid), lambda: self._mm(pid))

    def _alive(self, pid: int, what: str) -> list[str]:
        """stat of a live process; a zombie in the tree has no memory, files or fs (CRIU
        keeps only its core: task_state 2 and exit_code)."""
        stat = self._stat(pid)
        if stat[3] in ("Z", "X"):
            raise NotCapturable(f"{pid} is a zombie: it has no {what} (its core says task_state 2)",
                                path=f"/proc/{pid}", step=what)
        return stat

    def _mm(self, pid: int):
        s = [int(x) for x in self._alive(pid, "mm")[25:52]]   # s[i] = field i + 25
        f = lambda n: s[n - 25]  # noqa: E731
        maps = self.maps(pid)
        heap = next((m for m in maps if m.path == "[heap]"), None)
        mm = pb.mm_entry(mm_start_code=f(26), mm_end_code=f(27), mm_start_stack=f(28),
                         mm_start_data=f(45), mm_end_data=f(46), mm_start_brk=f(47),
                         mm_brk=heap.end if heap else f(47), mm_arg_start=f(48),
                         mm_arg_end=f(49), mm_env_start=f(50), mm_env_end=f(51),
                         exe_file_id=self._path_file(pid, f"/proc/{pid}/exe"),
                         dumpable=self._dumpable(pid))
        ex = self._extras.get(pid)
        if ex and ex.thp_disabled is not None:
            mm.thp_disabled = ex.thp_disabled
        mm.mm_saved_auxv.extend(procfs.parse_auxv(procfs.read_bytes(f"/proc/{pid}/auxv")))
        mm.vmas.extend(self._vmas(pid, maps))
        return mm

    def _dumpable(self, pid: int) -> int:
        """PR_GET_DUMPABLE (injected while frozen). Running: not in procfs, but a non-dumpable
        task's /proc files belong to root, which shows for a task whose euid is not root."""
        ex = self._extras.get(pid)
        if ex and ex.dumpable is not None:
            return ex.dumpable
        euid = procfs.status_ints(self._status(pid)["Uid"])[1]
        owner = procfs.stat(f"/proc/{pid}").st_uid
        return 0 if euid != 0 and owner == 0 else 1

    def _vmas(self, pid: int, maps: list[procfs.MapLine]) -> list:
        out = []
        for m in maps:
            if m.path == "[uprobes]":
                continue
            status, flags = classify(m)
            prev = out[-1] if out else None
            if prev is not None and status & V["VMA_AREA_VVAR"] and \
                    prev.status & V["VMA_AREA_VVAR"] and prev.end == m.start:
                prev.end = m.end      # [vvar] + [vvar_vclock]: one area, as CRIU 4.2 has it
                continue
            out.append(self._vma(pid, m, status, flags))
        return out

    def _vma(self, pid: int, m: procfs.MapLine, status: int, flags: int):
        v = pb.vma_entry(start=m.start, end=m.end, pgoff=m.pgoff, shmid=0, prot=m.prot,
                         flags=flags, status=status, fd=-1, madv=madv_of(m))
        if status & V["VMA_AREA_VVAR"]:
            v.madv |= lf.MADV_BITS["MADV_DONTDUMP"]
        if status & (V["VMA_FILE_PRIVATE"] | V["VMA_FILE_SHARED"]):
            # map_files links open the mapped file even when it was deleted or is out of
            # our mount namespace (needs CAP_CHECKPOINT_RESTORE); the inode comes from maps.
            link = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
            v.shmid = self._files.path_id(pid, link, procfs.strip_deleted(m.path)[0],
                                          inode=(os.makedev(*m.dev), m.inode))
            if status & V["VMA_FILE_SHARED"]:
                mode = procfs.stat(link, follow=False).st_mode & 0o777
                v.fdflags = _LINK_MODE_FLAGS.get(mode, os.O_RDONLY)
        elif status & V["VMA_ANON_SHARED"]:
            v.shmid = m.inode
        return v

    # -- pages -------------------------------------------------------------------------------
    def page_ranges(self, pid: int, vma) -> list[PageRange]:
        return self._cached(("pages", pid, vma.start, vma.end),
                            lambda: self._page_ranges(pid, vma))

    def _page_ranges(self, pid: int, vma) -> list[PageRange]:
        mode = page_mode(vma.status)
        if mode is None:
            return []
        if mode == "whole":
            return [PageRange(vma.start, vma.end)]
        got = self._pagemap(pid).ranges(vma.start, vma.end, mode)
        self._check(pid)
        return got

    def _pagemap(self, pid: int) -> pages.Pagemap:
        got = self._pagemaps.get(pid)
        if got is not None:
            return got
        self._check(pid)
        with self._small:
            if pid not in self._pagemaps:
                self._pagemaps[pid] = pages.Pagemap(pid)
            return self._pagemaps[pid]

    def _memory(self, pid: int) -> pages.Memory:
        got = self._mems.get(pid)
        if got is not None:
            return got
        self._check(pid)
        with self._small:
            if pid not in self._mems:
                self._mems[pid] = pages.Memory(pid)
            return self._mems[pid]

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        data = self._memory(pid).read(addr, size)
        self._check(pid)
        return data

    def read_memory_into(self, pid: int, addr: int, buf) -> int:
        """Fill a writable buffer (bytearray, memoryview, mmap) with memory at `addr`."""
        n = self._memory(pid).read_into(addr, buf)
        self._check(pid)
        return n

    # -- files -------------------------------------------------------------------------------
    def _path_file(self, pid: int, proc_link: str) -> int:
        return self._files.path_id(pid, proc_link, procfs.readlink(proc_link))

    def fs(self, pid: int):
        return self._cached(("fs", pid), lambda: self._fs(pid))

    def _fs(self, pid: int):
        self._alive(pid, "fs")
        return pb.fs_entry(cwd_id=self._path_file(pid, f"/proc/{pid}/cwd"),
                           root_id=self._path_file(pid, f"/proc/{pid}/root"),
                           umask=int(self._status(pid).get("Umask", "0022"), 8))

    def fdinfo(self, pid: int) -> list:
        return self._cached(("fdinfo", pid), lambda: self._fdinfo(pid))

    def _fdinfo(self, pid: int) -> list:
        if self._stat(pid)[3] in ("Z", "X"):
            return []       # a zombie holds no descriptors
        out = []
        for fd in sorted(int(n) for n in procfs.listdir(f"/proc/{pid}/fd")):
            try:
                fid = self._files.fd_id(pid, fd)
                entry = self.file(fid)
                info = procfs.parse_fdinfo(procfs.read_text(f"/proc/{pid}/fdinfo/{fd}"))
            except ProcessGone:
                self._check(pid)   # still there: only this descriptor was closed meanwhile
                continue
            cloexec = lf.FD_CLOEXEC if procfs.fdinfo_flags(info) & lf.O_CLOEXEC else 0
            out.append(pb.fdinfo_entry(id=fid, flags=cloexec, type=entry.type, fd=fd))
        return out

    def file(self, file_id: int):
        return self._cached(("file", file_id), lambda: self._file(file_id))

    def _file(self, file_id: int):
        ref = self._files.refs.get(file_id)
        if ref is None:
            raise KeyError(f"no file id {file_id} (ids come from fdinfo, mm, fs)")
        self._check(ref.pid)
        if ref.fd is None:
            return files.path_entry(file_id, ref)
        return files.fd_entry(file_id, ref, self._ns_ids, self._files.companion_id)

    def file_deleted(self, file_id: int) -> bool:
        """The file was unlinked while open (/proc shows ' (deleted)' and no links remain)."""
        ref = self._files.refs[file_id]
        link = procfs.readlink(ref.path)
        s = procfs.stat(ref.path)
        return link.endswith(procfs.DELETED) and s.st_nlink == 0

    def file_contents(self, file_id: int) -> bytes:
        """Whole contents of a file (meant for deleted files, which only the process reaches)."""
        return files.read_whole(self._files.refs[file_id].path)

    def file_ghost(self, file_id: int) -> int:
        """The ghost a deleted file id stands for (tree.ghost_of): for a descriptor, the path
        entry of its inode (the one its maps and an exe link get, made now if none has asked
        yet), so a deleted file open and mapped is saved once; a path entry is its own."""
        ref = self._files.refs[file_id]
        if ref.fd is None or self.file(file_id).type != pb.REG or not self.file_deleted(file_id):
            return file_id
        s = procfs.stat(ref.path)
        name = procfs.strip_deleted(procfs.readlink(ref.path))[0]
        return self._files.path_id(ref.pid, ref.path, name, inode=(s.st_dev, s.st_ino))

    def pipe_data(self, pipe_id: int) -> bytes:
        return self._cached(("pipe", pipe_id), lambda: self._pipe_data(pipe_id))

    def socket_queue(self, file_id: int) -> list[bytes]:
        ref = self._files.refs.get(file_id)
        if ref is None:
            return []
        return self._cached(("socket-queue", file_id), lambda: files.socket_queue(ref))

    def tcp_stream(self, file_id: int):
        ref = self._files.refs.get(file_id)
        if ref is None or not self.frozen:
            return None
        return self._cached(("tcp-stream", file_id), lambda: files.tcp_stream(ref))

    def _pipe_data(self, pipe_id: int) -> bytes:
        ref = self._files.any_fd_of(pipe_id)
        if ref is None:
            for pid in self.pids():
                self.fdinfo(pid)        # registers every descriptor of the tree
            ref = self._files.any_fd_of(pipe_id)
        if ref is None:
            raise KeyError(f"no descriptor of the tree holds pipe {pipe_id}")
        return files.pipe_peek(ref.path)

    # -- ids ---------------------------------------------------------------------------------
    def ids(self, pid: int):
        return self._cached(("ids", pid), lambda: self._ids(pid))

    def _ids(self, pid: int):
        self._check(pid)
        e = pb.task_kobj_ids_entry(vm_id=self._kobj_id("vm", pid, files.KCMP_VM),
                                   files_id=self._kobj_id("files", pid, files.KCMP_FILES),
                                   fs_id=self._kobj_id("fs", pid, files.KCMP_FS),
                                   sighand_id=self._kobj_id("sighand", pid, files.KCMP_SIGHAND))
        for kind, inode in self._namespaces(pid).items():
            if kind in _NS_FIELD:
                setattr(e, _NS_FIELD[kind], self._ns_id(inode))
        return e

    def _kobj_id(self, kind: str, pid: int, kcmp_type: int) -> int:
        """Small ids from 2 (1 is CRIU's own), shared by tasks that share the object."""
        with self._small:
            known = self._kobj_ids.setdefault(kind, [])
            for other, oid in known:
                if other == pid:
                    return oid
            for other, oid in known:
                try:
                    if files.kcmp(pid, other, kcmp_type) == 0:
                        known.append((pid, oid))
                        return oid
                except (ProcessGone, KernelError):
                    continue
            oid = 2 + len({i for _, i in known})
            known.append((pid, oid))
            return oid

    def _ns_id(self, inode: int) -> int:
        with self._small:
            return self._ns_ids.setdefault(inode, len(self._ns_ids) + 1)

    def _namespaces(self, pid: int) -> dict[str, int]:
        out = {}
        for kind in NS_KINDS:
            try:
                out[kind] = procfs.parse_ns_link(procfs.readlink(f"/proc/{pid}/ns/{kind}"))[1]
            except ProcessGone:
                self._check(pid)    # the kernel has no such namespace kind
        return out

    # -- isolation and meta ------------------------------------------------------------------
    def isolation(self) -> Isolation:
        return self._cached("isolation", self._isolation)

    def _isolation(self) -> Isolation:
        """uts names, namespaces, cgroup and limits: ckptfs.isolation.capture owns that."""
        from ..isolation.capture import capture_isolation
        return capture_isolation(self.root, container=getattr(self, "container", False))

    def meta(self) -> Meta:
        return self._cached("meta", self._meta)

    def _meta(self) -> Meta:
        tr = self.thread_regs(self.root)
        xfeatures, size = xsave.sw_bytes(tr.xstate)
        u = os.uname()
        return Meta(os="linux", arch="x86_64", kernel=u.release, hostname=u.nodename,
                    xfeatures=xfeatures, xsave_size=size or len(tr.xstate),
                    cpu_flags=procfs.parse_cpuinfo_flags(procfs.read_text("/proc/cpuinfo")),
                    binary_os=self._binary_os(self.root))

    def _binary_os(self, pid: int) -> str:
        path = f"/proc/{pid}/exe"
        try:
            with open(path, "rb") as f:
                ident = f.read(16)
        except OSError as e:
            raise procfs.os_error(e, path, "open") from None
        return "freebsd" if len(ident) > 7 and ident[:4] == b"\x7fELF" and ident[7] == 9 else "linux"
