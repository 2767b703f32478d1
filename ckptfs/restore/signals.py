"""Pending signals and POSIX timers, put back into a restored task by injected calls.

Both run in `LinuxRestorer._release_all`, after every thread of the task blocks every signal
(PTRACE_SETSIGMASK): a signal queued now, or sent by a timer created now, stays queued until
the thread gets its own mask back and runs. Were it deliverable, the next injected call would
meet it as a signal-delivery stop and the injector would have to drop it.

Pending signals: each saved siginfo is queued again with its own signal number, code, sender
and value — the shared (process) queue through rt_sigqueueinfo, a thread's own queue through
rt_tgsigqueueinfo. The kernel lets nobody else forge a non-negative si_code (SI_USER, SI_KERNEL)
or SI_TKILL, but it does let a process queue them to itself, so the calls are made by the task
(for the thread queue: by that very thread). A standard signal (< 32) queues once, as in the
kernel. SIGKILL and SIGSTOP are not queued again: a stopped task comes back stopped by its
task state, and a pending SIGKILL would only kill what we just restored.

POSIX timers: timer_create with the saved clock and sigevent, under the saved id. Since Linux
6.15 (prctl PR_TIMER_CREATE_RESTORE_IDS = 77, ON = 1), timer_create reads the id it shall use
from its `timer_t *` argument (normally only written): the flag is set for the creation and
cleared afterwards. Then timer_settime (relative) with the time that was left and the interval.
Not restored: the overrun count (timer_getoverrun starts again at 0; the kernel has no call to
set it) and the time spent between checkpoint and restore (a timer does not fire for it).
"""
from __future__ import annotations

import struct

from ..errors import KernelError, RestoreFailed
from ..inject import NR, Injector

NR_RT_SIGQUEUEINFO, NR_RT_TGSIGQUEUEINFO = NR["rt_sigqueueinfo"], NR["rt_tgsigqueueinfo"]
NR_TIMER_CREATE, NR_TIMER_SETTIME = NR["timer_create"], NR["timer_settime"]
NR_GETPID, NR_GETTID, NR_PRCTL = NR["getpid"], NR["gettid"], NR["prctl"]
PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, RESTORE_IDS_ON = 77, 0, 1
SIGKILL, SIGSTOP = 9, 19
NOT_QUEUED = {SIGKILL: "SIGKILL", SIGSTOP: "SIGSTOP"}
SIGINFO_SIZE = 128
SIGEV_THREAD_ID = 4
ALL_SIGNALS = 2**64 - 1


def signo(siginfo: bytes) -> int:
    return struct.unpack_from("<i", siginfo, 0)[0]


def queue_pending(inj: Injector, siginfos, *, shared: bool, where: str, log) -> int:
    """Queue saved siginfos (128 bytes each) again, in their order, from the thread of `inj`:
    to its process when `shared`, else to the thread itself; how many were queued."""
    siginfos = [bytes(s) for s in siginfos]
    if not siginfos:
        return 0
    pid = inj.call(NR_GETPID, step="pending signals", path=where)
    tid = inj.call(NR_GETTID, step="pending signals", path=where)
    n = 0
    for i, info in enumerate(siginfos):
        path = f"{where}/{i}"
        if len(info) != SIGINFO_SIZE:
            raise RestoreFailed(f"siginfo is {len(info)} bytes, not {SIGINFO_SIZE}", path=path,
                                step="pending signals")
        sig = signo(info)
        if sig in NOT_QUEUED:
            log(f"note: {path}: pending {NOT_QUEUED[sig]} not queued again")
            continue
        if not 1 <= sig <= 64:
            raise RestoreFailed(f"signal number {sig} out of range", path=path,
                                step="pending signals")
        inj.reset_scratch()
        addr = inj.put(info)
        if shared:
            inj.call(NR_RT_SIGQUEUEINFO, pid, sig, addr, step="rt_sigqueueinfo", path=path)
        else:
            inj.call(NR_RT_TGSIGQUEUEINFO, pid, tid, sig, addr, step="rt_tgsigqueueinfo",
                     path=path)
        n += 1
    return n


def sigevent(timer, notify_tid: int) -> bytes:
    """struct sigevent (x86_64, 64 bytes): value, signo, notify, then the target thread id."""
    return struct.pack("<QiiI44x", timer.sival_ptr, timer.si_signo, timer.it_sigev_notify,
                       notify_tid)


def create_timers(inj: Injector, timers, tid_of, where: str) -> int:
    """Re-create POSIX `timers` (posix_timer_entry) in the task of `inj` under their ids;
    `tid_of(old_tid)` is the thread id, as the task sees it, that a SIGEV_THREAD_ID timer
    targets. Number of timers made."""
    timers = list(timers)
    if not timers:
        return 0
    ret = inj.syscall(NR_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0)
    if ret < 0:
        raise KernelError("prctl(PR_TIMER_CREATE_RESTORE_IDS): this kernel cannot create a "
                          "POSIX timer with a chosen id (Linux 6.15+ can)", -ret,
                          path=f"{where}/posix", step="posix timers")
    try:
        for t in timers:
            _create_one(inj, t, tid_of, f"{where}/posix/{t.it_id}")
    finally:
        inj.call(NR_PRCTL, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0,
                 step="posix timers", path=f"{where}/posix")
    return len(timers)


def _create_one(inj: Injector, t, tid_of, path: str) -> None:
    inj.reset_scratch()
    tid = 0
    if t.it_sigev_notify & SIGEV_THREAD_ID:
        tid = tid_of(t.notify_thread_id)
        if tid is None:
            raise RestoreFailed(f"the timer signals thread {t.notify_thread_id}, which is not "
                                "in the checkpoint", path=path + "/notify_thread",
                                step="posix timers")
    ev = inj.put(sigevent(t, tid))
    slot = inj.put(struct.pack("<i", t.it_id))
    inj.call(NR_TIMER_CREATE, t.clock_id, ev, slot, step="timer_create", path=path)
    got = struct.unpack("<i", inj.read(slot, 4))[0]
    if got != t.it_id:
        raise RestoreFailed(f"timer_create gave id {got}, not {t.it_id}", path=path,
                            step="timer_create")
    if t.vsec or t.vnsec:
        its = inj.put(struct.pack("<4q", t.isec, t.insec, t.vsec, t.vnsec))
        inj.call(NR_TIMER_SETTIME, got, 0, its, 0, step="timer_settime", path=path)
