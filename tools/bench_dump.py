#!/usr/bin/env python3
"""Capture throughput for a process holding touched memory (default 1 GiB), all in one run:

  raw     process_vm_readv of every page range + write into one file on /dev/shm (the baseline)
  dump    `ckptfs dump` of the process to /dev/shm
  cp -r   `cp -r` of a frozen `ckptfs mount` to /dev/shm
  and `cat regs/rip` latency and `ls -R` of the mounted tree (running and frozen, medians of 5).

Targets (issue 2): dump >= 0.5x raw, cp -r >= 0.25x raw.
Usage: tools/bench_dump.py [--mib 1024] [--repeat 3] [--ls-only]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLI = [sys.executable, "-m", "ckptfs.cli"]
WORKLOAD = """
import mmap, os, sys, time
m = mmap.mmap(-1, {size}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
page = bytes(range(256)) * 16
for off in range(0, {size}, 4096):
    m[off:off + 4096] = page
open(sys.argv[1], "w").write("ready\\n")
time.sleep(100000)
"""


def start_workload(mib: int, tmp: str) -> subprocess.Popen:
    ready = os.path.join(tmp, "ready")
    p = subprocess.Popen([sys.executable, "-c", WORKLOAD.format(size=mib << 20), ready],
                         start_new_session=True, stdin=subprocess.DEVNULL)
    while not (os.path.exists(ready) and open(ready).read() == "ready\n"):
        if p.poll() is not None:
            raise SystemExit("workload died")
        time.sleep(0.05)
    return p


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def raw_copy(pid: int, out: str) -> int:
    """The floor: read each saved range with process_vm_readv (16 MiB pieces) and write it."""
    from ckptfs.capture.linux import LiveSource
    src = LiveSource(pid)
    src.freeze()
    try:
        ranges = [(r.start, r.end) for v in src.mm(pid).vmas for r in src.page_ranges(pid, v)]
    finally:
        src.thaw()
        src.close()
    libc = ctypes.CDLL(None, use_errno=True)
    step = 16 << 20
    buf = ctypes.create_string_buffer(step)
    total = 0
    t0 = time.perf_counter()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for start, end in ranges:
            for addr in range(start, end, step):
                n = min(step, end - addr)
                local, remote = IoVec(ctypes.addressof(buf), n), IoVec(addr, n)
                got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
                if got < 0:
                    raise OSError(ctypes.get_errno(), "process_vm_readv")
                os.write(fd, memoryview(buf)[:got])
                total += got
    finally:
        os.close(fd)
    return total, time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


LS_RUNS = 5


def ls_r(mnt: str) -> float:
    """Median of LS_RUNS `ls -R` of the mount, in seconds."""
    return statistics.median(timed(lambda: run(["ls", "-R", mnt])) for _ in range(LS_RUNS))


def run(cmd, **kw):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ls-only", action="store_true", help="only the ls -R figures")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-dump-", dir="/dev/shm")
    mnt = tempfile.mkdtemp(prefix="bench-mnt-")
    p = start_workload(a.mib, tmp)
    try:
        raw, dump, cp = [], [], []
        size = 0
        for i in range(0 if a.ls_only else a.repeat):
            size, t = raw_copy(p.pid, os.path.join(tmp, "raw"))
            raw.append(t)
            os.unlink(os.path.join(tmp, "raw"))
            d = os.path.join(tmp, f"dump{i}")
            dump.append(timed(lambda: run([*CLI, "dump", str(p.pid), d])))
            shutil.rmtree(d)
        run([*CLI, "mount", str(p.pid), mnt])
        try:
            task = f"{mnt}/tasks/{p.pid}"
            rip = [timed(lambda: run(["cat", f"{task}/threads/{p.pid}/regs/rip"])) for _ in range(20)]
            lsr = ls_r(mnt)
            with open(f"{mnt}/ctl", "w") as c:
                c.write("freeze")
            for i in range(0 if a.ls_only else a.repeat):
                d = os.path.join(tmp, f"cp{i}")
                cp.append(timed(lambda: run(["cp", "-r", mnt, d])))
                shutil.rmtree(d)
            lsr_frozen = ls_r(mnt)
            with open(f"{mnt}/ctl", "w") as c:
                c.write("thaw")
        finally:
            subprocess.run(["fusermount3", "-u", mnt])
        print(f"ls -R of the tree (median of {LS_RUNS}): running {lsr * 1e3:.0f} ms, "
              f"frozen {lsr_frozen * 1e3:.0f} ms")
        if a.ls_only:
            return
        mb = size / 1e6
        r, d, c = statistics.median(raw), statistics.median(dump), statistics.median(cp)
        print(f"memory saved: {mb:.0f} MB ({a.mib} MiB touched), medians of {a.repeat} runs")
        print(f"raw copy (process_vm_readv + write): {r:.3f} s  {mb / r:8.0f} MB/s")
        print(f"ckptfs dump -> /dev/shm:             {d:.3f} s  {mb / d:8.0f} MB/s  "
              f"ratio {r / d:.2f}x raw (target >= 0.5)")
        print(f"cp -r frozen mount -> /dev/shm:      {c:.3f} s  {mb / c:8.0f} MB/s  "
              f"ratio {r / c:.2f}x raw (target >= 0.25)")
        print(f"cat regs/rip (running, cold+warm):   median {statistics.median(rip) * 1e3:.1f} ms, "
              f"max {max(rip) * 1e3:.1f} ms")
    finally:
        p.kill()
        p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        os.rmdir(mnt)


if __name__ == "__main__":
    main()
