"""`ckptfs` command line: one function per subcommand, each a thin wrapper over a module."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from .errors import CkptError
from .model import DEFAULT_CHUNK


def _chunk(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"chunk size {text!r} is not a positive multiple of 4096")
    return n


def check_mountpoint(mnt: str) -> None:
    if not os.path.isdir(mnt):
        raise CkptError("mountpoint is not a directory", path=mnt, step="mount")
    if os.path.ismount(mnt):
        raise CkptError("something is already mounted here", path=mnt, step="mount")
    if os.listdir(mnt):
        raise CkptError("mountpoint is not empty", path=mnt, step="mount")


def check_pid(pid: int) -> None:
    """Refuse what cannot be captured before any thread exists or anything is mounted."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except (FileNotFoundError, ProcessLookupError):
        raise CkptError("no such process", path=f"/proc/{pid}", step="check", err=3) from None
    state = status.get("State", "?")[0]
    if state in "ZX":
        raise CkptError(f"process {pid} is a zombie (state {state}): nothing left to capture",
                        path=f"/proc/{pid}", step="check")
    if int(status.get("Kthread", "0") or 0) or (pid != 1 and not os.path.exists(f"/proc/{pid}/exe")
                                               and status.get("PPid", "") == "2"):
        raise CkptError(f"process {pid} is a kernel thread", path=f"/proc/{pid}", step="check")
    tracer = int(status.get("TracerPid", "0"))
    if tracer and tracer != os.getpid():
        raise CkptError(f"process {pid} is already traced by pid {tracer}", path=f"/proc/{pid}",
                        step="check", err=16)


def close_source(source, *, leave_frozen: bool = False) -> None:
    """Detach from a live tree: thawed (running, untraced) unless asked to stay frozen."""
    if leave_frozen:
        # A tracer that exits lets its tracees run: turn the seized stop into a real stop.
        for pid in source.pids():
            os.kill(pid, signal.SIGSTOP)
    if source.frozen:
        source.thaw()
    if hasattr(source, "close"):
        source.close()


# -- daemonizing ---------------------------------------------------------------------------------
LOG_DIR = "/run/ckptfs"


def daemonize(argv: list[str], mnt: str, timeout: float = 30.0) -> int:
    """Run this command again with -f in a new session; return once the mount is up (0) or the
    child failed (its exit status, its message on our stderr). The child never forks itself:
    forking a Python process that already has threads is unsafe. The daemon's later messages
    go to /run/ckptfs/<mountpoint>.log."""
    os.makedirs(LOG_DIR, exist_ok=True)
    log_path = os.path.join(LOG_DIR, mnt.strip("/").replace("/", "_") + ".log")
    with open(log_path, "ab+") as errlog:
        start = errlog.tell()
        child = subprocess.Popen([sys.executable, "-m", "ckptfs.cli", *argv], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=errlog, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(mnt):
                return 0
            rc = child.poll()
            if rc is not None:
                errlog.seek(start)
                sys.stderr.write(errlog.read().decode(errors="replace"))
                return rc or 1
            time.sleep(0.02)
        child.kill()
        child.wait()
        print(f"ckptfs: {mnt}: mount did not come up within {timeout:.0f} s (log: {log_path})",
              file=sys.stderr)
        return 1


# -- subcommands -----------------------------------------------------------------------------
def cmd_mount(a) -> int:
    mnt = os.path.abspath(a.mountpoint)
    check_mountpoint(mnt)
    if a.images:
        from . import criu
        bad = criu.problems(a.images)  # a bad directory fails here, before anything is mounted
        if bad:
            raise CkptError("; ".join(bad), path=a.images, step="mount --images")
    else:
        check_pid(a.pid)
    if not a.foreground:
        return daemonize([x for x in a.argv if x not in ("-f", "--foreground")] + ["-f"], mnt)
    from . import fs
    if a.images:
        from .criu import ImageSource
        # no commands: a checkpoint on disk neither freezes nor thaws
        ops = fs.CheckpointFS(ImageSource(a.images), chunk_size=a.chunk_size, control={})
    else:
        ops = live_fs(a.pid, a.chunk_size, freeze=a.freeze, container=a.container,
                      track=not a.no_track)
    try:
        fs.serve(ops, mnt, foreground=True)
    finally:
        if ops.clock:
            ops.clock.close()  # trackers unregistered: no trace of them is left in the process
        source = getattr(ops, "live", None)
        if source is not None:
            close_source(source)  # the process goes on exactly as before
    return 0


def live_fs(pid: int, chunk_size: int, *, freeze: bool, container: bool, track: bool = True):
    """The live view of PID's tree. With `track`, written-page trackers are set up first (before
    anything else traces the process) and chunk mtimes follow them (rsync pre-copy)."""
    from . import fs
    from .capture import dirty
    from .capture.linux import LiveSource
    source = LiveSource(pid)
    source.container = container  # isolation/ is compared with the host, not the parent
    clock = dirty.clock_for(source.pids(), chunk_size) if track else None
    shown = source
    if container:  # the tree shows the container's own pids; signals still go to host pids
        from .isolation.pidns import PidNsView
        shown = PidNsView(source)
        if clock:
            clock.trackers = {shown.ns_pid(p): t for p, t in clock.trackers.items()}
    holder: dict = {}

    def act(fn):
        def run():
            fn()
            holder["fs"].changed()
        return run

    def kill():
        source.kill()
        source.thaw()

    control = {"freeze": act(source.freeze), "thaw": act(source.thaw), "kill": act(kill)}
    st = os.stat(f"/proc/{pid}")
    ops = fs.CheckpointFS(shown, chunk_size=chunk_size, owner=(st.st_uid, st.st_gid),
                          control=control, clock=clock)
    ops.live = source  # the LiveSource itself: host pids, thaw and close at unmount
    holder["fs"] = ops
    if freeze:
        control["freeze"]()
    return ops


def cmd_dump(a) -> int:
    from . import tree
    from .capture.linux import LiveSource
    check_pid(a.pid)
    out = os.path.abspath(a.dir)
    if os.path.exists(out) and os.listdir(out):
        raise CkptError("directory is not empty", path=out, step="dump")
    source = LiveSource(a.pid)
    source.container = a.container
    t0 = time.monotonic()
    try:
        source.freeze()
        pids = source.pids()      # host pids: what --kill signals
        shown = source
        if a.container:           # the tree records the container's own pids (pid 1 ...)
            from .isolation.pidns import PidNsView
            shown = PidNsView(source)
        files = tree.write_tree(shown, out, a.chunk_size)
        if a.kill:
            source.kill(pids)
    finally:
        close_source(source, leave_frozen=a.leave_frozen)
    size = sum(s for s, _ in files.values())
    print(f"dumped {len(pids)} task(s), {len(files)} files, {size / 1e6:.1f} MB "
          f"in {time.monotonic() - t0:.2f} s to {out}", file=sys.stderr)
    return 0


def cmd_criu(a) -> int:
    from . import criu, tree
    if a.action == "export":
        criu.export(tree.TreeSource(a.src), a.dst)
    else:
        tree.write_tree(criu.ImageSource(a.src), a.dst, a.chunk_size)
    return 0


def cmd_restore(a) -> int:
    if a.os == "freebsd":
        return restore_freebsd(a)
    from . import restore
    result = restore.restore(a.dir, pidns=a.pidns, same_pids=a.same_pids, dry_run=a.dry_run,
                             container=a.container)
    if a.dry_run:
        problems = getattr(result, "problems", [])
        for p in problems:
            print(p)
        return 1 if problems else 0
    for old, new in sorted(result.pids.items()):
        print(f"{old} -> {new}")
    for cg in getattr(result, "cgroups", None) or []:
        print(f"cgroup {cg} (remove it once the container has ended)", file=sys.stderr)
    return 0


def open_source(path: str):
    """A tree directory or a CRIU image directory, as a Source."""
    from . import tree
    if os.path.exists(os.path.join(path, "inventory.img")):
        from .criu import ImageSource
        return ImageSource(path)
    return tree.TreeSource(path)


def restore_freebsd(a) -> int:
    """FreeBSD restore needs a FreeBSD kernel; here it can only show the plan."""
    from .translate import freebsd
    if not a.dry_run:
        raise CkptError("restoring on FreeBSD needs a FreeBSD host; use --dry-run to see the plan",
                        path=a.dir, step="restore --os freebsd")
    print(freebsd.plan_dry_run(open_source(a.dir), a.dir, strict=a.strict))
    return 0


def cmd_target(a) -> int:
    from . import targetfs
    return targetfs.main_target(a)


def cmd_watch(a) -> int:
    from . import watch
    return watch.run_watch(a.spool) or 0


def cmd_migrate(a) -> int:
    from . import migrate
    return migrate.run(a) or 0


def cmd_receive(a) -> int:
    from . import stream
    return stream.receive(a.job, timeout=a.timeout)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptfs", description="A running process as files, and back.")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("mount", help="show a live process tree (or a CRIU image directory) as files")
    m.add_argument("-f", "--foreground", action="store_true")
    m.add_argument("--freeze", action="store_true", help="freeze the tree right after mounting")
    m.add_argument("--container", action="store_true", help="PID is a container's init")
    m.add_argument("--images", metavar="CRIUDIR", help="show a CRIU image directory instead of a process")
    m.add_argument("--chunk-size", type=_chunk, default=DEFAULT_CHUNK)
    m.add_argument("--no-track", action="store_true",
                   help="no written-page tracking (chunk mtimes stay the mount's)")
    m.add_argument("pid", type=int, nargs="?")
    m.add_argument("mountpoint")
    m.set_defaults(fn=cmd_mount)

    d = sub.add_parser("dump", help="freeze a process tree, write its tree to DIR, thaw it")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--leave-frozen", action="store_true")
    g.add_argument("--kill", action="store_true")
    d.add_argument("--container", action="store_true")
    d.add_argument("--chunk-size", type=_chunk, default=DEFAULT_CHUNK)
    d.add_argument("pid", type=int)
    d.add_argument("dir")
    d.set_defaults(fn=cmd_dump)

    c = sub.add_parser("criu", help="convert between a tree and a CRIU image directory")
    c.add_argument("action", choices=("export", "import"))
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--chunk-size", type=_chunk, default=DEFAULT_CHUNK)
    c.set_defaults(fn=cmd_criu)

    r = sub.add_parser("restore", help="make the tree in DIR run again")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--pidns", action="store_true", help="new PID namespace with the original pids")
    g.add_argument("--same-pids", action="store_true")
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--container", action=argparse.BooleanOptionalAction, default=None,
                   help="re-create the tree's namespaces, network, mounts and cgroup limits "
                        "(default: when isolation/own lists any)")
    r.add_argument("--os", choices=("linux", "freebsd"), default="linux")
    r.add_argument("--strict", action="store_true", help="refuse lossy translations")
    r.add_argument("dir")
    r.set_defaults(fn=cmd_restore)

    t = sub.add_parser("target", help="a writable mount: a complete copied tree restores")
    t.add_argument("-f", "--foreground", action="store_true")
    t.add_argument("--store", default="/var/lib/ckptfs")
    t.add_argument("--no-auto", action="store_true")
    t.add_argument("--os", choices=("linux", "freebsd"), default="linux")
    t.add_argument("--dry-run", action="store_true")
    t.add_argument("mountpoint")
    t.set_defaults(fn=cmd_target)

    w = sub.add_parser("watch", help="restore trees copied into an ordinary directory")
    w.add_argument("spool")
    w.set_defaults(fn=cmd_watch)

    mg = sub.add_parser("migrate", help="live-migrate a process tree with rsync pre-copy")
    mg.add_argument("--keep-source", action="store_true")
    mg.add_argument("--timeout", type=float, default=120.0,
                    help="seconds the final pass and the restore may take (then the source "
                         "thaws)")
    mg.add_argument("pid", type=int)
    mg.add_argument("dest", metavar="[USER@]HOST:PATH/JOB")
    mg.set_defaults(fn=cmd_migrate)

    rv = sub.add_parser("receive", help="write a migration's final-pass stream (stdin) into "
                                        "a job; used by `ckptfs migrate` over ssh")
    rv.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to follow JOB/status after the stream")
    rv.add_argument("job")
    rv.set_defaults(fn=cmd_receive)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    a.argv = argv
    if a.cmd == "mount" and a.images is None and a.pid is None:
        parser().error("mount needs a PID (or --images CRIUDIR)")
    try:
        return a.fn(a) or 0
    except CkptError as e:
        print(f"ckptfs {a.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
