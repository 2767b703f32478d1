"""Real processes for tests, always killed and reaped by pid.

Every process a test starts or learns about (a restored process has a new pid) is registered
in a `ProcSet`; at teardown the set kills each registered pid together with every descendant
it can find through /proc/<pid>/task/*/children, then reaps what it can. Processes are never
looked up or killed by name.

A registered pid is remembered with its start time (field 22 of /proc/<pid>/stat) so that a
pid the kernel has since handed to an unrelated process is left alone.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

READY = "ready\n"


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2:].split()[19])


def state(pid: int) -> str | None:
    """One-letter process state (R, S, Z, ...) or None if the pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (empty if it is gone)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every descendant of `pid`, parents before their children."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    return state(pid) not in (None, "Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until `pid` is dead (gone or zombie); True if it is."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def reap_if_child(pid: int) -> None:
    """Collect the exit status of a dead `pid` if it is a child of this process (a restored
    process usually is: the restorer forks it), so no zombie is left; else do nothing."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_file(path: str | os.PathLike, want: str | None = None, timeout: float = 10.0,
              proc: "Proc | None" = None) -> str:
    """Poll until `path` exists and is non-empty (and equals `want`, if given); return its text.

    If `proc` dies first, fail at once with its exit status and stderr rather than time out.
    """
    deadline = time.monotonic() + timeout
    text = None
    while True:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            text = None
        if text and (want is None or text == want):
            return text
        if proc is not None and not proc.alive():
            raise AssertionError(f"{proc.describe()} died before {path} was written "
                                 f"(it holds {text!r})\n{proc.stderr_text()}")
        if time.monotonic() > deadline:
            extra = f"\n{proc.describe()}\n{proc.stderr_text()}" if proc else ""
            raise AssertionError(f"timeout {timeout}s waiting for {path} (it holds {text!r}){extra}")
        time.sleep(0.01)


class Proc:
    """A process started by `spawn` (popen set) or adopted by pid (popen None)."""

    def __init__(self, pid: int, argv: list[str] | None = None,
                 popen: subprocess.Popen | None = None, logdir: Path | None = None):
        self.pid, self.argv, self.popen, self.logdir = pid, argv, popen, logdir
        self.start = start_time(pid)

    def describe(self) -> str:
        rc = self.popen.poll() if self.popen else None
        what = " ".join(map(str, self.argv)) if self.argv else "(adopted)"
        return f"pid {self.pid} [{what}]" + (f" exited {rc}" if rc is not None else "")

    def same(self) -> bool:
        """True if the pid still names the process registered (not a reused pid)."""
        return self.start is not None and start_time(self.pid) == self.start

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.same() and alive(self.pid)

    def stderr_text(self) -> str:
        return self._log("stderr")

    def stdout_text(self) -> str:
        return self._log("stdout")

    def _log(self, name: str) -> str:
        if self.logdir is None:
            return ""
        try:
            return f"--- {name} of pid {self.pid} ---\n" + (self.logdir / name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, path: str | os.PathLike, timeout: float = 10.0) -> None:
        """Wait until the file `path` holds exactly "ready\\n" (ZDTM ready file convention)."""
        wait_file(path, READY, timeout, proc=self)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for a spawned process to exit; return its exit status."""
        if self.popen is None:
            raise TypeError(f"pid {self.pid} was adopted, not spawned: it cannot be waited for")
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.describe()} still running after {timeout}s\n"
                                 f"{self.stderr_text()}") from None

    def kill(self) -> None:
        """SIGKILL this process and every descendant it has now; reap what is ours."""
        if self.popen is not None and self.popen.poll() is not None:
            return  # already exited and reaped: the pid may belong to somebody else now
        if self.popen is None and not self.same():
            return  # gone, or the pid now belongs to somebody else
        pids = [self.pid] + descendants(self.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen is not None:
            self.popen.wait(10)
        for pid in pids:
            wait_gone(pid, 5)
            if pid != self.pid or self.popen is None:
                reap_if_child(pid)


def spawn(argv: list, *, logdir: str | os.PathLike | None = None, **kw) -> Proc:
    """Start `argv` as a new session leader; stdout/stderr go to files in `logdir`
    (default: a new temporary directory, left behind; a ProcSet cleans up its own).

    Extra keyword arguments go to subprocess.Popen (cwd, env, pass_fds ...).
    """
    argv = [str(a) for a in argv]
    log = Path(logdir) if logdir else Path(tempfile.mkdtemp(prefix="ckptfs-proc-"))
    log.mkdir(parents=True, exist_ok=True)
    kw.setdefault("start_new_session", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    with open(log / "stdout", "wb") as out, open(log / "stderr", "wb") as err:
        popen = subprocess.Popen(argv, stdout=out, stderr=err, **kw)
    return Proc(popen.pid, argv, popen, log)


class ProcSet:
    """Everything a test started or adopted; `kill_all` ends them all (the fixture's finalizer)."""

    def __init__(self, logroot: str | os.PathLike | None = None):
        # Without a logroot the set makes a temporary one, and removes it in kill_all.
        self.own_logroot = logroot is None
        self.logroot = Path(logroot) if logroot else Path(tempfile.mkdtemp(prefix="ckptfs-procs-"))
        self.procs: list[Proc] = []

    def spawn(self, argv: list, **kw) -> Proc:
        kw.setdefault("logdir", self.logroot / f"p{len(self.procs)}")
        proc = spawn(argv, **kw)
        self.procs.append(proc)
        return proc

    def adopt(self, pid: int) -> Proc:
        """Register a pid this test did not spawn (e.g. a restored process) for teardown."""
        if start_time(pid) is None:
            raise AssertionError(f"cannot adopt pid {pid}: no such process")
        proc = Proc(pid)
        self.procs.append(proc)
        return proc

    def adopt_tree(self, pid: int) -> None:
        """Register every descendant `pid` has now: children a program forked outlive it
        when it exits (check failed, or it ends before them) and are no one's then."""
        for kid in descendants(pid):
            if start_time(kid) is not None:
                self.procs.append(Proc(kid))

    def kill_all(self) -> None:
        # Newest first: a restored tree is killed before the tool that restored it.
        errors = []
        while self.procs:
            proc = self.procs.pop()
            try:
                proc.kill()
            except Exception as e:  # keep killing the rest; report at the end
                errors.append(f"{proc.describe()}: {e!r}")
        if self.own_logroot:
            shutil.rmtree(self.logroot, ignore_errors=True)
        if errors:
            raise AssertionError("teardown could not kill: " + "; ".join(errors))
