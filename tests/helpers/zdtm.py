"""ZDTM-style workloads (after CRIU's zdtm): build them, start them, move them, check them.

Each program in tests/zdtm/ holds one kernel object. Its life:

    start  ->  "ready\\n" in the ready file  ->  [move: checkpoint/restore, migrate ...]
           ->  SIGUSR2 ("check now")  ->  "PASS\\n" or "FAIL: why\\n" in the result file

A migration test is a (program x path) product where a path is a callable
`move(pid, tmpdir) -> new_pid` that takes the running program away from `pid` and returns the
pid it runs under afterwards (the same pid if it never moved):

    @pytest.mark.parametrize("name", zdtm.PROGRAMS)
    def test_dump_restore(name, zdtm_bin, procs, tmp_path):
        assert zdtm.run_case(zdtm_bin, name, tmp_path, procs, move=my_dump_restore) == "PASS"

Across hosts: `run_case(..., tmpdir=Path(two_hosts.disk) / name, move=..., src=two_hosts.a,
dst=two_hosts.b)` starts it on hosta (cwd on hosta's private disk) and checks it on hostb.

The programs are built once per test session into tests/zdtm/bin/ (git-ignored), only when a
source is newer than its binary; each binary is written under a temporary name and renamed,
so concurrent sessions never run a half-written file.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import procs as _procs

SRC = Path(__file__).resolve().parent.parent / "zdtm"
BIN = SRC / "bin"
CFLAGS = ["-O2", "-Wall", "-Werror"]

FLAGS_LINE = re.compile(r"^// zdtm-flags:(.*)$", re.M)
# Every tests/zdtm/<name>.c is a program (one kernel object each); extra compiler/linker flags
# come from a `// zdtm-flags: -pthread` line in its source, so adding a program is adding a file.
# The order is the oldest first (the order they were written), then by name.
ORDER = ("sleeping", "pipe_data", "half_read_file", "mmap_pattern", "shared_anon", "avx_regs",
         "sigaltstack", "sighandlers", "itimer", "posix_timer", "threads", "eventfd",
         "cwd_umask", "fork_tree", "unlinked_file", "fifo")


def _flags(name: str) -> list[str]:
    m = FLAGS_LINE.search((SRC / f"{name}.c").read_text())
    return m.group(1).split() if m else []


_found = sorted(p.stem for p in SRC.glob("*.c"))
PROGRAMS: tuple[str, ...] = tuple([n for n in ORDER if n in _found] +
                                  [n for n in _found if n not in ORDER])
PROGRAMS_FLAGS: dict[str, list[str]] = {n: _flags(n) for n in PROGRAMS}
# `// zdtm-known: cp: why` in a source: that path is an expected failure (strict: a fix shows).
KNOWN_LINE = re.compile(r"^// zdtm-known: (\S+): (.*)$", re.M)
KNOWN: dict[tuple[str, str], str] = {
    (n, m.group(1)): m.group(2).strip()
    for n in PROGRAMS for m in KNOWN_LINE.finditer((SRC / f"{n}.c").read_text())}

CHECK_SIGNAL = signal.SIGUSR2
PASS = "PASS"


# -- building ----------------------------------------------------------------------------------
def _stale(src: Path, out: Path) -> bool:
    if not out.exists():
        return True
    newest = max(src.stat().st_mtime, (SRC / "zdtm.h").stat().st_mtime)
    return out.stat().st_mtime < newest


def _compile(name: str, bindir: Path) -> None:
    src, out = SRC / f"{name}.c", bindir / name
    if not _stale(src, out):
        return
    tmp = bindir / f".{name}.{os.getpid()}.tmp"
    cmd = ["gcc", *CFLAGS, "-o", str(tmp), str(src), *PROGRAMS_FLAGS[name]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {src} failed ({' '.join(cmd)}):\n{res.stderr}")
    os.replace(tmp, out)


def build(bindir: str | os.PathLike | None = None) -> Path:
    """Compile every program that is missing or older than its source; return the bin dir."""
    bindir = Path(bindir) if bindir else BIN
    bindir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda n: _compile(n, bindir), PROGRAMS))
    return bindir


# -- running -----------------------------------------------------------------------------------
@dataclass
class Run:
    """A started program: its pid at start, scratch dir (its cwd), ready and result files."""
    name: str
    proc: _procs.Proc
    workdir: Path
    ready: Path
    result: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def start(bindir: Path, name: str, workdir: str | os.PathLike, spawn: Callable[..., _procs.Proc],
          *, view: Callable[[str], str] = os.fspath, timeout: float = 10.0) -> Run:
    """Start program `name` with cwd `workdir` through `spawn(argv, cwd=...)` and wait for ready.

    `spawn` is e.g. `procs.spawn` or `functools.partial(host.spawn, procs=procs)`; `view` maps a
    path of the place the program runs to where this process sees it (`host.path` for a host).
    """
    if name not in PROGRAMS_FLAGS:
        raise KeyError(f"no ZDTM program {name!r}; known: {', '.join(PROGRAMS)}")
    workdir = Path(os.path.abspath(workdir))  # programs may chdir: their paths must not move
    Path(view(str(workdir))).mkdir(parents=True, exist_ok=True)
    ready, result = workdir / "ready", workdir / "result"
    proc = spawn([str(Path(bindir) / name), str(ready), str(result)], cwd=str(workdir))
    proc.wait_ready(view(str(ready)), timeout)
    return Run(name, proc, workdir, ready, result)


def check(pid: int, result: str | os.PathLike, *, timeout: float = 15.0,
          proc: _procs.Proc | None = None) -> str:
    """Send the check signal to `pid`, wait for the result file, return its text stripped.

    `result` is the result file as this process sees it. Gives "PASS" or "FAIL: <reason>";
    fails the test (AssertionError) if the process dies or times out without a verdict.
    """
    if os.path.exists(result):
        raise AssertionError(f"{result} exists before the check signal: stale result?")
    os.kill(pid, CHECK_SIGNAL)
    deadline = time.monotonic() + timeout
    while True:
        dead = not _procs.alive(pid)  # looked at before the file: a verdict may land meanwhile
        try:
            text = Path(result).read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n"):
            return text.strip()
        if dead:
            extra = f"\n{proc.describe()}\n{proc.stderr_text()}" if proc else ""
            raise AssertionError(f"pid {pid} died after the check signal without a verdict "
                                 f"in {result}{extra}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no verdict from pid {pid} in {result} after {timeout}s")
        time.sleep(0.01)


def run_case(bindir: Path, name: str, tmpdir: str | os.PathLike, procs: _procs.ProcSet,
             move: Callable[[int, Path], int] | None = None, *, src=None, dst=None) -> str:
    """Start `name` in tmpdir/work, move it with `move(pid, tmpdir)`, check it; return the verdict.

    `src` is the host (helpers.hosts.Host) it starts on, `dst` the host it runs on after the
    move (default: `src`); None means this machine's own namespaces. A new pid returned by
    `move` is registered in `procs` (killed at teardown).
    """
    tmpdir = Path(tmpdir)
    spawn = functools.partial(src.spawn, procs=procs) if src else procs.spawn
    run = start(bindir, name, tmpdir / "work", spawn, view=src.path if src else os.fspath)
    pid = run.pid
    if move is not None:
        pid = move(pid, tmpdir)
        if pid != run.pid:
            procs.adopt(pid)
    dst = dst or src
    result = dst.path(str(run.result)) if dst else str(run.result)
    procs.adopt_tree(pid)
    return check(pid, result, proc=run.proc if pid == run.pid else None)


# -- poking at a running program (for negative self-checks) ------------------------------------
def fd_links(pid: int) -> dict[int, str]:
    """fd number -> what /proc/PID/fd/N points at (e.g. 'pipe:[123]', '/path (deleted)')."""
    base = f"/proc/{pid}/fd"
    return {int(n): os.readlink(f"{base}/{n}") for n in os.listdir(base)}


def find_fd(pid: int, pred: Callable[[str], bool]) -> int:
    """The lowest fd of `pid` whose link satisfies `pred`."""
    links = fd_links(pid)
    hits = sorted(n for n, link in links.items() if pred(link))
    if not hits:
        raise AssertionError(f"pid {pid} has no matching fd: {links}")
    return hits[0]


_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def grab_fd(pid: int, fd: int) -> int:
    """A copy in this process of fd `fd` of `pid`: the SAME open file description (shared
    offset and flags), via pidfd_getfd(2). The caller closes it."""
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd(pid {pid}, fd {fd}): {os.strerror(err)}")
        return got
    finally:
        os.close(pidfd)


def mappings(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, path) of every mapping of `pid`, from /proc/PID/maps."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        out.append((lo, hi, fields[1], fields[5] if len(fields) > 5 else ""))
    return out


def poke(pid: int, addr: int, data: bytes) -> None:
    """Write `data` into the memory of `pid` at `addr` through /proc/PID/mem."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        if os.pwrite(fd, data, addr) != len(data):
            raise AssertionError(f"short write to pid {pid} at {addr:#x}")
    finally:
        os.close(fd)


if __name__ == "__main__":  # `cd tests && python -m helpers.zdtm`: build by hand
    print(build())
