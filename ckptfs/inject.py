"""Make a ptrace-stopped thread execute system calls for us (x86_64 Linux).

How one injected call works: point the thread's rip at a `syscall` instruction (0f 05) that
already exists in its address space — the vDSO has several; a restorer can give its own page —
load rax and the argument registers, set orig_rax = -1 so the kernel's syscall-restart logic
leaves our registers alone, then step with PTRACE_SYSCALL to the syscall-entry stop and again
to the syscall-exit stop, where the result is read. Nothing is written into the tracee's code,
and the thread never runs a single user instruction of ours: it stops before returning to user
mode. That also means the call may unmap the very page holding the instruction.

Signals that arrive meanwhile show up as signal-delivery stops; they are suppressed and
remembered in `pending` (re-send them with `requeue_pending()` if they matter). Fork/clone
event stops are stepped over and the new task id kept in `last_child`.

On `close()` the thread gets its registers back. A thread that was interrupted inside a system
call must then leave through the kernel's signal-delivery path, where the kernel decides to
restart the call or fail it with EINTR; see `park_with_regs`.

Every ptrace request must come from the thread that attached the tracee: pass `tracer=` (a
ckptfs.ptrace.Tracer) and all work is funnelled through it.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import struct

from . import ptrace
from .errors import KernelError, ProcessGone

PTRACE_SYSCALL = 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
SIGTRAP, SIGSTOP = 5, 19
PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE = 1, 2, 3

SYSCALL_INSN = b"\x0f\x05"
ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")

# Kernel-internal return codes of an interrupted system call (never seen by user code).
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
NR_RESTART_SYSCALL = 219
RESTART_CODES = (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK)

# x86_64 system call numbers used across ckptfs (inject, capture, restore).
NR = {
    "read": 0, "write": 1, "open": 2, "close": 3, "lseek": 8, "mmap": 9, "mprotect": 10,
    "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14, "ioctl": 16,
    "madvise": 28, "dup": 32, "dup2": 33, "nanosleep": 35, "getitimer": 36, "setitimer": 38,
    "getpid": 39, "clone": 56, "fork": 57, "exit": 60, "wait4": 61, "kill": 62,
    "fcntl": 72, "fchdir": 81, "umask": 95, "getuid": 102, "getgid": 104, "setpgid": 109,
    "getppid": 110, "setsid": 112, "setresuid": 117, "setresgid": 119, "getpgid": 121,
    "setfsuid": 122, "setfsgid": 123, "getsid": 124, "capset": 126, "sigaltstack": 131,
    "personality": 135, "prctl": 157, "arch_prctl": 158, "setrlimit": 160, "chroot": 161,
    "setgroups": 116, "gettid": 186, "set_tid_address": 218, "exit_group": 231,
    "tgkill": 234, "openat": 257, "set_robust_list": 273, "get_robust_list": 274,
    "dup3": 292, "prlimit64": 302, "rseq": 334, "pidfd_open": 434, "clone3": 435,
    "close_range": 436, "pidfd_getfd": 438, "clock_nanosleep": 230, "memfd_create": 319,
    "ftruncate": 77, "getpgrp": 111, "tkill": 200, "rt_sigqueueinfo": 129,
    "rt_tgsigqueueinfo": 297, "timer_create": 222, "timer_settime": 223, "timer_gettime": 224,
    "timer_getoverrun": 225, "timer_delete": 226,
}
NR_NAMES = {v: k for k, v in NR.items()}

PROT_RWX = 7
MAP_PRIVATE_ANON = 0x22
PR_GET_TID_ADDRESS = 40


def _vdso_range(pid: int | str) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if line.rstrip().endswith("[vdso]"):
                    lo, hi = line.split()[0].split("-")
                    return int(lo, 16), int(hi, 16)
    except FileNotFoundError:
        raise ProcessGone(f"process {pid} is gone", path=f"/proc/{pid}/maps",
                          step="find vdso") from None
    return None


_VDSO_SYSCALL_OFFSET: int | None = None


def vdso_syscall_offset() -> int | None:
    """Offset of a `syscall` instruction in this kernel's vDSO (the same in every process).
    Any 0f 05 byte pair executes as `syscall` when jumped to, aligned or not."""
    global _VDSO_SYSCALL_OFFSET
    if _VDSO_SYSCALL_OFFSET is None:
        rng = _vdso_range("self")
        if rng is None:
            return None
        with open("/proc/self/mem", "rb", buffering=0) as f:
            f.seek(rng[0])
            m = re.search(re.escape(SYSCALL_INSN), f.read(rng[1] - rng[0]))
        _VDSO_SYSCALL_OFFSET = m.start() if m else -1
    return None if _VDSO_SYSCALL_OFFSET < 0 else _VDSO_SYSCALL_OFFSET


OFF = ptrace.REG_OFFSET


def _regs_dict(raw: bytes) -> dict[str, int]:
    """Raw user_regs_struct bytes as ptrace.get_regs() gives them."""
    return {name: int.from_bytes(raw[off:off + 8], "little") for name, off in OFF.items()}


def _signed(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


# -- memory of another process ---------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = _libc.process_vm_writev.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
IOV_MAX = 1024


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vm_writev(pid: int, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> int:
    """process_vm_writev of (address, length) lists, at most IOV_MAX each; bytes written.
    The remote pages must be writable (use mem_write for read-only ones)."""
    lv = (IoVec * len(local))(*[IoVec(a, n) for a, n in local])
    rv = (IoVec * len(remote))(*[IoVec(a, n) for a, n in remote])
    n = _libc.process_vm_writev(pid, lv, len(local), rv, len(remote), 0)
    if n < 0:
        err = ctypes.get_errno()
        raise KernelError(f"process_vm_writev into {pid}", err, step="write memory",
                          path=f"/proc/{pid}/mem")
    return n


def mem_read(pid: int, addr: int, size: int) -> bytes:
    """Read through /proc/PID/mem (works on any mapped page, readable or not)."""
    fd = _open_mem(pid, os.O_RDONLY)
    try:
        data = os.pread(fd, size, addr)
    except OSError as e:
        raise KernelError(f"read {size} bytes at {addr:#x} of {pid}", e.errno,
                          step="read memory", path=f"/proc/{pid}/mem") from None
    finally:
        os.close(fd)
    if len(data) != size:
        raise KernelError(f"short read at {addr:#x} of {pid}", errno.EFAULT,
                          step="read memory", path=f"/proc/{pid}/mem")
    return data


def mem_write(pid: int, addr: int, data: bytes) -> None:
    """Write through /proc/PID/mem: the kernel forces the write even into r-x pages."""
    fd = _open_mem(pid, os.O_RDWR)
    try:
        n = os.pwrite(fd, data, addr)
    except OSError as e:
        raise KernelError(f"write {len(data)} bytes at {addr:#x} of {pid}", e.errno,
                          step="write memory", path=f"/proc/{pid}/mem") from None
    finally:
        os.close(fd)
    if n != len(data):
        raise KernelError(f"short write at {addr:#x} of {pid}", errno.EFAULT,
                          step="write memory", path=f"/proc/{pid}/mem")


def _open_mem(pid: int, mode: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", mode)
    except FileNotFoundError:
        raise ProcessGone(f"process {pid} is gone", path=f"/proc/{pid}/mem") from None
    except OSError as e:
        raise KernelError(f"open memory of {pid}", e.errno, path=f"/proc/{pid}/mem") from None


# -- the injector ---------------------------------------------------------------------------
class Injector:
    """System calls executed by thread `tid`, which the calling thread (or `tracer`) has
    attached and stopped. `syscall_addr` names a `syscall` instruction to use; by default
    one in the vDSO, else two bytes at the thread's rip are borrowed (and put back)."""

    def __init__(self, tid: int, *, tracer: ptrace.Tracer | None = None,
                 syscall_addr: int | None = None):
        self.tid = tid
        self.tracer = tracer
        self.pending: list[int] = []       # signals that arrived while we ran calls
        self.last_child: int | None = None  # task created by the last fork/clone call
        self._insn = syscall_addr
        self._saved: dict[str, int] | None = None   # registers before our first call
        self._saved_raw = bytearray()                  # the same, as SETREGSET bytes
        self._patch: tuple[int, bytes] | None = None
        self._scratch: tuple[int, int] | None = None   # the area scratch() hands out from
        self._scratch_used = 0
        self._own_maps: list[tuple[int, int]] = []      # areas we mapped, unmapped by close()

    # -- public ----------------------------------------------------------------------------
    def syscall(self, nr: int, *args: int) -> int:
        """Execute one system call; its raw result (negative = -errno)."""
        if len(args) > 6:
            raise ValueError("a system call takes at most 6 arguments")
        return self._on_tracer(self._syscall, nr, args)

    def call(self, nr: int, *args: int, step: str | None = None, path: str | None = None) -> int:
        """Like syscall(), but a negative result raises KernelError naming the call."""
        ret = self.syscall(nr, *args)
        if -4096 < ret < 0:
            name = NR_NAMES.get(nr, str(nr))
            raise KernelError(f"{name}{tuple(hex(a) for a in args)} in {self.tid}", -ret,
                              step=step or name, path=path or f"/proc/{self.tid}")
        return ret

    def scratch(self, size: int) -> int:
        """`size` bytes of writable memory in the tracee, valid until close()."""
        size = (size + 15) & ~15
        if self._scratch is None or self._scratch_used + size > self._scratch[1]:
            self._map_scratch(max(size, 4096))
        addr = self._scratch[0] + self._scratch_used
        self._scratch_used += size
        return addr

    def use_scratch(self, addr: int, size: int) -> None:
        """Hand out scratch from an existing rw area of the tracee (close() leaves it)."""
        self._scratch, self._scratch_used = (addr, size), 0

    def reset_scratch(self) -> None:
        """Hand out scratch from the start again (earlier addresses become free for reuse)."""
        self._scratch_used = 0

    def use_syscall_at(self, addr: int) -> None:
        """Execute calls from the `syscall` instruction at `addr` from now on."""
        self._insn = addr

    def read(self, addr: int, n: int) -> bytes:
        return mem_read(self.tid, addr, n)

    def write(self, addr: int, data: bytes) -> None:
        mem_write(self.tid, addr, data)

    def put(self, data: bytes) -> int:
        """Copy `data` into fresh scratch memory; its address. Scratch is writable, so one
        process_vm_writev does (no open of /proc/PID/mem per argument)."""
        addr = self.scratch(len(data))
        buf = ctypes.create_string_buffer(data, len(data))
        try:
            done = vm_writev(self.tid, [(ctypes.addressof(buf), len(data))], [(addr, len(data))])
        except KernelError:
            done = -1
        if done != len(data):
            self.write(addr, data)
        return addr

    def close(self) -> None:
        """Give the thread its registers back (resumable as before) and undo our changes."""
        self._on_tracer(self._close)

    def requeue_pending(self) -> None:
        """Send the signals that arrived during injection again (their siginfo is lost)."""
        for sig in self.pending:
            os.kill(self.tid, sig)
        self.pending.clear()

    # -- helpers for capture ---------------------------------------------------------------
    def sigaction(self, sig: int) -> tuple[int, int, int, int]:
        """(handler, flags, restorer, mask) as the kernel holds them (struct k_sigaction)."""
        buf = self.scratch(32)
        self.call(NR["rt_sigaction"], sig, 0, buf, 8)
        return struct.unpack("<4Q", self.read(buf, 32))

    def sigaltstack(self) -> tuple[int, int, int]:
        """(sp, flags, size) of the thread's alternate signal stack."""
        buf = self.scratch(24)
        self.call(NR["sigaltstack"], 0, buf)
        sp, flags, size = struct.unpack("<QI4xQ", self.read(buf, 24))
        return sp, flags, size

    def getitimer(self, which: int) -> tuple[int, int, int, int]:
        """(interval_sec, interval_usec, value_sec, value_usec) of ITIMER_REAL/VIRTUAL/PROF."""
        buf = self.scratch(32)
        self.call(NR["getitimer"], which, buf)
        return struct.unpack("<4q", self.read(buf, 32))

    def prctl(self, option: int, *args: int) -> int:
        return self.call(NR["prctl"], option, *args, step=f"prctl({option})")

    def get_tid_address(self) -> int:
        buf = self.scratch(8)
        self.prctl(PR_GET_TID_ADDRESS, buf)
        return struct.unpack("<Q", self.read(buf, 8))[0]

    # -- work on the tracer thread ---------------------------------------------------------
    def _on_tracer(self, fn, *args):
        return self.tracer.call(fn, *args) if self.tracer else fn(*args)

    def _syscall(self, nr: int, args: tuple[int, ...]) -> int:
        self._launch(nr, args)
        return self._step_through_call()

    def _launch(self, nr: int, args: tuple[int, ...]) -> None:
        """The saved registers with rip at the syscall insn, rax = nr, orig_rax = -1 and
        the arguments, set in one SETREGSET of raw bytes (no per-field conversion)."""
        if self._saved is None:
            self._saved_raw = ptrace.get_regs_raw(self.tid)
            self._saved = _regs_dict(self._saved_raw)
        regs = bytearray(self._saved_raw)
        pack = struct.pack_into
        pack("<Q", regs, OFF["rip"], self._insn_addr())
        pack("<Q", regs, OFF["rax"], nr)
        pack("<Q", regs, OFF["orig_rax"], 2**64 - 1)
        for reg, val in zip(ARG_REGS, args):
            pack("<Q", regs, OFF[reg], val & (2**64 - 1))
        ptrace.set_regs_raw(self.tid, regs)

    def start(self, nr: int, *args: int) -> None:
        """Launch a call and return while the tracee runs it (on its own CPU); finish() waits.
        Only from the thread that traces (no `tracer=` funnel), one call at a time."""
        self._launch(nr, args)
        self._step_through_call(until_entry=True)

    def finish(self) -> int:
        return self._step_through_call(resume=False, in_call=True)

    def _insn_addr(self) -> int:
        if self._insn is None:
            off = vdso_syscall_offset()
            rng = _vdso_range(self.tid)
            if off is not None and rng and off + 2 <= rng[1] - rng[0] \
                    and mem_read(self.tid, rng[0] + off, 2) == SYSCALL_INSN:
                self._insn = rng[0] + off
            else:   # no usable vDSO: borrow the two bytes at rip
                rip = self._saved["rip"]
                self._patch = (rip, mem_read(self.tid, rip, 2))
                mem_write(self.tid, rip, SYSCALL_INSN)
                self._insn = rip
        return self._insn

    def _step_through_call(self, *, resume: bool = True, in_call: bool = False,
                           until_entry: bool = False) -> int | None:
        """PTRACE_SYSCALL until the exit stop of our call; its return value.

        Syscall stops are told from real SIGTRAPs by their si_code (SIGTRAP, or SIGTRAP|0x80
        with PTRACE_O_TRACESYSGOOD), so the tracer's options do not matter; entry and exit
        stops alternate. A call interrupted by a signal (-ERESTART* at its exit) is let run
        on: the kernel restarts it once the (suppressed) signal is out of the way."""
        if resume:
            ptrace.resume_syscall(self.tid)
        while True:
            _, status = ptrace.wait(self.tid)
            if not os.WIFSTOPPED(status):
                raise ProcessGone(f"thread {self.tid} ended during an injected system call",
                                  path=f"/proc/{self.tid}", step="inject")
            event, sig = ptrace.stop_event(status), os.WSTOPSIG(status)
            if event in (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE):
                self.last_child = self._event_msg()
            elif not event and (sig == SIGTRAP | 0x80   # PTRACE_O_TRACESYSGOOD says so
                                or sig == SIGTRAP and self._is_syscall_stop()):
                if in_call:
                    ret = self._result()
                    if -ret not in RESTART_CODES:
                        return ret
                in_call = not in_call
                if in_call and until_entry:     # let it run the call; finish() collects
                    ptrace.resume_syscall(self.tid)
                    return None
            elif not event:
                self.pending.append(sig)
            ptrace.resume_syscall(self.tid)

    def _is_syscall_stop(self) -> bool:
        si = ctypes.create_string_buffer(128)
        ptrace._call(PTRACE_GETSIGINFO, self.tid, 0, ctypes.addressof(si),
                     step="PTRACE_GETSIGINFO")
        return struct.unpack_from("<i", si.raw, 8)[0] in (SIGTRAP, SIGTRAP | 0x80)

    def _result(self) -> int:
        return _signed(ptrace.peek_reg(self.tid, "rax"))

    def _event_msg(self) -> int:
        msg = ctypes.c_ulong()
        ptrace._call(PTRACE_GETEVENTMSG, self.tid, 0, ctypes.addressof(msg),
                     step="PTRACE_GETEVENTMSG")
        return msg.value

    def _map_scratch(self, size: int) -> None:
        size = (size + 4095) & ~4095
        addr = self.call(NR["mmap"], 0, size, PROT_RWX, MAP_PRIVATE_ANON, 2**64 - 1, 0,
                         step="mmap scratch")
        self._own_maps.append((addr, size))
        self._scratch, self._scratch_used = (addr, size), 0

    def _release_scratch(self) -> None:
        while self._own_maps:
            self.call(NR["munmap"], *self._own_maps.pop(), step="munmap scratch")
        self._scratch = None

    def _close(self) -> None:
        if self._saved is None:
            return
        self._release_scratch()
        if self._patch:
            mem_write(self.tid, *self._patch)
            self._patch = None
        park_with_regs(self.tid, self._saved, self.pending)
        self._saved = None


def in_interrupted_call(regs: dict[str, int]) -> bool:
    """The thread stopped inside a system call that the kernel will restart or fail."""
    return _signed(regs["orig_rax"]) >= 0 and -_signed(regs["rax"]) in RESTART_CODES


def park_with_regs(tid: int, regs: dict[str, int], pending: list[int]) -> None:
    """Set `regs` on a thread sitting in a syscall stop so that it resumes exactly as the
    kernel would resume them. The kernel decides whether an interrupted call restarts or
    fails with EINTR (that depends on the signal handler that may run first) only on its way
    out through signal delivery, which a syscall-exit stop skips. So the thread is sent a
    SIGSTOP and parked in that signal-delivery stop; the tracer later resumes or detaches
    it with signal 0, which drops the SIGSTOP and lets the restart logic see our registers.
    Other signals met on the way are suppressed and appended to `pending`."""
    ptrace.set_regs(tid, regs)
    if not in_interrupted_call(regs):
        return
    if _libc.syscall(NR["tkill"], tid, SIGSTOP) != 0:
        raise KernelError(f"tkill({tid}, SIGSTOP)", ctypes.get_errno(), step="park thread",
                          path=f"/proc/{tid}")
    while True:
        ptrace.cont(tid)
        _, status = ptrace.wait(tid)
        if not os.WIFSTOPPED(status):
            raise ProcessGone(f"thread {tid} ended while parked", path=f"/proc/{tid}",
                              step="park thread")
        if ptrace.stop_event(status) == 0:
            if os.WSTOPSIG(status) == SIGSTOP:
                return
            pending.append(os.WSTOPSIG(status))
