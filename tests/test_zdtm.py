"""ZDTM matrix: every kernel-object program through every path, checking itself afterwards.

Paths:
  dump      `ckptfs dump --kill` then `ckptfs restore` (new pids)
  pidns     the same, restored inside a new PID namespace with the original pids
  cp        `ckptfs mount` + freeze, `cp -r` into a `ckptfs target` job, restored by the target
  rsync     host A mounts it, `rsync -a` over ssh into host B's target; it runs on host B
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import zdtm

CLI = [sys.executable, "-m", "ckptfs.cli"]
# What does not survive a move yet, per path: `// zdtm-known: PATH: why` lines in the programs
# (strict xfail: a fix makes the test fail until its line goes).
KNOWN = zdtm.KNOWN


def ckptfs(*args, runner=None, check=True):
    argv = [*CLI, *map(str, args)]
    r = runner.run(argv) if runner else subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"ckptfs {' '.join(map(str, args))}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def new_root(output: str, old: int) -> int:
    pairs = dict(line.split(" -> ") for line in output.splitlines() if " -> " in line)
    return int(pairs[str(old)])


def wait_status(path: str, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            text = ""
        if text.startswith("restored pid="):
            return int(text.split("=", 1)[1])
        if text.startswith("failed"):
            raise AssertionError(f"{path}: {text}")
        time.sleep(0.05)
    raise AssertionError(f"{path}: still {text!r} after {timeout}s")


def move_dump(pid: int, tmp: Path, *, pidns: bool = False) -> int:
    ckptfs("dump", "--kill", pid, tmp / "tree")
    out = ckptfs("restore", *(["--pidns"] if pidns else []), tmp / "tree").stdout
    return new_root(out, pid)


def move_cp(pid: int, tmp: Path, *, tmp_mount) -> int:
    src, dst, store = tmp / "src", tmp / "dst", tmp / "store"
    for d in (src, dst):
        d.mkdir()
    tmp_mount([*CLI, "target", "-f", "--store", str(store), str(dst)], dst)
    tmp_mount([*CLI, "mount", "-f", str(pid), str(src)], src)
    (src / "ctl").write_text("freeze\n")
    subprocess.run(["cp", "-r", str(src), str(dst / "job")], check=True)
    new = wait_status(str(dst / "job" / "status"))
    (src / "ctl").write_text("kill\n")
    return new


def move_rsync(pid: int, tmp: Path, *, hosts, tmp_mount) -> int:
    a, b = hosts.a, hosts.b
    src, dst, store = tmp / "src", tmp / "dst", tmp / "store"
    os.makedirs(a.path(str(src)), exist_ok=True)
    os.makedirs(b.path(str(dst)), exist_ok=True)
    tmp_mount([*CLI, "target", "-f", "--store", str(store), str(dst)], dst, runner=b, timeout=30)
    tmp_mount([*CLI, "mount", "-f", str(pid), str(src)], src, runner=a, timeout=30)
    r = a.run(["sh", "-c", f"echo freeze > {src}/ctl"])
    assert r.returncode == 0, r.stderr
    # the program's own files travel too (no shared storage between the two hosts)
    work = tmp / "work"
    for what, to in ((f"{work}/", f"{work}/"), (f"{src}/", f"{dst}/job/")):
        b.run(["mkdir", "-p", str(work)])
        r = a.run(["rsync", "-a", "-e", a.ssh_cmd(), what, f"{b.name}:{to}"])
        assert r.returncode == 0, r.stderr
    new = wait_status(b.path(str(dst / "job" / "status")))
    a.run(["sh", "-c", f"echo kill > {src}/ctl"])
    return new


PATHS = ["dump", "pidns", "cp", "rsync"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", zdtm.PROGRAMS)
def test_zdtm(name, path, zdtm_bin, procs, tmp_path, tmp_mount, request):
    if (name, path) in KNOWN or (name, "*") in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN.get((name, path)) or KNOWN[(name, "*")],
                                              strict=True))
    src = dst = None
    if path == "dump":
        move = move_dump
    elif path == "pidns":
        move = functools.partial(move_dump, pidns=True)
    elif path == "cp":
        move = functools.partial(move_cp, tmp_mount=tmp_mount)
    else:
        hosts = request.getfixturevalue("two_hosts")
        src, dst = hosts.a, hosts.b
        tmp_path = Path(hosts.disk) / f"{name}-{path}"
        move = functools.partial(move_rsync, hosts=hosts, tmp_mount=tmp_mount)
    verdict = zdtm.run_case(zdtm_bin, name, tmp_path, procs, move=move, src=src, dst=dst)
    assert verdict == "PASS"
