"""A strict fake FreeBSD kernel behind the oskit.freebsd interface (the only mock in ckptfs:
there is no FreeBSD host here). Kernel-level calls are checked the way FreeBSD checks them
(request numbers and sizes, attached and stopped targets, secure selectors, mapped PT_IO
addresses); the Linux system calls injected into a Linux-branded helper are checked the way
the Linuxulator would see them (Linux numbers, Linux flag bits, pointers into written memory,
descriptor tables). Every call is recorded in `log`; a violation answers the errno FreeBSD
or Linux would, so a wrong restore fails its test."""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from ckptfs import flags as L
from ckptfs.errors import KernelError
from ckptfs.oskit import freebsd as O
from ckptfs.restore import freebsd as RF
from ckptfs.translate import LossLog
from ckptfs.translate.freebsd import fdkinds as K, flags as FF, regs as G

HELPER_CODE = (0x7ffff7ff0000, 0x7ffff7ff1000)    # r-x
HELPER_DATA = (0x7ffff7fe0000, 0x7ffff7fe2000)    # rw- (the helper's stack)
HELPER_BSS = (0x600000, 0x601000)                  # the helper's data segment: vm_daddr, break
MAXDSIZ = 32 << 30                                 # sys/amd64/include/vmparam.h: RLIMIT_DATA cap
LINUX_NR = {v: k for k, v in RF.NR.items()}
LINUX_OPEN_BITS = 3                                # O_ACCMODE
for _v in L.OPEN_FLAGS.values():
    LINUX_OPEN_BITS |= _v
LINUX_CLONE_OK = {RF.CLONE_THREAD_FLAGS,           # what linux_clone_thread is given here
                  RF.CLONE_THREAD_FLAGS | RF.CLONE_CHILD_CLEARTID}
PAGE = 4096
RLIM_INFINITY = (1 << 64) - 1
PIPE_SIZE, BIG_PIPE_SIZE, PIPE_MINDIRECT = 16384, 65536, 8192     # sys/sys/pipe.h
SCRATCH_BASE = 0x200000000                        # where mmap without MAP_FIXED puts things
KF_BITS = (("APPEND", "O_APPEND"), ("NONBLOCK", "O_NONBLOCK"), ("ASYNC", "O_ASYNC"),
           ("DIRECT", "O_DIRECT"))                # kinfo_file flag <- Linux open flag


class Mem:
    """A process's memory as the kernel keeps it: pages, zero until written. A fork copies."""
    def __init__(self, pages=None):
        self.pages = {k: bytearray(v) for k, v in (pages or {}).items()}

    def write(self, addr, data):
        pos = 0
        while pos < len(data):
            page, at = (addr + pos) & ~(PAGE - 1), (addr + pos) % PAGE
            n = min(PAGE - at, len(data) - pos)
            self.pages.setdefault(page, bytearray(PAGE))[at:at + n] = data[pos:pos + n]
            pos += n

    def read(self, addr, size):
        out, pos = bytearray(), 0
        while pos < size:
            page, at = (addr + pos) & ~(PAGE - 1), (addr + pos) % PAGE
            n = min(PAGE - at, size - pos)
            out += self.pages.get(page, bytes(PAGE))[at:at + n]
            pos += n
        return bytes(out)

    def drop(self, start, end):
        for page in [p for p in self.pages if start <= p < end]:
            del self.pages[page]

    def copy(self):
        return Mem(self.pages)


class Map:
    """One vm_map entry: [start, end), protection, backing (anonymous or a file). Shared
    anonymous memory has an `obj` (pages by object offset) that every entry mapping it
    holds: a fork hands the same one to the child (MAP_INHERIT_SHARE)."""
    def __init__(self, start, end, prot, path="", offset=0, private=True, grows_down=False,
                 obj=None):
        self.start, self.end, self.prot, self.path = start, end, prot, path
        self.offset, self.private, self.grows_down = offset, private, grows_down
        self.obj = obj

    def cut(self, start, end):
        """This entry without [start, end): 0, 1 or 2 entries."""
        out = []
        if self.start < start:
            out.append(Map(self.start, min(self.end, start), self.prot, self.path,
                           self.offset, self.private, self.grows_down, self.obj))
        if end < self.end:
            at = max(self.start, end)
            keeps = self.path or self.obj is not None
            out.append(Map(at, self.end, self.prot, self.path,
                           self.offset + (at - self.start) if keeps else 0, self.private,
                           self.grows_down, self.obj))
        return out

    def copy(self):
        """The child's entry after a fork: the same object if shared, else a copy."""
        return Map(self.start, self.end, self.prot, self.path, self.offset, self.private,
                   self.grows_down, self.obj)


class Pipe:
    def __init__(self, pid):
        self.id, self.buf, self.size = pid, bytearray(), PIPE_SIZE
        self.readers = self.writers = 0


class Node:
    """A file of the jail's filesystem the fake has touched (created, written, a FIFO)."""
    def __init__(self, kind, mode):
        self.kind, self.mode, self.data = kind, mode, bytearray()
        self.pipe = Pipe(-1) if kind == "fifo" else None


class Desc:
    """An open file description: shared by every descriptor dup'd or inherited from it."""
    def __init__(self, kind, path, flags, node=None, pipe=None, reads=False, writes=False):
        self.kind, self.path, self.flags, self.pos = kind, path, flags, 0
        self.node, self.pipe, self.reads, self.writes = node, pipe, reads, writes
        self.refs, self.count, self.semaphore = 0, 0, False

    def __iter__(self):                       # (kind, path, flags, pos) like a kinfo_file
        return iter((self.kind, self.path, self.flags, self.pos))


class Proc:
    def __init__(self, pid, fds=None, maps=None, mem=None):
        self.pid, self.fds = pid, dict(fds or {})
        self.cloexec = {}
        self.maps = [m if isinstance(m, Map) else Map(*m) for m in (maps or [])]
        self.mem = mem if isinstance(mem, Mem) else Mem()
        for addr, data in (mem or {}).items() if isinstance(mem, dict) else ():
            self.mem.write(addr, data)
        self.regs_of = {}                            # unused
        self.fsbase, self.gsbase, self.masks, self.names = {}, {}, {}, {}
        self.clear_tid = {}                          # lwp -> em->child_clear_tid
        self.cwd, self.root, self.umask, self.text = "/", "/", 0o22, "/usr/local/libexec/ckptfs/linux-helper"
        self.limits = {i: (RLIM_INFINITY, RLIM_INFINITY) for i in range(16)}
        self.limits[7] = (1024, 1 << 20)             # RLIMIT_NOFILE, as a jail's default
        self.creds = dict(uid=0, ruid=0, svuid=0, rgid=0, svgid=0, groups=(0,))
        self.comm, self.ppid = "linux-helper", 1
        self.stat = 3                                # ki_stat: SSLEEP (SZOMB 5 once exited)
        self.auxv = [6, 4096, 0, 0]                  # AT_PAGESZ 4096, AT_NULL
        self.lwps = {pid: None}                     # lwp -> regs bytes
        self.suspended, self.pending_stops = set(), []
        self.attached, self.follow = False, False
        self.pending = None
        self.pgid = self.sid = None
        self.sigactions = {}                         # Linux signal -> (handler, flags, restorer, mask)
        self.sigmask = (0, 0, 0, 0)                  # FreeBSD sigset_t words
        self.jid = 0
        self.scratch = HELPER_CODE[0]
        # vm_daddr and the break (vm_daddr + vm_dsize): the helper's own data segment, as
        # the image activator set them (imgact_elf.c); linux_brk moves only this one
        self.daddr, self.brk = HELPER_BSS
        self.robust = {}                             # lwp -> em->robust_futexes


class FakeFreeBSD:
    KVME_PROT_EXEC, JAIL_CREATE, SIGKILL = O.KVME_PROT_EXEC, O.JAIL_CREATE, O.SIGKILL
    PL_FLAG_CHILD, PL_FLAG_BORN = O.PL_FLAG_CHILD, O.PL_FLAG_BORN
    KF_FLAG, KVME_FLAG = O.KF_FLAG, O.KVME_FLAG

    def __init__(self, helper_pid=900, xsave_mask=0x7, xsave_len=832, mxcsr_mask=0xffff,
                 helper_bss=HELPER_BSS):
        self.helper_bss = helper_bss                 # where the helper's data segment is
        # the CPU: XCR0 and cpu_max_ext_state_size (None: no XSAVE), cpu_mxcsr_mask
        self.xsave_mask, self.xsave_len, self.mxcsr_mask = xsave_mask, xsave_len, mxcsr_mask
        self.fpu = {}                                # lwp -> save area bytes
        self.log, self.procs, self.pipes = [], {}, {}
        self.next_pid, self.next_lwp, self.helper_pid = helper_pid, 100100, helper_pid
        self.jails, self.rules, self.killed = {}, [], []
        self.fail_on = None                          # (linux call name, errno): inject a failure
        self.fs, self.gone = {}, set()               # jail files touched; paths unlinked
        self.inodes = {}
        self.objs = {}                               # kve_obj handed out
        self.next_map = SCRATCH_BASE
        self.next_file = 0                           # struct file addresses handed out
        self.ports = {}                              # (family, type, port) bound

    def __getattr__(self, name):            # anything not faked is a test failure
        raise AssertionError(f"unexpected FreeBSD call {name}")

    # -- helpers -------------------------------------------------------------------------------
    def _err(self, step, err, pid=None):
        raise KernelError(step, err, path=f"pid {pid}" if pid is not None else None)

    def _traced(self, pid, step):
        for p in self.procs.values():
            if pid == p.pid or pid in p.lwps:
                if not p.attached:
                    self._err(step, errno.EBUSY, pid)
                return p
        self._err(step, errno.ESRCH, pid)

    def new_helper(self):
        pid = self.next_pid
        self.next_pid += 1
        reg = {n: 0 for n in G.REG_NAMES}
        reg.update(r_rip=HELPER_CODE[0] + 0x40, r_cs=0x43, r_ss=0x3b, r_ds=0x3b, r_es=0x3b,
                   r_fs=0x13, r_gs=0x1b, r_rflags=0x202, r_rsp=HELPER_DATA[1] - 64)
        p = Proc(pid, maps=[[*HELPER_CODE, 5], [*HELPER_DATA, 3]],
                 mem={HELPER_CODE[0]: b"\x55\x48\x89"})
        null = Desc("vnode", "/dev/null", 2, node=self._node("/dev/null"))
        for fd in (0, 1, 2):
            self._install(p, null, fd=fd)
        p.daddr, p.brk = self.helper_bss
        p.lwps[pid] = G.pack(reg)
        self.procs[pid] = p
        return p

    # -- kernel-level interface (FreeBSD values) ---------------------------------------------
    def jail_set(self, params, flags):
        if flags != O.JAIL_CREATE or "name" not in params:
            self._err("jail_set", errno.EINVAL)
        for k, v in params.items():
            O.jail_value(k, v)                      # encodable the libjail way, or ValueError
        jid = len(self.jails) + 7
        self.jails[jid] = dict(params)
        self.log.append(("jail_set", params["name"], flags))
        return jid

    def jail_remove(self, jid):
        if jid not in self.jails:
            self._err("jail_remove", errno.EINVAL)
        del self.jails[jid]
        self.log.append(("jail_remove", jid))

    def rctl_add_rule(self, rule):
        subject, sid, resource, rest = rule.split(":", 3)
        if subject != "jail" or not any(j["name"] == sid for j in self.jails.values()):
            self._err(f"rctl_add_rule {rule}", errno.ESRCH)
        self.rules.append(rule)
        self.log.append(("rctl", rule))

    def cpuset_jail(self, jid, cpulist):
        if jid not in self.jails:
            self._err("cpuset_setaffinity", errno.ESRCH)
        if not int.from_bytes(O.parse_cpulist(cpulist), "little"):
            self._err("cpuset_setaffinity", errno.EDEADLK)      # an empty set
        self.log.append(("cpuset", jid, cpulist))

    def attach(self, pid):
        p = self.procs.get(pid) or self._err("PT_ATTACH", errno.ESRCH, pid)
        if p.attached:
            self._err("PT_ATTACH", errno.EBUSY, pid)
        p.attached = True
        self.log.append(("attach", pid))

    def trace_events(self, pid):
        self._traced(pid, "PT_FOLLOW_FORK").follow = True
        self.log.append(("trace_events", pid))

    def kill(self, pid, sig):
        if pid not in self.procs:
            self._err("kill", errno.ESRCH, pid)
        del self.procs[pid]
        self.killed.append(pid)
        self.log.append(("kill", pid, sig))

    def detach(self, pid, sig):
        p = self._traced(pid, "PT_DETACH")
        if p.suspended:
            raise AssertionError(f"detach with lwps {p.suspended} still suspended")
        if p.mem.read(p.scratch, 3) == RF.TRAP_CODE:
            raise AssertionError(f"pid {pid} detached with the trap code still in place")
        p.attached = False
        self.log.append(("detach", pid))

    def vmmap(self, pid):
        p = self.procs[pid]
        out = []
        for m in sorted(p.maps, key=lambda m: m.start):
            flags = (O.KVME_FLAG["COW"] if m.private else 0) | \
                (O.KVME_FLAG["GROWS_DOWN"] if m.grows_down else 0)
            out.append(O.VmEntry(m.start, m.end, m.offset, "vnode" if m.path else "default",
                                 m.prot, flags, 0, m.path, obj=self._obj_addr(pid, m)))
        return out

    def _obj_addr(self, pid, m):
        """kve_obj of an anonymous entry: the shared object's own address, or one per
        private entry (what a private map after a fork shares is marked COW anyway)."""
        if m.path:
            return 0
        if m.obj is not None:
            if not hasattr(m.obj, "addr"):               # a Mem: a plain attribute
                m.obj.addr = 0xfffff80200000000 + 0x1000 * len(self.objs)
                self.objs[("shared", m.obj.addr)] = m.obj.addr
            return m.obj.addr
        return self.objs.setdefault((pid, m.start), 0xfffff80200000000 + 0x1000 * len(self.objs))

    def _mapped(self, p, addr, size):
        end, pos = addr + size, addr              # covered by maps without a hole
        for m in sorted(p.maps, key=lambda m: m.start):
            if m.start <= pos < m.end:
                pos = m.end
        return pos >= end

    def read_memory(self, pid, addr, size):
        p = self._traced(pid, "PT_IO read")
        if not self._mapped(p, addr, size):
            self._err(f"PT_IO read {addr:#x}+{size}", errno.EFAULT, pid)
        return self._contents(p, addr, size)

    @staticmethod
    def _shared_at(p, page):
        return next((m for m in p.maps if m.obj is not None and m.start <= page < m.end), None)

    def _contents(self, p, addr, size):
        """What the process sees: written pages, else the mapped file's bytes (the page
        cache of the jail's file, this host's file here), else zeros."""
        out = bytearray(p.mem.read(addr, size))
        for page in range(addr & ~(PAGE - 1), addr + size, PAGE):
            shm = self._shared_at(p, page)
            if shm is not None:
                lo, hi = max(page, addr), min(page + PAGE, addr + size)
                out[lo - addr:hi - addr] = shm.obj.read(shm.offset + lo - shm.start, hi - lo)
                continue
            if page in p.mem.pages:
                continue
            m = next((m for m in p.maps if m.start <= page < m.end and m.path), None)
            if m is None or not os.path.isfile(m.path):
                continue
            with open(m.path, "rb") as f:
                f.seek(m.offset + page - m.start)
                raw = f.read(PAGE).ljust(PAGE, b"\0")
            lo, hi = max(page, addr), min(page + PAGE, addr + size)
            out[lo - addr:hi - addr] = raw[lo - page:hi - page]
        return bytes(out)

    def write_memory(self, pid, addr, data):
        p = self._traced(pid, "PT_IO write")
        if not self._mapped(p, addr, len(data)):
            self._err(f"PT_IO write {addr:#x}+{len(data)}", errno.EFAULT, pid)
        data = bytes(data)
        for page in range(addr & ~(PAGE - 1), addr + len(data), PAGE):
            shm = self._shared_at(p, page)
            lo, hi = max(page, addr), min(page + PAGE, addr + len(data))
            if shm is not None:                      # into the object every sharer sees
                shm.obj.write(shm.offset + lo - shm.start, data[lo - addr:hi - addr])
                continue
            if page not in p.mem.pages:              # copy on write from the mapped file
                p.mem.pages[page] = bytearray(self._contents(p, page, PAGE))
            p.mem.write(lo, data[lo - addr:hi - addr])
        if bytes(data) == RF.TRAP_CODE:
            p.scratch = addr                         # where the injector runs its calls
        if addr >= HELPER_DATA[0] and addr < HELPER_DATA[1] or addr == p.scratch:
            return                                   # argument/trap traffic: not logged
        self.log.append(("write", pid, addr, len(data)))

    def get_regs(self, lwp):
        p = self._traced(lwp, "PT_GETREGS")
        return p.lwps[lwp]

    def set_regs(self, lwp, raw):
        p = self._traced(lwp, "PT_SETREGS")
        if len(raw) != O.REG_SIZE:
            self._err("PT_SETREGS", errno.EINVAL, lwp)
        r = G.unpack(raw)
        if r["r_cs"] != 0x43 or r["r_ss"] != 0x3b:  # amd64 set_regs: CS_SECURE/ selectors
            self._err("PT_SETREGS", errno.EINVAL, lwp)
        p.lwps[lwp] = raw
        if lwp != p.pid or r["r_rip"] != p.scratch:
            self.log.append(("setregs", lwp, r["r_rip"]))

    def cont(self, pid, sig):
        """PT_CONTINUE runs every lwp not PT_SUSPENDed: exactly one may run here (two at
        once would race), and it must be at the trap."""
        p = self._traced(pid, "PT_CONTINUE")
        runnable = [lwp for lwp in p.lwps if lwp not in p.suspended]
        if len(runnable) != 1:
            raise AssertionError(f"PT_CONTINUE of pid {pid} would run lwps {runnable} at once")
        lwp = self.current_lwp = runnable[0]
        r = G.unpack(p.lwps[lwp])
        if r["r_rip"] != p.scratch or p.mem.read(p.scratch, 3) != RF.TRAP_CODE or \
                not any(m.start <= p.scratch < m.end and m.prot & 4 for m in p.maps):
            raise AssertionError(f"pid {pid} continued at {r['r_rip']:#x} without the trap")
        name = LINUX_NR.get(r["r_rax"])
        args = [r[a] for a in RF.ARG_REGS]
        if name is None:
            result = -errno.ENOSYS
        elif self.fail_on and self.fail_on[0] == name:
            result = -self.fail_on[1]
        else:
            result = getattr(self, "linux_" + name)(p, *args)
        p.lwps[lwp] = G.pack(dict(r, r_rax=result & G.U64, r_rip=p.scratch + 3))
        p.pending_stops.insert(0, 0x57f)           # SIGTRAP at the int3

    def wait(self, pid):
        p = self.procs[pid]
        if not p.pending_stops:
            raise AssertionError(f"wait on pid {pid} with nothing to report: it would hang")
        return p.pending_stops.pop(0)

    def lwpinfo(self, lwp):
        p = self._traced(lwp, "PT_LWPINFO")
        flags = p.lwpflags.pop(lwp, 0) if hasattr(p, "lwpflags") else 0
        # the record goes through its real layout, as PT_LWPINFO would copy it out
        mask = p.masks.get(lwp, p.sigmask)
        return O.parse_lwpinfo(O.pack_lwpinfo(O.LwpInfo(lwp, 1, flags, mask, (0,) * 4,
                                                        p.names.get(lwp, p.comm[:19]), 0)))

    def filedesc(self, pid):
        """kinfo_file records: descriptors with KF_FLAG bits, then cwd (-1), root (-2) and the
        executable (-5)."""
        p = self.procs[pid]
        out = []
        for fd, d in sorted(p.fds.items()):
            if not isinstance(d, Desc):                      # a test's hand-made entry
                out.append(O.FileEntry(fd, d[0], 1, 0, d[1]))
                continue
            acc = {0: 1, 1: 2, 2: 3}.get(d.flags & 3, 3)
            kf = acc | sum(O.KF_FLAG[k] for k, lin in KF_BITS if d.flags & L.OPEN_FLAGS[lin])
            out.append(O.FileEntry(fd, d.kind, kf, d.pos, d.path, **self._kf_un(d)))
        out += [O.FileEntry(-1, "vnode", 1, 0, p.cwd), O.FileEntry(-2, "vnode", 1, 0, p.root),
                O.FileEntry(-5, "vnode", 1, 0, p.text)]
        # through the real record layout, as kern.proc.filedesc copies it out
        return O.parse_filedesc(b"".join(O.pack_kinfo_file(e) for e in out))

    def _kf_un(self, d):
        """kf_un of a description: a pipe end's struct pipe and its peer (data queued toward
        the reader is counted on the read end's), an eventfd's counter and EFD_ flags."""
        if d.kind == "pipe":
            base = 0xfffff80000100000 + 0x100 * d.pipe.id
            mine, peer = (base, base + 0x80) if d.reads else (base + 0x80, base)
            return dict(pipe_addr=mine, pipe_peer=peer,
                        pipe_count=len(d.pipe.buf) if d.reads else 0)
        if d.kind in ("fifo", "vnode") and d.node is not None:
            return dict(fileid=self._inode(d.node))
        if d.kind == "eventfd":
            nonblock = 0x4 if d.flags & L.OPEN_FLAGS["O_NONBLOCK"] else 0
            return dict(efd_value=d.count, efd_flags=int(d.semaphore) | nonblock)
        return {}

    def proc_jid(self, pid):
        return self.procs[pid].jid

    def jail_get(self, jid, keys):
        if jid not in self.jails:
            self._err(f"jail_get {jid}", errno.ENOENT)
        out = {}
        for k in keys:
            name, value = O.jail_value(k, self.jails[jid].get(k, 0))
            out[k] = (value or b"\0").ljust(1024, b"\0")
        return out

    def rctl_get_rules(self, filter_):
        return [r for r in self.rules if r.startswith(filter_ + ":")]

    def get_fsbase(self, lwp):
        return self._traced(lwp, "PT_GETFSBASE").fsbase.get(lwp, 0x7f00aa000000)

    def get_gsbase(self, lwp):
        return self._traced(lwp, "PT_GETGSBASE").gsbase.get(lwp, 0)

    def suspend(self, lwp):
        self._traced(lwp, "PT_SUSPEND").suspended.add(lwp)
        self.log.append(("suspend", lwp))

    def resume(self, lwp):
        p = self._traced(lwp, "PT_RESUME")
        if lwp not in p.suspended:
            self._err("PT_RESUME", errno.EINVAL, lwp)
        p.suspended.discard(lwp)
        self.log.append(("resume", lwp))

    def set_fsbase(self, lwp, v):
        self._traced(lwp, "PT_SETFSBASE")
        if v >= 1 << 47:
            self._err("PT_SETFSBASE", errno.EINVAL, lwp)
        self._traced(lwp, "PT_SETFSBASE").fsbase[lwp] = v
        self.log.append(("fsbase", lwp, v))

    def set_gsbase(self, lwp, v):
        if v >= 1 << 47:                         # cpu_ptrace: rv >= sv_maxuser
            self._err("PT_SETGSBASE", errno.EINVAL, lwp)
        self._traced(lwp, "PT_SETGSBASE").gsbase[lwp] = v
        self.log.append(("gsbase", lwp, v))

    # FPU. sys/amd64/amd64/ptrace_machdep.c cpu_ptrace_xstate + amd64/fpu.c fpusetregs /
    # fpusetxstate: PT_GETXSTATE_INFO gives (xsave_mask, cpu_max_ext_state_size);
    # PT_SETXSTATE takes 512 + 64 <= len <= that size (the part past 512 must hold the
    # header), refuses an xstate_bv outside the mask (EINVAL), copies the legacy region
    # (MXCSR masked with cpu_mxcsr_mask), sets xstate_bv and copies from 576 on; the header's
    # other words are not taken. No XSAVE (use_xsave == 0): EOPNOTSUPP for all of them.
    def xstate_info(self, lwp):
        self._traced(lwp, "PT_GETXSTATE_INFO")
        if self.xsave_mask is None:
            self._err("PT_GETXSTATE_INFO", errno.EOPNOTSUPP, lwp)
        return self.xsave_mask, self.xsave_len

    def _fpu(self, lwp):
        """This lwp's save area as the kernel keeps it (the initial state at first)."""
        if lwp not in self.fpu:
            buf = bytearray(self.xsave_len or 512)
            struct.pack_into("<HH", buf, 0, 0x37f, 0)
            struct.pack_into("<II", buf, 24, 0x1f80, 0xffbf)
            if self.xsave_mask is not None:
                struct.pack_into("<Q", buf, 512, 3)
            self.fpu[lwp] = buf
        return self.fpu[lwp]

    def get_xstate(self, lwp):
        self._traced(lwp, "PT_GETXSTATE")
        if self.xsave_mask is None:
            self._err("PT_GETXSTATE", errno.EOPNOTSUPP, lwp)
        return bytes(self._fpu(lwp))

    def set_xstate(self, lwp, data):
        self._traced(lwp, "PT_SETXSTATE")
        if self.xsave_mask is None:
            self._err("PT_SETXSTATE", errno.EOPNOTSUPP, lwp)
        if not 512 + 64 <= len(data) <= self.xsave_len:
            self._err(f"PT_SETXSTATE len {len(data)}", errno.EINVAL, lwp)
        bv = struct.unpack_from("<Q", data, 512)[0]
        if bv & ~self.xsave_mask:
            self._err(f"PT_SETXSTATE xstate_bv {bv:#x}", errno.EINVAL, lwp)
        area = self._fpu(lwp)
        self._set_legacy(area, data[:512])
        struct.pack_into("<Q", area, 512, bv)
        area[576:len(data)] = data[576:]
        self.log.append(("xstate", lwp, len(data)))

    def set_fpregs(self, lwp, raw):
        self._traced(lwp, "PT_SETFPREGS")
        if len(raw) != O.FPREG_SIZE:
            raise AssertionError(f"PT_SETFPREGS copies in struct fpreg (512 bytes), not {len(raw)}")
        self._set_legacy(self._fpu(lwp), raw)
        self.log.append(("fpregs", lwp))

    def _set_legacy(self, area, legacy):
        area[:512] = legacy
        mxcsr = struct.unpack_from("<I", legacy, 24)[0] & self.mxcsr_mask
        struct.pack_into("<I", area, 24, mxcsr)

    def ymm(self, lwp, i):
        """ymm<i> of an lwp as a restored thread would load it: xmm from the legacy region,
        the upper half from the AVX component, or zero when xstate_bv says it is in its
        initial state."""
        area = self._fpu(lwp)
        low = bytes(area[160 + 16 * i:176 + 16 * i])
        has_avx = len(area) >= 832 and struct.unpack_from("<Q", area, 512)[0] & 4
        high = bytes(area[576 + 16 * i:592 + 16 * i]) if has_avx else bytes(16)
        return low + high

    def mxcsr(self, lwp):
        return struct.unpack_from("<I", self._fpu(lwp), 24)[0]

    # -- injected Linux system calls (Linux numbers, flags, errnos) -------------------------
    def _string(self, p, addr):
        if not self._mapped(p, addr, 1):
            return None
        raw = p.mem.read(addr, 4096)
        if b"\0" not in raw:
            return None
        return raw.split(b"\0", 1)[0].decode()

    def _fd(self, p, low=0):
        fd = low
        while fd in p.fds:
            fd += 1
        return fd

    def _linux(self, *entry):
        self.log.append(("linux",) + entry)

    # -- descriptors: open file descriptions shared by dup/fork, pipes, FIFOs, eventfds ------
    # sys/kern/sys_pipe.c pipe_write: a pipe buffers PIPE_SIZE (16 KiB) and grows to
    # BIG_PIPE_SIZE (64 KiB) only for one write larger than PIPE_SIZE into an empty buffer; a
    # blocking write of PIPE_MINDIRECT (8 KiB) or more goes direct and sleeps until read.
    # sys/fs/fifofs/fifo_vnops.c fifo_open: a blocking O_RDONLY open waits for a writer, an
    # O_WRONLY one for a reader (ENXIO if O_NONBLOCK); O_RDWR never waits.
    def _read(self, p, addr, n):
        """n bytes the helper holds at addr (written earlier with PT_IO), or None."""
        return p.mem.read(addr, n) if self._mapped(p, addr, n) else None

    def _node(self, path, create_mode=None):
        if path in self.fs:
            return self.fs[path]
        if path in self.gone or not os.path.lexists(path):
            return None
        mode = os.lstat(path).st_mode
        kind = "fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "file"
        self.fs[path] = Node(kind, os.lstat(path).st_mode & 0o7777)   # the jail's copy
        return self.fs[path]

    def _install(self, p, desc, low=0, fd=None, cloexec=False):
        fd = self._fd(p, low) if fd is None else fd
        if fd in p.fds:
            self._fdclose(p, fd)
            self._release(p.fds[fd])
        desc.refs += 1
        p.fds[fd] = desc
        p.cloexec[fd] = cloexec
        return fd

    def _release(self, desc):
        desc.refs -= 1
        if desc.refs == 0 and desc.pipe is not None:
            desc.pipe.readers -= desc.reads
            desc.pipe.writers -= desc.writes

    def linux_open(self, p, path_addr, flags, mode, *_):
        path = self._string(p, path_addr)
        if path is None:
            return -errno.EFAULT
        if flags & ~LINUX_OPEN_BITS:
            return -errno.EINVAL
        node = self._node(path)
        creat, excl = L.OPEN_FLAGS["O_CREAT"], L.OPEN_FLAGS["O_EXCL"]
        if node is not None and flags & creat and flags & excl:
            return -errno.EEXIST
        if node is None:
            if not flags & creat:
                return -errno.ENOENT
            node = self.fs[path] = Node("file", mode & ~0o22)
            self.gone.discard(path)
        desc = Desc("fifo" if node.kind == "fifo" else "vnode", path, flags, node=node)
        if node.kind == "fifo":
            err = self._fifo_open(node, flags)
            if err:
                return err
            desc.pipe, desc.reads, desc.writes = node.pipe, flags & 3 != 1, flags & 3 != 0
            node.pipe.readers += desc.reads
            node.pipe.writers += desc.writes
        self._linux(p.pid, "open", path, flags)
        return self._install(p, desc)

    def _fifo_open(self, node, flags):
        acc, nonblock = flags & 3, flags & L.OPEN_FLAGS["O_NONBLOCK"]
        if acc == 0 and not nonblock and not node.pipe.writers:
            raise AssertionError("blocking O_RDONLY open of a FIFO without a writer: hangs")
        if acc == 1 and not node.pipe.readers:
            if nonblock:
                return -errno.ENXIO
            raise AssertionError("blocking O_WRONLY open of a FIFO without a reader: hangs")
        return 0

    @staticmethod
    def _fdclose(p, fd):
        """knote_fdclose (kern_event.c): closing a number drops every kevent registered on
        that number in the process's kqueues, whatever file it held."""
        for d in p.fds.values():
            if isinstance(d, Desc) and d.kind == "kqueue":
                d.watches.pop(fd, None)

    def linux_close(self, p, fd, *_):
        if fd not in p.fds:
            return -errno.EBADF
        self._fdclose(p, fd)
        self._release(p.fds.pop(fd))
        return 0

    def linux_lseek(self, p, fd, off, whence, *_):
        if fd not in p.fds:
            return -errno.EBADF
        desc = p.fds[fd]
        if desc.kind not in ("vnode", "shm"):
            return -errno.ESPIPE
        if whence != 0:
            return -errno.EINVAL
        desc.pos = off
        self._linux(p.pid, "lseek", desc.path, off)
        return off

    def linux_fcntl(self, p, fd, cmd, arg, *_):
        if fd not in p.fds:
            return -errno.EBADF
        if cmd == RF.F_DUPFD_CLOEXEC:
            return self._install(p, p.fds[fd], low=arg, cloexec=True)
        if cmd == 3:                                 # F_GETFL
            return p.fds[fd].flags & ~L.O_CLOEXEC
        if cmd == RF.F_ADD_SEALS:
            return self._add_seals(p.fds[fd], arg)
        if cmd == RF.F_SETFL:
            desc = p.fds[fd]
            desc.flags = (desc.flags & ~RF.SETFL_BITS) | (arg & RF.SETFL_BITS)
            self._linux(p.pid, "setfl", desc.path, arg)
            return 0
        return -errno.EINVAL

    def linux_dup3(self, p, old, new, flags, *_):
        if old not in p.fds:
            return -errno.EBADF
        if old == new or flags not in (0, L.O_CLOEXEC):
            return -errno.EINVAL
        self._install(p, p.fds[old], fd=new, cloexec=bool(flags))
        self._linux(p.pid, "dup3", new, p.fds[old].path, bool(flags))
        return new

    def linux_pipe2(self, p, addr, flags, *_):
        if flags & ~(L.O_CLOEXEC | L.OPEN_FLAGS["O_NONBLOCK"]):
            return -errno.EINVAL
        if not any(m.start <= addr < m.end and m.prot & 2 for m in p.maps):
            return -errno.EFAULT
        pipe = Pipe(len(self.pipes))
        self.pipes[pipe.id] = pipe
        keep = flags & L.OPEN_FLAGS["O_NONBLOCK"]
        r = self._install(p, Desc("pipe", f"pipe:{pipe.id}:r", keep, pipe=pipe, reads=True))
        w = self._install(p, Desc("pipe", f"pipe:{pipe.id}:w", 1 | keep, pipe=pipe,
                                  writes=True))
        pipe.readers, pipe.writers = 1, 1
        p.mem.write(addr, struct.pack("<ii", r, w))
        self._linux(p.pid, "pipe2", pipe.id, flags)
        return 0

    def linux_write(self, p, fd, addr, n, *_):
        if fd not in p.fds or p.fds[fd].flags & 3 == 0:
            return -errno.EBADF
        desc, data = p.fds[fd], self._read(p, addr, n)
        if data is None:
            return -errno.EFAULT
        if desc.kind == "eventfd":
            return self._eventfd_write(desc, data)
        if desc.kind == "shm":
            return self._shm_write(desc, data)
        if desc.kind == "socket":
            return self._sock_send(desc, data)
        if desc.pipe is not None:
            return self._pipe_write(desc, data)
        desc.node.data[desc.pos:desc.pos + n] = data
        desc.pos += n
        return n

    def _inode(self, node):
        return self.inodes.setdefault(id(node), 1000 + len(self.inodes))

    def linux_ioctl(self, p, fd, cmd, arg, *_):
        if fd not in p.fds:
            return -errno.EBADF
        if cmd != 0x541B:                            # FIONREAD only
            return -errno.ENOTTY
        desc = p.fds[fd]
        if desc.pipe is None or not desc.reads:
            return -errno.ENOTTY
        if not self._writable(p, arg, 4):
            return -errno.EFAULT
        p.mem.write(arg, struct.pack("<i", len(desc.pipe.buf)))
        return 0

    def linux_read(self, p, fd, addr, n, *_):
        if fd not in p.fds or p.fds[fd].flags & 3 == 1:
            return -errno.EBADF
        desc = p.fds[fd]
        if not self._writable(p, addr, n):
            return -errno.EFAULT
        if desc.pipe is None or not desc.reads:
            raise AssertionError(f"fake: read of a {desc.kind} is not modelled")
        if not desc.pipe.buf:
            if desc.flags & L.OPEN_FLAGS["O_NONBLOCK"] or not desc.pipe.writers:
                return -errno.EAGAIN if desc.pipe.writers else 0
            raise AssertionError("blocking read of an empty pipe: the process would hang")
        data = bytes(desc.pipe.buf[:n])
        del desc.pipe.buf[:len(data)]
        p.mem.write(addr, data)
        return len(data)

    def _pipe_write(self, desc, data):
        pipe, nonblock = desc.pipe, desc.flags & L.OPEN_FLAGS["O_NONBLOCK"]
        if not pipe.readers:
            return -errno.EPIPE
        if not nonblock and len(data) >= PIPE_MINDIRECT:
            raise AssertionError("a blocking pipe write of >= 8 KiB goes direct and sleeps "
                                 "until someone reads: the helper would hang")
        if len(data) > PIPE_SIZE and pipe.size <= PIPE_SIZE and not pipe.buf:
            pipe.size = BIG_PIPE_SIZE
        room = pipe.size - len(pipe.buf)
        if len(data) > room and not nonblock:
            raise AssertionError(f"blocking write of {len(data)} bytes into a pipe with room "
                                 f"for {room}: the helper would hang")
        if not room:
            return -errno.EAGAIN
        pipe.buf += data[:room]
        return min(room, len(data))

    def _eventfd_write(self, desc, data):
        if len(data) != 8:
            return -errno.EINVAL
        value = struct.unpack("<Q", data)[0]
        if value == (1 << 64) - 1:
            return -errno.EINVAL
        if desc.count + value > (1 << 64) - 2:
            raise AssertionError("eventfd write past the counter's maximum would block")
        desc.count += value
        return 8

    def linux_eventfd2(self, p, initval, flags, *_):
        if flags & ~(L.O_CLOEXEC | L.OPEN_FLAGS["O_NONBLOCK"] | RF.EFD_SEMAPHORE):
            return -errno.EINVAL
        desc = Desc("eventfd", "anon_inode:[eventfd]", 2 | (flags & L.OPEN_FLAGS["O_NONBLOCK"]))
        desc.count, desc.semaphore = initval & 0xffffffff, bool(flags & RF.EFD_SEMAPHORE)
        self._linux(p.pid, "eventfd2", initval, flags)
        return self._install(p, desc, cloexec=bool(flags & L.O_CLOEXEC))

    def linux_mknod(self, p, path_addr, mode, dev, *_):
        path = self._string(p, path_addr)
        if path is None:
            return -errno.EFAULT
        if mode & 0o170000 != RF.S_IFIFO:
            return -errno.EINVAL            # only FIFOs here; devices need privilege
        if self._node(path) is not None:
            return -errno.EEXIST
        self.fs[path] = Node("fifo", mode & 0o7777 & ~0o22)
        self.gone.discard(path)
        self._linux(p.pid, "mknod", path, mode)
        return 0

    def linux_unlink(self, p, path_addr, *_):
        path = self._string(p, path_addr)
        if path is None:
            return -errno.EFAULT
        if self._node(path) is None:
            return -errno.ENOENT
        self.fs.pop(path)
        self.gone.add(path)
        self._linux(p.pid, "unlink", path)
        return 0

    def linux_fchmod(self, p, fd, mode, *_):
        if fd not in p.fds or p.fds[fd].node is None:
            return -errno.EBADF
        p.fds[fd].node.mode = mode & 0o7777
        return 0

    def _place(self, p, new):
        """Map `new`, replacing whatever was in its range (MAP_FIXED semantics)."""
        p.maps = [piece for m in p.maps for piece in
                  ([m] if m.end <= new.start or new.end <= m.start else m.cut(new.start, new.end))]
        p.maps.append(new)
        p.mem.drop(new.start, new.end)

    def linux_mmap(self, p, addr, length, prot, flags, fd, off):
        if addr % PAGE or length % PAGE or not length or not flags & 3 or off % PAGE:
            return -errno.EINVAL
        path = ""
        if not flags & RF.MAP_ANON:
            if G.signed(fd) not in p.fds or p.fds[G.signed(fd)].kind != "vnode":
                return -errno.EBADF
            desc = p.fds[G.signed(fd)]
            if flags & 1 and prot & 2 and desc.flags & 3 != 2:
                return -errno.EACCES                 # a shared writable map needs O_RDWR
            path = desc.path
        if not flags & RF.MAP_FIXED:                 # the kernel picks a free place
            addr = self.next_map
            self.next_map += length + PAGE
        obj = Mem() if flags & 1 and not path else None     # MAP_SHARED|MAP_ANONYMOUS
        self._place(p, Map(addr, addr + length, prot, path, off if path else 0,
                           private=not flags & 1, grows_down=bool(flags & 0x100), obj=obj))
        self._linux(p.pid, "mmap", addr, length, flags & 0xff)
        return addr

    def linux_mprotect(self, p, addr, length, prot, *_):
        if addr % PAGE or not self._mapped(p, addr, length):
            return -errno.ENOMEM
        end = addr + length
        out = []
        for m in p.maps:
            if m.end <= addr or end <= m.start:
                out.append(m)
                continue
            out += m.cut(addr, end)
            lo, hi = max(m.start, addr), min(m.end, end)
            keeps = m.path or m.obj is not None
            out.append(Map(lo, hi, prot, m.path, m.offset + (lo - m.start) if keeps else 0,
                           m.private, m.grows_down, m.obj))
        p.maps = out
        return 0

    def linux_munmap(self, p, addr, length, *_):
        if addr % PAGE or not length:
            return -errno.EINVAL
        end = addr + length
        p.maps = [piece for m in p.maps for piece in
                  ([m] if m.end <= addr or end <= m.start else m.cut(addr, end))]
        p.mem.drop(addr, end)
        self._linux(p.pid, "munmap", addr, length)
        return 0

    def _writable(self, p, addr, n):
        return self._mapped(p, addr, n) and all(
            m.prot & 2 for m in p.maps if m.start < addr + n and addr < m.end)

    def linux_rt_sigaction(self, p, sig, act, old, size, *_):
        if size != 8 or not 1 <= sig <= 64 or sig in (9, 19):
            return -errno.EINVAL
        if old:
            if not self._writable(p, old, 32):
                return -errno.EFAULT
            p.mem.write(old, struct.pack("<4Q", *p.sigactions.get(sig, (0, 0, 0, 0))))
        if act:
            handler, flags, restorer, mask = struct.unpack("<4Q", p.mem.read(act, 32))
            p.sigactions[sig] = (handler, flags, restorer, mask)
            self._linux(p.pid, "rt_sigaction", sig, handler, flags)
        return 0

    def linux_rt_sigprocmask(self, p, how, new, old, size, *_):
        """The calling thread's mask, kept in FreeBSD numbering as the Linuxulator does
        (linux_to_bsd_sigset); SIGKILL and SIGSTOP cannot be blocked."""
        if size != 8 or how != 2:
            return -errno.EINVAL
        mask = struct.unpack("<Q", p.mem.read(new, 8))[0]
        mask &= ~((1 << 8) | (1 << 18))
        p.masks[p.pid] = FF.sigset_to_fbsd(mask, LossLog(), "fake")
        self._linux(p.pid, "sigmask", mask)
        return 0

    def linux_fork(self, p, *_):
        if not p.follow:
            raise AssertionError("fork without PT_FOLLOW_FORK: the child would run untraced")
        child = Proc(self.next_pid, None, [m.copy() for m in p.maps], p.mem.copy())
        self.next_pid += 1
        for fd, desc in p.fds.items():           # inherited: the same descriptions
            if desc.kind == "kqueue":            # kqueue(2): not inherited by fork
                continue
            self._install(child, desc, fd=fd, cloexec=p.cloexec.get(fd, False))
        child.lwps = {child.pid: G.pack(dict(G.unpack(p.lwps[p.pid]), r_rax=0,
                                             r_rip=p.scratch + 3))}
        child.scratch = p.scratch
        child.attached, child.follow = True, True
        child.pending_stops = [0x57f]
        child.lwpflags = {child.pid: O.PL_FLAG_CHILD}
        child.masks = {child.pid: p.masks.get(p.pid, (0, 0, 0, 0))}
        child.sigactions, child.ppid = dict(p.sigactions), p.pid
        child.sid, child.pgid = p.sid or p.pid, p.pgid or p.pid
        child.cwd, child.root, child.umask, child.comm = p.cwd, p.root, p.umask, p.comm
        child.limits, child.creds = dict(p.limits), dict(p.creds)
        child.daddr, child.brk = p.daddr, p.brk
        self.procs[child.pid] = child
        self._linux(p.pid, "fork", child.pid)
        return child.pid

    def linux_clone(self, p, flags, sp, ptid, ctid, tls, *_):
        if flags not in LINUX_CLONE_OK or not p.follow:
            return -errno.EINVAL
        lwp = self.next_lwp
        self.next_lwp += 1
        p.lwps[lwp] = G.pack(dict(G.unpack(p.lwps[p.pid]), r_rax=0, r_rsp=sp))
        p.masks[lwp] = p.masks.get(p.pid, (0, 0, 0, 0))     # a new thread inherits the mask
        if flags & RF.CLONE_CHILD_CLEARTID:
            p.clear_tid[lwp] = ctid
        p.pending_stops.append(0x57f)                # the born lwp's stop
        p.lwpflags = getattr(p, "lwpflags", {})
        p.lwpflags[lwp] = O.PL_FLAG_BORN
        self._linux(p.pid, "clone", flags)
        return lwp

    def linux_brk(self, p, new, *_):
        """linux_misc.c linux_brk over vm_vmspace.c kern_break: the native break moves (from
        vm_daddr, up to RLIMIT_DATA, only over unmapped space when it grows); the old break
        is the answer when it cannot."""
        old, limit = p.brk, min(p.limits[2][0], MAXDSIZ)
        ok = new > p.daddr and new - p.daddr <= limit and new != old
        if ok and new > old:
            grow = (old + PAGE - 1) & ~(PAGE - 1), (new + PAGE - 1) & ~(PAGE - 1)
            ok = not any(m.start < grow[1] and grow[0] < m.end for m in p.maps)
            if ok and grow[0] < grow[1]:
                p.maps.append(Map(*grow, 3))
        elif ok and new < old:
            lo = (new + PAGE - 1) & ~(PAGE - 1)
            p.maps = [piece for m in p.maps for piece in m.cut(lo, old)]
            p.mem.drop(lo, old)
        if ok:
            p.brk = new
        self._linux(p.pid, "brk", new, p.brk)
        return p.brk

    def linux_set_robust_list(self, p, head, size, *_):
        if size != 24:                           # sizeof(struct linux_robust_list_head)
            return -errno.EINVAL
        p.robust[self.current_lwp] = head        # per thread: the caller's emuldata
        self._linux(p.pid, "set_robust_list", head)
        return 0

    def linux_get_robust_list(self, p, tid, head, size, *_):
        """linux_futex.c: tid 0 is the caller; another thread needs root (PRIV_CRED_SETUID)."""
        lwp = self.current_lwp if tid == 0 else (p.pid if tid == p.pid else tid)
        if lwp not in p.lwps:
            return -errno.ESRCH
        if tid and p.creds["uid"] != 0:
            return -errno.EPERM
        if not (self._writable(p, head, 8) and self._writable(p, size, 8)):
            return -errno.EFAULT
        p.mem.write(head, struct.pack("<Q", p.robust.get(lwp, 0)))
        p.mem.write(size, struct.pack("<Q", 24))
        return 0

    def linux_set_tid_address(self, p, addr, *_):
        p.clear_tid[p.pid] = addr
        return p.pid

    def linux_setsid(self, p, *_):
        p.sid = p.pgid = p.pid
        self._linux(p.pid, "setsid")
        return p.pid

    def linux_setpgid(self, p, pid, pgid, *_):
        p.pgid = pgid or p.pid
        self._linux(p.pid, "setpgid", p.pgid)
        return 0

    def linux_chdir(self, p, addr, *_):
        path = self._string(p, addr)
        if path is None:
            return -errno.EFAULT
        p.cwd = path
        self._linux(p.pid, "chdir", path)
        return 0

    def linux_chroot(self, p, addr, *_):
        path = self._string(p, addr)
        if path is None:
            return -errno.EFAULT
        p.root = path
        self._linux(p.pid, "chroot", path)
        return 0

    def linux_umask(self, p, mask, *_):
        old, p.umask = p.umask, mask & 0o777
        self._linux(p.pid, "umask", mask)
        return old

    def linux_prlimit64(self, p, pid, res, new, old, *_):
        if pid != 0 or res >= 16:
            return -errno.EINVAL
        if old:
            if not self._writable(p, old, 16):
                return -errno.EFAULT
            p.mem.write(old, struct.pack("<QQ", *p.limits[res]))
        if new:
            cur, mx = struct.unpack("<QQ", p.mem.read(new, 16))
            if mx > p.limits[res][1] or cur > mx:   # raising a hard limit: no privilege
                return -errno.EPERM
            p.limits[res] = (cur, mx)
            self._linux(p.pid, "prlimit64", res, cur, mx)
        return 0

    def linux_prctl(self, p, option, arg, *_):
        if option != RF.PR_SET_NAME:
            return -errno.EINVAL
        name = self._string(p, arg)
        if name is None:
            return -errno.EFAULT
        p.comm = name[:15]                       # linux_prctl: the process's p_comm
        self._linux(p.pid, "prctl_set_name", p.comm)
        return 0

    def linux_setgroups(self, p, n, addr, *_):
        groups = struct.unpack(f"<{n}I", p.mem.read(addr, 4 * n)) if n else ()
        p.creds["groups"] = (p.creds["groups"][0],) + tuple(groups)   # cr_groups[0]: egid
        self._linux(p.pid, "setgroups", n)
        return 0

    def linux_setresgid(self, p, r, e, s, *_):
        c = p.creds
        c["rgid"], c["groups"], c["svgid"] = r, (e,) + tuple(c["groups"][1:]), s
        self._linux(p.pid, "setresgid", r, e, s)
        return 0

    def linux_setresuid(self, p, r, e, s, *_):
        p.creds.update(ruid=r, uid=e, svuid=s)
        self._linux(p.pid, "setresuid", r, e, s)
        return 0

    # -- sockets, epoll (kqueue), timerfd, memfd (shm) as the Linuxulator makes them --------
    # uipc_usrreq.c: a unix socket's buffers (the older defaults: PIPSIZ 8192 for stream and
    # seqpacket; datagrams: maxdgram 2048 is the send limit per message, recvspace 16384);
    # sb_max (kern.ipc.maxsockbuf) caps a raise.
    # linux_event.c: epoll is a kqueue keyed on descriptor numbers, LINUX_EPOLL_EVSUP only.
    # sys_timerfd.c: CLOCK_REALTIME / CLOCK_MONOTONIC only. linux_file.c: memfd_create is
    # kern_shm_open2(SHM_ANON, SHM_GROW_ON_WRITE [| SHM_ALLOW_SEALING]); seal_bitmap.
    SB_MAX = 2 * 1024 * 1024
    CLOCK_NOW = {0: (1_800_000_000, 250_000_000), 1: (5000, 0)}    # Linux clock ids

    def _new_sock(self, family, stype):
        snd, rcv = RF.UNIX_SPACE.get(stype, (8192, 8192)) if family == 1 else (65536, 65536)
        return dict(family=family, type=stype, state="new", peer=None, rq=[], snd=snd,
                    rcv=rcv, shut=0, name=None, backlog=None, opts={})

    def _sock_desc(self, sock, flags):
        d = Desc("socket", f"socket:{sock['family']}", 2 | (flags & L.OPEN_FLAGS["O_NONBLOCK"]))
        d.sock = sock
        return d

    def linux_socket(self, p, family, stype, proto, *_):
        base = stype & 0xf
        if stype & ~(0xf | RF.SOCK_NONBLOCK_CLOEXEC) or family not in (1, 2, 10) or \
                base not in (1, 2, 5):
            return -errno.EINVAL
        if family != 1 and (base, proto) not in ((1, 0), (1, 6), (2, 0), (2, 17)):
            return -errno.EPROTONOSUPPORT
        sock = self._new_sock(family, base)
        self._linux(p.pid, "socket", family, base)
        return self._install(p, self._sock_desc(sock, stype), cloexec=bool(stype & L.O_CLOEXEC))

    def linux_socketpair(self, p, family, stype, proto, addr, *_):
        if family != 1:                         # linux_socketpair: PF_LOCAL only
            return -errno.EAFNOSUPPORT
        base = stype & 0xf
        if stype & ~(0xf | RF.SOCK_NONBLOCK_CLOEXEC) or base not in (1, 2, 5):
            return -errno.EINVAL
        if not self._writable(p, addr, 8):
            return -errno.EFAULT
        a, b = self._new_sock(1, base), self._new_sock(1, base)
        a["peer"], b["peer"], a["state"], b["state"] = b, a, "connected", "connected"
        cloexec = bool(stype & L.O_CLOEXEC)
        fa = self._install(p, self._sock_desc(a, stype), cloexec=cloexec)
        fb = self._install(p, self._sock_desc(b, stype), cloexec=cloexec)
        p.mem.write(addr, struct.pack("<ii", fa, fb))
        self._linux(p.pid, "socketpair", base)
        return 0

    def _sock(self, p, fd):
        if fd not in p.fds:
            return None, -errno.EBADF
        if p.fds[fd].kind != "socket":
            return None, -errno.ENOTSOCK
        return p.fds[fd].sock, 0

    def linux_setsockopt(self, p, fd, level, opt, val, size, *_):
        sock, err = self._sock(p, fd)
        if err:
            return err
        if size != 4 or not self._mapped(p, val, 4):
            return -errno.EFAULT if size == 4 else -errno.EINVAL
        value = struct.unpack("<i", p.mem.read(val, 4))[0]
        if level == RF.SOL_SOCKET and opt in (RF.SO_SNDBUF, RF.SO_RCVBUF):
            if value > self.SB_MAX or value <= 0:
                return -errno.ENOBUFS            # sbreserve: above sb_max
            sock["snd" if opt == RF.SO_SNDBUF else "rcv"] = value
        elif level == RF.SOL_SOCKET and opt == RF.SO_REUSEADDR:
            sock["opts"]["reuseaddr"] = value
        elif level == RF.IPPROTO_IPV6 and opt == RF.IPV6_V6ONLY and sock["family"] == 10:
            sock["opts"]["v6only"] = value
        else:
            return -errno.ENOPROTOOPT
        self._linux(p.pid, "setsockopt", fd, opt, value)
        return 0

    def linux_bind(self, p, fd, addr, size, *_):
        sock, err = self._sock(p, fd)
        if err:
            return err
        raw = self._read(p, addr, size)
        if raw is None or size < 2:
            return -errno.EFAULT
        if struct.unpack_from("<H", raw)[0] != sock["family"]:
            return -errno.EAFNOSUPPORT
        if sock["name"] is not None:
            return -errno.EINVAL
        if sock["family"] == 1:
            path = raw[2:].split(b"\0", 1)[0].decode()
            if not path:
                return -errno.EINVAL             # no abstract names on FreeBSD
            if self._node(path) is not None:
                return -errno.EADDRINUSE
            self.fs[path] = Node("socket", 0o777 & ~p.umask)
            self.gone.discard(path)
            sock["name"] = path
        else:
            port = struct.unpack_from(">H", raw, 2)[0]
            ip = raw[4:8] if sock["family"] == 2 else raw[8:24]
            key = (sock["family"], sock["type"], port)
            if port and key in self.ports:
                return -errno.EADDRINUSE
            self.ports[key] = sock
            sock["name"] = (socket.inet_ntop(sock["family"], ip), port)
        sock["state"] = "bound"
        self._linux(p.pid, "bind", fd, sock["name"])
        return 0

    def linux_listen(self, p, fd, backlog, *_):
        sock, err = self._sock(p, fd)
        if err:
            return err
        if sock["type"] == 2:
            return -errno.EOPNOTSUPP
        if sock["name"] is None and sock["family"] == 1:
            return -errno.EINVAL                 # uipc_listen: an unbound unix socket
        sock["state"], sock["backlog"] = "listening", backlog
        self._linux(p.pid, "listen", fd, backlog)
        return 0

    def linux_shutdown(self, p, fd, how, *_):
        sock, err = self._sock(p, fd)
        if err:
            return err
        if how not in (0, 1, 2):
            return -errno.EINVAL
        if sock["state"] != "connected":
            return -errno.ENOTCONN
        bits = {0: 1, 1: 2, 2: 3}[how]
        sock["shut"] |= bits
        if bits & 1:
            sock["rq"] = []                      # soshutdown SHUT_RD: sorflush drops the queue
        if bits & 2 and sock["peer"] is not None:
            sock["peer"]["shut"] |= 1            # unp_shutdown: socantrcvmore on the peer
        self._linux(p.pid, "shutdown", fd, how)
        return 0

    def linux_sendto(self, p, fd, addr, n, flags, dest, dlen, *_):
        if dest or flags:
            return -errno.EINVAL                 # only connected sends are modelled
        if fd not in p.fds:
            return -errno.EBADF
        data = self._read(p, addr, n)
        if data is None:
            return -errno.EFAULT
        return self._sock_send(p.fds[fd], data)

    def _sock_send(self, desc, data):
        sock = getattr(desc, "sock", None)
        if sock is None:
            return -errno.ENOTSOCK
        peer, nonblock = sock["peer"], desc.flags & L.OPEN_FLAGS["O_NONBLOCK"]
        if peer is None:
            return -errno.ENOTCONN
        if sock["shut"] & 2:
            return -errno.EPIPE
        queued = sum(len(m) for m in peer["rq"])
        room = peer["rcv"] - queued
        if sock["type"] != 1:                    # one message, whole or not at all
            if len(data) > sock["snd"]:
                return -errno.EMSGSIZE
            if len(data) > room:
                if not nonblock:
                    raise AssertionError("a blocking send into a full socket: hangs")
                return -errno.ENOBUFS if sock["type"] == 2 else -errno.EAGAIN
            peer["rq"].append(bytes(data))
            return len(data)
        if room <= 0:
            if not nonblock:
                raise AssertionError("a blocking send into a full socket: hangs")
            return -errno.EAGAIN
        take = bytes(data[:room])
        if peer["rq"]:
            peer["rq"][-1] += take               # a stream keeps no boundaries
        else:
            peer["rq"].append(take)
        return len(take)

    def linux_lstat(self, p, path_addr, st, *_):
        path = self._string(p, path_addr)
        if path is None or not self._writable(p, st, 144):
            return -errno.EFAULT
        node = self._node(path)
        if node is None:
            return -errno.ENOENT
        kind = {"socket": 0o140000, "fifo": 0o010000}.get(node.kind, 0o100000)
        buf = bytearray(144)
        struct.pack_into("<I", buf, 24, kind | node.mode)
        p.mem.write(st, bytes(buf))
        return 0

    def linux_chmod(self, p, path_addr, mode, *_):
        path = self._string(p, path_addr)
        if path is None:
            return -errno.EFAULT
        node = self._node(path)
        if node is None:
            return -errno.ENOENT
        node.mode = mode & 0o7777
        self._linux(p.pid, "chmod", path, node.mode)
        return 0

    def linux_epoll_create1(self, p, flags, *_):
        if flags & ~L.O_CLOEXEC:
            return -errno.EINVAL
        d = Desc("kqueue", "kqueue", 2)
        d.watches = {}
        self._linux(p.pid, "epoll_create1")
        return self._install(p, d, cloexec=bool(flags))

    def linux_epoll_ctl(self, p, epfd, op, fd, ev, *_):
        raw = self._read(p, ev, 12)
        if raw is None:
            return -errno.EFAULT
        if epfd not in p.fds or fd not in p.fds:
            return -errno.EBADF
        ep = p.fds[epfd]
        if ep.kind != "kqueue" or ep is p.fds[fd] or op != RF.EPOLL_CTL_ADD:
            return -errno.EINVAL
        events, data = struct.unpack("<IQ", raw)
        if events & ~K.EPOLL_SUPPORTED:
            return -errno.EINVAL
        if fd in ep.watches:
            return -errno.EEXIST
        ep.watches[fd] = (events, data, p.fds[fd])
        self._linux(p.pid, "epoll_ctl", epfd, fd, events, data)
        return 0

    def linux_timerfd_create(self, p, clock, flags, *_):
        if clock not in K.TIMERFD_CLOCKS:       # native: only REALTIME and MONOTONIC
            return -errno.EINVAL
        if flags & ~(L.O_CLOEXEC | L.OPEN_FLAGS["O_NONBLOCK"]):
            return -errno.EINVAL
        d = Desc("timerfd", "timerfd", flags & L.OPEN_FLAGS["O_NONBLOCK"])
        d.timer = dict(clock=clock, value=(0, 0), interval=(0, 0), flags=0)
        self._linux(p.pid, "timerfd_create", clock)
        return self._install(p, d, cloexec=bool(flags & L.O_CLOEXEC))

    def linux_timerfd_settime(self, p, fd, flags, new, old, *_):
        if fd not in p.fds:
            return -errno.EBADF
        if p.fds[fd].kind != "timerfd" or flags & ~3:
            return -errno.EINVAL
        raw = self._read(p, new, 32)
        if raw is None:
            return -errno.EFAULT
        isec, insec, vsec, vnsec = struct.unpack("<4q", raw)
        if not (0 <= insec < 10**9 and 0 <= vnsec < 10**9) or isec < 0 or vsec < 0:
            return -errno.EINVAL
        p.fds[fd].timer.update(value=(vsec, vnsec), interval=(isec, insec), flags=flags)
        self._linux(p.pid, "timerfd_settime", fd, flags, (vsec, vnsec), (isec, insec))
        return 0

    def linux_clock_gettime(self, p, clock, ts, *_):
        if clock not in self.CLOCK_NOW:
            return -errno.EINVAL
        if not self._writable(p, ts, 16):
            return -errno.EFAULT
        p.mem.write(ts, struct.pack("<qq", *self.CLOCK_NOW[clock]))
        return 0

    def linux_memfd_create(self, p, name_addr, flags, *_):
        name = self._string(p, name_addr)
        if name is None:
            return -errno.EFAULT
        if flags & ~(RF.MFD_CLOEXEC | RF.MFD_ALLOW_SEALING):
            return -errno.EINVAL
        d = Desc("shm", "memfd:" + name, 2)
        # without SHM_ALLOW_SEALING the object starts sealed (F_SEAL_SEAL)
        d.shm = dict(data=bytearray(), seals=0 if flags & RF.MFD_ALLOW_SEALING else 1,
                     name=name)
        self._linux(p.pid, "memfd_create", name, flags)
        return self._install(p, d, cloexec=bool(flags & RF.MFD_CLOEXEC))

    def _shm_write(self, desc, data):
        shm, end = desc.shm, desc.pos + len(data)
        if shm["seals"] & 8 or (end > len(shm["data"]) and shm["seals"] & 4):
            return -errno.EPERM
        shm["data"][desc.pos:end] = data
        desc.pos = end
        return len(data)

    def _add_seals(self, desc, seals):
        if desc.kind != "shm":
            return -errno.EINVAL
        if desc.shm["seals"] & 1:
            return -errno.EPERM
        desc.shm["seals"] |= seals & K.SEALS_SUPPORTED     # seal_bitmap: the rest dropped
        return 0

    # -- what a FreeBSD capture reads ------------------------------------------------------
    def kinfo_proc(self, pid):
        p = self.procs.get(pid) or self._err("kern.proc.pid", errno.ESRCH, pid)
        c = p.creds
        rec = O.KinfoProc(p.pid, p.ppid, p.pgid or p.pid, p.sid or p.pid, c["uid"], c["ruid"],
                          c["svuid"], c["rgid"], c["svgid"], tuple(c["groups"][:16]),
                          p.stat,
                          p.comm, p.comm[:16], "Linux ELF64", p.jid, len(p.lwps),
                          len(c["groups"]) > 16)
        return O.parse_kinfo_proc(O.pack_kinfo_proc(rec))     # through the real layout

    def all_procs(self):
        """kern.proc.proc: one kinfo_proc per process, through the real layout."""
        return O.parse_procs(b"".join(O.pack_kinfo_proc(self.kinfo_proc(pid))
                                      for pid in sorted(self.procs)))

    def xfiles(self):
        """kern.file: a struct xfile per descriptor of every process; xf_file is the open
        file description's own address (one Desc, one address, however many fds hold it)."""
        out = b""
        for pid in sorted(self.procs):
            p = self.procs[pid]
            for fd, d in sorted(p.fds.items()):
                if not isinstance(d, Desc):
                    continue
                if not hasattr(d, "addr"):
                    self.next_file += 1
                    d.addr = 0xfffff80003000000 + 0x100 * self.next_file
                acc = {0: 1, 1: 2, 2: 3}.get(d.flags & 3, 3)      # FREAD/FWRITE
                out += O.pack_xfile(O.XFile(pid, fd, d.addr, d.refs, d.pos, acc))
        return O.parse_xfiles(out)

    def lwps(self, pid):
        """PT_GETNUMLWPS then PT_GETLWPLIST: oldest thread first."""
        return list(self._traced(pid, "PT_GETLWPLIST").lwps)

    def auxv(self, pid):
        return list(self.procs[pid].auxv)


def spawn(kit):
    """RF.spawn_helper for the fake: a new helper process, attached."""
    def spawn_helper(jid, t):
        assert jid in kit.jails, "helper started outside the jail"
        p = kit.new_helper()
        kit.attach(p.pid)
        return p.pid
    return spawn_helper
