"""Container restore on Linux: a real `unshare` container is dumped, killed and restored.

The test container (helpers/container.py: pid, mount, uts, ipc and net namespaces, a v1 cgroup
with limits, a tmpfs and a bind mount, a counter loop as pid 1 and a background sleep) is
dumped once per module in its own pids (pid 1 and the sleep's pid inside), then killed.
Restoring it must bring back, as seen from inside (nsenter into the restored init): hostname
and domainname, the address and route, the cgroup limits, the mounts, the old pids, and a
counter that continues with no gap. Trees edited to ask for something impossible here are
refused naming the file and value, and leave no cgroup, namespace or process behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ckptfs import manifest, restore
from ckptfs.errors import CkptError
from ckptfs.isolation import cgroups
from ckptfs.isolation.pidns import ns_fields
from helpers import container as ctr

V1 = ("memory", "pids", "cpu", "cpuset", "blkio")


def dump_container(pid: int, out: Path) -> None:
    """`ckptfs dump --container --kill PID DIR`: the tree in the container's own pids."""
    r = subprocess.run([sys.executable, "-m", "ckptfs.cli", "dump", "--container", "--kill",
                        str(pid), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def edit(tree_dir: Path, rel: str, text: str) -> None:
    """Change one tree file and its manifest entry (as an operator's edit would)."""
    path = tree_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    mpath = tree_dir / "manifest"
    doc = json.loads(mpath.read_text())
    doc["files"][rel] = {"size": len(text.encode()), manifest.ALGO: manifest.checksum(text.encode())}
    os.chmod(mpath, 0o644)
    mpath.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """(tree dir, container record, last counter value before the dump)."""
    tmp = tmp_path_factory.mktemp("ct")
    with ctr.running_container(tmp, sleeper=True) as ct:
        _wait_lines(ct.out, 3)
        dump_container(ct.init_pid, tmp / "tree")
        last = int(ct.out.read_text().split()[-1])
    # Mounts other suites make and remove while the container lives stay in its copy and
    # look like its own (isolation/mounts.py): keep the test container's own lines.
    mounts = (tmp / "tree/isolation/mounts").read_text().splitlines()
    edit(tmp / "tree", "isolation/mounts", "".join(m + "\n" for m in mounts if str(tmp) in m))
    return tmp / "tree", ct, last


def _wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.02)
    raise TimeoutError(f"{path}: fewer than {n} lines")


@contextlib.contextmanager
def restored(tree_dir: Path):
    """Restore; afterwards kill the container's init (its pid namespace goes with it) and
    remove the cgroups the restore left to it."""
    result = restore.restore(tree_dir)
    pidfd = os.pidfd_open(result.init)
    try:
        yield result
    finally:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        cgroups.remove_dirs(result.cgroups)


def inside(init: int, argv: list[str]) -> str:
    ns = ["nsenter", "-t", str(init), "-m", "-u", "-i", "-n", "-p", "--"]
    return subprocess.run(ns + argv, capture_output=True, text=True, check=True).stdout


# -- the round trip ---------------------------------------------------------------------------
def test_dump_records_the_containers_own_pids(dumped):
    tree_dir, ct, _ = dumped
    tasks = sorted(int(p) for p in os.listdir(tree_dir / "tasks"))
    assert tasks[0] == 1 and ct.sleeper in tasks
    assert (tree_dir / "tasks/1/ppid").read_text() == "0\n"        # the parent was outside
    assert (tree_dir / f"tasks/{ct.sleeper}/ppid").read_text() == "1\n"
    assert json.loads((tree_dir / "manifest").read_text())["root"] == 1
    assert set((tree_dir / "isolation/own").read_text().split()) >= {"ipc", "mnt", "net", "pid", "uts"}


def test_restored_container_runs_in_its_isolation(dumped):
    tree_dir, ct, last = dumped
    with restored(tree_dir) as r:
        init = r.pids[1]
        assert r.init == init
        assert Path(f"/proc/{init}/status").read_text().split("NSpid:\t")[1].split("\n")[0] \
            .split()[-1] == "1"
        # names and network, from inside
        assert inside(init, ["hostname"]).strip() == ctr.HOSTNAME
        assert inside(init, ["cat", "/proc/sys/kernel/domainname"]).strip() == ctr.DOMAIN
        eth0 = json.loads(inside(init, ["ip", "-j", "addr", "show", "eth0"]))[0]
        assert [f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"]
                if a["family"] == "inet"] == [ctr.ADDR]
        assert "UP" in eth0["flags"]
        assert inside(init, ["ip", "route", "show", "default"]).split()[:3] == \
            ["default", "via", ctr.GATEWAY]
        # the old pids, in the container's own /proc
        assert inside(init, ["cat", "/proc/1/comm"]).strip() == "sh"
        assert inside(init, ["cat", f"/proc/{ct.sleeper}/cmdline"]).split("\0")[:2] == \
            ctr.SLEEPER_ARGV
        # cgroup limits, read from the cgroup files the restored init is in
        paths = dict(re.findall(r"^\d+:([\w,=]+):(\S+)$", inside(init, ["cat", "/proc/1/cgroup"]), re.M))
        mem = inside(init, ["cat", f"/sys/fs/cgroup/memory{paths['memory']}/memory.limit_in_bytes"])
        assert mem.strip() == ctr.LIMITS["memory.max"]
        assert inside(init, ["cat", f"/sys/fs/cgroup/pids{paths['pids']}/pids.max"]).strip() == \
            ctr.LIMITS["pids.max"]
        cpu = f"/sys/fs/cgroup/cpu{paths['cpu']}"
        assert inside(init, ["cat", f"{cpu}/cpu.cfs_quota_us", f"{cpu}/cpu.cfs_period_us"]).split() == \
            ctr.LIMITS["cpu.max"].split()
        assert all(os.path.isdir(d) for d in r.cgroups)
        # mounts: the tmpfs again (empty), the bind mount showing its source
        assert inside(init, ["findmnt", "-n", "-o", "FSTYPE", str(ct.scratch)]).strip() == "tmpfs"
        assert inside(init, ["cat", str(ct.bound / "hello")]) == "hi\n"
        # the workload goes on where it stopped
        lines = _wait_lines(ct.out, last + 10)
        assert lines == [str(i) for i in range(1, len(lines) + 1)]
    assert not any(os.path.exists(d) for d in r.cgroups)


# -- impossible here: refused, nothing left -------------------------------------------------
def _ours() -> set[int]:
    """Processes in this test's process group (helpers and restored tasks inherit it)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == os.getpgrp():
                out.add(int(entry))
    return out


def _no_new_procs(before: set[int], timeout: float = 3.0) -> bool:
    """No process of ours beyond `before` (killed tasks reparented to the host's init are
    zombies until it reaps them: give it a moment)."""
    deadline = time.monotonic() + timeout
    while not _ours() <= before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _restore_cgroups() -> set[str]:
    found = set()
    for ctrl in V1:
        d = os.path.join(ctr.CG_ROOT, ctrl, ctr.own_cgroup(ctrl).lstrip("/"))
        if os.path.isdir(d):
            found |= {os.path.join(d, n) for n in os.listdir(d) if n.startswith("ckptfs-restore-")}
    return found


@pytest.mark.parametrize("rel, text, value", [
    ("isolation/own", "ipc mnt net pid user uts\n", "'user'"),            # checked up front
    ("isolation/limits/pids.max", "lots\n", "'lots'"),                    # checked up front
    ("isolation/net/routes", "default via 10.9.0.1 dev eth9\n", "eth9"),   # checked up front
    ("isolation/limits/cpuset.cpus", "0-999\n", "'0-999'"),   # cgroups exist when it fails
    ("isolation/mounts", "tmpfs /nonexistent/dir tmpfs rw,size=1m\n", "/nonexistent/dir"),
    ("isolation/mounts", "/nonexistent/src /tmp none bind,rw\n", "/nonexistent/src"),
    ("isolation/mounts", "x /tmp nosuchfs rw\n", "nosuchfs"),     # namespaces exist by then
    ("isolation/tmpfs/1/index", "x 0644 0 0 sub/data\n", "'x 0644 0 0 sub/data'"),  # up front
    ("isolation/tmpfs/1/target", "/elsewhere\n", "'/elsewhere'"),                     # up front
    ("isolation/tmpfs/1/index", "d 0755 0 0 .\nf 0644 0 0 nothere\n", "missing"),    # up front
    ("isolation/time/monotonic", "1 2 3\n", "'1 2 3'"),          # checked up front
])
def test_impossible_isolation_is_refused_and_leaves_nothing(dumped, tmp_path, rel, text, value):
    tree_dir = tmp_path / "tree"
    shutil.copytree(dumped[0], tree_dir)
    if rel == "isolation/mounts":    # one more line after the recorded ones
        text = (tree_dir / rel).read_text() + text
    edit(tree_dir, rel, text)
    before_procs, before_cgroups = _ours(), _restore_cgroups()
    with pytest.raises(CkptError) as e:
        restore.restore(tree_dir)
    named = f"{tree_dir}/isolation/tmpfs/1/files/nothere" if "nothere" in text else f"{tree_dir}/{rel}"
    assert named in str(e.value) and value in str(e.value)
    assert _restore_cgroups() == before_cgroups
    assert _no_new_procs(before_procs)
    problems = restore.restore(tree_dir, dry_run=True).problems
    assert any((f"{tree_dir}/{rel}" in p or "nothere" in p) and value in p for p in problems) or \
        "0-999" in text or "nosuchfs" in text     # only the kernel can tell


def test_failure_among_the_tasks_removes_the_container(dumped, tmp_path):
    """The container exists, then its pids.max refuses the second task: all of it goes."""
    tree_dir = tmp_path / "tree"
    shutil.copytree(dumped[0], tree_dir)
    edit(tree_dir, "isolation/limits/pids.max", "1\n")
    before_procs, before_cgroups = _ours(), _restore_cgroups()
    with pytest.raises(CkptError) as e:
        restore.restore(tree_dir)
    assert "EAGAIN" in str(e.value) and f"{tree_dir}/tasks/1" in str(e.value)
    assert f"{tree_dir}/isolation/limits/pids.max is 1" in str(e.value)
    assert _restore_cgroups() == before_cgroups
    assert _no_new_procs(before_procs)


def test_plain_restore_of_a_container_tree_is_refused_with_same_pids(dumped):
    problems = restore.restore(dumped[0], dry_run=True, same_pids=True).problems
    assert any(f"{dumped[0]}/isolation/own" in p and "'pid'" in p for p in problems)


def test_container_without_its_own_pid_namespace(procs, tmp_path):
    """uts + net of its own, pids shared with the host: restored into new uts and net
    namespaces under new pids, still its own session leader."""
    out = tmp_path / "out"
    loop = f"i=0; while :; do i=$((i+1)); echo $i >> {out}; sleep 0.02; done"
    p = procs.spawn(["unshare", "--uts", "--net", "sh", "-c",
                     f"hostname part-{os.getpid()} && ip link set lo up && {loop}"])
    _wait_lines(out, 3)
    dump_container(p.pid, tmp_path / "tree")
    last = len(out.read_text().split())
    assert (tmp_path / "tree/isolation/own").read_text().split() == ["net", "uts"]
    r = restore.restore(tmp_path / "tree")
    try:
        new = r.pids[p.pid]
        procs.adopt(new)
        assert new != p.pid and os.getsid(new) == new
        assert inside_some(new, ["-u", "-n"], ["hostname"]).strip() == f"part-{os.getpid()}"
        lo = json.loads(inside_some(new, ["-u", "-n"], ["ip", "-j", "link", "show", "lo"]))[0]
        assert "UP" in lo["flags"]
        assert os.readlink(f"/proc/{new}/ns/net") != os.readlink("/proc/self/ns/net")
        lines = _wait_lines(out, last + 5)
        assert lines == [str(i) for i in range(1, len(lines) + 1)]
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(r.pids[p.pid], signal.SIGKILL)
        cgroups.remove_dirs(r.cgroups)


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7077))
s.listen(4)
open(sys.argv[1], "w").write("ready")
while True:
    c, _ = s.accept()
    c.sendall(b"still here")
    c.close()
"""
ASK = ("import socket; c = socket.create_connection(('127.0.0.1', 7077), timeout=5); "
       "print(c.recv(64).decode())")


def test_listener_comes_back_in_the_containers_network_namespace(procs, tmp_path):
    """A socket belongs to the network namespace it is made in: a container's listener must be
    made in the container's new one (not the restorer's), where its clients are."""
    ready = tmp_path / "ready"
    p = procs.spawn(["unshare", "--net", "sh", "-c",
                     f"ip link set lo up && exec {sys.executable} -c '{SERVER}' {ready}"])
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert inside_some(p.pid, ["-n"], [sys.executable, "-c", ASK]).strip() == "still here"
    dump_container(p.pid, tmp_path / "tree")
    r = restore.restore(tmp_path / "tree")
    try:
        new = r.pids[p.pid]
        procs.adopt(new)
        assert inside_some(new, ["-n"], [sys.executable, "-c", ASK]).strip() == "still here"
        host = subprocess.run([sys.executable, "-c", ASK], capture_output=True, text=True)
        assert host.returncode != 0, "the listener was made in the restorer's namespace"
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(r.pids[p.pid], signal.SIGKILL)
        cgroups.remove_dirs(r.cgroups)


def inside_some(pid: int, flags: list[str], argv: list[str]) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), *flags, "--", *argv], capture_output=True,
                          text=True, check=True).stdout


def _host_pid(init: int, ns_pid: int) -> int:
    """Host pid of the child of `init` that is `ns_pid` inside."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, CkptError):
                if f"\nPPid:\t{init}\n" in Path(f"/proc/{entry}/status").read_text() and \
                        ns_fields(int(entry))["NSpid"][-1] == ns_pid:
                    return int(entry)
    raise LookupError(ns_pid)


def test_container_task_that_was_not_its_init(tmp_path):
    """A dump of one task inside a container (not pid 1): restored under a reaper init as
    pid 1, with its own pid, in the container's namespaces."""
    with ctr.running_container(tmp_path, sleeper=True) as ct:
        dump_container(_host_pid(ct.init_pid, ct.sleeper), tmp_path / "tree")
    mounts = (tmp_path / "tree/isolation/mounts").read_text().splitlines()
    edit(tmp_path / "tree", "isolation/mounts", "".join(m + "\n" for m in mounts if str(tmp_path) in m))
    assert json.loads((tmp_path / "tree/manifest").read_text())["root"] == ct.sleeper
    with restored(tmp_path / "tree") as r:
        assert r.init not in r.pids.values()
        assert inside(r.pids[ct.sleeper], ["cat", "/proc/1/comm"]).strip() == "ckptfs-init"
        assert inside(r.init, ["cat", f"/proc/{ct.sleeper}/cmdline"]).split("\0")[:2] == \
            ctr.SLEEPER_ARGV
        assert inside(r.init, ["hostname"]).strip() == ctr.HOSTNAME
    assert _ended(r.init)


def _ended(pid: int, timeout: float = 5.0) -> bool:
    """Gone, or a zombie for whoever reaps it now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.01)
    return False


def test_mount_container_shows_its_own_pids(tmp_path, tmp_mount):
    with ctr.running_container(tmp_path, sleeper=True) as ct:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        m = os.fspath(tmp_mount([sys.executable, "-m", "ckptfs.cli", "mount", "-f", "--container",
                                 str(ct.init_pid), str(mnt)], mnt))
        assert "1" in os.listdir(f"{m}/tasks")
        assert (Path(m) / "tasks" / "1" / "ppid").read_text() == "0\n"
        own = (Path(m) / "isolation" / "own").read_text().split()
        assert {"pid", "uts", "net", "mnt", "ipc"} <= set(own)
        assert any(t.read_text() == f"{ct.scratch}\n" and (t.parent / "files/sub/data")
                   .read_text() == ctr.TMPFS_DATA for t in Path(m).glob("isolation/tmpfs/*/target"))


# -- time namespace ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clock_loop(tmp_path_factory):
    return ctr.build_clock_loop(tmp_path_factory.mktemp("clock"))


def _clock_lines(path: Path) -> list[tuple[float, float]]:
    return [tuple(float(x) for x in line.split()) for line in path.read_text().splitlines()
            if len(line.split()) == 2]


def _wait_clock_lines(path: Path, n: int, timeout: float = 5.0) -> list[tuple[float, float]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _clock_lines(path) if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.02)
    raise TimeoutError(f"{path}: fewer than {n} lines")


DOWNTIME = 2.0     # seconds between the dump and the restore


def test_time_namespace_clocks_continue(clock_loop, tmp_path):
    """unshare --time with offsets 100000 / 50000: the tree records the container's clocks;
    restored, CLOCK_MONOTONIC and CLOCK_BOOTTIME go on from where they were (no jump back,
    and the downtime does not pass for it), and absolute monotonic deadlines keep firing."""
    out = tmp_path / "clock"
    script = f"touch {tmp_path}/ready; exec {clock_loop} {out}"
    with ctr.unshared(tmp_path, ["--time", "--monotonic", "100000", "--boottime", "50000"],
                      script) as init:
        _wait_clock_lines(out, 5)
        dump_container(init, tmp_path / "tree")
    before = _clock_lines(out)
    tree = tmp_path / "tree"
    assert set((tree / "isolation/own").read_text().split()) >= {"pid", "mnt", "time"}
    mono, boot = ((tree / f"isolation/time/{c}").read_text().split() for c in ("monotonic", "boottime"))
    assert float(mono[0]) >= 100000 and float(boot[0]) >= 50000
    assert float(mono[0]) + 1 >= before[-1][0]     # taken after the last value the task saw
    time.sleep(DOWNTIME)
    with restored(tree) as r:
        after = _wait_clock_lines(out, len(before) + 10)[len(before):]
        assert os.readlink(f"/proc/{r.init}/ns/time") != os.readlink("/proc/self/ns/time")
    for clock in (0, 1):
        values = [line[clock] for line in before + after]
        assert values == sorted(values)               # never backwards
        assert after[0][clock] - before[-1][clock] < DOWNTIME   # the downtime did not pass
    assert after[0][0] >= 100000 and after[0][1] >= 50000
    # a clock this kernel cannot offset to: refused naming the file, nothing left
    bad = tmp_path / "bad"
    shutil.copytree(tree, bad)
    edit(bad, "isolation/time/monotonic", "9999999999 0\n")
    before_procs, before_cgroups = _ours(), _restore_cgroups()
    with pytest.raises(CkptError) as e:
        restore.restore(bad)
    assert f"{bad}/isolation/time/monotonic" in str(e.value) and "9999999999" in str(e.value)
    assert "ERANGE" in str(e.value) or "range" in str(e.value)
    assert _restore_cgroups() == before_cgroups
    assert _no_new_procs(before_procs)


# -- tmpfs contents ------------------------------------------------------------------------------
def test_tmpfs_contents_are_in_the_tree(dumped):
    tree_dir, ct, _ = dumped
    d = tree_dir / "isolation/tmpfs/1"
    assert (d / "target").read_text() == f"{ct.scratch}\n"
    index = (d / "index").read_text().splitlines()
    uid, gid = ctr.TMPFS_OWNER.split(":")
    assert "d 0750 0 0 sub" in index and f"f 0640 {uid} {gid} sub/data" in index
    assert "l 0777 0 0 link sub/data" in index and "p 0600 0 0 fifo" in index
    assert (d / "files/sub/data").read_text() == ctr.TMPFS_DATA
    assert "isolation/tmpfs/1/files/sub/data" in json.loads((tree_dir / "manifest").read_text())["files"]


def test_restored_tmpfs_holds_its_files_and_the_open_one(dumped):
    """The tmpfs comes back with its files, owners, modes, link and fifo; the init's fd 3 is
    that file again, at the same offset, in the container's own tmpfs."""
    tree_dir, ct, _ = dumped
    s = ct.scratch
    with restored(tree_dir) as r:
        init = r.pids[1]
        assert inside(init, ["cat", f"{s}/sub/data"]) == ctr.TMPFS_DATA
        assert inside(init, ["stat", "-c", "%a %u:%g %F", f"{s}/sub/data", f"{s}/sub", f"{s}/fifo"]
                      ).splitlines() == [f"640 {ctr.TMPFS_OWNER} regular file", "750 0:0 directory",
                                         "600 0:0 fifo"]
        assert inside(init, ["readlink", f"{s}/link"]).strip() == "sub/data"
        assert os.readlink(f"/proc/{init}/fd/3") == f"{s}/sub/data"
        assert f"pos:\t{ctr.TMPFS_OFFSET}\n" in Path(f"/proc/{init}/fdinfo/3").read_text()
        # it is the container's tmpfs file: a write through the container shows in the fd
        inside(init, ["sh", "-c", f"echo more >> {s}/sub/data"])
        with open(f"/proc/{init}/fd/3") as f:
            assert f.read() == ctr.TMPFS_DATA + "more\n"
        assert not os.path.exists(f"{s}/sub")          # nothing was made on the host


def test_tmpfs_fill_refused_by_the_kernel_leaves_nothing(dumped, tmp_path):
    """A tmpfs with room for fewer files than recorded: the namespace init fails filling it;
    the error names the tree file and errno, and nothing of the container is left."""
    tree_dir = tmp_path / "tree"
    shutil.copytree(dumped[0], tree_dir)
    lines = (tree_dir / "isolation/mounts").read_text().splitlines()
    edit(tree_dir, "isolation/mounts", "".join(
        (line + ",nr_inodes=3" if " tmpfs " in line else line) + "\n" for line in lines))
    before_procs, before_cgroups = _ours(), _restore_cgroups()
    with pytest.raises(CkptError) as e:
        restore.restore(tree_dir)
    assert "ENOSPC" in str(e.value) and f"{tree_dir}/isolation/tmpfs/1/" in str(e.value)
    assert _restore_cgroups() == before_cgroups
    assert _no_new_procs(before_procs)


def test_tmpfs_above_the_limit_is_refused_at_dump(tmp_path):
    """Dumping a container whose tmpfs holds more than CKPTFS_TMPFS_LIMIT bytes fails naming
    the file, and the container goes on running."""
    with ctr.running_container(tmp_path) as ct:
        env = {**os.environ, "CKPTFS_TMPFS_LIMIT": "10"}
        r = subprocess.run([sys.executable, "-m", "ckptfs.cli", "dump", "--container", "--kill",
                            str(ct.init_pid), str(tmp_path / "tree")], capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode != 0
        assert "CKPTFS_TMPFS_LIMIT" in r.stderr and f"/proc/{ct.init_pid}/root{ct.scratch}/sub/data" in r.stderr
        n = len(ct.out.read_text().split())
        assert len(_wait_lines(ct.out, n + 3)) > n            # still counting


# -- user namespace ----------------------------------------------------------------------------
NS_GET_USERNS = 0xB701


def _owner(pid: int, kind: str) -> str:
    """The user namespace owning one of the task's namespaces, as `user:[inode]`."""
    import fcntl
    fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY)
    try:
        user = fcntl.ioctl(fd, NS_GET_USERNS)
        try:
            return f"user:[{os.fstat(user).st_ino}]"
        finally:
            os.close(user)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def userns_tree(tmp_path_factory):
    """A container made by `unshare --user --map-root-user` (+ pid, mnt, uts, net, time),
    dumped."""
    tmp = tmp_path_factory.mktemp("userns")
    out = tmp / "out"
    loop = f"i=0; while :; do i=$((i+1)); echo $i >> {out}; sleep 0.02; done"
    script = f"hostname uct && ip link set lo up && touch {tmp}/ready && {loop}"
    flags = ["--user", "--map-root-user", "--uts", "--net", "--time", "--boottime", "7000"]
    with ctr.unshared(tmp, flags, script) as init:
        _wait_lines(out, 3)
        dump_container(init, tmp / "tree")
    return tmp / "tree", out


def test_user_namespace_round_trip(userns_tree):
    tree, out = userns_tree
    assert set((tree / "isolation/own").read_text().split()) >= {"user", "pid", "mnt", "uts", "net",
                                                                "time"}
    assert int((tree / "isolation/time/boottime").read_text().split()[0]) >= 7000
    assert (tree / "isolation/user/uid_map").read_text() == "0 0 1\n"
    assert (tree / "isolation/user/setgroups").read_text() == "deny\n"
    last = len(out.read_text().split())
    with restored(tree) as r:
        init = r.pids[1]
        user = os.readlink(f"/proc/{init}/ns/user")
        assert user != os.readlink("/proc/self/ns/user")
        assert Path(f"/proc/{init}/uid_map").read_text().split() == ["0", "0", "1"]
        assert Path(f"/proc/{init}/setgroups").read_text() == "deny\n"
        for kind in ("pid", "mnt", "uts", "net", "time"):     # made after it: its own
            assert _owner(init, kind) == user, kind
        ns = ["nsenter", "-t", str(init), "-U", "-m", "-u", "-n", "-p", "--preserve-credentials", "--"]
        assert subprocess.run(ns + ["hostname"], capture_output=True, text=True,
                              check=True).stdout.strip() == "uct"
        assert subprocess.run(ns + ["cat", "/proc/1/comm"], capture_output=True, text=True,
                              check=True).stdout.strip() == "sh"
        uptime = float(subprocess.run(["nsenter", "-t", str(init), "-T", "cat", "/proc/uptime"],
                                      capture_output=True, text=True, check=True).stdout.split()[0])
        assert uptime >= 7000
        lines = _wait_lines(out, last + 5)
        assert lines == [str(i) for i in range(1, len(lines) + 1)]


@pytest.mark.parametrize("rel, text, value", [
    ("isolation/user/uid_map", "0 0 1\n0 7 1\n", "overlap"),                  # up front
    ("isolation/user/setgroups", "sometimes\n", "'sometimes'"),               # up front
    ("isolation/user/uid_map", "0 1000 1\n", "id 0 is not mapped to itself"),  # up front
    ("tasks/1/creds/groups", "0\n", "setgroups is deny"),     # the namespaces exist by then
])
def test_impossible_user_namespace_is_refused_and_leaves_nothing(userns_tree, tmp_path, rel,
                                                                 text, value):
    tree_dir = tmp_path / "tree"
    shutil.copytree(userns_tree[0], tree_dir)
    edit(tree_dir, rel, text)
    before_procs, before_cgroups = _ours(), _restore_cgroups()
    with pytest.raises(CkptError) as e:
        restore.restore(tree_dir)
    named = {"tasks/1/creds/groups": f"{tree_dir}/tasks/1/threads/1/creds/groups",
             "isolation/user/uid_map": f"{tree_dir}/tasks/1/creds"}.get(rel, f"{tree_dir}/{rel}")
    if "overlap" in value:
        named = f"{tree_dir}/{rel}"
    assert named in str(e.value) and value in str(e.value)
    assert _restore_cgroups() == before_cgroups
    assert _no_new_procs(before_procs)
