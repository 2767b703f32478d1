"""The two simulated hosts are real and separate (network, ssh, rsync, per-host mounts), and the
FUSE mount helper mounts, reports and always cleans up."""
from __future__ import annotations

import errno
import os
import sys
import textwrap

import pytest

from helpers import hosts as H
from helpers import mounts
from helpers import procs as P
from helpers import zdtm

pytestmark = pytest.mark.two_hosts

# ICMP echo with a raw socket: the machine has no ping binary.
PING = textwrap.dedent("""
    import socket, struct, sys
    def csum(b):
        s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
        s = (s >> 16) + (s & 0xffff); s += s >> 16
        return ~s & 0xffff
    body = struct.pack('!HH', 0x77, 1) + b'ckptfs-ping'
    pkt = struct.pack('!BBH', 8, 0, csum(b'\\x08\\x00\\x00\\x00' + body + b'\\x00')) + body
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(3)
    s.sendto(pkt, (sys.argv[1], 0))
    while True:
        data, peer = s.recvfrom(2048)
        icmp = data[(data[0] & 15) * 4:]
        if icmp[0] == 0 and icmp[4:6] == pkt[4:6] and peer[0] == sys.argv[1]:
            print('reply from', peer[0]); break
""")

# A read-only FUSE filesystem with one file, /hello.
HELLO_FS = textwrap.dedent("""
    import errno, stat, sys, mfusepy as fuse
    DATA = b'hello from ' + sys.argv[2].encode() + b'\\n'
    class Hello(fuse.Operations):
        def getattr(self, path, fh=None):
            if path == '/':
                return {'st_mode': stat.S_IFDIR | 0o755, 'st_nlink': 2}
            if path == '/hello':
                return {'st_mode': stat.S_IFREG | 0o444, 'st_nlink': 1, 'st_size': len(DATA)}
            raise fuse.FuseOSError(errno.ENOENT)
        def readdir(self, path, fh):
            return ['.', '..', 'hello']
        def read(self, path, size, offset, fh):
            return DATA[offset:offset + size]
    fuse.FUSE(Hello(), sys.argv[1], foreground=True, ro=True)
""")


@pytest.fixture(scope="module")
def hello_fs(tmp_path_factory):
    path = tmp_path_factory.mktemp("fs") / "hello_fs.py"
    path.write_text(HELLO_FS)
    return path


def hello_cmd(script, mnt, who):
    return [sys.executable, str(script), str(mnt), who]


FUSE_ENV = {**os.environ, "FUSE_LIBRARY_NAME": "fuse3"}


def netns_of(pid):
    return os.readlink(f"/proc/{pid}/ns/net")


def test_ping_from_a_to_b(two_hosts):
    out = two_hosts.a.run([sys.executable, "-c", PING, two_hosts.b.addr], check=True).stdout
    assert out == "reply from 10.77.0.2\n"


def test_hosts_do_not_reach_the_outside_namespace(two_hosts):
    res = two_hosts.a.run(["ip", "-br", "addr"], check=True).stdout
    assert "10.77.0.1/24" in res and "10.77.0.2" not in res and "eth0" not in res


def test_ssh_runs_commands_on_the_other_host(two_hosts):
    a, b = two_hosts.a, two_hosts.b
    on_b = a.run(a.ssh("hostb", "readlink /proc/self/ns/net"), check=True).stdout.strip()
    on_a = b.run(b.ssh("hosta", "readlink /proc/self/ns/net"), check=True).stdout.strip()
    assert on_b == netns_of(b.holder.pid) and on_a == netns_of(a.holder.pid)
    assert on_a != on_b


def test_ssh_refuses_an_unknown_host_key(two_hosts):
    a = two_hosts.a
    res = a.run(["ssh", "-F", a.ssh_config, "-o", "HostKeyAlias=hosta", "hostb", "true"])
    assert res.returncode == 255 and "HOST IDENTIFICATION HAS CHANGED" in res.stderr


def test_rsync_over_ssh_copies_from_a_to_b(two_hosts):
    a, b, disk = two_hosts.a, two_hosts.b, two_hosts.disk
    src = os.path.join(a.path(disk), "rsync-src")
    os.makedirs(os.path.join(src, "sub"))
    blob = os.urandom(300_000)
    with open(os.path.join(src, "sub", "blob"), "wb") as f:
        f.write(blob)
    os.symlink("sub/blob", os.path.join(src, "link"))
    a.run(["rsync", "-a", "-e", a.ssh_cmd(), f"{disk}/rsync-src/", f"hostb:{disk}/rsync-dst/"],
          check=True)
    dst = os.path.join(b.path(disk), "rsync-dst")
    with open(os.path.join(dst, "sub", "blob"), "rb") as f:
        assert f.read() == blob
    assert os.readlink(os.path.join(dst, "link")) == "sub/blob"
    assert not os.path.exists(os.path.join(a.path(disk), "rsync-dst"))


def test_a_file_on_b_disk_is_not_on_a(two_hosts):
    a, b, disk = two_hosts.a, two_hosts.b, two_hosts.disk
    b.run(["sh", "-c", f"echo b-only > {disk}/only-on-b"], check=True)
    assert open(os.path.join(b.path(disk), "only-on-b")).read() == "b-only\n"
    assert a.run(["test", "-e", f"{disk}/only-on-b"]).returncode == 1
    assert not os.path.exists(os.path.join(a.path(disk), "only-on-b"))
    assert not os.path.exists(os.path.join(disk, "only-on-b"))  # nor in the test's namespace


def test_spawned_process_runs_in_the_host_namespaces(two_hosts, procs, tmp_path):
    b = two_hosts.b
    proc = b.spawn(["sleep", "60"], procs=procs, cwd=str(tmp_path))
    P.wait_file(f"/proc/{proc.pid}/comm", "sleep\n", proc=proc)
    assert netns_of(proc.pid) == netns_of(b.holder.pid)
    assert os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink(f"/proc/{b.holder.pid}/ns/mnt")
    assert os.readlink(f"/proc/{proc.pid}/cwd") == str(tmp_path)
    assert os.getsid(proc.pid) == proc.pid


def test_fuse_mount_on_b_is_seen_by_later_processes_on_b_only(two_hosts, hello_fs):
    a, b = two_hosts.a, two_hosts.b
    mnt = os.path.join(two_hosts.disk, "fuse-on-b")  # on b's private tmpfs
    with mounts.fuse_mount(hello_cmd(hello_fs, mnt, "b"), mnt, runner=b, env=FUSE_ENV) as m:
        assert b.run(["cat", f"{mnt}/hello"], check=True).stdout == "hello from b\n"
        assert open(os.path.join(m.view, "hello")).read() == "hello from b\n"
        assert a.run(["test", "-e", f"{mnt}/hello"]).returncode == 1
        assert mounts.is_mounted(m.view) and not mounts.is_mounted(a.path(mnt))
        daemon = m.daemon
    assert not mounts.is_mounted(b.path(mnt)) and not daemon.alive()
    assert mnt not in [p for p, _ in H.mountinfo(b.holder.pid)]


def test_fuse_mount_unmounts_after_the_daemon_was_killed(two_hosts, hello_fs):
    b = two_hosts.b
    mnt = os.path.join(two_hosts.disk, "fuse-killed")
    with mounts.fuse_mount(hello_cmd(hello_fs, mnt, "b"), mnt, runner=b, env=FUSE_ENV) as m:
        m.daemon.kill()
        with pytest.raises(OSError) as e:
            os.stat(os.path.join(m.view, "hello"))
        assert e.value.errno == errno.ENOTCONN and mounts.is_mounted(m.view)
    assert mnt not in [p for p, _ in H.mountinfo(b.holder.pid)]


def test_hosts_do_not_hold_copies_of_fuse_mounts_made_before(tmp_mount, hello_fs, tmp_path):
    mnt = tmp_path / "outside"
    m = tmp_mount(hello_cmd(hello_fs, mnt, "outside"), mnt, env=FUSE_ENV)
    with H.two_hosts() as h:
        for host in h.hosts:
            assert str(mnt) not in [p for p, _ in H.mountinfo(host.holder.pid)]
        assert mounts.unmount(mounts.Local(P.ProcSet()), str(mnt), str(mnt))
        assert P.wait_gone(m.daemon.pid, 5), "a copy of the mount kept the daemon alive"


def test_tmp_mount_fixture_mounts_here(tmp_mount, hello_fs, tmp_path):
    mnt = tmp_path / "here"
    m = tmp_mount(hello_cmd(hello_fs, mnt, "here"), mnt, env=FUSE_ENV)
    assert (mnt / "hello").read_text() == "hello from here\n" and mounts.is_mounted(m.view)


def test_fuse_mount_unmounts_when_the_body_fails(hello_fs, tmp_path, procs):
    mnt = tmp_path / "mnt"
    with pytest.raises(ZeroDivisionError):
        with mounts.fuse_mount(hello_cmd(hello_fs, mnt, "x"), mnt, runner=mounts.Local(procs),
                               env=FUSE_ENV) as m:
            assert mounts.is_mounted(m.view)
            1 / 0
    assert not mounts.is_mounted(m.view) and not m.daemon.alive()


def test_fuse_mount_timeout_shows_daemon_stderr(tmp_path, procs):
    never = [sys.executable, "-c", "import sys, time; print('no mount here', file=sys.stderr, "
             "flush=True); time.sleep(60)"]
    with pytest.raises(AssertionError, match="no mount here") as info:
        with mounts.fuse_mount(never, tmp_path / "mnt", runner=mounts.Local(procs), timeout=1):
            pass
    assert "not mounted after 1s" in str(info.value)
    assert not procs.procs[0].alive()


def test_fuse_mount_reports_a_daemon_that_died(tmp_path, procs):
    dies = [sys.executable, "-c", "import sys; sys.exit('bad mount point')"]
    with pytest.raises(AssertionError, match="(?s)died before.*exited 1.*bad mount point"):
        with mounts.fuse_mount(dies, tmp_path / "mnt", runner=mounts.Local(procs)):
            pass


def test_two_hosts_teardown_removes_everything():
    with H.two_hosts() as h:
        pids = [h.a.holder.pid, h.b.holder.pid, h.a.sshd.pid, h.b.sshd.pid]
        names = [h.a.ns, h.b.ns]
        base, veth = h.base, h.veth
        assert all(P.alive(p) for p in pids)
    assert not any(P.alive(p) for p in pids)
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
    assert not any(os.path.exists(f"/sys/class/net/{v}") for v in veth)
    assert not base.exists()


def test_two_hosts_cleans_up_when_setup_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(H, "SSHD", "/nonexistent/sshd")  # a real failure: nsenter cannot exec it
    (tmp_path / "hosts").mkdir()
    h = H.TwoHosts(tmp_path / "hosts")
    try:
        with pytest.raises(AssertionError, match="(?s)sshd of hosta died.*nonexistent/sshd"):
            h.setup()
    finally:
        h.teardown()  # what two_hosts() runs in its finally
    assert not P.alive(h.a.holder.pid) and h.b.holder is None
    assert not any(os.path.exists(f"/run/netns/{x.ns}") for x in h.hosts)
    assert not os.path.exists(f"/sys/class/net/{h.veth[0]}") and not h.base.exists()


def test_zdtm_program_runs_on_a_host_disk(two_hosts, zdtm_bin, procs):
    a, b = two_hosts.a, two_hosts.b
    tmpdir = os.path.join(two_hosts.disk, "zdtm-half-read")
    seen = {}

    def move(pid, tmp):  # stays put: proves where it runs and where its files are
        seen["netns"] = netns_of(pid)
        seen["on_a"] = os.path.exists(os.path.join(a.path(str(tmp)), "work", "half_read.dat"))
        seen["on_b"] = os.path.exists(os.path.join(b.path(str(tmp)), "work", "half_read.dat"))
        return pid

    assert zdtm.run_case(zdtm_bin, "half_read_file", tmpdir, procs, move, src=a) == "PASS"
    assert seen == {"netns": netns_of(a.holder.pid), "on_a": True, "on_b": False}
