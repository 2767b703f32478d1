"""Restore a container: its namespaces, cgroups and limits first, then its tasks inside.

A tree is a container when its isolation says the root had namespaces of its own
(`isolation/own`), or when the caller says so (`restore(container=True)`, `ckptfs restore
--container`); `container=False` restores the tasks into the restorer's own namespaces.

    isolation.Container.start(iso, ["sleep", "infinity"], without=("pid",))
        new mnt/uts/ipc/net/cgroup/time namespaces as `own` lists them, hostname and
        domainname, lo + recorded links, addresses and routes, the recorded tmpfs and bind
        mounts, new cgroups with the recorded limits; its program is the restorer's helper
    LinuxRestorer(container=...)
        seizes that helper and forks the tree from it: with `pid` own, clone3(CLONE_NEWPID)
        makes the root pid 1 of a new pid namespace (a root that was not its namespace's init
        gets the reaper init in front) and the others their old pids; /proc of the new
        namespace is mounted by its first task

A container with its own user namespace: the namespace init makes it first and we write its
maps, so it owns every other namespace; the restorer's tasks get their descriptors over
SCM_RIGHTS there (restorer_class, below, says why pidfd_getfd cannot work across it).
A time namespace continues the recorded clocks (isolation/timens.py).

All or nothing: the isolation is checked with the rest of the tree before anything exists
(problems name `<tree>/isolation/<file>` and the value); a failure later kills every task,
then the container goes (its init, its cgroups; the namespaces die with their last task).
On success the cgroups stay with the container: RestoreResult.cgroups lists them and
isolation.cgroups.remove_dirs removes them once its tasks are gone.

Files on the container's own mounts (its tmpfs, its bind mounts): the restorer opens the tasks'
files itself, from the host's mount namespace, where such a path means something else or
nothing. `ContainerPaths` shows the checkpoint with those names changed: before the container
exists, to where the file is now (a tmpfs file's copy in the tree, a bind mount's source) for
the plan's checks; once it exists, to /proc/self/fd/<root>/<name>, where <root> is the
restorer's O_PATH descriptor of the container's root directory (taken through its init's
/proc/PID/root, so it outlives the helper): it resolves in the container's mount namespace
(its tmpfs, filled by then).
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import uuid

from .. import flags as F
from ..errors import CkptError, KernelError, RestoreFailed, Unsupported
from ..model import Isolation, Source

NAME_PREFIX = "ckptfs-restore-"


def isolation_of(source: Source, container: bool | None) -> Isolation | None:
    """The isolation to re-create, or None for a plain restore.

    container None: a container exactly when isolation/own lists a namespace kind."""
    if container is False:
        return None
    try:
        iso = source.isolation()
    except NotImplementedError:
        iso = Isolation()
    if container is None and not iso.own_namespaces:
        return None
    if iso.mounts and "mnt" in iso.own_namespaces:
        attach_paths(source, iso)
    return iso


class ContainerPaths:
    """A Source whose regular files on the container's own mounts are renamed (module doc).
    Everything else is the inner source's."""

    def __init__(self, inner: Source, iso: Isolation):
        self.inner, self.container_paths = inner, self
        self.root_fd: int | None = None   # the container's root directory, once it exists
        self._file = inner.file
        self._own = sorted(iso.mounts or [], key=lambda m: -len(m.target))

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def file(self, file_id: int):
        fe = self._file(file_id)
        if fe.type != F.FD_TYPES["REG"]:
            return fe
        name = self.resolve(fe.reg.name)
        if name == fe.reg.name:
            return fe
        copy = type(fe)()
        copy.CopyFrom(fe)
        copy.reg.name = name
        return copy

    def resolve(self, name: str) -> str:
        m = next((m for m in self._own if name == m.target or
                  name.startswith(m.target.rstrip("/") + "/")), None)
        if m is None:
            return name
        if self.root_fd is not None:
            return f"/proc/self/fd/{self.root_fd}{name}"
        rest = os.path.relpath(name, m.target)
        if m.is_bind:
            return os.path.normpath(os.path.join(m.source, rest))
        c = m.contents
        if c is None or c.dir is None:
            return name
        kind = next((e.kind for e in c.entries if e.path == os.path.normpath(rest)), None)
        if kind == "f":
            return os.path.join(c.dir, rest)
        # a directory or node of the recorded tmpfs: it exists (only its kind is checked)
        return os.path.dirname(c.dir) if kind is not None else name


def _open_root(pid: int) -> int:
    path = f"/proc/{pid}/root"
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise KernelError("cannot hold the container's root directory", e.errno, path=path,
                          step="create container") from e


def attach_paths(source: Source, iso: Isolation) -> ContainerPaths:
    """Make `source` answer file() through a ContainerPaths (see module doc).
    Until restore() wraps the source itself before planning, the view is put on the source
    object: `source.file` is replaced, `source.container_paths` finds the view."""
    view = getattr(source, "container_paths", None)
    if isinstance(view, ContainerPaths):
        view._own = sorted(iso.mounts or [], key=lambda m: -len(m.target))
        return view
    view = ContainerPaths(source, iso)
    source.file = view.file
    source.container_paths = view
    return view


def tree_path(source: Source, rel: str | None) -> str | None:
    """`isolation/...` as a path in the tree the source reads, when it is a tree."""
    root = getattr(source, "root", None)
    if rel and isinstance(root, str) and rel.startswith("isolation"):
        return os.path.join(root, rel)
    return rel


def problems(source: Source, iso: Isolation, same_pids: bool) -> list[str]:
    """What makes the container impossible here, before anything is created."""
    from ..isolation import create
    out = []
    try:
        create.validate(iso)
    except CkptError as e:
        out.append(_named(source, e))
    if not out and iso.mounts:
        from ..isolation.mounts import missing_paths
        out += [p.replace("isolation/mounts", tree_path(source, "isolation/mounts"), 1)
                for p in missing_paths(iso.mounts)]
        out += _missing_contents(source, iso.mounts)
    if getattr(iso, "userns", None) is not None:
        out += _creds_problems(source, iso.userns)
    if "pid" in iso.own_namespaces and same_pids:
        out.append(f"{tree_path(source, 'isolation/own')}: 'pid' is own: the tree restores "
                   "into a new pid namespace (pidns), not with the same pids here")
    return out


CRED_FIELDS = (("uid", "euid", "suid", "fsuid"), ("gid", "egid", "sgid", "fsgid"))


def _creds_problems(source: Source, u) -> list[str]:
    from .plan import where
    """Creds in the tree are as the host saw them (/proc/PID/status); set inside the new user
    namespace they mean those ids there. That is right only for ids the maps send to
    themselves (`unshare --map-root-user` by root: 0 0 1); others are refused, not shifted."""
    out = []
    for e in source.pstree():
        core = source.core(e.pid)
        if not core.thread_core.HasField("creds"):
            continue       # a zombie has none
        c = core.thread_core.creds
        ids = [(getattr(c, f), u.uid_map, "uid_map") for f in CRED_FIELDS[0]] + \
              [(getattr(c, f), u.gid_map, "gid_map") for f in CRED_FIELDS[1]] + \
              [(g, u.gid_map, "gid_map") for g in c.groups]
        bad = sorted({(i, name) for i, ranges, name in ids if _maps_to(ranges, i) != i})
        if bad:
            i, name = bad[0]
            out.append(f"{where(source, e.pid, 'creds')}: id {i} is not mapped to "
                       f"itself by {tree_path(source, 'isolation/user/' + name)} (creds are "
                       "recorded as the host sees them; shifting them is not supported yet)")
    return out


def _maps_to(ranges, host_id: int) -> int | None:
    for inside, outside, count in ranges:
        if outside <= host_id < outside + count:
            return inside + host_id - outside
    return None


def _missing_contents(source: Source, mounts: list) -> list[str]:
    """Files a tmpfs index lists that its files/ directory lacks."""
    out = []
    for m in mounts:
        c = m.contents
        if c is None or c.dir is None:
            continue
        for e in c.entries:
            if e.kind == "f" and not os.path.isfile(os.path.join(c.dir, e.path)):
                out.append(f"{tree_path(source, f'{c.tree}/files/{e.path}')}: missing "
                           f"(listed in {c.tree}/index)")
    return out


def _named(source: Source, e: CkptError) -> str:
    text = str(e)
    path = tree_path(source, e.path)
    return text.replace(e.path, path, 1) if e.path and path != e.path else text


def _failed(source: Source, e: CkptError, undone: str, hint: str = "") -> RestoreFailed:
    text = _named(source, e).split(" (undone: ")[0]
    err = RestoreFailed(f"{text}{hint} ({undone})", err=e.errno)
    err.path, err.step = tree_path(source, e.path), e.step
    return err


def _hint(source: Source, iso: Isolation, e: CkptError) -> str:
    """A task the kernel would not create inside a pids-limited container: say which limit."""
    limit = iso.limits.get("pids.max", "max").strip()
    if e.errno == errno.EAGAIN and e.step in ("create task", "create thread") and limit != "max":
        return f"; {tree_path(source, 'isolation/limits/pids.max')} is {limit}"
    return ""


@dataclasses.dataclass
class Restored:
    pids: dict[int, int]      # old pid -> host pid
    cgroups: list[str]        # left to the container
    timing: dict
    init: int | None          # host pid of its pid namespace's init


def run(plan, iso: Isolation, *, pidns: bool, same_pids: bool, log) -> Restored:
    """Create the container, restore the tree into it."""
    from ..isolation.create import Container
    from .linux import LinuxRestorer
    source = plan.source
    sleep = shutil.which("sleep") or "/bin/sleep"
    own = set(iso.own_namespaces)
    try:
        c = Container.start(iso, [sleep, "infinity"], name=NAME_PREFIX + uuid.uuid4().hex[:12],
                            without=("pid",), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except CkptError as e:   # Container.start removed what it had made
        raise _failed(source, e, "undone: nothing of the container is left") from e
    view = getattr(source, "container_paths", None)
    try:
        if isinstance(view, ContainerPaths):   # the tasks' files are opened in it from now on
            view.root_fd = _open_root(c.init_pid)
        cls = restorer_class(LinuxRestorer) if "user" in own else LinuxRestorer
        r = cls(plan, pidns=pidns, same_pids=same_pids, log=log, container=c,
                mount_proc={"pid", "mnt"} <= own)
        pids = r.run()
    except BaseException as e:
        c.cleanup()
        if isinstance(e, CkptError):
            raise _failed(source, e, "undone: tasks, namespaces and cgroups removed",
                          _hint(source, iso, e)) from e
        raise
    finally:
        if isinstance(view, ContainerPaths) and view.root_fd is not None:
            os.close(view.root_fd)
            view.root_fd = None
    if "pid" in own and "mnt" not in own:
        log("note: the container's pid namespace has no mount namespace of its own: "
            "its /proc is the restorer's")
    from . import ns_init
    return Restored(pids, c.release(), r.timing, ns_init(r, pids, pidns))


# -- a container with its own user namespace: descriptors passed over a socket ---------------
# The restorer hands every task the descriptions it opened with pidfd_getfd(2), called by the
# task on a pidfd of the restorer. The kernel allows that only if the task may ptrace the
# restorer (PTRACE_MODE_ATTACH_REALCREDS): the uids match (root both), but then the
# capability check (cap_ptrace_access_check) requires the task to be in the restorer's user
# namespace with a subset of its capabilities, or to hold CAP_SYS_PTRACE in the restorer's
# user namespace. A task in a child user namespace has neither: EPERM. The other direction
# works (the restorer, in the parent namespace, may ptrace and pidfd_getfd the task).
# So here descriptors go over SCM_RIGHTS instead: the helper makes a socketpair, the restorer
# takes one end with pidfd_getfd, the other sits where the pidfd of the restorer would (the
# restorer's slot, inherited by every task forked from the helper and closed by each at the
# end), and each "take" is a sendmsg here and an injected recvmsg in the task.
AF_UNIX, SOCK_SEQPACKET, SOCK_CLOEXEC, MSG_CMSG_CLOEXEC = 1, 5, 0o2000000, 0x40000000
SOL_SOCKET, SCM_RIGHTS = 1, 1
NR_SOCKETPAIR, NR_RECVMSG, NR_PIDFD_GETFD = 53, 47, 438
# one scratch block per take: msghdr (56) | iovec (16) | cmsg buffer (24: header + one int) | byte
MSG_AT, IOV_AT, CMSG_AT, BYTE_AT, BLOCK = 0, 56, 72, 96, 112


def pidfd_getfd(pidfd: int, fd: int) -> int:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    got = libc.syscall(NR_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return got


class _WithoutSetgroups:
    """An Injector whose setgroups calls succeed without being made."""

    def __init__(self, inj):
        self._inj = inj

    def __getattr__(self, name):
        return getattr(self._inj, name)

    def call(self, nr: int, *args, **kw) -> int:
        from ..inject import NR
        return 0 if nr == NR["setgroups"] else self._inj.call(nr, *args, **kw)


def restorer_class(base):
    """`base` (LinuxRestorer) with descriptors passed over SCM_RIGHTS (see above)."""
    import socket
    import struct
    from ..inject import NR

    class UserNsRestorer(base):
        _fd_sock = None

        def _prepare_helper(self, pid):
            inj = super()._prepare_helper(pid)   # its pidfd of us is of no use in the user ns
            pair = inj.put(bytes(8))
            inj.call(NR_SOCKETPAIR, AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair,
                     step="descriptor socket")
            theirs, ours = struct.unpack("<ii", inj.read(pair, 8))
            pidfd = os.pidfd_open(pid)
            try:
                fd = pidfd_getfd(pidfd, ours)
            except OSError as e:
                raise KernelError(f"pidfd_getfd of the helper's socket {ours}", e.errno,
                                  path=f"/proc/{pid}", step="descriptor socket") from e
            finally:
                os.close(pidfd)
            if self._fd_sock is not None:
                self._fd_sock.close()
            self._fd_sock = socket.socket(fileno=fd)
            inj.call(NR["close"], ours, step="descriptor socket")
            inj.call(NR["dup3"], theirs, self.pidfd_slot, SOCK_CLOEXEC, step="descriptor socket")
            inj.call(NR["close"], theirs, step="descriptor socket")
            return inj

        def _take(self, inj, local: int) -> int:
            socket.send_fds(self._fd_sock, [b"f"], [local])
            at = inj.scratch(BLOCK)      # fresh: callers may hold scratch data across a take
            block = struct.pack("<QIIQQQQII", 0, 0, 0, at + IOV_AT, 1, at + CMSG_AT, 24, 0, 0)
            block += struct.pack("<QQ", at + BYTE_AT, 1)
            inj.write(at, block.ljust(BLOCK, b"\0"))
            inj.call(NR_RECVMSG, self.pidfd_slot, at, MSG_CMSG_CLOEXEC, step="recvmsg descriptor")
            _len, level, kind, fd = struct.unpack("<QiiI", inj.read(at + CMSG_AT, 20))
            if (level, kind) != (SOL_SOCKET, SCM_RIGHTS):
                raise RestoreFailed(f"no descriptor came with the message ({level}, {kind})",
                                    step="recvmsg descriptor")
            return fd

        def _creds(self, inj, c, path: str) -> None:
            """With setgroups denied in the namespace (as `unshare --map-root-user` makes it),
            no task may call setgroups: the groups it already has (the helper's) must be the
            recorded ones, and the call is left out; the rest is the base class's."""
            with open(f"/proc/{inj.tid}/setgroups") as f:
                if f.read().strip() == "allow":
                    return super()._creds(inj, c, path)
            with open(f"/proc/{inj.tid}/status") as f:
                have = next(line.split()[1:] for line in f if line.startswith("Groups:"))
            if sorted(int(g) for g in have) != sorted(c.groups):
                raise Unsupported(f"groups {' '.join(map(str, c.groups)) or '(none)'} cannot be "
                                  f"set: setgroups is deny in the user namespace (the task has "
                                  f"{' '.join(have) or '(none)'})", path=path + "/creds/groups",
                                  step="setgroups")
            return super()._creds(_WithoutSetgroups(inj), c, path)

        def run(self):
            try:
                return super().run()
            finally:
                if self._fd_sock is not None:
                    self._fd_sock.close()
                    self._fd_sock = None

    return UserNsRestorer
