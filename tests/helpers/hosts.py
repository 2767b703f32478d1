"""Two hosts on one machine, for migration tests.

Each host is a network namespace (joined to the other by a veth pair: hosta 10.77.0.1/24,
hostb 10.77.0.2/24) plus a mount namespace of its own, held open by a long-lived holder
process (`ip netns exec NS unshare -m --propagation private sleep infinity`). Every command
on a host runs under `nsenter -t HOLDER -m -n`, so a mount made on a host (a FUSE mount, the
host's tmpfs `disk`) is seen by everything later run on that host and by nothing else.
The test process sees a host's files under /proc/HOLDER/root (`Host.path`).

Each host runs a real OpenSSH sshd on its address with a generated host key; the client key,
known_hosts and an ssh client config are generated too, so that on either host
`ssh -F CFG hostb true` and `rsync -e 'ssh -F CFG' ...` work (`Host.ssh_cmd()` is that -e).

Pids are global (no pid namespace): `os.kill` from the test reaches processes on any host.

Teardown (also after a failure half-way through setup) kills every process started on a host
and the holders by pid, deletes both namespaces (which removes the veth pair) and the
temporary directory.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import procs as _procs

SSHD = "/usr/sbin/sshd"
NET_PREFIX = "10.77.0."
SSHD_CONFIG = """\
ListenAddress {addr}
Port 22
AuthorizedKeysFile {keys}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PidFile none
MaxStartups 64
MaxSessions 64
Subsystem sftp internal-sftp
LogLevel INFO
"""
CLIENT_HOST = """\
Host {name}
  HostName {addr}
  HostKeyAlias {name}
"""
CLIENT_ALL = """\
Host *
  User root
  IdentityFile {keys}/id_client
  IdentitiesOnly yes
  UserKnownHostsFile {keys}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  CheckHostIP no
  BatchMode yes
  ConnectTimeout 5
  LogLevel ERROR
  # Cheap key exchange and cipher: these hosts share a machine, tests make many connections.
  KexAlgorithms curve25519-sha256
  Ciphers aes128-gcm@openssh.com
"""


def run_checked(argv: list, *, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with text output captured; `check` fails with the command's stderr."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    argv = [str(a) for a in argv]
    res = subprocess.run(argv, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}\n"
                             f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


class Host:
    """One simulated host: `name` (its ssh name), `addr`, netns `ns`, `holder` process."""

    def __init__(self, name: str, ns: str, addr: str, base: Path):
        self.name, self.ns, self.addr = name, ns, addr
        self.base = base / name               # this host's logs and sshd config
        self.base.mkdir()
        self.procset = _procs.ProcSet(self.base / "procs")
        self.holder: _procs.Proc | None = None
        self.sshd: _procs.Proc | None = None
        self.ssh_config: str | None = None
        self.disk: str | None = None           # a tmpfs only this host sees

    # -- running things on the host --------------------------------------------------------
    def wrap(self, argv: list, cwd: str | os.PathLike | None = None) -> list[str]:
        """`argv` as a command line that runs inside this host's namespaces.

        nsenter opens --wd before it enters the namespaces, so `cwd` is given as seen through
        the holder's root: the directory then is the one of this host's mount namespace."""
        wd = [f"--wd={self.path(cwd)}"] if cwd else []
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", *wd, "--", *map(str, argv)]

    def run(self, argv: list, *, cwd=None, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run `argv` on this host to completion (output captured as text)."""
        return run_checked(self.wrap(argv, cwd), check=check, **kw)

    def spawn(self, argv: list, *, procs: _procs.ProcSet | None = None, cwd=None, **kw) -> _procs.Proc:
        """Start `argv` on this host as a new session leader.

        Its pid is the program's own (nsenter execs it). It is registered in `procs` (a test's
        ProcSet) or else in the host's own set, killed when the hosts are torn down.
        """
        return (procs or self.procset).spawn(self.wrap(argv, cwd), **kw)

    def path(self, p: str | os.PathLike) -> str:
        """Where the test process sees this host's file `p` (absolute)."""
        p = os.fspath(p)
        if not p.startswith("/"):
            raise ValueError(f"Host.path needs an absolute path, got {p!r}")
        return f"/proc/{self.holder.pid}/root{p}"

    def ssh_cmd(self) -> str:
        """The remote shell for rsync -e: `ssh -F <generated config>`."""
        return f"ssh -F {self.ssh_config}"

    def ssh(self, target: str, *cmd: str) -> list[str]:
        """argv that runs `cmd` on host `target` ("hosta"/"hostb") over ssh."""
        return ["ssh", "-F", self.ssh_config, target, *cmd]

    # -- life cycle --------------------------------------------------------------------------
    def start_holder(self) -> None:
        argv = ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private",
                "sleep", "infinity"]
        self.holder = self.procset.spawn(argv)
        # The holder is ready once it has left the root mount namespace and exec'd sleep.
        root_mnt = os.readlink("/proc/self/ns/mnt")
        _wait(lambda: _readlink(f"/proc/{self.holder.pid}/ns/mnt") not in (None, root_mnt)
              and _comm(self.holder.pid) == "sleep", f"holder of {self.name}", self.holder)
        self.drop_foreign_fuse_mounts()

    def drop_foreign_fuse_mounts(self) -> None:
        """Detach the copies of FUSE mounts that existed when this mount ns was made.

        A copy would keep another test's FUSE connection alive after that test unmounts its
        own (the daemon would never see the unmount and exit)."""
        points = [m for m, fstype in mountinfo(self.holder.pid)
                  if fstype.startswith("fuse") and fstype != "fusectl"]
        for point in sorted(points, key=len, reverse=True):  # nested ones first
            self.run(["umount", "-l", point], check=True)

    def mount_disk(self, path: Path) -> None:
        """A private tmpfs at `path`, the same path on every host (like a local disk)."""
        self.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", f"ckptfs-{self.name}", path],
                 check=True)
        self.disk = str(path)

    def start_sshd(self, keys: Path) -> None:
        cfg = self.base / "sshd_config"
        cfg.write_text(SSHD_CONFIG.format(addr=self.addr, keys=keys))
        self.run(["mkdir", "-p", "-m", "0755", "/run/sshd"], check=True)
        self.sshd = self.spawn([SSHD, "-D", "-e", "-f", cfg, "-h", keys / f"host_{self.name}"])
        _wait(lambda: "Server listening on" in self.sshd.stderr_text(), f"sshd of {self.name}",
              self.sshd)

    def stop(self) -> None:
        """Kill everything started on this host, then the holder (it goes last)."""
        self.procset.kill_all()


class TwoHosts:
    """`a` (hosta, 10.77.0.1) and `b` (hostb, 10.77.0.2), and the shared ssh material."""

    def __init__(self, base: Path):
        self.base = base
        tag = secrets.token_hex(3)
        self.a = Host("hosta", f"ckptfs-a-{tag}", NET_PREFIX + "1", base)
        self.b = Host("hostb", f"ckptfs-b-{tag}", NET_PREFIX + "2", base)
        self.veth = (f"ckva{tag}", f"ckvb{tag}")
        self.keys = base / "keys"
        self.ssh_config = str(base / "ssh_config")
        self.disk = base / "disk"

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def setup(self) -> None:
        self.make_network()
        self.make_keys()
        self.disk.mkdir()
        for host in self.hosts:
            host.ssh_config = self.ssh_config
            host.start_holder()
            host.mount_disk(self.disk)
            host.start_sshd(self.keys)

    def make_network(self) -> None:
        for host in self.hosts:
            run_checked(["ip", "netns", "add", host.ns], check=True)
        run_checked(["ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1]],
                    check=True)
        for host, dev in zip(self.hosts, self.veth):
            run_checked(["ip", "link", "set", dev, "netns", host.ns], check=True)
            run_checked(["ip", "-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", dev], check=True)
            run_checked(["ip", "-n", host.ns, "link", "set", dev, "up"], check=True)
            run_checked(["ip", "-n", host.ns, "link", "set", "lo", "up"], check=True)

    def make_keys(self) -> None:
        self.keys.mkdir(mode=0o700)
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        run_checked([*keygen, "-f", self.keys / "id_client", "-C", "ckptfs-test"], check=True)
        (self.keys / "authorized_keys").write_text((self.keys / "id_client.pub").read_text())
        known, config = [], []
        for host in self.hosts:
            key = self.keys / f"host_{host.name}"
            run_checked([*keygen, "-f", key, "-C", host.name], check=True)
            pub = (self.keys / f"host_{host.name}.pub").read_text().split()
            known.append(f"{host.name} {pub[0]} {pub[1]}\n")
            config.append(CLIENT_HOST.format(name=host.name, addr=host.addr))
        (self.keys / "known_hosts").write_text("".join(known))
        Path(self.ssh_config).write_text("".join(config) + CLIENT_ALL.format(keys=self.keys))

    def teardown(self) -> None:
        errors = []
        for host in self.hosts:
            try:
                host.stop()
            except Exception as e:
                errors.append(f"{host.name}: {e}")
        for host in self.hosts:
            if os.path.exists(f"/run/netns/{host.ns}"):
                res = run_checked(["ip", "netns", "del", host.ns])
                if res.returncode:
                    errors.append(f"ip netns del {host.ns}: {res.stderr.strip()}")
        # The veth pair dies with its namespaces; if setup stopped before moving it, delete it here.
        if os.path.exists(f"/sys/class/net/{self.veth[0]}"):
            run_checked(["ip", "link", "del", self.veth[0]])
        shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise AssertionError("two_hosts teardown: " + "; ".join(errors))


@contextlib.contextmanager
def two_hosts(base: str | os.PathLike | None = None):
    """Yield a ready TwoHosts (namespaces, veth, sshd on both); always tear everything down."""
    base = Path(tempfile.mkdtemp(prefix="ckptfs-hosts-", dir=base))
    hosts = TwoHosts(base)
    try:
        hosts.setup()
        yield hosts
    finally:
        hosts.teardown()


def mountinfo(pid: int) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in the mount namespace of `pid`."""
    out = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        point = left.split()[4].encode().decode("unicode_escape")  # \040 for a space ...
        out.append((point, right.split()[0]))
    return out


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _wait(cond, what: str, proc: _procs.Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if not proc.alive():
            raise AssertionError(f"{what} died: {proc.describe()}\n{proc.stderr_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout}s: {proc.describe()}\n"
                                 f"{proc.stderr_text()}")
        time.sleep(0.01)
