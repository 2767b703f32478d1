"""Restore on FreeBSD: a Linux process tree comes back to life under the Linuxulator in a jail.

The ABI of a FreeBSD process is fixed at exec, so every restored process starts as a
Linux-branded image: a small Linux helper (`Target.helper`, run under linux64.ko inside the
jail) is started and attached with PT_ATTACH. From then on the restorer works like the Linux
restorer: it makes the helper execute *Linux* system calls (Linux numbers, flags and errnos;
the Linuxulator translates them) one at a time by writing `syscall; int3` at a scratch address
in the helper's own code page, loading registers (PT_SETREGS) and continuing to the trap.
Memory contents go in with PT_IO, registers with PT_SETREGS + PT_SETFSBASE/PT_SETGSBASE, FPU
with PT_SETXSTATE. All kernel-level calls go through oskit.freebsd (`Target.kit`).

Order: check the binary (a native FreeBSD binary cannot come from Linux, nor go back); jail
(jail_set) and RCTL rules; the root helper, where descriptions, pipes and anonymous memory
that several processes share are made (so the forks inherit them); the tree: each child by
an injected Linux fork in its parent's helper (PT_FOLLOW_FORK makes it traced from birth),
setsid where the process led its session, then process groups; per process: descriptors,
the break (brk), memory, cwd/root/umask, rlimits, sigactions, each extra thread by an
injected clone (with that thread's signal mask and clear-tid address, then PT_SUSPEND so
later injections do not run it), the leader's mask, set_tid_address and robust list,
credentials last;
then registers, fs/gs base and XSAVE per thread (by lwp id), PT_RESUME, PT_DETACH.

All or nothing: on any error every helper created so far is killed and the jail removed;
the original error (errno, step, file) is raised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import struct
import subprocess

from .. import flags as L, sockets as S, xsave as X
from ..errors import KernelError, RestoreFailed, Unsupported
from ..oskit import freebsd as kit_default
from ..translate import LossLog
from ..translate.freebsd import convert, elf, fdkinds as K, fpu as FPU, regs as G

# Linux x86_64 system call numbers (the Linuxulator's amd64 table uses Linux's numbering).
NR = {"read": 0, "write": 1, "open": 2, "close": 3, "lseek": 8, "mmap": 9, "mprotect": 10,
      "munmap": 11, "rt_sigaction": 13, "rt_sigprocmask": 14, "clone": 56, "fork": 57,
      "fcntl": 72, "chdir": 80, "umask": 95, "setpgid": 109, "setsid": 112,
      "setgroups": 116, "setresuid": 117, "setresgid": 119, "prctl": 157, "chroot": 161,
      "dup3": 292, "pipe2": 293, "prlimit64": 302, "unlink": 87, "fchmod": 91,
      "mknod": 133, "eventfd2": 290, "set_tid_address": 218,
      "ioctl": 16, "brk": 12, "set_robust_list": 273,
      "get_robust_list": 274, "socket": 41, "sendto": 44, "shutdown": 48, "bind": 49,
      "listen": 50, "socketpair": 53, "setsockopt": 54, "lstat": 6, "chmod": 90,
      "clock_gettime": 228, "epoll_ctl": 233, "timerfd_create": 283, "timerfd_settime": 286,
      "epoll_create1": 291, "memfd_create": 319}
ROBUST_LIST_HEAD = 24                # sizeof(struct linux_robust_list_head): the only length
#                                      linux_set_robust_list (linux_futex.c) accepts
ARG_REGS = ("r_rdi", "r_rsi", "r_rdx", "r_r10", "r_r8", "r_r9")
TRAP_CODE = b"\x0f\x05\xcc"          # syscall; int3
SIGTRAP = 5                          # FreeBSD
SIG_SETMASK = 2                      # Linux value
PR_SET_NAME = 15                     # Linux prctl; the Linuxulator sets the process's p_comm
PAGE = 4096
DATA_SIZE = PAGE                     # the helper's writable page used for arguments
# Linux clone flags for a thread; the Linuxulator's linux_clone_thread takes exactly these
# (plus the tid/TLS ones the restore does not need: registers are set by ptrace afterwards).
CLONE_THREAD_FLAGS = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000
#                    VM      FS      FILES   SIGHAND THREAD    SYSVSEM
# The address the kernel zeroes and futex-wakes when the thread exits (pthread_join waits on
# it): linux_clone_thread keeps it in the thread's emuldata (em->child_clear_tid), and
# linux_set_tid_address does the same for the calling (main) thread.
CLONE_CHILD_CLEARTID = 0x00200000
F_DUPFD_CLOEXEC, F_SETFL = 1030, 4   # Linux fcntl commands
OPEN_DROP = L.O_CLOEXEC | L.OPEN_FLAGS["O_CREAT"] | L.OPEN_FLAGS["O_TRUNC"] | \
    L.OPEN_FLAGS["O_EXCL"]           # meaningful at open time only
O_ACCMODE = 3
SETFL_BITS = L.OPEN_FLAGS["O_NONBLOCK"] | L.OPEN_FLAGS["O_APPEND"]
MAP_FIXED, MAP_ANON = 0x10, 0x20     # Linux
FD_KINDS = K.SUPPORTED
S_IFIFO = 0o010000
EFD_SEMAPHORE = 1                    # Linux; linux_eventfd2 takes it with O_CLOEXEC/O_NONBLOCK
BIG_PIPE_SIZE = 64 << 10             # sys/sys/pipe.h: the most a FreeBSD pipe buffers


@dataclasses.dataclass
class Target:
    """What restore needs of the FreeBSD side, injectable for tests (mocked kernel only)."""
    kit: object = kit_default
    helper: str = "/usr/local/libexec/ckptfs/linux-helper"
    jexec: str = "/usr/sbin/jexec"


class LinuxCalls:
    """Run Linux system calls inside a stopped Linuxulator process.

    `scratch`: an executable address of the helper (the trap code goes there); `data`: a
    writable page of the helper for arguments (`put` fills it from the start after `reset`)."""

    def __init__(self, kit, pid: int, scratch: int, data: int, saved=None):
        self.kit, self.pid, self.scratch, self.data = kit, pid, scratch, data
        self.cursor = 0
        if saved is None:
            saved = (kit.read_memory(pid, scratch, len(TRAP_CODE)), kit.get_regs(pid))
            kit.write_memory(pid, scratch, TRAP_CODE)
        self.saved_code, self.saved_regs = saved

    def forked(self, child: int) -> "LinuxCalls":
        """The same helper image in a child made by an injected fork (trap code inherited)."""
        return LinuxCalls(self.kit, child, self.scratch, self.data,
                          (self.saved_code, self.saved_regs))

    def reset(self) -> None:
        self.cursor = 0

    def put(self, raw: bytes) -> int:
        if self.cursor + len(raw) > DATA_SIZE:
            raise RestoreFailed(f"{len(raw)} bytes of arguments do not fit the helper's "
                                f"{DATA_SIZE}-byte data page", path=f"pid {self.pid}")
        addr = self.data + self.cursor
        self.kit.write_memory(self.pid, addr, raw)
        self.cursor += (len(raw) + 15) & ~15
        return addr

    def __call__(self, name: str, *args: int, step: str = "restore on freebsd",
                 path: str | None = None) -> int:
        reg = G.unpack(self.saved_regs)
        reg.update(r_rax=NR[name], r_rip=self.scratch)
        for r, value in zip(ARG_REGS, args):
            reg[r] = value & G.U64
        self.kit.set_regs(self.pid, G.pack(reg))
        self.kit.cont(self.pid, 0)
        status = self.kit.wait(self.pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == SIGTRAP):
            raise RestoreFailed(f"injected Linux {name}: helper did not stop at the trap "
                                f"(wait status {status:#x})", path=path or f"pid {self.pid}",
                                step=step)
        rax = G.signed(G.unpack(self.kit.get_regs(self.pid))["r_rax"])
        if -4096 < rax < 0:
            raise KernelError(f"injected Linux {name}{tuple(args)} in pid {self.pid}", -rax,
                              path=path or f"pid {self.pid}", step=step)
        return rax

    def on_lwp(self, lwp: int, name: str, *args: int, step: str, path: str) -> int:
        """One call made by thread `lwp` (for calls that act on their caller, such as
        set_robust_list): `lwp` is PT_SUSPENDed on entry; for the call the main thread is
        suspended and `lwp` resumed (PT_CONTINUE runs every thread not suspended), then
        its registers and both suspensions are put back."""
        kit, saved = self.kit, self.kit.get_regs(lwp)
        reg = G.unpack(saved)
        reg.update(r_rax=NR[name], r_rip=self.scratch)
        for r, value in zip(ARG_REGS, args):
            reg[r] = value & G.U64
        kit.suspend(self.pid)
        kit.resume(lwp)
        try:
            kit.set_regs(lwp, G.pack(reg))
            kit.cont(self.pid, 0)
            status = kit.wait(self.pid)
            if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == SIGTRAP):
                raise RestoreFailed(f"injected Linux {name} in lwp {lwp}: no stop at the trap "
                                    f"(wait status {status:#x})", path=path, step=step)
            rax = G.signed(G.unpack(kit.get_regs(lwp))["r_rax"])
        finally:
            kit.set_regs(lwp, saved)
            kit.suspend(lwp)
            kit.resume(self.pid)
        if -4096 < rax < 0:
            raise KernelError(f"injected Linux {name}{tuple(args)} in lwp {lwp}", -rax,
                              path=path, step=step)
        return rax

    def close(self) -> None:
        self.kit.write_memory(self.pid, self.scratch, self.saved_code)


@dataclasses.dataclass
class Proc:
    """One restored process: its new pid, injector, and new lwp id per checkpoint tid."""
    old: int
    new: int
    calls: LinuxCalls
    table: "FdTable"
    lwps: dict = dataclasses.field(default_factory=dict)


def restore(source, target: Target | None = None, strict: bool = False,
            plan=None, report: list | None = None) -> list[int]:
    """Restore `source` (a model.Source) on this FreeBSD host; returns the new pids in tree
    order. `plan`: a FreeBSDPlan to apply (read back from edited plan files); default:
    translate the checkpoint. `report`, if given, receives what was restored only in part
    ("<tree file>: why" lines)."""
    t = target or Target()
    meta = source.meta()
    if meta.binary_os != "linux":
        raise Unsupported("native FreeBSD binary: the FreeBSD restore runs Linux binaries "
                          "under the Linuxulator only (and a FreeBSD binary cannot go to Linux)",
                          path="manifest")
    if plan is None:
        plan = convert.to_freebsd(source, strict=strict)
    check(source, plan)
    r = Restorer(source, plan, t)
    try:
        return r.run()
    finally:
        if report is not None:
            report.extend(r.warnings)
            report.extend(f"{rec.path}: {rec.reason}" for rec in r.log.records)


def check(source, plan) -> None:
    """What this restore cannot do, refused before anything is created."""
    check_shared_memory(source, [task.pid for task in plan.tasks])
    refused = convert.refusals(source, [task.pid for task in plan.tasks], LossLog())
    if refused:
        first = refused[0]
        raise Unsupported(f"{first.value}: {first.reason}", path=first.path,
                          step="restore on freebsd")


def check_shared_memory(source, pids) -> dict[int, tuple[int, int]]:
    """Shared anonymous memory between processes of the tree: shmid -> (start, end) of what
    the root maps before it forks, so every process inherits the one object (a FreeBSD
    fork shares MAP_SHARED memory: MAP_INHERIT_SHARE). That needs each object at one place
    in every process that maps it; anything else is refused naming the map."""
    where: dict[int, tuple[int, int, int]] = {}
    users: dict[int, set[int]] = {}
    for pid in pids:
        for vma in source.mm(pid).vmas:
            if not vma.status & L.VMA_STATUS["VMA_ANON_SHARED"]:
                continue
            first = where.setdefault(vma.shmid, (pid, vma.start, vma.end))
            users.setdefault(vma.shmid, set()).add(pid)
            if first[1:] != (vma.start, vma.end):
                raise Unsupported(f"shared anonymous memory {vma.shmid} is at {first[1]:#x}-"
                                  f"{first[2]:#x} in process {first[0]} but here (or twice): "
                                  "the FreeBSD restore shares it by inheritance, at one place",
                                  path=f"tasks/{pid}/maps/{vma.start:x}-{vma.end:x}/shmid")
    return {shmid: where[shmid][1:] for shmid, who in users.items() if len(who) > 1}


class Restorer:
    def __init__(self, source, plan, t: Target):
        self.src, self.plan, self.t, self.kit = source, plan, t, t.kit
        self.procs: dict[int, Proc] = {}
        self.created: list[int] = []
        self.jid: int | None = None
        self.warnings: list[str] = []
        self.log = LossLog()          # what the target cannot hold (e.g. XSAVE components)
        self.meta = source.meta()
        self.values = {task.pid: convert.linux_task(task, LossLog()) for task in plan.tasks}
        self.shared_mem = check_shared_memory(source, [task.pid for task in plan.tasks])

    def run(self) -> list[int]:
        try:
            self.jid = setup_isolation(self.plan, self.t)
            self.build_tree()
            for task in self.plan.tasks:
                self.restore_task(task)
            for task in self.plan.tasks:
                self.finish(task)
        except BaseException:
            self.undo()
            raise
        return [self.procs[task.pid].new for task in self.plan.tasks]

    def undo(self) -> None:
        """Kill every helper made so far and remove the jail; the caller re-raises."""
        for pid in reversed(self.created):
            try:
                self.kit.kill(pid, self.kit.SIGKILL)
            except (KernelError, Unsupported):
                pass                 # already gone: nothing left to undo for it
        if self.jid is not None:
            try:
                self.kit.jail_remove(self.jid)
            except (KernelError, Unsupported):
                pass

    # -- the tree -------------------------------------------------------------------------------
    def build_tree(self) -> None:
        entries = self.src.pstree()
        root = entries[0]
        new = spawn_helper(self.jid, self.t)
        self.created.append(new)
        self.kit.trace_events(new)
        calls = LinuxCalls(self.kit, new, *helper_pages(self.kit, new))
        top = max([i.fd for e in entries for i in self.src.fdinfo(e.pid)], default=2)
        table = FdTable(high=top + 1)
        self.procs[root.pid] = Proc(root.pid, new, calls, table)
        if root.sid == root.pid:
            calls("setsid", step="setsid", path=f"tasks/{root.pid}/sid")
        make_shared(self.src, shared_ids(self.src, [e.pid for e in entries]), self.values,
                    calls, table)
        make_shared_memory(self.shared_mem, calls, f"tasks/{root.pid}/maps")
        for e in entries[1:]:
            self.fork(e)
        self.groups(entries)

    def fork(self, e) -> None:
        where = f"tasks/{e.pid}"
        if e.ppid not in self.procs:
            raise RestoreFailed(f"parent {e.ppid} is not in the tree before its child",
                                path=where + "/ppid", step="fork")
        parent = self.procs[e.ppid]
        child = parent.calls("fork", step="fork", path=where)
        self.created.append(child)
        self.kit.wait(child)
        info = self.kit.lwpinfo(child)
        if not info.flags & self.kit.PL_FLAG_CHILD:
            raise RestoreFailed(f"new process {child} did not stop as a traced fork child "
                                f"(pl_flags {info.flags:#x})", path=where, step="fork")
        calls = parent.calls.forked(child)
        self.procs[e.pid] = Proc(e.pid, child, calls, parent.table.copy())
        if e.sid == e.pid:
            calls("setsid", step="setsid", path=where + "/sid")

    def groups(self, entries) -> None:
        """Group leaders first, then members; a group outside the tree stays inherited."""
        leaders = [e for e in entries if e.pgid == e.pid and e.sid != e.pid]
        members = [e for e in entries if e.pgid != e.pid and e.pgid in self.procs]
        for e in leaders:
            self.procs[e.pid].calls("setpgid", 0, 0, step="setpgid", path=f"tasks/{e.pid}/pgid")
        for e in members:
            self.procs[e.pid].calls("setpgid", 0, self.procs[e.pgid].new, step="setpgid",
                                    path=f"tasks/{e.pid}/pgid")

    # -- one process ----------------------------------------------------------------------------
    def restore_task(self, task) -> None:
        pid, proc = task.pid, self.procs[task.pid]
        exe = _exe_path(self.src, pid)
        if exe:
            elf.check_can_run(exe, "freebsd")
        values = self.values[pid]
        check_layout(self.src, pid, proc.calls)
        restore_fds(self.src, pid, values, proc.calls, proc.table)
        self.warnings += restore_brk(self.src, pid, proc.calls)
        restore_memory(self.src, pid, proc.new, proc.calls, self.kit, self.shared_mem)
        restore_fs(self.src, pid, proc.calls)
        restore_comm(self.src, pid, proc.calls)
        self.warnings += restore_rlimits(self.src, pid, proc.calls)
        restore_sigactions(values, proc.calls)
        self.threads(task, values, proc)
        restore_creds(self.src, pid, proc.calls)

    def threads(self, task, values, proc: Proc) -> None:
        """Extra threads by injected clone, each made while the leader's mask is that
        thread's (a new thread inherits it); then the leader's own mask."""
        calls = proc.calls
        proc.lwps[task.pid] = proc.new
        for th in task.threads:
            if th.tid == task.pid:
                continue
            where = f"tasks/{task.pid}/threads/{th.tid}"
            set_mask(calls, values.sigmask[th.tid], where)
            ctid = self.src.core(th.tid).thread_info.clear_tid_addr
            flags = CLONE_THREAD_FLAGS | (CLONE_CHILD_CLEARTID if ctid else 0)
            lwp = calls("clone", flags, calls.data + DATA_SIZE, 0, ctid, 0,
                        step="clone thread", path=where)
            self.kit.wait(proc.new)                       # the new lwp's birth stop
            info = self.kit.lwpinfo(lwp)
            if not info.flags & self.kit.PL_FLAG_BORN:
                raise RestoreFailed(f"lwp {lwp} did not report its birth (pl_flags "
                                    f"{info.flags:#x})", path=where, step="clone thread")
            self.kit.suspend(lwp)
            proc.lwps[th.tid] = lwp
            tc = self.src.core(th.tid).thread_core
            if tc.futex_rla:
                calls.on_lwp(lwp, "set_robust_list", tc.futex_rla,
                             tc.futex_rla_len or ROBUST_LIST_HEAD, step="set_robust_list",
                             path=f"{where}/futex_rla")
        set_mask(calls, values.sigmask[task.pid], f"tasks/{task.pid}/sigmask")
        ctid = self.src.core(task.pid).thread_info.clear_tid_addr
        if ctid:
            calls("set_tid_address", ctid, step="set_tid_address",
                  path=f"tasks/{task.pid}/threads/{task.pid}/clear_tid_addr")
        restore_robust_list(self.src, task.pid, calls)

    def finish(self, task) -> None:
        proc = self.procs[task.pid]
        proc.calls.close()
        for th in task.threads:
            restore_thread(self.src, task.pid, th, proc.lwps[th.tid], self.kit)
            restore_fpu(self.src, self.meta, task.pid, th.tid, proc.lwps[th.tid], self.kit,
                        self.log)
        for th in task.threads:
            if th.tid != task.pid:
                self.kit.resume(proc.lwps[th.tid])
        self.kit.detach(proc.new, 0)


def setup_isolation(plan, t: Target) -> int:
    jid = t.kit.jail_set(plan.jail, t.kit.JAIL_CREATE)
    for rule in plan.rules:
        t.kit.rctl_add_rule(rule.text())
    if plan.cpuset:
        t.kit.cpuset_jail(jid, plan.cpuset)
    return jid


def spawn_helper(jid: int, t: Target) -> int:
    if not os.path.exists(t.helper) and t.kit is kit_default:
        raise RestoreFailed("the Linux helper is not installed", path=t.helper)
    proc = subprocess.Popen([t.jexec, str(jid), t.helper])
    t.kit.attach(proc.pid)
    return proc.pid


def helper_pages(kit, pid: int) -> tuple[int, int]:
    """(scratch, data): the helper's first executable page for `syscall; int3`, and a
    writable page for arguments (its last writable mapping's top page: the stack)."""
    entries = kit.vmmap(pid)
    code = [e.start for e in entries if e.prot & kit.KVME_PROT_EXEC]
    data = [e.end - DATA_SIZE for e in entries if e.prot & 2 and e.end - e.start >= DATA_SIZE]
    if not code or not data:
        raise RestoreFailed("the helper has no executable or no writable mapping",
                            path=f"pid {pid}")
    return code[0], data[-1]


def check_layout(source, pid: int, calls: LinuxCalls) -> None:
    """The helper's pages the restore works through must not be where the process goes."""
    for vma in source.mm(pid).vmas:
        if vma.status & SKIP:
            continue
        for name, addr, size in (("code", calls.scratch, PAGE), ("data", calls.data, DATA_SIZE)):
            if vma.start < addr + size and addr < vma.end:
                raise Unsupported(f"the mapping {vma.start:#x}-{vma.end:#x} overlaps the "
                                  f"helper's {name} page at {addr:#x}",
                                  path=f"tasks/{pid}/vmas")


def _exe_path(source, pid: int) -> str | None:
    mm = source.mm(pid)
    if not getattr(mm, "exe_file_id", 0):
        return None
    name = source.file(mm.exe_file_id).reg.name
    for root in ("/compat/linux", ""):
        if os.path.exists(root + name):
            return root + name
    return None


# -- descriptors ----------------------------------------------------------------------------------
@dataclasses.dataclass
class FdTable:
    """Open file descriptions made in one helper, all at numbers above every recorded one:
    file id -> descriptor, pipe id -> (read, write) of the pipe standing for it, FIFO path ->
    an O_RDWR holder. A forked child inherits the descriptors, so it gets a copy."""
    high: int
    made: dict = dataclasses.field(default_factory=dict)
    pipes: dict = dataclasses.field(default_factory=dict)
    fifos: dict = dataclasses.field(default_factory=dict)
    filled: set = dataclasses.field(default_factory=set)     # pipe ids whose bytes are in
    memfds: dict = dataclasses.field(default_factory=dict)   # memfd inode -> descriptor

    def fds(self) -> set[int]:
        return set(self.made.values()) | {fd for pair in self.pipes.values() for fd in pair} | \
            set(self.fifos.values()) | set(self.memfds.values())

    def copy(self) -> "FdTable":
        return FdTable(self.high, dict(self.made), dict(self.pipes), dict(self.fifos),
                       set(self.filled), dict(self.memfds))


def fd_kind(info) -> str:
    return convert.FD_TYPE_NAMES.get(info.type, str(info.type))


def shared_ids(source, pids) -> list[tuple[int, object]]:
    """(pid, fdinfo) of every descriptor whose open file description, or whose pipe or FIFO,
    more than one process of the tree uses, first use first. These are made in the root
    helper before it forks, so every process inherits the same kernel object (FreeBSD has
    no way to hand a descriptor to a traced process: no pidfd_getfd)."""
    users: dict[tuple, set[int]] = {}
    uses = []
    for pid in pids:
        for info in source.fdinfo(pid):
            keys = [("id", info.id)]
            kind = fd_kind(info)
            if kind in ("PIPE", "FIFO"):
                keys.append(("pipe", getattr(source.file(info.id), kind.lower()).pipe_id))
            if kind == "UNIXSK" and source.file(info.id).usk.peer:
                u = source.file(info.id).usk        # the two ends of a pair are made at once
                keys.append(("pair", min(u.ino, u.peer)))
            if kind == "MEMFD":
                keys.append(("memfd", source.file(info.id).memfd.inode_id))
            for k in keys:
                users.setdefault(k, set()).add(pid)
            uses.append((pid, info, keys))
    return [(pid, info) for pid, info, keys in uses if any(len(users[k]) > 1 for k in keys)]


def make_shared(source, shared, values_of, calls: "LinuxCalls", table: FdTable) -> None:
    """The descriptions several processes use, made in the root before the forks."""
    for pid, info in shared:
        if info.id not in table.made:
            where = f"tasks/{pid}/fds/{info.fd}"
            kind, flags = values_of[pid].fds[info.fd]
            table.made[info.id] = _description(source, info.id, kind, flags, calls, table, where)


def restore_fds(source, pid: int, values, calls: LinuxCalls, table: FdTable) -> None:
    """The helper's own descriptors closed (not those inherited from the root for sharing),
    then every recorded one: each open file description made once (see _description), then
    dup3'd to each recorded number with its close-on-exec bit; the high copies closed."""
    infos = sorted(source.fdinfo(pid), key=lambda i: i.fd)
    keep = table.fds()
    for entry in calls.kit.filedesc(calls.pid):
        if entry.fd >= 0 and entry.fd not in keep:
            calls("close", entry.fd, step="close helper descriptors")
    # epolls last: a kqueue's watch is keyed on the descriptor number and dropped when that
    # number is closed (knote_fdclose), so every target must be at its number first
    infos.sort(key=lambda i: fd_kind(i) == "EVENTPOLL")
    for info in infos:
        where = f"tasks/{pid}/fds/{info.fd}"
        kind, flags = values.fds[info.fd]
        if kind == "EVENTPOLL" and info.id not in table.made:
            table.made[info.id] = _epoll(source, info, calls, table, where)
        elif info.id not in table.made:
            table.made[info.id] = _description(source, info.id, kind, flags, calls, table, where)
        cloexec = L.O_CLOEXEC if flags & L.O_CLOEXEC else 0
        calls("dup3", table.made[info.id], info.fd, cloexec, step="install descriptor",
              path=where)
    for fd in sorted(table.fds()):
        calls("close", fd, step="close temporary descriptors")
    table.made, table.pipes, table.fifos, table.memfds = {}, {}, {}, {}


def _description(source, file_id, kind, flags, calls, table: FdTable, where) -> int:
    """One open file description at a number >= table.high, by kind (Linux calls, Linux
    flags: the helper is a Linux process)."""
    fe = source.file(file_id)
    if kind == "REG" and source.file_deleted(file_id):
        return _ghost(source, file_id, fe.reg, flags, calls, table, where)
    if kind == "REG":
        return _open_at(calls, fe.reg.name, fe.reg.pos, flags, table, where)
    if kind == "PIPE":
        return _pipe_end(source, fe.pipe.pipe_id, flags, calls, table, where)
    if kind == "FIFO":
        return _fifo(source, fe.fifo, flags, calls, table, where)
    if kind == "EVENTFD":
        return _eventfd(fe.efd, flags, calls, table, where)
    if kind in MAKERS:
        return MAKERS[kind](source, fe, flags, calls, table, where)
    raise Unsupported(f"a {kind} descriptor is not restored on FreeBSD", path=where)


def _open_at(calls, path: str, pos: int, flags: int, table: FdTable, where: str) -> int:
    calls.reset()
    tmp = calls("open", calls.put(path.encode() + b"\0"),
                (flags & ~OPEN_DROP) | L.OPEN_FLAGS["O_NOCTTY"], 0, step="open",
                path=where + " " + path)
    fd = _move_high(calls, tmp, table.high, where)
    if pos:
        calls("lseek", fd, pos, os.SEEK_SET, step="lseek", path=where)
    return fd


def _move_high(calls: LinuxCalls, fd: int, high: int, where: str) -> int:
    new = calls("fcntl", fd, F_DUPFD_CLOEXEC, high, step="move descriptor", path=where)
    calls("close", fd, step="move descriptor", path=where)
    return new


def _pipe_end(source, pipe_id, flags, calls, table: FdTable, where) -> int:
    """A descriptor of one end of the pipe standing for `pipe_id`, with the descriptor's
    status flags (F_SETFL always: the pipe is made non-blocking to be filled)."""
    if pipe_id not in table.pipes:
        table.pipes[pipe_id] = _pipe(source, pipe_id, calls, table.high, where)
    r, w = table.pipes[pipe_id]
    end = w if flags & O_ACCMODE == 1 else r
    fd = calls("fcntl", end, F_DUPFD_CLOEXEC, table.high, step="pipe end", path=where)
    calls("fcntl", fd, F_SETFL, flags & SETFL_BITS, step="pipe flags", path=where)
    return fd


def _pipe(source, pipe_id: int, calls: LinuxCalls, high: int, where: str) -> tuple[int, int]:
    """A new pipe holding the saved bytes. Made O_NONBLOCK: FreeBSD's pipe_write hands a
    blocking write of PIPE_MINDIRECT (8 KiB) or more to the reader directly and sleeps until
    it is read; a non-blocking one is buffered (up to BIG_PIPE_SIZE)."""
    calls.reset()
    addr = calls.put(bytes(8))
    calls("pipe2", addr, L.O_CLOEXEC | L.OPEN_FLAGS["O_NONBLOCK"], step="pipe", path=where)
    r, w = struct.unpack("<ii", calls.kit.read_memory(calls.pid, addr, 8))
    r, w = _move_high(calls, r, high, where), _move_high(calls, w, high, where)
    _fill_pipe(calls, w, source.pipe_data(pipe_id), f"pipe {pipe_id}", where)
    return r, w


def _fill_pipe(calls, w: int, data: bytes, what: str, where: str) -> None:
    if len(data) > BIG_PIPE_SIZE:
        raise Unsupported(f"{what} holds {len(data)} queued bytes; a FreeBSD pipe buffers at "
                          f"most {BIG_PIPE_SIZE} (BIG_PIPE_SIZE)", path=where + "/data")
    write_bytes(calls, w, data, where + "/data", "pipe data")


def _fifo(source, fifo, flags, calls, table: FdTable, where) -> int:
    """The FIFO at its path (made with the Linuxulator's mknod if the jail lacks it), held
    open O_RDWR|O_NONBLOCK while the recorded end is opened (so neither end blocks) and
    filled once with its queued bytes."""
    reg = source.file(fifo.regf_id).reg
    path = reg.name
    if path not in table.fifos:
        nonblock_rw = 2 | L.OPEN_FLAGS["O_NONBLOCK"]
        try:
            holder = _open_at(calls, path, 0, nonblock_rw, table, where)
        except KernelError as e:
            if e.errno != errno.ENOENT:
                raise
            mode = (reg.mode & 0o7777 if reg.HasField("mode") else 0o600) | S_IFIFO
            calls.reset()
            calls("mknod", calls.put(path.encode() + b"\0"), mode, 0, step="mkfifo",
                  path=f"{where} {path}")
            holder = _open_at(calls, path, 0, nonblock_rw, table, where)
        table.fifos[path] = holder
    if fifo.pipe_id not in table.filled:
        table.filled.add(fifo.pipe_id)
        _fill_pipe(calls, table.fifos[path], source.pipe_data(fifo.pipe_id),
                   f"FIFO {path}", where)
    return _open_at(calls, path, 0, flags, table, where)


def _eventfd(efd, flags, calls, table: FdTable, where) -> int:
    """eventfd2(0, flags) then the counter written in (eventfd2's initval is 32 bits, a
    counter is 64). EFD_SEMAPHORE is bit 0 of the checkpoint's flags (capture puts it there)."""
    mode = L.O_CLOEXEC | (flags & L.OPEN_FLAGS["O_NONBLOCK"]) | (efd.flags & EFD_SEMAPHORE)
    fd = _move_high(calls, calls("eventfd2", 0, mode, step="eventfd", path=where),
                    table.high, where)
    if efd.counter:
        write_bytes(calls, fd, struct.pack("<Q", efd.counter), where + "/count", "eventfd")
    return fd


# -- the kinds the Linuxulator makes (translate/freebsd/fdkinds.py says which and why) --------
EPOLL_CTL_ADD = 1
MFD_CLOEXEC, MFD_ALLOW_SEALING, F_ADD_SEALS = 1, 2, 1033        # Linux values
TFD_TIMER_ABSTIME = 1
SOCK_NONBLOCK_CLOEXEC = L.OPEN_FLAGS["O_NONBLOCK"] | L.O_CLOEXEC  # SOCK_* = O_* on Linux
SOL_SOCKET, SO_REUSEADDR, SO_SNDBUF, SO_RCVBUF = 1, 2, 7, 8      # Linux; translated there
IPPROTO_IPV6, IPV6_V6ONLY = 41, 26
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SUN_PATH = 108
S_IFMT, S_IFSOCK = 0o170000, 0o140000
# uipc_usrreq.c: what a unix socket buffers unless raised, the smaller of its two known
# settings (older: PIPSIZ 8192 for stream and seqpacket, net.local.dgram.maxdgram 2048 and
# recvspace 16384; newer: 64 KiB, 8 KiB, 16 KiB); restore raises them to fit a queue
UNIX_SPACE = {1: (8192, 8192), 5: (8192, 8192), 2: (2048, 16384)}   # type -> (snd, rcv)


def _epoll(source, info, calls, table: FdTable, where) -> int:
    """epoll_create1 (a kqueue there), then each target added under the task's own number,
    which by now holds the target's description (restore_fds installs epolls last)."""
    fe = source.file(info.id)
    ep = _move_high(calls, calls("epoll_create1", L.O_CLOEXEC, step="epoll", path=where),
                    table.high, where)
    for t in fe.epfd.tfd:
        calls.reset()
        event = calls.put(struct.pack("<IQ", t.events, t.data))   # packed on amd64
        calls("epoll_ctl", ep, EPOLL_CTL_ADD, t.tfd, event, step="epoll",
              path=f"{where}/targets/{t.tfd}")
    return ep


def _timerfd(source, fe, flags, calls, table: FdTable, where) -> int:
    """timerfd_create on the same clock, armed for the time that was left (an absolute timer
    at now + left on its own clock, read there), with its period. FreeBSD cannot set the
    unread count: a spent one-shot with expirations unread is armed 1 ns ahead, so it holds
    one again; other counts are lost (fdkinds notes it)."""
    t = fe.tfd
    mode = L.O_CLOEXEC | (t.flags & L.OPEN_FLAGS["O_NONBLOCK"])
    fd = _move_high(calls, calls("timerfd_create", t.clockid, mode, step="timerfd",
                                 path=where + "/clock"), table.high, where)
    value, interval = t.vsec * 10**9 + t.vnsec, t.isec * 10**9 + t.insec
    if not value and interval:
        value = interval              # expired, not read yet: due a period from now
    elif not value and t.ticks and not t.settime_flags & TFD_TIMER_ABSTIME:
        value = 1                     # a spent one-shot with its expiration unread: one
        #                               again at once (timerfd_expire counts it)
    if not value:
        return fd
    if t.settime_flags & TFD_TIMER_ABSTIME:
        calls.reset()
        now = calls.put(bytes(16))
        calls("clock_gettime", t.clockid, now, step="timerfd", path=where + "/clock")
        sec, nsec = struct.unpack("<qq", calls.kit.read_memory(calls.pid, now, 16))
        value += sec * 10**9 + nsec
    calls.reset()
    spec = calls.put(struct.pack("<4q", *divmod(interval, 10**9), *divmod(value, 10**9)))
    calls("timerfd_settime", fd, t.settime_flags, spec, 0, step="timerfd",
          path=where + "/value")
    return fd


def _memfd(source, fe, flags, calls, table: FdTable, where) -> int:
    """memfd_create (a SHM_ANON object there), the contents, the seals FreeBSD has. Every
    description of one memfd is one description there: FreeBSD cannot open a shared memory
    object again (fdkinds notes the offsets and modes that merge)."""
    from .. import fdkinds
    m = fe.memfd
    if m.inode_id in table.memfds:
        return calls("fcntl", table.memfds[m.inode_id], F_DUPFD_CLOEXEC, table.high,
                     step="memfd", path=where)
    state = fdkinds.memfd_state(source, fe.id, where)
    calls.reset()
    fd = _move_high(calls, calls("memfd_create", calls.put(state.name.encode() + b"\0"),
                                 MFD_CLOEXEC | MFD_ALLOW_SEALING, step="memfd",
                                 path=where + "/name"), table.high, where)
    write_bytes(calls, fd, state.contents(), where + "/contents", "memfd")
    calls("lseek", fd, m.pos, os.SEEK_SET, step="memfd", path=where + "/pos")
    seals = state.seals & K.SEALS_SUPPORTED
    if seals:
        calls("fcntl", fd, F_ADD_SEALS, seals, step="memfd", path=where + "/seals")
    table.memfds[m.inode_id] = fd
    return calls("fcntl", fd, F_DUPFD_CLOEXEC, table.high, step="memfd", path=where)


def _unix(source, fe, flags, calls, table: FdTable, where) -> int:
    u = fe.usk
    if u.peer:
        return _unix_pair(source, fe, flags, calls, table, where)
    fd = _socket(calls, AF_UNIX, u.type, table.high, where)
    if u.name:
        _unix_bind(u, fd, calls, where)
    if u.state == S_TCP_LISTEN:
        calls("listen", fd, u.backlog, step="listen", path=where + "/backlog")
    _status(calls, fd, u.flags, u.shutdown, where)
    return fd


S_TCP_LISTEN = 10


def _socket(calls, family: int, stype: int, high: int, where: str, proto: int = 0) -> int:
    return _move_high(calls, calls("socket", family, stype | L.O_CLOEXEC, proto,
                                   step="socket", path=where), high, where)


def _unix_bind(u, fd: int, calls, where: str) -> None:
    """bind to the recorded path (a relative name in its name_dir); a socket file left there
    (the original's) is replaced, any other file is refused by bind (EADDRINUSE)."""
    name = u.name.rstrip(b"\0")
    path = os.path.join(u.name_dir.encode(), name) if u.HasField("name_dir") else name
    if len(path) >= SUN_PATH:
        raise Unsupported(f"bound name {path!r} does not fit a socket address", path=where + "/name")
    calls.reset()
    addr = calls.put(struct.pack("<H", AF_UNIX) + path + b"\0")
    text = calls.put(path + b"\0")
    st = calls.put(bytes(144))                        # Linux struct stat
    try:
        calls("lstat", text, st, step="bind", path=where + "/name")
        mode = struct.unpack_from("<I", calls.kit.read_memory(calls.pid, st + 24, 4))[0]
        if mode & S_IFMT == S_IFSOCK:
            calls("unlink", text, step="bind", path=f"{where}/name {path.decode()}")
    except KernelError as e:
        if e.errno != errno.ENOENT:
            raise
    calls("bind", fd, addr, 2 + len(path) + 1, step="bind", path=f"{where}/name {path.decode()}")
    if u.HasField("file_perms"):
        calls("chmod", text, u.file_perms.mode & 0o7777, step="bind", path=where + "/perms/mode")


def _unix_pair(source, fe, flags, calls, table: FdTable, where) -> int:
    """socketpair; each end's queued messages sent from the other end (one sendto each, so
    boundaries stay), buffers raised first to hold them; then shutdowns and status flags.
    The other end waits in table.made for its own descriptor."""
    u = fe.usk
    peer_id = _peer_id(source, u)
    other = source.file(peer_id).usk
    calls.reset()
    pair = calls.put(bytes(8))
    calls("socketpair", AF_UNIX, u.type | SOCK_NONBLOCK_CLOEXEC, 0, pair, step="socketpair",
          path=where)
    a, b = (_move_high(calls, fd, table.high, where)
            for fd in struct.unpack("<ii", calls.kit.read_memory(calls.pid, pair, 8)))
    ends = ((a, fe.id, u), (b, peer_id, other))
    for (mine, fid, rec), (theirs, _, _) in (ends, ends[::-1]):
        _queue(calls, source.socket_queue(fid), mine, theirs, rec.type, where + "/queue")
    for (mine, _, rec), (_, _, peer) in (ends, ends[::-1]):
        # a read side closed because the peer shut its writing side is that shutdown's
        # doing there too (unp_shutdown: socantrcvmore on the peer); asking for it again
        # would flush the queue just filled (soshutdown SHUT_RD: sorflush)
        shut = rec.shutdown & ~(1 if peer.shutdown & 2 else 0)
        _status(calls, mine, rec.flags, shut, where)
    table.made[peer_id] = b
    return a


def _peer_id(source, u) -> int:
    for pid in source.pids():
        for i in source.fdinfo(pid):
            if i.type == L.FD_TYPES["UNIXSK"] and source.file(i.id).usk.ino == u.peer:
                return i.id
    raise RestoreFailed(f"unix socket {u.ino}: peer {u.peer} is not in the tree", path="fds")


def _queue(calls, messages: list, reader: int, sender: int, stype: int, where: str) -> None:
    """The messages waiting on `reader`, sent from `sender`: the sender's send buffer and
    the reader's receive buffer raised first when the defaults cannot hold them."""
    if not messages:
        return
    need = sum(len(m) for m in messages)
    snd, rcv = UNIX_SPACE.get(stype, (8192, 8192))
    biggest = max(len(m) for m in messages)
    for fd, opt, have, want in ((sender, SO_SNDBUF, snd, max(need, biggest)),
                                (reader, SO_RCVBUF, rcv, need)):
        if want > have:
            calls.reset()
            calls("setsockopt", fd, SOL_SOCKET, opt, calls.put(struct.pack("<i", want)), 4,
                  step="socket buffer", path=where)
    for n, msg in enumerate(messages):
        _send(calls, sender, msg, f"{where}/{n}")


def _send(calls, fd: int, data: bytes, where: str) -> None:
    with _staged(calls, data, where, "socket queue") as addr:
        n = calls("sendto", fd, addr, len(data), 0, 0, 0, step="socket queue", path=where)
    if n != len(data):
        raise RestoreFailed(f"sent {n} of {len(data)} bytes", path=where, step="socket queue")


@contextlib.contextmanager
def _staged(calls, data: bytes, where: str, step: str):
    """`data` in the helper's memory, at the address yielded: the data page when it fits,
    else a scratch anonymous map (one call can then take it all), unmapped afterwards."""
    if len(data) <= DATA_SIZE:
        calls.reset()
        yield calls.put(data)
        return
    size = (len(data) + PAGE - 1) & ~(PAGE - 1)
    scratch = calls("mmap", 0, size, 0x3, L.MAP_FLAGS["MAP_PRIVATE"] | MAP_ANON, -1, 0,
                    step=step, path=where)
    try:
        calls.kit.write_memory(calls.pid, scratch, data)
        yield scratch
    finally:
        calls("munmap", scratch, size, step=step, path=where)


def _status(calls, fd: int, flags: int, shut: int, where: str) -> None:
    """shutdown (sk_shutdown 1 read, 2 write, 3 both: SHUT_ value + 1), then the status
    flags (O_NONBLOCK)."""
    if shut in (1, 2, 3):
        calls("shutdown", fd, shut - 1, step="shutdown", path=where + "/shutdown")
    calls("fcntl", fd, F_SETFL, flags & SETFL_BITS, step="socket flags", path=where)


def _inet(source, fe, flags, calls, table: FdTable, where) -> int:
    """A TCP listener or a bound (or unbound) TCP/UDP socket: options, bind, listen. An
    established connection is refused before (fdkinds: no TCP_REPAIR on FreeBSD)."""
    i = fe.isk
    fd = _socket(calls, i.family, i.type, table.high, where, i.proto)
    if i.opts.reuseaddr:
        calls.reset()
        calls("setsockopt", fd, SOL_SOCKET, SO_REUSEADDR, calls.put(struct.pack("<i", 1)), 4,
              step="setsockopt", path=where + "/opts/reuseaddr")
    if i.family == AF_INET6 and i.HasField("v6only"):
        calls.reset()
        calls("setsockopt", fd, IPPROTO_IPV6, IPV6_V6ONLY,
              calls.put(struct.pack("<i", int(i.v6only))), 4, step="setsockopt",
              path=where + "/v6only")
    if i.src_port:
        raw = socket.inet_pton(i.family, S.addr_text(i.family, i.src_addr))
        port = struct.pack(">H", i.src_port)
        sa = struct.pack("<H", i.family) + port + (raw + bytes(8) if i.family == AF_INET
                                                   else bytes(4) + raw + bytes(4))
        calls.reset()
        calls("bind", fd, calls.put(sa), len(sa), step="bind",
              path=f"{where}/src_addr {S.addr_text(i.family, i.src_addr)}:{i.src_port}")
    if i.state == S_TCP_LISTEN:
        calls("listen", fd, i.backlog, step="listen", path=where + "/backlog")
    calls("fcntl", fd, F_SETFL, i.flags & SETFL_BITS, step="socket flags", path=where)
    return fd


MAKERS = {"TIMERFD": _timerfd, "MEMFD": _memfd, "UNIXSK": _unix, "INETSK": _inet}


def _ghost(source, file_id, reg, flags, calls, table: FdTable, where) -> int:
    """A file unlinked while open: its saved contents go into a new file (at its old name
    if free, else a hidden name beside it), which is opened with the recorded flags and
    offset and unlinked again, as the Linux restore does."""
    data = source.file_contents(file_id)
    if reg.HasField("size") and len(data) != reg.size:
        raise RestoreFailed(f"deleted file's contents are {len(data)} bytes, the checkpoint "
                            f"recorded {reg.size}", path=where + "/contents", step="deleted file")
    mode = reg.mode & 0o7777 if reg.HasField("mode") else 0o600
    path, w = _create_ghost(calls, reg.name, mode, where)
    try:
        calls("fchmod", w, mode, step="deleted file", path=where)     # the umask is not ours
        write_bytes(calls, w, data, where + "/contents", "deleted file")
        fd = _open_at(calls, path, reg.pos, flags, table, where)
    finally:
        calls("close", w, step="deleted file", path=where)
        calls.reset()
        calls("unlink", calls.put(path.encode() + b"\0"), step="deleted file",
              path=f"{where} {path}")
    return fd


GHOST_TRIES = 20
GHOST_CREATE = 1 | L.OPEN_FLAGS["O_CREAT"] | L.OPEN_FLAGS["O_EXCL"] | \
    L.OPEN_FLAGS["O_NOFOLLOW"] | L.O_CLOEXEC


def _create_ghost(calls, name: str, mode: int, where: str) -> tuple[str, int]:
    folder, base = os.path.split(name)
    names = [name] + [os.path.join(folder, f".{base}.ckptfs-ghost-{calls.pid}-{i}")
                      for i in range(GHOST_TRIES)]
    for path in names:
        calls.reset()
        try:
            return path, calls("open", calls.put(path.encode() + b"\0"), GHOST_CREATE, mode,
                               step="deleted file", path=f"{where} {path}")
        except KernelError as e:
            if e.errno != errno.EEXIST:
                raise
    raise RestoreFailed(f"no free name for a deleted file near {name}", path=where,
                        step="deleted file")


def write_bytes(calls, fd: int, data: bytes, where: str, step: str) -> None:
    """Write `data` to `fd` in the helper with as few write calls as it takes (one, for a
    FreeBSD pipe to grow past PIPE_SIZE), staged before memory is restored."""
    if not data:
        return
    with _staged(calls, data, where, step) as addr:
        done = 0
        while done < len(data):
            try:
                n = calls("write", fd, addr + done, len(data) - done, step=step, path=where)
            except KernelError as e:
                if e.errno != errno.EAGAIN:
                    raise
                n = 0
            if n <= 0:
                raise RestoreFailed(f"took {done} of {len(data)} bytes", path=where, step=step)
            done += n


# -- memory ---------------------------------------------------------------------------------------
SKIP = L.VMA_STATUS["VMA_AREA_VSYSCALL"] | L.VMA_STATUS["VMA_AREA_VVAR"] | \
    L.VMA_STATUS["VMA_AREA_VDSO"]
FILE_MAP = L.VMA_STATUS["VMA_FILE_PRIVATE"] | L.VMA_STATUS["VMA_FILE_SHARED"]


def make_shared_memory(shared: dict, calls: LinuxCalls, where: str) -> None:
    """Anonymous memory several processes share, mapped MAP_SHARED in the root before it
    forks: every child inherits the same object. Not over the helper's working pages."""
    for shmid, (start, end) in sorted(shared.items(), key=lambda kv: kv[1]):
        for name, addr, size in (("code", calls.scratch, PAGE), ("data", calls.data, DATA_SIZE)):
            if start < addr + size and addr < end:
                raise Unsupported(f"shared memory {shmid} at {start:#x}-{end:#x} overlaps the "
                                  f"helper's {name} page at {addr:#x}",
                                  path=f"{where}/{start:x}-{end:x}")
        calls("mmap", start, end - start, 0x3, MAP_FIXED | MAP_ANON | L.MAP_FLAGS["MAP_SHARED"],
              -1, 0, step="mmap shared memory", path=f"{where}/{start:x}-{end:x}/shmid")


def restore_memory(source, pid: int, new: int, calls: LinuxCalls, kit,
                   shared: dict | None = None) -> None:
    """Map every VMA at its address (file maps from the file under the jail's Linux root),
    write the saved pages, then set the protection. The vDSO is the Linuxulator's own.
    Shared anonymous memory (`shared`, made in the root) is inherited: not mapped again,
    only filled; a process that does not have it unmaps its inherited copy."""
    shared = shared or {}
    vmas = source.mm(pid).vmas
    mine = {v.shmid for v in vmas if v.status & L.VMA_STATUS["VMA_ANON_SHARED"]} & set(shared)
    for shmid, (start, end) in sorted(shared.items()):
        if shmid not in mine:                        # before its own maps go there
            calls("munmap", start, end - start, step="munmap inherited shared memory",
                  path=f"tasks/{pid}/maps")
    for vma in vmas:
        if vma.status & SKIP:
            continue
        size = vma.end - vma.start
        where = f"tasks/{pid}/vmas/{vma.start:#x}"
        if vma.status & L.VMA_STATUS["VMA_ANON_SHARED"] and vma.shmid in shared:
            pass                                     # inherited from the root: fill it
        elif vma.status & FILE_MAP:
            _map_file(source, vma, calls, where)
        else:
            share = vma.flags & (L.MAP_FLAGS["MAP_SHARED"] | L.MAP_FLAGS["MAP_PRIVATE"])
            calls("mmap", vma.start, size, 0x3, MAP_FIXED | MAP_ANON | share, -1, 0,
                  step="mmap", path=where)
        for rng in source.page_ranges(pid, vma):
            kit.write_memory(new, rng.start, source.read_memory(pid, rng.start,
                                                                rng.end - rng.start))
        calls("mprotect", vma.start, size, vma.prot, step="mprotect", path=where)


def _map_file(source, vma, calls: LinuxCalls, where: str) -> None:
    name = source.file(vma.shmid).reg.name
    calls.reset()
    shared = vma.flags & L.MAP_FLAGS["MAP_SHARED"]
    fd = calls("open", calls.put(name.encode() + b"\0"), 2 if shared and vma.prot & 2 else 0,
               0, step="open mapped file", path=f"{where} {name}")
    try:
        prot = vma.prot if shared else vma.prot | 0x2      # private: room to write COW pages
        calls("mmap", vma.start, vma.end - vma.start, prot,
              MAP_FIXED | (L.MAP_FLAGS["MAP_SHARED"] if shared else L.MAP_FLAGS["MAP_PRIVATE"]),
              fd, vma.pgoff, step="mmap file", path=f"{where} {name}")
    finally:
        calls("close", fd, step="mmap file")


# -- process state ------------------------------------------------------------------------------
def restore_fs(source, pid: int, calls: LinuxCalls) -> None:
    fs = source.fs(pid)
    cwd = source.file(fs.cwd_id).reg.name
    root = source.file(fs.root_id).reg.name
    if root != "/":
        calls.reset()
        calls("chroot", calls.put(root.encode() + b"\0"), step="chroot", path=f"tasks/{pid}/root")
    calls.reset()
    calls("chdir", calls.put(cwd.encode() + b"\0"), step="chdir", path=f"tasks/{pid}/cwd {cwd}")
    if fs.HasField("umask"):
        calls("umask", fs.umask, step="umask", path=f"tasks/{pid}/umask")


def restore_comm(source, pid: int, calls: LinuxCalls) -> None:
    """The process name (prctl PR_SET_NAME). Thread names are not restored: the Linuxulator
    applies PR_SET_NAME to the process, not the calling thread."""
    comm = source.core(pid).tc.comm
    if comm:
        calls.reset()
        calls("prctl", PR_SET_NAME, calls.put(comm.encode()[:15] + b"\0"), step="prctl",
              path=f"tasks/{pid}/comm")


def restore_brk(source, pid: int, calls: LinuxCalls) -> list[str]:
    """The program's break, by an injected Linux brk(mm_brk) before its maps are made.

    The Linuxulator keeps no Linux break of its own: linux_brk (linux_misc.c) moves the
    native one, vm_daddr + vm_dsize, which the image activator (imgact_elf.c) set from the
    executable it started: the helper's data segment, not the program's. kern_break only
    grows it from vm_daddr up to RLIMIT_DATA over unmapped space, and no call moves vm_daddr.
    So the recorded break is reached only when the helper's data segment ends where the
    program's heap begins; otherwise the heap is restored as an ordinary anonymous map and
    the program's later brk calls fail (glibc malloc then takes memory with mmap): returned
    as a warning naming tasks/<pid>/mm/brk."""
    mm = source.mm(pid)
    want, where = mm.mm_brk, f"tasks/{pid}/mm/brk"
    if not want:
        return []
    got = calls("brk", want, step="brk", path=where)
    if got == want:
        return []
    return [f"{where}: the break stays the helper's ({got:#x}, not {want:#x}): the "
            "Linuxulator's brk moves the data segment of the executable it started; the heap "
            "is restored as an anonymous map and later brk calls fail"]


def restore_robust_list(source, pid: int, calls: LinuxCalls) -> None:
    """The main thread's robust futex list (set_robust_list: linux_futex.c keeps it in the
    calling thread's emuldata; the other threads' are set by each thread, see on_lwp)."""
    tc = source.core(pid).thread_core
    if tc.futex_rla:
        calls("set_robust_list", tc.futex_rla, tc.futex_rla_len or ROBUST_LIST_HEAD,
              step="set_robust_list", path=f"tasks/{pid}/threads/{pid}/futex_rla")


def restore_rlimits(source, pid: int, calls: LinuxCalls) -> list[str]:
    """prlimit64 with Linux resource numbers; a hard limit above the jail's is kept at the
    jail's (raising it needs privilege the jail may not have): returned as warnings."""
    warnings = []
    for i, lim in enumerate(source.core(pid).tc.rlimits.rlimits):
        where = f"tasks/{pid}/rlimits/{L.RLIMITS[i]}"
        calls.reset()
        old = calls.put(bytes(16))
        calls("prlimit64", 0, i, 0, old, step="prlimit64", path=where)
        now_max = struct.unpack("<QQ", calls.kit.read_memory(calls.pid, old, 16))[1]
        cur, mx = lim.cur, lim.max
        if mx > now_max:
            warnings.append(f"{where}: hard limit {mx} above the jail's {now_max}: kept")
            mx, cur = now_max, min(cur, now_max)
        calls("prlimit64", 0, i, calls.put(struct.pack("<QQ", cur, mx)), 0, step="prlimit64",
              path=where)
    return warnings


def restore_sigactions(values, calls: LinuxCalls) -> None:
    """rt_sigaction with Linux numbers and flags: the helper is a Linux process."""
    for sig, act in sorted(values.sigactions.items()):
        calls.reset()
        raw = struct.pack("<4Q", act["handler"], act["flags"], act["restorer"], act["mask"])
        calls("rt_sigaction", sig, calls.put(raw), 0, 8, step="rt_sigaction",
              path=f"tasks/{values.pid}/sigactions/{L.SIGNAL_NAMES.get(sig, sig)}")


def set_mask(calls: LinuxCalls, mask: int, where: str) -> None:
    calls.reset()
    calls("rt_sigprocmask", SIG_SETMASK, calls.put(struct.pack("<Q", mask)), 0, 8,
          step="rt_sigprocmask", path=where)


def restore_creds(source, pid: int, calls: LinuxCalls) -> None:
    """Groups, gids, uids (Linux calls, Linux ids): last, dropping root ends what we may do."""
    c = source.core(pid).thread_core.creds
    where = f"tasks/{pid}/creds"
    groups = list(c.groups)
    calls.reset()
    arg = calls.put(struct.pack(f"<{len(groups)}I", *groups)) if groups else 0
    calls("setgroups", len(groups), arg, step="setgroups", path=where + "/groups")
    calls("setresgid", c.gid, c.egid, c.sgid, step="setresgid", path=where)
    calls("setresuid", c.uid, c.euid, c.suid, step="setresuid", path=where)


def restore_thread(source, pid: int, thread, lwp: int, kit) -> None:
    current = G.unpack(kit.get_regs(lwp))
    reg = dict(thread.reg)
    for sel in ("r_cs", "r_ss", "r_ds", "r_es", "r_fs", "r_gs"):
        reg[sel] = current[sel]            # the kernel's selectors, never copied
    kit.set_regs(lwp, G.pack(reg))
    kit.set_fsbase(lwp, thread.fsbase)
    kit.set_gsbase(lwp, thread.gsbase)


def thread_xsave(source, meta, tid: int) -> bytes:
    """A thread's XSAVE image in Linux's ptrace form: a FreeBSD capture hands it over whole
    (`xsave`), every other source rebuilds it from core.thread_info.fpregs for the feature
    set and size the checkpoint came with (the manifest's xfeatures/xsave_size)."""
    own = getattr(source, "xsave", None)
    if own is not None:
        return own(tid)
    fp = source.core(tid).thread_info.fpregs
    return X.join(fp, meta.xfeatures or None, meta.xsave_size or None)


def restore_fpu(source, meta, pid: int, tid: int, lwp: int, kit, log: LossLog) -> None:
    """PT_SETXSTATE with the whole area the target CPU uses (PT_GETXSTATE_INFO: its mask and
    length; xstate_bv limited to that mask, which the kernel demands). A CPU without XSAVE
    (PT_GETXSTATE_INFO fails with EOPNOTSUPP) takes the FXSAVE region by PT_SETFPREGS."""
    where = f"tasks/{pid}/threads/{tid}/fpu"
    area = FPU.with_header(thread_xsave(source, meta, tid))
    try:
        mask, length = kit.xstate_info(lwp)
    except KernelError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        if FPU.beyond_sse(area):
            log.note(where, hex(FPU.header(area)[0]), "the target CPU has no XSAVE: only the "
                     "x87/SSE state is set (PT_SETFPREGS); the rest is dropped")
        kit.set_fpregs(lwp, FPU.fpreg(area))
        return
    kit.set_xstate(lwp, FPU.to_fbsd(area, log, where, mask, length))
