"""ptrace behind one adapter (x86_64 Linux).

python-ptrace supplies the raw call and the register struct; this module keeps its
camelCase and exceptions from spreading: every failure becomes errors.KernelError (errno kept,
pid named) or errors.ProcessGone (ESRCH).

The kernel accepts ptrace requests for a tracee only from the thread that attached it, so a
multi-threaded program (the FUSE daemon) funnels all ptrace work through one `Tracer` thread.
"""
from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading

from ptrace.binding import func as _pt
from ptrace.binding.linux_struct import user_regs_struct

from .errors import KernelError, ProcessGone
from .flags import GP_REGS

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_ARCH_PRCTL = 30

PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_EXITKILL = 1 << 20
PTRACE_EVENT_STOP = 128

NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202
XSTATE_BUF = 16384   # larger than any xsave area; the kernel trims iov_len to the real size

__WALL = 0x40000000
REG_NAMES = [name for name, _ in GP_REGS]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _RseqConfig(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


def _call(request: int, tid: int, addr: int = 0, data: int = 0, *, step: str) -> int:
    try:
        return _pt.ptrace(request, tid, addr, data)
    except _pt.PtraceError as e:
        err = e.errno or errno.EIO
        if err == errno.ESRCH:
            raise ProcessGone(f"thread {tid} is gone or not stopped", step=step,
                              path=f"/proc/{tid}") from None
        raise KernelError(f"ptrace({step}) on {tid}", err, step=step,
                          path=f"/proc/{tid}") from None


def request(req: int, tid: int, addr: int = 0, data: int = 0, *, step: str) -> int:
    """Any other ptrace request, with this module's error handling (errno kept, step named)."""
    return _call(req, tid, addr, data, step=step)


def seize(tid: int, options: int = 0) -> None:
    """Attach without stopping: invisible to the tracee's parent and job control."""
    _call(PTRACE_SEIZE, tid, 0, options, step="PTRACE_SEIZE")


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid, step="PTRACE_INTERRUPT")


def cont(tid: int, sig: int = 0) -> None:
    _call(PTRACE_CONT, tid, 0, sig, step="PTRACE_CONT")


def syscall_step(tid: int, sig: int = 0) -> None:
    """Resume until the next system-call entry or exit (PTRACE_SYSCALL)."""
    _call(PTRACE_SYSCALL, tid, 0, sig, step="PTRACE_SYSCALL")


def get_siginfo(tid: int) -> bytes:
    """The 128-byte siginfo of the signal that caused the current stop."""
    buf = ctypes.create_string_buffer(128)
    _call(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf), step="PTRACE_GETSIGINFO")
    return buf.raw


def get_event_msg(tid: int) -> int:
    msg = ctypes.c_ulong()
    _call(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg), step="PTRACE_GETEVENTMSG")
    return msg.value


def listen(tid: int) -> None:
    _call(PTRACE_LISTEN, tid, step="PTRACE_LISTEN")


def detach(tid: int, sig: int = 0) -> None:
    _call(PTRACE_DETACH, tid, 0, sig, step="PTRACE_DETACH")


def set_options(tid: int, options: int) -> None:
    _call(PTRACE_SETOPTIONS, tid, 0, options, step="PTRACE_SETOPTIONS")


def wait(tid: int, *, nohang: bool = False) -> tuple[int, int] | None:
    """waitpid(tid, __WALL): (tid, raw status), or None with nohang and nothing to report."""
    try:
        got, status = os.waitpid(tid, __WALL | (os.WNOHANG if nohang else 0))
    except ChildProcessError:
        raise ProcessGone(f"thread {tid} is not traced by this thread", step="waitpid") from None
    except OSError as e:
        raise KernelError(f"waitpid({tid})", e.errno, step="waitpid") from None
    return None if got == 0 else (got, status)


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* of a stop status (0 if none)."""
    return (status >> 16) & 0xFF


def _regset(request: int, tid: int, note: int, buf, size: int, step: str) -> int:
    iov = _IoVec(ctypes.addressof(buf), size)
    _call(request, tid, note, ctypes.addressof(iov), step=step)
    return iov.len


def get_regs(tid: int) -> dict[str, int]:
    """struct user_regs_struct as a dict keyed by the tree's register names."""
    regs = user_regs_struct()
    _regset(PTRACE_GETREGSET, tid, NT_PRSTATUS, regs, ctypes.sizeof(regs), "GETREGSET NT_PRSTATUS")
    return {name: getattr(regs, name) & (2**64 - 1) for name in REG_NAMES}


def set_regs(tid: int, values: dict[str, int]) -> None:
    regs = user_regs_struct()
    for name in REG_NAMES:
        setattr(regs, name, values[name] & (2**64 - 1))
    _regset(PTRACE_SETREGSET, tid, NT_PRSTATUS, regs, ctypes.sizeof(regs), "SETREGSET NT_PRSTATUS")


def get_xstate(tid: int) -> bytes:
    """The XSAVE area (standard format), exactly as long as the kernel says."""
    buf = ctypes.create_string_buffer(XSTATE_BUF)
    n = _regset(PTRACE_GETREGSET, tid, NT_X86_XSTATE, buf, XSTATE_BUF, "GETREGSET NT_X86_XSTATE")
    return buf.raw[:n]


# -- raw registers: the injector's hot path (one injected call = one SETREGSET, two resumes,
# two waits, one PEEKUSER), without python-ptrace's per-field struct conversions -------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_PEEKUSER = 3
REGS_SIZE = ctypes.sizeof(user_regs_struct)
REG_OFFSET = {name: 8 * i for i, name in enumerate(f[0] for f in user_regs_struct._fields_)}


def _raw(request: int, tid: int, addr: int, data: int, step: str) -> int:
    ctypes.set_errno(0)
    ret = _libc.ptrace(request, tid, addr, data)
    err = ctypes.get_errno()
    if ret == -1 and err:
        if err == errno.ESRCH:
            raise ProcessGone(f"thread {tid} is gone or not stopped", step=step,
                              path=f"/proc/{tid}")
        raise KernelError(f"ptrace({step}) on {tid}", err, step=step, path=f"/proc/{tid}")
    return ret


def get_regs_raw(tid: int) -> bytearray:
    """struct user_regs_struct as bytes (fields at REG_OFFSET, little-endian u64)."""
    buf = ctypes.create_string_buffer(REGS_SIZE)
    iov = _IoVec(ctypes.addressof(buf), REGS_SIZE)
    _raw(PTRACE_GETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov), "GETREGSET NT_PRSTATUS")
    return bytearray(buf.raw)


def set_regs_raw(tid: int, regs: bytearray) -> None:
    buf = (ctypes.c_char * REGS_SIZE).from_buffer(regs)
    iov = _IoVec(ctypes.addressof(buf), REGS_SIZE)
    _raw(PTRACE_SETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov), "SETREGSET NT_PRSTATUS")


def peek_reg(tid: int, name: str) -> int:
    """One register (PTRACE_PEEKUSER), as an unsigned 64-bit value."""
    return _raw(PTRACE_PEEKUSER, tid, REG_OFFSET[name], 0, "PTRACE_PEEKUSER") & (2**64 - 1)


def resume_syscall(tid: int) -> None:
    """PTRACE_SYSCALL through the raw path (the injector's loop)."""
    _raw(PTRACE_SYSCALL, tid, 0, 0, "PTRACE_SYSCALL")


def set_xstate(tid: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    _regset(PTRACE_SETREGSET, tid, NT_X86_XSTATE, buf, len(data), "SETREGSET NT_X86_XSTATE")


def get_sigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    _call(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask), step="PTRACE_GETSIGMASK")
    return mask.value


def set_sigmask(tid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask)
    _call(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(m), step="PTRACE_SETSIGMASK")


def get_rseq(tid: int) -> _RseqConfig:
    conf = _RseqConfig()
    _call(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), ctypes.addressof(conf),
          step="PTRACE_GET_RSEQ_CONFIGURATION")
    return conf


class Tracer:
    """One thread that issues every ptrace request; others hand it work with `call`.

    Functions given to `call` run on the tracer thread, so they may use the module's
    functions directly. Exceptions are re-raised in the caller.
    """

    def __init__(self, name: str = "ckptfs-tracer"):
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, kw, box, done = item
            try:
                box.append((True, fn(*args, **kw)))
            except BaseException as e:  # handed back to the caller, never lost
                box.append((False, e))
            done.set()

    def call(self, fn, *args, **kw):
        if threading.current_thread() is self._thread:
            return fn(*args, **kw)
        box: list = []
        done = threading.Event()
        self._q.put((fn, args, kw, box, done))
        done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
