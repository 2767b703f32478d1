"""Container isolation on Linux: capture from a real `unshare` container, re-create, clean up.

Real namespaces, real v1 cgroups, real interfaces; the translation tables (v1 <-> v2, tree
files, mountinfo) are also checked on their own with known inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from ckptfs.errors import BadTree, Unsupported
from ckptfs.isolation import (ContainerIsolation, Link, Mount, NetConfig, parse_extra,
                              render_extra, render_mount)
from ckptfs.isolation import cgroups, mounts, net
from ckptfs.isolation.capture import capture_isolation
from ckptfs.isolation.create import Container
from helpers import container as ctr

OWN = ("ipc", "mnt", "net", "pid", "uts")


@pytest.fixture
def ct(tmp_path):
    with ctr.running_container(tmp_path) as c:
        yield c


def _under(mnts, root: Path):
    return [render_mount(m) for m in mnts if m.target.startswith(str(root))]


def _captured(ct, tmp_path: Path) -> ContainerIsolation:
    """The test container's isolation, mounts limited to its own under tmp_path.

    A host mount that goes away after the container was made (other suites mount and unmount
    FUSE trees concurrently) stays in the container's copy and looks like one of its own: the
    mountinfo diff cannot tell (see mounts.py). Re-creating such a mount would fail."""
    iso = capture_isolation(ct.init_pid)
    iso.mounts = [m for m in iso.mounts if m.target.startswith(str(tmp_path))]
    return iso


def _inside(c: Container, argv: list[str]) -> str:
    return subprocess.run(c.nsenter(argv), capture_output=True, text=True, check=True).stdout


def _ns_in_use(inode: int) -> list[int]:
    """Pids whose net namespace is `inode`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == f"net:[{inode}]":
                    out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return out


def _cgroup_dirs(name: str) -> list[str]:
    found = []
    for ctrl in ("memory", "pids", "cpu", "cpuset", "blkio"):
        d = os.path.join("/sys/fs/cgroup", ctrl, ctr.own_cgroup(ctrl).lstrip("/"), name)
        if os.path.exists(d):
            found.append(d)
    return found


def _wait_lines(path: Path, n: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.02)
    raise TimeoutError(f"{path}: fewer than {n} lines")


# -- capture of a real container ---------------------------------------------------------
def test_capture_real_container(ct, tmp_path):
    iso = capture_isolation(ct.init_pid)
    assert set(OWN) <= set(iso.own_namespaces) and "user" not in iso.own_namespaces
    assert iso.namespaces["net"] == int(os.readlink(f"/proc/{ct.init_pid}/ns/net")[5:-1])
    assert (iso.hostname, iso.domainname) == (ctr.HOSTNAME, ctr.DOMAIN)
    links = {link.name: link for link in iso.net.links}
    assert links["eth0"].addrs == (ctr.ADDR,) and links["eth0"].up
    assert links["lo"].kind == "loopback" and links["lo"].addrs == ()
    assert iso.net.routes == [f"default via {ctr.GATEWAY} dev eth0"]
    assert _under(iso.mounts, tmp_path) == [
        f"tmpfs {ct.scratch} tmpfs rw,nosuid,relatime,size=1024k",
        f"{ct.src} {ct.bound} none bind,rw,relatime"]
    assert iso.cgroup == ct.cgroup_path
    for name, value in ctr.LIMITS.items():
        assert iso.limits[name] == value, name
    assert iso.limits["memory.swap.max"] == "max"


def test_capture_plain_process_has_no_own_namespaces(procs):
    p = procs.spawn(["sleep", "30"])
    iso = capture_isolation(p.pid)
    assert iso.own_namespaces == () and iso.net is None and iso.mounts is None
    assert iso.hostname == Path("/proc/sys/kernel/hostname").read_text().strip()


# -- create -> capture round trip ---------------------------------------------------------
def test_create_round_trip(ct, tmp_path):
    iso = _captured(ct, tmp_path)
    out = tmp_path / "out2"
    loop = f"i=0; while :; do i=$((i+1)); echo $i >> {out}; sleep 0.02; done"
    with Container.create(iso, ["sh", "-c", loop]) as c:
        again = capture_isolation(c.init_pid)
        assert set(again.own_namespaces) == set(iso.own_namespaces)
        assert (again.hostname, again.domainname) == (iso.hostname, iso.domainname)
        assert again.limits == iso.limits
        assert again.net.routes == iso.net.routes
        assert {link.name: link for link in again.net.links} == \
            {link.name: link for link in iso.net.links}
        assert _under(again.mounts, tmp_path) == _under(iso.mounts, tmp_path)
        # seen from inside the container
        assert _inside(c, ["hostname"]).strip() == ctr.HOSTNAME
        addrs = json.loads(_inside(c, ["ip", "-j", "addr", "show", "eth0"]))
        assert [f"{a['local']}/{a['prefixlen']}" for a in addrs[0]["addr_info"]
                if a["family"] == "inet"] == [ctr.ADDR]
        assert _inside(c, ["sh", "-c", "echo $$; cat /proc/1/cgroup"]).split()[0] != "1"
        mem = _inside(c, ["sh", "-c", "d=$(sed -n 's/^[0-9]*:memory://p' /proc/1/cgroup); "
                                      "cat /sys/fs/cgroup/memory$d/memory.limit_in_bytes"])
        assert mem.strip() == ctr.LIMITS["memory.max"]
        assert _inside(c, ["cat", "/proc/1/status"]).count("NSpid:\t") == 1
        assert _wait_lines(out, 3)[:3] == ["1", "2", "3"]      # the workload runs
        assert c.cgroups.pids() >= {c.init_pid}


def test_cleanup_leaves_nothing(ct, tmp_path):
    iso = _captured(ct, tmp_path)
    c = Container.start(iso, ["sleep", "60"], name="ckptfs-cleanup-test")
    try:
        dirs, inode = list(c.cgroups.dirs), int(os.readlink(f"/proc/{c.init_pid}/ns/net")[5:-1])
        init = c.init_pid
        assert dirs and set(_ns_in_use(inode)) == {init, c.popen.pid}   # the outer shares it
    finally:
        c.cleanup()
    assert not any(os.path.exists(d) for d in dirs)
    assert _ns_in_use(inode) == [] and not os.path.exists(f"/proc/{init}")
    assert c.popen.returncode is not None


# -- failures: nothing half-created ---------------------------------------------------------
def _iso(**kw) -> ContainerIsolation:
    base = dict(hostname="x", domainname="(none)", own_namespaces=OWN,
                limits={"memory.max": str(32 << 20), "pids.max": "20"},
                net=NetConfig(links=[Link("lo")]), mounts=[])
    base.update(kw)
    return ContainerIsolation(**base)


def test_kernel_refused_limit_cleans_up():
    # memory and pids cgroups exist by the time cpuset refuses CPUs this machine lacks
    iso = _iso(limits={"memory.max": str(32 << 20), "pids.max": "20", "cpuset.cpus": "0-999"})
    with pytest.raises(Unsupported) as e:
        Container.start(iso, ["true"], name="ckptfs-midway-test")
    assert e.value.path == "isolation/limits/cpuset.cpus" and "0-999" in str(e.value)
    assert _cgroup_dirs("ckptfs-midway-test") == []


def test_failure_inside_namespace_init_cleans_up(tmp_path):
    iso = _iso(mounts=[Mount("tmpfs", str(tmp_path / "absent"), "tmpfs", "rw,size=1m")])
    with pytest.raises(Unsupported) as e:
        Container.start(iso, ["true"], name="ckptfs-initfail-test")
    assert e.value.path == "isolation/mounts" and "absent" in str(e.value)
    assert _cgroup_dirs("ckptfs-initfail-test") == []


@pytest.mark.parametrize("change, path, value", [
    ({"limits": {"memory.max": "lots"}}, "isolation/limits/memory.max", "lots"),
    ({"limits": {"cpu.max": "50000 x"}}, "isolation/limits/cpu.max", "50000 x"),
    ({"limits": {"memory.high": "5"}}, "isolation/limits/memory.high", "memory.high"),
    ({"own_namespaces": ("pid", "user")}, "isolation/own", "user"),
    ({"net": NetConfig(links=[Link("lo")], routes=["default via 10.0.0.1 dev eth9"])},
     "isolation/net/routes", "eth9"),
    ({"net": NetConfig(links=[Link("e0", "veth", addrs=("10.0.0.300/24",))])},
     "isolation/net/links/e0/addrs", "10.0.0.300/24"),
    ({"own_namespaces": ("pid",)}, "isolation/net", "net"),
])
def test_bad_values_refused_before_anything_exists(change, path, value):
    with pytest.raises((BadTree, Unsupported)) as e:
        Container.start(_iso(**change), ["true"], name="ckptfs-bad-test")
    assert e.value.path == path and value in str(e.value)
    assert _cgroup_dirs("ckptfs-bad-test") == []


def test_swap_limit_without_memory_limit_is_unsupported_on_v1():
    with pytest.raises(Unsupported) as e:
        cgroups.v1_writes({"memory.max": "max", "memory.swap.max": "1048576"})
    assert e.value.path == "isolation/limits/memory.swap.max"


# -- translation tables -----------------------------------------------------------------------
def _reader(files: dict[str, str]):
    return files.get


def test_v1_to_v2_vocabulary():
    assert cgroups.v1_memory(_reader({"memory.limit_in_bytes": "9223372036854771712",
                                      "memory.memsw.limit_in_bytes": "9223372036854771712"})) == \
        {"memory.max": "max", "memory.swap.max": "max"}
    assert cgroups.v1_memory(_reader({"memory.limit_in_bytes": "1048576",
                                      "memory.memsw.limit_in_bytes": "3145728"})) == \
        {"memory.max": "1048576", "memory.swap.max": "2097152"}
    assert cgroups.v1_cpu(_reader({"cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000"})) == \
        {"cpu.max": "max 100000"}
    assert cgroups.v1_cpu(_reader({"cpu.cfs_quota_us": "25000", "cpu.cfs_period_us": "50000"})) == \
        {"cpu.max": "25000 50000"}
    io = cgroups.v1_blkio(_reader({"blkio.throttle.read_bps_device": "254:0 1048576\n8:0 5",
                                   "blkio.throttle.write_iops_device": "254:0 100"}))
    assert io == {"io.max": "8:0 rbps=5 wbps=max riops=max wiops=max\n"
                            "254:0 rbps=1048576 wbps=max riops=max wiops=100"}
    assert cgroups.v1_blkio(_reader({})) == {}


def test_v2_to_v1_writes_in_kernel_order():
    limits = {"memory.max": "1048576", "memory.swap.max": "2097152", "pids.max": "max",
              "cpu.max": "25000 50000", "io.max": "254:0 rbps=1048576 wbps=max riops=max wiops=100"}
    assert [w[:3] for w in cgroups.v1_writes(limits)] == [
        ("memory", "memory.limit_in_bytes", "1048576"),
        ("memory", "memory.memsw.limit_in_bytes", "3145728"),
        ("cpu", "cpu.cfs_period_us", "50000"), ("cpu", "cpu.cfs_quota_us", "25000"),
        ("blkio", "blkio.throttle.read_bps_device", "254:0 1048576"),
        ("blkio", "blkio.throttle.write_iops_device", "254:0 100")]
    assert [w[1:3] for w in cgroups.v2_writes(limits)] == [
        ("memory.max", "1048576"), ("memory.swap.max", "2097152"), ("cpu.max", "25000 50000"),
        ("io.max", "254:0 rbps=1048576 wbps=max riops=max wiops=100")]


def test_own_mounts_and_bind_sources():
    host = mounts.parse_mountinfo(
        "22 27 0:21 / /proc rw - proc proc rw\n"
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 27 254:0 /srv /data rw - ext4 /dev/vda rw\n")
    inside = mounts.parse_mountinfo(
        "40 39 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "41 40 254:0 /srv /data rw - ext4 /dev/vda rw\n"
        "42 40 0:50 / /proc rw - proc proc rw\n"
        "43 40 0:51 / /run/my\\040dir rw,nosuid - tmpfs tmpfs rw,size=1024k,mode=755\n"
        "44 40 0:51 /sub /opt/sub ro,nosuid - tmpfs tmpfs rw,size=1024k\n"
        "45 40 254:0 /srv/x/y /y rw - ext4 /dev/vda rw\n")
    own = mounts.own_mounts(inside, host)
    assert [m.mount_id for m in own] == [43, 44, 45]
    fstab = mounts.to_fstab(own, host)
    assert [render_mount(m) for m in fstab] == [
        "tmpfs /run/my\\040dir tmpfs rw,nosuid,size=1024k,mode=755",
        "/run/my\\040dir/sub /opt/sub none bind,ro,nosuid",
        "/data/x/y /y none bind,rw"]
    assert mounts.mount_argvs(fstab[1]) == [
        ["mount", "--bind", "/run/my dir/sub", "/opt/sub"],
        ["mount", "-o", "remount,bind,ro,nosuid", "/opt/sub"]]


def test_net_json_to_records():
    entry = {"ifname": "eth0", "link": "eth0p", "flags": ["BROADCAST", "UP"], "mtu": 1400,
             "address": "02:00:00:00:00:01", "linkinfo": {"info_kind": "veth"},
             "addr_info": [{"family": "inet", "local": "10.1.0.2", "prefixlen": 24},
                           {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
                           {"family": "inet6", "local": "fd00::2", "prefixlen": 64}]}
    assert net.link_from_json(entry) == Link("eth0", "veth", "02:00:00:00:00:01", 1400, True,
                                             ("10.1.0.2/24", "fd00::2/64"), "eth0p")
    hostside = dict(entry, link_netnsid=0)
    assert net.link_from_json(hostside).peer is None
    assert net.route_from_json({"dst": "10.9.0.0/24", "dev": "eth0", "protocol": "kernel"}) is None
    assert net.route_from_json({"dst": "10.7.0.0/16", "gateway": "10.1.0.1", "dev": "eth0",
                                "metric": 5}) == "10.7.0.0/16 via 10.1.0.1 dev eth0 metric 5"


def test_tree_files_round_trip():
    iso = _iso(net=NetConfig(links=[Link("eth0", "veth", "02:00:00:00:00:01", 1400, False,
                                                     ("10.1.0.2/24",), "eth0p"), Link("lo")],
                             routes=["default via 10.1.0.1 dev eth0"]),
               mounts=[Mount("tmpfs", "/a b", "tmpfs", "rw,size=1m")])
    files = render_extra(iso)
    assert files["net/links/eth0/state"] == "down\n" and files["mounts"] == "tmpfs /a\\040b tmpfs rw,size=1m\n"
    listing = lambda d: sorted({p[len(d) + 1:].split("/")[0] for p in files if p.startswith(d + "/")})  # noqa: E731
    got_net, got_mounts = parse_extra(files.get, listing)
    assert got_net == iso.net and got_mounts == iso.mounts
    assert parse_extra({}.get, lambda d: []) == (None, None)
    with pytest.raises(BadTree) as e:
        parse_extra({**files, "net/links/eth0/mtu": "big\n"}.get, listing)
    assert e.value.path == "isolation/net/links/eth0/mtu"


# -- what the restorer builds on ----------------------------------------------------------------
def test_pids_are_chosen_inside_new_pid_namespace(tmp_path):
    """The program is pid 1 of a pid namespace whose /proc is its own: ns_last_pid works."""
    out = tmp_path / "pids"
    script = f"echo $$ > {out}; echo 4241 > /proc/sys/kernel/ns_last_pid; sh -c 'echo $$ >> {out}'"
    with Container.create(_iso(limits={}), ["sh", "-c", script + "; sleep 30"]) as c:
        assert _wait_lines(out, 2) == ["1", "4242"]
        assert c.init_pid != c.popen.pid and c.cgroups is None


@pytest.mark.parametrize("own", [("net", "uts"), ("time", "uts", "cgroup")])
def test_partial_namespace_sets(own, tmp_path):
    ready = tmp_path / "ready"
    iso = ContainerIsolation(hostname="part", own_namespaces=own, limits={"pids.max": "10"})
    with Container.create(iso, ["sh", "-c", f"hostname > {ready}; exec sleep 30"]) as c:
        assert _wait_lines(ready, 1) == ["part"]
        assert (c.init_pid == c.popen.pid) == ("time" not in own)   # time applies to children
        # compared with ckptfs's own namespaces (as CRIU does), not with the forking parent's
        assert set(capture_isolation(c.init_pid).own_namespaces) == set(own)
        again = capture_isolation(c.init_pid, container=True)
        assert set(again.own_namespaces) == set(own)
        assert again.limits["pids.max"] == "10"
        if "cgroup" in own:    # the cgroup namespace's root is the container's cgroup
            assert _inside(c, ["cat", "/proc/self/cgroup"]).count(":/\n") >= 1
    assert not os.path.exists(f"/proc/{c.init_pid}/ns")


def test_exec_failure_is_reported_and_cleaned_up():
    with pytest.raises(Exception) as e:
        Container.start(_iso(), ["/nonexistent/helper"], name="ckptfs-execfail-test")
    assert "/nonexistent/helper" in str(e.value) and e.value.errno == 2
    assert _cgroup_dirs("ckptfs-execfail-test") == []


def test_cleanup_after_the_program_ended_by_itself():
    c = Container.start(_iso(), ["true"], name="ckptfs-ended-test")
    try:
        assert c.popen.wait(timeout=10) == 0      # outer relays the init's exit status
    finally:
        c.cleanup()
    assert _cgroup_dirs("ckptfs-ended-test") == []


def test_time_namespace_offsets(tmp_path):
    out = tmp_path / "uptime"
    iso = ContainerIsolation(own_namespaces=("time",), limits={})
    with Container.create(iso, ["sh", "-c", f"cut -d. -f1 /proc/uptime > {out}; sleep 30"],
                          time_offsets={"boottime": (86400, 0)}) as c:
        ours = float(Path("/proc/uptime").read_text().split()[0])
        assert abs(int(_wait_lines(out, 1)[0]) - (ours + 86400)) < 5
        assert "boottime" in Path(f"/proc/{c.init_pid}/timens_offsets").read_text()


def test_without_leaves_a_kind_to_the_caller(tmp_path):
    out = tmp_path / "pid"
    iso = _iso(limits={})
    with Container.create(iso, ["sh", "-c", f"echo $$ > {out}; sleep 30"], without=("pid",)) as c:
        assert c.init_pid == c.popen.pid and int(_wait_lines(out, 1)[0]) == c.init_pid
        assert _inside(c, ["hostname"]).strip() == "x"
        assert "pid" not in c.iso.own_namespaces and "pid" in iso.own_namespaces


# -- time, user namespace and tmpfs records ---------------------------------------------------
def test_time_user_and_tmpfs_files_round_trip(tmp_path):
    from ckptfs.isolation import load_extra, tmpfs, timens, userns
    src = tmp_path / "src"
    (src / "a b").mkdir(parents=True)
    (src / "a b" / "f").write_bytes(b"\x00\xffdata")
    os.chmod(src / "a b" / "f", 0o4750)
    os.symlink("a b/f", src / "ln")
    os.mkfifo(src / "q", 0o640)
    import socket
    with socket.socket(socket.AF_UNIX) as sk:
        sk.bind(str(src / "s"))
    contents, left = tmpfs.capture(str(src), 100)
    assert left == 100 - 6
    iso = _iso(mounts=[Mount("tmpfs", "/run", "tmpfs", "rw,size=1m", contents)])
    iso.time = timens.TimeNs({"monotonic": (100000, 5), "boottime": (50000, 999999999)})
    iso.userns = userns.UserNs([(0, 100000, 65536)], [(0, 100000, 65536)], "deny")
    files = render_extra(iso)
    assert files["time/monotonic"] == "100000 5\n" and files["user/setgroups"] == "deny\n"
    assert "f 04750 0 0 a\\040b/f" in files["tmpfs/1/index"].splitlines()
    assert "l 0777 0 0 ln a\\040b/f" in files["tmpfs/1/index"].splitlines()
    assert any(line.startswith("s ") and line.endswith(" s") for line in files["tmpfs/1/index"].splitlines())
    assert files["tmpfs/1/files/a b/f"].encode() == b"\x00\xffdata"
    tree = tmp_path / "tree"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(text.encode())
    read = lambda rel: (tree / rel).read_text(errors="surrogateescape") if (tree / rel).is_file() else None  # noqa: E731
    listdir = lambda rel: sorted(os.listdir(tree / rel)) if (tree / rel).is_dir() else []  # noqa: E731
    back = load_extra(_iso(), read, listdir, lambda rel: str(tree / rel))
    assert back.time == iso.time and back.userns == iso.userns and back.mounts == iso.mounts
    got = back.mounts[0].contents
    assert got.entries == contents.entries and got.read("a b/f") == b"\x00\xffdata"
    # filled elsewhere: the same entries, modes and bytes
    dst = tmp_path / "dst"
    dst.mkdir()
    tmpfs.fill(str(dst), tmpfs.to_config(got, "unused"))
    again, _ = tmpfs.capture(str(dst), 100)
    # everything but the socket's name (only a bind makes one)
    assert again.entries == [e for e in contents.entries if e.kind != "s"]
    assert again.data == contents.data


@pytest.mark.parametrize("rel, text", [
    ("time/monotonic", "12 1000000000\n"), ("time/boottime", "-1 0\n"),
    ("user/uid_map", "0 100000\n"), ("user/setgroups", "maybe\n"),
    ("user/gid_map", "0 1000 10\n5 2000 10\n"),
    ("tmpfs/1/index", "f 0644 0 0 ../escape\n"), ("tmpfs/1/index", "l 0777 0 0 nolinktarget\n"),
])
def test_bad_time_user_tmpfs_files_are_refused(rel, text):
    from ckptfs.isolation import load_extra
    files = {"time/monotonic": "1 0\n", "time/boottime": "1 0\n", "user/uid_map": "0 0 1\n",
             "user/gid_map": "0 0 1\n", "user/setgroups": "allow\n", "tmpfs/1/target": "/run\n",
             "tmpfs/1/index": "d 0755 0 0 .\n", "mounts": "tmpfs /run tmpfs rw\n", rel: text}
    listdir = lambda rel: ["1"] if rel == "tmpfs" else []  # noqa: E731
    with pytest.raises(BadTree) as e:
        load_extra(_iso(), files.get, listdir, lambda rel: "/nonexistent/" + rel)
    assert e.value.path == f"isolation/{rel}"


def test_tmpfs_capture_stays_on_its_filesystem_and_within_the_limit(tmp_path):
    from ckptfs.isolation import tmpfs
    (tmp_path / "big").write_bytes(b"x" * 50)
    with pytest.raises(Unsupported) as e:
        tmpfs.capture(str(tmp_path), 49)
    assert e.value.path == f"{tmp_path}/big" and "CKPTFS_TMPFS_LIMIT" in str(e.value)
    # another filesystem mounted below: its mount point stays, its files do not
    (tmp_path / "big").unlink()
    (tmp_path / "inner").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path / "inner")],
                   check=True)
    try:
        (tmp_path / "inner" / "hidden").write_text("x")
        contents, _ = tmpfs.capture(str(tmp_path), 1 << 20)
    finally:
        subprocess.run(["umount", str(tmp_path / "inner")], check=True)
    assert [(e.kind, e.path) for e in contents.entries] == [("d", "."), ("d", "inner")]


def test_user_namespace_with_shifted_ids(tmp_path):
    """Maps 0 -> 100000 (65536 ids): the program is root inside with its capabilities there
    (it set the hostname, mounted and filled a tmpfs owned by inside ids), and every other
    namespace belongs to the new user namespace."""
    import shutil
    import tempfile
    # the mount point must be reachable by the container's root (host uid 100000): not below
    # pytest's 0700 directories
    top = Path(tempfile.mkdtemp(prefix="ckptfs-userns-", dir="/tmp"))
    try:
        top.chmod(0o755)
        (top / "t").mkdir()
        _shifted_ids(top / "t")
    finally:
        shutil.rmtree(top)


def _shifted_ids(target: Path):
    from ckptfs.isolation import tmpfs, userns
    contents = tmpfs.Contents([tmpfs.Entry("d", ".", 0o755, 0, 0),
                               tmpfs.Entry("f", "f", 0o600, 1000, 1000)], data={"f": b"inside\n"})
    iso = _iso(own_namespaces=("user", "mnt", "uts", "net", "ipc", "pid"), limits={},
               mounts=[Mount("tmpfs", str(target), "tmpfs", "rw,size=64k", contents)])
    iso.userns = userns.UserNs([(0, 100000, 65536)], [(0, 100000, 65536)], "allow")
    script = (f"id -u; hostname; stat -c '%u %g %a' {target}/f; cat {target}/f; "
              f"grep ^CapEff /proc/self/status; sleep 30")
    with Container.create(iso, ["sh", "-c", script], stdout=subprocess.PIPE, text=True) as c:
        got = [c.popen.stdout.readline().strip() for _ in range(5)]
        assert got[:4] == ["0", "x", "1000 1000 600", "inside"]
        assert got[4].split()[1] != "0000000000000000"
        assert Path(f"/proc/{c.init_pid}/uid_map").read_text().split() == ["0", "100000", "65536"]
        assert Path(f"/proc/{c.init_pid}/status").read_text().split("Uid:\t")[1].split()[0] == "100000"
        user = os.readlink(f"/proc/{c.init_pid}/ns/user")
        assert user != os.readlink("/proc/self/ns/user")
        # the host sees the file's owner shifted
        stat = subprocess.run(["nsenter", "-t", str(c.init_pid), "-m", "stat", "-c", "%u",
                               f"{target}/f"], capture_output=True, text=True, check=True)
        assert stat.stdout.strip() == "101000"
        # captured back: the maps, and the tmpfs owners as the container sees them
        again = capture_isolation(c.init_pid)
        assert again.userns == iso.userns and "user" in again.own_namespaces
        m = next(m for m in again.mounts if m.target == str(target))
        assert [(e.path, e.uid) for e in m.contents.entries] == [(".", 0), ("f", 1000)]
    assert not os.path.exists(f"/proc/{c.init_pid}/ns")


def test_user_namespace_without_maps_is_refused_before_anything_exists():
    iso = _iso(own_namespaces=("user", "uts"), limits={"pids.max": "5"})
    with pytest.raises(Unsupported) as e:
        Container.start(iso, ["true"], name="ckptfs-nomaps-test")
    assert e.value.path == "isolation/own" and "isolation/user/" in str(e.value)
    assert _cgroup_dirs("ckptfs-nomaps-test") == []
