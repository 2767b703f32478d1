"""`ckptfs watch SPOOL`: the target's completion rule for trees copied into a plain directory.

For hosts where FUSE is not wanted: copy a tree to SPOOL/<job>/ (cp -a, rsync -a, tar -x, scp),
and the job restores once its tree is complete, at most once, exactly as with `ckptfs target`
(target.Completion does the work).

    SPOOL/<job>/                 the job's tree (never written by the watcher)
    SPOOL/.ckptfs/<job>.status   the job's status line: waiting: ..., verifying, restoring,
                                 restored pid=N, failed: ...
    SPOOL/.ckptfs/<job>.json     persisted state (restore attempted, restored, pids)

The status is kept outside the job's directory because a copy may still be writing there (and
`rsync --delete` would remove it). Names starting with `.` at the top of SPOOL are not jobs.

"Copy finished" is a debounced event: every change under SPOOL/<job> (inotify through
watchdog: created, modified, attributes, closed after writing, moved, deleted) pushes the job's
check `debounce` seconds later. Opening and reading files is not a change, so the verifier's
own reads (which also do not touch atime) do not re-arm it. Nothing here can tell that a writer
merely paused: a check that runs during a pause finds the tree incomplete and costs only a
walk; the checksums decide, never timing.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from .target import Completion

log = logging.getLogger("ckptfs.watch")

DEBOUNCE = 0.5
STATE_DIR = ".ckptfs"
CHANGES = ("created", "deleted", "modified", "moved", "closed", "attrib")


class Watcher:
    """Watches SPOOL; start() then stop(). restore as for target.Completion."""

    def __init__(self, spool: str, *, restore=None, restore_opts: dict | None = None,
                 debounce: float = DEBOUNCE):
        self.spool = os.path.abspath(spool)
        if not os.path.isdir(self.spool):
            raise FileNotFoundError(2, f"spool {self.spool} is not a directory")
        self.completion = Completion(os.path.join(self.spool, STATE_DIR), auto=True,
                                     restore=restore, restore_opts=restore_opts,
                                     debounce=debounce)
        self._lock = threading.Lock()
        self._observer = None

    def start(self) -> None:
        from watchdog.observers import Observer
        self._observer = Observer()
        self._observer.schedule(_handler_class()(self), self.spool, recursive=True)
        self._observer.start()              # first watch, then scan: no copy slips between
        for name in sorted(os.listdir(self.spool)):
            self._job(name)
        self.completion.start()

    def stop(self) -> None:
        if self._observer:
            self._observer.stop()
            self._observer.join()
        self.completion.stop()

    def job_of(self, path: str) -> str | None:
        """The job a path under SPOOL belongs to, or None (the spool itself, dot names)."""
        rel = os.path.relpath(os.fsdecode(path), self.spool)
        name = rel.split(os.sep, 1)[0]
        if rel == "." or name.startswith("."):
            return None
        return name

    def changed(self, path: str) -> None:
        name = self.job_of(path)
        if name is None:
            return
        if not os.path.isdir(os.path.join(self.spool, name)):
            self._gone(name)
        elif self._job(name):
            self.completion.changed(name)

    def _job(self, name: str) -> bool:
        """Make sure job `name` is known if its directory exists; whether it is a job."""
        tree = os.path.join(self.spool, name)
        if name.startswith(".") or not os.path.isdir(tree) or os.path.islink(tree):
            return False
        with self._lock:
            if name not in self.completion.names():
                log.info("job %s: found", name)
                self.completion.add(name, tree)
        return True

    def _gone(self, name: str) -> None:
        with self._lock:
            if name in self.completion.names():
                log.info("job %s: removed", name)
                self.completion.forget(name)


def _handler_class():
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):
        """watchdog dispatches every event here; only changes count (module docstring)."""

        def __init__(self, watcher: Watcher):
            self.watcher = watcher

        dispatch = _dispatch

    return Handler

def _dispatch(self, event) -> None:
    if event.event_type not in CHANGES:
        return
    try:
        self.watcher.changed(event.src_path)
        if getattr(event, "dest_path", ""):
            self.watcher.changed(event.dest_path)
    except Exception:   # the observer thread must survive any one event
        log.exception("event %s: not handled", event)


def run_watch(spool: str, *, restore=None, restore_opts: dict | None = None,
              debounce: float = DEBOUNCE) -> None:
    """Watch spool in the foreground until SIGINT or SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    w = Watcher(spool, restore=restore, restore_opts=restore_opts, debounce=debounce)
    w.start()
    log.info("watching %s (status in %s)", w.spool, os.path.join(w.spool, STATE_DIR))
    try:
        done.wait()
    finally:
        w.stop()


def main_watch(argv: list[str] | None = None) -> int:
    """`ckptfs watch [--debounce S] SPOOL`."""
    import argparse
    import importlib
    p = argparse.ArgumentParser(prog="ckptfs watch",
                                description="Restore trees copied into SPOOL/<job>/ once complete.")
    p.add_argument("--debounce", type=float, default=DEBOUNCE,
                   help="quiet seconds before a job is checked (%(default)s)")
    p.add_argument("--restore-with", help=argparse.SUPPRESS)   # module:function, for tests
    p.add_argument("spool")
    a = p.parse_args(argv)
    restore = None
    if a.restore_with:
        mod, _, fn = a.restore_with.partition(":")
        restore = getattr(importlib.import_module(mod), fn)
    run_watch(a.spool, restore=restore, debounce=a.debounce)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_watch())
