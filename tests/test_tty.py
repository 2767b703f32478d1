"""Controlling terminals (CRIU's --shell-job): capture of tty_nr/tpgid, and the restore step
that makes a pty slave a session's controlling terminal again with its foreground group.

Every test makes its own pseudo-terminal (os.openpty) and real processes: a session leader
and a child in a group of its own."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from ckptfs import ptrace
from ckptfs.capture.linux import LiveSource
from ckptfs.errors import KernelError, RestoreFailed
from ckptfs.inject import Injector
from ckptfs.restore import files as restore_files

# A session leader (started with setsid) on the slave as fd 0; with "ctty" it takes it as
# controlling terminal. It forks a child in a group of its own, and with "ctty" makes that
# group the foreground. Prints the child's pid, then sleeps.
LEADER = r"""
import fcntl, os, sys, termios, time
mode = sys.argv[1]
if mode == "ctty":
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
child = os.fork()
if child == 0:
    os.setpgid(0, 0)
    time.sleep(60)
    os._exit(0)
os.setpgid(child, child)
if mode == "ctty":
    os.tcsetpgrp(0, child)
print(child, flush=True)
time.sleep(60)
"""


def stat_fields(pid):
    text = open(f"/proc/{pid}/stat").read()
    return text[text.rindex(")") + 2:].split()   # [0] is field 3 (state)


def tty_nr(pid):
    return int(stat_fields(pid)[4])


def tpgid(pid):
    return int(stat_fields(pid)[5])


@pytest.fixture
def pty_leader():
    """start(mode) -> (leader, child, master, slave path); everything killed afterwards."""
    made = []

    def start(mode):
        master, slave = os.openpty()
        path = os.ttyname(slave)
        p = subprocess.Popen([sys.executable, "-c", LEADER, mode], stdin=slave,
                             stdout=subprocess.PIPE, start_new_session=True, text=True)
        os.close(slave)
        made.append((p, master))
        child = int(p.stdout.readline())
        made[-1] = (p, master, child)
        return p.pid, child, master, path
    yield start
    for p, master, *child in made:
        for pid in child:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.kill()
        p.wait()
        os.close(master)


def test_capture_ctty_and_foreground_group(pty_leader):
    leader, child, _, path = pty_leader("ctty")
    rdev = os.stat(path).st_rdev
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    src = LiveSource(leader)
    try:
        assert src.task_tty(leader) == {"ctty": want, "tty_pgrp": child}
        assert src.task_tty(child) == {"ctty": want}      # not its session's leader
    finally:
        src.close()


def test_capture_no_ctty(pty_leader):
    leader, child, _, _ = pty_leader("plain")      # the slave is fd 0, never taken as ctty
    src = LiveSource(leader)
    try:
        assert src.task_tty(leader) == {}
        assert src.task_tty(child) == {}
    finally:
        src.close()


def wait_for(cond, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"still not {what} after {timeout}s")


def test_make_ctty_injected_then_terminal_sigint_reaches_foreground(pty_leader):
    leader, child, master, path = pty_leader("plain")
    assert tty_nr(leader) == 0
    rdev = os.stat(path).st_rdev
    ptrace.seize(leader)
    ptrace.interrupt(leader)
    ptrace.wait(leader)
    inj = Injector(leader)
    try:
        restore_files.make_ctty(inj, 0, child, f"tasks/{leader}/ctty")
    finally:
        inj.close()
        ptrace.detach(leader)
    assert tty_nr(leader) == rdev
    assert tpgid(leader) == child
    assert os.tcgetpgrp(master) == child
    os.write(master, b"\x03")           # ^C typed at the terminal: SIGINT to the foreground
    wait_for(lambda: stat_fields(child)[0] in "ZX", "killed by the terminal's SIGINT")
    assert stat_fields(leader)[0] != "Z"      # the leader's group is in the background


def test_take_ctty_refused_while_another_session_holds_the_terminal(pty_leader):
    """The cp case: the original session still has the terminal; it is not stolen."""
    holder, _, _, path = pty_leader("ctty")
    leader, _, _, _ = pty_leader("plain")
    ptrace.seize(leader)
    ptrace.interrupt(leader)
    ptrace.wait(leader)
    inj = Injector(leader)
    try:
        fd = inj.call(2, inj.put(path.encode() + b"\0"), os.O_RDWR | os.O_NOCTTY)
        with pytest.raises(KernelError, match="another session") as e:
            restore_files.take_ctty(inj, fd, f"tasks/{leader}/ctty")
        assert e.value.errno == errno.EPERM and e.value.path == f"tasks/{leader}/ctty"
        inj.call(3, fd)
    finally:
        inj.close()
        ptrace.detach(leader)
    assert tty_nr(holder) == os.stat(path).st_rdev and tty_nr(leader) == 0


def test_make_ctty_refused_when_the_session_leader_has_one(pty_leader):
    leader, child, _, _ = pty_leader("ctty")
    other_master, other_slave = os.openpty()
    try:
        ptrace.seize(leader)
        ptrace.interrupt(leader)
        ptrace.wait(leader)
        inj = Injector(leader)
        fd = inj.call(2, inj.put(os.ttyname(other_slave).encode() + b"\0"),
                      os.O_RDWR | os.O_NOCTTY)          # open(2) of another pty slave
        try:
            with pytest.raises(KernelError) as e:
                restore_files.make_ctty(inj, fd, None, f"tasks/{leader}/ctty")
            assert e.value.path == f"tasks/{leader}/ctty" and e.value.step == "ctty TIOCSCTTY"
        finally:
            inj.call(3, fd)
            inj.close()
            ptrace.detach(leader)
    finally:
        os.close(other_master)
        os.close(other_slave)


def test_open_ctty_checks_the_device():
    master, slave = os.openpty()
    try:
        rdev = os.fstat(slave).st_rdev
        fd = restore_files.open_ctty(rdev, "tasks/1/ctty")
        try:
            assert os.fstat(fd).st_rdev == rdev and os.ttyname(fd) == os.ttyname(slave)
        finally:
            os.close(fd)
    finally:
        os.close(master)
        os.close(slave)
    # gone: a pty index nobody has
    with pytest.raises(KernelError) as e:
        restore_files.open_ctty(os.makedev(143, 255), "tasks/7/ctty")
    assert e.value.path == "tasks/7/ctty" and "143:255" in str(e.value)
    # not a pty slave: /dev/tty1 and friends depend on the host
    with pytest.raises(RestoreFailed, match="not a pseudo-terminal slave") as e:
        restore_files.open_ctty(os.makedev(4, 1), "tasks/7/ctty")
    assert e.value.path == "tasks/7/ctty"


def test_dump_restore_remakes_ctty_and_foreground(tmp_path):
    """A real dump --kill of a leader with a pty ctty and a foreground child, then a restore
    (new pids): both have the terminal again, the child's group is the foreground, and ^C
    at the master kills the child only."""
    from ckptfs.restore import restore
    master, slave = os.openpty()
    path = os.ttyname(slave)
    out = tmp_path / "out"
    with open(out, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", LEADER, "ctty"], stdin=slave, stdout=f,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(slave)
    mine = [p.pid]
    try:
        wait_for(lambda: out.read_text().strip(), "told its child")
        child = int(out.read_text())
        mine.append(child)
        src = LiveSource(p.pid)
        try:
            tty = {q: src.task_tty(q) for q in (p.pid, child)}
        finally:
            src.close()
        tree = tmp_path / "tree"
        r = subprocess.run([sys.executable, "-m", "ckptfs.cli", "dump", "--kill", str(p.pid),
                            str(tree)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        p.wait()
        for q, info in tty.items():      # the dump wrote what the live source said
            for name, value in info.items():
                assert (tree / "tasks" / str(q) / name).read_text() == f"{value}\n"
        res = restore(str(tree))
        leader, new_child = res.pids[p.pid], res.pids[child]
        mine += [leader, new_child]
        rdev = os.stat(path).st_rdev
        assert tty_nr(leader) == rdev and tty_nr(new_child) == rdev
        assert tpgid(leader) == new_child and os.tcgetpgrp(master) == new_child
        os.write(master, b"\x03")
        wait_for(lambda: stat_fields(new_child)[0] in "ZX", "killed by the terminal's SIGINT")
        assert stat_fields(leader)[0] not in "ZX"
    finally:
        for q in mine:
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for q in mine[2:]:
            try:
                os.waitpid(q, 0)
            except ChildProcessError:
                pass
        p.wait()
        os.close(master)
