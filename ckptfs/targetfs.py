"""`ckptfs target`: the FUSE adapter over target.TargetCore (paths in, errnos out).

Every operation passes through one boundary (`_boundary`): OSError keeps its errno,
errors.CkptError answers its class's errno, anything else is logged with its traceback and
answers EIO. Nothing a request does can stop the daemon or unmount the mount: an
empty-looking mount would make `rsync --delete` wipe the other side.

Caching policy: real files are plain pass-through files that only this daemon changes, so
attributes and names are cached for a second (attr_timeout, entry_timeout); a failed lookup is
not cached (a copy creates names all the time). The job's `status` and `ctl` are opened with
direct_io: status is a snapshot taken at open, its size is exact at getattr time.

getxattr/setxattr are deliberately not implemented (libfuse answers ENOSYS, and the kernel then
stops asking): with an ENODATA answer the kernel would ask again before every write.
`rsync -a` and `cp -a` carry no xattrs; `rsync -X` is not supported.

Usage: python -m ckptfs.targetfs [--store DIR] [--no-auto] [-f] MOUNTPOINT
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import logging
import os
import subprocess
import sys

from .errors import CkptError
from .target import DEBOUNCE, DEFAULT_STORE, UTIME_NOW, UTIME_OMIT, TargetCore

log = logging.getLogger("ckptfs.target")


def _boundary(fn):
    """The one place where exceptions become errnos."""
    @functools.wraps(fn)
    def op(self, *args):
        import mfusepy
        try:
            return fn(self, *args)
        except CkptError as e:
            log.warning("%s %s: %s", fn.__name__, args[:1], e)
            raise mfusepy.FuseOSError(e.errno) from None
        except OSError as e:
            if not e.errno:
                log.exception("%s %s: OSError without errno", fn.__name__, args[:1])
            elif e.errno not in _QUIET:
                log.info("%s %s: %s", fn.__name__, args[:1], e)
            raise mfusepy.FuseOSError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s %s: internal error", fn.__name__, args[:1])
            raise mfusepy.FuseOSError(errno.EIO) from None
    return op


_QUIET = (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY)   # ordinary answers, not incidents


def _operations_class():
    import mfusepy

    class TargetFS(mfusepy.Operations):
        """Thin adapter: each method unpacks FUSE arguments and calls the core."""
        use_ns = True

        def __init__(self, core: TargetCore):
            self.core = core

        def init(self, path):
            self.core.start()   # after daemonizing: a thread started before fork would be lost

        def destroy(self, path):
            self.core.stop()

        @_boundary
        def getattr(self, path, fh=None):
            return self.core.getattr(path, _fh(fh))

        @_boundary
        def readdir(self, path, fh):
            return self.core.readdir(path)

        @_boundary
        def readlink(self, path):
            return self.core.readlink(path)

        @_boundary
        def statfs(self, path):
            return self.core.statfs(path)

        @_boundary
        def mkdir(self, path, mode):
            self.core.mkdir(path, mode)
            return 0

        @_boundary
        def rmdir(self, path):
            self.core.rmdir(path)
            return 0

        @_boundary
        def unlink(self, path):
            self.core.unlink(path)
            return 0

        @_boundary
        def mknod(self, path, mode, dev):
            self.core.mknod(path, mode, dev)
            return 0

        @_boundary
        def symlink(self, target, source):
            self.core.symlink(target, source)
            return 0

        @_boundary
        def link(self, target, source):
            self.core.link(target, source)
            return 0

        @_boundary
        def rename(self, old, new, flags=0):
            self.core.rename(old, new, flags)
            return 0

        @_boundary
        def chmod(self, path, mode):
            self.core.chmod(path, mode)
            return 0

        @_boundary
        def chown(self, path, uid, gid):
            self.core.chown(path, uid, gid)
            return 0

        @_boundary
        def utimens(self, path, times=None):
            self.core.utimens(path, times)
            return 0

        @_boundary
        def truncate(self, path, length, fh=None):
            self.core.truncate(path, length, _fh(fh))
            return 0

        @_boundary
        def create(self, path, mode, fi):
            fi.fh = self.core.create(path, mode, fi.flags)
            fi.direct_io = self.core.is_virtual(fi.fh)
            return 0

        @_boundary
        def open(self, path, fi):
            fi.fh = self.core.open(path, fi.flags)
            fi.direct_io = self.core.is_virtual(fi.fh)
            return 0

        @_boundary
        def read(self, path, size, offset, fi):
            return self.core.read(fi.fh, size, offset)

        @_boundary
        def write(self, path, data, offset, fi):
            return self.core.write(fi.fh, data, offset)

        @_boundary
        def flush(self, path, fi):
            self.core.flush(fi.fh)
            return 0

        @_boundary
        def fsync(self, path, datasync, fi):
            self.core.fsync(fi.fh, bool(datasync))
            return 0

        @_boundary
        def release(self, path, fi):
            self.core.release(fi.fh)
            return 0

    return TargetFS


def _ns(ts) -> int:
    if ts.tv_nsec in (UTIME_NOW, UTIME_OMIT):
        return ts.tv_nsec
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def _fh(fi):
    return None if fi is None else fi.fh


def _fuse_class():
    import mfusepy

    class FUSE(mfusepy.FUSE):
        """mfusepy drops rename's flags; the core needs RENAME_NOREPLACE to answer honestly."""

        def rename_fuse_3(self, old, new, flags):
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

        def utimens_fuse_3(self, path, buf, fip):
            """Keeps UTIME_NOW / UTIME_OMIT recognisable (libfuse leaves tv_sec unset then)."""
            times = None
            if buf:
                times = tuple(_ns(ts) for ts in (buf.contents.actime, buf.contents.modtime))
            return self.operations.utimens(path.decode(self.encoding, self.errors), times)

    return FUSE


def run_target(mountpoint: str, store: str = DEFAULT_STORE, auto: bool = True,
               foreground: bool = False, *, restore=None, restore_opts: dict | None = None,
               debounce: float = DEBOUNCE) -> None:
    """Mount the target at mountpoint and serve until unmounted (daemonizes unless foreground).

    restore: the restore callable (tree_dir, **restore_opts) -> result with .pids; None means
    ckptfs.restore.restore. Raises CkptError if the store is in use by another daemon."""
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    os.makedirs(store, mode=0o700, exist_ok=True)
    lock = _lock_store(store)
    _setup_log(store, foreground)
    _clear_stale_mount(mountpoint)
    import mfusepy
    core = TargetCore(store, auto=auto, restore=restore, restore_opts=restore_opts,
                      debounce=debounce, caller=lambda: mfusepy.fuse_get_context()[2])
    log.info("serving %s from %s (auto=%s)", mountpoint, store, auto)
    _fuse_class()(_operations_class()(core), mountpoint, raw_fi=True, foreground=foreground,
                  fsname="ckptfs-target", subtype="ckptfs", attr_timeout=1.0,
                  entry_timeout=1.0, negative_timeout=0.0)
    os.close(lock)


def _lock_store(store: str) -> int:
    fd = os.open(os.path.join(store, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CkptError("store is in use by another ckptfs target", path=store,
                        err=errno.EBUSY) from None
    return fd


def _setup_log(store: str, foreground: bool) -> None:
    handlers = [logging.FileHandler(os.path.join(store, "log"))]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(process)d %(levelname)s %(message)s")


def _clear_stale_mount(mountpoint: str) -> None:
    """A daemon killed -9 leaves a dead mount (ENOTCONN): detach it so a new one can start."""
    try:
        os.listdir(mountpoint)     # not stat: the kernel may answer that from its cache
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("%s: detaching the dead mount of a previous daemon", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=True)


def _restore_from(spec: str):
    """'module:function' -> the callable (a test seam for the restore step)."""
    import importlib
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


class DryRun:
    """What a dry-run restore returns: nothing started, the plan written next to the state."""

    def __init__(self, summary: str):
        self.pids, self.dry_run = {}, summary


def dry_run_restore(os_name: str):
    """A restore callable that only plans; the status says `dry run: ...`.

    linux: the restore's problems (or that there are none) go to STORE/state/<job>.plan.
    freebsd: the FreeBSD plan is written as files into the job itself, JOB/plan/ (jail.conf,
    rctl.rules, tasks/<pid>/regs, fds/<n>/flags, sigactions, lossy ...), to read and edit
    through the mount; `restore` written to JOB/ctl again checks the edited plan against the
    tree (a bad edit fails the job naming JOB/plan/<file> and the value; fix it and write
    restore again). Remove JOB/plan to have it written afresh. STORE/state/<job>.plan gets the
    summary and the lossy list."""
    def plan(tree_dir, **opts):
        store, job = os.path.dirname(os.path.dirname(tree_dir)), os.path.basename(tree_dir)
        out = os.path.join(store, "state", f"{job}.plan")
        if os_name == "freebsd":
            summary, text = _freebsd_plan(tree_dir, job)
        else:
            from .restore import restore
            problems = restore(tree_dir, dry_run=True).problems
            text = "\n".join(problems) or "no problems: the tree would restore"
            summary = f"{len(problems)} problems, see {out}" if problems else "would restore"
        with open(out, "w") as f:
            f.write(text.rstrip("\n") + "\n")
        return DryRun(summary)
    return plan


def _freebsd_plan(tree_dir: str, job: str) -> tuple[str, str]:
    """(status summary, state file text); errors name the plan file as the mount shows it."""
    from .translate import check_binary_os, freebsd
    from .tree import TreeSource
    kept = os.path.isdir(os.path.join(tree_dir, "plan"))
    try:
        source = TreeSource(tree_dir)
        check_binary_os(source, here="freebsd")
        done = freebsd.plan_dry_run(source, tree_dir, strict=False)
    except CkptError as e:
        hint = f" (fix it, or remove {job}/plan to have it written afresh)" if kept else ""
        raise type(e)(str(e).replace(tree_dir, job) + hint) from None
    summary = str(done).replace(tree_dir, job)
    return summary, summary + "\n" + "".join(r.line() + "\n" for r in done.lossy)


def freebsd_restore(tree_dir: str, **opts):
    """Restore on a FreeBSD host from the job's plan if there is one (edits applied), else
    from a fresh translation of the tree."""
    from .restore import freebsd as restore_freebsd
    from .translate import check_binary_os, freebsd
    from .tree import TreeSource
    source = TreeSource(tree_dir)
    check_binary_os(source, here="freebsd")
    plan_dir, plan = os.path.join(tree_dir, "plan"), None
    if os.path.isdir(plan_dir):
        freebsd.check_plan(source, plan_dir)
        plan = freebsd.read_plan(plan_dir)
    new = restore_freebsd.restore(source, plan=plan)
    return _Restored(dict(zip(source.pids(), new)))


class _Restored:
    def __init__(self, pids: dict):
        self.pids = pids


def main_target(argv=None) -> int:
    """`ckptfs target [--store DIR] [--no-auto] [-f] [--os linux|freebsd] [--dry-run] MOUNTPOINT`.

    argv: a list of arguments, or the lead CLI's argparse Namespace with the same fields."""
    a = argv if isinstance(argv, argparse.Namespace) else _parser().parse_args(argv)
    restore = None
    os_name = getattr(a, "os", "linux")
    if getattr(a, "restore_with", None):
        restore = _restore_from(a.restore_with)
    elif getattr(a, "dry_run", False):
        restore = dry_run_restore(os_name)
    elif os_name == "freebsd":
        if not sys.platform.startswith("freebsd"):
            print(f"ckptfs target: --os freebsd restores on a FreeBSD host only (this is "
                  f"{sys.platform}); add --dry-run to see and edit the plan as JOB/plan/",
                  file=sys.stderr)
            return 1
        restore = freebsd_restore
    opts = {} if restore else {"log": lambda msg: log.info("restore: %s", msg)}
    try:
        run_target(a.mountpoint, a.store, not a.no_auto, a.foreground, restore=restore,
                   restore_opts=opts, debounce=getattr(a, "debounce", DEBOUNCE))
    except CkptError as e:
        print(f"ckptfs target: {e}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptfs target",
                                description="Mount a target: each top-level directory is a "
                                            "job that restores once its tree is complete.")
    p.add_argument("--store", default=DEFAULT_STORE, help="where jobs are staged (%(default)s)")
    p.add_argument("--no-auto", action="store_true", help="restore only on `restore` > JOB/ctl")
    p.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    p.add_argument("--os", choices=("linux", "freebsd"), default="linux")
    p.add_argument("--dry-run", action="store_true", help="plan only, start nothing")
    p.add_argument("--debounce", type=float, default=DEBOUNCE, help=argparse.SUPPRESS)
    p.add_argument("--restore-with", help=argparse.SUPPRESS)   # module:function, for tests
    p.add_argument("mountpoint")
    return p


if __name__ == "__main__":
    sys.exit(main_target())
