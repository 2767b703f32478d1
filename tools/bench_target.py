#!/usr/bin/env python3
"""Throughput of copying a checkpoint-sized tree into a `ckptfs target` mount.

Builds a 1 GiB tree (512 x 2 MiB chunk files plus a manifest) on /dev/shm, then times, in the
same run: plain `cp -r` and `rsync -a` from /dev/shm to /dev/shm, and the same two commands into
a target mount whose store is on /dev/shm. Also times how long the target takes to find the
copied job complete (checksumming 1 GiB) and the daemon's CPU time per GiB written, which does
not depend on what else the machine is doing. Prints MiB/s and target/plain ratios.

Usage: .venv/bin/python tools/bench_target.py [--files 512] [--size-mib 2] [--dir /dev/shm]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)

from ckptfs import manifest  # noqa: E402


def make_tree(d: str, files: int, size: int) -> None:
    pages = os.path.join(d, "tasks/100/maps/7f0000000000-7f0040000000/pages")
    os.makedirs(pages)
    block = os.urandom(size)
    for i in range(files):
        with open(os.path.join(pages, f"{i * size:#x}"), "wb") as f:
            f.write(i.to_bytes(8, "little") + block[8:])   # every chunk differs
    with open(os.path.join(d, "tasks/100/comm"), "wb") as f:
        f.write(b"bench\n")
    open(os.path.join(d, "ctl"), "wb").close()
    with open(os.path.join(d, "status"), "wb") as f:
        f.write(b"frozen\n")
    listed = manifest.scan_tree(d)
    with open(os.path.join(d, "manifest"), "wb") as f:
        f.write(manifest.build({"os": "linux"}, 100, [100], size, "frozen", listed))


def timed(cmd: list[str]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.monotonic()
    subprocess.run(cmd, check=True)
    return time.monotonic() - t


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_status(path: str, prefix: str, timeout: float = 120) -> float:
    t = time.monotonic()
    while True:
        with open(path) as f:
            if f.read().startswith(prefix):
                return time.monotonic() - t
        if time.monotonic() - t > timeout:
            raise SystemExit(f"{path}: never became {prefix!r}")
        time.sleep(0.01)


class TargetMount:
    def __init__(self, base: str):
        self.mnt, self.store = os.path.join(base, "mnt"), os.path.join(base, "store")
        os.makedirs(self.mnt)
        env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3")
        self.proc = subprocess.Popen([sys.executable, "-m", "ckptfs.targetfs", "-f", "--no-auto",
                                      "--store", self.store, self.mnt], env=env, cwd=TOP,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("target mount did not come up")
            time.sleep(0.02)

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=512)
    ap.add_argument("--size-mib", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    a = ap.parse_args()
    size = a.size_mib << 20
    total_mib = a.files * size / (1 << 20)
    base = tempfile.mkdtemp(prefix="ckptfs-bench-", dir=a.dir)
    mount = None
    try:
        src = os.path.join(base, "src")
        make_tree(src, a.files, size)
        mount = TargetMount(base)
        rows = []
        for name, plain_cmd, target_cmd, job in (
                ("cp -r", ["cp", "-r", src, os.path.join(base, "plain-cp")],
                 ["cp", "-r", src, os.path.join(mount.mnt, "cp")], "cp"),
                ("rsync -a", ["rsync", "-a", src + "/", os.path.join(base, "plain-rsync") + "/"],
                 ["rsync", "-a", src + "/", os.path.join(mount.mnt, "rsync") + "/"], "rsync")):
            plain = timed(plain_cmd)
            cpu = cpu_seconds(mount.proc.pid)
            target = timed(target_cmd)
            cpu = cpu_seconds(mount.proc.pid) - cpu
            verify = wait_status(os.path.join(mount.mnt, job, "status"), "waiting: complete")
            rows.append((name, plain, target, verify, cpu / (total_mib / 1024)))
        print(f"tree: {a.files} x {a.size_mib} MiB = {total_mib:.0f} MiB in {a.dir}; "
              f"target store in {a.dir}")
        print(f"{'copy':10} {'plain MiB/s':>12} {'target MiB/s':>13} {'ratio':>6} "
              f"{'complete after':>15} {'daemon CPU s/GiB':>17}")
        for name, plain, target, verify, cpu in rows:
            print(f"{name:10} {total_mib / plain:12.0f} {total_mib / target:13.0f} "
                  f"{plain / target:6.2f} {verify:14.2f}s {cpu:17.2f}")
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    finally:
        if mount:
            mount.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
