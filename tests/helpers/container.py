"""A real test container: `unshare` namespaces, a network, mounts and a v1 cgroup with limits.

    with running_container(tmp_path) as ct:
        ct.init_pid        # host pid of the container's init (pid 1 inside)

Made without ckptfs (plain unshare, ip, mount and cgroupfs writes), so that what ckptfs
captures can be checked against what was really set up:

- namespaces: pid, mount, uts, ipc, net (`unshare --fork --pid --mount --uts --ipc --net
  --mount-proc`);
- hostname HOSTNAME, domainname DOMAIN;
- eth0 with ADDR and a default route via GATEWAY. This kernel has no dummy driver, so eth0 is
  one end of a veth pair whose other end (eth0p) is also inside; a dummy is used where it exists;
- a tmpfs on <tmp>/scratch (size 1 MiB) and a bind mount of <tmp>/src on <tmp>/bound;
  on the tmpfs: sub/ (0750), sub/data (TMPFS_DATA, owner TMPFS_OWNER, 0640), link -> sub/data,
  fifo (0600); the init holds sub/data open as fd 3 at offset TMPFS_OFFSET;
- v1 cgroups named ckptfs-test-<id> with LIMITS (memory below this process's own memory
  cgroup, so the container stays inside the limits the tests run under);
- a workload: a shell loop appending a counter to <tmp>/out every 20 ms (the container's
  init, pid 1 inside); with `sleeper=True` it first starts `sleep 3600` in the background, a
  child that lives as long as the container (its pid inside is known: SLEEPER_PID).

Teardown (also on failure): SIGKILL the init through a pidfd (the pid namespace dies with it),
reap `unshare`, rmdir the cgroups (retrying while the dying tasks leave).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

HOSTNAME, DOMAIN = "ct-web1", "example.test"
ADDR, GATEWAY = "10.9.0.2/24", "10.9.0.1"
LIMITS = {"memory.max": str(64 << 20), "pids.max": "64", "cpu.max": "50000 100000"}
V1_FILES = [("memory", "memory.limit_in_bytes", LIMITS["memory.max"]),
            ("pids", "pids.max", LIMITS["pids.max"]),
            ("cpu", "cpu.cfs_period_us", "100000"), ("cpu", "cpu.cfs_quota_us", "50000")]
CG_ROOT = "/sys/fs/cgroup"
TMPFS_DATA, TMPFS_OWNER, TMPFS_OFFSET = "hello tmpfs world\n", "1234:5678", 6
SLEEPER_ARGV = ["sleep", "3600"]


@dataclasses.dataclass
class UnshareContainer:
    init_pid: int
    unshare: subprocess.Popen
    cgroup_dirs: dict[str, str]     # controller -> directory
    cgroup_path: str                # memory controller path, as /proc/PID/cgroup shows it
    out: Path                       # the workload's output file (one counter value a line)
    scratch: Path                   # tmpfs mount point
    src: Path                       # bind source
    bound: Path                     # bind target
    sleeper: int | None = None      # pid inside the container of the background sleep


def own_cgroup(controller: str) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if controller in ctrls.split(","):
                return path
    return "/"


def make_cgroups(name: str) -> dict[str, str]:
    dirs: dict[str, str] = {}
    try:
        for ctrl, fname, value in V1_FILES:
            if ctrl not in dirs:
                d = os.path.join(CG_ROOT, ctrl, own_cgroup(ctrl).lstrip("/"), name)
                os.mkdir(d)
                dirs[ctrl] = d
            Path(dirs[ctrl], fname).write_text(value)
    except BaseException:
        remove_cgroups(dirs)
        raise
    return dirs


def remove_cgroups(dirs: dict[str, str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for d in dirs.values():
        while True:
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def _script(tmp: Path, sleeper: bool) -> str:
    net = ("{ ip link add eth0 type dummy 2>/dev/null || "
           "{ ip link add eth0 type veth peer name eth0p && ip link set eth0p up; }; } && "
           f"ip link set lo up && ip link set eth0 up && ip addr add {ADDR} dev eth0 && "
           f"ip route add default via {GATEWAY} dev eth0")
    mounts = (f"mount -t tmpfs -o size=1m,nosuid tmpfs {tmp}/scratch && "
              f"mount --bind {tmp}/src {tmp}/bound")
    s = f"{tmp}/scratch"
    # files on the tmpfs, one of them held open by the init at offset TMPFS_OFFSET (fd 3)
    files = (f"mkdir -m 750 {s}/sub && printf '%s\\n' '{TMPFS_DATA.strip()}' > {s}/sub/data && "
             f"chown {TMPFS_OWNER} {s}/sub/data && chmod 640 {s}/sub/data && "
             f"ln -s sub/data {s}/link && mkfifo -m 600 {s}/fifo; "
             f"exec 3< {s}/sub/data; dd bs=1 count={TMPFS_OFFSET} <&3 >/dev/null 2>&1")
    uts = f"hostname {HOSTNAME} && echo {DOMAIN} > /proc/sys/kernel/domainname"
    loop = f"i=0; while :; do i=$((i+1)); echo $i >> {tmp}/out; sleep 0.02; done"
    # ready only once the background child is sleep itself, not the shell forked to exec it
    bg = (f"{' '.join(SLEEPER_ARGV)} & echo $! > {tmp}/sleeper; "
          f"until [ \"$(cat /proc/$!/comm)\" = {SLEEPER_ARGV[0]} ]; do sleep 0.01; done; "
          if sleeper else "")
    return f"set -e; {uts} && {net} && {mounts} && {files}; {bg}echo ready > {tmp}/ready; {loop}"


def _child_of(ppid: int, timeout: float) -> int:
    """The one child of `ppid` (no /proc/PID/task/*/children on this kernel: scan status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if f"\nPPid:\t{ppid}\n" in status:
                return int(entry)
        time.sleep(0.01)
    raise TimeoutError(f"no child of {ppid}")


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"container setup failed ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"container not ready: {path}")
        time.sleep(0.01)


@contextlib.contextmanager
def running_container(tmp: Path, *, sleeper: bool = False):
    for d in ("scratch", "src", "bound"):
        (tmp / d).mkdir(exist_ok=True)
    (tmp / "src" / "hello").write_text("hi\n")
    name = f"ckptfs-test-{uuid.uuid4().hex[:8]}"
    dirs = make_cgroups(name)
    joins = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in dirs.values())
    argv = ["sh", "-c", f'{joins}; exec unshare --fork --pid --mount --uts --ipc --net '
                        f'--mount-proc sh -c "$0"', _script(tmp, sleeper)]
    try:
        with _init_of(argv, tmp / "ready", 10.0) as (init, proc):
            yield UnshareContainer(init, proc, dirs, "/" + name if own_cgroup("memory") == "/"
                                   else f"{own_cgroup('memory')}/{name}", tmp / "out",
                                   tmp / "scratch", tmp / "src", tmp / "bound",
                                   int((tmp / "sleeper").read_text()) if sleeper else None)
    finally:
        remove_cgroups(dirs)


@contextlib.contextmanager
def _init_of(argv: list[str], ready: Path, timeout: float):
    """Run `argv` (an unshare --fork --pid ...); yields (its namespace init's host pid, the
    Popen) once `ready` exists. Teardown: SIGKILL the init through a pidfd (its pid
    namespace goes with it), reap unshare."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    pidfd = None
    try:
        init = _child_of(proc.pid, 5.0)
        pidfd = os.pidfd_open(init)
        _wait_file(ready, proc, timeout)
        yield init, proc
    finally:
        if pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


# -- containers made of one unshare call (time, user namespaces) ------------------------------
@contextlib.contextmanager
def unshared(tmp: Path, flags: list[str], script: str, *, ready: str = "ready",
             timeout: float = 10.0):
    """`unshare --fork --pid --mount-proc <flags> sh -c script`; yields the init's host pid
    once the script has made <tmp>/<ready>. Teardown: SIGKILL the init through a pidfd (its
    pid namespace goes with it), reap unshare."""
    argv = ["unshare", "--fork", "--pid", "--mount-proc", *flags, "sh", "-c", script]
    with _init_of(argv, tmp / ready, timeout) as (init, _):
        yield init


CLOCK_LOOP_C = r"""
#include <stdio.h>
#include <time.h>
/* Every 20 ms (absolute CLOCK_MONOTONIC deadlines): "monotonic boottime" seconds, one line. */
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "a");
    struct timespec next, m, b;
    if (!f) return 1;
    setvbuf(f, NULL, _IOLBF, 0);
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &m);
        clock_gettime(CLOCK_BOOTTIME, &b);
        fprintf(f, "%ld.%09ld %ld.%09ld\n", (long)m.tv_sec, m.tv_nsec, (long)b.tv_sec, b.tv_nsec);
        next.tv_nsec += 20000000;
        if (next.tv_nsec >= 1000000000) { next.tv_sec++; next.tv_nsec -= 1000000000; }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}
"""


def build_clock_loop(out_dir: Path) -> Path:
    src, exe = out_dir / "clockloop.c", out_dir / "clockloop"
    src.write_text(CLOCK_LOOP_C)
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)
    return exe
