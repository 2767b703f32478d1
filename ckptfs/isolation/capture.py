"""Capture a container's isolation from a live task (the container's init).

`own` namespaces are the kinds where the task differs from a reference task outside. For an
ordinary task that is its parent. For the init of a pid namespace of its own (a container's
init) the parent is no good: `unshare --fork` and container shims sit in the new mount, net,
uts and ipc namespaces themselves and only fork the init into the new pid namespace. The
reference is then the capturing process itself (the host ckptfs runs in).

Whatever is read inside a namespace (uts names, network) is read by a short-lived `nsenter`
process, never by joining the namespace from one of the caller's threads.
"""
from __future__ import annotations

import errno
import os
import subprocess

from ..errors import CkptError, KernelError, ProcessGone
from . import ContainerIsolation
from . import cgroups as _cgroups
from . import mounts as _mounts
from . import net as _net
from . import timens as _timens
from . import tmpfs as _tmpfs
from . import userns as _userns

NS_KINDS = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")


def namespaces(pid: int | str) -> dict[str, int]:
    """kind -> namespace inode for every kind this kernel shows in /proc/PID/ns."""
    out = {}
    for kind in NS_KINDS:
        path = f"/proc/{pid}/ns/{kind}"
        try:
            link = os.readlink(path)
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise ProcessGone("process exited", path=path, step="capture isolation") from None
            continue     # this kernel has no such namespace kind
        except OSError as e:
            raise KernelError("cannot read namespace link", e.errno, path=path,
                              step="capture isolation") from e
        out[kind] = int(link[link.index("[") + 1:-1])
    return out


def _status(pid: int) -> dict[str, str]:
    path = f"/proc/{pid}/status"
    try:
        with open(path) as f:
            return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except FileNotFoundError:
        raise ProcessGone("process exited", path=path, step="capture isolation") from None


def reference_task(pid: int) -> int | str:
    """The task whose namespaces count as "outside" (see the module docstring)."""
    st = _status(pid)
    own_pidns = namespaces(pid).get("pid") != namespaces("self").get("pid")
    if own_pidns and st.get("NSpid", "").split()[-1:] == ["1"]:
        return "self"
    return int(st["PPid"]) or "self"


def uts_names(pid: int, own_uts: bool) -> tuple[str, str]:
    """(hostname, domainname) of the task's uts namespace."""
    files = ["/proc/sys/kernel/hostname", "/proc/sys/kernel/domainname"]
    if not own_uts:  # ours: read them here (no fork on every frozen capture)
        return tuple(open(f).read().strip() for f in files)
    # another uts namespace: setns() would move one thread of ours; a short child does it
    argv = ["nsenter", "-t", str(pid), "-u", "cat", *files]
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    if r.returncode != 0 or len(lines) != 2:
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessGone("process exited", path=f"/proc/{pid}/ns/uts", step="capture isolation")
        raise CkptError(f"{' '.join(argv)} failed: {r.stderr.strip()}", path=f"/proc/{pid}/ns/uts",
                        step="capture isolation")
    return lines[0], lines[1]


def capture_isolation(pid: int, reference: int | str | None = None, *,
                      container: bool = False) -> ContainerIsolation:
    """Isolation of the task `pid` (net and mounts only for namespaces of its own).

    `reference`: the task (pid or "self") whose namespaces are "outside". Default: the
    capturing process itself, as CRIU compares with its own namespaces: a process that shares
    ckptfs's namespaces has none of its own, whoever its parent is (a program started through
    nsenter on a simulated host, a child of a shim), and one dumped from outside its container
    has the container's."""
    if reference is None:
        reference = "self"
    ref = reference
    ns = namespaces(pid)
    try:
        outside = namespaces(ref)
    except KernelError as e:
        if e.errno != errno.EACCES:
            raise
        ref, outside = "self", namespaces("self")  # a parent we may not look at (a sandbox's init)
    own = tuple(k for k in NS_KINDS if k in ns and ns[k] != outside.get(k))
    hostname, domainname = uts_names(pid, ns.get("uts") != namespaces("self").get("uts"))
    cgroup, limits = _cgroups.task_limits(pid)
    iso = ContainerIsolation(
        hostname=hostname, domainname=domainname, namespaces=ns, own_namespaces=own,
        cgroup=cgroup, limits=limits,
        net=_net.capture(pid) if "net" in own else None,
        mounts=_mounts.container_mounts(pid, ref) if "mnt" in own else None)
    iso.userns = _userns.capture(pid) if "user" in own else None
    iso.time = _timens.capture(pid) if "time" in own else None
    tmpfs_contents(pid, iso)
    return iso


def tmpfs_contents(pid: int, iso) -> None:
    """The files of each own tmpfs, read through the task's root (its mount namespace)."""
    budget = _tmpfs.LIMIT
    ids = iso.userns.to_inside if iso.userns is not None else (lambda u, g: (u, g))
    for m in iso.mounts or []:
        if m.fstype == "tmpfs" and not m.is_bind:
            m.contents, budget = _tmpfs.capture(f"/proc/{pid}/root{m.target}", budget, ids)
