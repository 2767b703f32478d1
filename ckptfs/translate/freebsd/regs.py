"""amd64 general registers: Linux user_regs_struct <-> FreeBSD struct reg.

FreeBSD `struct reg` (sys/x86/include/reg.h, struct __reg64) is 176 bytes in a different
order from Linux's 216-byte user_regs_struct, has 16-bit segment selectors, two trap fields
(r_trapno, r_err) and no orig_rax / fs_base / gs_base. The bases travel separately
(PT_GETFSBASE/PT_SETFSBASE 71/72, PT_GETGSBASE/PT_SETGSBASE 73/74).

Syscall restart. Linux: a task stopped while a system call was interrupted shows
rax = -ERESTART* and orig_rax = the call number, with rip *after* the `syscall` instruction;
the kernel decides on the way out whether to restart. FreeBSD: the kernel resolves ERESTART
(-1, kernel-internal) itself before the thread reaches user mode: it rewinds rip by the
instruction length (tf_err) and leaves rax = the call number, so a stopped FreeBSD thread is
always at a clean user-mode boundary. We therefore resolve a Linux restart when going to
FreeBSD exactly as CRIU's restorer does on Linux: rax = orig_rax, rip -= 2 (ERESTARTSYS,
ERESTARTNOINTR, ERESTARTNOHAND); for ERESTART_RESTARTBLOCK the call is re-issued with its
original arguments (lossy: a relative sleep starts over). Coming back, orig_rax = -1 (not in
a system call), which is what Linux shows for such a thread and restores identically.
"""
from __future__ import annotations

import struct

from ... import flags as L
from .. import LossLog

# FreeBSD field, struct code, Linux user_regs_struct name (None: FreeBSD only).
FBSD_REG = (
    ("r_r15", "Q", "r15"), ("r_r14", "Q", "r14"), ("r_r13", "Q", "r13"), ("r_r12", "Q", "r12"),
    ("r_r11", "Q", "r11"), ("r_r10", "Q", "r10"), ("r_r9", "Q", "r9"), ("r_r8", "Q", "r8"),
    ("r_rdi", "Q", "rdi"), ("r_rsi", "Q", "rsi"), ("r_rbp", "Q", "rbp"), ("r_rbx", "Q", "rbx"),
    ("r_rdx", "Q", "rdx"), ("r_rcx", "Q", "rcx"), ("r_rax", "Q", "rax"),
    ("r_trapno", "I", None), ("r_fs", "H", "fs"), ("r_gs", "H", "gs"), ("r_err", "I", None),
    ("r_es", "H", "es"), ("r_ds", "H", "ds"), ("r_rip", "Q", "rip"), ("r_cs", "Q", "cs"),
    ("r_rflags", "Q", "eflags"), ("r_rsp", "Q", "rsp"), ("r_ss", "Q", "ss"),
)
REG_NAMES = tuple(r[0] for r in FBSD_REG)
REG_STRUCT = struct.Struct("<" + "".join(r[1] for r in FBSD_REG))
REG_WIDTH = {r[0]: {"Q": 64, "I": 32, "H": 16}[r[1]] for r in FBSD_REG}
assert REG_STRUCT.size == 176
LINUX_NAMES = tuple(name for name, _ in L.GP_REGS)

# User segment selectors each kernel loads (Linux __USER_CS/__USER_DS; FreeBSD
# GSEL(GUCODE_SEL=8), GSEL(GUDATA_SEL=7), GSEL(GUFS32_SEL=2), GSEL(GUGS32_SEL=3), RPL 3).
# Selectors are the kernel's business: translate the defaults, never copy raw values.
SELECTORS = (("cs", 0x33, 0x43), ("ss", 0x2b, 0x3b), ("ds", 0, 0x3b), ("es", 0, 0x3b),
             ("fs", 0, 0x13), ("gs", 0, 0x1b))

# RFLAGS bits user code may change (FreeBSD PSL_USERCHANGE); set_regs refuses others that
# differ from the current value, which for a user thread is IF and the always-one bit 1.
PSL_USERCHANGE = 0x254DD5
PSL_KERNEL_FIXED = 0x202

ERESTART = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
            516: "ERESTART_RESTARTBLOCK"}
SYSCALL_INSN_LEN = 2
U64 = (1 << 64) - 1
NOT_IN_SYSCALL = U64            # orig_rax = -1


def signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def resolve_restart(regs: dict[str, int], log: LossLog, path: str) -> dict[str, int]:
    """Linux registers with a pending syscall restart -> the state just before the
    `syscall` instruction is executed again; orig_rax = -1 afterwards."""
    out = dict(regs)
    out["orig_rax"] = NOT_IN_SYSCALL
    nr = signed(regs["orig_rax"])
    code = -signed(regs["rax"])
    if nr < 0 or code not in ERESTART:
        return out
    if ERESTART[code] == "ERESTART_RESTARTBLOCK":
        log.note(path, f"rax=-{ERESTART[code]} orig_rax={nr}", "FreeBSD has no "
                 "restart_syscall state: the call is re-issued with its original arguments")
    out["rax"] = nr
    out["rip"] = (regs["rip"] - SYSCALL_INSN_LEN) & U64
    return out


def to_fbsd(regs: dict[str, int], log: LossLog, path: str) -> tuple[dict[str, int], int, int]:
    """Linux user_regs_struct (tree names) -> (struct reg fields in order, fsbase, gsbase)."""
    missing = [n for n in LINUX_NAMES if n not in regs]
    if missing:
        raise KeyError(f"{path}: registers missing: {' '.join(missing)}")
    lin = resolve_restart(regs, log, path)
    out = {}
    for fname, _, lname in FBSD_REG:
        out[fname] = 0 if lname is None else lin[lname] & U64
    for lname, ldef, fdef in SELECTORS:
        if lin[lname] != ldef:
            log.note(f"{path}/{lname}", hex(lin[lname]), "not the Linux 64-bit user selector "
                     f"{ldef:#x}; FreeBSD gets its own {fdef:#x} (32-bit code cannot move)")
        out[f"r_{lname}"] = fdef
    out["r_rflags"] = _rflags(lin["eflags"], log, path)
    return out, lin["fs_base"] & U64, lin["gs_base"] & U64


def _rflags(value: int, log: LossLog, path: str) -> int:
    extra = value & ~(PSL_USERCHANGE | PSL_KERNEL_FIXED)
    if extra:
        log.note(f"{path}/eflags", hex(value), f"privileged RFLAGS bits {extra:#x} cannot be "
                 "set from user space on FreeBSD")
    return (value & PSL_USERCHANGE) | PSL_KERNEL_FIXED


def to_linux(reg: dict[str, int], fsbase: int, gsbase: int, log: LossLog,
             path: str) -> dict[str, int]:
    """FreeBSD struct reg + bases -> Linux user_regs_struct (tree names, kernel order)."""
    out = {lname: reg[fname] & U64 for fname, _, lname in FBSD_REG if lname}
    for fname in ("r_trapno", "r_err"):
        if reg.get(fname):
            log.note(f"{path}/{fname}", hex(reg[fname]), "Linux user_regs_struct has no "
                     "trap number / error code")
    for lname, ldef, fdef in SELECTORS:
        if reg[f"r_{lname}"] != fdef:
            log.note(f"{path}/r_{lname}", hex(reg[f"r_{lname}"]), "not the FreeBSD 64-bit user "
                     f"selector {fdef:#x}; Linux gets its own {ldef:#x}")
        out[lname] = ldef
    out["orig_rax"] = NOT_IN_SYSCALL
    out["fs_base"], out["gs_base"] = fsbase & U64, gsbase & U64
    return {name: out[name] for name in LINUX_NAMES}


def pack(reg: dict[str, int]) -> bytes:
    """struct reg as PT_SETREGS wants it (176 bytes, little endian)."""
    return REG_STRUCT.pack(*(reg[n] & ((1 << REG_WIDTH[n]) - 1) for n in REG_NAMES))


def unpack(data: bytes) -> dict[str, int]:
    if len(data) != REG_STRUCT.size:
        raise ValueError(f"struct reg is {REG_STRUCT.size} bytes, got {len(data)}")
    return dict(zip(REG_NAMES, REG_STRUCT.unpack(data)))


def equivalent_linux(regs: dict[str, int]) -> dict[str, int]:
    """The Linux registers a FreeBSD round trip gives back, for comparing: restart resolved,
    selectors at the Linux defaults, RFLAGS reduced to what user space can set."""
    log = LossLog()
    out = resolve_restart(regs, log, "")
    for lname, ldef, _ in SELECTORS:
        out[lname] = ldef
    out["eflags"] = (out["eflags"] & PSL_USERCHANGE) | PSL_KERNEL_FIXED
    return {k: v & U64 for k, v in out.items()}
