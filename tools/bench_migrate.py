#!/usr/bin/env python3
"""Stop-and-copy against pre-copy migration of one busy process, in the same run.

The workload holds SIZE MiB (default 1024), every page touched, and rewrites a WSET MiB
working set (default 16) continuously. Each way moves it into a `ckptfs target` on this
machine through `ckptfs migrate` (rsync into the target's FUSE mount), and the restored
process then checks all of its memory:
  (a) stop-and-copy: freeze, one rsync pass of everything, restore (migrate with 0 pre-copy
      passes);
  (b) pre-copy: rsync passes while it runs until they stop shrinking, freeze, final pass
      (the difference to what the target holds, copied by migrate itself into the local job).
With --remote the same runs go between two simulated hosts (tests/helpers/hosts.py: network
and mount namespaces joined by a veth pair, a real sshd on each): the workload runs on hosta,
`ckptfs migrate` runs there too, the target is mounted on hostb, and every copy goes through
ssh. Ways: (a) stop-and-copy, one rsync pass over ssh; (b) pre-copy, final pass streamed into
`ckptfs receive` on hostb through one ssh session opened before the freeze; (c) pre-copy with
the final pass through `rsync --files-from` over ssh (no receiver), the way before (b).
Figures: downtime (freeze until the target says `restored`) and its split (freeze, frozen
manifest read, final pass until the target checks, verify, restore; a verify the status
watch did not see counts in the final pass), total time, bytes per pass and in the final
pass, the load average. Goal: (b)'s downtime <= 0.2 x (a)'s and under 250 ms.
Each job is removed after its run, the work directory at the end.

Usage: .venv/bin/python tools/bench_migrate.py [--size MIB] [--wset MIB] [--runs N] [--ways ab]
                                              [--remote] (then --ways abc)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOP))

sys.path.insert(0, str(TOP / "tests"))

from ckptfs import migrate  # noqa: E402

NAMES = {"a": "stop-and-copy", "b": "pre-copy", "c": "pre-copy, rsync final"}


def workload_binary(d: Path) -> str:
    spec = importlib.util.spec_from_file_location("wl", TOP / "tests" / "test_dirty.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_workload(d)


def wait_line(path: Path, n: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines()
        if len(lines) >= n:
            return lines[n - 1]
        time.sleep(0.02)
    raise SystemExit(f"no answer in {path}")


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def one(binary: str, work: Path, target: Path, job: str, size: int, wset: int,
        passes: int) -> migrate.Result:
    out = work / f"{job}.out"
    with open(out, "w") as f:
        p = subprocess.Popen([binary, str(size), str(wset), str(size // 4), "loop", "1000"],
                             stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    new = None
    try:
        wait_line(out, 1)
        time.sleep(0.5)                        # let it settle into its rewriting loop
        result = migrate.migrate(p.pid, migrate.Dest(None, str(target / job)), max_passes=passes)
        new = int(result.status.split("=", 1)[1])
        os.kill(new, signal.SIGUSR1)
        verdict = wait_line(out, 2)
        if not verdict.startswith("ok"):
            raise SystemExit(f"{job}: restored process reports {verdict!r}")
        return result
    finally:
        kill(p.pid)
        p.wait()
        if new:
            kill(new)
        shutil.rmtree(target / job, ignore_errors=True)   # a job holds SIZE MiB of chunks


def as_result(doc: dict) -> migrate.Result:
    doc["passes"] = [migrate.Pass(**p) for p in doc["passes"]]
    doc["timeline"] = [tuple(x) for x in doc["timeline"]]
    return migrate.Result(**doc)


class Remote:
    """Two simulated hosts with a target mounted on hostb; `one()` migrates a workload started
    on hosta. Everything (namespaces, sshd, mounts, processes) goes when the `with` ends."""

    def __init__(self, stack: contextlib.ExitStack, work: Path):
        from helpers import hosts, mounts, procs
        self.work, self.procs = work, procs.ProcSet(work / "procs")
        stack.callback(self.procs.kill_all)
        self.h = stack.enter_context(hosts.two_hosts())
        self.mnt = f"{work}/in-remote"                    # /tmp is the same on both hosts
        stack.enter_context(mounts.fuse_mount(
            mounts.ckptfs_cmd("target", "-f", "--store", work / "store-remote", self.mnt),
            self.mnt, runner=self.h.b, timeout=30))

    def env(self, way: str) -> dict:
        receive = [sys.executable, "-m", "ckptfs.cli", "receive"] if way != "c" else ["false"]
        return dict(os.environ, CKPTFS_RSH=self.h.a.ssh_cmd(), PYTHONPATH=str(TOP),
                    CKPTFS_RECEIVE=" ".join(receive))

    def one(self, binary: str, job: str, size: int, wset: int, passes: int, way: str
            ) -> migrate.Result:
        p = self.h.a.spawn([binary, size, wset, size // 4, "loop", "1000"], procs=self.procs,
                           logdir=self.work / job)
        out, res = self.work / job / "stdout", self.work / f"{job}.json"
        new = None
        try:
            wait_line(out, 1)
            time.sleep(0.5)
            r = self.h.a.run([sys.executable, "-m", "ckptfs.migrate", "run", "--passes", passes,
                              "--json", res, p.pid, f"{self.h.b.name}:{self.mnt}/{job}"],
                             env=self.env(way), timeout=900)
            if r.returncode:
                raise SystemExit(f"{job}: migrate failed:\n{r.stderr}")
            result = as_result(json.loads(res.read_text()))
            print(f"{job}: " + "; ".join(f"+{t * 1000:.0f} {what}"
                                        for t, what in result.timeline), flush=True)
            new = int(result.status.split("=", 1)[1])
            os.kill(new, signal.SIGUSR1)
            verdict = wait_line(out, 2)
            if not verdict.startswith("ok"):
                raise SystemExit(f"{job}: restored process reports {verdict!r}")
            return result
        finally:
            kill(p.pid)
            new = new or self.restored(job)     # a failed run may still have restored it
            if new:
                kill(new)
            shutil.rmtree(self.h.b.path(f"{self.mnt}/{job}"), ignore_errors=True)

    def restored(self, job: str) -> int | None:
        try:
            status = open(self.h.b.path(f"{self.mnt}/{job}/status")).read()
        except OSError:
            return None
        return int(status.split("=", 1)[1]) if status.startswith("restored pid=") else None


def split(result: migrate.Result) -> tuple[float, float, float, float, float]:
    """(freeze, manifest, final pass, verify, restore) from the timeline: the manifest until
    the frozen manifest was read (0 when not read apart), the final pass until the target
    starts its last check (the copy may still be finishing), verify until it starts
    restoring, restore until it says restored."""
    def last(word: str, before: float = float("inf")) -> float:
        return max((t for t, what in result.timeline if what.startswith(word) and t <= before),
                   default=0.0)
    frozen = next((t for t, what in result.timeline if what == "frozen"), 0.0)
    manifest = max(last("frozen manifest read"), frozen)
    restoring = last("restoring")
    restored = last("restored")
    verifying = last("verifying", restoring) or restoring
    return (frozen, manifest - frozen, verifying - manifest, restoring - verifying,
            restored - restoring)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="MiB held by the workload")
    ap.add_argument("--wset", type=int, default=16, help="MiB rewritten continuously")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--ways", default=None, help="which to run: a, b, c (--remote) or any "
                    "combination; the ratio needs a (default: ab, abc with --remote)")
    ap.add_argument("--remote", action="store_true", help="between two simulated hosts, ssh")
    a = ap.parse_args()
    ways = a.ways or ("abc" if a.remote else "ab")
    if "c" in ways and not a.remote:
        ap.error("way c (rsync final pass) is remote only")
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ckptfs-bench-migrate-"))
    rows = {w: [] for w in "abc" if w in ways}
    try:
        with contextlib.ExitStack() as stack:
            binary = workload_binary(work / "bin")
            run = Remote(stack, work).one if a.remote else local_runner(stack, work)
            for i in range(a.runs):
                for way in rows:
                    passes = 0 if way == "a" else migrate.MAX_PASSES
                    rows[way].append(run(binary, f"{way}{i}", a.size, a.wset, passes, way))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(a, rows, load0)
    return 0


def local_runner(stack: contextlib.ExitStack, work: Path):
    target, store = work / "in", work / "store"
    target.mkdir()
    r = subprocess.run([sys.executable, "-m", "ckptfs.cli", "target", "--store", str(store),
                        str(target)], cwd=TOP)
    if r.returncode:
        raise SystemExit(f"ckptfs target exited {r.returncode}")
    stack.callback(subprocess.run, ["fusermount3", "-u", str(target)])
    return lambda binary, job, size, wset, passes, way: one(binary, work, target, job, size,
                                                            wset, passes)


def report(a, rows: dict, load0) -> None:
    print(f"\nworkload: {a.size} MiB touched, {a.wset} MiB rewritten continuously; "
          f"{'two hosts over ssh' if a.remote else 'this machine'}; "
          f"{a.runs} run(s), medians; load average before {load0[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    med = {w: {k: statistics.median(getattr(x, k) for x in rs) for k in ("downtime", "total")}
           for w, rs in rows.items()}
    for way, rs in rows.items():
        last = rs[-1]
        print(f"({way}) {NAMES[way]:22s} downtime {med[way]['downtime'] * 1000:7.0f} ms   total "
              f"{med[way]['total']:6.2f} s   final pass {last.passes[-1].bytes / 1e6:7.1f} MB "
              f"in {last.passes[-1].seconds * 1000:.0f} ms   passes (MB): "
              + ", ".join(f"{p.bytes / 1e6:.1f}" for p in last.passes))
        print("    downtimes (ms): " + ", ".join(f"{r.downtime * 1000:.0f}" for r in rs))
    print("downtime split (ms, medians: freeze | frozen manifest read | final pass until the "
          "target checks | verify | restore):")
    for way in rows:
        parts = [split(r) for r in rows[way]]
        cols = [statistics.median(p[i] for p in parts) * 1000 for i in range(5)]
        print(f"({way}) " + " | ".join(f"{c:6.0f}" for c in cols))
    for way in "bc":
        if way in rows and "a" in rows:
            ratio = med[way]["downtime"] / med["a"]["downtime"]
            print(f"({way}) {NAMES[way]} downtime / stop-and-copy downtime = {ratio:.2f} "
                  f"(goal <= 0.20); downtime {med[way]['downtime'] * 1000:.0f} ms "
                  f"(goal < 250 ms)")


if __name__ == "__main__":
    sys.exit(main())
