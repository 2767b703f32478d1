"""The one small interface to FreeBSD (amd64) system calls, through ctypes and libc.

Everything FreeBSD-specific the FreeBSD capture and restore need goes through here:
ptrace (PT_ATTACH/PT_DETACH/PT_CONTINUE, PT_GETREGS/PT_SETREGS, PT_GET/SETFSBASE,
PT_GET/SETGSBASE, PT_GETXSTATE_INFO/PT_GETXSTATE/PT_SETXSTATE, PT_IO), sysctl
kern.proc.vmmap / kern.proc.filedesc (packed kinfo_vmentry / kinfo_file records), jail_set /
jail_get with name/value iovecs, rctl_add_rule.

Numbers: sys/sys/ptrace.h, sys/x86/include/ptrace.h, sys/sys/user.h (record layouts, checked
against KINFO_VMENTRY_SIZE 1160 / KINFO_FILE_SIZE 1392), sys/sys/sysctl.h, sys/sys/jail.h.
The record parsers are pure functions and work anywhere; every system call raises
errors.Unsupported on a system that is not FreeBSD, and errors.KernelError (native errno,
the step and the pid) when FreeBSD refuses.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import struct
import sys

from ..errors import KernelError, Unsupported

IS_FREEBSD = sys.platform.startswith("freebsd")

# sys/sys/ptrace.h, sys/x86/include/ptrace.h (PT_FIRSTMACH 64 + n)
PT_TRACE_ME, PT_READ_I, PT_READ_D, PT_WRITE_I, PT_WRITE_D = 0, 1, 2, 4, 5
PT_CONTINUE, PT_KILL, PT_STEP, PT_ATTACH, PT_DETACH, PT_IO = 7, 8, 9, 10, 11, 12
PT_LWPINFO, PT_GETNUMLWPS, PT_GETLWPLIST = 13, 14, 15
PT_SUSPEND, PT_RESUME, PT_FOLLOW_FORK, PT_LWP_EVENTS = 18, 19, 23, 24
PL_FLAG_FORKED, PL_FLAG_CHILD, PL_FLAG_BORN, PL_FLAG_EXITED = 0x40, 0x80, 0x100, 0x200
PT_GETREGS, PT_SETREGS, PT_GETFPREGS, PT_SETFPREGS = 33, 34, 35, 36
PT_GETXSTATE_INFO, PT_GETXSTATE, PT_SETXSTATE = 68, 69, 70
PT_GETFSBASE, PT_SETFSBASE, PT_GETGSBASE, PT_SETGSBASE = 71, 72, 73, 74
PIOD_READ_D, PIOD_WRITE_D, PIOD_READ_I, PIOD_WRITE_I = 1, 2, 3, 4

# sysctl MIBs
CTL_KERN, KERN_PROC, KERN_PROC_VMMAP, KERN_PROC_FILEDESC = 1, 14, 32, 33
KERN_PROC_PID = 1
KERN_PROC_AUXV = 36                                # sys/sys/sysctl.h
KERN_PROC_PROC = 8                                 # every process, one record each (no threads)
KERN_FILE = 15                                     # kern.file: every open descriptor (struct xfile)
KI_JID_OFFSET, KINFO_PROC_SIZE = 0x250, 1088      # struct kinfo_proc (amd64): ki_jid
SIGKILL = 9

# sys/sys/user.h
KVME_TYPE = {0: "none", 1: "default", 2: "vnode", 3: "swap", 4: "device", 5: "phys",
             6: "dead", 7: "sg", 8: "mgtdevice", 9: "guard", 255: "unknown"}
KVME_PROT_READ, KVME_PROT_WRITE, KVME_PROT_EXEC = 1, 2, 4
KVME_FLAG = {"COW": 0x1, "NEEDS_COPY": 0x2, "NOCOREDUMP": 0x4, "SUPER": 0x8,
             "GROWS_UP": 0x10, "GROWS_DOWN": 0x20, "USER_WIRED": 0x40}
KF_TYPE = {0: "none", 1: "vnode", 2: "socket", 3: "pipe", 4: "fifo", 5: "kqueue", 6: "crypto",
           7: "mqueue", 8: "shm", 9: "sem", 10: "pts", 11: "procdesc", 12: "dev",
           13: "eventfd", 14: "timerfd", 255: "unknown"}
KF_FLAG = {"READ": 0x1, "WRITE": 0x2, "APPEND": 0x4, "ASYNC": 0x8, "FSYNC": 0x10,
           "NONBLOCK": 0x20, "DIRECT": 0x40, "HASLOCK": 0x80, "SHLOCK": 0x100,
           "EXLOCK": 0x200, "NOFOLLOW": 0x400, "CREAT": 0x800, "TRUNC": 0x1000,
           "EXCL": 0x2000, "EXEC": 0x4000}

# sys/sys/jail.h
JAIL_CREATE, JAIL_UPDATE, JAIL_ATTACH, JAIL_DYING = 0x1, 0x2, 0x4, 0x8
JAILSYS = {"disable": 0, "new": 1, "inherit": 2}
JAILSYS_PARAMS = frozenset({"host", "vnet", "ip4", "ip6", "sysvmsg", "sysvsem", "sysvshm",
                            "linux"})

REG_SIZE = 176
FPREG_SIZE = 512                                  # struct fpreg = the FXSAVE region
KVE = struct.Struct("<iiQQQQIiiiiiiiQIHHQQ")      # through kve_vn_rdev (offset 104)
# kve_type_spec is kve_vn_fsid for a vnode and kve_obj for anonymous memory (sys/sys/user.h)
ANON_KINDS = ("default", "swap")
KVE_PATH_OFFSET, KINFO_VMENTRY_SIZE = 136, 1160
KF = struct.Struct("<iiiiiiq")                    # structsize, type, fd, ref_count, flags, pad, offset
KF_STATUS_OFFSET, KF_PATH_OFFSET, KINFO_FILE_SIZE = 336, 368, 1392
# kf_un at 32 (after kf_offset); kf_pipe: 16 + 256 spare bytes, then kf_pipe_addr,
# kf_pipe_peer (u64) and kf_pipe_buffer_cnt (u32); kf_eventfd: kf_eventfd_value (u64),
# kf_eventfd_flags (u32) at the start of the union
KF_UN_OFFSET, KF_PIPE_OFFSET = 32, 32 + 16 + 256
KF_PIPE = struct.Struct("<QQI")
# kf_file: kf_file_type, 3 spare ints, 30 spare u64, then kf_file_fsid, kf_file_rdev,
# kf_file_fileid (u64 each)
KF_FILEID_OFFSET = KF_UN_OFFSET + 16 + 240 + 16
KF_EVENTFD = struct.Struct("<QI")
assert KF_PIPE_OFFSET + KF_PIPE.size + 12 == KF_STATUS_OFFSET      # kf_pipe_pad0[3]


# struct ptrace_lwpinfo (amd64): lwpid, event, flags, sigmask[4], siglist[4], then siginfo
# (80 bytes, 8-aligned at 48), pl_tdname[MAXCOMLEN + 1] at 128, pl_child_pid at 148, the two
# syscall words; 160 bytes in all. PT_LWPINFO's data is this size.
LWPINFO = struct.Struct("<iii4I4I4x80x20siII")
LWPINFO_SIZE = 160
assert LWPINFO.size == LWPINFO_SIZE


class ptrace_io_desc(ctypes.Structure):
    _fields_ = [("piod_op", ctypes.c_int), ("piod_offs", ctypes.c_void_p),
                ("piod_addr", ctypes.c_void_p), ("piod_len", ctypes.c_size_t)]


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


assert ctypes.sizeof(ptrace_io_desc) == 32


# -- pure parsers -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VmEntry:
    start: int
    end: int               # exclusive
    offset: int
    kind: str              # KVME_TYPE name
    prot: int              # KVME_PROT bits (same as PROT_ bits)
    flags: int             # KVME_FLAG bits
    fileid: int
    path: str
    obj: int = 0           # kve_obj: the anonymous VM object's address (FreeBSD 13.1+/14),
    #                        the same in every process mapping one shared object

    @property
    def private(self) -> bool:
        """FreeBSD has no p/s column: a copy-on-write entry is a private map."""
        return bool(self.flags & KVME_FLAG["COW"])


@dataclasses.dataclass(frozen=True)
class FileEntry:
    fd: int                # negative: KF_FD_TYPE_CWD -1, ROOT -2, JAIL -3, TRACE -4, TEXT -5 ...
    kind: str              # KF_TYPE name
    flags: int             # KF_FLAG bits (not O_ bits)
    offset: int
    path: str
    # kf_un, by kind: a pipe end's own struct pipe, its peer's, and the bytes queued in it
    # (queued toward this end's reader); an eventfd's counter and EFD_ flags
    pipe_addr: int = 0
    pipe_peer: int = 0
    pipe_count: int = 0
    efd_value: int = 0
    efd_flags: int = 0
    fileid: int = 0        # kf_file_fileid of a vnode or FIFO (its inode number)


@dataclasses.dataclass(frozen=True)
class LwpInfo:
    lwpid: int
    event: int
    flags: int             # PL_FLAG_ bits
    sigmask: tuple         # FreeBSD sigset_t __bits[4] (the Linuxulator keeps Linux masks here
    siglist: tuple         # in FreeBSD numbering: translate with translate.freebsd.flags)
    name: str
    child_pid: int


def parse_lwpinfo(buf: bytes) -> LwpInfo:
    f = LWPINFO.unpack_from(buf)
    return LwpInfo(lwpid=f[0], event=f[1], flags=f[2], sigmask=tuple(f[3:7]),
                   siglist=tuple(f[7:11]), name=_cstr(f[11]), child_pid=f[12])


def pack_lwpinfo(info: LwpInfo) -> bytes:
    """The record as the kernel fills it (for tests and fakes)."""
    return LWPINFO.pack(info.lwpid, info.event, info.flags, *info.sigmask, *info.siglist,
                        info.name.encode()[:19], info.child_pid, 0, 0)


# struct kinfo_proc (sys/sys/user.h, amd64, KINFO_PROC_SIZE 1088): the fields the capture
# reads, at their offsets (pointers 8 bytes; sigset_t 16; KI_NGROUPS 16; TDNAMLEN 16,
# WMESGLEN 8, LOGNAMELEN 17, LOCKNAMELEN 8, COMMLEN 19, KI_EMULNAMELEN 16).
KI_FIELDS = {"structsize": (0, "i"), "pid": (72, "i"), "ppid": (76, "i"), "pgid": (80, "i"),
             "sid": (88, "i"), "uid": (168, "I"), "ruid": (172, "I"), "svuid": (176, "I"),
             "rgid": (180, "I"), "svgid": (184, "I"), "ngroups": (188, "h"),
             "stat": (388, "B"), "cr_flags": (588, "I"), "jid": (KI_JID_OFFSET, "i"),
             "numthreads": (596, "i")}
KI_GROUPS_OFFSET, KI_NGROUPS = 192, 16
KI_STRINGS = {"tdname": (394, 17), "comm": (447, 20), "emul": (467, 17)}
KI_CRF_GRP_OVERFLOW = 0x80000000
SZOMB = 5                                          # ki_stat of a zombie


@dataclasses.dataclass(frozen=True)
class KinfoProc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    uid: int               # effective
    ruid: int
    svuid: int
    rgid: int
    svgid: int
    groups: tuple          # ki_groups[:ki_ngroups]; [0] is the effective gid
    stat: int
    comm: str
    tdname: str
    emul: str
    jid: int
    numthreads: int
    groups_overflow: bool  # more than KI_NGROUPS groups: the rest are not in the record


def parse_kinfo_proc(buf: bytes) -> KinfoProc:
    """One kern.proc.pid record (checked to be the amd64 layout by its size)."""
    if len(buf) < KINFO_PROC_SIZE or struct.unpack_from("<i", buf)[0] != KINFO_PROC_SIZE:
        raise Unsupported(f"kern.proc.pid: a record of {len(buf)} bytes (ki_structsize "
                          f"{struct.unpack_from('<i', buf)[0] if len(buf) >= 4 else '?'}), "
                          f"not the amd64 kinfo_proc of {KINFO_PROC_SIZE}")
    f = {k: struct.unpack_from("<" + code, buf, off)[0] for k, (off, code) in KI_FIELDS.items()}
    n = max(0, min(f["ngroups"], KI_NGROUPS))
    groups = struct.unpack_from(f"<{n}I", buf, KI_GROUPS_OFFSET)
    text = {k: _cstr(buf[off:off + size]) for k, (off, size) in KI_STRINGS.items()}
    return KinfoProc(f["pid"], f["ppid"], f["pgid"], f["sid"], f["uid"], f["ruid"], f["svuid"],
                     f["rgid"], f["svgid"], tuple(groups), f["stat"], text["comm"],
                     text["tdname"], text["emul"], f["jid"], f["numthreads"],
                     bool(f["cr_flags"] & KI_CRF_GRP_OVERFLOW))


def pack_kinfo_proc(k: KinfoProc) -> bytes:
    """The record as the kernel fills it (for tests and fakes)."""
    buf = bytearray(KINFO_PROC_SIZE)
    values = dict(structsize=KINFO_PROC_SIZE, pid=k.pid, ppid=k.ppid, pgid=k.pgid, sid=k.sid,
                  uid=k.uid, ruid=k.ruid, svuid=k.svuid, rgid=k.rgid, svgid=k.svgid,
                  ngroups=len(k.groups), stat=k.stat, jid=k.jid, numthreads=k.numthreads,
                  cr_flags=KI_CRF_GRP_OVERFLOW if k.groups_overflow else 0)
    for name, (off, code) in KI_FIELDS.items():
        struct.pack_into("<" + code, buf, off, values[name])
    struct.pack_into(f"<{len(k.groups)}I", buf, KI_GROUPS_OFFSET, *k.groups)
    for name, (off, size) in KI_STRINGS.items():
        raw = getattr(k, name).encode()[:size - 1]
        buf[off:off + len(raw)] = raw
    return bytes(buf)


def parse_jid(buf: bytes) -> int:
    """ki_jid of a kern.proc.pid record."""
    if len(buf) < KI_JID_OFFSET + 4:
        raise Unsupported(f"kern.proc.pid: {len(buf)} bytes, no ki_jid at {KI_JID_OFFSET:#x}")
    return struct.unpack_from("<i", buf, KI_JID_OFFSET)[0]


def _records(buf: bytes, what: str):
    pos = 0
    while pos < len(buf):
        size = struct.unpack_from("<i", buf, pos)[0]
        if size <= 0 or pos + size > len(buf):
            raise Unsupported(f"{what}: record at {pos} claims {size} bytes of {len(buf)}")
        yield buf[pos:pos + size]
        pos += size


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def parse_vmmap(buf: bytes) -> list[VmEntry]:
    """kern.proc.vmmap output: packed kinfo_vmentry records, each kve_structsize long."""
    out = []
    for rec in _records(buf, "kern.proc.vmmap"):
        f = KVE.unpack_from(rec.ljust(KVE.size, b"\0"))
        out.append(VmEntry(start=f[2], end=f[3], offset=f[4], kind=KVME_TYPE.get(f[1], str(f[1])),
                           prot=f[10], flags=f[7], fileid=f[5], path=_cstr(rec[KVE_PATH_OFFSET:]),
                           obj=f[18] if KVME_TYPE.get(f[1]) in ANON_KINDS else 0))
    return out


def parse_filedesc(buf: bytes) -> list[FileEntry]:
    """kern.proc.filedesc output: packed kinfo_file records, each kf_structsize long."""
    out = []
    for rec in _records(buf, "kern.proc.filedesc"):
        f = KF.unpack_from(rec.ljust(KF.size, b"\0"))
        kind = KF_TYPE.get(f[1], str(f[1]))
        extra = {}
        if kind == "pipe":
            a, b, n = KF_PIPE.unpack_from(rec.ljust(KF_PIPE_OFFSET + KF_PIPE.size, b"\0"),
                                          KF_PIPE_OFFSET)
            extra = dict(pipe_addr=a, pipe_peer=b, pipe_count=n)
        elif kind == "eventfd":
            v, fl = KF_EVENTFD.unpack_from(rec.ljust(KF_UN_OFFSET + KF_EVENTFD.size, b"\0"),
                                           KF_UN_OFFSET)
            extra = dict(efd_value=v, efd_flags=fl)
        elif kind in ("vnode", "fifo"):
            extra = dict(fileid=struct.unpack_from("<Q", rec.ljust(KF_FILEID_OFFSET + 8, b"\0"),
                                                   KF_FILEID_OFFSET)[0])
        out.append(FileEntry(fd=f[2], kind=kind, flags=f[4], offset=f[6],
                             path=_cstr(rec[KF_PATH_OFFSET:]), **extra))
    return out


def pack_kinfo_file(e: FileEntry) -> bytes:
    """One kinfo_file record as the kernel fills it (for tests and fakes)."""
    path = e.path.encode() + b"\0"
    size = (KF_PATH_OFFSET + len(path) + 7) & ~7            # truncated after the path
    rec = bytearray(size)
    kind = {v: k for k, v in KF_TYPE.items()}[e.kind]
    KF.pack_into(rec, 0, size, kind, e.fd, 1, e.flags, 0, e.offset)
    if e.kind == "pipe":
        KF_PIPE.pack_into(rec, KF_PIPE_OFFSET, e.pipe_addr, e.pipe_peer, e.pipe_count)
    elif e.kind == "eventfd":
        KF_EVENTFD.pack_into(rec, KF_UN_OFFSET, e.efd_value, e.efd_flags)
    elif e.kind in ("vnode", "fifo"):
        struct.pack_into("<Q", rec, KF_FILEID_OFFSET, e.fileid)
    rec[KF_PATH_OFFSET:KF_PATH_OFFSET + len(path)] = path
    return bytes(rec)


# struct xfile (sys/sys/file.h), what kern.file (sysctl_kern_file in kern_descrip.c) gives for
# every descriptor of every process the caller may see: xf_file is the address of the struct
# file, the open file description itself, so descriptors dup'ed or inherited from one open
# share it (kinfo_file has no such field: kf_offset equality is not identity).
XFILE = struct.Struct("<qiiiiQhhiiiqQQIi48x")    # 128 bytes on amd64


@dataclasses.dataclass(frozen=True)
class XFile:
    pid: int
    fd: int
    file: int              # struct file address: one per open file description
    count: int             # f_count: descriptors (and other references) holding it
    offset: int
    flag: int              # f_flag (FREAD/FWRITE/... bits)


def parse_xfiles(buf: bytes) -> list[XFile]:
    """kern.file output: struct xfile records, each xf_size long (checked)."""
    out = []
    for pos in range(0, len(buf) - len(buf) % XFILE.size, XFILE.size):
        f = XFILE.unpack_from(buf, pos)
        if f[0] != XFILE.size:
            raise Unsupported(f"kern.file: a record of xf_size {f[0]}, not the amd64 struct "
                              f"xfile of {XFILE.size}")
        out.append(XFile(pid=f[1], fd=f[3], file=f[5], count=f[8], offset=f[11], flag=f[14]))
    if len(buf) % XFILE.size:
        raise Unsupported(f"kern.file: {len(buf)} bytes is no whole number of {XFILE.size}-"
                          "byte records")
    return out


def pack_xfile(x: XFile, uid: int = 0, kind: int = 1) -> bytes:
    """One struct xfile as the kernel fills it (for tests and fakes)."""
    return XFILE.pack(XFILE.size, x.pid, uid, x.fd, 0, x.file, kind, 0, x.count, 0, 0,
                      x.offset, 0, 0, x.flag, 0)


def parse_procs(buf: bytes) -> list[KinfoProc]:
    """kern.proc.proc output: one kinfo_proc per process."""
    return [parse_kinfo_proc(rec) for rec in _records(buf, "kern.proc.proc")]


def jail_value(name: str, value) -> tuple[bytes, bytes | None]:
    """One jail_set name/value pair as bytes, the way libjail encodes them: strings
    NUL-terminated, numbers and jailsys words as a C int, booleans as a name with no value
    (`persist`) or its `no` form (`nopersist`)."""
    if value is True or value is False:
        return (name if value else "no" + name).encode() + b"\0", None
    if isinstance(value, int):
        return name.encode() + b"\0", struct.pack("<i", value)
    if name in JAILSYS_PARAMS:
        if value not in JAILSYS:
            raise ValueError(f"jail parameter {name}={value!r}: want one of {list(JAILSYS)}")
        return name.encode() + b"\0", struct.pack("<i", JAILSYS[value])
    return name.encode() + b"\0", str(value).encode() + b"\0"


# -- system calls ---------------------------------------------------------------------------------
_LIBC = None


def libc():
    """FreeBSD's libc with errno, or Unsupported on any other system."""
    global _LIBC
    if not IS_FREEBSD:
        raise Unsupported(f"FreeBSD system calls are not available on {sys.platform}: run this "
                          "on FreeBSD (or use --dry-run to see the plan)", step="oskit.freebsd")
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.7", use_errno=True)
    return _LIBC


def _fail(step: str, pid: int | None = None):
    err = ctypes.get_errno()
    raise KernelError(step, err, path=f"pid {pid}" if pid is not None else None)


def ptrace(req: int, pid: int, addr=None, data: int = 0, step: str = "ptrace") -> int:
    c = libc()
    c.ptrace.restype = ctypes.c_int
    c.ptrace.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    ctypes.set_errno(0)
    rv = c.ptrace(req, pid, addr, data)
    if rv == -1 and ctypes.get_errno():
        _fail(step, pid)
    return rv


def attach(pid: int) -> None:
    """PT_ATTACH stops the whole process (SIGSTOP); wait for the stop."""
    ptrace(PT_ATTACH, pid, None, 0, step="PT_ATTACH")
    os.waitpid(pid, 0)


def wait(pid: int) -> int:
    """waitpid status of a traced child (native wait(2); this is FreeBSD or nothing)."""
    libc()
    return os.waitpid(pid, 0)[1]


def detach(pid: int, sig: int = 0) -> None:
    ptrace(PT_DETACH, pid, ctypes.c_void_p(1), sig, step="PT_DETACH")


def cont(pid: int, sig: int = 0) -> None:
    """PT_CONTINUE at the current pc (addr 1)."""
    ptrace(PT_CONTINUE, pid, ctypes.c_void_p(1), sig, step="PT_CONTINUE")


def get_regs(lwp: int) -> bytes:
    buf = ctypes.create_string_buffer(REG_SIZE)
    ptrace(PT_GETREGS, lwp, buf, 0, step="PT_GETREGS")
    return buf.raw


def set_regs(lwp: int, reg: bytes) -> None:
    if len(reg) != REG_SIZE:
        raise ValueError(f"struct reg is {REG_SIZE} bytes, got {len(reg)}")
    ptrace(PT_SETREGS, lwp, ctypes.create_string_buffer(reg, REG_SIZE), 0, step="PT_SETREGS")


def trace_events(pid: int) -> None:
    """Report fork children (traced from birth, PT_FOLLOW_FORK) and new threads
    (PT_LWP_EVENTS): the restore creates both by injected Linux fork/clone."""
    ptrace(PT_FOLLOW_FORK, pid, None, 1, step="PT_FOLLOW_FORK")
    ptrace(PT_LWP_EVENTS, pid, None, 1, step="PT_LWP_EVENTS")


def lwpinfo(lwp: int) -> LwpInfo:
    buf = ctypes.create_string_buffer(LWPINFO_SIZE)
    ptrace(PT_LWPINFO, lwp, buf, LWPINFO_SIZE, step="PT_LWPINFO")
    return parse_lwpinfo(buf.raw)


def lwps(pid: int) -> list[int]:
    """Thread ids (PT_GETNUMLWPS, then PT_GETLWPLIST into an array of that many)."""
    n = ptrace(PT_GETNUMLWPS, pid, None, 0, step="PT_GETNUMLWPS")
    arr = (ctypes.c_int * max(n, 1))()
    got = ptrace(PT_GETLWPLIST, pid, arr, n, step="PT_GETLWPLIST")
    return list(arr[:got])


def suspend(lwp: int) -> None:
    """Keep one thread stopped while PT_CONTINUE runs the others."""
    ptrace(PT_SUSPEND, lwp, None, 0, step="PT_SUSPEND")


def resume(lwp: int) -> None:
    ptrace(PT_RESUME, lwp, None, 0, step="PT_RESUME")


def kill(pid: int, sig: int = SIGKILL) -> None:
    if libc().kill(pid, sig) != 0:
        _fail(f"kill {sig}", pid)


def proc_jid(pid: int) -> int:
    return parse_jid(_sysctl([CTL_KERN, KERN_PROC, KERN_PROC_PID, pid], "kern.proc.pid"))


def parse_auxv(buf: bytes) -> list[int]:
    """kern.proc.auxv: Elf64_Auxinfo pairs (a_type, a_val) up to AT_NULL, as u64 words."""
    words = list(struct.unpack_from(f"<{len(buf) // 8}Q", buf))
    out = []
    for i in range(0, len(words) - 1, 2):
        out += words[i:i + 2]
        if words[i] == 0:
            break
    return out


def auxv(pid: int) -> list[int]:
    """The auxiliary vector the process was started with (for a Linux process, the one the
    Linuxulator built), as the u64 words CRIU's mm_saved_auxv holds."""
    return parse_auxv(_sysctl([CTL_KERN, KERN_PROC, KERN_PROC_AUXV, pid], "kern.proc.auxv"))


def kinfo_proc(pid: int) -> KinfoProc:
    """kern.proc.pid.<pid>: ids, credentials, names, jail of a process."""
    return parse_kinfo_proc(_sysctl([CTL_KERN, KERN_PROC, KERN_PROC_PID, pid], "kern.proc.pid"))


def _base(req: int, lwp: int, step: str) -> int:
    val = ctypes.c_uint64()
    ptrace(req, lwp, ctypes.byref(val), 0, step=step)
    return val.value


def get_fsbase(lwp: int) -> int:
    return _base(PT_GETFSBASE, lwp, "PT_GETFSBASE")


def get_gsbase(lwp: int) -> int:
    return _base(PT_GETGSBASE, lwp, "PT_GETGSBASE")


def set_fsbase(lwp: int, value: int) -> None:
    ptrace(PT_SETFSBASE, lwp, ctypes.byref(ctypes.c_uint64(value)), 0, step="PT_SETFSBASE")


def set_gsbase(lwp: int, value: int) -> None:
    ptrace(PT_SETGSBASE, lwp, ctypes.byref(ctypes.c_uint64(value)), 0, step="PT_SETGSBASE")


def xstate_info(lwp: int) -> tuple[int, int]:
    """(xsave_mask, xsave_len) from PT_GETXSTATE_INFO (data = sizeof the 16-byte struct)."""
    buf = ctypes.create_string_buffer(16)
    ptrace(PT_GETXSTATE_INFO, lwp, buf, 16, step="PT_GETXSTATE_INFO")
    mask, length = struct.unpack_from("<QI", buf.raw)
    return mask, length


def get_xstate(lwp: int) -> bytes:
    """The whole save area; the kernel copies out xsave_len bytes whatever `data` says."""
    _, length = xstate_info(lwp)
    buf = ctypes.create_string_buffer(length)
    ptrace(PT_GETXSTATE, lwp, buf, length, step="PT_GETXSTATE")
    return buf.raw


def set_fpregs(lwp: int, raw: bytes) -> None:
    """PT_SETFPREGS: struct fpreg (the 512-byte FXSAVE region), for CPUs without XSAVE."""
    if len(raw) != FPREG_SIZE:
        raise ValueError(f"struct fpreg is {FPREG_SIZE} bytes, got {len(raw)}")
    ptrace(PT_SETFPREGS, lwp, ctypes.create_string_buffer(raw, FPREG_SIZE), 0,
           step="PT_SETFPREGS")


def get_fpregs(lwp: int) -> bytes:
    buf = ctypes.create_string_buffer(FPREG_SIZE)
    ptrace(PT_GETFPREGS, lwp, buf, 0, step="PT_GETFPREGS")
    return buf.raw


def set_xstate(lwp: int, data: bytes) -> None:
    ptrace(PT_SETXSTATE, lwp, ctypes.create_string_buffer(data, len(data)), len(data),
           step="PT_SETXSTATE")


def _io(pid: int, op: int, addr: int, buf, size: int, step: str) -> int:
    desc = ptrace_io_desc(op, addr, ctypes.cast(buf, ctypes.c_void_p), size)
    ptrace(PT_IO, pid, ctypes.byref(desc), 0, step=step)
    return desc.piod_len


def read_memory(pid: int, addr: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    got = _io(pid, PIOD_READ_D, addr, buf, size, f"PT_IO read {addr:#x}+{size}")
    if got != size:
        raise KernelError(f"PT_IO read {addr:#x}+{size}: short read {got}", 5, path=f"pid {pid}")
    return buf.raw


def write_memory(pid: int, addr: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    got = _io(pid, PIOD_WRITE_D, addr, buf, len(data), f"PT_IO write {addr:#x}+{len(data)}")
    if got != len(data):
        raise KernelError(f"PT_IO write {addr:#x}: short write {got}", 5, path=f"pid {pid}")


def _sysctl(mib: list[int], step: str) -> bytes:
    c = libc()
    arr = (ctypes.c_int * len(mib))(*mib)
    size = ctypes.c_size_t(0)
    if c.sysctl(arr, len(mib), None, ctypes.byref(size), None, 0) != 0:
        _fail(step, mib[-1])
    size.value = size.value * 4 // 3 + 4096         # the map may grow between the two calls
    buf = ctypes.create_string_buffer(size.value)
    if c.sysctl(arr, len(mib), buf, ctypes.byref(size), None, 0) != 0:
        _fail(step, mib[-1])
    return buf.raw[:size.value]


def vmmap(pid: int) -> list[VmEntry]:
    return parse_vmmap(_sysctl([CTL_KERN, KERN_PROC, KERN_PROC_VMMAP, pid], "kern.proc.vmmap"))


def filedesc(pid: int) -> list[FileEntry]:
    return parse_filedesc(_sysctl([CTL_KERN, KERN_PROC, KERN_PROC_FILEDESC, pid],
                                  "kern.proc.filedesc"))


def all_procs() -> list[KinfoProc]:
    """Every process (kern.proc.proc): the capture follows a tree's children by ki_ppid."""
    return parse_procs(_sysctl([CTL_KERN, KERN_PROC, KERN_PROC_PROC, 0], "kern.proc.proc"))


def xfiles() -> list[XFile]:
    """Every open descriptor the caller may see (kern.file), with its struct file address."""
    return parse_xfiles(_sysctl([CTL_KERN, KERN_FILE], "kern.file"))


def _iov(pairs: list[tuple[bytes, bytes | None]]):
    keep, vec = [], (iovec * (2 * len(pairs)))()
    for i, (name, value) in enumerate(pairs):
        for j, raw in enumerate((name, value)):
            if raw is None:
                vec[2 * i + j] = iovec(None, 0)
                continue
            b = ctypes.create_string_buffer(raw, len(raw))
            keep.append(b)
            vec[2 * i + j] = iovec(ctypes.cast(b, ctypes.c_void_p), len(raw))
    return vec, keep


def jail_set(params: dict, flags: int = JAIL_CREATE) -> int:
    """Create/update a jail from {name: value}; returns the jid. errmsg is reported."""
    errbuf = ctypes.create_string_buffer(1024)
    pairs = [jail_value(k, v) for k, v in params.items()] + [(b"errmsg\0", None)]
    vec, keep = _iov(pairs)
    vec[-1] = iovec(ctypes.cast(errbuf, ctypes.c_void_p), len(errbuf))
    jid = libc().jail_set(vec, len(vec), flags)
    if jid < 0:
        err = ctypes.get_errno()
        raise KernelError(f"jail_set {params.get('name', '')}: {_cstr(errbuf.raw)}", err)
    return jid


def jail_get(name, keys: list[str]) -> dict[str, bytes]:
    """Raw values of `keys` for the jail called `name` (a str), or with jid `name` (an int);
    strings come back still NUL-terminated, numbers and jailsys values as a C int."""
    bufs = {k: ctypes.create_string_buffer(1024) for k in keys}
    key = jail_value("jid", name) if isinstance(name, int) else (b"name\0", name.encode() + b"\0")
    pairs = [key] + [(k.encode() + b"\0", bytes(1024)) for k in keys]
    vec, keep = _iov(pairs)
    for i, k in enumerate(keys, 1):
        vec[2 * i + 1] = iovec(ctypes.cast(bufs[k], ctypes.c_void_p), 1024)
    if libc().jail_get(vec, len(vec), 0) < 0:
        _fail(f"jail_get {name}")
    return {k: bufs[k].raw for k in keys}


def jail_remove(jid: int) -> None:
    if libc().jail_remove(jid) != 0:
        _fail(f"jail_remove {jid}")


def rctl_get_rules(filter_: str) -> list[str]:
    """Rules matching `filter_` (e.g. "jail:NAME"), as rctl(8) prints them."""
    raw = filter_.encode() + b"\0"
    out = ctypes.create_string_buffer(64 << 10)
    if libc().rctl_get_rules(raw, len(raw), out, len(out)) != 0:
        _fail(f"rctl_get_rules {filter_}")
    text = _cstr(out.raw)
    return [r for r in text.split(",") if r]


CPU_LEVEL_WHICH, CPU_WHICH_JAIL = 3, 5       # sys/sys/cpuset.h
CPUSET_BYTES = 128                            # CPU_MAXSIZE 1024 bits (14.x); larger sizes must be 0


def parse_cpulist(text: str) -> bytes:
    """"0-3,6" -> a cpuset_t bit mask of CPUSET_BYTES."""
    bits = 0
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        for cpu in range(int(lo), int(hi or lo) + 1):
            bits |= 1 << cpu
    return bits.to_bytes(CPUSET_BYTES, "little")


def cpuset_jail(jid: int, cpulist: str) -> None:
    """Bind every process of a jail to the CPUs of `cpulist` (cpuset_setaffinity)."""
    mask = ctypes.create_string_buffer(parse_cpulist(cpulist), CPUSET_BYTES)
    if libc().cpuset_setaffinity(CPU_LEVEL_WHICH, CPU_WHICH_JAIL, ctypes.c_int64(jid),
                                 CPUSET_BYTES, mask) != 0:
        _fail(f"cpuset_setaffinity jail {jid} cpus {cpulist}")


def rctl_add_rule(rule: str) -> None:
    raw = rule.encode() + b"\0"
    if libc().rctl_add_rule(raw, len(raw), None, 0) != 0:
        _fail(f"rctl_add_rule {rule}")
