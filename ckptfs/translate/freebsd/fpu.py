"""FPU state: the XSAVE area, Linux NT_X86_XSTATE <-> FreeBSD PT_GETXSTATE/PT_SETXSTATE.

Both kernels hand out the hardware's standard (non-compacted) XSAVE image: the 512-byte
FXSAVE legacy region (== Linux user_fpregs_struct == FreeBSD struct fpreg, byte for byte),
the 64-byte XSAVE header at 512 (xstate_bv, xcomp_bv), then components at their CPUID
offsets. What differs (sys/amd64/amd64/ptrace_machdep.c, cpu_ptrace_xstate):
- Linux's ptrace buffer (struct user_xstateregs) carries XCR0, the features the buffer is
  laid out for, as the u64 at 464 in the legacy region's reserved tail (464-511), the rest
  zero. (The magic FP_XSTATE_MAGIC1/extended-size form of those bytes belongs to signal
  frames, not to ptrace.) FreeBSD puts nothing there: the feature mask and length come from
  PT_GETXSTATE_INFO (struct ptrace_xstate_info {uint64 xsave_mask; uint32 xsave_len;}).
- FreeBSD's buffer is always cpu_max_ext_state_size long (the target CPU's size);
  PT_SETXSTATE accepts 512 <= len <= that size and refuses (EINVAL) an xstate_bv with
  features the CPU has not enabled.
"""
from __future__ import annotations

import struct

from ...errors import Unsupported
from .. import LossLog

LEGACY_SIZE = 512
HEADER_SIZE = 64
MIN_SIZE = LEGACY_SIZE + HEADER_SIZE
SW_RESERVED = slice(464, 512)
SW_BYTES = struct.Struct("<Q40x")             # XCR0, then zeros (Linux user_xstateregs)
XSTATE_INFO = struct.Struct("<QI4x")          # struct ptrace_xstate_info, 16 bytes
XCOMP_COMPACTED = 1 << 63
XFEATURE_FP_SSE = 0b11                        # x87 and SSE: the FXSAVE region's two components


def header(xsave: bytes) -> tuple[int, int]:
    """(xstate_bv, xcomp_bv) of an XSAVE image."""
    return struct.unpack_from("<QQ", xsave, LEGACY_SIZE)


def with_header(area: bytes) -> bytes:
    """A bare 512-byte FXSAVE area (a checkpoint from a CPU without XSAVE) as an XSAVE
    image: the header says x87 and SSE state are present, nothing else."""
    if len(area) >= MIN_SIZE:
        return bytes(area)
    return bytes(area[:LEGACY_SIZE]).ljust(LEGACY_SIZE, b"\0") + \
        struct.pack("<Q", XFEATURE_FP_SSE).ljust(HEADER_SIZE, b"\0")


def beyond_sse(xsave: bytes) -> int:
    """Components of an XSAVE image a bare FXSAVE area (PT_SETFPREGS) cannot hold."""
    return header(xsave)[0] & ~XFEATURE_FP_SSE if len(xsave) >= MIN_SIZE else 0


def fpreg(xsave: bytes) -> bytes:
    """FreeBSD struct fpreg (PT_SETFPREGS) = the FXSAVE legacy region."""
    return bytes(xsave[:LEGACY_SIZE])


def to_fbsd(xsave: bytes, log: LossLog, path: str, target_mask: int | None = None,
            target_len: int | None = None) -> bytes:
    """Linux NT_X86_XSTATE bytes -> PT_SETXSTATE bytes for a CPU with `target_mask`/`len`."""
    _check(xsave, path)
    bv, _ = header(xsave)
    buf = bytearray(xsave)
    buf[SW_RESERVED] = bytes(SW_RESERVED.stop - SW_RESERVED.start)
    if target_mask is not None and bv & ~target_mask:
        log.note(path, hex(bv), f"XSAVE components {bv & ~target_mask:#x} are not enabled on "
                 "the target CPU; their state is dropped")
        struct.pack_into("<Q", buf, LEGACY_SIZE, bv & target_mask)
    if target_len is not None:
        buf = _resize(buf, target_len, log, path)
    return bytes(buf)


def _check(xsave: bytes, path: str) -> None:
    if len(xsave) < MIN_SIZE:
        raise Unsupported(f"XSAVE area of {len(xsave)} bytes (need >= {MIN_SIZE})", path=path)
    if header(xsave)[1] & XCOMP_COMPACTED:
        raise Unsupported("compacted XSAVE format (XSAVES); ptrace gives the standard form",
                          path=path)


def _resize(buf: bytearray, size: int, log: LossLog, path: str) -> bytearray:
    if size < MIN_SIZE:
        raise Unsupported(f"target XSAVE size {size} is below {MIN_SIZE}", path=path)
    if size < len(buf) and any(buf[size:]):
        log.note(path, f"{len(buf)} bytes", f"the target XSAVE area is {size} bytes; state "
                 "beyond it is dropped")
    return bytearray(buf[:size]) + bytearray(max(0, size - len(buf)))


def to_linux(xstate: bytes, xsave_mask: int, path: str = "") -> bytes:
    """FreeBSD PT_GETXSTATE bytes + PT_GETXSTATE_INFO mask -> Linux NT_X86_XSTATE bytes."""
    _check(xstate, path)
    buf = bytearray(xstate)
    buf[SW_RESERVED] = SW_BYTES.pack(xsave_mask)
    return bytes(buf)


def linux_xfeatures(xsave: bytes) -> int | None:
    """XCR0 from a Linux ptrace XSAVE buffer, or None if it is not there."""
    xcr0 = SW_BYTES.unpack_from(xsave, SW_RESERVED.start)[0]
    return xcr0 or None


def pack_xstate_info(mask: int, length: int) -> bytes:
    return XSTATE_INFO.pack(mask, length)


def unpack_xstate_info(data: bytes) -> tuple[int, int]:
    return XSTATE_INFO.unpack(data)
