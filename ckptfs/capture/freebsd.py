"""Capture on FreeBSD: a Linux (Linuxulator) process read through oskit.freebsd into the
canonical Linux/CRIU model, so everything above (tree, dump, restore on Linux) works unchanged.

Registers come from PT_GETREGS + PT_GETFSBASE/PT_GETGSBASE and are translated to Linux
user_regs_struct (translate.freebsd.regs); FPU from PT_GETXSTATE(+_INFO) into Linux's ptrace
XSAVE form; memory map from kern.proc.vmmap; descriptors from kern.proc.filedesc; memory with
PT_IO. The executable's ELF header says whether the binary is Linux or native FreeBSD
(Meta.binary_os), which decides where it may go.

Signal masks come from PT_LWPINFO (pl_sigmask, FreeBSD numbering, translated). FreeBSD's
ptrace has no request for signal handlers: in a Linux-branded target they are read by
injected Linux rt_sigaction(sig, NULL, &old) calls (restore.freebsd.LinuxCalls), the
registers and code put back afterwards; so they come out in Linux form directly.
isolation() reads the process's jail (kern.proc.pid ki_jid, then jail_get) and its RCTL rules
and maps them back with translate.freebsd.jail/rctl.

Not read: credentials, per-page residency (no pagemap: every page of a private or anonymous
map is saved).
"""
from __future__ import annotations

import struct

from .. import flags as L, model, pb, xsave
from ..errors import Unsupported
from ..oskit import freebsd as kit_default
from ..translate import LossLog
from ..translate.freebsd import elf, flags as F, fpu as FPU, jail as J, rctl as R, regs as G

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
        blocked = self.sigmask(tid)
        if tid == self.pid:
            c.tc.CopyFrom(pb.task_core_entry(task_state=L.TASK_STATES["alive"], exit_code=0,
                                             personality=0, flags=0, blk_sigset=blocked,
                                             comm=""))
            c.tc.sigactions.extend(self.sigactions())
        else:
            c.thread_core.blk_sigset = blocked
        return c

    def sigmask(self, tid: int) -> int:
        """PT_LWPINFO's pl_sigmask, FreeBSD numbering -> the Linux 64-bit mask."""
        return F.sigset_to_linux(self.kit.lwpinfo(tid).sigmask, self.log,
                                 f"tasks/{self.pid}/threads/{tid}/sigmask")

    def sigactions(self) -> list:
        """62 sa_entry in CRIU order, read by injected Linux rt_sigaction(sig, NULL, &old)."""
        if getattr(self, "_sigactions", None) is None:
            from ..restore.freebsd import LinuxCalls, helper_pages
            calls = LinuxCalls(self.kit, self.pid, *helper_pages(self.kit, self.pid))
            saved = calls.kit.read_memory(self.pid, calls.data, 32)
            out = []
            try:
                for sig in L.SIGACTION_SIGNALS:
                    calls("rt_sigaction", sig, 0, calls.data, 8, step="read sigaction",
                          path=f"tasks/{self.pid}/sigactions/{L.SIGNAL_NAMES.get(sig, sig)}")
                    h, fl, rest, mask = struct.unpack(
                        "<4Q", self.kit.read_memory(self.pid, calls.data, 32))
                    out.append(pb.sa_entry(sigaction=h, flags=fl, restorer=rest, mask=mask))
            finally:
                calls.kit.write_memory(self.pid, calls.data, saved)
                calls.close()
                self.kit.set_regs(self.pid, calls.saved_regs)
            self._sigactions = out
        return self._sigactions

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
        """The process's jail and its RCTL rules in Linux vocabulary; the host (jid 0): none."""
        jid = self.kit.proc_jid(self.pid)
        if jid == 0:
            return model.Isolation()
        raw = self.kit.jail_get(jid, list(JAIL_KEYS))
        params = {k: decode_jail_value(k, v) for k, v in raw.items()}
        if params.get("host") != "new":           # the host's names, not the jail's own
            params.pop("host.hostname", None)
            params.pop("host.domainname", None)
        iso = J.from_jail(params, self.log, "isolation/jail")
        rules = [R.parse_rule(text, "isolation/rctl")
                 for text in self.kit.rctl_get_rules(f"jail:{params['name']}")]
        iso.limits = R.from_rctl(rules, None, params["name"], self.log, "isolation/rctl")
        return iso


# jail_get keys read back, and how each value comes (libjail's encoding).
JAIL_KEYS = {"name": "str", "host": "jailsys", "host.hostname": "str",
             "host.domainname": "str", "vnet": "jailsys", "sysvmsg": "jailsys",
             "sysvsem": "jailsys", "sysvshm": "jailsys", "enforce_statfs": "int"}
JAILSYS_NAMES = {v: k for k, v in J.JAILSYS.items()}


def decode_jail_value(key: str, raw: bytes):
    kind = JAIL_KEYS[key]
    if kind == "str":
        return kit_default._cstr(raw)
    num = struct.unpack_from("<i", raw)[0]
    if kind == "jailsys":
        if num not in JAILSYS_NAMES:
            raise Unsupported(f"jail parameter {key} = {num}: not a jailsys value",
                              path="isolation/jail")
        return JAILSYS_NAMES[num]
    return num
