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
from ..errors import CkptError, KernelError, RestoreFailed
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
    root = getattr(source, "root", None)
    if isinstance(root, str) and os.path.isdir(os.path.join(root, "isolation")):
        try:
            _load_tree_extras(iso, os.path.join(root, "isolation"))
        except CkptError as e:
            raise _failed(source, e, "nothing was created") from e
    if iso.mounts and "mnt" in iso.own_namespaces:
        attach_paths(source, iso)
    return iso


def _load_tree_extras(iso: Isolation, top: str) -> None:
    """The records tree.TreeSource.isolation() leaves out (time, user, tmpfs contents)."""
    from ..isolation import load_extra

    def read(rel):
        path = os.path.join(top, rel)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()

    def listdir(rel):
        path = os.path.join(top, rel)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    load_extra(iso, read, listdir, lambda rel: os.path.join(top, rel))


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
    if "pid" in iso.own_namespaces and same_pids:
        out.append(f"{tree_path(source, 'isolation/own')}: 'pid' is own: the tree restores "
                   "into a new pid namespace (pidns), not with the same pids here")
    return out


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
        r = LinuxRestorer(plan, pidns=pidns, same_pids=same_pids, log=log, container=c,
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
