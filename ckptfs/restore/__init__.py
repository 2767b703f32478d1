"""Restore: a checkpoint becomes running processes again.

    restore(path_or_source, *, pidns=False, same_pids=False, dry_run=False, os_name="linux",
            log=None, container=None) -> RestoreResult

`path_or_source` is a tree directory (ckptfs.tree.TreeSource), a CRIU image directory
(recognised by its inventory.img; ckptfs.criu.ImageSource) or any model.Source.

All or nothing: the whole checkpoint is validated first (plan.make_plan: addresses, prots,
chunks, files and their sizes, registers, xsave features, vDSO, descriptor kinds); a problem
there raises RestoreFailed listing every problem before anything is created. A failure later
kills and reaps every task created. `dry_run=True` only validates and returns the problems.

A container (isolation/own lists namespace kinds, or `container=True`; `container=False`
never) gets its namespaces, hostname, network, mounts and cgroup limits back first, and its
tasks inside with their pids (restore/container.py); `pid` of its own implies `pidns`.

The FreeBSD restore lives in restore/freebsd.py (driven by the FreeBSD translation's plan).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import threading
import time

from ..errors import CkptError, RestoreFailed, Unsupported
from ..model import Source


@dataclasses.dataclass
class RestoreResult:
    pids: dict[int, int] = dataclasses.field(default_factory=dict)   # old pid -> new host pid
    problems: list[str] = dataclasses.field(default_factory=list)    # dry run: what would fail
    warnings: list[str] = dataclasses.field(default_factory=list)
    timing: dict[str, float] = dataclasses.field(default_factory=dict)
    cgroups: list[str] = dataclasses.field(default_factory=list)     # a container's, left to it
    init: int | None = None   # host pid of a new pid namespace's init: killing it ends them all

    @property
    def root(self) -> int | None:
        return next(iter(self.pids.values()), None)


def open_source(path_or_source) -> Source:
    """A Source for a tree directory, a CRIU image directory, or the Source itself."""
    if isinstance(path_or_source, Source):
        return path_or_source
    path = os.fspath(path_or_source)
    if not os.path.isdir(path):
        raise RestoreFailed("not a directory", path=path, step="open checkpoint")
    if os.path.exists(os.path.join(path, "inventory.img")):
        from ..criu import ImageSource
        return ImageSource(path)
    from ..tree import TreeSource
    return TreeSource(path)


def tree_problems(source: Source) -> list[str]:
    """A tree must be frozen and every file its manifest lists present with its size.
    (Checksums are the target daemon's gate, manifest.check; here only what is cheap.)"""
    doc = getattr(source, "manifest", None)
    root = getattr(source, "root", None)
    if not isinstance(doc, dict) or not isinstance(root, str):
        return []
    if doc.get("state") != "frozen":
        return [f"{root}/manifest: state is {doc.get('state')!r}: only a frozen tree restores"]
    out = []
    for rel, entry in doc.get("files", {}).items():
        path = f"{root}/{rel}"        # manifest.load refused absolute and ../ paths
        try:
            size = os.lstat(path).st_size
        except FileNotFoundError:
            out.append(f"{path}: missing (listed in the manifest)")
            continue
        if size != entry.get("size"):
            out.append(f"{path}: {size} bytes, the manifest says {entry.get('size')}")
    return out


def binary_problems(source: Source) -> list[str]:
    """A native FreeBSD binary cannot run on Linux (only Linux binaries cross, under the
    Linuxulator, the other way)."""
    from ..translate import check_binary_os
    try:
        check_binary_os(source, here="linux")
    except CkptError as e:
        return [str(e)]
    return []


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def quiet_gc():
    """No cyclic garbage collection while a restore runs (nested and concurrent restores
    count): parsing a tree allocates enough objects to set off full collections, and one
    landed in the middle of a restore costs several milliseconds of a ~100 ms restore (a
    restore makes no garbage cycles worth collecting then; collection resumes after)."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()


def restore(path_or_source, *, pidns: bool = False, same_pids: bool = False,
            dry_run: bool = False, os_name: str = "linux", log=None,
            container: bool | None = None) -> RestoreResult:
    with quiet_gc():
        return _restore(path_or_source, pidns=pidns, same_pids=same_pids, dry_run=dry_run,
                        os_name=os_name, log=log, container=container)


def _restore(path_or_source, *, pidns: bool, same_pids: bool, dry_run: bool, os_name: str,
             log, container: bool | None) -> RestoreResult:
    if os_name != "linux":
        raise Unsupported(f"restore on {os_name} runs through its translation plan "
                          "(ckptfs restore --os freebsd)", step="restore")
    if pidns and same_pids:
        raise RestoreFailed("pidns and same_pids exclude each other", step="restore")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    from .plan import make_plan
    t0 = time.monotonic()
    try:
        source = open_source(path_or_source)
    except CkptError as e:
        if dry_run:
            return RestoreResult(problems=[str(e)])
        raise
    from . import container as ct
    try:
        iso = ct.isolation_of(source, container)
    except CkptError as e:
        if dry_run:
            return RestoreResult(problems=[str(e)])
        raise
    t1 = time.monotonic()
    problems = tree_problems(source) + binary_problems(source)
    if iso is not None:
        problems += ct.problems(source, iso, same_pids)
        pidns = pidns or ("pid" in iso.own_namespaces and not same_pids)
    plan = make_plan(source, same_pids=same_pids, pidns=pidns,
                     userns=iso is not None and "user" in iso.own_namespaces)
    plan.problems[:0] = problems
    timing = {"parse": t1 - t0, "plan": time.monotonic() - t1}
    if dry_run:
        return RestoreResult(problems=plan.problems, warnings=plan.warnings)
    if plan.problems:
        raise RestoreFailed("the checkpoint cannot be restored:\n  " + "\n  ".join(plan.problems),
                            step="validate")
    if iso is not None:
        r = ct.run(plan, iso, pidns=pidns, same_pids=same_pids, log=log)
        return RestoreResult(pids=r.pids, warnings=plan.warnings, timing={**timing, **r.timing},
                             cgroups=r.cgroups, init=r.init)
    from .linux import LinuxRestorer
    r = LinuxRestorer(plan, pidns=pidns, same_pids=same_pids, log=log)
    pids = r.run()
    return RestoreResult(pids=pids, warnings=plan.warnings, timing={**timing, **r.timing},
                         init=ns_init(r, pids, pidns))


def ns_init(r, pids: dict[int, int], pidns: bool) -> int | None:
    """The new pid namespace's init: the reaper made for it, or the root when it was pid 1."""
    if not pidns:
        return None
    return r.init or pids.get(1)


# The Linux restore machinery is loaded with the package, not on the first restore: a
# daemon's first restore (a migration's downtime) would otherwise pay ~50 ms of imports.
from . import container, linux, memory, plan  # noqa: E402,F401
