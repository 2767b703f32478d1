"""A container's own mounts: found in /proc/PID/mountinfo, re-created with mount(8).

A new mount namespace starts as a copy of its creator's, so most lines of a container's
mountinfo are inherited. Its own mounts are the lines that its reference namespace (the host
the capture runs in) does not have: same mount point, device, root and type means inherited.
A proc at /proc is left out: it belongs to the pid namespace, and re-creating that mounts it.
Limitation: a host mount removed after the container was made survives in the container's
copy and is then taken for one of its own (mountinfo alone cannot tell a stale copy from a
new mount; statx's STATX_MNT_ID_UNIQUE on Linux 6.8+ could, by creation order).

Each own mount becomes an fstab line (`Mount`). A mount that shows a filesystem some other
mount also shows (same device) is a bind mount: its source is the other mount's path plus the
difference of their roots, taken from the host's mounts first, then from the container's own
earlier mounts (a bind of part of its own tmpfs). Anything else is a fresh mount of its type
(tmpfs, mqueue, ...) with the per-mount and filesystem options mountinfo shows.

Re-creating runs inside the new mount namespace (the namespace init, create.py): make every
mount private (as `unshare --mount` does), then mount each line in order. A tmpfs is filled
with its recorded files (tmpfs.py) right after it is mounted.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from ..errors import BadTree, Unsupported
from ..capture.procfs import unescape
from . import Mount, render_mount

TREE_FILE = "isolation/mounts"
# Per-mount flags that a bind mount takes only through a second, remounting call.
_BIND_FLAGS = ("ro", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime",
               "strictatime")


@dataclasses.dataclass(frozen=True)
class MountInfo:
    """One line of /proc/PID/mountinfo (proc(5))."""
    mount_id: int
    parent_id: int
    dev: str            # "major:minor"
    root: str           # path inside the filesystem that this mount shows
    target: str         # mount point, relative to the reading task's root
    options: str        # per-mount options
    fstype: str
    source: str
    super_options: str

    @property
    def key(self):
        return (self.target, self.dev, self.root, self.fstype)


def parse_mountinfo(text: str) -> list[MountInfo]:
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        out.append(MountInfo(int(f[0]), int(f[1]), f[2], unescape(f[3]), unescape(f[4]), f[5],
                             r[0], unescape(r[1]), r[2] if len(r) > 2 else ""))
    return out


def read_mountinfo(pid: int | str) -> list[MountInfo]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return parse_mountinfo(f.read())


def own_mounts(container: list[MountInfo], outside: list[MountInfo]) -> list[MountInfo]:
    """Lines of `container` that `outside` does not have, minus the pid namespace's /proc."""
    seen = {m.key for m in outside}
    return [m for m in container
            if m.key not in seen and not (m.fstype == "proc" and m.target == "/proc")]


def _within(root: str, path: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _bind_source(m: MountInfo, candidates: list[MountInfo]) -> str | None:
    """Path (in the candidates' view) at which m's root is visible, or None."""
    best = None
    for c in candidates:
        if c.dev == m.dev and c is not m and _within(c.root, m.root):
            if best is None or len(c.root) > len(best.root):
                best = c
    if best is None:
        return None
    rest = m.root[len(best.root.rstrip("/")):] if best.root != "/" else m.root
    return os.path.normpath(best.target.rstrip("/") + "/" + rest.lstrip("/"))


def _fs_options(m: MountInfo) -> str:
    extra = [o for o in m.super_options.split(",") if o and o not in ("rw", "ro")]
    return ",".join([m.options] + extra)


def to_fstab(own: list[MountInfo], outside: list[MountInfo]) -> list[Mount]:
    """fstab records for the container's own mounts (in mountinfo order, parents first)."""
    out: list[Mount] = []
    for i, m in enumerate(own):
        source = _bind_source(m, outside + own[:i])
        if source is not None:
            out.append(Mount(source, m.target, "none", "bind," + m.options))
        else:
            out.append(Mount(m.source, m.target, m.fstype, _fs_options(m)))
    return out


def container_mounts(pid: int, reference: int | str) -> list[Mount]:
    """The own mounts of task `pid`, against the mount namespace of task `reference`."""
    outside = read_mountinfo(reference)
    return to_fstab(own_mounts(read_mountinfo(pid), outside), outside)


# -- re-creating (runs inside the new mount namespace) --------------------------------------
Run = Callable[[list], None]   # runs argv; raises OSError/CalledProcessError on failure


def validate(mounts: list[Mount]) -> None:
    """Syntax checks done before anything is created."""
    for m in mounts:
        line = render_mount(m)
        if not m.target.startswith("/") or not m.options:
            raise BadTree(f"mount point must be absolute and options non-empty: {line!r}",
                          path=TREE_FILE)
        if m.is_bind and not m.source.startswith("/"):
            raise BadTree(f"bind source must be an absolute path: {line!r}", path=TREE_FILE)


def missing_paths(mounts: list[Mount]) -> list[str]:
    """Mount points and bind sources this host lacks, one problem line each (a dry run's view;
    a path below an earlier line's mount point is left to the namespace init, which sees it)."""
    out, above = [], []
    for m in mounts:
        for path in ([m.source] if m.is_bind else []) + [m.target]:
            if not any(_within(t, path) for t in above) and not os.path.exists(path):
                out.append(f"{TREE_FILE}: {path} does not exist here (line {render_mount(m)!r})")
        above.append(m.target)
    return out


def mount_argvs(m: Mount) -> list[list[str]]:
    """mount(8) calls that re-create one mount."""
    if not m.is_bind:
        return [["mount", "-t", m.fstype, "-o", m.options, m.source, m.target]]
    flags = [o for o in m.options.split(",") if o in _BIND_FLAGS]
    calls = [["mount", "--bind", m.source, m.target]]
    if flags:
        calls.append(["mount", "-o", ",".join(["remount", "bind"] + flags), m.target])
    return calls


def apply(mounts: list[Mount], run: Run, after: Callable[[Mount], None] = lambda m: None) -> None:
    """Mount each record in order; the first that fails raises Unsupported naming its line.
    `after(m)` runs once m is mounted, before the next line (a tmpfs is filled there)."""
    for m in mounts:
        line = render_mount(m)
        for path in ([m.source] if m.is_bind else []) + [m.target]:
            if not os.path.isdir(path) and not os.path.exists(path):
                raise Unsupported(f"{path} does not exist here (line {line!r})", path=TREE_FILE,
                                  step="mount")
        for argv in mount_argvs(m):
            try:
                run(argv)
            except Exception as e:
                raise Unsupported(f"cannot mount {line!r}: {e}", path=TREE_FILE, step="mount") from e
        after(m)


def private_root_and_proc(run: Run, proc: bool) -> None:
    """Stop mount events from leaking to the host; mount the new pid namespace's /proc."""
    run(["mount", "--make-rprivate", "/"])
    if proc:
        run(["mount", "-t", "proc", "-o", "nosuid,nodev,noexec", "proc", "/proc"])
