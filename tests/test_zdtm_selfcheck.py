"""The ZDTM programs check themselves correctly when nothing happens to them, and their checks
can fail: for each class of check, a cheap outside interference must turn PASS into FAIL."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import time

import pytest

from helpers import procs as P
from helpers import zdtm


@pytest.mark.parametrize("name", zdtm.PROGRAMS)
def test_passes_untouched(name, zdtm_bin, procs, tmp_path):
    assert zdtm.run_case(zdtm_bin, name, tmp_path, procs) == "PASS"


def test_move_callable_gets_pid_and_tmpdir(zdtm_bin, procs, tmp_path):
    seen = []

    def move(pid, tmpdir):
        seen.append((pid, tmpdir))
        return pid

    assert zdtm.run_case(zdtm_bin, "sleeping", tmp_path, procs, move=move) == "PASS"
    assert len(seen) == 1 and isinstance(seen[0][0], int) and seen[0][1] == tmp_path


def started(zdtm_bin, procs, tmp_path, name):
    return zdtm.start(zdtm_bin, name, tmp_path / "work", procs.spawn)


def verdict(run):
    return zdtm.check(run.pid, run.result, proc=run.proc)


def fd_with_flags(pid, pred_link, accmode):
    """fd of `pid` whose link matches and whose access mode (fdinfo flags & 3) is `accmode`."""
    for fd, link in sorted(zdtm.fd_links(pid).items()):
        flags = int(open(f"/proc/{pid}/fdinfo/{fd}").readline().split()[1], 8)
        if pred_link(link) and flags & 3 == accmode:
            return fd
    raise AssertionError(f"pid {pid}: no fd matching with access mode {accmode}")


# -- data queued in pipes and FIFOs ------------------------------------------------------------
def test_pipe_data_fails_when_a_byte_is_drained(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "pipe_data")
    fd = os.open(f"/proc/{run.pid}/fd/10", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert len(os.read(fd, 1)) == 1
    finally:
        os.close(fd)
    assert verdict(run) == "FAIL: pipe holds 999 bytes, want 1000"


def test_fifo_fails_when_a_byte_is_drained(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "fifo")
    fd = os.open(run.workdir / "zdtm.fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert len(os.read(fd, 1)) == 1
    finally:
        os.close(fd)
    assert verdict(run) == "FAIL: fifo holds 776 bytes, want 777"


# -- file offsets and contents -----------------------------------------------------------------
def test_half_read_file_fails_when_its_offset_moves(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "half_read_file")
    fd = zdtm.grab_fd(run.pid, fd_with_flags(run.pid, lambda l: l.endswith("half_read.dat"), os.O_RDONLY))
    try:
        os.lseek(fd, 17, os.SEEK_CUR)  # the same open file description: shared offset
    finally:
        os.close(fd)
    assert verdict(run) == "FAIL: reader offset 3017, want 3000"


def test_unlinked_file_fails_when_its_contents_change(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "unlinked_file")
    fd = zdtm.find_fd(run.pid, lambda l: l.endswith("unlinked.dat (deleted)"))
    with open(f"/proc/{run.pid}/fd/{fd}", "r+b") as f:
        f.seek(123)
        old = f.read(1)[0]
        f.seek(123)
        f.write(bytes([old ^ 0xff]))
    assert verdict(run).startswith("FAIL: byte 123 is")


def test_eventfd_fails_when_its_counter_changes(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "eventfd")
    fd = zdtm.grab_fd(run.pid, zdtm.find_fd(run.pid, lambda l: l == "anon_inode:[eventfd]"))
    try:
        os.eventfd_write(fd, 1)
    finally:
        os.close(fd)
    assert verdict(run) == "FAIL: counter read 12346, want 12345"


# -- memory ------------------------------------------------------------------------------------
def test_mmap_pattern_fails_when_memory_changes(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "mmap_pattern")
    lo = next(lo for lo, hi, perms, _ in zdtm.mappings(run.pid) if hi - lo >= 64 << 20 and perms == "rw-p")
    zdtm.poke(run.pid, lo + 4096 * 2 + 10, b"\xee")
    assert verdict(run).startswith("FAIL: anon byte 0x200a is 0xee")


def test_shared_anon_fails_when_shared_memory_changes(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "shared_anon")
    lo = next(lo for lo, hi, perms, _ in zdtm.mappings(run.pid) if hi - lo == (1 << 20) + 4096)
    zdtm.poke(run.pid, lo + 5, b"\xee")
    assert verdict(run) == "FAIL: parent's half: byte 5 is 0xee"


# -- registers ---------------------------------------------------------------------------------
PTRACE_GETFPREGS, PTRACE_SETFPREGS, PTRACE_DETACH = 14, 15, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
XMM_OFFSET = 160  # of xmm0 in struct user_fpregs_struct (the 512-byte FXSAVE area)


def flip_xmm_byte(pid, reg, byte):
    """Flip one byte of xmm`reg` of a running process with ptrace (seize, interrupt, set, detach)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]

    def ptrace(req, addr=None, data=None):
        if libc.ptrace(req, pid, addr, data) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace({req}, pid {pid}): {os.strerror(err)}")

    ptrace(PTRACE_SEIZE)
    try:
        ptrace(PTRACE_INTERRUPT)
        os.waitpid(pid, 0x40000000)  # __WALL: the ptrace stop
        area = ctypes.create_string_buffer(512)
        ptrace(PTRACE_GETFPREGS, None, ctypes.addressof(area))
        area[XMM_OFFSET + 16 * reg + byte] = area[XMM_OFFSET + 16 * reg + byte][0] ^ 0xff
        ptrace(PTRACE_SETFPREGS, None, ctypes.addressof(area))
    finally:
        ptrace(PTRACE_DETACH)


def test_avx_regs_fails_when_a_register_changes(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "avx_regs")
    flip_xmm_byte(run.pid, 3, 7)
    assert verdict(run).startswith("FAIL: ymm3 byte 7 is")


# -- signals, limits, process tree -------------------------------------------------------------
def test_sighandlers_fails_when_a_handler_is_reset(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "sighandlers")
    os.kill(run.pid, signal.SIGHUP)  # SA_RESETHAND: the handler runs once and is gone
    time.sleep(0.05)
    assert verdict(run).startswith("FAIL: SIGHUP handler is (nil)")


def test_cwd_umask_fails_when_rlimit_changes(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "cwd_umask")
    soft, hard = resource.prlimit(run.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(run.pid, resource.RLIMIT_NOFILE, (soft - 1, hard))
    assert verdict(run) == f"FAIL: RLIMIT_NOFILE is 199/{hard}, want 200/{hard}"


def test_fork_tree_fails_when_a_child_is_killed(zdtm_bin, procs, tmp_path):
    run = started(zdtm_bin, procs, tmp_path, "fork_tree")
    kids = P.children(run.pid)
    assert len(kids) == 2
    os.kill(kids[0], signal.SIGKILL)
    assert P.wait_gone(kids[0], 5)
    assert verdict(run) == f"FAIL: child {kids[0]} did not exit normally (status 0x9)"


def test_every_program_is_session_leader_and_killed_with_children(zdtm_bin, tmp_path):
    ps = P.ProcSet(tmp_path / "logs")
    run = zdtm.start(zdtm_bin, "fork_tree", tmp_path / "work", ps.spawn)
    kids = P.children(run.pid)
    assert os.getsid(run.pid) == run.pid and len(kids) == 2
    ps.kill_all()
    assert not any(P.alive(p) for p in [run.pid, *kids])
