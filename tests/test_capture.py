"""LiveSource against real processes: registers, memory, files, pipes, threads, trees, freeze."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from ckptfs import flags as lf
from ckptfs import pb
from ckptfs.capture import AlreadyTraced, LiveSource, NotCapturable, procfs
from ckptfs.errors import ProcessGone
from helpers.procs import wait_file, wait_gone

PY = sys.executable


def status(pid: int) -> dict:
    return procfs.parse_status(Path(f"/proc/{pid}/status").read_text())


def traced_by_us(pid: int, tid: int | None = None) -> bool:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    tracer = int(procfs.parse_status(Path(path).read_text())["TracerPid"])
    return tracer != 0 and int(status(tracer)["Tgid"]) == os.getpid()


def untraced_and_running(pid: int) -> bool:
    st = status(pid)
    return st["TracerPid"] == "0" and st["State"][0] not in "tTZX"


def py_child(procs, tmp_path, body: str, *args) -> tuple:
    """A Python child running `body`; it writes JSON facts to `out` and then sleeps.
    Returns (proc, facts)."""
    out = tmp_path / f"facts{len(procs.procs)}.json"
    code = ("import json, os, sys, time\nOUT = sys.argv[1]\n" + body +
            "\njson.dump(FACTS, open(OUT + '.tmp', 'w')); os.rename(OUT + '.tmp', OUT)\n"
            "while True: time.sleep(100)\n")
    proc = procs.spawn([PY, "-c", code, str(out), *args])
    facts = json.loads(wait_file(out, proc=proc))
    return proc, facts


@pytest.fixture
def sleeper(procs):
    proc = procs.spawn(["sleep", "1000"])
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/syscall").read_text().split()[0] not in ("230", "35"):
        assert time.monotonic() < deadline, "sleep never blocked in its sleep call"
        time.sleep(0.01)
    return proc


# -- a sleeping process --------------------------------------------------------------------
def test_sleeping_process_core_matches_proc_syscall(sleeper):
    sysc = Path(f"/proc/{sleeper.pid}/syscall").read_text().split()
    sp, pc = int(sysc[-2], 16), int(sysc[-1], 16)
    with LiveSource(sleeper.pid) as src:
        assert [(e.pid, list(e.threads)) for e in src.pstree()] == [(sleeper.pid, [sleeper.pid])]
        core = src.core(sleeper.pid)
        regs = core.thread_info.gpregs
        assert (regs.sp, regs.ip) == (sp, pc)
        assert regs.orig_ax == int(sysc[0]) and regs.mode == pb.NATIVE
        assert core.mtype == pb.core_entry.X86_64
        assert len(core.thread_info.fpregs.st_space) == 32
        assert len(core.thread_info.fpregs.xmm_space) == 64
        tc = core.tc
        assert tc.comm == "sleep" and tc.task_state == 1
        assert len(tc.sigactions) == 62 and len(tc.rlimits.rlimits) == 16
        assert tc.rlimits.rlimits[7].cur == os.sysconf("SC_OPEN_MAX") or tc.rlimits.rlimits[7].cur > 0
        st = status(sleeper.pid)
        assert core.thread_core.creds.uid == int(st["Uid"].split()[0])
        assert core.thread_core.comm == "sleep"
        assert core.thread_core.futex_rla_len == 24
    assert untraced_and_running(sleeper.pid)


def test_mm_matches_maps(sleeper):
    pid = sleeper.pid
    with LiveSource(pid) as src:
        mm = src.mm(pid)
        stat = procfs.parse_stat(Path(f"/proc/{pid}/stat").read_text())
        assert mm.mm_start_code == int(stat[26]) and mm.mm_arg_start == int(stat[48])
        maps = [m for m in procfs.parse_maps(Path(f"/proc/{pid}/maps").read_text())
                if m.path != "[vvar_vclock]"]
        assert [(v.start, v.prot) for v in mm.vmas] == [(m.start, m.prot) for m in maps]
        by_path = {m.path: v for m, v in zip(maps, mm.vmas)}
        V = lf.VMA_STATUS
        assert by_path["[stack]"].flags & lf.MAP_FLAGS["MAP_GROWSDOWN"]
        assert by_path["[vdso]"].status & V["VMA_AREA_VDSO"]
        assert src.page_ranges(pid, by_path["[vdso]"])[0].start == by_path["[vdso]"].start
        assert src.page_ranges(pid, by_path["[vvar]"]) == []
        exe = src.file(mm.exe_file_id)
        assert exe.type == pb.REG and exe.reg.name == os.readlink(f"/proc/{pid}/exe")
        libc = next(v for m, v in zip(maps, mm.vmas) if "libc" in m.path)
        assert libc.status & V["VMA_FILE_PRIVATE"] and src.file(libc.shmid).reg.name.endswith(".so.6")
        auxv = Path(f"/proc/{pid}/auxv").read_bytes()
        assert list(mm.mm_saved_auxv) == procfs.parse_auxv(auxv)
        fs = src.fs(pid)
        assert src.file(fs.cwd_id).reg.name == os.readlink(f"/proc/{pid}/cwd")
        ids = src.ids(pid)
        assert ids.vm_id == 2 and ids.files_id == 2


# -- memory --------------------------------------------------------------------------------
MEM_CHILD = """
import mmap, ctypes
m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
pattern = bytes(range(256)) * 16
for off in (0, 5 << 20, (8 << 20) + 4096):
    m[off:off + 4096] = pattern
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
FACTS = {"addr": addr}
"""


def test_memory_pattern_and_page_ranges(procs, tmp_path):
    proc, facts = py_child(procs, tmp_path, MEM_CHILD)
    addr = facts["addr"]
    pattern = bytes(range(256)) * 16
    with LiveSource(proc.pid) as src:
        vma = next(v for v in src.mm(proc.pid).vmas if v.start <= addr < v.end)
        assert vma.status & lf.VMA_STATUS["VMA_ANON_PRIVATE"]
        got = [(r.start - addr, r.end - addr) for r in src.page_ranges(proc.pid, vma)
               if r.start >= addr]
        assert got == [(0, 4096), (5 << 20, (5 << 20) + 4096), ((8 << 20) + 4096, (8 << 20) + 8192)]
        data = src.read_memory(proc.pid, addr + (5 << 20), 4096)
        assert data == pattern
        with open(f"/proc/{proc.pid}/mem", "rb") as f:
            f.seek(addr)
            assert src.read_memory(proc.pid, addr, 9 << 20) == f.read(9 << 20)
        buf = bytearray(8192)
        src.read_memory_into(proc.pid, addr + (8 << 20), buf)
        assert buf == bytes(4096) + pattern


def test_unreadable_page_reads_through_proc_mem(procs, tmp_path):
    body = MEM_CHILD + "\nimport mmap as M\nlibc = ctypes.CDLL(None)\n" \
        "libc.mprotect(ctypes.c_void_p(addr), 4096, 0)\n"
    proc, facts = py_child(procs, tmp_path, body)
    with LiveSource(proc.pid) as src:   # PROT_NONE: process_vm_readv refuses, /proc/PID/mem reads
        assert src.read_memory(proc.pid, facts["addr"], 8192)[:4096] == bytes(range(256)) * 16


def test_big_memory_scan_and_read_speed(procs, tmp_path):
    size = 512 << 20
    body = f"""
import mmap, ctypes
m = mmap.mmap(-1, {size}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(m)), 7, {size})
FACTS = {{"addr": ctypes.addressof(ctypes.c_char.from_buffer(m))}}
"""
    proc, facts = py_child(procs, tmp_path, body)
    with LiveSource(proc.pid) as src:
        vmas = src.mm(proc.pid).vmas
        t = time.perf_counter()
        total = sum(r.nr_pages for v in vmas for r in src.page_ranges(proc.pid, v))
        scan = time.perf_counter() - t
        assert total >= size // 4096
        assert scan < 0.05, f"page_ranges of all VMAs took {scan * 1000:.1f} ms"
        buf = bytearray(4 << 20)
        t = time.perf_counter()
        for off in range(0, size, len(buf)):
            src.read_memory_into(proc.pid, facts["addr"] + off, buf)
        rate = size / (time.perf_counter() - t)
        assert buf[:8] == b"\x07" * 8
        # A shared 2-core machine: only a floor here (measured alone: 4-6 GB/s).
        assert rate > 0.5e9, f"read_memory_into at {rate / 1e9:.2f} GB/s"


# -- files -----------------------------------------------------------------------------------
FILES_CHILD = """
import socket, fcntl
d = sys.argv[2]
f1 = os.open(d + "/a.txt", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
os.write(f1, b"x" * 1000)
os.set_inheritable(f1, True)
f2 = os.open(d + "/a.txt", os.O_RDONLY | os.O_CLOEXEC)
os.lseek(f2, 123, 0)
f3 = os.dup(f2)
r, w = os.pipe()
os.write(w, b"hello pipe")
s1, s2 = socket.socketpair()
gone = os.open(d + "/deleted.txt", os.O_RDWR | os.O_CREAT)
os.write(gone, b"ghost data")
os.unlink(d + "/deleted.txt")
def on_usr1(sig, frame):
    open(d + "/drained", "wb").write(os.read(r, 100))
import signal
signal.signal(signal.SIGUSR1, on_usr1)
FACTS = {"f1": f1, "f2": f2, "f3": f3, "r": r, "w": w, "s1": s1.fileno(), "gone": gone}
"""


def test_files_fdinfo_and_pipe_data(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, FILES_CHILD, str(tmp_path))
    pid = proc.pid
    with LiveSource(pid) as src:
        infos = {e.fd: e for e in src.fdinfo(pid)}
        assert sorted(infos) == sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        f1 = src.file(infos[fx["f1"]].id).reg
        assert f1.name == str(tmp_path / "a.txt") and f1.pos == 1000
        assert f1.flags & lf.O_ACCMODE == os.O_RDWR and f1.flags & os.O_APPEND
        assert not f1.HasField("size") or f1.size == 1000
        f2 = infos[fx["f2"]]
        assert f2.flags == lf.FD_CLOEXEC and infos[fx["f1"]].flags == 0
        assert src.file(f2.id).reg.pos == 123
        assert infos[fx["f3"]].id == f2.id          # dup shares the description
        assert infos[fx["f1"]].id != f2.id           # a second open() does not
        for fd, e in infos.items():
            raw = procfs.parse_fdinfo(Path(f"/proc/{pid}/fdinfo/{fd}").read_text())
            assert bool(int(raw["flags"], 8) & lf.O_CLOEXEC) == bool(e.flags & lf.FD_CLOEXEC)
        rd, wr = src.file(infos[fx["r"]].id), src.file(infos[fx["w"]].id)
        assert rd.type == wr.type == pb.PIPE and rd.pipe.pipe_id == wr.pipe.pipe_id
        assert wr.pipe.flags & lf.O_ACCMODE == os.O_WRONLY
        sk = src.file(infos[fx["s1"]].id)
        assert sk.type == pb.UNIXSK and sk.usk.type == socket.SOCK_STREAM
        assert sk.usk.ino == os.stat(f"/proc/{pid}/fd/{fx['s1']}").st_ino
        gone = infos[fx["gone"]].id
        assert src.file(gone).reg.name == str(tmp_path / "deleted.txt")
        assert src.file_deleted(gone) and src.file_contents(gone) == b"ghost data"
        assert not src.file_deleted(f2.id)
        src.freeze()
        assert src.pipe_data(rd.pipe.pipe_id) == b"hello pipe"
        assert src.pipe_data(rd.pipe.pipe_id) == b"hello pipe"   # nothing consumed
        src.thaw()
    os.kill(pid, signal.SIGUSR1)
    assert wait_file(tmp_path / "drained", proc=proc) == "hello pipe"


# -- threads, trees, freeze ----------------------------------------------------------------
THREADS_CHILD = """
import threading, ctypes
libc = ctypes.CDLL(None)
tids = []
def worker(n):
    libc.prctl(15, ("worker%d" % n).encode())
    tids.append(threading.get_native_id())
    time.sleep(1000)
for n in range(2):
    threading.Thread(target=worker, args=(n,), daemon=True).start()
while len(tids) < 2: time.sleep(0.01)
FACTS = {"tids": sorted(tids)}
"""


def test_three_threads(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, THREADS_CHILD)
    pid = proc.pid
    with LiveSource(pid) as src:
        assert list(src.pstree()[0].threads) == [pid] + fx["tids"]
        src.freeze()
        assert all(traced_by_us(pid, tid) for tid in [pid] + fx["tids"])
        for tid in fx["tids"]:
            core = src.core(tid)
            assert not core.HasField("tc") and core.thread_core.comm.startswith("worker")
            assert core.thread_core.HasField("blk_sigset")
        assert src.core(pid).HasField("tc")
        src.thaw()
        for tid in [pid] + fx["tids"]:
            st = procfs.parse_status(Path(f"/proc/{pid}/task/{tid}/status").read_text())
            assert st["TracerPid"] == "0" and st["State"][0] in "RS"


def test_shell_with_children(procs, tmp_path):
    ready = tmp_path / "kids"
    sh = procs.spawn(["sh", "-c", f"sleep 1000 & sleep 1000 & echo $! > {ready}; wait"])
    wait_file(ready, proc=sh)
    with LiveSource(sh.pid) as src:
        tree = src.pstree()
        assert tree[0].pid == sh.pid and len(tree) == 3
        assert all(e.ppid == sh.pid and e.sid == sh.pid for e in tree[1:])
        src.freeze()
        assert src.frozen
        for e in tree:
            assert traced_by_us(e.pid)
            assert src.core(e.pid).tc.comm in ("sh", "sleep")
        assert src.ids(tree[1].pid).vm_id != src.ids(tree[0].pid).vm_id
        src.thaw()
        assert all(untraced_and_running(e.pid) for e in tree)


def test_signal_sent_while_frozen_is_delivered_after_thaw(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, FILES_CHILD, str(tmp_path))
    with LiveSource(proc.pid) as src:
        src.freeze()
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.05)
        assert not (tmp_path / "drained").exists()
        src.thaw()
    assert wait_file(tmp_path / "drained", proc=proc) == "hello pipe"


def test_job_control_stopped_process_stays_stopped(sleeper):
    os.kill(sleeper.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while status(sleeper.pid)["State"][0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with LiveSource(sleeper.pid) as src:
        assert src.core(sleeper.pid).tc.task_state == 3
        src.freeze()
        assert src.core(sleeper.pid).tc.stop_signo == signal.SIGSTOP
        src.thaw()
    deadline = time.monotonic() + 5     # detach wakes it; it re-enters the group stop at once
    while status(sleeper.pid)["State"][0] != "T":
        assert time.monotonic() < deadline, "the job-control stop was lost"
        time.sleep(0.01)
    assert status(sleeper.pid)["TracerPid"] == "0"
    os.kill(sleeper.pid, signal.SIGCONT)


def test_exit_gives_process_gone(procs):
    proc = procs.spawn(["sleep", "1000"])
    time.sleep(0.05)
    src = LiveSource(proc.pid)
    try:
        src.mm(proc.pid)
        proc.kill()
        for read in (lambda: src.core(proc.pid), lambda: src.mm(proc.pid),
                     lambda: src.fdinfo(proc.pid), lambda: src.pstree(),
                     lambda: src.read_memory(proc.pid, 0x400000, 4096), src.freeze):
            with pytest.raises(ProcessGone):
                read()
    finally:
        src.close()


def test_refuses_zombie_kernel_thread_and_traced(procs, sleeper):
    with pytest.raises(NotCapturable):
        LiveSource(2)   # kthreadd
    z = procs.spawn(["sh", "-c", "exit 0"])
    wait_gone(z.pid, 5)
    with pytest.raises(NotCapturable, match="zombie"):
        LiveSource(z.pid)
    with LiveSource(sleeper.pid) as first:
        first.freeze()
        with LiveSource(sleeper.pid) as second:
            with pytest.raises(AlreadyTraced, match="EPERM"):
                second.freeze()
    assert untraced_and_running(sleeper.pid)
    strace = procs.spawn(["strace", "-p", str(sleeper.pid), "-o", "/dev/null"])
    deadline = time.monotonic() + 5
    while status(sleeper.pid)["TracerPid"] == "0":
        assert time.monotonic() < deadline, "strace never attached"
        time.sleep(0.01)
    with pytest.raises(AlreadyTraced, match="EBUSY"):
        LiveSource(sleeper.pid)
    strace.kill()


def test_isolation_own_uts_namespace(procs, tmp_path):
    ready = tmp_path / "uts"
    proc = procs.spawn(["unshare", "-u", "sh", "-c",
                        f"hostname ckpt-test; touch {ready}; exec sleep 1000"])
    wait_file_exists(ready)
    with LiveSource(proc.pid) as src:
        iso = src.isolation()
        assert iso.hostname == "ckpt-test" and "uts" in iso.own_namespaces
        assert iso.namespaces["uts"] == procfs.parse_ns_link(os.readlink(f"/proc/{proc.pid}/ns/uts"))[1]
        assert set(iso.limits) == {"memory.max", "memory.swap.max", "pids.max", "cpu.max",
                                   "cpuset.cpus"}
        meta = src.meta()
        assert meta.xsave_size >= 576 and meta.xfeatures & 0b11 == 0b11
        assert meta.kernel == os.uname().release and "sse2" in meta.cpu_flags


def wait_file_exists(path: Path, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# -- fields read by injected system calls while frozen --------------------------------------
INJECT_CHILD = """
import signal, ctypes, threading
signal.signal(signal.SIGUSR2, lambda *a: None)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.setitimer(signal.ITIMER_REAL, 5000, 1000)
libc = ctypes.CDLL(None)
libc.prctl(36, 1)                      # PR_SET_CHILD_SUBREAPER
libc.prctl(1, 10)                      # PR_SET_PDEATHSIG = SIGUSR1
stack = ctypes.create_string_buffer(65536)
class SS(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]
assert libc.sigaltstack(ctypes.byref(SS(ctypes.addressof(stack), 0, 65536)), None) == 0
timer = ctypes.c_void_p()
assert libc.timer_create(1, None, ctypes.byref(timer)) == 0          # CLOCK_MONOTONIC, SIGALRM
spec = (ctypes.c_long * 4)(2, 0, 100, 0)                              # every 2 s, first in 100 s
assert libc.timer_settime(timer, 0, spec, None) == 0
FACTS = {"stack": ctypes.addressof(stack)}
"""


def test_frozen_fields_from_injection(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, INJECT_CHILD)
    pid = proc.pid
    maps_before = Path(f"/proc/{pid}/maps").read_text()
    with LiveSource(pid) as src:
        live = src.core(pid)
        assert live.thread_info.clear_tid_addr == 0          # not obtainable while running
        sa_live = {s: e.sigaction for s, e in zip(lf.SIGACTION_SIGNALS, live.tc.sigactions)}
        assert sa_live[signal.SIGHUP] == 1 and sa_live[signal.SIGUSR2] == 0
        src.freeze()
        core = src.core(pid)
        assert src.warnings == []
        assert core.thread_info.clear_tid_addr != 0
        sa = {s: e for s, e in zip(lf.SIGACTION_SIGNALS, core.tc.sigactions)}
        assert len(sa) == 62 and sa[signal.SIGHUP].sigaction == 1
        assert sa[signal.SIGUSR2].sigaction > 1                # Python's C-level handler
        assert sa[signal.SIGUSR2].flags & lf.SA_FLAGS["SA_RESTORER"]
        assert sa[signal.SIGTERM].sigaction == 0
        real = core.tc.timers.real
        assert real.isec == 1000 and 4000 < real.vsec <= 5000
        assert core.tc.child_subreaper
        (pt,) = core.tc.timers.posix
        assert (pt.clock_id, pt.si_signo, pt.it_sigev_notify, pt.isec) == (1, signal.SIGALRM, 0, 2)
        assert 90 < pt.vsec <= 100
        tcore = core.thread_core
        assert tcore.pdeath_sig == signal.SIGUSR1
        assert (tcore.sas.ss_sp, tcore.sas.ss_size, tcore.sas.ss_flags) == (fx["stack"], 65536, 0)
        assert src.mm(pid).dumpable == 1
        regs = core.thread_info.gpregs
        src.thaw()
    assert Path(f"/proc/{pid}/maps").read_text() == maps_before   # scratch memory is gone
    assert untraced_and_running(pid)
    with LiveSource(pid) as src:                                   # and it still runs the same code
        assert src.core(pid).thread_info.gpregs.sp == regs.sp


FRESH_CHILD = """
import mmap, signal
held = []
def more(*_):
    m = mmap.mmap(-1, 1 << 20)
    m[:4] = b"new!"
    held.append(m)
signal.signal(signal.SIGUSR1, more)
FACTS = {}
"""


def test_frozen_answers_are_computed_once_across_threads_and_anew_after_thaw(procs, tmp_path):
    import threading
    proc, _ = py_child(procs, tmp_path, FRESH_CHILD)
    pid = proc.pid
    with LiveSource(pid) as src:
        src.freeze()
        got: dict = {}

        def ask(i):
            got[i] = (src.mm(pid), src.core(pid), src.fdinfo(pid), src.pstree())
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(1, 4):                  # one computation each, the others waited for it
            assert all(a is b for a, b in zip(got[0], got[i]))
        vmas = len(got[0][0].vmas)
        src.thaw()
        lines = Path(f"/proc/{pid}/maps").read_text().count("\n")
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/maps").read_text().count("\n") == lines:
            assert time.monotonic() < deadline, "the child never mapped its new region"
            time.sleep(0.01)
        src.freeze()
        mm = src.mm(pid)
        assert mm is not got[0][0] and len(mm.vmas) > vmas      # nothing kept from before
        new = [v for v in mm.vmas if v.end - v.start == 1 << 20 and
               src.read_memory(pid, v.start, 4) == b"new!"]
        assert len(new) == 1
        src.thaw()
    assert untraced_and_running(pid)


def test_fifo_eventfd_and_memfd(procs, tmp_path):
    body = """
d = sys.argv[2]
os.mkfifo(d + "/ff")
ff = os.open(d + "/ff", os.O_RDWR | os.O_NONBLOCK)
os.write(ff, b"in the fifo")
ev = os.eventfd(7, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
mf = os.memfd_create("blob")
os.write(mf, b"memfd!")
FACTS = {"ff": ff, "ev": ev, "mf": mf}
"""
    proc, fx = py_child(procs, tmp_path, body, str(tmp_path))
    pid = proc.pid
    with LiveSource(pid) as src:
        infos = {e.fd: e for e in src.fdinfo(pid)}
        fifo = src.file(infos[fx["ff"]].id)
        assert fifo.type == pb.FIFO and fifo.fifo.pipe_id == os.stat(tmp_path / "ff").st_ino
        reg = src.file(fifo.fifo.regf_id)
        assert reg.type == pb.REG and reg.reg.name == str(tmp_path / "ff")
        assert reg.reg.flags & lf.O_ACCMODE == os.O_RDWR and reg.reg.flags & os.O_NONBLOCK
        assert src.pipe_data(fifo.fifo.pipe_id) == b"in the fifo"
        ev = src.file(infos[fx["ev"]].id)
        assert ev.type == pb.EVENTFD and ev.efd.counter == 7
        assert ev.efd.flags & 1 and ev.efd.flags & os.O_NONBLOCK      # EFD_SEMAPHORE kept
        mf = src.file(infos[fx["mf"]].id)
        assert mf.type == pb.MEMFD and mf.memfd.inode_id == os.stat(f"/proc/{pid}/fd/{fx['mf']}").st_ino
        assert mf.memfd.pos == 6


def test_zombie_child_in_tree(procs, tmp_path):
    ready = tmp_path / "z"
    # The shell's child exits; the shell (exec'd into sleep by python) never reaps it.
    parent = procs.spawn([PY, "-c", "import os, sys, time\npid = os.fork()\nif pid == 0: os._exit(3)\n"
                          f"open({str(ready)!r}, 'w').write(str(pid))\ntime.sleep(1000)"])
    child = int(wait_file(ready, proc=parent))
    wait_gone(child, 5)
    with LiveSource(parent.pid) as src:
        assert [e.pid for e in src.pstree()] == [parent.pid, child]
        core = src.core(child)
        assert core.tc.task_state == 2 and core.tc.exit_code == 3 << 8
        assert not core.HasField("thread_info") and src.fdinfo(child) == []
        with pytest.raises(NotCapturable, match="zombie"):
            src.mm(child)
        src.freeze()                   # the zombie is not seized; the parent is
        assert traced_by_us(parent.pid) and src.core(child).tc.task_state == 2
        src.thaw()
    assert untraced_and_running(parent.pid)


def test_pagemap_file_fallback_matches_scan(procs, tmp_path):
    from ckptfs.capture import pages
    from ckptfs.capture.linux import page_mode
    proc, facts = py_child(procs, tmp_path, MEM_CHILD)
    pm = pages.Pagemap(proc.pid)
    try:
        with LiveSource(proc.pid) as src:
            vmas = src.mm(proc.pid).vmas
        checked = 0
        for v in vmas:
            mode = page_mode(v.status)
            if mode in (pages.ANON, pages.FILE_PRIVATE, pages.SHARED):
                scan = set(_pages_of(pm.ranges(v.start, v.end, mode)))
                slow = set(_pages_of(pm._read(v.start, v.end, mode)))
                # the pagemap file cannot tell the zero page: it may list more, never fewer
                assert scan <= slow and len(slow - scan) <= 4
                checked += len(scan)
        assert checked > 3
        assert pages.Pagemap.scan_works    # this kernel has PAGEMAP_SCAN (6.7+)
    finally:
        pm.close()


def _pages_of(ranges):
    return [a for r in ranges for a in range(r.start, r.end, 4096)]


def test_cgroup_v1_limits(procs, tmp_path):
    from ckptfs.capture import cgroups
    mounts = cgroups.mounts(procfs.parse_mountinfo(Path("/proc/self/mountinfo").read_text()))
    if "memory" not in mounts or "cpu" not in mounts or "pids" not in mounts:
        pytest.skip("no v1 memory/cpu/pids hierarchies here")
    proc = procs.spawn(["sleep", "1000"])
    made = []
    try:
        for ctrl, files in (("memory", {"memory.limit_in_bytes": "268435456"}),
                            ("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}),
                            ("pids", {"pids.max": "77"})):
            d = Path(mounts[ctrl].mount_point) / f"ckptfs-test-{proc.pid}"
            d.mkdir()
            made.append(d)
            for name, value in files.items():
                (d / name).write_text(value)
            (d / "cgroup.procs").write_text(str(proc.pid))
        with LiveSource(proc.pid) as src:
            iso = src.isolation()
        assert iso.cgroup == f"/ckptfs-test-{proc.pid}"
        assert iso.limits["memory.max"] == "268435456"
        assert iso.limits["cpu.max"] == "50000 100000"
        assert iso.limits["pids.max"] == "77"
    finally:
        proc.kill()
        for d in made:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


def test_inet_sockets(procs, tmp_path):
    body = """
import socket
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(3)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::1", 0))
FACTS = {"l": l.fileno(), "lport": l.getsockname()[1], "u": u.fileno(), "uport": u.getsockname()[1]}
"""
    proc, fx = py_child(procs, tmp_path, body)
    with LiveSource(proc.pid) as src:
        infos = {e.fd: e for e in src.fdinfo(proc.pid)}
        tcp = src.file(infos[fx["l"]].id)
        assert tcp.type == pb.INETSK and infos[fx["l"]].type == pb.INETSK
        assert (tcp.isk.family, tcp.isk.type, tcp.isk.proto) == (socket.AF_INET, socket.SOCK_STREAM, 6)
        assert tcp.isk.state == 10 and tcp.isk.src_port == fx["lport"]     # TCP_LISTEN
        assert list(tcp.isk.src_addr) == [0x0100007F]
        udp = src.file(infos[fx["u"]].id).isk
        assert (udp.family, udp.proto, udp.src_port) == (socket.AF_INET6, 17, fx["uport"])
        assert list(udp.src_addr) == [0, 0, 0, 0x01000000]


def test_freeze_a_tree_that_keeps_forking_and_spawning_threads(procs, tmp_path):
    forker = procs.spawn(["sh", "-c", "while :; do /bin/true; done"])
    spawner, _ = py_child(procs, tmp_path, """
import threading
def spin():
    while True:
        t = threading.Thread(target=lambda: None); t.start(); t.join()
threading.Thread(target=spin, daemon=True).start()
FACTS = {}
""")
    time.sleep(0.1)
    for proc in (forker, spawner):
        with LiveSource(proc.pid) as src:
            for _ in range(3):
                src.freeze()
                tree = src.pstree()
                for e in tree:
                    if procfs.parse_stat(Path(f"/proc/{e.pid}/stat").read_text())[3] != "Z":
                        assert all(traced_by_us(e.pid, t) for t in e.threads)
                assert src.core(proc.pid).tc.task_state == 1
                src.thaw()
            assert untraced_and_running(proc.pid)


def test_pending_signals_are_captured_and_stay_pending(procs, tmp_path):
    body = """
import signal, threading
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
signal.signal(signal.SIGUSR1, lambda *a: open(OUT + ".usr1", "w").write("1"))
os.kill(os.getpid(), signal.SIGUSR1)                                   # process-wide queue
signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)     # this thread's queue
FACTS = {}
"""
    proc, _ = py_child(procs, tmp_path, body)
    with LiveSource(proc.pid) as src:
        src.freeze()
        core = src.core(proc.pid)
        shared = [int.from_bytes(e.siginfo[:4], "little") for e in core.tc.signals_s.signals]
        private = [int.from_bytes(e.siginfo[:4], "little") for e in core.thread_core.signals_p.signals]
        assert shared == [signal.SIGUSR1] and private == [signal.SIGUSR2]
        assert len(core.tc.signals_s.signals[0].siginfo) == 128
        assert core.tc.blk_sigset & (1 << (signal.SIGUSR1 - 1))
        src.thaw()
    st = status(proc.pid)
    assert int(st["ShdPnd"], 16) == 1 << (signal.SIGUSR1 - 1)      # still pending after thaw
    assert int(st["SigPnd"], 16) == 1 << (signal.SIGUSR2 - 1)


def test_shared_maps(procs, tmp_path):
    body = """
import mmap, ctypes
d = sys.argv[2]
with open(d + "/shared.bin", "wb") as f:
    f.write(b"F" * 8192)
fd = os.open(d + "/shared.bin", os.O_RDWR)
fm = mmap.mmap(fd, 8192, flags=mmap.MAP_SHARED)
fm[0:5] = b"hello"
am = mmap.mmap(-1, 16384, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
am[4096:4100] = b"shan"
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
FACTS = {"file": addr(fm), "anon": addr(am)}
"""
    proc, fx = py_child(procs, tmp_path, body, str(tmp_path))
    pid = proc.pid
    V = lf.VMA_STATUS
    with LiveSource(pid) as src:
        vmas = {v.start: v for v in src.mm(pid).vmas}
        fv, av = vmas[fx["file"]], vmas[fx["anon"]]
        assert fv.status == V["VMA_AREA_REGULAR"] | V["VMA_FILE_SHARED"]
        assert fv.flags & lf.MAP_FLAGS["MAP_SHARED"] and fv.fdflags == os.O_RDWR
        assert src.file(fv.shmid).reg.name == str(tmp_path / "shared.bin")
        assert src.page_ranges(pid, fv) == []            # its data lives in the file
        assert av.status == V["VMA_AREA_REGULAR"] | V["VMA_ANON_SHARED"]
        assert av.flags == lf.MAP_FLAGS["MAP_SHARED"] | lf.MAP_FLAGS["MAP_ANONYMOUS"]
        assert av.shmid == os.stat(f"/proc/{pid}/map_files/{av.start:x}-{av.end:x}").st_ino
        ranges = src.page_ranges(pid, av)
        assert [(r.start - av.start, r.end - av.start) for r in ranges] == [(4096, 8192)]
        assert src.read_memory(pid, av.start + 4096, 4) == b"shan"


# -- pure parsers on recorded text ------------------------------------------------------------
def test_parsers_on_recorded_text(tmp_path):
    stat = procfs.parse_stat("42 (a) b (c)) S 1 42 42 0 -1 4194560 " + " ".join(["0"] * 44))
    assert stat[1] == "42" and stat[2] == "a) b (c)" and stat[3] == "S" and stat[9] == "4194560"
    mi = procfs.parse_mountinfo(
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n")
    assert mi[0].mount_point == "/mnt/with space" and mi[0].dev == (98, 0) and mi[0].fstype == "ext3"
    inet = procfs.parse_net_inet(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1\n")
    assert inet[12345].src == (bytes([127, 0, 0, 1]), 8080) and inet[12345].state == 10
    assert procfs.parse_fd_link("pipe:[77]") == ("pipe", 77)
    assert procfs.parse_fd_link("anon_inode:[eventfd]") == ("anon_inode:[eventfd]", 0)
    assert procfs.parse_fd_link("/tmp/x (deleted)") is None
    assert procfs.strip_deleted("/tmp/x (deleted)") == ("/tmp/x", True)
    maps = procfs.parse_maps("7f00-7f01 rw-s 00001000 08:01 99   /a b (deleted)\n"
                             "Size: 4 kB\nVmFlags: rd wr sh mr mw me ms gd\n")
    assert maps[0].path == "/a b (deleted)" and maps[0].shared and "gd" in maps[0].vmflags
    assert maps[0].pgoff == 0x1000 and maps[0].prot == 3


def test_cgroup_v2_files(tmp_path):
    from ckptfs.capture import cgroups
    d = tmp_path / "job"
    d.mkdir()
    for name, value in {"memory.max": "1048576", "memory.swap.max": "0", "pids.max": "max",
                        "cpu.max": "25000 100000", "cpuset.cpus": "", "cpuset.cpus.effective": "1"}.items():
        (d / name).write_text(value + "\n")
    mount = procfs.Mount(1, 0, (0, 1), "/", str(tmp_path), "rw", "cgroup2", "cgroup2", "rw")
    lines = procfs.parse_cgroup("0::/job\n")
    assert cgroups.main_path(lines) == "/job"
    assert cgroups.limits(lines, [mount]) == {"memory.max": "1048576", "memory.swap.max": "0",
                                               "pids.max": "max", "cpu.max": "25000 100000",
                                               "cpuset.cpus": "1"}


def test_our_own_process_is_left_out_of_the_tree():
    with pytest.raises(NotCapturable, match="itself"):
        LiveSource(os.getpid())
    parent = os.getppid()          # pytest's parent holds us: a tree with ckptfs inside
    if not untraced_and_running(parent) or parent == 1:
        pytest.skip("parent not capturable here")
    with LiveSource(parent) as src:
        assert os.getpid() not in src.pids() and parent in src.pids()
