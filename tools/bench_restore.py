#!/usr/bin/env python3
"""Restore time for a process holding touched memory, against two references, in one run:

  floor    reading every file of the dumped tree once (1 MiB reads, page cache warm)
  restore  ckptfs.restore.restore(tree) until the process runs again
  dump     `ckptfs dump` of the same process (LiveSource freeze + write_tree)

Trees live on /dev/shm. Target (issue 3): restore <= 1.5x floor. The ratio is taken per run
(floor read right before each restore, so both see the same load from whatever else runs) and
the median of those is printed; CPU seconds of this process are shown as a load-independent
figure (the floor is one copy; a restore allocates the pages and copies into them). "fresh
pages alone" is the time to fault in as much new anonymous memory without copying anything:
a lower bound for any restore into new pages on this machine. A breakdown line follows
(medians of the restore's own sections, see BREAKDOWN): the page copy runs on threads of its
own while the rest of the task goes in, so `fill` overlaps the restorer's work and `wait` is
the part of it the restorer spent idle.
Usage: tools/bench_restore.py [--mib 256 1024] [--repeat 3] [--compare]
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
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
from ckptfs.restore import memory, restore  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dump import WORKLOAD  # noqa: E402  (one touched-memory workload for every bench)


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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE = 23


def alloc_only(nbytes: int) -> float:
    """Seconds to fault in `nbytes` of fresh anonymous memory and nothing else: what this
    machine charges for the pages a restore must create, before a byte is copied."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf = ctypes.c_char.from_buffer(m)
        t0 = time.monotonic()
        if _libc.madvise(ctypes.addressof(buf), nbytes, MADV_POPULATE_WRITE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")
        took = time.monotonic() - t0
        del buf
        return took
    finally:
        m.close()


def restore_once(top: str) -> tuple[float, dict, float]:
    """(wall seconds, restore timing, CPU seconds of this process) of one restore."""
    c0, t0 = _cpu(), time.monotonic()
    r = restore(top, log=lambda m: None)
    took, cpu = time.monotonic() - t0, _cpu() - c0
    for pid in r.pids.values():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return took, r.timing, cpu


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# Fill methods compared with --compare (restore/memory.py): userfaultfd (UFFDIO_COPY) for private
# anonymous maps, or process_vm_writev into pages the task faults in ahead (MADV_POPULATE_WRITE).
METHODS = {"uffd": True, "vm_writev": False}


def bench(mib: int, repeat: int, methods: list[str]) -> None:
    floors, fcpus, dumps, allocs = [], [], [], []
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    parts: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(repeat):
        tmp = tempfile.mkdtemp(prefix="ckptfs-bench-", dir="/dev/shm")
        try:
            pid = start_workload(mib, tmp)
            top = os.path.join(tmp, "tree")
            try:
                dumps.append(dump(pid, top))
            except BaseException:        # the workload must not outlive a failed dump
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
            for m in methods:             # interleaved: each sees the same machine load
                c0 = _cpu()
                floor, nbytes = read_all(top)
                floors.append(floor)
                fcpus.append(_cpu() - c0)
                memory.USE_UFFD = METHODS[m]
                took, timing, cpu = restore_once(top)
                runs[m].append((took, timing.get("fill", 0), cpu, took / floor))
                parts[m].append(breakdown(took, timing))
            allocs.append(alloc_only(mib << 20))
        finally:
            memory.USE_UFFD = True
            shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    f, fc, d = med(floors), med(fcpus), med(dumps)
    gb = nbytes / 1e9
    print(f"{mib:5d} MiB  load {os.getloadavg()[0]:.1f}  floor {f:6.3f} s ({gb / f:4.2f} GB/s, "
          f"cpu {fc:.3f} s)   dump {d:6.3f} s   fresh pages alone {med(allocs):6.3f} s "
          f"({med(allocs) / f:.2f}x floor)")
    for m in methods:
        r = runs[m]
        took, fill, cpu, ratio = (med(x[i] for x in r) for i in range(4))
        print(f"      {m:10s} restore {took:6.3f} s ({gb / took:4.2f} GB/s; page fill {fill:.3f} s; "
              f"restorer cpu {cpu:.3f} s)   restore/floor {ratio:4.2f}x (median of per-run "
              f"ratios; runs {' '.join(f'{x[3]:.2f}' for x in r)})   restore/dump {took / d:4.2f}x")
        print("                 breakdown (medians, ms): " + "  ".join(
            f"{k} {med(p[k] for p in parts[m]) * 1e3:.1f}" for k in BREAKDOWN))


# One restore's wall time in sections: parse (tree -> Source), plan (checks), create (helpers
# forked in shape), maps (everything before the page fill starts), fill (wall time of the page
# copy, which runs on its own threads), wait (of that, the restorer idle, waiting for the copy:
# the rest of the task went in meanwhile), after (what follows the copy: per-thread state,
# registers, release), other (open, isolation check, reaping ... what is left).
BREAKDOWN = ("parse", "plan", "create", "maps", "fill", "wait", "after", "other")


def breakdown(took: float, t: dict) -> dict:
    out = {k: t.get(k, 0.0) for k in ("parse", "plan", "create")}
    out["maps"] = t.get("fill_start", 0.0) - out["create"]
    out["fill"], out["wait"] = t.get("fill", 0.0), t.get("fill_wait", 0.0)
    out["after"] = t.get("total", 0.0) - t.get("fill_start", 0.0) - out["fill"]
    out["other"] = took - out["parse"] - out["plan"] - t.get("total", 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", action="store_true",
                    help="also restore with process_vm_writev only (the method before userfaultfd)")
    a = ap.parse_args()
    for mib in a.mib:
        bench(mib, a.repeat, list(METHODS) if a.compare else ["uffd"])


if __name__ == "__main__":
    main()
