"""The x86 XSAVE area (PTRACE_GETREGSET NT_X86_XSTATE) <-> CRIU's user_x86_fpregs_entry.

Layout of the buffer the kernel gives (standard, uncompacted format):

    0..511     FXSAVE legacy area: cwd swd twd fop (u16), rip rdp (u64), mxcsr mxcsr_mask (u32),
               st_space (32 u32 at 32), xmm_space (64 u32 at 160), padding (12 u32 at 416),
               464..511 "sw_reserved": in a ptrace buffer (struct user_xstateregs) the u64 at
               464 is XCR0, the features the buffer is laid out for, and the rest is zero;
               in a signal frame it is instead magic1 u32 (0x46505853), extended_size u32,
               xfeatures u64, xstate_size u32
    512..575   XSAVE header: xstate_bv u64 at 512, xcomp_bv (0 in standard format), reserved
    576..      components at their CPUID leaf 0xD offsets. In the standard format these are
               fixed by the architecture; checked on this host's CPU (CPUID 0xD: YMM 576/256,
               opmask 1088/64, ZMM_Hi256 1152/512, Hi16_ZMM 1664/1024, total 2688 for XCR0
               0xe7). MPX (960, 1024) and PKRU (2688) follow the same table.

`split` keeps every byte CRIU has a field for; `join` rebuilds the buffer, so
join(split(b)) == b for the buffers the kernel hands out (gaps and header tail are zero).
"""
from __future__ import annotations

import struct

from . import pb

FXSAVE_SIZE = 512
XSAVE_HDR_END = 576
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2_SIZE = 4
XFEATURE_FP_SSE = 0b11

# (xfeature bit, user_x86_xsave_entry field, offset, bytes, word format)
COMPONENTS = [
    (2, "ymmh_space", 576, 256, "I"),
    (3, "bndreg_state", 960, 64, "Q"),
    (4, "bndcsr_state", 1024, 64, "Q"),
    (5, "opmask_reg", 1088, 64, "Q"),
    (6, "zmm_upper", 1152, 512, "Q"),
    (7, "hi16_zmm", 1664, 1024, "Q"),
    (9, "pkru", 2688, 8, "I"),
]

# The FXSAVE legacy area: (field, offset, struct format). Scalars first, then word arrays.
_LEGACY_SCALARS = [("cwd", 0, "H"), ("swd", 2, "H"), ("twd", 4, "H"), ("fop", 6, "H"),
                   ("rip", 8, "Q"), ("rdp", 16, "Q"), ("mxcsr", 24, "I"),
                   ("mxcsr_mask", 28, "I")]
_LEGACY_ARRAYS = [("st_space", 32, 32), ("xmm_space", 160, 64), ("padding", 416, 12)]
_SW = struct.Struct("<IIQI")   # magic1, extended_size, xfeatures, xstate_size at 464


def sw_bytes(buf: bytes) -> tuple[int, int]:
    """(xfeatures, size) the buffer describes in bytes 464..511 (ptrace or signal-frame form);
    (0, len) for a bare FXSAVE area."""
    if len(buf) < XSAVE_HDR_END:
        return 0, len(buf)
    magic, _ext, xfeatures, size = _SW.unpack_from(buf, 464)
    if magic == FP_XSTATE_MAGIC1:
        return xfeatures, size
    return struct.unpack_from("<Q", buf, 464)[0], len(buf)


def xstate_bv(buf: bytes) -> int:
    return struct.unpack_from("<Q", buf, FXSAVE_SIZE)[0] if len(buf) >= XSAVE_HDR_END else 0


def _words(buf: bytes, offset: int, nbytes: int, fmt: str) -> list[int]:
    n = nbytes // struct.calcsize(fmt)
    return list(struct.unpack_from(f"<{n}{fmt}", buf, offset))


def split(buf: bytes):
    """An NT_X86_XSTATE (or 512-byte FXSAVE) buffer -> pb.user_x86_fpregs_entry."""
    if len(buf) < FXSAVE_SIZE:
        raise ValueError(f"xsave buffer of {len(buf)} bytes is shorter than the FXSAVE area (512)")
    fp = pb.user_x86_fpregs_entry()
    for name, off, fmt in _LEGACY_SCALARS:
        setattr(fp, name, struct.unpack_from("<" + fmt, buf, off)[0])
    for name, off, count in _LEGACY_ARRAYS:
        getattr(fp, name).extend(_words(buf, off, count * 4, "I"))
    if len(buf) < XSAVE_HDR_END:
        return fp
    xfeatures, _ = sw_bytes(buf)
    xs = fp.xsave
    xs.xstate_bv = xstate_bv(buf)
    for bit, name, off, size, fmt in COMPONENTS:
        enabled = xfeatures & (1 << bit) if xfeatures else off + size <= len(buf)
        if enabled and off + size <= len(buf):
            getattr(xs, name).extend(_words(buf, off, size, fmt))
    return fp


def features_of(fp) -> int:
    """XCR0 bits an entry carries: x87 and SSE always, plus each component present."""
    bits = XFEATURE_FP_SSE
    if fp.HasField("xsave"):
        for bit, name, *_ in COMPONENTS:
            if len(getattr(fp.xsave, name)):
                bits |= 1 << bit
    return bits


def size_of(xfeatures: int) -> int:
    """Standard-format buffer size for a set of XCR0 bits."""
    end = XSAVE_HDR_END
    for bit, _name, off, size, _fmt in COMPONENTS:
        if xfeatures & (1 << bit):
            end = max(end, off + size)
    return end


def join(fp, xfeatures: int | None = None, size: int | None = None) -> bytes:
    """pb.user_x86_fpregs_entry -> the buffer PTRACE_SETREGSET(NT_X86_XSTATE) takes.

    `xfeatures`/`size` describe the target buffer (Meta.xfeatures/xsave_size of the source);
    by default they are derived from the components the entry holds. Without `xsave` the
    result is the 512-byte FXSAVE area.
    """
    if not fp.HasField("xsave"):
        size = FXSAVE_SIZE
    xfeatures = features_of(fp) if xfeatures is None else xfeatures
    size = size_of(xfeatures) if size is None else size
    buf = bytearray(size)
    for name, off, fmt in _LEGACY_SCALARS:
        struct.pack_into("<" + fmt, buf, off, getattr(fp, name))
    for name, off, count in _LEGACY_ARRAYS:
        words = list(getattr(fp, name))[:count]
        struct.pack_into(f"<{len(words)}I", buf, off, *words)
    if size < XSAVE_HDR_END:
        return bytes(buf)
    struct.pack_into("<Q", buf, 464, xfeatures)     # the ptrace form (user_xstateregs)
    struct.pack_into("<Q", buf, FXSAVE_SIZE, fp.xsave.xstate_bv)
    for bit, name, off, nbytes, fmt in COMPONENTS:
        words = list(getattr(fp.xsave, name))
        if words and off + nbytes <= size:
            words = words[:nbytes // struct.calcsize(fmt)]
            struct.pack_into(f"<{len(words)}{fmt}", buf, off, *words)
    return bytes(buf)
