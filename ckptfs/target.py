"""The write side's core, FUSE-free: jobs staged in a store, the completion rule, restore once.

Store layout (`ckptfs target --store DIR`, default /var/lib/ckptfs):

    DIR/jobs/<job>/...      the job trees, plain files: the mount passes every request through
                            to them (the FUSE file handle is the real fd), so a killed daemon
                            loses nothing and a restarted one finds the jobs again
    DIR/state/<job>.json    what must survive the daemon: restore attempted, restored, pids
    DIR/state/<job>.status  the job's status line (also readable as MOUNT/<job>/status)
    DIR/log                 the daemon's log

Each top-level directory of the mount is one job. `<job>/ctl` and `<job>/status` are the job's
own control files (docs/FORMAT.md "Top level"): a copied-in ctl or status (written by cp, or an
rsync temp file renamed over it) is accepted and discarded; only the words `restore` and
`abort` written to ctl act.

A copy that makes the job directory itself (`cp -a SRC MNT/job`) then creates `ctl` and
`status` with O_EXCL, and `tar -x` unlinks an existing file and creates it again: so the process
that made a job, or that unlinked one of its control files, does not see that control file
until it creates it (which is then accepted and discarded). Every other process sees both.

Completion (class Completion, shared with `ckptfs watch`): after a written file is closed or a
rename, a job is checked once no writer has it open and nothing happened for `debounce`
seconds, in one worker thread, never inside a FUSE request. The check reads the store
directly: the manifest must be frozen and every listed file present under its final name with
its size and checksum (manifest.check). A complete job restores (unless auto is off: then on
`restore` written to ctl), at most once: the attempt is persisted before restore runs.

TargetCore methods take mount paths ("/job/tasks/1/comm") and raise OSError (errno kept) or
errors.CkptError; the FUSE adapter (targetfs.py) maps those to errnos at one boundary.
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field

from . import manifest
from .errors import CkptError

log = logging.getLogger("ckptfs.target")

DEFAULT_STORE = "/var/lib/ckptfs"
DEBOUNCE = 0.2
VIRTUAL = ("ctl", "status")
HELD = "held"                   # read-only, found by name only: what the job holds (TargetCore)
COMMANDS = ("restore", "abort", "prepare")
VIRTUAL_FH = 1 << 40            # virtual handles live far above any real fd
MAX_PROBLEMS_SHOWN = 3
SUM_AT_RELEASE = 256 << 20  # larger files are checksummed by the completion check only
RECHECK = 256               # file_event looks again at all missing files while so few
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


# ---------------------------------------------------------------------------------------------
# Completion: jobs, persisted state, debounced checks, restore once

@dataclass
class Job:
    name: str
    tree: str
    state: dict = field(default_factory=dict)   # persisted: attempted, restored, aborted, pids
    status: str = "waiting: not checked yet"
    gen: int = 0           # bumped by every change to the tree
    writers: int = 0       # handles open for writing
    due: float | None = None
    wanted: bool = False   # `restore` written to ctl
    gone: bool = False
    expect: dict | None = None   # the frozen manifest's files, once one has arrived
    missing: set = field(default_factory=set)   # listed files not (yet) verified
    now: bool = False      # checked without the quiet period (complete, or `restore` on ctl)
    asked: bool = False    # ... because ctl said so: the copy is over, extras are final
    prepared: object = None        # restore.prepare.Prepared built from a running tree
    preparing: threading.Thread | None = None


def _default_restore():
    from .restore import restore   # built by another module; may not exist yet
    return restore


def _default_prepare(tree_dir: str, **opts):
    from .restore.prepare import prepare
    return prepare(tree_dir, **opts)


class Completion:
    """Decides when a job's tree is complete and restores it, once, in one worker thread.

    restore(tree_dir, **restore_opts) -> object with .pids {old: new}; raises CkptError on
    failure. A result with a true `.dry_run` (a one-line summary) started nothing: the status
    becomes `dry run: <summary>` and the job is not restored again automatically. restore=None
    means ckptfs.restore.restore, imported when first needed.

    Each status change is also written to STATE_DIR/<job>.status; persisted state goes to
    STATE_DIR/<job>.json (fsynced before a restore starts: a job restores at most once)."""

    def __init__(self, state_dir: str, *, auto: bool = True, restore=None,
                 restore_opts: dict | None = None, debounce: float = DEBOUNCE, known=None,
                 prepare=None):
        """prepare(tree_dir, **restore_opts) -> object with finish(tree_dir) -> result and
        cancel(): builds the process from a running tree (pre-copy) so that the restore of
        the frozen one only finishes it. None: restore.prepare when restore is the default
        one; False: never."""
        self.state_dir, self.auto, self.debounce = state_dir, auto, debounce
        self._prepare = (_default_prepare if restore is None else None) if prepare is None \
            else prepare or None
        self.known = known      # (path, lstat) -> checksum verified earlier, or None
        self._restore, self._opts = restore, dict(restore_opts or {})
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    # -- bookkeeping, called from FUSE requests or the watcher: cheap, never blocking on I/O

    def add(self, name: str, tree: str) -> Job:
        """Know job `name` (its tree at `tree`); loads its persisted state and schedules a check."""
        job = Job(name, tree, state=self._load_state(name))
        if job.state.get("restored"):
            job.status = f"restored pid={job.state.get('root_pid')}"
        elif job.state.get("status", "").startswith(("failed:", "dry run:")):
            job.status = job.state["status"]
        elif job.state.get("attempted"):
            job.status = "failed: daemon stopped while restoring; not retried"
        with self._cond:
            self._jobs[name] = job
        self.poke(name)
        return job

    def forget(self, name: str) -> None:
        """The job's tree was removed: drop the job and its state files."""
        with self._cond:
            job = self._jobs.pop(name, None)
            if job:
                job.gone = True
        if job:
            self._drop_prepared(job)
        for ext in (".json", ".status"):
            try:
                os.unlink(self._state_path(name, ext))
            except FileNotFoundError:
                pass

    def names(self) -> list[str]:
        with self._cond:
            return sorted(self._jobs)

    def status(self, name: str) -> str:
        return self._get(name).status

    def touch(self, name: str) -> None:
        """The tree is about to change; refused (EBUSY) while the job is being restored."""
        with self._cond:
            job = self._get(name)
            if job.status == "restoring":
                raise _err(errno.EBUSY, f"job {name} is being restored")
            job.gen += 1

    def changed_attr(self, name: str) -> None:
        """A file's mode, owner or times changed (rsync sets directory times last): never
        refused, not even while restoring, and no reason to check again: nothing the check
        or a restore reads moved."""
        self._get(name)

    def changed(self, name: str) -> None:
        """The tree changed behind our back (watch mode): never refused, checked again later."""
        with self._cond:
            job = self._jobs.get(name)
            if job:
                job.gen += 1
        self.poke(name)

    def writer(self, name: str, delta: int) -> None:
        """A handle open for writing was opened (+1) or closed (-1)."""
        with self._cond:
            job = self._jobs.get(name)
            if job:
                job.writers += delta
                job.gen += 1
        if delta < 0:
            self.poke(name)

    def poke(self, name: str, now: bool = False) -> None:
        """Something that may complete the tree happened: check it after the quiet period, or
        at once (`now`) when the last listed file is known to be in place."""
        with self._cond:
            job = self._jobs.get(name)
            if job:
                job.now = now or (job.now and job.due is not None)
                job.due = time.monotonic() + (0 if job.now else self.debounce)
                self._cond.notify()

    def file_event(self, name: str, rel: str) -> None:
        """File `rel` of the job got its final content (a writer released it, or a rename
        gave it its name). With `known` sums this keeps the set of listed files not yet in
        place, so the check runs as soon as the last one lands instead of after the quiet
        period; the check itself still verifies everything."""
        job = self._jobs.get(name)
        if job is None:
            return
        if rel == "manifest":
            self._expect(job)
        elif job.expect is not None:
            # a release may come after the rename that gave the file its name: look again
            # at every missing file while there are few
            todo = set(job.missing) if len(job.missing) <= RECHECK else set()
            todo.update({rel} & job.expect.keys())
            for r in todo:
                if self._matches(job, r, job.expect[r]):
                    job.missing.discard(r)
                else:
                    job.missing.add(r)
        self.poke(name, now=self._all_in(job))

    def _all_in(self, job: Job) -> bool:
        """Every file of the frozen manifest is known to be in place and nobody writes."""
        return job.expect is not None and not job.missing and not job.writers

    def _expect(self, job: Job) -> None:
        """A manifest arrived: if frozen, note which listed files are not yet verified."""
        job.expect, job.missing = None, set()
        if self.known is None:
            return
        try:
            doc = manifest.load(os.path.join(job.tree, "manifest"))
        except CkptError:
            return
        if doc["state"] == "frozen":
            job.missing = {rel for rel, e in doc["files"].items() if not self._matches(job, rel, e)}
            job.expect = doc["files"]

    def _matches(self, job: Job, rel: str, entry: dict) -> bool:
        path = os.path.join(job.tree, rel)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (stat.S_ISREG(st.st_mode) and st.st_size == entry["size"]
                and self.known(path, st) == entry[manifest.ALGO])

    def command(self, name: str, word: str) -> None:
        """`restore` or `abort` written to the job's ctl. Raises OSError EINVAL/EBUSY."""
        if word not in COMMANDS:
            raise _err(errno.EINVAL, f"{name}/ctl: unknown command {word!r:.40} "
                                     f"(want {' or '.join(COMMANDS)})")
        with self._cond:
            job = self._get(name)
            if job.state.get("restored") or job.status == "restoring":
                raise _err(errno.EBUSY, f"{name}/ctl: {word}: job is {job.status}")
            job.wanted = word == "restore"
        if word == "prepare":
            self._start_prepare(job)
        elif word == "abort":
            status = "failed: aborted (write restore to ctl to try again)"
            job.state.update(aborted=True, status=status)
            self._save(job)
            self._set(job, status)
            self._drop_prepared(job)
        else:
            job.state.update(aborted=False, status="")
            self._save(job)
            job.asked = True
            self.poke(name, now=True)    # the copy is over: no quiet period to wait out

    # -- the worker

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ckptfs-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while (due := self._next_due()) is not None:
            for job in due:
                try:
                    self._examine(job)
                except Exception as e:   # the worker must outlive any one job
                    log.exception("job %s: check failed", job.name)
                    self._set(job, f"failed: internal error: {type(e).__name__}: {e}")

    def _next_due(self) -> list[Job] | None:
        """Wait for jobs whose quiet period is over and that nobody writes; None = stop."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                waiting = [j for j in self._jobs.values() if j.due is not None and not j.writers]
                due = [j for j in waiting if j.due <= now]
                if due:
                    for j in due:
                        j.due = None
                    return due
                nxt = min((j.due for j in waiting), default=None)
                self._cond.wait(None if nxt is None else nxt - now)
            return None

    def _examine(self, job: Job) -> None:
        st = job.state
        if job.gone or st.get("restored") or ((st.get("attempted") or st.get("aborted"))
                                               and not job.wanted):
            return
        gen, now, asked = job.gen, job.now, job.asked
        job.now = job.asked = False
        self._set(job, "verifying")
        doc, problems, extras = self._verify(job)
        with self._cond:
            # checked early (no quiet period) while files the manifest does not list are
            # still there: the copy may be about to delete them (rsync --delete): wait
            early = now and not asked and extras and not problems
            if job.gen != gen or job.writers or early:
                changed = True
            else:
                changed = False
                go = not problems and (self.auto or job.wanted)
                if go:
                    job.status = "restoring"   # from here on, touch() refuses changes
        if changed:
            self._set(job, "waiting: copy in progress")
            self.poke(job.name, now=self._all_in(job) and not early)
        elif problems:
            self._set(job, "waiting: " + _summary(problems))
        elif not go:
            self._set(job, "waiting: complete; write restore to ctl")
        else:
            self._restore_job(job, doc)

    def _verify(self, job: Job) -> tuple[dict | None, list[str], list[str]]:
        path = os.path.join(job.tree, "manifest")
        if not os.path.lexists(path):
            return None, ["manifest missing"], []
        try:
            doc = manifest.load(path)
        except CkptError as e:
            return None, [f"manifest refused: {e}"], []
        if doc["state"] == "running":
            self._start_prepare(job)
        return (doc, *manifest.inspect(job.tree, doc, self.known))

    # -- prepared restores (pre-copy): the process is built while the copy goes on

    def _start_prepare(self, job: Job) -> None:
        """Build the process from the tree as it is now, in a thread of its own (once)."""
        with self._cond:
            st = job.state
            if (self._prepare is None or job.prepared is not None or job.preparing is not None
                    or st.get("attempted") or st.get("restored") or job.gone):
                return
            job.preparing = threading.Thread(target=self._prepare_job, args=(job,),
                                             name=f"ckptfs-prepare-{job.name}", daemon=True)
        self._set(job, "waiting: preparing the process from the running tree")
        job.preparing.start()

    def _prepare_job(self, job: Job) -> None:
        t0 = time.monotonic()
        try:
            prepared = self._prepare(job.tree, **self._opts)
        except Exception as e:          # a failed preparation only means a normal restore
            log.info("job %s: not prepared: %s", job.name, e)
            self._set_waiting(job, "waiting: not prepared (restores the normal way)")
            return
        finally:
            with self._cond:
                job.preparing = None
        with self._cond:
            keep = not (job.gone or job.state.get("attempted") or job.state.get("aborted"))
            if keep:
                job.prepared = prepared
        if not keep:
            prepared.cancel()
            return
        log.info("job %s: process prepared in %.2f s", job.name, time.monotonic() - t0)
        self._set_waiting(job, "waiting: prepared; the frozen tree finishes it")

    def _set_waiting(self, job: Job, status: str) -> None:
        if job.status.startswith("waiting"):
            self._set(job, status)

    def _take_prepared(self, job: Job):
        thread = job.preparing
        if thread is not None:
            thread.join()
        with self._cond:
            prepared, job.prepared = job.prepared, None
        return prepared

    def _drop_prepared(self, job: Job) -> None:
        prepared = self._take_prepared(job) if job.preparing is None else None
        if prepared is None and job.preparing is not None:
            # still building: it sees the job gone/aborted when done and cancels itself
            return
        if prepared is not None:
            prepared.cancel()

    def _restore_job(self, job: Job, doc: dict) -> None:
        job.wanted = False
        job.state.update(attempted=True, status="restoring")
        self._save(job)          # at most once, even if we die inside restore
        self._set(job, "restoring")
        try:
            result = self._call_restore(job)
        except CkptError as e:
            return self._fail(job, str(e))
        except Exception as e:
            log.exception("job %s: restore raised", job.name)
            return self._fail(job, f"{type(e).__name__}: {e}")
        if getattr(result, "dry_run", None):
            job.state["status"] = f"dry run: {result.dry_run}"
            self._save(job)
            return self._set(job, job.state["status"])
        pids = {int(k): int(v) for k, v in dict(result.pids).items()}
        root = pids.get(doc["root"], next(iter(pids.values()), None))
        if root is None:
            return self._fail(job, "restore started no process")
        job.state.update(restored=True, pids=pids, root_pid=root, status=f"restored pid={root}")
        self._save(job)
        self._set(job, f"restored pid={root}")
        log.info("job %s: restored, pids %s", job.name, pids)

    def _call_restore(self, job: Job):
        prepared = self._take_prepared(job)
        if prepared is not None:
            from .restore.prepare import Stale
            try:
                return prepared.finish(job.tree)
            except Stale as e:
                log.info("job %s: prepared process does not fit (%s): restoring normally",
                         job.name, e)
        fn = self._restore
        if fn is None:
            try:
                fn = _default_restore()
            except ImportError as e:
                raise CkptError(f"restore not available: {e}") from None
        return fn(job.tree, **self._opts)

    def _fail(self, job: Job, reason: str) -> None:
        status = f"failed: {reason}".replace("\n", " ")
        job.state["status"] = status
        self._save(job)
        self._set(job, status)
        log.warning("job %s: %s", job.name, status)

    # -- state files

    def _get(self, name: str) -> Job:
        job = self._jobs.get(name)
        if job is None:
            raise _err(errno.ENOENT, f"no job {name}")
        return job

    def _set(self, job: Job, status: str) -> None:
        with self._cond:
            if job.gone:
                return
            job.status = status
        _write_atomic(self._state_path(job.name, ".status"), (status + "\n").encode(), sync=False)

    def _state_path(self, name: str, ext: str) -> str:
        return os.path.join(self.state_dir, name + ext)

    def _load_state(self, name: str) -> dict:
        path = self._state_path(name, ".json")
        try:
            with open(path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError as e:
            # a state file we cannot read might hide a restore: never restore this job again
            log.error("%s: unreadable (%s); job will not restore automatically", path, e)
            return {"attempted": True, "status": f"failed: state file unreadable: {path}"}

    def _save(self, job: Job) -> None:
        if not job.gone:
            data = json.dumps(job.state, sort_keys=True).encode()
            _write_atomic(self._state_path(job.name, ".json"), data, sync=True)


def _summary(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def _write_atomic(path: str, data: bytes, *, sync: bool) -> None:
    tmp = f"{path}.tmp{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# TargetCore: the mount's operations on the store

class Sums:
    """Checksums of store files, taken as each writer releases its file (from that handle,
    so the bytes are the ones written). Only this daemon changes the store, so an entry
    stays true until the file is opened for writing or truncated again (forget), or its
    inode dies (forget_if_last): keyed by (st_dev, st_ino), which a rename keeps."""

    def __init__(self):
        self._d: dict[tuple[int, int], tuple[int, str]] = {}
        self._lock = threading.Lock()

    def put(self, st: os.stat_result, hexsum: str) -> None:
        with self._lock:
            self._d[(st.st_dev, st.st_ino)] = (st.st_size, hexsum)

    def forget(self, key: tuple[int, int] | None) -> None:
        with self._lock:
            self._d.pop(key, None)

    def forget_if_last(self, path: str) -> None:
        """`path` is about to be unlinked or replaced: drop its sum if no other name keeps
        the inode (a later file may get the same inode number)."""
        try:
            st = os.lstat(path)
        except OSError:
            return
        if st.st_nlink <= 1:
            self.forget((st.st_dev, st.st_ino))

    def known(self, path: str, st: os.stat_result) -> str | None:
        """The checksum of the file in state `st`, if one was taken since its last write."""
        hit = self._d.get((st.st_dev, st.st_ino))
        return hit[1] if hit and hit[0] == st.st_size and stat.S_ISREG(st.st_mode) else None


@dataclass
class Handle:
    job: str
    fd: int | None = None          # real file
    writing: bool = False
    key: tuple | None = None       # (st_dev, st_ino) while open for writing
    name: str | None = None        # virtual: "ctl", "status" or "held"
    rel: str = ""                  # real: the path inside the job it was opened as
    text: bytes = b""              # virtual: status snapshot (read) or pending ctl input


class TargetCore:
    """Path operations of the target mount, applied to DIR/jobs (see the module docstring)."""

    def __init__(self, store: str = DEFAULT_STORE, *, auto: bool = True, restore=None,
                 restore_opts: dict | None = None, debounce: float = DEBOUNCE, caller=None):
        """caller() -> pid of the process making the current request (0 if unknown)."""
        self.store = os.path.abspath(store)
        self.caller = caller or (lambda: 0)
        self._hidden: dict[tuple[str, str, int], int | None] = {}  # (job, name, pid) -> start
        self.jobs_dir = os.path.join(self.store, "jobs")
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        self.sums = Sums()
        self.completion = Completion(os.path.join(self.store, "state"), auto=auto,
                                     restore=restore, restore_opts=restore_opts,
                                     debounce=debounce, known=self.sums.known)
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._writing: dict[tuple, int] = {}
        self._vfh = itertools.count(VIRTUAL_FH)
        for name in sorted(os.listdir(self.jobs_dir)):
            if os.path.isdir(os.path.join(self.jobs_dir, name)):
                self.completion.add(name, os.path.join(self.jobs_dir, name))

    def start(self) -> None:
        self.completion.start()

    def stop(self) -> None:
        self.completion.stop()

    # -- paths

    @staticmethod
    def split(path: str) -> tuple[str | None, str]:
        """'/job/a/b' -> ('job', 'a/b'); '/job' -> ('job', ''); '/' -> (None, '')."""
        parts = path.strip("/").split("/", 1)
        if not parts[0]:
            return None, ""
        return parts[0], parts[1] if len(parts) > 1 else ""

    def real(self, path: str) -> str:
        job, rel = self.split(path)
        if job is None:
            return self.jobs_dir
        return os.path.join(self.jobs_dir, job, rel) if rel else os.path.join(self.jobs_dir, job)

    def _inside(self, path: str, what: str) -> tuple[str, str]:
        """(job, rel) of a path that must lie inside a job (not the top level, not virtual)."""
        job, rel = self.split(path)
        if job is None or not rel:
            raise _err(errno.EPERM, f"{what} {path}: only directories (jobs) at the top level")
        if rel in VIRTUAL or rel == HELD:
            raise _err(errno.EPERM, f"{what} {path}: the job's own control file")
        return job, rel

    # -- control files hidden from the process copying them in (see the module docstring)

    def _hide(self, job: str, names: tuple[str, ...]) -> None:
        pid = self.caller()
        start = _start_time(pid)
        with self._lock:
            if len(self._hidden) > 256:
                self._hidden = {k: v for k, v in self._hidden.items() if _start_time(k[2]) == v}
            self._hidden.update(((job, n, pid), start) for n in names)

    def _unhide(self, job: str, name: str) -> None:
        with self._lock:
            self._hidden.pop((job, name, self.caller()), None)
        if not os.path.isdir(os.path.join(self.jobs_dir, job)):
            raise _err(errno.ENOENT, f"{job}/{name}: no such job")

    def _is_hidden(self, job: str, name: str) -> bool:
        key = (job, name, self.caller())
        if key not in self._hidden:
            return False
        # the pid may have been reused by another process since
        return self._hidden.get(key) == _start_time(key[2])

    # -- attributes and directories

    def getattr(self, path: str, fh: int | None = None) -> dict:
        job, rel = self.split(path)
        if job and rel == HELD:
            return self._virtual_attr(job, rel)
        if job and rel in VIRTUAL:
            if fh is None and self._is_hidden(job, rel):
                raise _err(errno.ENOENT, path)
            return self._virtual_attr(job, rel)
        if fh is not None and fh < VIRTUAL_FH:
            return _stat_dict(os.fstat(fh))
        return _stat_dict(os.lstat(self.real(path)))

    def _virtual_attr(self, job: str, name: str) -> dict:
        st = _stat_dict(os.lstat(os.path.join(self.jobs_dir, job)))
        size = len(self._status_bytes(job)) if name == "status" else 0
        st.update(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=size, st_blocks=0)
        return st

    def _status_bytes(self, job: str) -> bytes:
        return (self.completion.status(job) + "\n").encode()

    def readdir(self, path: str) -> list[str]:
        job, rel = self.split(path)
        names = os.listdir(self.real(path))
        if job and not rel:
            names = [n for n in names if n not in VIRTUAL] + list(VIRTUAL)
        return [".", ".."] + names

    def readlink(self, path: str) -> str:
        return os.readlink(self.real(path))

    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self.store)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                "f_favail", "f_namemax")
        return {k: getattr(sv, k) for k in keys}

    def mkdir(self, path: str, mode: int) -> None:
        job, rel = self.split(path)
        if job is None:
            raise _err(errno.EEXIST, path)
        if rel in VIRTUAL:
            raise _err(errno.EEXIST, f"{path}: the job's own control file")
        if rel:
            # an empty directory changes nothing a check or a restore reads (the manifest lists
            # files): never refused, so a copy finishing its empty dirs (pages/, timers/) after
            # the last listed file started the restore does not fail with EBUSY
            self.completion.changed_attr(job)
        os.mkdir(self.real(path), mode)
        if not rel:
            self._hide(job, VIRTUAL)
            self.completion.add(job, self.real(path))
            log.info("job %s: created", job)

    def rmdir(self, path: str) -> None:
        job, rel = self.split(path)
        if job is None or rel in VIRTUAL:
            raise _err(errno.EPERM if job is None else errno.ENOTDIR, path)
        self.completion.touch(job)
        os.rmdir(self.real(path))
        if not rel:
            self.completion.forget(job)
            log.info("job %s: removed", job)

    def chmod(self, path: str, mode: int) -> None:
        if self._attr_target(path):
            os.chmod(self.real(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        if self._attr_target(path):
            os.lchown(self.real(path), uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        if not self._attr_target(path):
            return
        real = self.real(path)
        if times is None:
            os.utime(real, follow_symlinks=False)
            return
        st = os.lstat(real)
        now = time.time_ns()
        ns = tuple(now if t == UTIME_NOW else old if t == UTIME_OMIT else t
                   for t, old in zip(times, (st.st_atime_ns, st.st_mtime_ns)))
        os.utime(real, ns=ns, follow_symlinks=False)

    def _attr_target(self, path: str) -> bool:
        """Whether an attribute change applies to a real file (False: a control file, ignored)."""
        job, rel = self.split(path)
        if job is None:
            raise _err(errno.EPERM, "attributes of the top level")
        if rel in VIRTUAL or rel == HELD:
            return False
        self.completion.changed_attr(job)
        return True

    # -- names

    def unlink(self, path: str) -> None:
        job, rel = self.split(path)
        if job is None or not rel:
            raise _err(errno.EPERM, f"unlink {path}")
        if rel in VIRTUAL:
            self._hide(job, (rel,))   # rm -rf of a job, tar replacing a file: gone for them
            return
        if rel == HELD:
            raise _err(errno.EPERM, f"unlink {path}: the job's own control file")
        self.completion.touch(job)
        self.sums.forget_if_last(self.real(path))
        os.unlink(self.real(path))
        self.completion.file_event(job, rel)

    def mknod(self, path: str, mode: int, dev: int) -> None:
        """Regular files and fifos only: a checkpoint tree has no device nodes."""
        job, _ = self._inside(path, "mknod")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise _err(errno.EPERM, f"mknod {path}: only regular files and fifos")
        self.completion.touch(job)
        os.mknod(self.real(path), mode)
        st = os.lstat(self.real(path))
        self.sums.forget((st.st_dev, st.st_ino))

    def symlink(self, path: str, target: str) -> None:
        job, _ = self._inside(path, "symlink")
        self.completion.touch(job)
        os.symlink(target, self.real(path))

    def link(self, path: str, source: str) -> None:
        job, _ = self._inside(path, "link")
        sjob, _ = self._inside(source, "link")
        if sjob != job:
            raise _err(errno.EXDEV, f"link {source} -> {path}: jobs are separate")
        self.completion.touch(job)
        os.link(self.real(source), self.real(path), follow_symlinks=False)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        job, _ = self._inside(old, "rename")
        njob, nrel = self.split(new)
        if njob is None or not nrel:
            raise _err(errno.EPERM, f"rename {old} -> {new}: jobs cannot be renamed")
        if njob != job:
            raise _err(errno.EXDEV, f"rename {old} -> {new}: jobs are separate")
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise _err(errno.EINVAL, f"rename {old} -> {new}: flags {flags:#x} not supported")
        self.completion.touch(job)
        if nrel in VIRTUAL:
            self._discard_over_control(old, new)
            self._unhide(job, nrel)
        else:
            if flags & RENAME_NOREPLACE and os.path.lexists(self.real(new)):
                raise _err(errno.EEXIST, new)
            self.sums.forget_if_last(self.real(new))
            os.rename(self.real(old), self.real(new))
            self.completion.file_event(job, nrel)
            return
        self.completion.poke(job)

    def _discard_over_control(self, old: str, new: str) -> None:
        """rsync renames its temp file over a copied ctl/status: accept it and drop the file."""
        real = self.real(old)
        if stat.S_ISDIR(os.lstat(real).st_mode):
            raise _err(errno.EISDIR, f"rename {old} -> {new}: a directory over a control file")
        os.unlink(real)

    # -- files

    def create(self, path: str, mode: int, flags: int) -> int:
        job, rel = self.split(path)
        if job is None or not rel or rel == HELD:
            raise _err(errno.EPERM, f"create {path}: only directories (jobs) at the top level, "
                                    f"and not the job's own `{HELD}`")
        if rel in VIRTUAL:
            return self.open(path, flags)
        flags |= os.O_CREAT
        return self._open_real(job, path, flags, mode)

    def open(self, path: str, flags: int) -> int:
        job, rel = self.split(path)
        if job and (rel in VIRTUAL or rel == HELD):
            if rel == HELD and flags & os.O_ACCMODE:
                raise _err(errno.EACCES, f"{path} is read-only")
            return self._open_virtual(job, rel)
        if job is None or not rel:
            raise _err(errno.EISDIR, path)
        return self._open_real(job, path, flags, 0)

    def _open_real(self, job: str, path: str, flags: int, mode: int) -> int:
        writing = bool(flags & os.O_ACCMODE) or bool(flags & os.O_TRUNC)
        if writing:
            self.completion.touch(job)
        # O_TRUNC waits until we know no other handle is writing this file
        fd = os.open(self.real(path), (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        handle = Handle(job, fd=fd, writing=writing, rel=self.split(path)[1])
        if writing:
            try:
                self._claim(handle, path)
                self.sums.forget(handle.key)
                if flags & os.O_TRUNC:
                    os.ftruncate(fd, 0)
            except BaseException:
                self._unclaim(handle)
                os.close(fd)
                raise
            self.completion.writer(job, +1)
        with self._lock:
            self._handles[fd] = handle
        return fd

    def _claim(self, handle: Handle, path: str) -> None:
        """One writer per file: a second one means two copies race (EBUSY, logged)."""
        st = os.fstat(handle.fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self._writing:
                log.warning("%s: refused a second writer: is the job being copied twice at "
                            "once?", path)
                raise _err(errno.EBUSY, f"{path} is already open for writing")
            self._writing[key] = handle.fd
            handle.key = key

    def _unclaim(self, handle: Handle) -> None:
        with self._lock:
            if handle.key:
                self._writing.pop(handle.key, None)

    def _open_virtual(self, job: str, name: str) -> int:
        if name == HELD:
            text = self.held_bytes(job)
        else:
            self._unhide(job, name)
            text = self._status_bytes(job) if name == "status" else b""
        fh = next(self._vfh)
        with self._lock:
            self._handles[fh] = Handle(job, name=name, text=text)
        return fh

    def is_virtual(self, fh: int) -> bool:
        return fh >= VIRTUAL_FH

    def read(self, fh: int, size: int, offset: int) -> bytes:
        h = self._handle(fh)
        if h.name is not None:
            return h.text[offset:offset + size] if h.name in ("status", HELD) else b""
        return os.pread(fh, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        h = self._handle(fh)
        if h.name == HELD:
            raise _err(errno.EBADF, f"{h.job}/{HELD} is read-only")
        if h.name == "ctl":
            self._ctl_input(h, data)
        elif h.name is None:
            return os.pwrite(fh, data, offset)
        return len(data)        # a copied-in status: discarded

    def _ctl_input(self, h: Handle, data: bytes) -> None:
        """Acts on each complete line written to ctl; the rest waits for more or for flush."""
        h.text += data
        *lines, h.text = h.text.split(b"\n")
        for line in lines:
            self._ctl_word(h.job, line)

    def _ctl_word(self, job: str, line: bytes) -> None:
        word = line.decode("utf-8", "replace").strip()
        if word:
            self.completion.command(job, word)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        job, rel = self.split(path)
        if (fh is not None and fh >= VIRTUAL_FH) or (job and rel in VIRTUAL):
            return
        if fh is not None:
            os.ftruncate(fh, length)
            return
        self._inside(path, "truncate")
        self.completion.touch(job)
        real = self.real(path)
        st = os.lstat(real)
        self.sums.forget((st.st_dev, st.st_ino))
        os.truncate(real, length)
        self.completion.poke(job)

    def flush(self, fh: int) -> None:
        h = self._handle(fh)
        if h.name == "ctl" and h.text:
            line, h.text = h.text, b""
            self._ctl_word(h.job, line)

    def fsync(self, fh: int, datasync: bool) -> None:
        if fh < VIRTUAL_FH:
            (os.fdatasync if datasync else os.fsync)(fh)

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
            if h and h.key:
                self._writing.pop(h.key, None)
        if h is None or h.fd is None:
            return
        try:
            if h.writing:
                self._verified(h)
        finally:
            os.close(h.fd)
            if h.writing:
                self.completion.writer(h.job, -1)
                self.completion.file_event(h.job, h.rel)

    def _verified(self, h: Handle) -> None:
        """The checksum of a file just written, taken from its own handle: the completion
        check then reads only files changed since (Sums)."""
        st = os.fstat(h.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > SUM_AT_RELEASE:
            return      # a huge file (a hostile sparse one?) waits for the check's size test
        if fcntl.fcntl(h.fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
            self.sums.put(st, manifest.checksum_fd(h.fd))
            return
        # opened write-only (cp, rsync): read the same inode through a second open
        fd = os.open(f"/proc/self/fd/{h.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.sums.put(st, manifest.checksum_fd(fd))
        finally:
            os.close(fd)

    def held_bytes(self, job: str) -> bytes:
        """`JOB/held`: every file the job holds, one `<xxh3> <size> <path>` line each, sorted
        (rsync temp files and the control files left out). A copy tool that knows what the
        source has (its frozen manifest) sends exactly the difference: ckptfs migrate."""
        tree = os.path.join(self.jobs_dir, job)
        if not os.path.isdir(tree):
            raise _err(errno.ENOENT, f"no job {job}")
        found, _ = manifest._walk(tree)
        lines = []
        for rel, st in sorted(found.items()):
            if not stat.S_ISREG(st.st_mode) or rel in manifest.NOT_LISTED \
                    or manifest._TEMP.match(os.path.basename(rel)):
                continue
            path = os.path.join(tree, rel)
            hexsum = self.sums.known(path, st) or manifest.checksum_file(path)
            lines.append(f"{hexsum} {st.st_size} {rel}\n")
        return "".join(lines).encode()

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF, f"file handle {fh}")
        return h


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _stat_dict(st: os.stat_result) -> dict:
    d = {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid",
                                     "st_size", "st_blocks", "st_blksize", "st_rdev")}
    d.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
    return d
