"""The checkpoint model (Linux/CRIU form) -> what a FreeBSD restore applies, and back.

`to_freebsd(source)` reads a `model.Source` and gives a `FreeBSDPlan`: per thread the
struct reg values (in FreeBSD order) and fs/gs base, per process the descriptors' f_flag
bits, the signal dispositions with FreeBSD numbers and SA_ flags, signal masks as FreeBSD
sigset_t words; the jail parameters, RCTL rules and cpuset; and the lossy list.
`from_freebsd(plan)` gives the Linux form back (`LinuxValues`).
"""
from __future__ import annotations

import dataclasses

from ... import flags as L
from ...errors import BadImage, Unsupported
from ...model import Isolation, Source
from .. import LossLog, Lossy
from . import fdkinds as K
from . import flags as F
from . import jail as J
from . import rctl as R
from . import regs as G

SUBMESSAGE = {"REG": "reg", "INETSK": "isk", "NS": "nsf", "EVENTFD": "efd",
              "EVENTPOLL": "epfd", "SIGNALFD": "sgfd", "TIMERFD": "tfd", "UNIXSK": "usk",
              "FIFO": "fifo", "PIPE": "pipe", "TTY": "tty", "MEMFD": "memfd", "PIDFD": "pidfd"}
FD_TYPE_NAMES = {v: k for k, v in L.FD_TYPES.items()}


@dataclasses.dataclass
class FdPlan:
    fd: int
    kind: str            # CRIU fd type name (REG, PIPE, ...)
    flags: int           # FreeBSD open/f_flag bits; O_CLOEXEC stands for close-on-exec


@dataclasses.dataclass
class SigactionPlan:
    signo: int           # FreeBSD signal number
    handler: int         # SIG_DFL 0, SIG_IGN 1 (same on both) or an address
    flags: int           # FreeBSD SA_ bits
    mask: tuple          # FreeBSD sigset_t __bits[4]
    restorer: int        # Linux sa_restorer, passed to the Linuxulator's rt_sigaction


@dataclasses.dataclass
class ThreadPlan:
    tid: int
    reg: dict            # struct reg field -> value, in FreeBSD order
    fsbase: int
    gsbase: int
    sigmask: tuple       # FreeBSD sigset_t __bits[4]


@dataclasses.dataclass
class TaskPlan:
    pid: int
    threads: list
    fds: list
    sigactions: list


@dataclasses.dataclass
class FreeBSDPlan:
    jail_name: str
    jail: dict
    rules: list
    cpuset: str | None
    tasks: list
    lossy: list
    source: dict = dataclasses.field(default_factory=dict)   # os, arch, kernel, binary_os
    refused: list = dataclasses.field(default_factory=list)  # Lossy: what restore refuses


@dataclasses.dataclass
class LinuxTask:
    pid: int
    regs: dict           # tid -> {user_regs_struct name: value}
    sigmask: dict        # tid -> Linux 64-bit mask
    fds: dict            # fd -> (CRIU fd type name, Linux open flags incl. O_CLOEXEC)
    sigactions: dict     # Linux signal -> {"handler", "flags", "restorer", "mask"}


@dataclasses.dataclass
class LinuxValues:
    isolation: Isolation
    tasks: dict          # pid -> LinuxTask
    lossy: list
    source: dict = dataclasses.field(default_factory=dict)


# -- Linux -> FreeBSD ------------------------------------------------------------------------------
def to_freebsd(source: Source, strict: bool = False) -> FreeBSDPlan:
    """Translate a checkpoint; strict=True raises errors.Unsupported at the first lossy value."""
    log = LossLog(strict, step="translate to freebsd")
    meta = source.meta()
    if meta.arch != "x86_64":
        raise Unsupported(f"architecture {meta.arch}: only x86_64 <-> amd64", path="manifest")
    tasks = [task_plan(source, pid, tids, log) for pid, tids in source.tasks()]
    name = J.jail_name(tasks[0].pid)
    iso = source.isolation()
    params = J.to_jail(iso, name, meta.kernel, log)
    rules, cpuset = R.to_rctl(iso.limits, name, log)
    src = {"os": meta.os, "arch": meta.arch, "kernel": meta.kernel, "binary_os": meta.binary_os}
    return FreeBSDPlan(name, params, rules, cpuset, tasks, log.records, src,
                       refusals(source, [t.pid for t in tasks], log))


def refusals(source: Source, pids: list[int], log: LossLog) -> list[Lossy]:
    """Every descriptor the FreeBSD restore refuses, with why (fdkinds.problems); what it
    makes only in part goes to `log`."""
    out = []
    for pid in pids:
        if source.core(pid).tc.task_state in ZOMBIE_STATES:
            continue
        for info in source.fdinfo(pid):
            out += [Lossy(*p) for p in K.problems(source, pid, info, log)]
        out += [Lossy(*p) for p in K.map_problems(source, pid)]
    return out


ZOMBIE_STATES = (L.TASK_STATES["zombie"], L.TASK_STATES["dead"])


def task_plan(source: Source, pid: int, tids: list[int], log: LossLog) -> TaskPlan:
    leader = source.core(pid)
    if leader.tc.task_state in ZOMBIE_STATES:
        # Only its core is kept (no registers worth the name): one record, not one per field.
        log.note(f"tasks/{pid}/state", "zombie", f"a zombie (exit code {leader.tc.exit_code}) "
                 "is not re-created by the FreeBSD restore; its parent cannot reap it there")
        log = LossLog()
    threads = [thread_plan(source, pid, tid, leader, log) for tid in tids]
    not_carried(source, pid, tids, leader, log)
    return TaskPlan(pid, threads, fd_plans(source, pid, log), sigaction_plans(pid, leader, log))


SS_DISABLE = 2
NOT_CARRIED = {
    "timers": "an armed interval or POSIX timer is not re-armed by the FreeBSD restore",
    "pending": "queued signals are not queued again by the FreeBSD restore",
    "sigaltstack": "the alternate signal stack is not re-established by the FreeBSD restore",
    "rseq": "the rseq(2) registration is not re-made by the FreeBSD restore: the area's cpu "
            "id is no longer kept up to date",
    # linux_prctl (linux_misc.c) PR_SET_NAME writes the process's p_comm; the native
    # thr_set_name is not reachable from a Linux-ABI process: a thread keeps the process name
    "comm": "a thread's own name is not set by the FreeBSD restore (the Linuxulator's "
            "PR_SET_NAME names the process); the thread shows the process name",
}


def not_carried(source: Source, pid: int, tids: list[int], leader, log: LossLog) -> None:
    """State the plan has no file for, noted when it is not the default (so `lossy` lists
    everything a FreeBSD restore would leave out, not only what it approximates)."""
    base = f"tasks/{pid}"
    timers = leader.tc.timers if leader.HasField("tc") else None
    if timers is not None:
        for kind in ("real", "virt", "prof"):
            it = getattr(timers, kind)
            if it.vsec or it.vusec:
                log.note(f"{base}/timers/{kind}", f"{it.vsec}.{it.vusec:06d}s", NOT_CARRIED["timers"])
        for t in timers.posix:
            log.note(f"{base}/timers/posix/{t.it_id}", f"{t.vsec}.{t.vnsec:09d}s",
                     NOT_CARRIED["timers"])
    if leader.HasField("tc") and len(leader.tc.signals_s.signals):
        log.note(f"{base}/pending", f"{len(leader.tc.signals_s.signals)} signal(s)",
                 NOT_CARRIED["pending"])
    for tid in tids:
        tc = (leader if tid == pid else source.core(tid)).thread_core
        where = f"{base}/threads/{tid}"
        if len(tc.signals_p.signals):
            log.note(f"{where}/pending", f"{len(tc.signals_p.signals)} signal(s)",
                     NOT_CARRIED["pending"])
        if tc.HasField("sas") and tc.sas.ss_sp and not tc.sas.ss_flags & SS_DISABLE:
            log.note(f"{where}/sigaltstack", f"sp={tc.sas.ss_sp:#x} size={tc.sas.ss_size}",
                     NOT_CARRIED["sigaltstack"])
        if tc.HasField("rseq_entry") and tc.rseq_entry.rseq_abi_pointer:
            log.note(f"{where}/rseq", hex(tc.rseq_entry.rseq_abi_pointer), NOT_CARRIED["rseq"])
        if tid != pid and tc.comm and leader.HasField("tc") and tc.comm != leader.tc.comm:
            log.note(f"{where}/comm", tc.comm, NOT_CARRIED["comm"])


def gpregs(core, path: str) -> dict[str, int]:
    regs = core.thread_info.gpregs
    if getattr(regs, "mode", 1) != 1:
        raise Unsupported("a 32-bit (compat) task cannot run under the amd64 Linuxulator",
                          path=path)
    return {tree: getattr(regs, criu) for tree, criu in L.GP_REGS}


def thread_plan(source: Source, pid: int, tid: int, leader, log: LossLog) -> ThreadPlan:
    path = f"tasks/{pid}/threads/{tid}"
    core = leader if tid == pid else source.core(tid)
    reg, fsbase, gsbase = G.to_fbsd(gpregs(core, path), log, f"{path}/regs")
    mask = leader.tc.blk_sigset if tid == pid else core.thread_core.blk_sigset
    return ThreadPlan(tid, reg, fsbase, gsbase, F.sigset_to_fbsd(mask, log, f"{path}/sigmask"))


def fd_plans(source: Source, pid: int, log: LossLog) -> list[FdPlan]:
    out = []
    for info in source.fdinfo(pid):
        kind = FD_TYPE_NAMES.get(info.type, str(info.type))
        path = f"tasks/{pid}/fds/{info.fd}/flags"
        flags = file_flags(source, info, kind) & ~L.O_CLOEXEC
        if info.flags & L.FD_CLOEXEC:
            flags |= L.O_CLOEXEC
        out.append(FdPlan(info.fd, kind, F.open_to_fbsd(flags, log, path, kind)))
    return out


def file_flags(source: Source, info, kind: str) -> int:
    """Open flags of the file an fd refers to (a FIFO keeps them in its reg entry)."""
    entry = source.file(info.id)
    sub = getattr(entry, SUBMESSAGE.get(kind, ""), None)
    if kind == "FIFO" and sub is not None:
        sub = source.file(sub.regf_id).reg
    return getattr(sub, "flags", 0) if sub is not None else 0


def sigaction_plans(pid: int, leader, log: LossLog) -> list[SigactionPlan]:
    entries = list(leader.tc.sigactions)
    if entries and len(entries) != len(L.SIGACTION_SIGNALS):
        raise BadImage(f"{len(entries)} sigactions, CRIU stores {len(L.SIGACTION_SIGNALS)}",
                       path=f"tasks/{pid}/sigactions")
    out = []
    for sig, sa in zip(L.SIGACTION_SIGNALS, entries):
        if not (sa.sigaction or sa.flags or sa.mask or sa.restorer):
            continue
        path = f"tasks/{pid}/sigactions/{L.SIGNAL_NAMES[sig]}"
        if sig in F.SIG_LOSSY:
            log.note(path, hex(sa.sigaction), F.SIG_LOSSY[sig] + "; this disposition is dropped")
            continue
        out.append(SigactionPlan(F.sig_to_fbsd(sig), sa.sigaction,
                                 F.sa_to_fbsd(sa.flags, log, f"{path}/flags"),
                                 F.sigset_to_fbsd(sa.mask, log, f"{path}/mask"), sa.restorer))
    return out


# -- FreeBSD -> Linux ------------------------------------------------------------------------------
def from_freebsd(plan: FreeBSDPlan, strict: bool = False) -> LinuxValues:
    """The Linux form of a plan (after edits). Refuses a native FreeBSD binary."""
    if plan.source.get("binary_os", "linux") != "linux":
        raise Unsupported("the checkpoint is a native FreeBSD binary (ELF OSABI FreeBSD); it "
                          "cannot run on Linux", path="plan/source", step="translate to linux")
    log = LossLog(strict, step="translate to linux")
    iso = J.from_jail(plan.jail, log)
    iso.limits = R.from_rctl(plan.rules, plan.cpuset, plan.jail_name, log)
    tasks = {t.pid: linux_task(t, log) for t in plan.tasks}
    return LinuxValues(iso, tasks, list(plan.lossy) + log.records, dict(plan.source))


def linux_task(task: TaskPlan, log: LossLog) -> LinuxTask:
    base = f"plan/tasks/{task.pid}"
    regs = {t.tid: G.to_linux(t.reg, t.fsbase, t.gsbase, log, f"{base}/regs") for t in task.threads}
    masks = {t.tid: F.sigset_to_linux(t.sigmask, log, f"{base}/sigmask") for t in task.threads}
    fds = {f.fd: (f.kind, F.open_to_linux(f.flags, log, f"{base}/fds/{f.fd}/flags", f.kind))
           for f in task.fds}
    acts = {}
    for sa in task.sigactions:
        path = f"{base}/sigactions"
        sig = F.sig_to_linux(sa.signo)
        if sig is None:
            log.note(path, F.fbsd_signame_safe(sa.signo), "no Linux signal; disposition dropped")
            continue
        acts[sig] = {"handler": sa.handler, "restorer": sa.restorer,
                     "flags": F.sa_to_linux(sa.flags, sa.restorer, log, path),
                     "mask": F.sigset_to_linux(sa.mask, log, path)}
    return LinuxTask(task.pid, regs, masks, fds, acts)


def lossy_paths(records: list[Lossy]) -> set[str]:
    return {r.path for r in records}
