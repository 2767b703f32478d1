"""A small in-memory model.Source with every CRIU message filled the way a real dump is.

Two processes (the root with two threads, one child), regular files, a pipe with queued
data, anonymous and file maps, and memory whose bytes are a function of the address (so any
read can be checked without storing it).
"""
from __future__ import annotations

import struct

from ckptfs import model, pb
from ckptfs.flags import RLIMITS, RLIM_INFINITY, SIGACTION_SIGNALS, VMA_STATUS as S

REGULAR, FPRIV, APRIV, HEAP, VDSO, VSYSCALL, ASHARED = (
    S["VMA_AREA_REGULAR"], S["VMA_FILE_PRIVATE"], S["VMA_ANON_PRIVATE"], S["VMA_AREA_HEAP"],
    S["VMA_AREA_VDSO"], S["VMA_AREA_VSYSCALL"], S["VMA_ANON_SHARED"])
SHMID = 777                    # one shared anonymous object mapped by both processes
MiB = 1 << 20


def pattern(addr: int, size: int) -> bytes:
    """Memory content: every 8-byte word holds its own address xor a constant."""
    first = addr & ~7
    words = range(first, addr + size, 8)
    raw = b"".join(struct.pack("<Q", w ^ 0x5A5A5A5A5A5A5A5A) for w in words)
    return raw[addr - first: addr - first + size]


def _fown():
    return pb.fown_entry(uid=0, euid=0, signum=0, pid_type=0, pid=0)


def reg(fid, name, flags=0, pos=0, **kw):
    return pb.file_entry(type=pb.fd_types.Value("REG"), id=fid,
                         reg=pb.reg_file_entry(id=fid, flags=flags, pos=pos, fown=_fown(),
                                               name=name, **kw))


def pipe(fid, pipe_id, flags):
    return pb.file_entry(type=pb.fd_types.Value("PIPE"), id=fid,
                         pipe=pb.pipe_entry(id=fid, pipe_id=pipe_id, flags=flags, fown=_fown()))


def vma(start, end, status, flags=0x22, prot=3, shmid=0, pgoff=0, **kw):
    return pb.vma_entry(start=start, end=end, pgoff=pgoff, shmid=shmid, prot=prot, flags=flags,
                        status=status, fd=-1, **kw)


def core(tid, leader, comm="victim", sigmask=0):
    regs = pb.user_x86_regs_entry(**{f.name: (tid * 1000 + f.number) for f in
                                     pb.user_x86_regs_entry.DESCRIPTOR.fields if f.number <= 27})
    regs.mode = pb.NATIVE
    fp = pb.user_x86_fpregs_entry(cwd=0x37f, swd=0, twd=0, fop=0, rip=0, rdp=0, mxcsr=0x1f80,
                                  mxcsr_mask=0xffff, st_space=list(range(32)),
                                  xmm_space=list(range(100, 164)))
    fp.xsave.xstate_bv = 7
    fp.xsave.ymmh_space.extend(range(64))
    c = pb.core_entry(mtype=pb.core_entry.X86_64)
    c.thread_info.clear_tid_addr = 0x7f00000009d0 + tid
    c.thread_info.gpregs.CopyFrom(regs)
    c.thread_info.fpregs.CopyFrom(fp)
    tcore = c.thread_core
    tcore.futex_rla, tcore.futex_rla_len = 0x7f00000009e0 + tid, 24
    tcore.sched_nice, tcore.sched_policy, tcore.sched_prio = -2, 0, 0
    tcore.sas.ss_sp, tcore.sas.ss_size, tcore.sas.ss_flags = 0, 0, 2
    tcore.comm = comm if leader else f"{comm}-t"
    cr = tcore.creds
    for f in ("uid", "gid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid", "secbits"):
        setattr(cr, f, 0)
    for f in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd"):
        getattr(cr, f).extend([0 if f == "cap_inh" else 0xffffffff, 0 if f == "cap_inh" else 0x1ff])
    cr.groups.extend([0, 27])
    if not leader:
        tcore.blk_sigset = sigmask
        return c
    tc = c.tc
    tc.task_state, tc.exit_code, tc.personality, tc.flags = 1, 0, 0, 0x400000
    tc.blk_sigset, tc.comm = sigmask, comm
    for t in (tc.timers.real, tc.timers.virt, tc.timers.prof):
        t.isec = t.iusec = t.vsec = t.vusec = 0
    tc.timers.real.vsec = 5
    for i, _ in enumerate(RLIMITS):
        tc.rlimits.rlimits.add(cur=1024 if i == 7 else RLIM_INFINITY,
                               max=4096 if i == 7 else RLIM_INFINITY)
    for sig in SIGACTION_SIGNALS:
        handler = 0x401136 if sig == 10 else 1 if sig == 13 else 0
        tc.sigactions.add(sigaction=handler, flags=0x14000000 if handler > 1 else 0,
                          restorer=0x7f0000001000 if handler > 1 else 0, mask=0)
    tc.loginuid, tc.oom_score_adj = 4294967295, -100
    return c


class FakeSource(model.Source):
    ROOT, CHILD, THREAD = 100, 101, 102
    PIPE_ID = 5555
    BIG = 0x7f0000000000
    SHARED_AT = {ROOT: 0x7e0000000000, CHILD: 0x500000000}   # where each maps object SHMID

    def __init__(self):
        R, C = self.ROOT, self.CHILD
        self._pstree = [pb.pstree_entry(pid=R, ppid=0, pgid=R, sid=R, threads=[R, self.THREAD]),
                        pb.pstree_entry(pid=C, ppid=R, pgid=R, sid=R, threads=[C])]
        self._cores = {R: core(R, True, sigmask=1 << 9), self.THREAD: core(self.THREAD, False, sigmask=3),
                       C: core(C, True, comm="child")}
        ns = dict(pid_ns_id=1, net_ns_id=2, ipc_ns_id=3, uts_ns_id=9, mnt_ns_id=6, user_ns_id=7,
                  cgroup_ns_id=8, time_ns_id=5)
        self._ids = {R: pb.task_kobj_ids_entry(vm_id=2, files_id=2, fs_id=2, sighand_id=2, **ns),
                     C: pb.task_kobj_ids_entry(vm_id=3, files_id=3, fs_id=3, sighand_id=3, **ns)}
        self._files = {1: reg(1, "/usr/bin/true", size=4096, mode=0o100755),
                       2: reg(2, "/", mode=0o40755),
                       3: pipe(3, self.PIPE_ID, 0), 4: pipe(4, self.PIPE_ID, 1),
                       5: reg(5, "/tmp/ckpt.log", flags=0o102001, pos=12, size=12, mode=0o100644),
                       6: reg(6, "/dev/null", flags=0o2, mode=0o20666)}
        fdi = pb.fdinfo_entry
        self._fdinfo = {R: [fdi(id=6, flags=0, type=1, fd=0), fdi(id=5, flags=0, type=1, fd=1),
                            fdi(id=5, flags=0, type=1, fd=2), fdi(id=3, flags=1, type=2, fd=3),
                            fdi(id=4, flags=1, type=2, fd=4)],
                        C: [fdi(id=6, flags=0, type=1, fd=0)]}
        self._mm = {R: self._make_mm(R, big=True), C: self._make_mm(C, big=False)}
        self._ranges = {
            (R, 0x600000): [model.PageRange(0x600000, 0x610000), model.PageRange(0x620000, 0x621000)],
            (R, self.BIG): [model.PageRange(self.BIG, self.BIG + 3 * MiB)],
            (R, 0x7ffff7fc0000): [model.PageRange(0x7ffff7fc0000, 0x7ffff7fc2000)],
            (C, 0x600000): [model.PageRange(0x600000, 0x602000)],
            (R, 0x400000): [model.PageRange(0x401000, 0x402000)],  # a COWed file page
            # the shared object: root saved pages 0-3, the child 2-5 (same data in 2-3)
            (R, self.SHARED_AT[R]): [model.PageRange(self.SHARED_AT[R], self.SHARED_AT[R] + 0x4000)],
            (C, self.SHARED_AT[C]): [model.PageRange(self.SHARED_AT[C] + 0x2000, self.SHARED_AT[C] + 0x6000)],
        }
        self.max_read = 0

    def _make_mm(self, pid, big):
        vmas = [vma(0x400000, 0x402000, REGULAR | FPRIV, flags=0x2, prot=5, shmid=1, pgoff=0),
                vma(0x600000, 0x640000, REGULAR | APRIV | HEAP)]
        shared = vma(self.SHARED_AT[pid], self.SHARED_AT[pid] + 0x10000, REGULAR | ASHARED,
                     flags=0x21, shmid=SHMID)
        vmas.insert(2, shared)          # after the heap: ascending order
        if big:
            vmas.append(vma(self.BIG, self.BIG + 3 * MiB, REGULAR | APRIV, madv=1 << 14))
            vmas.append(vma(0x7ffff7fc0000, 0x7ffff7fc2000, REGULAR | APRIV | VDSO, prot=5))
        # real dumps end with [vsyscall] (crit x rss relies on a page-less last VMA)
        vmas.append(vma(0xffffffffff600000, 0xffffffffff601000, VSYSCALL | APRIV, prot=4))
        mm = pb.mm_entry(mm_start_code=0x400000, mm_end_code=0x401000, mm_start_data=0x600000,
                         mm_end_data=0x600100, mm_start_stack=0x7ffffffde000,
                         mm_start_brk=0x600000, mm_brk=0x640000, mm_arg_start=0x7ffffffde100,
                         mm_arg_end=0x7ffffffde200, mm_env_start=0x7ffffffde200,
                         mm_env_end=0x7ffffffde300, exe_file_id=1,
                         mm_saved_auxv=[33, 0x7ffff7fc0000, 6, 4096, 0, 0], vmas=vmas,
                         dumpable=1)
        return mm

    # -- model.Source ---------------------------------------------------------------------
    def meta(self):
        return model.Meta(hostname="ckpt-test")

    def pstree(self):
        return list(self._pstree)

    def core(self, tid):
        return self._cores[tid]

    def ids(self, pid):
        return self._ids[pid]

    def mm(self, pid):
        return self._mm[pid]

    def fs(self, pid):
        return pb.fs_entry(cwd_id=2, root_id=2, umask=0o22)

    def fdinfo(self, pid):
        return list(self._fdinfo[pid])

    def file(self, file_id):
        return self._files[file_id]

    def pipe_data(self, pipe_id):
        return b"hello pipe" if pipe_id == self.PIPE_ID else b""

    def page_ranges(self, pid, vma):
        return list(self._ranges.get((pid, vma.start), []))

    def read_memory(self, pid, addr, size):
        self.max_read = max(self.max_read, size)
        base = self.SHARED_AT[pid]
        if base <= addr < base + 0x10000:      # shared: content is a function of the offset
            return pattern((addr - base) ^ (SHMID << 40), size)
        return pattern(addr ^ (pid << 40), size)

    def isolation(self):
        return model.Isolation(hostname="ckpt-test", domainname="(none)",
                               namespaces={"uts": 9}, own_namespaces=("uts",))
