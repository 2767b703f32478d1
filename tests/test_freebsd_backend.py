"""The FreeBSD restore backend against a strict fake FreeBSD kernel (tests/fbsd_fake.py, the
only mock: there is no FreeBSD host): real Linux process trees, dumped with the CLI and read
with TreeSource, go through restore/freebsd.py; the fake checks and records every call.
Kernel-level calls carry FreeBSD values (ptrace requests on lwp ids, jail_set, RCTL rules);
the helper is Linux-branded, so injected calls carry LINUX numbers and flags."""
from __future__ import annotations

import os
import sys
import time

import pytest

from ckptfs import flags as L
from ckptfs.errors import KernelError
from ckptfs.restore import freebsd as RF
from fbsd_fake import FakeFreeBSD, spawn
from helpers.cli import dump



def wait_children(pid, n, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        if len(kids) >= n:
            return [int(k) for k in kids]
        time.sleep(0.02)
    raise AssertionError(f"{pid} has no {n} children")


@pytest.fixture
def shell_tree(procs, tmp_path):
    """sh (session leader, fd 3 a regular file at offset 5, fd 4 a pipe holding bytes) with
    a sleeping child in its own process group."""
    data = tmp_path / "data.txt"
    data.write_text("hello world\n")
    script = (f"exec 3<{data}; read -n 5 x <&3 2>/dev/null || dd bs=5 count=1 <&3 "
              ">/dev/null 2>&1; exec 4<>/dev/null; set -m; sleep 1000 & wait")
    p = procs.spawn(["bash", "-c", script])
    kids = wait_children(p.pid, 1)
    procs.adopt(kids[0])
    time.sleep(0.1)
    return p.pid, kids[0], str(data)


def linux(kit, pid, what):
    return [e[3:] for e in kit.log if e[0] == "linux" and e[1] == pid and e[2] == what]


def test_real_tree_restores_through_the_fake_kernel(shell_tree, tmp_path, monkeypatch):
    root, child, data = shell_tree
    src = dump(root, tmp_path / "tree")
    kit = FakeFreeBSD()
    monkeypatch.setattr(RF, "spawn_helper", spawn(kit))
    pids = RF.restore(src, RF.Target(kit=kit))
    new_root, new_child = pids
    kinds = [e[0] for e in kit.log]
    # FreeBSD side: jail first, RCTL rules on it, the root helper attached and tracing forks
    assert kit.log[0][:2] == ("jail_set", f"ckptfs_{root}") and kit.log[0][2] == 1
    assert kinds.index("attach") < kinds.index("trace_events") < kinds.index("linux")
    assert ("linux", new_root, "fork", new_child) in kit.log
    # sessions and groups with Linux calls in the helpers: bash led its session, sleep its group
    assert linux(kit, new_root, "setsid") == [()]
    assert linux(kit, new_child, "setpgid") == [(new_child,)]
    # descriptors: Linux open flags (O_RDONLY|O_LARGEFILE|O_NOCTTY), offset, recorded number
    opened = {path: flags for path, flags in linux(kit, new_root, "open")}
    assert opened[data] == L.OPEN_FLAGS["O_LARGEFILE"] | L.OPEN_FLAGS["O_NOCTTY"]
    assert (data, 5) in linux(kit, new_root, "lseek")
    assert (3, data, False) in linux(kit, new_root, "dup3")
    assert (4, "/dev/null", False) in linux(kit, new_root, "dup3")
    for pid, old in ((new_root, root), (new_child, child)):
        fds = kit.procs[pid].fds
        assert sorted(fds) == sorted(int(f) for f in os.listdir(f"/proc/{old}/fd")), pid
        # memory: every anonymous VMA mapped with Linux MAP_FIXED|MAP_ANONYMOUS|MAP_PRIVATE
        maps = linux(kit, pid, "mmap")
        assert maps and all(f & 0x10 for _, _, f in maps)
        assert any(f == 0x32 for _, _, f in maps)
        assert any(e[0] == "write" and e[1] == pid for e in kit.log)
        # state: cwd, umask, rlimits clamped to the jail's, creds last
        assert linux(kit, pid, "chdir") == [(os.readlink(f"/proc/{old}/cwd"),)]
        assert len(linux(kit, pid, "prlimit64")) == 16
        calls = [e[2] for e in kit.log if e[0] == "linux" and e[1] == pid]
        assert calls[-3:] == ["setgroups", "setresgid", "setresuid"]
        assert calls.index("sigmask") < calls.index("setgroups")
        if "rt_sigaction" in calls:
            assert calls.index("rt_sigaction") < calls.index("sigmask")
        # Linux signal numbers (SIGCHLD 17 handled by bash, not FreeBSD's 20)
        regs = [e for e in kit.log if e[0] == "setregs" and e[1] == pid]
        assert len(regs) == 1 and ("detach", pid) in kit.log
    assert any(e[3] == L.SIGNALS["SIGCHLD"] for e in kit.log
               if e[0] == "linux" and e[1] == new_root and e[2] == "rt_sigaction")
    assert kit.killed == [] and kinds[-1] == "detach"


def test_failure_kills_every_helper_and_removes_the_jail(shell_tree, tmp_path, monkeypatch):
    root, child, data = shell_tree
    src = dump(root, tmp_path / "tree")
    kit = FakeFreeBSD()
    kit.fail_on = ("chdir", 13)
    monkeypatch.setattr(RF, "spawn_helper", spawn(kit))
    with pytest.raises(KernelError) as e:
        RF.restore(src, RF.Target(kit=kit))
    assert e.value.errno == 13 and e.value.step == "chdir"
    assert f"tasks/{root}/cwd" in str(e.value)
    assert sorted(kit.killed) == [900, 901] and not kit.procs and not kit.jails


@pytest.fixture
def threaded(procs):
    code = ("import threading, time, sys\n"
            "ev = threading.Event()\n"
            "threading.Thread(target=ev.wait, daemon=True).start()\n"
            "print('ready', flush=True); time.sleep(1000)\n")
    p = procs.spawn([sys.executable, "-S", "-c", code])
    end = time.time() + 10
    while "ready" not in p.stdout_text() and time.time() < end:
        time.sleep(0.05)
    return p.pid


def test_threads_by_injected_clone_and_lwp_registers(threaded, tmp_path, monkeypatch):
    src = dump(threaded, tmp_path / "tree")
    tids = src.threads(threaded)
    assert len(tids) == 2
    kit = FakeFreeBSD()
    monkeypatch.setattr(RF, "spawn_helper", spawn(kit))
    [new] = RF.restore(src, RF.Target(kit=kit))
    assert linux(kit, new, "clone") == [(RF.CLONE_THREAD_FLAGS | RF.CLONE_CHILD_CLEARTID,)]
    lwp = next(e[1] for e in kit.log if e[0] == "suspend")
    other = next(t for t in tids if t != threaded)
    assert kit.procs[new].clear_tid == {
        new: src.core(threaded).thread_info.clear_tid_addr,
        lwp: src.core(other).thread_info.clear_tid_addr}
    assert lwp != new and ("resume", lwp) in kit.log
    # each thread's registers and fs base set on its own lwp id (FreeBSD ptrace per lwp)
    assert {e[1] for e in kit.log if e[0] == "setregs"} == {new, lwp}
    assert {e[1] for e in kit.log if e[0] == "fsbase"} == {new, lwp}
    kinds = [e[0] for e in kit.log]
    assert kinds.index("suspend") < kinds.index("resume") < kinds.index("detach")


def test_pipe_between_processes_is_one_pipe(procs, tmp_path, monkeypatch):
    """`sleep | sleep`: the write end in one child, the read end in the other. The pipe is
    made in the root helper before it forks, so both children inherit the same pipe; every
    process keeps only the ends it had."""
    p = procs.spawn(["bash", "-c", "sleep 1000 | sleep 1000; wait"])
    kids = wait_children(p.pid, 2)
    for k in kids:
        procs.adopt(k)
    src = dump(p.pid, tmp_path / "tree")
    kit = FakeFreeBSD()
    monkeypatch.setattr(RF, "spawn_helper", spawn(kit))
    root, a, b = RF.restore(src, RF.Target(kit=kit))
    pa, pb = kit.procs[a], kit.procs[b]
    assert pa.fds[1].pipe is pb.fds[0].pipe and pa.fds[1].kind == "pipe"
    assert pa.fds[1].flags & 3 == 1 and pb.fds[0].flags & 3 == 0
    assert [e for e in kit.log if e[0] == "linux" and e[2] == "pipe2"] == \
        [("linux", root, "pipe2", 0, L.O_CLOEXEC | L.OPEN_FLAGS["O_NONBLOCK"])]
    pipe = pa.fds[1].pipe
    assert (pipe.readers, pipe.writers) == (1, 1)      # the root's copies are closed
    for pid, old in ((root, p.pid), (a, kids[0]), (b, kids[1])):
        assert sorted(kit.procs[pid].fds) == sorted(int(f) for f in os.listdir(f"/proc/{old}/fd"))
    # the ends are no longer non-blocking (they were made so to be filled)
    assert not pa.fds[1].flags & L.OPEN_FLAGS["O_NONBLOCK"]


def test_capture_sigactions_mask_and_isolation_through_the_fake():
    """Handlers by injected Linux rt_sigaction(sig, NULL, &old) in a Linux-branded target
    (its code and registers put back), the mask from PT_LWPINFO (FreeBSD numbering), the
    jail and RCTL rules back to model.Isolation."""
    from ckptfs.capture import freebsd as CF
    from ckptfs.translate.freebsd import regs as G
    kit = FakeFreeBSD()
    jid = kit.jail_set({"name": "web", "host": "new", "host.hostname": "web1",
                        "vnet": "new", "enforce_statfs": 1}, 1)
    kit.rctl_add_rule("jail:web:memoryuse:deny=1048576")
    p = kit.new_helper()
    kit.attach(p.pid)
    p.jid = jid
    p.sigactions[L.SIGNALS["SIGUSR1"]] = (0x401100, 0x04000000, 0x7f0000, 1 << 1)
    p.sigmask = (1 << 29, 0, 0, 0)                 # FreeBSD SIGUSR1 (30)
    p.text = "/bin/true"
    regs, code = p.lwps[p.pid], p.mem.read(0x7ffff7ff0000, 3)
    src = CF.FreeBSDSource(p.pid, kit)
    core = src.core(p.pid)
    acts = list(core.tc.sigactions)
    assert len(acts) == 62
    usr1 = acts[L.SIGACTION_SIGNALS.index(L.SIGNALS["SIGUSR1"])]
    assert (usr1.sigaction, usr1.flags, usr1.restorer, usr1.mask) == \
        (0x401100, 0x04000000, 0x7f0000, 2)
    assert core.tc.blk_sigset == 1 << (L.SIGNALS["SIGUSR1"] - 1)
    assert p.lwps[p.pid] == regs and p.mem.read(0x7ffff7ff0000, 3) == code     # put back
    assert core.thread_info.gpregs.cs == 0x33 and G.unpack(regs)["r_cs"] == 0x43
    iso = src.isolation()
    assert iso.hostname == "web1" and set(iso.own_namespaces) >= {"uts", "net", "mnt"}
    assert iso.limits["memory.max"] == "1048576"
    p.jid = 0
    assert src.isolation().own_namespaces == ()
