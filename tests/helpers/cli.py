"""The ckptfs command line as tests run it (a subprocess of this interpreter)."""
from __future__ import annotations

import subprocess
import sys

from ckptfs import tree

CLI = [sys.executable, "-m", "ckptfs.cli"]


def dump(pid: int, out, *extra: str) -> tree.TreeSource:
    """`ckptfs dump [extra] PID OUT`, checked; the tree it wrote."""
    r = subprocess.run([*CLI, "dump", *extra, str(pid), str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return tree.TreeSource(str(out))


def ckptfs(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`ckptfs ARGS...`; with `check`, a non-zero exit fails the test showing its output."""
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"ckptfs {' '.join(map(str, args))}: {r.returncode}\n{r.stdout}\n"
                             f"{r.stderr}")
    return r


def restore(path, procs) -> int:
    """`ckptfs restore PATH`; the new root pid, registered (with its descendants) in `procs`."""
    out = ckptfs("restore", path).stdout
    pairs = dict(line.split(" -> ") for line in out.splitlines() if " -> " in line)
    root = int(next(iter(pairs.values())))
    procs.adopt(root)
    procs.adopt_tree(root)
    return root
