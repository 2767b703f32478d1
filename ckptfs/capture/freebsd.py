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

Threads: every lwp (PT_GETNUMLWPS + PT_GETLWPLIST), each with its registers, bases, XSAVE
area, mask and name. Ids, credentials (kinfo_proc ki_uid/ruid/svuid/rgid/svgid/groups) and
ki_comm from kern.proc.pid; rlimits and umask by injected Linux calls like the handlers; cwd,
root and executable from kern.proc.filedesc's negative entries; mm bounds derived from the map
(mm_fields). Not read: per-page residency (no pagemap: every page of a private or anonymous
map is saved).

Trees (FreeBSDTreeSource): the descendants by ki_ppid (kern.proc.proc), one id per open file
description from kern.file's struct file address (xf_file), anonymous memory shared between
processes by kinfo_vmentry kve_obj (the same object, not copy-on-write, in two processes).
"""
from __future__ import annotations

import contextlib
import struct

from .. import flags as L, model, pb, xsave
from ..errors import KernelError, Unsupported
from ..oskit import freebsd as kit_default
from ..translate import LossLog
from ..translate.freebsd import elf, flags as F, fpu as FPU, jail as J, rctl as R, regs as G

KF_TEXT = -5
# KF_FLAG bit -> FreeBSD open flag name (kinfo_file has its own encoding).
KF_TO_OPEN = {"APPEND": "O_APPEND", "ASYNC": "O_ASYNC", "FSYNC": "O_FSYNC",
              "NONBLOCK": "O_NONBLOCK", "DIRECT": "O_DIRECT", "NOFOLLOW": "O_NOFOLLOW",
              "CREAT": "O_CREAT", "TRUNC": "O_TRUNC", "EXCL": "O_EXCL", "EXEC": "O_EXEC"}
# (a Linuxulator process's epoll is a kqueue, its timerfd a FreeBSD timerfd: both have a
# Linux kind, though neither is captured yet)
KF_KIND = {"vnode": "REG", "pipe": "PIPE", "fifo": "FIFO", "socket": "UNIXSK", "pts": "TTY",
           "eventfd": "EVENTFD", "shm": "MEMFD", "kqueue": "EVENTPOLL", "timerfd": "TIMERFD"}
S = L.VMA_STATUS


def kf_to_fbsd_open(kf_flags: int) -> int:
    """kinfo_file kf_flags -> FreeBSD O_ bits (access mode from READ/WRITE)."""
    mode = {1: 0, 2: 1, 3: 2}.get(kf_flags & 3, 0)
    out = mode
    for kf, name in KF_TO_OPEN.items():
        if kf_flags & kit_default.KF_FLAG[kf]:
            out |= F.FBSD_OPEN[name]
    return out


def vma_entry(e, shared: bool = False) -> pb.vma_entry:
    """kinfo_vmentry -> CRIU vma_entry (Linux flags and status). Anonymous memory is shared
    when the tree says so (`shared`: its object is mapped by another process too)."""
    anon = e.kind in ("default", "swap", "none") and not e.path
    private = e.private or (anon and not shared)
    share = L.MAP_FLAGS["MAP_PRIVATE"] if private else L.MAP_FLAGS["MAP_SHARED"]
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


CAPTURED = ("REG", "PIPE", "FIFO", "EVENTFD")
KF_READ, KF_WRITE = kit_default.KF_FLAG["READ"], kit_default.KF_FLAG["WRITE"]
FIFO_ID_BASE = 1 << 30             # FIFO ids, apart from pipe ids
FIONREAD = 0x541B                  # Linux; the Linuxulator maps it to FreeBSD's FIONREAD
EFD_SEMAPHORE = 1                  # Linux; bit 0 of the checkpoint's eventfd flags
FBSD_EFD_SEMAPHORE = 0x1           # sys/sys/eventfd.h
GLIBC_TID_OFFSET = 0x2d0           # offsetof(struct pthread, tid), x86_64 (checked: glibc 2.36)
NAMED_BASE = 1 << 20              # file ids of files known by name only (cwd, root, exe, maps)
KF_CWD, KF_ROOT = -1, -2
# Linux sees no capabilities under the Linuxulator (linux_prctl: "the capability sets are
# simply always zero"), so that is what a capture reports.
NO_CAPS = [0, 0]
# the kinfo_proc ki_emul names of the two ABIs a process can have here
EMUL_OS = (("Linux", "linux"), ("FreeBSD", "freebsd"))


class FreeBSDSource(model.Source):
    """A stopped (PT_ATTACHed) Linux-branded process on FreeBSD, every thread, in Linux form.

    Threads: PT_GETLWPLIST lists them oldest first; the first is the main thread, whose
    Linux thread id is the pid (the Linuxulator gives a new process's main thread em_tid =
    pid; other threads keep their lwp id). Per thread: PT_GETREGS, PT_GETFSBASE/GSBASE,
    PT_GETXSTATE and PT_LWPINFO (signal mask, thread name) on its lwp. Ids, credentials and
    the command name come from kern.proc.pid (kinfo_proc)."""

    def __init__(self, pid: int, kit=kit_default, ids: "Ids | None" = None,
                 xfiles: dict | None = None, log: LossLog | None = None):
        self.pid, self.kit = pid, kit
        self.log = log if log is not None else LossLog()
        self.numbers = ids if ids is not None else Ids()   # ids shared by the whole tree
        self.kp = kit.kinfo_proc(pid)
        if self.kp.stat == kit_default.SZOMB:
            raise Unsupported(f"process {pid} is a zombie: FreeBSD keeps no registers or "
                              "memory of it to capture", path=f"tasks/{pid}/state")
        self.files = {e.fd: e for e in kit.filedesc(pid)}
        # fd -> struct file address (kern.file): which descriptors share one description
        self.xfiles = xfiles if xfiles is not None else descriptions(kit, pid, self.log)
        lwps = list(kit.lwps(pid))
        if not lwps:
            raise Unsupported(f"process {pid} has no threads (PT_GETLWPLIST)", path=f"tasks/{pid}")
        self.lwp = {pid: lwps[0], **{lwp: lwp for lwp in lwps[1:]}}
        self.paths = self.numbers.paths
        self._linux = None
        if not self.xfiles:
            self._note_unshared()

    def _note_unshared(self) -> None:
        """Without struct file addresses, descriptors of one file are captured as separate
        opens: a shared offset (dup, inheritance) becomes two independent ones."""
        seen: dict[str, int] = {}
        for fd, e in sorted(self.files.items()):
            if fd >= 0 and e.kind == "vnode" and e.path:
                if e.path in seen:
                    self.log.note(f"tasks/{self.pid}/fds/{fd}/open_file", e.path,
                                  f"kern.file gave no struct file addresses: whether fd {fd} "
                                  f"shares fd {seen[e.path]}'s open file description (and so "
                                  "its offset) is unknown; captured as a separate open")
                seen.setdefault(e.path, fd)

    def named(self, path: str, flags: int = 0) -> int:
        """A file id for a file known by its path (and open flags) only."""
        for fid, known in self.paths.items():
            if known == (path, flags):
                return fid
        fid = NAMED_BASE + len(self.paths)
        self.paths[fid] = (path, flags)
        return fid

    def meta(self) -> model.Meta:
        mask, size = self.kit.xstate_info(self.lwp[self.pid])
        return model.Meta(os="freebsd", xfeatures=mask, xsave_size=size,
                          binary_os=self.binary_os())

    def binary_os(self) -> str:
        """The ABI the kernel runs the process under (ki_emul), else the ELF header says."""
        for prefix, name in EMUL_OS:
            if self.kp.emul.startswith(prefix):
                return name
        exe = self.files.get(KF_TEXT)
        return elf.binary_os(exe.path) if exe and exe.path else "linux"

    def pstree(self) -> list:
        k = self.kp
        return [pb.pstree_entry(pid=self.pid, ppid=k.ppid, pgid=k.pgid, sid=k.sid,
                                threads=list(self.lwp))]

    def core(self, tid: int):
        lwp = self.lwp[tid]
        where = f"tasks/{self.pid}/threads/{tid}"
        reg = G.unpack(self.kit.get_regs(lwp))
        lin = G.to_linux(reg, self.kit.get_fsbase(lwp), self.kit.get_gsbase(lwp), self.log,
                         f"{where}/regs")
        c = pb.core_entry(mtype=pb.core_entry.X86_64)
        c.thread_info.gpregs.CopyFrom(pb.user_x86_regs_entry(
            mode=pb.NATIVE, **{criu: lin[tree] for tree, criu in L.GP_REGS}))
        c.thread_info.fpregs.CopyFrom(xsave.split(self.xsave(tid)))
        c.thread_info.clear_tid_addr = self.clear_tid(tid, lin["fs_base"], where)
        info = self.kit.lwpinfo(lwp)
        blocked = F.sigset_to_linux(info.sigmask, self.log, f"{where}/sigmask")
        head, size = self.linux_state()[3][tid]
        c.thread_core.CopyFrom(pb.thread_core_entry(comm=self.comm(info.name, f"{where}/comm"),
                                                    futex_rla=head, futex_rla_len=size))
        c.thread_core.creds.CopyFrom(self.creds())
        if tid == self.pid:
            c.tc.CopyFrom(self.task_core(blocked))
        else:
            c.thread_core.blk_sigset = blocked
        return c

    def task_core(self, blocked: int):
        state = "zombie" if self.kp.stat == kit_default.SZOMB else "alive"
        tc = pb.task_core_entry(task_state=L.TASK_STATES[state], exit_code=0, personality=0,
                                flags=0, blk_sigset=blocked,
                                comm=self.comm(self.kp.comm, f"tasks/{self.pid}/comm"))
        acts, limits = self.linux_state()[:2]
        tc.sigactions.extend(acts)
        tc.rlimits.rlimits.extend(pb.rlimit_entry(cur=c, max=m) for c, m in limits)
        return tc

    def clear_tid(self, tid: int, fs_base: int, where: str) -> int:
        """The address the kernel clears when the thread exits (pthread_join waits on it).
        FreeBSD offers no way to read the Linuxulator's em->child_clear_tid (no
        PR_GET_TID_ADDRESS); glibc always points it at its thread descriptor's tid field,
        GLIBC_TID_OFFSET past the thread pointer, so that is where it is when fs_base holds a
        glibc thread control block (whose first and third words point to itself)."""
        if not fs_base:
            return 0
        try:
            tcb, _dtv, me = struct.unpack("<3Q", self.kit.read_memory(self.pid, fs_base, 24))
        except KernelError:
            tcb = me = None
        if tcb == me == fs_base:
            self.log.note(f"{where}/clear_tid_addr", hex(fs_base + GLIBC_TID_OFFSET),
                          "derived from glibc's thread descriptor (FreeBSD cannot report it)")
            return fs_base + GLIBC_TID_OFFSET
        self.log.note(f"{where}/clear_tid_addr", "0", "not a glibc thread: unknown, so a "
                      "thread joining this one after a restore on Linux would wait forever")
        return 0

    def comm(self, name: str, where: str) -> str:
        """Linux keeps 15 bytes of a name, FreeBSD up to 19 (MAXCOMLEN)."""
        if len(name.encode()) > 15:
            self.log.note(where, name, "longer than Linux's 15-byte comm: cut")
            return name.encode()[:15].decode("utf-8", "ignore")
        return name

    def creds(self):
        """kinfo_proc ids in Linux form: ki_groups[0] is the effective gid, the rest are the
        supplementary groups; Linux's fs ids follow the effective ones (FreeBSD has none)."""
        k, where = self.kp, f"tasks/{self.pid}/creds"
        if not k.groups:
            raise Unsupported("kinfo_proc has no groups (no effective gid)", path=where)
        if k.groups_overflow:
            self.log.note(f"{where}/groups", len(k.groups), "more than KI_NGROUPS (16) groups: "
                          "kinfo_proc holds the first 16 only")
        egid = k.groups[0]
        return pb.creds_entry(uid=k.ruid, euid=k.uid, suid=k.svuid, fsuid=k.uid, gid=k.rgid,
                              egid=egid, sgid=k.svgid, fsgid=egid, groups=list(k.groups[1:]),
                              cap_inh=NO_CAPS, cap_prm=NO_CAPS, cap_eff=NO_CAPS,
                              cap_bnd=NO_CAPS, cap_amb=NO_CAPS, secbits=0, no_new_privs=0)

    def sigmask(self, tid: int) -> int:
        """PT_LWPINFO's pl_sigmask, FreeBSD numbering -> the Linux 64-bit mask."""
        return F.sigset_to_linux(self.kit.lwpinfo(self.lwp[tid]).sigmask, self.log,
                                 f"tasks/{self.pid}/threads/{tid}/sigmask")

    def sigactions(self) -> list:
        return self.linux_state()[0]

    def linux_state(self):
        """(62 sa_entry, 16 (cur, max) rlimits, umask, tid -> robust list) as the Linux
        process sees them, by injected Linux calls in one stop: rt_sigaction(sig, NULL,
        &old) (FreeBSD's ptrace has no request for handlers), prlimit64(0, res, NULL,
        &old), umask twice, get_robust_list made by each thread, brk(0) (linux_brk answers
        the current break for an address at or below vm_daddr)."""
        if self._linux is None:
            with self.injected() as calls:
                self._linux = (self._read_sigactions(calls), self._read_rlimits(calls),
                               self._read_umask(calls), self._read_robust_lists(calls),
                               calls("brk", 0, step="read brk", path=f"tasks/{self.pid}/mm/brk"))
        return self._linux

    @contextlib.contextmanager
    def injected(self):
        """Linux calls run in the stopped process; the code, data and registers they used
        are put back afterwards."""
        from ..restore.freebsd import LinuxCalls, helper_pages
        # PT_CONTINUE runs every thread not PT_SUSPENDed: the others stay stopped meanwhile
        others = [lwp for tid, lwp in self.lwp.items() if tid != self.pid]
        for lwp in others:
            self.kit.suspend(lwp)
        try:
            calls = LinuxCalls(self.kit, self.pid, *helper_pages(self.kit, self.pid))
            saved = calls.kit.read_memory(self.pid, calls.data, 32)
            try:
                yield calls
            finally:
                calls.kit.write_memory(self.pid, calls.data, saved)
                calls.close()
                self.kit.set_regs(self.pid, calls.saved_regs)
        finally:
            for lwp in others:
                self.kit.resume(lwp)

    def _read_sigactions(self, calls) -> list:
        out = []
        for sig in L.SIGACTION_SIGNALS:
            calls("rt_sigaction", sig, 0, calls.data, 8, step="read sigaction",
                  path=f"tasks/{self.pid}/sigactions/{L.SIGNAL_NAMES.get(sig, sig)}")
            h, fl, rest, mask = struct.unpack(
                "<4Q", self.kit.read_memory(self.pid, calls.data, 32))
            out.append(pb.sa_entry(sigaction=h, flags=fl, restorer=rest, mask=mask))
        return out

    def _read_rlimits(self, calls) -> list:
        out = []
        for i, name in enumerate(L.RLIMITS):
            calls("prlimit64", 0, i, 0, calls.data, step="read rlimit",
                  path=f"tasks/{self.pid}/rlimits/{name}")
            out.append(struct.unpack("<QQ", self.kit.read_memory(self.pid, calls.data, 16)))
        return out

    def _read_robust_lists(self, calls) -> dict[int, tuple[int, int]]:
        """tid -> (head, length) of each thread's robust futex list: get_robust_list(0, ...)
        made by that thread (with another tid linux_get_robust_list wants privileges the
        process may lack)."""
        out = {}
        for tid, lwp in self.lwp.items():
            where = f"tasks/{self.pid}/threads/{tid}/futex_rla"
            calls.reset()
            head, size = calls.put(bytes(8)), calls.put(bytes(8))
            if tid == self.pid:
                calls("get_robust_list", 0, head, size, step="read robust list", path=where)
            else:
                calls.on_lwp(lwp, "get_robust_list", 0, head, size, step="read robust list",
                             path=where)
            out[tid] = struct.unpack("<QQ", self.kit.read_memory(self.pid, head, 8) +
                                     self.kit.read_memory(self.pid, size, 8))
        return out

    def _read_umask(self, calls) -> int:
        old = calls("umask", 0, step="read umask", path=f"tasks/{self.pid}/umask")
        calls("umask", old, step="read umask", path=f"tasks/{self.pid}/umask")
        return old

    def xsave(self, tid: int) -> bytes:
        lwp = self.lwp[tid]
        mask, _ = self.kit.xstate_info(lwp)
        return FPU.to_linux(self.kit.get_xstate(lwp), mask)

    def fs(self, pid: int):
        cwd, root = self.files.get(KF_CWD), self.files.get(KF_ROOT)
        if cwd is None or root is None:
            raise Unsupported("kern.proc.filedesc lists no cwd or root entry",
                              path=f"tasks/{pid}/cwd")
        return pb.fs_entry(cwd_id=self.named(cwd.path), root_id=self.named(root.path),
                           umask=self.linux_state()[2])

    def mm(self, pid: int):
        entries = [e for e in self.kit.vmmap(pid) if e.kind != "guard"]
        vmas = [vma_entry(e, e.obj in self.numbers.shared_anon) for e in entries]
        for vma, e in zip(vmas, entries):
            if e.path and not vma.status & (S["VMA_ANON_PRIVATE"] | S["VMA_ANON_SHARED"]):
                vma.shmid = self.named(e.path)
            elif vma.status & S["VMA_ANON_SHARED"]:
                vma.shmid = self.numbers.get("shm", e.obj)
        exe = self.program(entries)
        rsp = G.unpack(self.kit.get_regs(self.lwp[pid]))["r_rsp"]
        fields = mm_fields(entries, exe, rsp, self.log, f"tasks/{pid}/mm")
        brk = self.linux_state()[4]
        heap = next((e for e in entries if not e.path and e.start >= fields["mm_end_data"]
                     and e.start < brk <= e.end), None)
        if heap is not None:                         # the break itself and its map
            fields["mm_start_brk"], fields["mm_brk"] = heap.start, brk
        elif brk != fields["mm_brk"]:
            self.log.note(f"tasks/{pid}/mm/brk", hex(brk), "the Linuxulator's break is not "
                          "at the program's heap (a restored process keeps its helper's): "
                          f"the heap map's end {fields['mm_brk']:#x} is recorded")
        mm = pb.mm_entry(exe_file_id=self.named(exe), vmas=vmas, **fields)
        mm.mm_saved_auxv.extend(self.kit.auxv(pid))
        return mm

    def program(self, entries) -> str:
        """The program's path: the executable (KF_TEXT) if it is mapped; a process restored
        by a helper still has the helper as its executable (FreeBSD cannot change p_textvp),
        and then the program is the lowest executable file map (noted)."""
        text = self.files.get(KF_TEXT)
        if text and any(e.path == text.path and e.prot & 4 for e in entries):
            return text.path
        code = [e for e in entries if e.path and e.prot & 4]
        if not code:
            raise Unsupported("no executable file map in kern.proc.vmmap",
                              path=f"tasks/{self.pid}/exe")
        self.log.note(f"tasks/{self.pid}/exe", text.path if text else "", "the executable is "
                      f"not mapped (a restored process): the program is {code[0].path}, its "
                      "lowest executable file map")
        return code[0].path

    def fdinfo(self, pid: int) -> list:
        out = []
        for fd, e in sorted(self.files.items()):
            if fd < 0:
                continue
            kind = KF_KIND.get(e.kind)
            where = f"tasks/{pid}/fds/{fd}"
            if kind is None:
                raise Unsupported(f"fd {fd} is a FreeBSD {e.kind}: no Linux counterpart",
                                  path=where)
            if kind not in CAPTURED:
                raise Unsupported(f"a {e.kind} descriptor is not captured on FreeBSD yet",
                                  path=where)
            if kind == "REG" and not e.path:
                raise Unsupported("a file with no name (unlinked?): FreeBSD gives no path "
                                  "to read it back from", path=where)
            out.append(pb.fdinfo_entry(id=self.file_id(e), flags=0, type=L.FD_TYPES[kind],
                                       fd=fd))
        return out

    def file_id(self, e) -> int:
        """One id per open file description: the struct file address kern.file gives (shared
        by dup'ed and inherited descriptors, in every process of the tree). Without it a pipe
        end still has one (a pipe end can only be dup'ed or inherited: one per struct pipe),
        anything else one per descriptor."""
        addr = self.xfiles.get(e.fd)
        if addr:
            return self.numbers.get("desc", addr)
        if e.kind == "pipe":
            return self.numbers.get("desc", ("pipe end", e.pipe_addr))
        return self.numbers.get("desc", ("fd", self.pid, e.fd))

    def entry_of(self, file_id: int):
        return next(e for fd, e in sorted(self.files.items())
                    if fd >= 0 and self.file_id(e) == file_id)

    def pipe_id(self, e) -> int:
        """Both ends of a pipe: one id (the pair of struct pipe addresses), in every process."""
        return self.numbers.get("pipe", frozenset((e.pipe_addr, e.pipe_peer)))

    def file(self, file_id: int):
        if file_id in self.paths:
            path, flags = self.paths[file_id]
            entry = pb.file_entry(type=L.FD_TYPES["REG"], id=file_id)
            entry.reg.CopyFrom(pb.reg_file_entry(id=file_id, flags=flags, pos=0, name=path))
            return entry
        e = self.entry_of(file_id)
        kind = KF_KIND[e.kind]
        flags = F.open_to_linux(kf_to_fbsd_open(e.flags), self.log,
                                f"tasks/{self.pid}/fds/{e.fd}/flags", kind)
        entry = pb.file_entry(type=L.FD_TYPES[kind], id=file_id)
        if kind == "REG":
            entry.reg.CopyFrom(pb.reg_file_entry(id=file_id, flags=flags, pos=e.offset,
                                                 name=e.path))
        elif kind == "PIPE":
            entry.pipe.CopyFrom(pb.pipe_entry(id=file_id, pipe_id=self.pipe_id(e), flags=flags))
        elif kind == "FIFO":
            entry.fifo.CopyFrom(pb.fifo_entry(id=file_id, pipe_id=self.fifo_id(e),
                                              regf_id=self.named(e.path, flags)))
        elif kind == "EVENTFD":
            sem = EFD_SEMAPHORE if e.efd_flags & FBSD_EFD_SEMAPHORE else 0
            entry.efd.CopyFrom(pb.eventfd_file_entry(id=file_id, flags=flags | sem,
                                                     fown=pb.fown_entry(uid=0, euid=0, signum=0,
                                                                        pid_type=0, pid=0),
                                                     counter=e.efd_value))
        return entry

    def fifo_id(self, e) -> int:
        """Every descriptor of one FIFO: one id (by its inode), apart from pipe ids."""
        return self.numbers.get("fifo", e.fileid)

    def pipe_data(self, pipe_id: int) -> bytes:
        if pipe_id >= FIFO_ID_BASE:
            return self.fifo_data(pipe_id)
        return self._pipe_data(pipe_id)

    def fifo_data(self, pipe_id: int) -> bytes:
        """A FIFO's queued bytes: counted with FIONREAD on a read end, read out and written
        back through a write end; an end the process does not hold is opened by the FIFO's
        path for that (O_NONBLOCK, so it never waits) and closed again."""
        ends = [e for fd, e in sorted(self.files.items())
                if fd >= 0 and e.kind == "fifo" and self.fifo_id(e) == pipe_id]
        path, where = ends[0].path, f"tasks/{self.pid}/fds/{ends[0].fd}/data"
        with self.injected() as calls:
            opened = []
            try:
                rfd = next((e.fd for e in ends if e.flags & KF_READ), None)
                if rfd is None:
                    rfd = _open_in(calls, path, 0, where, opened)
                calls.reset()
                count = calls.put(bytes(8))
                calls("ioctl", rfd, FIONREAD, count, step="FIONREAD", path=where)
                count = struct.unpack("<i", calls.kit.read_memory(self.pid, count, 4))[0]
                if not count:
                    return b""
                wfd = next((e.fd for e in ends if e.flags & KF_WRITE), None)
                if wfd is None:
                    wfd = _open_in(calls, path, 1, where, opened)
                return drain_and_refill(calls, rfd, wfd, count, where)
            finally:
                for fd in opened:
                    calls("close", fd, step="close FIFO end", path=where)

    def _pipe_data(self, pipe_id: int) -> bytes:
        """The bytes queued in a pipe. FreeBSD has no tee(2): they are read out of the read
        end by an injected read and written straight back through the write end (made
        non-blocking for that write: a blocking one of 8 KiB or more waits for a reader), so
        the process finds them as they were. A pipe whose write end it does not hold cannot
        be refilled: refused, unless it is empty."""
        ends = [e for fd, e in sorted(self.files.items())
                if fd >= 0 and e.kind == "pipe" and self.pipe_id(e) == pipe_id]
        reader = next((e for e in ends if e.flags & kit_default.KF_FLAG["READ"]), None)
        count = reader.pipe_count if reader else 0
        if not count:
            return b""
        where = f"tasks/{self.pid}/fds/{reader.fd}/data"
        writer = next((e for e in ends if e.pipe_addr == reader.pipe_peer
                       and e.flags & kit_default.KF_FLAG["WRITE"]), None)
        if writer is None:
            raise Unsupported(f"{count} bytes queued in a pipe whose write end this process "
                              "does not hold: they cannot be read without losing them",
                              path=where)
        with self.injected() as calls:
            return drain_and_refill(calls, reader.fd, writer.fd, count, where)
    def page_ranges(self, pid: int, vma) -> list:
        """No pagemap on FreeBSD: every page of a private or anonymous map is saved."""
        if vma.status & (S["VMA_ANON_PRIVATE"] | S["VMA_ANON_SHARED"] | S["VMA_FILE_PRIVATE"]):
            return [model.PageRange(vma.start, vma.end)]
        return []

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return self.kit.read_memory(pid, addr, size)

    def isolation(self) -> model.Isolation:
        """The process's jail and its RCTL rules in Linux vocabulary; the host (jid 0): none."""
        jid = self.kit.kinfo_proc(self.pid).jid
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


class Ids:
    """Ids that agree across the processes of one tree: open file descriptions (file ids),
    pipes (pipe ids), FIFOs, and files known by name only."""
    BASES = {"desc": 1, "pipe": 1, "fifo": FIFO_ID_BASE, "shm": 1}

    def __init__(self):
        self.known: dict[tuple, int] = {}
        self.count = {space: 0 for space in self.BASES}
        self.paths: dict[int, tuple] = {}
        self.shared_anon: set[int] = set()       # kve_obj of anonymous memory shared in the tree

    def get(self, space: str, key) -> int:
        if (space, key) not in self.known:
            self.known[(space, key)] = self.BASES[space] + self.count[space]
            self.count[space] += 1
        return self.known[(space, key)]


def across(reader, writer) -> bytes:
    """Queued bytes of a pipe whose ends are in two processes: read out by the reader's
    process, written back by the writer's (both stopped: nobody else touches the pipe)."""
    (rsrc, r), (wsrc, w) = reader, writer
    where = f"tasks/{rsrc.pid}/fds/{r.fd}/data"
    with rsrc.injected() as calls:
        data = drain(calls, r.fd, r.pipe_count, where)
    with wsrc.injected() as calls:
        refill(calls, w.fd, data, r.pipe_count, f"{where} (written back by process "
               f"{wsrc.pid} fd {w.fd})")
    return data


def shared_anonymous(kit, pids) -> set[int]:
    """kve_obj of the anonymous objects that several processes of the tree map without
    copy-on-write: shared memory (vm_mmap_object gives MAP_SHARED anonymous memory
    MAP_INHERIT_SHARE and no MAP_COPY_ON_WRITE; a fork marks private entries COW on both
    sides, so private memory a fork left in common never counts)."""
    users: dict[int, set[int]] = {}
    for pid in pids:
        for e in kit.vmmap(pid):
            if e.obj and not e.path and not e.private and e.kind in ("default", "swap"):
                users.setdefault(e.obj, set()).add(pid)
    return {obj for obj, who in users.items() if len(who) > 1}


def descriptions(kit, pid: int | None, log: LossLog) -> dict:
    """fd -> struct file address for `pid` (or {pid: {fd: addr}} for pid None) from kern.file;
    empty where the kernel hides the addresses (they read as 0) or offers no kern.file."""
    try:
        rows = kit.xfiles()
    except (KernelError, Unsupported) as e:
        log.note("tasks", "kern.file", f"no struct file addresses ({e}): descriptors sharing "
                 "one open file description are captured as separate opens")
        rows = []
    by_pid: dict[int, dict[int, int]] = {}
    for x in rows:
        if x.file:
            by_pid.setdefault(x.pid, {})[x.fd] = x.file
    return by_pid if pid is None else by_pid.get(pid, {})


def _open_in(calls, path: str, access: int, where: str, opened: list) -> int:
    calls.reset()
    fd = calls("open", calls.put(path.encode() + b"\0"), access | L.OPEN_FLAGS["O_NONBLOCK"] |
               L.O_CLOEXEC, 0, step="open FIFO end", path=f"{where} {path}")
    opened.append(fd)
    return fd


def drain_and_refill(calls, rfd: int, wfd: int, count: int, where: str) -> bytes:
    """Read `count` queued bytes from rfd in the process and write them back through wfd."""
    data = drain(calls, rfd, count, where)
    refill(calls, wfd, data, count, where)
    return data


def _scratch(calls, size: int, where: str, step: str) -> int:
    from ..restore.freebsd import MAP_ANON
    return calls("mmap", 0, size, 0x3, L.MAP_FLAGS["MAP_PRIVATE"] | MAP_ANON, -1, 0,
                 step=step, path=where)


def drain(calls, rfd: int, count: int, where: str) -> bytes:
    """`count` queued bytes read out of rfd by the process (they are gone from the pipe)."""
    from ..restore.freebsd import PAGE
    size = (count + PAGE - 1) & ~(PAGE - 1)
    buf = _scratch(calls, size, where, "read pipe data")
    try:
        got = calls("read", rfd, buf, count, step="read pipe data", path=where)
        data = calls.kit.read_memory(calls.pid, buf, got) if got > 0 else b""
    finally:
        calls("munmap", buf, size, step="read pipe data", path=where)
    if got != count:
        raise Unsupported(f"pipe held {count} bytes; read {got}", path=where)
    return data


def refill(calls, wfd: int, data: bytes, count: int, where: str) -> None:
    """`data` written back into the pipe through wfd (made non-blocking for that write: a
    blocking one of 8 KiB or more waits for a reader)."""
    from ..restore.freebsd import F_SETFL, PAGE
    if not data:
        return
    F_GETFL, nonblock = 3, L.OPEN_FLAGS["O_NONBLOCK"]
    size = (len(data) + PAGE - 1) & ~(PAGE - 1)
    buf = _scratch(calls, size, where, "put pipe data back")
    try:
        calls.kit.write_memory(calls.pid, buf, data)
        old = calls("fcntl", wfd, F_GETFL, 0, step="put pipe data back", path=where)
        calls("fcntl", wfd, F_SETFL, old | nonblock, step="put pipe data back", path=where)
        try:
            back = calls("write", wfd, buf, len(data), step="put pipe data back", path=where)
        finally:
            calls("fcntl", wfd, F_SETFL, old, step="put pipe data back", path=where)
    finally:
        calls("munmap", buf, size, step="put pipe data back", path=where)
    if back != len(data):
        raise Unsupported(f"pipe held {count} bytes; read them, put back {back}", path=where)


STACK_GAP = 8


def mm_fields(entries, exe: str, rsp: int, log: LossLog, where: str) -> dict:
    """Linux's mm_struct bounds from what FreeBSD shows: code and data from the executable's
    maps, the heap as the anonymous map after the data, the stack as the map holding the
    main thread's stack pointer. FreeBSD keeps no argument/environment bounds for a Linux
    process: they are the stack's top (noted in the loss log)."""
    own = [e for e in entries if exe and e.path == exe]
    code = next((e for e in own if e.prot & 4), None)
    data = next((e for e in own if e.prot & 2), None)
    if code is None:
        raise Unsupported(f"no executable map of {exe or 'the program'} in kern.proc.vmmap",
                          path=where)
    data_start, data_end = (data.start, data.end) if data else (code.end, code.end + 1)
    heap = next((e for e in entries if not e.path and e.start >= data_end
                 and e.start - data_end < HEAP_WINDOW), None)
    stack = next((e for e in entries if e.start <= rsp < e.end), None) or \
        next((e for e in entries if e.flags & kit_default.KVME_FLAG["GROWS_DOWN"]), None)
    if stack is None:
        raise Unsupported(f"the main thread's stack pointer {rsp:#x} is in no map and no map grows down", path=where)
    top = stack.end - STACK_GAP
    log.note(f"{where}/arg_start", hex(top), "FreeBSD keeps no argument or environment "
             "bounds for a Linux process: set to the top of the stack")
    if heap is None:
        log.note(f"{where}/brk", hex(data_end), "no heap map after the data segment: the "
                 "heap starts empty at its end")
    brk0, brk = (heap.start, heap.end) if heap else (data_end, data_end)
    return dict(mm_start_code=code.start, mm_end_code=code.end, mm_start_data=data_start,
                mm_end_data=data_end, mm_start_brk=brk0, mm_brk=brk, mm_start_stack=top,
                mm_arg_start=top, mm_arg_end=top, mm_env_start=top, mm_env_end=top)


HEAP_WINDOW = 0x2000000 + (1 << 20)   # Linux places the heap within 32 MiB after the data


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


class FreeBSDTreeSource(model.Source):
    """A process and all its descendants on FreeBSD, in Linux form.

    The root is stopped (PT_ATTACHed) by the caller. The children are found by ki_ppid in
    kern.proc.proc and attached here, parents before children: a stopped parent cannot fork,
    so once a level is stopped the next level is complete. Descriptors that share one open
    file description, within a process or across the tree, get one file id (kern.file's
    struct file address); the ends of one pipe one pipe id (kf_pipe_addr/peer); one FIFO
    one id (its inode). `release()` detaches what this capture attached."""

    def __init__(self, pid: int, kit=kit_default):
        self.kit, self.root = kit, pid
        self.log = LossLog()
        self.attached: list[int] = []
        order = [pid]
        try:
            for parent in order:                     # grows while walking: breadth first
                found = [k for k in kit.all_procs() if k.ppid == parent and k.pid not in order]
                for k in found:
                    if k.stat == kit_default.SZOMB:
                        raise Unsupported(f"process {k.pid} (a child of {parent}) is a zombie: "
                                          "FreeBSD keeps no registers or memory of it to "
                                          "capture", path=f"tasks/{k.pid}/state")
                kids = sorted(k.pid for k in found)
                for kid in kids:
                    kit.attach(kid)
                    self.attached.append(kid)
                order += kids
            self.numbers = Ids()
            self.numbers.shared_anon = shared_anonymous(kit, order)
            shared = descriptions(kit, None, self.log)
            self.procs = {p: FreeBSDSource(p, kit, self.numbers, shared.get(p, {}), self.log)
                          for p in order}
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Detach (and so resume) the descendants this capture stopped."""
        while self.attached:
            self.kit.detach(self.attached.pop(), 0)

    def _of(self, pid: int) -> FreeBSDSource:
        try:
            return self.procs[pid]
        except KeyError:
            raise Unsupported(f"process {pid} is not in the captured tree",
                              path=f"tasks/{pid}") from None

    def _owner(self, tid: int) -> FreeBSDSource:
        for src in self.procs.values():
            if tid in src.lwp:
                return src
        raise Unsupported(f"thread {tid} is in no captured process", path=f"threads/{tid}")

    def meta(self):
        return self.procs[self.root].meta()

    def pstree(self) -> list:
        return [entry for src in self.procs.values() for entry in src.pstree()]

    def core(self, tid: int):
        return self._owner(tid).core(tid)

    def mm(self, pid: int):
        return self._of(pid).mm(pid)

    def fs(self, pid: int):
        return self._of(pid).fs(pid)

    def fdinfo(self, pid: int) -> list:
        return self._of(pid).fdinfo(pid)

    def file(self, file_id: int):
        if file_id in self.numbers.paths:
            return self.procs[self.root].file(file_id)
        for src in self.procs.values():
            if any(fd >= 0 and e.kind in KF_KIND and src.file_id(e) == file_id
                   for fd, e in src.files.items()):
                return src.file(file_id)
        raise Unsupported(f"no descriptor of the tree has file id {file_id}", path="tasks")

    def pipe_data(self, pipe_id: int) -> bytes:
        """Asked of the process holding the pipe's read end (else any end); a pipe whose
        read end is in one process and write end only in another is read out by the first
        and written back by the second."""
        if pipe_id < FIFO_ID_BASE:
            ends = [(src, e) for src in self.procs.values() for fd, e in sorted(src.files.items())
                    if fd >= 0 and e.kind == "pipe" and src.pipe_id(e) == pipe_id]
            reader = next(((s, e) for s, e in ends if e.flags & KF_READ and e.pipe_count), None)
            if reader is not None and not any(
                    s is reader[0] and e.pipe_addr == reader[1].pipe_peer and e.flags & KF_WRITE
                    for s, e in ends):
                writer = next(((s, e) for s, e in ends if e.pipe_addr == reader[1].pipe_peer
                               and e.flags & KF_WRITE), None)
                if writer is not None:
                    return across(reader, writer)
        holders = []
        for src in self.procs.values():
            for fd, e in sorted(src.files.items()):
                if fd < 0 or e.kind not in ("pipe", "fifo"):
                    continue
                pid_of = src.pipe_id(e) if e.kind == "pipe" else src.fifo_id(e)
                if pid_of == pipe_id:
                    holders.append((not e.flags & KF_READ, src))
        if not holders:
            raise Unsupported(f"no descriptor of the tree is pipe {pipe_id}", path="tasks")
        return min(holders, key=lambda h: h[0])[1].pipe_data(pipe_id)

    def page_ranges(self, pid: int, vma) -> list:
        return self._of(pid).page_ranges(pid, vma)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return self._of(pid).read_memory(pid, addr, size)

    def isolation(self):
        return self.procs[self.root].isolation()
