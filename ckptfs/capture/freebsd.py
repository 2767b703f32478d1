"""Capture on FreeBSD: a Linux (Linuxulator) process read through oskit.freebsd into the
canonical Linux/CRIU model, so everything above (tree, dump, restore on Linux) works unchanged.

Registers come from PT_GETREGS + PT_GETFSBASE/PT_GETGSBASE and are translated to Linux
user_regs_struct (translate.freebsd.regs); FPU from PT_GETXSTATE(+_INFO) into Linux's ptrace
XSAVE form; memory map from kern.proc.vmmap; descriptors from kern.proc.filedesc; memory with
PT_IO. The executable's ELF header says whether the binary is Linux or native FreeBSD
(Meta.binary_os), which decides where it may go.

Not readable through FreeBSD's ptrace and left out (Unsupported, naming what): signal
dispositions and masks (FreeBSD has no PEEKSIGINFO/GETSIGMASK-style request for handlers;
they need injected sigaction calls), credentials, per-page residency (no pagemap: every page of
a private or anonymous map is saved).
"""
from __future__ import annotations

from .. import flags as L, model, pb, xsave
from ..errors import Unsupported
from ..oskit import freebsd as kit_default
from ..translate import LossLog
from ..translate.freebsd import elf, flags as F, fpu as FPU, regs as G

KF_TEXT = -5
# KF_FLAG bit -> FreeBSD open flag name (kinfo_file has its own encoding).
KF_TO_OPEN = {"APPEND": "O_APPEND", "ASYNC": "O_ASYNC", "FSYNC": "O_FSYNC",
              "NONBLOCK": "O_NONBLOCK", "DIRECT": "O_DIRECT", "NOFOLLOW": "O_NOFOLLOW",
              "CREAT": "O_CREAT", "TRUNC": "O_TRUNC", "EXCL": "O_EXCL", "EXEC": "O_EXEC"}
KF_KIND = {"vnode": "REG", "pipe": "PIPE", "fifo": "FIFO", "socket": "UNIXSK", "pts": "TTY",
           "eventfd": "EVENTFD", "shm": "MEMFD"}
S = L.VMA_STATUS


def kf_to_fbsd_open(kf_flags: int) -> int:
    """kinfo_file kf_flags -> FreeBSD O_ bits (access mode from READ/WRITE)."""
    mode = {1: 0, 2: 1, 3: 2}.get(kf_flags & 3, 0)
    out = mode
    for kf, name in KF_TO_OPEN.items():
        if kf_flags & kit_default.KF_FLAG[kf]:
            out |= F.FBSD_OPEN[name]
    return out


def vma_entry(e) -> pb.vma_entry:
    """kinfo_vmentry -> CRIU vma_entry (Linux flags and status)."""
    anon = e.kind in ("default", "swap", "none") and not e.path
    share = L.MAP_FLAGS["MAP_PRIVATE"] if (e.private or anon) else L.MAP_FLAGS["MAP_SHARED"]
    flags = share | (L.MAP_FLAGS["MAP_ANONYMOUS"] if anon else 0)
    status = S["VMA_AREA_REGULAR"]
    if anon:
        status |= S["VMA_ANON_PRIVATE"] if share == L.MAP_FLAGS["MAP_PRIVATE"] else \
            S["VMA_ANON_SHARED"]
    else:
        status |= S["VMA_FILE_PRIVATE"] if e.private else S["VMA_FILE_SHARED"]
    if e.flags & kit_default.KVME_FLAG["GROWS_DOWN"]:
        status |= S["VMA_AREA_STACK"]
        flags |= L.MAP_FLAGS["MAP_GROWSDOWN"]
    return pb.vma_entry(start=e.start, end=e.end, pgoff=e.offset if not anon else 0, shmid=0,
                        prot=e.prot & 7, flags=flags, status=status, fd=-1)


class FreeBSDSource(model.Source):
    """A stopped (PT_ATTACHed) single-threaded process on FreeBSD, in Linux form."""

    def __init__(self, pid: int, kit=kit_default):
        self.pid, self.kit = pid, kit
        self.log = LossLog()
        self.files = {e.fd: e for e in kit.filedesc(pid)}

    def meta(self) -> model.Meta:
        exe = self.files.get(KF_TEXT)
        kind = elf.binary_os(exe.path) if exe and exe.path else "linux"
        mask, size = self.kit.xstate_info(self.pid)
        return model.Meta(os="freebsd", xfeatures=mask, xsave_size=size, binary_os=kind)

    def pstree(self) -> list:
        return [pb.pstree_entry(pid=self.pid, ppid=0, pgid=self.pid, sid=self.pid,
                                threads=[self.pid])]

    def core(self, tid: int):
        reg = G.unpack(self.kit.get_regs(tid))
        lin = G.to_linux(reg, self.kit.get_fsbase(tid), self.kit.get_gsbase(tid), self.log,
                         f"tasks/{self.pid}/threads/{tid}/regs")
        c = pb.core_entry(mtype=pb.core_entry.X86_64)
        c.thread_info.gpregs.CopyFrom(pb.user_x86_regs_entry(
            mode=pb.NATIVE, **{criu: lin[tree] for tree, criu in L.GP_REGS}))
        mask, _ = self.kit.xstate_info(tid)
        c.thread_info.fpregs.CopyFrom(xsave.split(FPU.to_linux(self.kit.get_xstate(tid), mask)))
        return c

    def xsave(self, tid: int) -> bytes:
        mask, _ = self.kit.xstate_info(tid)
        return FPU.to_linux(self.kit.get_xstate(tid), mask)

    def mm(self, pid: int):
        return pb.mm_entry(mm_start_code=0, mm_end_code=0, mm_start_data=0, mm_end_data=0,
                           mm_start_stack=0, mm_start_brk=0, mm_brk=0, mm_arg_start=0,
                           mm_arg_end=0, mm_env_start=0, mm_env_end=0, exe_file_id=0,
                           vmas=[vma_entry(e) for e in self.kit.vmmap(pid)
                                 if e.kind != "guard"])

    def fdinfo(self, pid: int) -> list:
        out = []
        for fd, e in sorted(self.files.items()):
            if fd < 0:
                continue
            kind = KF_KIND.get(e.kind)
            if kind is None:
                raise Unsupported(f"fd {fd} is a FreeBSD {e.kind}: no Linux counterpart",
                                  path=f"tasks/{pid}/fds/{fd}")
            out.append(pb.fdinfo_entry(id=fd + 1, flags=0, type=L.FD_TYPES[kind], fd=fd))
        return out

    def file(self, file_id: int):
        e = self.files[file_id - 1]
        kind = KF_KIND[e.kind]
        flags = F.open_to_linux(kf_to_fbsd_open(e.flags), self.log,
                                f"tasks/{self.pid}/fds/{e.fd}/flags", kind)
        entry = pb.file_entry(type=L.FD_TYPES[kind], id=file_id)
        if kind == "REG":
            entry.reg.CopyFrom(pb.reg_file_entry(id=file_id, flags=flags, pos=e.offset,
                                                 name=e.path))
        elif kind == "PIPE":
            entry.pipe.CopyFrom(pb.pipe_entry(id=file_id, pipe_id=file_id, flags=flags))
        return entry

    def page_ranges(self, pid: int, vma) -> list:
        """No pagemap on FreeBSD: every page of a private or anonymous map is saved."""
        if vma.status & (S["VMA_ANON_PRIVATE"] | S["VMA_ANON_SHARED"] | S["VMA_FILE_PRIVATE"]):
            return [model.PageRange(vma.start, vma.end)]
        return []

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return self.kit.read_memory(pid, addr, size)

    def isolation(self) -> model.Isolation:
        raise Unsupported("reading a jail's parameters and RCTL rules back into Linux form is "
                          "not implemented (translate.freebsd.jail.from_jail does the mapping)",
                          path="isolation")
