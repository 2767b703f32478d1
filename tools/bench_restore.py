#!/usr/bin/env python3
"""Restore time for a process holding touched memory, against two references, in one run:

  floor    reading every file of the dumped tree once (1 MiB reads, page cache warm)
  restore  ckptfs.restore.restore(tree) until the process runs again
  dump     `ckptfs dump` of the same process (LiveSource freeze + write_tree)

Trees live on /dev/shm. Target (issue 3): restore <= 1.5x floor.
Usage: tools/bench_restore.py [--mib 256 1024] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ckptfs import tree  # noqa: E402
from ckptfs.capture.linux import LiveSource  # noqa: E402
from ckptfs.restore import restore  # noqa: E402

WORKLOAD = """
import mmap, sys, time
m = mmap.mmap(-1, {size}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
page = bytes(range(256)) * 16
for off in range(0, {size}, 4096):
    m[off:off + 4096] = page
open(sys.argv[1], "w").write("ready\\n")
while True:
    time.sleep(1)
"""


def start_workload(mib: int, tmp: str) -> int:
    ready = os.path.join(tmp, "ready")
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD.format(size=mib << 20), ready],
                         start_new_session=True, stdin=subprocess.DEVNULL)
    while not (os.path.exists(ready) and open(ready).read() == "ready\n"):
        if p.poll() is not None:
            raise SystemExit("workload died")
        time.sleep(0.05)
    os.unlink(ready)
    return p.pid


def dump(pid: int, out: str) -> float:
    t0 = time.monotonic()
    with LiveSource(pid) as src:
        src.freeze()
        tree.write_tree(src, out)
        took = time.monotonic() - t0
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return took


def read_all(top: str) -> tuple[float, int]:
    buf = bytearray(1 << 20)
    t0, total = time.monotonic(), 0
    for d, _, names in os.walk(top):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                while got := os.readv(fd, [buf]):
                    total += got
            finally:
                os.close(fd)
    return time.monotonic() - t0, total


def restore_once(top: str) -> tuple[float, dict]:
    t0 = time.monotonic()
    r = restore(top, log=lambda m: None)
    took = time.monotonic() - t0
    for pid in r.pids.values():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return took, r.timing


def bench(mib: int, repeat: int) -> None:
    floors, restores, dumps, fills = [], [], [], []
    for _ in range(repeat):
        tmp = tempfile.mkdtemp(prefix="ckptfs-bench-", dir="/dev/shm")
        try:
            pid = start_workload(mib, tmp)
            dumps.append(dump(pid, os.path.join(tmp, "tree")))
            floor, nbytes = read_all(os.path.join(tmp, "tree"))
            floors.append(floor)
            took, timing = restore_once(os.path.join(tmp, "tree"))
            restores.append(took)
            fills.append(timing.get("fill", 0))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    f, r, d, fl = (statistics.median(x) for x in (floors, restores, dumps, fills))
    gb = nbytes / 1e9
    print(f"{mib:5d} MiB  floor {f:6.3f} s ({gb / f:4.2f} GB/s)   restore {r:6.3f} s "
          f"({gb / r:4.2f} GB/s; page fill {fl:.3f} s)   dump {d:6.3f} s   "
          f"restore/floor {r / f:4.2f}x   restore/dump {r / d:4.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    for mib in a.mib:
        bench(mib, a.repeat)


if __name__ == "__main__":
    main()
