"""FUSE mounts for tests: start a daemon, wait for the mount, and always unmount and reap it.

`fuse_mount(cmd, mnt)` is a context manager. The daemon command is a parameter (the ckptfs CLI,
or anything else that mounts on `mnt` and stays in the foreground). It polls until `mnt` is a
mount point; on timeout or early daemon death it fails with the daemon's stderr. On leaving --
normally or by an exception -- it unmounts (`fusermount3 -u`, then lazily with `-uz` as a last
resort) and reaps the daemon, killing it by pid if it does not exit by itself.

A `runner` decides where things happen: `Local` (this machine's namespaces) or a
`helpers.hosts.Host` (its own network and mount namespaces). Both offer
`spawn(argv, **kw) -> Proc`, `run(argv, **kw) -> CompletedProcess` and `path(p) -> str`, the
path under which the test process itself sees the runner's file `p`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

from . import procs as _procs

FUSERMOUNT = "fusermount3"


def ckptfs_cmd(*args) -> list[str]:
    """The ckptfs CLI as a command line, e.g. `ckptfs_cmd("mount", "-f", pid, mnt)`."""
    return [sys.executable, "-m", "ckptfs.cli", *map(str, args)]


class Local:
    """Runs commands in the test's own namespaces; spawned processes go to `procset`."""

    def __init__(self, procset: _procs.ProcSet):
        self.procset = procset

    def spawn(self, argv: list, **kw) -> _procs.Proc:
        return self.procset.spawn(argv, **kw)

    def run(self, argv: list, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 30)
        return subprocess.run([str(a) for a in argv], **kw)

    def path(self, p: str | os.PathLike) -> str:
        return os.fspath(p)


def is_mounted(view: str) -> bool:
    """True if `view` is a mount point.

    Not os.path.ismount: that one resolves ".." with realpath, which leaves a host's namespace
    (/proc/HOLDER/root/... becomes /...), and it calls a dead FUSE mount (ENOTCONN) unmounted.
    """
    try:
        here = os.lstat(view)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # the daemon is gone but the mount is still there
            return True
        if e.errno == errno.ENOENT:
            return False
        raise
    up = os.lstat(os.path.join(view, ".."))
    return here.st_dev != up.st_dev or here.st_ino == up.st_ino


class Mount:
    """A live FUSE mount: `mnt` as the runner names it, `view` as this process sees it."""

    def __init__(self, mnt: str, view: str, daemon: _procs.Proc):
        self.mnt, self.view, self.daemon = mnt, view, daemon

    def __fspath__(self) -> str:
        return self.view


def wait_mounted(view: str, daemon: _procs.Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(view):
        if not daemon.alive():
            raise AssertionError(f"FUSE daemon died before {view} was mounted: "
                                 f"{daemon.describe()}\n{daemon.stderr_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{view} not mounted after {timeout}s: {daemon.describe()}\n"
                                 f"{daemon.stderr_text()}")
        time.sleep(0.02)


def unmount(runner, mnt: str, view: str) -> bool:
    """Unmount `mnt`; lazily if a plain unmount fails. Raises if it stays mounted.

    Returns False if it was not mounted (nothing to do)."""
    if not is_mounted(view):
        return False
    first = runner.run([FUSERMOUNT, "-u", mnt])
    if first.returncode == 0:
        return True
    lazy = runner.run([FUSERMOUNT, "-uz", mnt])
    if lazy.returncode != 0 or is_mounted(view):
        raise AssertionError(f"could not unmount {mnt}: {first.stderr.strip()} / {lazy.stderr.strip()}")
    return True


def reap(daemon: _procs.Proc, timeout: float = 5.0) -> None:
    """Give the daemon `timeout` seconds to exit after its unmount, then kill it."""
    deadline = time.monotonic() + timeout
    while daemon.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    daemon.kill()


@contextlib.contextmanager
def fuse_mount(cmd: list, mnt: str | os.PathLike, *, runner=None, timeout: float = 10.0, **spawn_kw):
    """Run the FUSE daemon `cmd` (which mounts on `mnt`) and yield a `Mount` once mounted.

    Without a runner, a private ProcSet is used (its processes are killed here too).
    """
    private = None if runner else _procs.ProcSet()
    runner = runner or Local(private)
    mnt = os.fspath(mnt)
    view = runner.path(mnt)
    Path(view).mkdir(parents=True, exist_ok=True)
    if is_mounted(view):
        raise AssertionError(f"{mnt} is already a mount point")
    daemon = runner.spawn(cmd, **spawn_kw)
    try:
        wait_mounted(view, daemon, timeout)
        yield Mount(mnt, view, daemon)
    finally:
        unmounted = False
        try:
            unmounted = unmount(runner, mnt, view)
        finally:
            # A daemon whose mount just went away exits by itself; any other one is killed now.
            reap(daemon, 5.0 if unmounted else 0.0)
            if private is not None:
                private.kill_all()
