"""Restore on Linux (ckptfs.restore): real processes dumped, killed, restored and checked
while they run. Every restored pid is killed (and reaped) in finalizers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ckptfs import tree
from ckptfs.capture.linux import LiveSource
from ckptfs.errors import RestoreFailed
from ckptfs.restore import restore
from helpers import procs as _procs
from helpers import zdtm


@pytest.fixture
def restored(procs):
    """Register restored pids: killed by `procs`, then reaped here if they are our children."""
    pids: list[int] = []

    def add(result):
        for pid in result.pids.values():
            procs.adopt(pid)
            pids.append(pid)
        return result
    yield add
    procs.kill_all()
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def dump(pid: int, out: Path, *, kill: bool = True) -> Path:
    """Freeze the tree of `pid`, write it to `out`, then kill it (unless told not to)."""
    with LiveSource(pid) as src:
        src.freeze()
        tree.write_tree(src, str(out))
        pids = src.pids()
        if kill:
            for p in reversed(pids):
                os.kill(p, signal.SIGKILL)
    if kill:
        for p in pids:
            assert _procs.wait_gone(p, 5), f"{p} did not die"
    return out


def mover(restored, **opts):
    def move(pid, tmpdir):
        d = dump(pid, Path(tmpdir) / "tree")
        return restored(restore(str(d), **opts)).pids[pid]
    return move


# -- ZDTM workloads: each keeps one kernel object, then checks itself after the move ----------
@pytest.mark.parametrize("name", zdtm.PROGRAMS)
def test_zdtm_dump_restore(name, zdtm_bin, procs, restored, tmp_path, request):
    """The in-process dump path (tests/test_zdtm.py's `dump` through the CLI): a program's
    known failure of that path (`// zdtm-known: dump: why`) is expected here too."""
    why = zdtm.KNOWN.get((name, "dump")) or zdtm.KNOWN.get((name, "*"))
    if why:
        request.applymarker(pytest.mark.xfail(reason=why, strict=True))
    assert zdtm.run_case(zdtm_bin, name, tmp_path, procs, move=mover(restored)) == "PASS"


def test_memory_filled_by_userfaultfd_leaves_no_trace(zdtm_bin, procs, restored, tmp_path):
    """Private anonymous maps are filled through a userfaultfd of the task (restore/memory.py):
    afterwards the task holds no such descriptor and no map is still registered."""
    run = zdtm.start(zdtm_bin, "mmap_pattern", tmp_path / "work", procs.spawn)
    d = dump(run.pid, tmp_path / "tree")
    r = restored(restore(str(d)))
    new = r.pids[run.pid]
    assert r.timing["bytes"] >= 48 << 20
    links = zdtm.fd_links(new).values()
    assert not any("userfaultfd" in link for link in links), links
    flags = [line for line in Path(f"/proc/{new}/smaps").read_text().splitlines()
             if line.startswith("VmFlags:")]
    assert flags and not any(" um" in line or " uw" in line for line in flags)
    assert zdtm.check(new, run.result) == "PASS"


def test_sleep_keeps_its_remaining_time(procs, restored, tmp_path):
    p = procs.spawn(["sleep", "2"])
    time.sleep(0.5)
    d = dump(p.pid, tmp_path / "tree")
    t0 = time.monotonic()
    r = restored(restore(str(d)))
    new = r.pids[p.pid]
    assert new != p.pid
    _, status = os.waitpid(new, 0)
    took = time.monotonic() - t0
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert 1.2 < took < 2.2, took      # the 1.5 s that were left, not 2 s again, not EINTR


COUNTER = textwrap.dedent("""\
    i=0
    while :; do
        i=$((i+1))
        echo $i >> "$1"
        ( sleep 0.05; true )
        sleep 0.05
    done
""")


def _numbers(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def test_shell_loop_with_children_continues_without_gap(procs, restored, tmp_path):
    script, out = tmp_path / "loop.sh", tmp_path / "count"
    script.write_text(COUNTER)
    p = procs.spawn(["sh", str(script), str(out)])
    _procs.wait_file(out, timeout=5)
    time.sleep(0.4)
    d = dump(p.pid, tmp_path / "tree")
    at_freeze = _numbers(out)
    r = restored(restore(str(d)))
    time.sleep(0.6)
    after = _numbers(out)
    assert len(r.pids) >= 2                       # the shell and its child(ren)
    assert after[:len(at_freeze)] == at_freeze
    assert len(after) > len(at_freeze) + 2        # it keeps counting
    assert after == list(range(1, len(after) + 1))   # no gap, no repeat


def test_restore_while_the_original_still_runs(procs, restored, tmp_path):
    script, out = tmp_path / "loop.sh", tmp_path / "count"
    script.write_text(COUNTER)
    p = procs.spawn(["sh", str(script), str(out)])
    _procs.wait_file(out, timeout=5)
    d = dump(p.pid, tmp_path / "tree", kill=False)
    r = restored(restore(str(d)))
    new = r.pids[p.pid]
    assert new != p.pid
    time.sleep(0.6)
    assert _procs.alive(p.pid) and _procs.alive(new)
    # Both shells go on from the same number: after the freeze every number comes twice.
    nums = _numbers(out)
    twice = [n for n in set(nums) if nums.count(n) == 2]
    assert len(twice) >= 3, nums


PY_WORKER = textwrap.dedent("""\
    import hashlib, os, sys, threading, time
    size = int(sys.argv[2]) << 20
    buf = bytearray(os.urandom(1 << 20)) * (size >> 20)
    want = hashlib.sha1(buf).hexdigest()
    state = {"n": 0, "bad": 0}
    def spin():
        while True:
            state["n"] += 1
            time.sleep(0.001)
    threading.Thread(target=spin, daemon=True).start()
    out = sys.argv[1]
    while True:
        ok = hashlib.sha1(buf).hexdigest() == want
        state["bad"] += not ok
        with open(out, "a") as f:
            f.write(f"{'ok' if ok else 'BAD'} {state['n']}\\n")
        time.sleep(0.2)
""")


def test_python_two_threads_256mib(procs, restored, tmp_path):
    script, out = tmp_path / "w.py", tmp_path / "log"
    script.write_text(PY_WORKER)
    p = procs.spawn([sys.executable, str(script), str(out), "256"])
    _procs.wait_file(out, timeout=30)
    d = dump(p.pid, tmp_path / "tree")
    before = out.read_text().splitlines()
    r = restored(restore(str(d)))
    new = r.pids[p.pid]
    assert len(os.listdir(f"/proc/{new}/task")) == 2
    deadline = time.monotonic() + 10
    while len(out.read_text().splitlines()) < len(before) + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = out.read_text().splitlines()
    assert len(lines) >= len(before) + 3, lines
    assert all(line.startswith("ok ") for line in lines)
    n = [int(line.split()[1]) for line in lines]
    assert n[-1] > n[len(before) - 1]          # the second thread runs too


PIPELINE = textwrap.dedent("""\
    import os, sys, time
    r, w = os.pipe()
    if os.fork() == 0:                     # producer: numbered lines, fast
        os.close(r)
        i = 0
        while True:
            i += 1
            os.write(w, b"%d\\n" % i)
            if i % 50 == 0:
                time.sleep(0.01)
    os.close(w)
    f = os.fdopen(r, "rb")
    out = open(sys.argv[1], "a")
    last = 0
    time.sleep(0.3)                         # let data pile up in the pipe
    for line in f:                          # consumer: slow, checks the sequence
        n = int(line)
        out.write("ok\\n" if n == last + 1 else f"GAP {last} {n}\\n")
        out.flush()
        last = n
        time.sleep(0.002)
""")


def test_pipeline_with_data_in_the_pipe(procs, restored, tmp_path):
    script, out = tmp_path / "pipe.py", tmp_path / "log"
    script.write_text(PIPELINE)
    p = procs.spawn([sys.executable, str(script), str(out)])
    _procs.wait_file(out, timeout=10)
    d = dump(p.pid, tmp_path / "tree")
    data = [f for f in (d / "tasks").rglob("data")]
    assert data and any(f.stat().st_size > 0 for f in data)   # bytes sat in the pipe
    n0 = len(out.read_text().splitlines())
    r = restored(restore(str(d)))
    assert len(r.pids) == 2
    time.sleep(0.8)
    lines = out.read_text().splitlines()
    assert len(lines) > n0 + 20
    assert set(lines) == {"ok"}


def test_pidns_keeps_pids(procs, restored, tmp_path):
    p = procs.spawn(["sleep", "30"])
    d = dump(p.pid, tmp_path / "tree")
    r = restored(restore(str(d), pidns=True))
    new = r.pids[p.pid]
    status = Path(f"/proc/{new}/status").read_text()
    nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
    assert nspid == [str(new), str(p.pid)]


def test_same_pids_refuses_a_taken_pid(procs, restored, tmp_path):
    p = procs.spawn(["sleep", "30"])
    d = dump(p.pid, tmp_path / "tree", kill=False)
    with pytest.raises(RestoreFailed) as e:
        restore(str(d), same_pids=True)
    assert str(p.pid) in str(e.value) and "taken" in str(e.value)


def test_same_pids_restores_the_old_pid(procs, restored, tmp_path):
    p = procs.spawn(["sleep", "30"])
    d = dump(p.pid, tmp_path / "tree")
    p.popen.wait()          # reap it: the pid is free again
    r = restored(restore(str(d), same_pids=True))
    assert r.pids == {p.pid: p.pid}
    assert _procs.alive(p.pid) and Path(f"/proc/{p.pid}/comm").read_text() == "sleep\n"


def test_socket_descriptor_is_refused_by_name(procs, tmp_path):
    code = ("import socket, time; s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); "
            "time.sleep(30)")
    p = procs.spawn([sys.executable, "-c", code])
    time.sleep(0.5)
    d = dump(p.pid, tmp_path / "tree")
    res = restore(str(d), dry_run=True)
    assert any("socket" in line and "fds/3" in line for line in res.problems), res.problems
    with pytest.raises(RestoreFailed):
        restore(str(d))


# -- bad input: refused before anything runs, named by file; the corrected tree restores -------
def reseal(d: Path) -> None:
    """Rewrite the manifest to match the edited tree (so the edit reaches the parser)."""
    from ckptfs import manifest
    doc = manifest.load(str(d / "manifest"))
    files = manifest.scan_tree(str(d))
    (d / "manifest").write_bytes(manifest.build(doc["source"], doc["root"], doc["tasks"],
                                                doc["chunk_size"], "frozen", files))


def _heap(d: Path, pid: int) -> Path:
    for m in (d / "tasks" / str(pid) / "maps").iterdir():
        if (m / "path").read_text() == "[heap]\n":
            return m
    raise AssertionError("no heap map")


def _file_map(d: Path, pid: int) -> Path:
    for m in sorted((d / "tasks" / str(pid) / "maps").iterdir()):
        if (m / "path").read_text().startswith("/usr/"):
            return m
    raise AssertionError("no file map")


def _rename(a: Path, b: Path):
    a.rename(b)
    return lambda: b.rename(a)


def _write(path: Path, text: bytes):
    old = path.read_bytes()
    path.write_bytes(text)
    return lambda: path.write_bytes(old)


def _edits(d: Path, pid: int, log: Path):
    heap = _heap(d, pid)
    lo, hi = (int(x, 16) for x in heap.name.split("-"))
    far = heap.with_name(f"{lo + (1 << 47):x}-{hi + (1 << 47):x}")
    chunk = sorted((heap / "pages").iterdir())[0]
    t = d / "tasks" / str(pid)
    return {
        "address out of range": (lambda: _rename(heap, far), far.name, True),
        "prot rwz": (lambda: _write(heap / "prot", b"rwz\n"), "prot", True),
        "missing chunk": (lambda: _rename(chunk, chunk.with_name("gone")), chunk.name, False),
        "chunk of wrong size": (lambda: _write(chunk, chunk.read_bytes() + b"x" * 4096),
                                chunk.name, True),
        "file path gone": (lambda: _rename(log, log.with_name("moved")), str(log), False),
        "file size changed": (lambda: _write(log, b"grown\n"), str(log), False),
        "register holds text": (lambda: _write(t / "threads" / str(pid) / "regs" / "rip",
                                               b"hello\n"), "regs/rip", True),
        "file map of /dev/null (fails late, at mmap)": (
            lambda: _write(_file_map(d, pid) / "path", b"/dev/null\n"), "mmap", True),
    }


def test_bad_trees_are_refused_and_leave_nothing(procs, restored, tmp_path):
    p = procs.spawn(["sleep", "60"])
    deadline = time.monotonic() + 5          # a heap once sleep is past exec and started
    while "[heap]" not in Path(f"/proc/{p.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    log = Path(f"/proc/{p.pid}/fd/1").resolve()
    d = dump(p.pid, tmp_path / "tree")
    p.popen.wait()
    ours = set(_procs.children(os.getpid()))
    for what, (edit, name, needs_reseal) in _edits(d, p.pid, log).items():
        undo = edit()
        if needs_reseal:
            reseal(d)
        try:
            if "late" not in what:
                problems = restore(str(d), dry_run=True).problems
                assert any(name in line for line in problems), (what, problems)
            with pytest.raises(Exception) as e:
                restored(restore(str(d)))
            assert name in str(e.value), (what, str(e.value))
            assert set(_procs.children(os.getpid())) <= ours, what    # nothing left running
        finally:
            undo()
            reseal(d)
    r = restored(restore(str(d)))                          # the corrected tree restores
    assert _procs.alive(r.pids[p.pid])
    assert restore(str(d), dry_run=True).problems == []


def test_restore_from_criu_images(procs, restored, tmp_path, zdtm_bin):
    from ckptfs import criu
    run = zdtm.start(zdtm_bin, "sleeping", tmp_path / "work", procs.spawn)
    with LiveSource(run.pid) as src:
        src.freeze()
        criu.export(src, str(tmp_path / "img"))
        os.kill(run.pid, signal.SIGKILL)
    run.proc.wait()
    r = restored(restore(str(tmp_path / "img")))
    assert zdtm.check(r.pids[run.pid], run.result) == "PASS"


ZOMBIE_PARENT = textwrap.dedent("""\
    import os, sys, time
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out, go = sys.argv[1], sys.argv[1] + ".go"
    open(out, "w").write(f"child {pid}\\n")
    while not os.path.exists(go):
        time.sleep(0.02)
    got, status = os.waitpid(pid, 0)
    open(out, "a").write(f"reaped {got} {os.waitstatus_to_exitcode(status)}\\n")
    time.sleep(30)
""")


def test_zombie_child_stays_a_zombie_with_its_status(procs, restored, tmp_path):
    script, out = tmp_path / "z.py", tmp_path / "log"
    script.write_text(ZOMBIE_PARENT)
    p = procs.spawn([sys.executable, str(script), str(out)])
    _procs.wait_file(out, timeout=10)
    child = int(out.read_text().split()[1])
    for _ in range(100):
        if _procs.state(child) == "Z":
            break
        time.sleep(0.02)
    d = dump(p.pid, tmp_path / "tree")
    p.popen.wait()                              # both pids free again: the parent reaped by us,
    assert _procs.wait_gone(child, 5)           # the orphaned zombie by whoever inherited it
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.02)
    r = restored(restore(str(d), same_pids=True))
    assert r.pids == {p.pid: p.pid, child: child}
    assert _procs.state(child) == "Z"
    Path(f"{out}.go").write_text("")
    _procs.wait_file(out, timeout=5)
    deadline = time.monotonic() + 5
    while "reaped" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"reaped {child} 7" in out.read_text()


def test_restore_straight_from_a_live_source_with_a_zombie(procs, restored, tmp_path):
    """Any Source restores, here the frozen process itself (memory via process_vm_readv),
    including a child that has exited and was not reaped: it comes back as a zombie. The
    parent remembers its child's pid, so the copy runs in a new PID namespace (pidns)."""
    script, out = tmp_path / "z.py", tmp_path / "log"
    script.write_text(ZOMBIE_PARENT)
    p = procs.spawn([sys.executable, str(script), str(out)])
    _procs.wait_file(out, timeout=10)
    child = int(out.read_text().split()[1])
    for _ in range(100):
        if _procs.state(child) == "Z":
            break
        time.sleep(0.02)
    with LiveSource(p.pid) as src:
        src.freeze()
        r = restored(restore(src, pidns=True))
        os.kill(p.pid, signal.SIGKILL)
    new_child = r.pids[child]
    assert _procs.state(new_child) == "Z"
    out.write_text("")
    Path(f"{out}.go").write_text("")
    deadline = time.monotonic() + 5
    while "reaped" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert f"reaped {child} 7" in out.read_text()


# -- pending signals with their siginfo, a timer aimed at one thread ------------------------
# Everything is blocked: SIGRTMIN queued twice (values 1, 2) and SIGUSR1 from the test in the
# process queue, SIGRTMIN+1 (value 7) in the main thread's own queue; thread B takes the
# ticks of a 10 ms SIGEV_THREAD_ID timer. After the move each pending signal must come out in
# order with its code, value and sender, and the timer keep its id, interval and thread.
SIGQUEUE_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static volatile pid_t b_tid;
static volatile long b_ticks, b_bad;
static char msg[512];

static void *thread_b(void *arg)
{
	sigset_t s;
	(void)arg;
	sigemptyset(&s);
	sigaddset(&s, SIGRTMIN + 2);
	b_tid = syscall(SYS_gettid);
	for (;;) {
		siginfo_t si;
		if (sigwaitinfo(&s, &si) != SIGRTMIN + 2)
			continue;
		b_bad += si.si_code != SI_TIMER || si.si_value.sival_int != 99;
		b_ticks++;
	}
	return NULL;
}

static void put(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
}

/* The next queued instance of `sig` must have this code, value (or sender) */
static int take(int sig, int code, int value, int pid)
{
	sigset_t s;
	struct timespec zero = {0, 0};
	siginfo_t si;
	sigemptyset(&s);
	sigaddset(&s, sig);
	if (sigtimedwait(&s, &si, &zero) != sig)
		return snprintf(msg, sizeof msg, "signal %d not pending", sig), 1;
	if (si.si_code != code || (value >= 0 && si.si_value.sival_int != value) ||
	    (pid >= 0 && si.si_pid != pid))
		return snprintf(msg, sizeof msg, "signal %d: code %d value %d pid %d, want %d %d %d",
				sig, si.si_code, si.si_value.sival_int, si.si_pid, code, value, pid), 1;
	return 0;
}

int main(int argc, char **argv)
{
	const char *out = argv[1], *go = argv[2];
	int sender = atoi(argv[3]);
	sigset_t block;
	pthread_t b;
	timer_t tmr;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGRTMIN);
	sigaddset(&block, SIGRTMIN + 1);
	sigaddset(&block, SIGRTMIN + 2);
	pthread_sigmask(SIG_BLOCK, &block, NULL);
	pthread_create(&b, NULL, thread_b, NULL);
	while (!b_tid)
		usleep(1000);
	struct sigevent ev = { .sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGRTMIN + 2 };
	ev.sigev_value.sival_int = 99;
	ev._sigev_un._tid = b_tid;
	struct itimerspec its = { {0, 10000000}, {0, 10000000} };
	if (timer_create(CLOCK_MONOTONIC, &ev, &tmr) || timer_settime(tmr, 0, &its, NULL))
		return 2;
	union sigval v1 = { .sival_int = 1 }, v2 = { .sival_int = 2 }, v7 = { .sival_int = 7 };
	sigqueue(getpid(), SIGRTMIN, v1);
	sigqueue(getpid(), SIGRTMIN, v2);
	pthread_sigqueue(pthread_self(), SIGRTMIN + 1, v7);
	put(out, "ready\n");
	while (access(go, F_OK))
		usleep(10000);
	int bad = take(SIGRTMIN, SI_QUEUE, 1, -1) || take(SIGRTMIN, SI_QUEUE, 2, -1) ||
		  take(SIGRTMIN + 1, SI_QUEUE, 7, -1) || take(SIGUSR1, SI_USER, -1, sender);
	struct itimerspec cur;
	if (!bad && (timer_gettime(tmr, &cur) || cur.it_interval.tv_nsec != 10000000))
		bad = snprintf(msg, sizeof msg, "timer %ld lost its interval", (long)tmr);
	long t0 = b_ticks;
	usleep(300000);
	if (!bad && (b_ticks - t0 < 5 || b_bad))
		bad = snprintf(msg, sizeof msg, "thread timer: %ld ticks in 300 ms, %ld bad",
			       b_ticks - t0, b_bad);
	put(out, bad ? msg : "PASS");
	return bad;
}
"""


@pytest.fixture(scope="module")
def sigqueue_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigqueue")
    (d / "sq.c").write_text(SIGQUEUE_C)
    subprocess.run(["gcc", "-O1", "-Wall", "-pthread", "-o", str(d / "sq"), str(d / "sq.c"),
                    "-lrt"], check=True)
    return str(d / "sq")


@pytest.mark.parametrize("opts", [{}, {"pidns": True}], ids=["new-pids", "pidns"])
def test_pending_signals_keep_siginfo_and_thread_timer(opts, sigqueue_bin, procs, restored,
                                                       tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    p = procs.spawn([sigqueue_bin, str(out), str(go), str(os.getpid())])
    _procs.wait_file(out, "ready\n", timeout=10)
    os.kill(p.pid, signal.SIGUSR1)
    d = dump(p.pid, tmp_path / "tree")
    pending = [f.name for f in (d / "tasks" / str(p.pid)).glob("**/pending/*")]
    assert len(pending) >= 4, pending
    assert (d / "tasks" / str(p.pid) / "timers" / "posix").is_dir()
    restored(restore(str(d), **opts))
    out.write_text("")
    go.write_text("")
    assert _procs.wait_file(out, timeout=10) == "PASS"


DELETED_TWICE = textwrap.dedent("""\
    import os, sys, time
    os.chdir(sys.argv[1])
    fd = os.open("data", os.O_RDWR | os.O_CREAT, 0o640)
    os.write(fd, b"saved contents " * 100)
    os.lseek(fd, 7, os.SEEK_SET)
    os.unlink("data")
    open("data", "w").write("another file now\\n")     # the name is taken again
    open("ready", "w").write(f"{fd}\\n")
    time.sleep(60)
""")


def test_deleted_file_comes_back_deleted_when_its_name_is_taken(procs, restored, tmp_path):
    script, work = tmp_path / "d.py", tmp_path / "work"
    work.mkdir()
    script.write_text(DELETED_TWICE)
    p = procs.spawn([sys.executable, str(script), str(work)])
    fd = int(_procs.wait_file(work / "ready", timeout=10))
    d = dump(p.pid, tmp_path / "tree")
    assert (d / "tasks" / str(p.pid) / "fds" / str(fd) / "deleted").read_text() == "1\n"
    new = restored(restore(str(d))).pids[p.pid]
    link = os.readlink(f"/proc/{new}/fd/{fd}")
    assert link.startswith(str(work) + "/") and link.endswith(" (deleted)"), link
    assert os.stat(f"/proc/{new}/fd/{fd}").st_nlink == 0
    assert os.stat(f"/proc/{new}/fd/{fd}").st_mode & 0o777 == 0o640
    assert Path(f"/proc/{new}/fd/{fd}").read_bytes() == b"saved contents " * 100
    assert int(Path(f"/proc/{new}/fdinfo/{fd}").read_text().split()[1]) == 7     # pos
    assert (work / "data").read_text() == "another file now\n"
    assert sorted(os.listdir(work)) == ["data", "ready"]          # no ghost left behind


CAP_CHOWN, CAP_KILL, CAP_NET_BIND_SERVICE, CAP_MKNOD, CAP_SYS_RESOURCE = 0, 5, 10, 27, 24


def _set_creds(d: Path, pid: int, values: dict[str, str]) -> None:
    for name, text in values.items():
        (d / "tasks" / str(pid) / "creds" / name).write_text(text + "\n")
    reseal(d)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def _sleeping(procs):
    """A `sleep 60` that is past exec and asleep (a dump then sees sleep, not python)."""
    p = procs.spawn(["sleep", "60"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = _status(p.pid)
        if st["Name"] == "sleep" and st["State"].startswith("S"):
            break
        time.sleep(0.01)
    return p


def test_uid_change_keeps_the_recorded_capabilities(procs, restored, tmp_path):
    """A root-started task recorded as uid 1000 / gid 1001 holding a few capabilities (one
    ambient), a trimmed bounding set, securebits and no_new_privs comes back exactly so: the
    uid change must not wipe the sets (SECBIT_NO_SETUID_FIXUP while switching)."""
    p = _sleeping(procs)
    d = dump(p.pid, tmp_path / "tree")
    bnd = int((d / "tasks" / str(p.pid) / "creds" / "cap_bnd").read_text(), 16) & ~(1 << CAP_MKNOD)
    prm = 1 << CAP_CHOWN | 1 << CAP_KILL | 1 << CAP_NET_BIND_SERVICE
    inh = amb = 1 << CAP_NET_BIND_SERVICE
    _set_creds(d, p.pid, {**{k: "1000" for k in ("uid", "euid", "suid", "fsuid")},
                          **{k: "1001" for k in ("gid", "egid", "sgid", "fsgid")},
                          "groups": "1002", "cap_prm": f"{prm:#018x}", "cap_eff": f"{1 << CAP_KILL:#018x}",
                          "cap_inh": f"{inh:#018x}", "cap_amb": f"{amb:#018x}",
                          "cap_bnd": f"{bnd:#018x}", "secbits": "0x11", "no_new_privs": "1"})
    new = restored(restore(str(d))).pids[p.pid]
    st = _status(new)
    assert st["Uid"].split() == ["1000"] * 4 and st["Gid"].split() == ["1001"] * 4, st
    assert st["Groups"] == "1002", st
    got = {k: int(st[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    assert got == {"CapInh": inh, "CapPrm": prm, "CapEff": 1 << CAP_KILL, "CapBnd": bnd,
                   "CapAmb": amb}, {k: hex(v) for k, v in got.items()}
    assert st["NoNewPrivs"] == "1", st
    deadline = time.monotonic() + 5              # and it runs: back in its nanosleep
    while not _status(new)["State"].startswith("S") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _status(new)["State"].startswith("S"), _status(new)


def test_capabilities_beyond_ours_are_refused_by_name(procs, restored, tmp_path):
    p = _sleeping(procs)
    d = dump(p.pid, tmp_path / "tree")
    ours = int(_status(os.getpid())["CapPrm"], 16)
    missing = next(c for c in range(40, -1, -1) if not ours >> c & 1)   # CAP_SYS_RESOURCE here
    _set_creds(d, p.pid, {"cap_prm": f"{1 << missing:#018x}"})
    problems = restore(str(d), dry_run=True).problems
    assert any(f"tasks/{p.pid}/creds/cap_prm" in line for line in problems), problems
    ours_before = set(_procs.children(os.getpid()))
    with pytest.raises(RestoreFailed, match="cap_prm"):
        restored(restore(str(d)))
    assert set(_procs.children(os.getpid())) <= ours_before


@pytest.mark.parametrize("via", ["live", "criu"])
def test_shared_descriptor_table_from_a_live_source(via, zdtm_bin, procs, restored, tmp_path):
    """A child made with clone(CLONE_FILES) shares its parent's descriptor table: restored
    straight from the frozen processes, or from CRIU images of them (both carry files_id in
    the tasks' ids), the pair gets one table again (fds made or closed by either after the
    move are seen by the other)."""
    from ckptfs import criu

    def move(pid, tmpdir):
        with LiveSource(pid) as src:
            src.freeze()
            pids = src.pids()
            assert len({src.ids(p).files_id for p in pids}) == 1, "capture saw two tables"
            if via == "criu":
                criu.export(src, str(tmpdir / "img"))
            else:       # pidns: the parent knows its child's pid
                r = restored(restore(src, pidns=True))
            for p in reversed(pids):
                os.kill(p, signal.SIGKILL)
        for p in pids:
            assert _procs.wait_gone(p, 5), f"{p} did not die"
        if via == "criu":
            r = restored(restore(str(tmpdir / "img"), pidns=True))
        return r.pids[pid]
    assert zdtm.run_case(zdtm_bin, "files_shared", tmp_path, procs, move=move) == "PASS"


def test_a_fill_failing_on_its_thread_fails_the_restore_by_file(zdtm_bin, procs, tmp_path):
    """The page copy runs on threads of its own while the restorer goes on with the task: a
    chunk that cannot be read there (here it vanished after the checks) still fails the
    restore, naming the chunk, and every task made so far is killed."""
    from ckptfs.tree import TreeSource
    run = zdtm.start(zdtm_bin, "mmap_pattern", tmp_path / "work", procs.spawn)
    d = dump(run.pid, tmp_path / "tree")
    gone = tmp_path / "vanished-chunk"

    class Vanishing(TreeSource):
        """The last chunk of the largest map is looked for where no file is."""
        def chunk_path(self, pid, vma, offset):
            big = max(self.mm(pid).vmas, key=lambda v: sum(r.end - r.start
                                                           for r in self.page_ranges(pid, v)))
            last = self.page_ranges(pid, big)[-1].start - big.start
            if vma.start == big.start and offset == last:
                return str(gone)
            return super().chunk_path(pid, vma, offset)

    before = set(_procs.children(os.getpid()))
    with pytest.raises(RestoreFailed) as e:
        restore(Vanishing(str(d)))
    assert str(gone) in str(e.value) and e.value.step == "fill memory", str(e.value)
    assert set(_procs.children(os.getpid())) <= before     # nothing left running
