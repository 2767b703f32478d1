"""Restore on Linux: helper processes are made to become the checkpointed ones.

How (no kernel help, no CRIU):

1. A helper (`sleep infinity`) is started with posix_spawn — never fork() from this possibly
   multi-threaded process — and seized with PTRACE_O_TRACEFORK/TRACECLONE/EXITKILL, so every
   task it is later made to create is traced from birth and everything dies with us if we die.
2. The helper gets a scratch page at an address free in every checkpointed layout; a
   `syscall` instruction there serves every injected call (ckptfs.inject) from then on,
   through all the unmapping that follows. It closes its descriptors, unregisters glibc's
   rseq area and takes a pidfd of this process (at a descriptor number no task uses), through
   which every task later pulls the files the restorer opened for it (pidfd_getfd).
3. The process tree is forked in shape from the helpers with injected clone3 (set_tid keeps
   the old pids with `same_pids`, or inside a new PID namespace with `pidns`, whose init is
   a 40-byte reaper loop written into a helper; CLONE_FILES for a child that shared its
   parent's descriptor table); sessions and groups follow.
4. Each task: rlimits that differ (prlimit from here), unmap everything but the scratch page,
   place the vDSO (arch_prctl ARCH_MAP_VDSO_64), PR_SET_MM_MAP (mm fields, auxv, exe), map
   the private anonymous VMAs (MAP_FIXED) and start their page fill (UFFDIO_COPY through a
   userfaultfd of the task, on threads of their own: memory.py), map the other VMAs
   (process_vm_writev fills their saved pages, also on a thread). While pages are copied:
   descriptors (deleted files re-made from their contents: files.py), cwd/root/umask,
   signal handlers that differ from the helper's, itimers, names; threads cloned. Then the
   fill is joined (every page in place, maps unregistered, its errors raised here) and
   final protections set; per thread the robust list, clear_tid, rseq (its area must be
   filled), sigaltstack, credentials (groups, gids, capabilities, uids, securebits:
   _creds says in which order and why); dumpable after them (an euid change resets it).
5. Last, per task: every thread blocks every signal; POSIX timers are re-created under their
   ids and pending signals queued again (signals.py), then the scratch page goes. Then
   registers and xsave state of every thread; a thread that was inside a system call is
   resumed through the kernel's own restart logic (inject.park_with_regs); its own signal
   mask comes back only after that, and everything is detached at once.

Any failure kills every task created so far (and the namespace's init) and reaps them.

Containers (restore/container.py): the helper is then the program of an isolation.Container,
started inside the re-created namespaces (all but pid) and cgroups, so everything forked
from it is inside too; the pid namespace is the one clone3(CLONE_NEWPID) makes here, and its
first task mounts that namespace's /proc when the mount namespace is the container's own.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import resource
import shutil
import signal
import struct
import time

from .. import flags as F
from .. import inject, ptrace, xsave
from ..errors import CkptError, KernelError, ProcessGone, RestoreFailed
from ..inject import NR, Injector
from . import memory, signals
from . import files as restore_files
from .files import FileTable
from .plan import (SCRATCH_SIZE, SOCKET_KINDS, SPECIAL, TASK_END, Plan, TaskPlan, V, cap_last,
                   caps_of, table_owner, vdso_layout, where)
from .plan import creds_caps as plan_creds_caps

PTRACE_O_TRACEFORK, PTRACE_O_TRACEVFORK, PTRACE_O_TRACECLONE = 2, 4, 8
PTRACE_O_EXITKILL = 1 << 20
PTRACE_O_TRACESYSGOOD = 1     # syscall stops report SIGTRAP|0x80: no GETSIGINFO to tell them
OPTIONS = (PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE
           | PTRACE_O_EXITKILL)

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM, CLONE_NEWPID = 0x10000, 0x40000, 0x20000000
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
SIGCHLD = 17

PROT_WRITE, PROT_RWX = 2, 7
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x1, 0x2, 0x10, 0x20
MAP_FIXED_NOREPLACE, MAP_POPULATE = 0x100000, 0x8000
MAP_KEEP = F.MAP_FLAGS["MAP_GROWSDOWN"] | F.MAP_FLAGS["MAP_NORESERVE"] | F.MAP_FLAGS["MAP_STACK"]
ARCH_MAP_VDSO_64 = 0x2003
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_MM = 1, 4, 15, 35
PR_SET_MM_MAP, PR_SET_CHILD_SUBREAPER = 14, 36
NR_MOUNT = 165
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
RSEQ_FLAG_UNREGISTER = 1
F_SETFD = 2
O_CLOEXEC = F.O_CLOEXEC
CLOSE_ALL = 0xFFFFFFFF
DATA_OFF = 0x1000          # scratch page: the syscall insn at +0, init code at +0x40, data above

# The init of a new PID namespace: reap every child; leave when there are none.
#   top: wait4(-1, NULL, __WALL, NULL); if (rax != -ECHILD) goto top; exit_group(0)
INIT_CODE = bytes.fromhex(
    "bfffffffff" "31f6" "ba00000040" "4531d2" "b83d000000" "0f05"
    "4883f8f6" "75e6" "31ff" "b8e7000000" "0f05")

ERESTARTNOHAND, ERESTART_RESTARTBLOCK, EINTR = 514, 516, 4
SIG_DFL, SIG_IGN = 0, 1
PR_CAPBSET_DROP, PR_GET_SECUREBITS, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 24, 27, 28, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 47, 2, 4
SECBIT_NO_SETUID_FIXUP = 1 << 2
CAP_V3 = 0x20080522
NR_NANOSLEEP, NR_CLOCK_NANOSLEEP, TIMER_ABSTIME = 35, 230, 1


@dataclasses.dataclass
class Live:
    """A task being built: its checkpoint plan and the helper becoming it."""
    plan: TaskPlan
    pid: int                                 # host pid
    ns_pid: int                              # pid as its own namespace sees it
    tids: dict[int, int] = dataclasses.field(default_factory=dict)      # old tid -> host tid
    injs: dict[int, Injector] = dataclasses.field(default_factory=dict)  # host tid -> injector
    added_write: list = dataclasses.field(default_factory=list)   # maps writable for the fill

    @property
    def inj(self) -> Injector:
        return self.injs[self.pid]


def regs_of(core) -> dict[str, int]:
    gp = core.thread_info.gpregs
    return {name: getattr(gp, field) for name, field in F.GP_REGS}


def restart_regs(regs: dict[str, int]) -> dict[str, int]:
    """Registers of a thread interrupted in a system call, made resumable in a new task.

    -ERESTARTSYS/NOINTR/NOHAND stay: the kernel restarts them (park_with_regs). The restart
    block behind -ERESTART_RESTARTBLOCK belonged to the old task, so that one is rewritten:
    a relative (clock_)nanosleep sleeps on with the time that was left, which the kernel
    wrote to the `rem` argument when it was interrupted; an absolute one simply restarts;
    any other such call (poll, futex with timeout ...) returns EINTR, which callers handle."""
    r = dict(regs)
    nr = r["orig_rax"]
    if nr >= 2**63 or r["rax"] != 2**64 - ERESTART_RESTARTBLOCK:
        return r
    if nr == NR_NANOSLEEP and r["rsi"]:
        r["rdi"], r["rax"] = r["rsi"], 2**64 - ERESTARTNOHAND
    elif nr == NR_CLOCK_NANOSLEEP and r["rsi"] & TIMER_ABSTIME:
        r["rax"] = 2**64 - ERESTARTNOHAND
    elif nr == NR_CLOCK_NANOSLEEP and r["r10"]:
        r["rdx"], r["rax"] = r["r10"], 2**64 - ERESTARTNOHAND
    else:
        r["rax"], r["orig_rax"] = 2**64 - EINTR, 2**64 - 1
    return r


class LinuxRestorer:
    def __init__(self, plan: Plan, *, pidns: bool = False, same_pids: bool = False, log=None,
                 container=None, mount_proc: bool = False):
        """`container`: an isolation.Container whose program (`sleep infinity`) is the helper;
        `mount_proc`: the new pid namespace's first task mounts its /proc (the container has
        a mount namespace of its own, so the host's /proc is not touched)."""
        self.plan, self.src = plan, plan.source
        self.container, self.mount_proc = container, mount_proc
        self.pidns, self.same_pids = pidns, same_pids
        self.keep_pids = pidns or same_pids
        self.log = log or (lambda msg: None)
        self.scratch = plan.scratch
        self.files = FileTable(self.src, self.log)
        self.live: dict[int, Live] = {}
        self.created: list[int] = []          # host pids, creation order (for cleanup)
        self.traced: list[int] = []           # host tids we still trace
        self.helper = 0                       # the spawned helper, when it is not a task
        self.init = 0                         # the new PID namespace's init, if any
        self.pidfd_slot = self._free_fd()
        self.xcr0 = 0
        self.xsize = 0
        self.timing: dict[str, float] = {}
        self._t0 = self._fill_t0 = time.monotonic()
        self.populate: set[int] = set()        # maps of the current task to fault in ahead
        self.uffd: set[int] = set()            # maps of the current task to fill by userfaultfd

    # -- driver -------------------------------------------------------------------------
    def run(self) -> dict[int, int]:
        tracer = ptrace.Tracer("ckptfs-restore")
        try:
            return tracer.call(self._run)
        except CkptError as e:
            tracer.call(self._cleanup)
            if isinstance(e, RestoreFailed):
                raise
            err = RestoreFailed(f"{e} (undone: every task it created was killed)", err=e.errno)
            err.path, err.step = e.path, e.step
            raise err from e
        except BaseException:
            tracer.call(self._cleanup)
            raise
        finally:
            self.files.close()
            tracer.close()

    def _run(self) -> dict[int, int]:
        t0 = self._t0 = time.monotonic()
        self._create_tree()
        self.timing["create"] = time.monotonic() - t0
        for live in self.live.values():
            if not live.plan.zombie:
                self._restore_task(live)
        self.timing["tasks"] = time.monotonic() - t0
        self._release_all()
        self.timing["total"] = time.monotonic() - t0
        return {old: live.pid for old, live in self.live.items()}

    def _cleanup(self) -> None:
        """Kill and reap everything made so far; never raises."""
        for pid in [self.init, *reversed(self.created), self.helper]:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for tid in {*self.traced, *self.created, self.helper, self.init} - {0}:
            _reap(tid)

    def _where(self, pid: int, rel: str = "") -> str:
        return where(self.src, pid, rel)

    # -- helpers and the process tree ---------------------------------------------------
    def _spawn_helper(self, session: bool, group: bool) -> int:
        if self.container is not None:
            return self._seize_helper(self.container.init_pid, own=False)
        exe = shutil.which("sleep") or "/bin/sleep"
        kw = {"setsid": True} if session else {"setpgroup": 0} if group else {}
        try:
            pid = os.posix_spawn(exe, [exe, "infinity"], os.environ, **kw)
        except OSError as e:
            raise KernelError(f"spawn helper {exe}", e.errno, step="spawn helper") from None
        return self._seize_helper(pid, own=True)

    def _seize_helper(self, pid: int, own: bool) -> int:
        """Seize and stop the helper; one we spawned ourselves dies if that fails (a
        container's is the container's to end)."""
        try:
            ptrace.seize(pid, OPTIONS)
            ptrace.interrupt(pid)
            ptrace.wait(pid)
        except CkptError:
            if own:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
        self.traced.append(pid)
        return pid

    def _prepare_helper(self, pid: int) -> Injector:
        """Scratch page with our syscall insn, no descriptors, no rseq, a pidfd of us."""
        inj = Injector(pid)
        conf = ptrace.get_rseq(pid)
        if conf.rseq_abi_pointer:
            inj.call(NR["rseq"], conf.rseq_abi_pointer, conf.rseq_abi_size,
                     RSEQ_FLAG_UNREGISTER, conf.signature, step="unregister helper rseq")
        s = self.scratch
        got = inj.call(NR["mmap"], s, SCRATCH_SIZE, PROT_RWX,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, 2**64 - 1, 0,
                       step="map scratch page")
        if got != s:
            raise RestoreFailed(f"scratch page landed at {got:#x}, not {s:#x}", step="map scratch page")
        inj.write(s, inject.SYSCALL_INSN)
        inj.use_syscall_at(s)
        inj.use_scratch(s + DATA_OFF, SCRATCH_SIZE - DATA_OFF)
        inj.call(NR["close_range"], 0, CLOSE_ALL, 0, step="close helper descriptors")
        fd = inj.call(NR["pidfd_open"], os.getpid(), 0, step="pidfd_open restorer")
        if fd != self.pidfd_slot:
            inj.call(NR["dup3"], fd, self.pidfd_slot, O_CLOEXEC, step="place pidfd")
            inj.call(NR["close"], fd, step="place pidfd")
        xs = ptrace.get_xstate(pid)
        self.xcr0, self.xsize = xsave.sw_bytes(xs)[0], len(xs)
        return inj

    def _free_fd(self) -> int:
        used = {fdi.fd for t in self.plan.tasks for fdi in t.fdinfo}
        return next(n for n in range(len(used) + 1) if n not in used)

    def _create_tree(self) -> None:
        root = self.plan.tasks[0]
        default = not self.keep_pids
        session = default and root.sid == root.pid
        group = default and not session and root.pgid == root.pid
        self.helper = self._spawn_helper(session, group)
        hinj = self._prepare_helper(self.helper)
        if self.container is not None and (session or group):   # posix_spawn did it otherwise
            hinj.call(NR["setsid"] if session else NR["setpgid"], 0, 0, step="helper session")
        first = None             # the first task of a new pid namespace
        if default:
            self.live[root.pid] = self._adopt(root, self.helper, self.helper, hinj)
            self._ctty(self.live[root.pid], foreground=False)
            self.created.append(self.helper)
            self.helper = 0
        elif self.pidns and root.pid == 1:
            self._fork(root, hinj, CLONE_NEWPID, set_tid=False)
            first = self.live[root.pid].inj
        else:
            parent = hinj
            if self.pidns:
                self.init, parent = self._make_init(hinj)
                first = parent
            self._fork(root, parent, 0, set_tid=True)
        if first is not None and self.mount_proc:
            self._mount_proc(first)
        for t in self.plan.tasks[1:]:
            parent = self.live.get(t.ppid)
            if parent is None:
                raise RestoreFailed(f"parent {t.ppid} of task {t.pid} is not in the checkpoint",
                                    path=self._where(t.pid, "ppid"), step="create tasks")
            self._fork(t, parent.inj, 0, set_tid=self.keep_pids)
        if self.helper:     # the spawned helper only gave birth: it goes
            self._drop_helper(hinj)
        for t in self.plan.tasks:
            if t.zombie:
                self._make_zombie(self.live[t.pid])

    def _clone3(self, inj: Injector, flags: int, exit_signal: int, tid: int | None,
                step: str, path: str) -> int:
        inj.reset_scratch()
        set_tid = inj.put(struct.pack("<i", tid)) if tid else 0
        args = struct.pack("<11Q", flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid,
                           1 if tid else 0, 0)
        try:
            inj.call(NR["clone3"], inj.put(args), len(args), step=step, path=path)
        except KernelError as e:
            if e.errno == errno.EEXIST:
                raise RestoreFailed(f"pid {tid} is taken on this machine", path=path, step=step,
                                    err=e.errno) from None
            raise
        child = inj.last_child
        self.traced.append(child)
        _wait_new(child)
        return child

    def _fork(self, t: TaskPlan, parent: Injector, flags: int, set_tid: bool) -> None:
        path = self._where(t.pid)
        if table_owner(self.plan, t) is not None:
            flags |= CLONE_FILES        # one descriptor table with its parent, as recorded
        child = self._clone3(parent, flags, SIGCHLD, t.pid if set_tid else None,
                             "create task", path)
        self.created.append(child)
        inj = self._injector(child)
        live = self._adopt(t, child, t.pid if self.keep_pids else child, inj)
        self.live[t.pid] = live
        if t.sid == t.pid:
            inj.call(NR["setsid"], step="setsid", path=self._where(t.pid, "sid"))
            self._ctty(live, foreground=False)
        elif t.pgid == t.pid:
            inj.call(NR["setpgid"], 0, 0, step="setpgid", path=self._where(t.pid, "pgid"))
        elif t.pgid in self.live and t.pgid != self.plan.task(t.ppid).pgid:
            inj.call(NR["setpgid"], 0, self.live[t.pgid].ns_pid, step="setpgid",
                     path=self._where(t.pid, "pgid"))

    def _adopt(self, t: TaskPlan, host: int, ns_pid: int, inj: Injector) -> Live:
        live = Live(plan=t, pid=host, ns_pid=ns_pid)
        live.tids[t.pid] = host
        live.injs[host] = inj
        return live

    def _injector(self, tid: int) -> Injector:
        inj = Injector(tid, syscall_addr=self.scratch)
        inj.use_scratch(self.scratch + DATA_OFF, SCRATCH_SIZE - DATA_OFF)
        return inj

    def _make_init(self, hinj: Injector) -> tuple[int, Injector]:
        init = self._clone3(hinj, CLONE_NEWPID, SIGCHLD, None, "create pid namespace", "pidns")
        self.created.append(init)
        return init, self._injector(init)

    def _mount_proc(self, inj: Injector) -> None:
        """/proc of the new pid namespace, mounted by a task inside it, in the container's
        own mount namespace (a container's tasks read their own pids there)."""
        inj.reset_scratch()
        proc = inj.put(b"proc\0")
        inj.call(NR_MOUNT, proc, inj.put(b"/proc\0"), proc, MS_NOSUID | MS_NODEV | MS_NOEXEC, 0,
                 step="mount /proc of the new pid namespace", path="isolation/own")

    def _drop_helper(self, hinj: Injector) -> None:
        pid = self.helper
        ptrace.detach(pid)
        self.traced.remove(pid)
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass     # a container's helper may be its namespace init's child: that one reaps
        self.helper = 0

    def _make_zombie(self, live: Live) -> None:
        """A task that had exited: it exits again with the same status, unreaped."""
        code = live.plan.core.tc.exit_code
        inj = live.inj
        regs = dict(ptrace.get_regs(live.pid))
        if code & 0x7F:
            sig = code & 0x7F
            inj.reset_scratch()
            inj.call(NR["rt_sigaction"], sig, inj.put(bytes(32)), 0, 8, step="zombie signal")
            tid = inj.call(NR["gettid"], step="zombie")
            regs.update(rax=NR["tkill"], rdi=tid, rsi=sig)
        else:
            regs.update(rax=NR["exit_group"], rdi=(code >> 8) & 0xFF)
        regs.update(rip=self.scratch, orig_rax=2**64 - 1)
        ptrace.set_regs(live.pid, regs)
        ptrace.detach(live.pid)
        self.traced.remove(live.pid)

    # -- one task -------------------------------------------------------------------------
    def _restore_task(self, live: Live) -> None:
        self._rlimits(live)
        filling = self._memory(live)
        try:
            self._finish_task(live, rlimits=False, filling=filling)
        except BaseException as e:
            filling.cancel()
            if filling.error is not None and filling.error is not e:
                self.log(f"note: the page fill of {self._where(live.plan.pid)} failed too: "
                         f"{filling.error}")
            raise

    def _finish_task(self, live: Live, *, rlimits: bool = True, filling=None) -> None:
        """Everything of a task after its memory (prepare.py builds the memory ahead).
        `filling` (the task's page fill, still copying on its own threads) is joined once
        nothing left touches the task's memory: descriptors, fs, signal handlers, names and
        threads go in while pages are copied; per-thread state (rseq writes to its area)
        comes after."""
        t, inj = live.plan, live.inj
        if rlimits:
            self._rlimits(live)
        if table_owner(self.plan, t) is None:    # a shared table got them from its owner
            self._fds(live)
        self._ctty(live, foreground=True)
        self._fs(live)
        self._signals(live)
        self._task_misc(live)
        self._threads(live)
        if filling is not None:
            self._end_fill(live, filling)
        for old_tid, tid in live.tids.items():
            self._thread_state(live, old_tid, live.injs[tid])
        if t.mm.HasField("dumpable"):    # after the creds: a change of euid resets it
            inj.call(NR["prctl"], PR_SET_DUMPABLE, t.mm.dumpable, 0, 0, 0, step="dumpable",
                     path=self._where(t.pid, "mm/dumpable"))
        inj.reset_scratch()
        if self._last_sharer(t):     # the slot is in the table: its last user closes it
            inj.call(NR["close"], self.pidfd_slot, step="close restorer pidfd")
        if self.init and t.pid == self.plan.tasks[0].pid:
            self._start_init()

    def _last_sharer(self, t: TaskPlan) -> bool:
        """No task restored after `t` uses its descriptor table."""
        later = self.plan.tasks[[u is t for u in self.plan.tasks].index(True) + 1:]
        return not any(table_owner(self.plan, u) is not None and u.files_id == t.files_id
                       for u in later if not u.zombie)

    def _memory(self, live: Live) -> memory.Fillings:
        """Map everything and start the page fill; the maps made writable only for it are
        remembered in live.added_write (their protections come back after the join).
        Private anonymous maps (nearly all the memory) are mapped first and their copy
        starts at once; the file and shared maps are mapped while it runs."""
        t, inj, s = live.plan, live.inj, self.scratch
        step = "unmap helper"
        inj.call(NR["munmap"], 0, s, step=step)
        inj.call(NR["munmap"], s + SCRATCH_SIZE, TASK_END - s - SCRATCH_SIZE, step=step)
        self._vdso(live)
        self._mm_map(live)
        fillings, task_fds = memory.Fillings(), {}
        try:
            for later, group in enumerate(_anon_first(t.vmas)):
                fill, ranges = [], {}
                for vma in group:
                    got = self._map(live, vma, task_fds)
                    if got:
                        fill.append(vma)
                        ranges[vma.start] = got
                        if not vma.prot & PROT_WRITE:
                            live.added_write.append(vma)
                if not later:
                    self._fill_t0 = time.monotonic()
                    self.timing.setdefault("fill_start", self._fill_t0 - self._t0)
                fillings.append(memory.start_fill(
                    self.src, t.pid, live.pid, fill,
                    lambda v: self._where(t.pid, f"maps/{v.start:x}-{v.end:x}"), inj=inj,
                    populate=self.populate, uffd=self.uffd, ranges=ranges,
                    background=bool(later)))
            for fd in task_fds.values():
                inj.call(NR["close"], fd, step="close map files")
        except BaseException:
            fillings.cancel()
            raise
        finally:
            self.populate.clear()
            self.uffd.clear()
        return fillings

    def _end_fill(self, live: Live, filling: memory.Fillings) -> None:
        """Every page in place (the copy's error, naming its map, is raised here), maps
        unregistered, then the protections the fill had to widen."""
        t, inj = live.plan, live.inj
        t0 = time.monotonic()
        n = filling.join()
        now = time.monotonic()
        self.timing["fill"] = self.timing.get("fill", 0) + now - self._fill_t0
        self.timing["fill_wait"] = self.timing.get("fill_wait", 0) + now - t0
        self.timing["bytes"] = self.timing.get("bytes", 0) + n
        for vma in live.added_write:
            inj.call(NR["mprotect"], vma.start, vma.end - vma.start, vma.prot, step="mprotect",
                     path=self._where(t.pid, f"maps/{vma.start:x}-{vma.end:x}/prot"))
        live.added_write.clear()

    def _vdso(self, live: Live) -> None:
        kinds = vdso_layout(live.plan)
        if "[vdso]" not in kinds:
            return
        base = min(lo for lo, _ in kinds.values())
        path = self._where(live.plan.pid, "maps")
        live.inj.call(NR["arch_prctl"], ARCH_MAP_VDSO_64, base, step="place vDSO", path=path)
        got = inject._vdso_range(live.pid)
        if not got or got[0] != kinds["[vdso]"][0]:
            raise RestoreFailed(f"the vDSO landed at {got and hex(got[0])}, the checkpoint had it "
                                f"at {kinds['[vdso]'][0]:#x}", path=path, step="place vDSO")

    def _mm_map(self, live: Live) -> None:
        """mm fields, auxv and /proc/PID/exe in one prctl(PR_SET_MM_MAP). Done while no file
        is mapped: the kernel refuses to change exe while the old one is still mapped."""
        t, inj, mm = live.plan, live.inj, live.plan.mm
        inj.reset_scratch()
        efd = self._take(inj, self._mapped_file(mm.exe_file_id, os.O_RDONLY,
                                                self._where(t.pid, "exe"), "exe"))
        auxv = struct.pack(f"<{len(mm.mm_saved_auxv)}Q", *mm.mm_saved_auxv)
        auxv_addr = inj.put(auxv) if auxv else 0
        fields = (mm.mm_start_code, mm.mm_end_code, mm.mm_start_data, mm.mm_end_data,
                  mm.mm_start_brk, mm.mm_brk, mm.mm_start_stack, mm.mm_arg_start, mm.mm_arg_end,
                  mm.mm_env_start, mm.mm_env_end, auxv_addr)
        arg = inj.put(struct.pack("<12QII", *fields, len(auxv), efd))
        inj.call(NR["prctl"], PR_SET_MM, PR_SET_MM_MAP, arg, 104, 0, step="PR_SET_MM_MAP",
                 path=self._where(t.pid, "mm"))
        inj.call(NR["close"], efd, step="PR_SET_MM_MAP")

    def _map(self, live: Live, vma, task_fds: dict) -> list:
        """mmap one VMA at its place; the page ranges to write into it (it is then mapped
        writable until they are in), [] if none. Shared file maps keep their data in the file;
        a shared anonymous object is filled once, by the first task that maps it."""
        t, inj = live.plan, live.inj
        path = self._where(t.pid, f"maps/{vma.start:x}-{vma.end:x}")
        flags = MAP_FIXED | (vma.flags & MAP_KEEP)
        fd, off, fill = 2**64 - 1, 0, True
        if vma.status & (V["VMA_FILE_PRIVATE"] | V["VMA_FILE_SHARED"]):
            shared = vma.status & V["VMA_FILE_SHARED"]
            wr = vma.prot & PROT_WRITE or (vma.HasField("fdflags") and vma.fdflags & 3 == os.O_RDWR)
            mode = os.O_RDWR if shared and wr else os.O_RDONLY
            if vma.status & V["VMA_AREA_MEMFD"]:      # the memfd its descriptors use
                memfd = self.files.memfd(self.src.file(vma.shmid).memfd, path + "/memfd")
                local = self.files.path(f"/proc/self/fd/{memfd}", mode | os.O_CLOEXEC,
                                        where=path + "/memfd", step="open mapped memfd")
            else:
                local = self._mapped_file(vma.shmid, mode, path + "/path", "open mapped file")
            flags |= MAP_SHARED if shared else MAP_PRIVATE
            fd, off, fill = self._task_fd(inj, local, task_fds), vma.pgoff, not shared
        elif vma.status & V["VMA_ANON_SHARED"]:
            key = ("shm", vma.shmid) if vma.shmid else ("shm", t.pid, vma.start)
            local, fill = self.files.shmem(key, vma.pgoff + vma.end - vma.start, path)
            flags |= MAP_SHARED
            fd, off = self._task_fd(inj, local, task_fds), vma.pgoff
        else:
            flags |= MAP_PRIVATE | MAP_ANONYMOUS
        ranges = self.src.page_ranges(t.pid, vma) if fill else []
        fill = bool(ranges)
        prot = vma.prot | (PROT_WRITE if fill else 0)
        if fill and flags & MAP_ANONYMOUS and memory.USE_UFFD:
            self.uffd.add(vma.start)     # fresh and private: UFFDIO_COPY (memory.fill)
        elif 2 * sum(r.end - r.start for r in ranges) >= vma.end - vma.start:
            # Mostly filled anyway: the task faults its pages in itself, ahead of the copy
            # (memory.fill); one by one inside process_vm_writev they cost four times more.
            self.populate.add(vma.start)
        inj.call(NR["mmap"], vma.start, vma.end - vma.start, prot, flags, fd, off, step="mmap",
                 path=path)
        for name, bit in F.MADV_BITS.items():
            if vma.madv & bit:
                inj.call(NR["madvise"], vma.start, vma.end - vma.start, F.MADV[name],
                         step=f"madvise {name}", path=path + "/madv")
        return ranges

    def _mapped_file(self, file_id: int, mode: int, where: str, step: str) -> int:
        """A restorer descriptor of a mapped file or exe, opened `mode`. A deleted one is
        re-made from its saved contents once for the whole restore (FileTable.ghost: made,
        unlinked again, held O_PATH), so every map, task and descriptor using it shares one
        file, which /proc shows as "(deleted)" as before; each opens it through
        /proc/self/fd in its own mode."""
        if not self.src.file_deleted(file_id):
            return self.files.path(self.src.file(file_id).reg.name, mode | os.O_CLOEXEC,
                                   where=where, step=step)
        ghost = self.files.ghost(file_id, where=where)
        return self.files.path(f"/proc/self/fd/{ghost}", mode | os.O_CLOEXEC, where=where,
                               step=step)

    def _task_fd(self, inj: Injector, local: int, task_fds: dict) -> int:
        if local not in task_fds:
            task_fds[local] = self._take(inj, local)
        return task_fds[local]

    def _sockets_netns(self, pid: int) -> None:
        """Sockets belong to the network namespace they are made in: a task restored into a
        namespace of its own (a container's) gets them made in that one."""
        ns = f"/proc/{pid}/ns/net"
        if os.stat(ns).st_ino != os.stat("/proc/self/ns/net").st_ino:
            self.files.use_netns(ns)

    def _take(self, inj: Injector, local: int) -> int:
        """The restorer's descriptor `local` as a new descriptor of the task (close-on-exec)."""
        return inj.call(NR["pidfd_getfd"], self.pidfd_slot, local, 0, step="pidfd_getfd")

    def _fds(self, live: Live) -> None:
        t, inj = live.plan, live.inj
        if any(fdi.type in SOCKET_KINDS for fdi in t.fdinfo):
            self._sockets_netns(live.pid)
        for fdi in t.fdinfo:
            path = self._where(t.pid, f"fds/{fdi.fd}")
            x = self._take(inj, self.files.description(fdi.id, where=path))
            cloexec = fdi.flags & F.FD_CLOEXEC
            if x == fdi.fd:
                inj.call(NR["fcntl"], x, F_SETFD, cloexec, step="install descriptor", path=path)
            else:
                inj.call(NR["dup3"], x, fdi.fd, O_CLOEXEC if cloexec else 0,
                         step="install descriptor", path=path)
                inj.call(NR["close"], x, step="install descriptor", path=path)

    def _ctty(self, live: Live, *, foreground: bool) -> None:
        """A session leader that had a controlling terminal gets it again: right after its
        setsid (foreground=False; the tasks it forks then inherit it, as they did), and once
        every group exists and its fds are in (foreground=True) the recorded foreground
        group. A member of a session whose leader is outside the tree cannot join that
        session: its terminal stays a plain descriptor."""
        t = live.plan
        info = self.src.task_tty(t.pid) if t.sid == t.pid else {}
        if "ctty" not in info or (foreground and not info.get("tty_pgrp")):
            return
        where = self._where(t.pid, "ctty")
        major, _, minor = str(info["ctty"]).partition(":")
        try:
            rdev = os.makedev(int(major), int(minor))
        except ValueError:
            raise RestoreFailed(f"ctty {info['ctty']!r} is not major:minor", path=where,
                                step="ctty") from None
        if foreground:
            group = self.live.get(int(info["tty_pgrp"]))
            if group is None or group.plan.sid != t.sid or group.plan.pgid != group.plan.pid:
                raise RestoreFailed(f"foreground group {info['tty_pgrp']} is not a group of "
                                    f"session {t.sid} in the checkpoint",
                                    path=self._where(t.pid, "tty_pgrp"), step="ctty")
        local = restore_files.open_ctty(rdev, where)
        try:
            x = self._take(live.inj, local)
        finally:
            os.close(local)
        if foreground:
            restore_files.set_foreground(live.inj, x, group.ns_pid,
                                         self._where(t.pid, "tty_pgrp"))
        else:
            restore_files.take_ctty(live.inj, x, where)
        live.inj.call(NR["close"], x, step="ctty", path=where)

    def _fs(self, live: Live) -> None:
        t, inj = live.plan, live.inj
        inj.reset_scratch()
        cwd = self.src.file(t.fs.cwd_id).reg.name
        root = self.src.file(t.fs.root_id).reg.name
        x = self._take(inj, self.files.path(cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                            where=self._where(t.pid, "cwd"), step="cwd"))
        inj.call(NR["fchdir"], x, step="chdir", path=self._where(t.pid, "cwd"))
        inj.call(NR["close"], x, step="chdir")
        if root != "/":
            inj.call(NR["chroot"], inj.put(root.encode() + b"\0"), step="chroot",
                     path=self._where(t.pid, "root"))
        if t.fs.HasField("umask") and \
                t.fs.umask != _status_fields(live.pid, ("Umask",), 8, "umask")[0]:
            inj.call(NR["umask"], t.fs.umask, step="umask", path=self._where(t.pid, "umask"))

    def _rlimits(self, live: Live) -> None:
        """Each limit that differs from the helper's (inherited from us: usually none), set
        by this process with prlimit(pid) — no round trip through the task; an injected
        prlimit64 only where ours is refused (another user namespace)."""
        t = live.plan
        for i, lim in enumerate(t.core.tc.rlimits.rlimits):
            name = F.RLIMITS[i]
            cur, mx = lim.cur, lim.max
            now = tuple(_rlim_in(v) for v in resource.prlimit(live.pid, i))
            if mx > now[1]:
                self.log(f"warning: {self._where(t.pid, 'rlimits/' + name)}: hard limit {mx} "
                         f"above this machine's {now[1]}: kept at {now[1]}")
                mx, cur = now[1], min(cur, now[1])
            if (cur, mx) == now:
                continue
            try:
                resource.prlimit(live.pid, i, (_rlim_out(cur), _rlim_out(mx)))
                continue
            except PermissionError:
                pass
            except OSError as e:
                self.log(f"warning: {self._where(t.pid, 'rlimits/' + name)}: prlimit failed "
                         f"({errno.errorcode.get(e.errno, e.errno)}): left as is")
                continue
            inj = live.inj
            inj.reset_scratch()
            ret = inj.syscall(NR["prlimit64"], 0, i, inj.put(struct.pack("<QQ", cur, mx)), 0)
            if ret < 0:
                self.log(f"warning: {self._where(t.pid, 'rlimits/' + name)}: prlimit failed "
                         f"({errno.errorcode.get(-ret, -ret)}): left as is")

    def _signals(self, live: Live) -> None:
        """Signal handlers that differ from the helper's (one rt_sigaction each: a program
        usually sets a handful of its 62), then interval timers."""
        t, inj = live.plan, live.inj
        acts = list(t.core.tc.sigactions)
        if len(acts) != len(F.SIGACTION_SIGNALS):
            raise RestoreFailed(f"{len(acts)} sigactions, want {len(F.SIGACTION_SIGNALS)}",
                                path=self._where(t.pid, "sigactions"), step="sigactions")
        ignored, caught = _dispositions(live.pid)
        inj.reset_scratch()
        for sig, a in zip(F.SIGACTION_SIGNALS, acts):
            bit = 1 << (sig - 1)
            now = (SIG_IGN if ignored & bit else SIG_DFL, 0, 0, 0)
            if not caught & bit and (a.sigaction, a.flags, a.restorer, a.mask) == now:
                continue
            arg = inj.put(struct.pack("<4Q", a.sigaction, a.flags, a.restorer, a.mask))
            inj.call(NR["rt_sigaction"], sig, arg, 0, 8, step="rt_sigaction",
                     path=self._where(t.pid, f"sigactions/{F.SIGNAL_NAMES[sig]}"))
        timers = t.core.tc.timers
        for which, name in enumerate(("real", "virt", "prof")):
            if t.core.tc.HasField("timers") and timers.HasField(name):
                it = getattr(timers, name)
                if it.isec or it.iusec or it.vsec or it.vusec:
                    arg = inj.put(struct.pack("<4q", it.isec, it.iusec, it.vsec, it.vusec))
                    inj.call(NR["setitimer"], which, arg, 0, step="setitimer",
                             path=self._where(t.pid, f"itimers/{name}"))

    def _task_misc(self, live: Live) -> None:
        t, inj, tc = live.plan, live.inj, live.plan.core.tc
        path = self._where(t.pid)
        if tc.personality != _personality(live.pid):
            inj.call(NR["personality"], tc.personality, step="personality", path=path)
        if tc.child_subreaper:
            inj.call(NR["prctl"], PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, step="subreaper", path=path)

    def _threads(self, live: Live) -> None:
        t = live.plan
        for old in t.threads:
            if old == t.pid:
                continue
            tid = self._clone3(live.inj, THREAD_FLAGS, 0, old if self.keep_pids else None,
                               "create thread", self._where(t.pid, f"threads/{old}"))
            live.tids[old] = tid
            live.injs[tid] = self._injector(tid)

    def _thread_state(self, live: Live, old: int, inj: Injector) -> None:
        t = live.plan
        core = t.cores[old]
        tcore = core.thread_core
        path = self._where(t.pid, f"threads/{old}")
        inj.reset_scratch()
        if tcore.futex_rla:
            inj.call(NR["set_robust_list"], tcore.futex_rla, tcore.futex_rla_len,
                     step="set_robust_list", path=path + "/futex_rla")
        inj.call(NR["set_tid_address"], core.thread_info.clear_tid_addr, step="set_tid_address",
                 path=path + "/clear_tid_addr")
        if tcore.HasField("rseq_entry") and tcore.rseq_entry.rseq_abi_pointer:
            r = tcore.rseq_entry
            inj.call(NR["rseq"], r.rseq_abi_pointer, r.rseq_abi_size, 0, r.signature,
                     step="rseq", path=path + "/rseq")
        if tcore.HasField("sas") and not tcore.sas.ss_flags & F.SS_FLAGS["SS_DISABLE"]:
            ss = inj.put(struct.pack("<QI4xQ", tcore.sas.ss_sp, tcore.sas.ss_flags
                                     & ~F.SS_FLAGS["SS_ONSTACK"], tcore.sas.ss_size))
            inj.call(NR["sigaltstack"], ss, 0, step="sigaltstack", path=path + "/sigaltstack")
        comm = (t.core.tc.comm if old == t.pid else tcore.comm) or t.core.tc.comm
        inj.call(NR["prctl"], PR_SET_NAME, inj.put(comm.encode()[:15] + b"\0"), 0, 0, 0,
                 step="comm", path=path + "/comm")
        if tcore.pdeath_sig:
            inj.call(NR["prctl"], PR_SET_PDEATHSIG, tcore.pdeath_sig, 0, 0, 0,
                     step="pdeath_sig", path=path)
        self._creds(inj, t.core.thread_core.creds if old == t.pid or not tcore.HasField("creds")
                    else tcore.creds, path)

    def _creds(self, inj: Injector, c, path: str) -> None:
        """Groups, gids, capabilities, uids, securebits: last, since dropping root ends what
        we may do. The order is forced by the kernel's rules (the thread starts as root with
        the helper's full sets, and CRIU's restorer keeps to the same constraints):
        inheritable first (it may not exceed the bounding set, which is trimmed later),
        ambient raised while everything is still permitted, bounding set trimmed (needs
        CAP_SETPCAP), SECBIT_NO_SETUID_FIXUP so that changing uids leaves the sets alone,
        uids, the recorded securebits (CAP_SETPCAP is still effective), then capset of the
        recorded effective/permitted/inheritable, which only lowers. Each step is skipped
        when the helper already holds the recorded value."""
        ids = task_ids(inj.tid)
        groups = list(c.groups)
        if sorted(groups) != ids["groups"]:
            arg = inj.put(struct.pack(f"<{len(groups)}I", *groups)) if groups else 0
            inj.call(NR["setgroups"], len(groups), arg, step="setgroups",
                     path=path + "/creds/groups")
        if [c.gid, c.egid, c.sgid, c.fsgid] != ids["gid"]:
            inj.call(NR["setresgid"], c.gid, c.egid, c.sgid, step="setresgid",
                     path=path + "/creds")
            inj.call(NR["setfsgid"], c.fsgid)
        now, want = task_caps(inj.tid), creds_caps(c)
        where_ = path + "/creds"
        if want["inh"] != now["inh"]:
            self._capset(inj, now["eff"], now["prm"], want["inh"], where_ + "/cap_inh")
        if now["amb"] & ~want["amb"]:
            inj.call(NR["prctl"], PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0,
                     step="clear ambient capabilities", path=where_ + "/cap_amb")
            now["amb"] = 0
        for cap in _bits(want["amb"] & ~now["amb"]):
            inj.call(NR["prctl"], PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0,
                     step=f"raise ambient capability {cap}", path=where_ + "/cap_amb")
        for cap in _bits(now["bnd"] & ~want["bnd"]):
            inj.call(NR["prctl"], PR_CAPBSET_DROP, cap, 0, 0, 0,
                     step=f"drop capability {cap} from the bounding set", path=where_ + "/cap_bnd")
        secbits = inj.call(NR["prctl"], PR_GET_SECUREBITS, 0, 0, 0, 0, step="securebits")
        uids = (c.uid, c.euid, c.suid, c.fsuid)
        if uids != (0, 0, 0, 0) and not secbits & SECBIT_NO_SETUID_FIXUP:
            secbits |= SECBIT_NO_SETUID_FIXUP
            inj.call(NR["prctl"], PR_SET_SECUREBITS, secbits, 0, 0, 0,
                     step="keep capabilities across setresuid", path=where_ + "/secbits")
        if list(uids) != ids["uid"]:
            inj.call(NR["setresuid"], c.uid, c.euid, c.suid, step="setresuid", path=where_)
            inj.call(NR["setfsuid"], c.fsuid)
        if c.secbits != secbits:
            inj.call(NR["prctl"], PR_SET_SECUREBITS, c.secbits, 0, 0, 0, step="securebits",
                     path=where_ + "/secbits")
        if (want["eff"], want["prm"], want["inh"]) != (now["eff"], now["prm"], want["inh"]):
            self._capset(inj, want["eff"], want["prm"], want["inh"], where_ + "/cap_eff")
        if c.HasField("no_new_privs") and c.no_new_privs:
            inj.call(NR["prctl"], PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, step="no_new_privs",
                     path=where_ + "/no_new_privs")

    @staticmethod
    def _capset(inj: Injector, eff: int, prm: int, inh: int, path: str) -> None:
        """capset (version 3: two 32-bit words per set) on the injecting thread itself."""
        m = 0xFFFFFFFF
        hdr = inj.put(struct.pack("<Ii", CAP_V3, 0))
        data = inj.put(struct.pack("<6I", eff & m, prm & m, inh & m, eff >> 32, prm >> 32,
                                   inh >> 32))
        inj.call(NR["capset"], hdr, data, step="capset", path=path)

    def _start_init(self) -> None:
        """The namespace's init (a copy of the helper) runs the reaper loop from now on."""
        inj = self._injector(self.init)
        inj.call(NR["close"], self.pidfd_slot, step="init")
        inj.call(NR["prctl"], PR_SET_NAME, inj.put(b"ckptfs-init\0"), 0, 0, 0, step="init")
        inj.write(self.scratch + 0x40, INIT_CODE)
        regs = ptrace.get_regs(self.init)
        regs.update(rip=self.scratch + 0x40, orig_rax=2**64 - 1)
        ptrace.set_regs(self.init, regs)

    # -- last: registers, then everyone runs --------------------------------------------
    def _release_all(self) -> None:
        stops = []
        for live in self.live.values():
            if live.plan.zombie:
                continue
            self._queue_and_time(live)
            for old, tid in live.tids.items():
                core = live.plan.cores[old]
                fp = xsave.join(core.thread_info.fpregs, self.xcr0, self.xsize)
                ptrace.set_xstate(tid, fp)
                pending: list[int] = []
                inject.park_with_regs(tid, restart_regs(regs_of(core)), pending)
                if pending:
                    self.log(f"note: signals {pending} arrived during restore of {tid}: dropped")
                # The real mask only now: parking runs the thread, which would otherwise
                # meet the signals just queued (and the tracer would have to drop them).
                mask = core.tc.blk_sigset if old == live.plan.pid else core.thread_core.blk_sigset
                ptrace.set_sigmask(tid, mask)
            if live.plan.core.tc.task_state == F.TASK_STATES["stopped"]:
                stops.append((live.pid, live.plan.core.tc.stop_signo or signal.SIGSTOP))
        order = list(reversed(self.traced))
        for tid in order:
            ptrace.detach(tid)
        self.traced.clear()
        for pid, sig in stops:
            os.kill(pid, sig)

    def _queue_and_time(self, live: Live) -> None:
        """With every thread blocking every signal: POSIX timers, pending signals (restore/
        signals.py), then the scratch page goes (the last injected call of the task)."""
        t, inj, tc = live.plan, live.inj, live.plan.core.tc
        for tid in live.tids.values():
            ptrace.set_sigmask(tid, signals.ALL_SIGNALS)
        if tc.HasField("timers"):
            signals.create_timers(inj, tc.timers.posix, lambda old: self._ns_tid(live, old),
                                  self._where(t.pid, "timers"))
        signals.queue_pending(inj, [e.siginfo for e in tc.signals_s.signals], shared=True,
                              where=self._where(t.pid, "pending"), log=self.log)
        for old, tid in live.tids.items():
            queue = t.cores[old].thread_core.signals_p.signals
            signals.queue_pending(live.injs[tid], [e.siginfo for e in queue], shared=False,
                                  where=self._where(t.pid, f"threads/{old}/pending"), log=self.log)
        inj.reset_scratch()
        inj.call(NR["munmap"], self.scratch, SCRATCH_SIZE, step="unmap scratch page",
                 path=self._where(t.pid))

    def _ns_tid(self, live: Live, old: int) -> int | None:
        """Thread `old` of the checkpoint as its restored task sees it."""
        if old not in live.tids:
            return None
        return old if self.keep_pids else live.tids[old]


def _rlim_in(v: int) -> int:
    """resource.prlimit's value in the tree's form (infinity is 2**64-1, not -1)."""
    return F.RLIM_INFINITY if v == resource.RLIM_INFINITY else v


def _rlim_out(v: int) -> int:
    return resource.RLIM_INFINITY if v == F.RLIM_INFINITY else v


def _status_fields(pid: int, names: tuple[str, ...], base: int, step: str) -> list[int]:
    """Numeric fields of /proc/PID/status (what the helper holds now: skipping a call that
    would set the same value saves a round trip through the task)."""
    path = f"/proc/{pid}/status"
    try:
        with open(path) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return [int(fields[n], base) for n in names]
    except FileNotFoundError:
        raise ProcessGone(f"task {pid} is gone", path=path, step=step) from None
    except (KeyError, ValueError):
        raise RestoreFailed(f"no {'/'.join(names)} line", path=path, step=step) from None


def _personality(pid: int) -> int:
    path = f"/proc/{pid}/personality"
    try:
        with open(path) as f:
            return int(f.read(), 16)
    except FileNotFoundError:
        raise ProcessGone(f"task {pid} is gone", path=path, step="personality") from None


def _dispositions(pid: int) -> tuple[int, int]:
    """(ignored, caught) signal masks of a task. After exec every action the kernel keeps
    is SIG_IGN or SIG_DFL with no flags, mask or restorer (flush_signal_handlers), so a
    task that is not catching a signal holds exactly one of those two for it."""
    ignored, caught = _status_fields(pid, ("SigIgn", "SigCgt"), 16, "sigactions")
    return ignored, caught


def task_ids(tid: int) -> dict[str, list[int]]:
    """A thread's uids and gids (real, effective, saved, fs) and sorted groups now."""
    path = f"/proc/{tid}/status"
    try:
        with open(path) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"uid": [int(x) for x in fields["Uid"].split()],
                "gid": [int(x) for x in fields["Gid"].split()],
                "groups": sorted(int(x) for x in fields["Groups"].split())}
    except FileNotFoundError:
        raise ProcessGone(f"thread {tid} is gone", path=path, step="creds") from None
    except (KeyError, ValueError):
        raise RestoreFailed("no Uid/Gid/Groups lines", path=path, step="creds") from None


def task_caps(tid: int) -> dict[str, int]:
    """A thread's capability sets now (/proc/TID/status)."""
    try:
        return caps_of(str(tid))
    except FileNotFoundError:
        raise ProcessGone(f"thread {tid} is gone", path=f"/proc/{tid}/status", step="creds") from None
    except (KeyError, ValueError):
        raise RestoreFailed("no capability lines", path=f"/proc/{tid}/status", step="creds") from None


def creds_caps(c) -> dict[str, int]:
    """A creds_entry's capability sets, limited to the capabilities this kernel has
    (plan.check_creds warns about any beyond)."""
    valid = (1 << (cap_last() + 1)) - 1
    return {k: v & valid for k, v in plan_creds_caps(c).items()}


def _anon_first(vmas) -> tuple[list, list]:
    """(private anonymous maps, every other map but the vDSO's), in address order each."""
    shared = V["VMA_FILE_PRIVATE"] | V["VMA_FILE_SHARED"] | V["VMA_ANON_SHARED"]
    mine = [v for v in vmas if not v.status & SPECIAL]
    return [v for v in mine if not v.status & shared], [v for v in mine if v.status & shared]


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _wait_new(tid: int) -> None:
    """The first stop of an auto-attached new task."""
    _, status = ptrace.wait(tid)
    if not os.WIFSTOPPED(status):
        raise RestoreFailed(f"new task {tid} died at birth (status {status:#x})", step="create tasks")


def _reap(tid: int) -> None:
    for _ in range(100):
        try:
            got, status = os.waitpid(tid, 0x40000000 | os.WNOHANG)   # __WALL
        except ChildProcessError:
            return
        if got and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            return
        time.sleep(0.005)
