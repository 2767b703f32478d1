"""Restore on FreeBSD: a Linux process comes back to life under the Linuxulator in a jail.

The ABI of a FreeBSD process is fixed at exec, so the target process must start as a
Linux-branded image: a small Linux helper (`helper`, run under linux64.ko inside the jail)
is started and attached with PT_ATTACH. From then on the restorer works like the Linux
restorer: it makes the helper execute *Linux* system calls (the Linuxulator's syscall table,
Linux numbers and errnos) one at a time by writing `syscall; int3` at a scratch address,
loading registers (PT_SETREGS) and continuing to the trap. Memory contents go in with PT_IO,
registers with PT_SETREGS + PT_SETFSBASE/PT_SETGSBASE, FPU with PT_SETXSTATE.

Order: check the binary (a native FreeBSD binary cannot come from Linux, nor go back); jail
(jail_set from the plan's parameters) and RCTL rules; per process: helper, munmap of the
helper's own user mappings is left to the helper's design (it maps itself high), mmap of
every VMA (MAP_FIXED), contents, mprotect, sigactions (Linux numbers and flags, restorer
kept), sigprocmask, then each thread's registers; detach. Every step names its file or pid.

Not done yet (Unsupported, naming the item): threads beyond the leader (needs injected
clone), descriptors other than regular files, process trees (fork injection), vDSO proxying.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess

from .. import flags as L
from ..errors import KernelError, RestoreFailed, Unsupported
from ..oskit import freebsd as kit_default
from ..translate.freebsd import convert, elf, fpu as FPU, regs as G

# Linux x86_64 system call numbers the restorer injects.
NR = {"mmap": 9, "mprotect": 10, "munmap": 11, "rt_sigaction": 13, "rt_sigprocmask": 14,
      "open": 2, "dup2": 33, "close": 3, "lseek": 8, "prctl": 157}
ARG_REGS = ("r_rdi", "r_rsi", "r_rdx", "r_r10", "r_r8", "r_r9")
TRAP_CODE = b"\x0f\x05\xcc"          # syscall; int3
SIGTRAP = 5                          # FreeBSD
SIG_SETMASK = 2                      # Linux value
PAGE = 4096


@dataclasses.dataclass
class Target:
    """What restore needs of the FreeBSD side, injectable for tests (mocked kernel only)."""
    kit: object = kit_default
    helper: str = "/usr/local/libexec/ckptfs/linux-helper"
    jexec: str = "/usr/sbin/jexec"
    cpuset: str = "/bin/cpuset"


class LinuxCalls:
    """Run Linux system calls inside a stopped Linuxulator process."""

    def __init__(self, kit, pid: int, scratch: int):
        self.kit, self.pid, self.scratch = kit, pid, scratch
        self.saved_code = kit.read_memory(pid, scratch, len(TRAP_CODE))
        self.saved_regs = kit.get_regs(pid)
        kit.write_memory(pid, scratch, TRAP_CODE)

    def __call__(self, name: str, *args: int) -> int:
        reg = G.unpack(self.saved_regs)
        reg.update(r_rax=NR[name], r_rip=self.scratch)
        for r, value in zip(ARG_REGS, args):
            reg[r] = value & G.U64
        self.kit.set_regs(self.pid, G.pack(reg))
        self.kit.cont(self.pid, 0)
        status = self.kit.wait(self.pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == SIGTRAP):
            raise RestoreFailed(f"injected Linux {name}: helper did not stop at the trap "
                                f"(wait status {status:#x})", path=f"pid {self.pid}")
        rax = G.signed(G.unpack(self.kit.get_regs(self.pid))["r_rax"])
        if -4096 < rax < 0:
            raise KernelError(f"injected Linux {name}{args}", -rax, path=f"pid {self.pid}",
                              step="restore on freebsd")
        return rax

    def close(self) -> None:
        self.kit.write_memory(self.pid, self.scratch, self.saved_code)


def restore(source, target: Target | None = None, strict: bool = False,
            plan=None) -> list[int]:
    """Restore `source` (a model.Source) on this FreeBSD host; returns the new pids.
    `plan`: a FreeBSDPlan to apply (read back from edited plan files); default: translate."""
    t = target or Target()
    meta = source.meta()
    if meta.binary_os != "linux":
        raise Unsupported("native FreeBSD binary: the FreeBSD restore runs Linux binaries "
                          "under the Linuxulator only", path="manifest")
    if plan is None:
        plan = convert.to_freebsd(source, strict=strict)
    if len(plan.tasks) != 1:
        raise Unsupported(f"{len(plan.tasks)} processes: process trees are not restored on "
                          "FreeBSD yet", path="tasks")
    jid = setup_isolation(plan, t)
    return [restore_task(source, plan.tasks[0], jid, t)]


def setup_isolation(plan, t: Target) -> int:
    jid = t.kit.jail_set(plan.jail, t.kit.JAIL_CREATE)
    for rule in plan.rules:
        t.kit.rctl_add_rule(rule.text())
    if plan.cpuset:
        subprocess.run([t.cpuset, "-j", str(jid), "-l", plan.cpuset], check=True)
    return jid


def spawn_helper(jid: int, t: Target) -> int:
    if not os.path.exists(t.helper) and t.kit is kit_default:
        raise RestoreFailed("the Linux helper is not installed", path=t.helper)
    proc = subprocess.Popen([t.jexec, str(jid), t.helper])
    t.kit.attach(proc.pid)
    return proc.pid


def restore_task(source, task, jid: int, t: Target) -> int:
    pid = task.pid
    if len(task.threads) != 1:
        raise Unsupported(f"{len(task.threads)} threads: threads are not restored on FreeBSD "
                          "yet", path=f"tasks/{pid}/threads")
    exe = _exe_path(source, pid)
    if exe:
        elf.check_can_run(exe, "freebsd")
    new = spawn_helper(jid, t)
    calls = LinuxCalls(t.kit, new, _scratch(t.kit, new))
    try:
        restore_memory(source, pid, new, calls, t.kit)
        restore_signals(task, calls)
    finally:
        calls.close()
    restore_thread(source, pid, task.threads[0], new, t.kit)
    t.kit.detach(new, 0)
    return new


def _exe_path(source, pid: int) -> str | None:
    mm = source.mm(pid)
    if not getattr(mm, "exe_file_id", 0):
        return None
    name = source.file(mm.exe_file_id).reg.name
    for root in ("/compat/linux", ""):
        if os.path.exists(root + name):
            return root + name
    return None


def _scratch(kit, pid: int) -> int:
    """An executable page of the helper to hold `syscall; int3` (its entry page)."""
    for entry in kit.vmmap(pid):
        if entry.prot & kit.KVME_PROT_EXEC:
            return entry.start
    raise RestoreFailed("the helper has no executable mapping", path=f"pid {pid}")


SKIP = L.VMA_STATUS["VMA_AREA_VSYSCALL"] | L.VMA_STATUS["VMA_AREA_VVAR"]
FILE_MAP = L.VMA_STATUS["VMA_FILE_PRIVATE"] | L.VMA_STATUS["VMA_FILE_SHARED"]
PATH_SLOT = 256                       # scratch offset for a path string


def restore_memory(source, pid: int, new: int, calls: LinuxCalls, kit) -> None:
    """Map every VMA at its address (file maps from the file under /compat/linux), write
    the saved pages, then set the protection."""
    for vma in source.mm(pid).vmas:
        if vma.status & SKIP:
            continue                  # the Linuxulator provides its own; vvar has no FreeBSD twin
        size = vma.end - vma.start
        if vma.status & FILE_MAP:
            _map_file(source, vma, calls)
        else:
            share = vma.flags & (L.MAP_FLAGS["MAP_SHARED"] | L.MAP_FLAGS["MAP_PRIVATE"])
            calls("mmap", vma.start, size, 0x3, 0x10 | 0x20 | share, -1, 0)
        for rng in source.page_ranges(pid, vma):
            kit.write_memory(new, rng.start, source.read_memory(pid, rng.start,
                                                                rng.end - rng.start))
        calls("mprotect", vma.start, size, vma.prot)


def _map_file(source, vma, calls: LinuxCalls) -> None:
    name = source.file(vma.shmid).reg.name
    addr = calls.scratch + PATH_SLOT
    calls.kit.write_memory(calls.pid, addr, name.encode() + b"\0")
    shared = vma.flags & L.MAP_FLAGS["MAP_SHARED"]
    fd = calls("open", addr, 2 if shared and vma.prot & 2 else 0, 0)
    try:
        prot = vma.prot if shared else vma.prot | 0x2      # private: room to write COW pages
        calls("mmap", vma.start, vma.end - vma.start, prot,
              0x10 | (L.MAP_FLAGS["MAP_SHARED"] if shared else L.MAP_FLAGS["MAP_PRIVATE"]),
              fd, vma.pgoff)
    finally:
        calls("close", fd)


def restore_signals(task, calls: LinuxCalls) -> None:
    """rt_sigaction with Linux numbers and flags: the helper is a Linux process."""
    values = convert.linux_task(task, convert.LossLog())
    act_addr = calls.scratch + 64        # struct k_sigaction written next to the trap code
    for sig, act in sorted(values.sigactions.items()):
        raw = b"".join(v.to_bytes(8, "little") for v in
                       (act["handler"], act["flags"], act["restorer"], act["mask"]))
        calls.kit.write_memory(calls.pid, act_addr, raw)
        calls("rt_sigaction", sig, act_addr, 0, 8)
    mask = values.sigmask[task.pid]
    calls.kit.write_memory(calls.pid, act_addr, mask.to_bytes(8, "little"))
    calls("rt_sigprocmask", SIG_SETMASK, act_addr, 0, 8)


def restore_thread(source, pid: int, thread, new: int, kit) -> None:
    current = G.unpack(kit.get_regs(new))
    reg = dict(thread.reg)
    for sel in ("r_cs", "r_ss", "r_ds", "r_es", "r_fs", "r_gs"):
        reg[sel] = current[sel]            # the kernel's selectors, never copied
    kit.set_regs(new, G.pack(reg))
    kit.set_fsbase(new, thread.fsbase)
    kit.set_gsbase(new, thread.gsbase)
    xsave = getattr(source, "xsave", None)
    if xsave is not None:
        mask, length = kit.xstate_info(new)
        kit.set_xstate(new, FPU.to_fbsd(xsave(thread.tid), convert.LossLog(),
                                        f"tasks/{pid}/threads/{thread.tid}/fpu", mask, length))


