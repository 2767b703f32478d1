"""System call injection into real, ptrace-stopped processes (ckptfs.inject)."""
import os
import signal
import subprocess
import time

import pytest

from ckptfs import ptrace
from ckptfs.inject import NR, Injector

# One small C program, several behaviours: each blocks in exactly one system call and
# reports what that single call returned (no retry loop that would hide a bad restart).
TARGET_C = r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static void handler(int sig, siginfo_t *si, void *ctx) { (void)sig; (void)si; (void)ctx; }
static char altstack[65536];
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(argv[1], "nanosleep")) {
        struct timespec ts = {1, 500000000}, rem;
        int r = nanosleep(&ts, &rem);
        printf("%d %d\n", r, r ? errno : 0);
    } else if (!strcmp(argv[1], "read")) {
        char buf[64];
        ssize_t n = read(0, buf, sizeof buf);
        printf("%zd %d %.*s\n", n, n < 0 ? errno : 0, n > 0 ? (int)n : 0, buf);
    } else if (!strcmp(argv[1], "handler")) {
        struct sigaction sa; memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = handler;
        sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
        sigemptyset(&sa.sa_mask); sigaddset(&sa.sa_mask, SIGUSR2); sigaddset(&sa.sa_mask, SIGHUP);
        sigaction(SIGUSR1, &sa, NULL);
        stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
        sigaltstack(&ss, NULL);
        printf("%p %p %zu\n", (void *)handler, (void *)altstack, sizeof altstack);
        pause();
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def target_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("inject")
    (d / "t.c").write_text(TARGET_C)
    subprocess.run(["gcc", "-O1", "-o", str(d / "t"), str(d / "t.c")], check=True)
    return str(d / "t")


@pytest.fixture
def spawn():
    procs = []

    def start(argv, **kw):
        p = subprocess.Popen(argv, **kw)
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def stop(pid):
    ptrace.seize(pid)
    ptrace.interrupt(pid)
    ptrace.wait(pid)


def wait_blocked(pid, wchan_words=("sleep", "read", "pipe", "pause", "wait")):
    """Until the process sleeps in the kernel (inside its blocking call)."""
    for _ in range(200):
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "S":
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} never blocked")


def test_getpid_via_injection(spawn):
    p = spawn(["sleep", "100"])
    wait_blocked(p.pid)
    stop(p.pid)
    inj = Injector(p.pid)
    before = ptrace.get_regs(p.pid)
    assert inj.syscall(NR["getpid"]) == p.pid
    assert inj.syscall(NR["gettid"]) == p.pid
    assert inj.syscall(NR["getppid"]) == os.getpid()
    inj.close()
    assert ptrace.get_regs(p.pid) == before    # exactly, -ERESTART* code included
    ptrace.detach(p.pid)
    time.sleep(0.05)
    assert p.poll() is None    # still sleeping, nothing broke


def test_nanosleep_resumes_with_remaining_time(spawn, target_bin):
    t0 = time.monotonic()
    p = spawn([target_bin, "nanosleep"], stdout=subprocess.PIPE, text=True)
    wait_blocked(p.pid)
    time.sleep(0.3)
    stop(p.pid)
    inj = Injector(p.pid)
    assert inj.syscall(NR["getpid"]) == p.pid
    scratch = inj.scratch(64)
    inj.write(scratch, b"hello")
    assert inj.read(scratch, 5) == b"hello"
    inj.close()
    ptrace.detach(p.pid)
    out, _ = p.communicate(timeout=5)
    elapsed = time.monotonic() - t0
    assert out.split() == ["0", "0"]        # the one nanosleep call succeeded, not EINTR
    assert 1.45 <= elapsed < 2.5            # and slept its full 1.5 s, not more


def test_blocked_read_restarts_and_gets_data(spawn, target_bin):
    p = spawn([target_bin, "read"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    wait_blocked(p.pid)
    stop(p.pid)
    inj = Injector(p.pid)
    for _ in range(5):
        assert inj.syscall(NR["getpid"]) == p.pid
    inj.close()
    ptrace.detach(p.pid)
    p.stdin.write(b"ping")
    p.stdin.flush()
    out, _ = p.communicate(timeout=5)
    assert out.split() == [b"4", b"0", b"ping"]


def test_sigaction_and_sigaltstack_read_back(spawn, target_bin):
    p = spawn([target_bin, "handler"], stdout=subprocess.PIPE, text=True)
    handler, stack, size = p.stdout.readline().split()
    wait_blocked(p.pid)
    stop(p.pid)
    inj = Injector(p.pid)
    h, flags, restorer, mask = inj.sigaction(signal.SIGUSR1)
    assert h == int(handler, 16)
    SA_SIGINFO, SA_ONSTACK, SA_RESTART, SA_RESTORER = 4, 0x08000000, 0x10000000, 0x04000000
    assert flags == SA_SIGINFO | SA_ONSTACK | SA_RESTART | SA_RESTORER
    assert restorer != 0
    assert mask == (1 << (signal.SIGUSR2 - 1)) | (1 << (signal.SIGHUP - 1))
    assert inj.sigaction(signal.SIGUSR2) == (0, 0, 0, 0)
    assert inj.sigaltstack() == (int(stack, 16), 0, int(size))
    assert inj.getitimer(0) == (0, 0, 0, 0)
    assert inj.get_tid_address() != 0       # glibc registers one for the main thread
    inj.close()
    ptrace.detach(p.pid)
    os.kill(p.pid, signal.SIGUSR1)           # the handler runs, pause() returns
    assert p.wait(timeout=5) == 0


def test_failed_call_raises_with_errno(spawn):
    from ckptfs.errors import KernelError
    p = spawn(["sleep", "100"])
    wait_blocked(p.pid)
    stop(p.pid)
    inj = Injector(p.pid)
    assert inj.syscall(NR["close"], 999) == -9          # EBADF, raw
    with pytest.raises(KernelError) as e:
        inj.call(NR["close"], 999)
    assert e.value.errno == 9 and "close" in str(e.value)
    inj.close()
    ptrace.detach(p.pid)


@pytest.mark.parametrize("options", [0, ptrace.PTRACE_O_TRACESYSGOOD])
def test_signals_during_injection_are_kept_with_either_stop_kind(spawn, options):
    """Syscall stops are told from signal stops by status (TRACESYSGOOD: SIGTRAP|0x80) or by
    siginfo (plain SIGTRAP): either way a real SIGTRAP and a SIGUSR1 sent while calls run
    land in `pending`, never taken for a call's exit, and every result is right."""
    p = spawn(["sleep", "100"])
    wait_blocked(p.pid)
    ptrace.seize(p.pid, options)
    ptrace.interrupt(p.pid)
    ptrace.wait(p.pid)
    inj = Injector(p.pid)
    before = ptrace.get_regs(p.pid)
    os.kill(p.pid, signal.SIGTRAP)
    os.kill(p.pid, signal.SIGUSR1)
    results = [inj.syscall(NR["getpid"]) for _ in range(50)]
    assert results == [p.pid] * 50
    assert sorted(inj.pending) == sorted([signal.SIGTRAP, signal.SIGUSR1]), inj.pending
    assert inj.syscall(NR["close"], 999) == -9
    inj.pending.clear()          # not re-sent: the sleep would die of them
    inj.close()
    assert ptrace.get_regs(p.pid) == before
    ptrace.detach(p.pid)
    time.sleep(0.05)
    assert p.poll() is None
