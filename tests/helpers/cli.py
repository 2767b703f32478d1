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
