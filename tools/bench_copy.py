#!/usr/bin/env python3
"""Source mount -> target mount throughput (issue 4), all in one run, for a process holding
touched memory (default 1 GiB):

  baseline   cp -r of the same tree, already dumped on /dev/shm, to /dev/shm
  cp -r      frozen `ckptfs mount` -> `ckptfs target --no-auto` job (store on /dev/shm)
  rsync -a   the same with rsync -a

Usage: tools/bench_copy.py [--mib 1024]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dump import CLI, start_workload, timed  # noqa: E402


def wait_mounted(mnt: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(mnt):
        if time.monotonic() > deadline:
            raise SystemExit(f"{mnt} did not mount")
        time.sleep(0.02)


def run(cmd) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    a = ap.parse_args()
    shm = tempfile.mkdtemp(prefix="bench-copy-", dir="/dev/shm")
    src, dst = tempfile.mkdtemp(prefix="bench-src-"), tempfile.mkdtemp(prefix="bench-dst-")
    p = start_workload(a.mib, shm)
    mounted = []
    try:
        run([*CLI, "dump", str(p.pid), f"{shm}/dump"])
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(f"{shm}/dump") for f in fs)
        base = timed(lambda: run(["cp", "-r", f"{shm}/dump", f"{shm}/plain"]))
        run([*CLI, "mount", str(p.pid), src])
        mounted.append(src)
        run([*CLI, "target", "--no-auto", "--store", f"{shm}/store", dst])
        mounted.append(dst)
        wait_mounted(dst)
        with open(f"{src}/ctl", "w") as c:
            c.write("freeze")
        t_cp = timed(lambda: run(["cp", "-r", src, f"{dst}/job-cp"]))
        t_rs = timed(lambda: run(["rsync", "-a", f"{src}/", f"{dst}/job-rsync/"]))
        mb = size / 1e6
        print(f"tree: {mb:.0f} MB ({a.mib} MiB touched)")
        print(f"baseline cp -r /dev/shm -> /dev/shm: {base:.2f} s {mb / base:7.0f} MB/s")
        print(f"cp -r   source mount -> target:      {t_cp:.2f} s {mb / t_cp:7.0f} MB/s  ratio {base / t_cp:.2f}")
        print(f"rsync -a source mount -> target:     {t_rs:.2f} s {mb / t_rs:7.0f} MB/s  ratio {base / t_rs:.2f}")
    finally:
        for m in reversed(mounted):
            subprocess.run(["fusermount3", "-u", m])
        p.kill()
        p.wait()
        shutil.rmtree(shm, ignore_errors=True)
        for d in (src, dst):
            os.rmdir(d)


if __name__ == "__main__":
    main()
