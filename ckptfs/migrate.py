"""`ckptfs migrate [--keep-source] PID [USER@]HOST:PATH/JOB`: live migration by rsync pre-copy.

The whole dance, with ordinary tools:
  1. mount the process (`ckptfs mount`, chunk mtimes from capture.dirty.ChunkClock);
  2. `rsync -a --delete` the mount to the job directory while the process runs, again and
     again: each run copies only the chunks written since the previous one (quick check on
     size + mtime), until the amount stops shrinking or MAX_PASSES;
  3. `echo freeze > ctl`, one final pass: exactly the difference between the frozen manifest
     and what the target says it holds (JOB/held, fetched before the freeze). Into a job on
     this machine the difference is copied by migrate itself (LocalCopier), starting with
     the chunks the last pre-copy pass sent while the mount builds the manifest; to another
     host it is streamed the same way into `ckptfs receive JOB` through one ssh session
     opened before the freeze (remote.py, stream.py: the session also reads JOB/held, takes
     the working set once more just before the freeze to warm the connection, and reports
     the job's status afterwards); through `rsync --files-from` when the far side has no
     receiver; a whole rsync pass when the target cannot say what it holds;
  4. wait until the target's `JOB/status` says `restored pid=N` (the target restores by itself
     once the copied tree is complete per its manifest);
  5. `echo kill > ctl` (or, with --keep-source, leave the source frozen under its mount).
Any failure before the target reports `restored` thaws the source: it keeps running here.

Remote destinations go through ssh (`rsync -e`, `ssh HOST ckptfs receive JOB`); the remote
shell command comes from $CKPTFS_RSH (default "ssh"), e.g. "ssh -F /tmp/cfg" in tests, the
far receiver from $CKPTFS_RECEIVE (default "ckptfs receive").

Figures go to stderr: per pass the bytes and chunk files sent and the time taken; at the end
the downtime (freeze until the target said `restored`), bytes per pass and the total time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

import xxhash

from .errors import CkptError

MAX_PASSES = 8
SHRINK = 0.9            # a pass must send < 90% of the previous one to be worth another
SMALL = 1 << 20         # below this, another pre-copy pass cannot shorten the final one
RESTORE_TIMEOUT = 120.0
UNMOUNT_WAIT = 5.0
RSYNC_OK = (0, 24)      # 24: files vanished while copying (a running process unmapped some)
# -W: a changed chunk is sent whole; rsync's delta algorithm would read the target's old copy
# back through its FUSE mount to save little (rewritten pages are spread over the chunk).
# --modify-window=-1: compare mtimes to the nanosecond (the default compares seconds only).
COMMON = ["-a", "-W", "--delete", "--modify-window=-1", "--exclude=/ctl", "--exclude=/status"]


@dataclasses.dataclass
class Dest:
    """Where the job directory is: `host` (None = this machine) and `path` (JOB itself)."""
    host: str | None
    path: str

    @classmethod
    def parse(cls, text: str) -> "Dest":
        m = re.match(r"^([^:/]+):(.+)$", text)
        host, path = (m[1], m[2]) if m else (None, text)
        path = path.rstrip("/")
        if not path or os.path.basename(path) in ("", ".", ".."):
            raise CkptError(f"destination {text!r} does not name a job directory",
                            step="migrate", path=text)
        return cls(host, path)

    def rsync_arg(self) -> str:
        return f"{self.host}:{self.path}/" if self.host else self.path + "/"

    def __str__(self) -> str:
        return self.rsync_arg()


def rsh() -> list[str]:
    return shlex.split(os.environ.get("CKPTFS_RSH", "ssh"))


def _run(argv: list[str], *, step: str, ok=(0,), timeout: float | None = None
         ) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CkptError(f"{argv[0]} did not finish within {timeout:.0f} s", step=step) from None
    if r.returncode not in ok:
        raise CkptError(f"{shlex.join(argv)} exited {r.returncode}: {r.stderr.strip()[-2000:]}",
                        step=step)
    return r


# -- rsync passes --------------------------------------------------------------------------
@dataclasses.dataclass
class Pass:
    name: str
    bytes: int          # file data sent (rsync's "Total transferred file size")
    files: int
    chunks: int         # chunk files among them
    seconds: float
    names: list = dataclasses.field(default_factory=list, repr=False)   # files sent


_TOTAL = re.compile(r"Total transferred file size: ([\d,]+)")


def rsync_pass(mnt: str, dest: Dest, name: str, extra: list[str] = ()) -> Pass:
    argv = ["rsync", *COMMON, "--stats", "--out-format=%n", *extra]
    if dest.host:
        argv += ["-e", shlex.join(rsh())]
    argv += [mnt.rstrip("/") + "/", dest.rsync_arg()]
    t0 = time.monotonic()
    r = _run(argv, step=f"rsync ({name})", ok=RSYNC_OK)
    seconds = time.monotonic() - t0
    names = [line for line in r.stdout.splitlines() if line and not line.endswith("/")
             and not line.startswith(("Number of", "Total", "Literal", "Matched", "File list",
                                      "sent ", "total size", "Unmatched"))]
    m = _TOTAL.search(r.stdout)
    if not m:
        raise CkptError(f"rsync printed no statistics: {r.stdout[-500:]}", step=f"rsync ({name})")
    return Pass(name, int(m[1].replace(",", "")), len(names),
                sum("/pages/" in n for n in names), seconds, names)


def final_pass(mnt: str, dest: Dest, tracked: bool) -> Pass:
    """After the freeze. A tracking mount answers attributes uncached and stamps its state
    files anew at the freeze (compared to the nanosecond), so the quick check is exact;
    without tracking every file is sent again (-I)."""
    return rsync_pass(mnt, dest, "final pass", [] if tracked else ["-I"])


# -- the final pass by difference ------------------------------------------------------------
# rsync's quick check stats every file on both sides: ~800 FUSE lookups on the source alone,
# most of the final pass. The frozen manifest already says what the source has (size and
# checksum of each file) and the target's JOB/held what it holds, taken before the freeze:
# their difference is exactly what to send (and what to delete).

def fetch_held(dest: Dest) -> dict[str, tuple[str, int]] | None:
    """{path: (xxh3, size)} the target job holds, or None if it cannot say (a plain
    directory, an older target): then the final pass is a whole rsync pass."""
    path = f"{dest.path}/held"
    try:
        if dest.host:
            r = subprocess.run(rsh() + [dest.host, f"cat {shlex.quote(path)}"],
                               capture_output=True, text=True, timeout=60)
            if r.returncode:
                return None
            text = r.stdout
        else:
            with open(path) as f:
                text = f.read()
    except (OSError, subprocess.TimeoutExpired):
        return None
    held = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        held[parts[2]] = (parts[0], int(parts[1]))
    return held


def difference(doc: dict, held: dict) -> tuple[list[str], list[str]] | None:
    """(files to send, files to delete) to turn `held` into the tree of frozen manifest
    `doc`; None when a whole directory went away (a files-from pass cannot remove it)."""
    files = doc["files"]
    send = sorted(rel for rel, e in files.items()
                  if held.get(rel) != (e["xxh3_64"], e["size"]))
    gone = sorted(set(held) - set(files))
    kept_dirs = {os.path.dirname(rel) for rel in files}
    if any(os.path.dirname(rel) not in kept_dirs for rel in gone):
        return None
    return send, gone


def read_manifest(mnt: str, raw: bool = False):
    """The mount's (frozen) manifest as a dict, or (dict, bytes) with `raw`."""
    try:
        with open(os.path.join(mnt, "manifest"), "rb") as f:
            data = f.read()
        doc = json.loads(data)
    except (OSError, ValueError) as e:
        raise CkptError(f"cannot read the frozen manifest: {e}", step="final pass",
                        path=os.path.join(mnt, "manifest")) from None
    return (doc, data) if raw else doc


def listed_pass(mnt: str, dest: Dest, send: list[str], gone: list[str]) -> Pass:
    """rsync of exactly these files (the manifest first in rsync's order; vanished files
    deleted with --delete-missing-args), with no directory walk on either side."""
    listing = "".join(f"{rel}\n" for rel in ["manifest", *send, *gone])
    argv = ["rsync", "-a", "-W", "--modify-window=-1", "--delete-missing-args",
            "--files-from=-", "--stats", "--out-format=%n"]
    if dest.host:
        argv += ["-e", shlex.join(rsh())]
    argv += [mnt.rstrip("/") + "/", dest.rsync_arg()]
    t0 = time.monotonic()
    try:
        r = subprocess.run(argv, input=listing, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise CkptError("rsync did not finish within 600 s", step="rsync (final pass)") from None
    if r.returncode not in RSYNC_OK:
        raise CkptError(f"{shlex.join(argv)} exited {r.returncode}: {r.stderr.strip()[-2000:]}",
                        step="rsync (final pass)")
    m = _TOTAL.search(r.stdout)
    if not m:
        raise CkptError(f"rsync printed no statistics: {r.stdout[-500:]}", step="final pass")
    return Pass("final pass", int(m[1].replace(",", "")), len(send),
                sum("/pages/" in n for n in send), time.monotonic() - t0)


# -- the final pass into a job on this machine ------------------------------------------------
# rsync's three processes, its temp files and renames cost more than the 17 MB they carry.
# Into a local job the difference is copied here instead: each file rewritten in place (open
# with O_TRUNC, 1 MiB reads and writes), several files at once so that both FUSE daemons stay
# busy, and no request that is not needed: no stat (a new file alone asks for its mode), no
# read past a short one, no mtime set (after the final pass the job is checked by checksum;
# a later migration mounts anew, with stamps no copy can hold). The target sees a writer for
# the whole copy of each file, so it never checks a half-written one.
COPY_THREADS = 3
BLOCK = 1 << 20


def copy_file(mnt: str, job: str, rel: str, hash_it: bool = False) -> tuple[int, str | None]:
    """Copy one file of the mount into the job, in place; (bytes, xxh3 hex if `hash_it`)."""
    src_path, dst_path = os.path.join(mnt, rel), os.path.join(job, rel)
    src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            dst = os.open(dst_path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
            dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.fchmod(dst, os.fstat(src).st_mode & 0o7777)
        try:
            h = xxhash.xxh3_64() if hash_it else None
            buf = bytearray(BLOCK)
            view, size, n = memoryview(buf), 0, BLOCK
            while n == BLOCK and (n := os.readv(src, [buf])):   # a short read is the end
                if h is not None:
                    h.update(view[:n])
                off = 0
                while off < n:
                    off += os.write(dst, view[off:n])
                size += n
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return size, h.hexdigest() if h is not None else None


def _copy_error(rel: str, e: OSError) -> CkptError:
    return CkptError(f"copying {rel}: {e.strerror or e}", step="final pass", path=rel,
                     err=e.errno)


class LocalCopier:
    """The final pass into a job directory of this machine. Guessed chunks and the files the
    manifest names have pools of their own: the few small files the manifest adds never
    queue behind megabytes of guesses."""

    def __init__(self, mnt: str, job: str, threads: int | None = None):
        from concurrent.futures import ThreadPoolExecutor
        self.mnt, self.job = mnt, job
        threads = threads or COPY_THREADS
        self.guesses = ThreadPoolExecutor(threads, thread_name_prefix="ckptfs-guess")
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ckptfs-copy")
        self.bytes = 0
        self.sent: list[str] = []

    def guess(self, rels: list[str]) -> dict:
        """Start copying files that are probably changed (the chunks the last pre-copy pass
        sent), before the frozen manifest says which are: {rel: future of (size, xxh3)}."""
        return {rel: self.guesses.submit(copy_file, self.mnt, self.job, rel, True)
                for rel in rels}

    def settle(self, guessed: dict) -> dict:
        """What the guessed copies left in the job: {rel: (xxh3, size)}, or None where the job's
        copy may be half written. A file the mount no longer has is left out."""
        out = {}
        for rel, fut in guessed.items():
            try:
                size, digest = fut.result()
            except OSError as e:
                if not (isinstance(e, FileNotFoundError)
                        and e.filename == os.path.join(self.mnt, rel)):
                    out[rel] = None
                continue
            out[rel] = (digest, size)
            self.bytes += size
            self.sent.append(rel)
        return out

    def remove(self, gone) -> None:
        for rel in gone:
            try:
                os.unlink(os.path.join(self.job, rel))
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _copy_error(rel, e) from None

    def put_manifest(self, data: bytes) -> None:
        try:
            with open(os.path.join(self.job, "manifest"), "wb") as f:
                f.write(data)
        except OSError as e:
            raise _copy_error("manifest", e) from None

    def start(self, rels) -> dict:
        return {rel: self.pool.submit(copy_file, self.mnt, self.job, rel) for rel in rels}

    def finish(self, futures: dict) -> None:
        for rel, fut in futures.items():
            try:
                self.bytes += fut.result()[0]
            except OSError as e:
                raise _copy_error(rel, e) from None
            self.sent.append(rel)

    def close(self) -> None:
        self.guesses.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)


def _stale(files: dict, held: dict, rels) -> list[str]:
    """Of `rels`, those the job does not hold as the manifest lists them."""
    return [rel for rel in rels
            if held.get(rel) != (files[rel]["xxh3_64"], files[rel]["size"])]


def guess_chunks(passes: list[Pass]) -> list[str]:
    """Chunks the final pass will most likely send: those the last two pre-copy passes both
    sent (the working set). After a single pass nothing is guessed: that pass sent all."""
    if len(passes) < 2:
        return []
    before = set(passes[-2].names)
    return [n for n in passes[-1].names if "/pages/" in n and n in before]


def after_freeze(mnt: str, dest: Dest, held: dict | None, guess: list[str], tracked: bool,
                 mark, rx=None) -> Pass:
    """The final pass: the difference between the frozen manifest and `held` when the
    target said what it holds (into a local job, copied here, starting with the `guess`ed
    chunks while the mount builds the manifest; to another host streamed through the
    receiver `rx`), else a whole rsync pass."""
    if held is None:
        return final_pass(mnt, dest, tracked)
    if rx is not None:
        from .remote import streamed_pass
        return streamed_pass(mnt, rx, held, guess, mark)
    if dest.host:
        doc = read_manifest(mnt)
        mark("frozen manifest read")
        diff = difference(doc, held) if "files" in doc else None
        return listed_pass(mnt, dest, *diff) if diff else final_pass(mnt, dest, tracked)
    t0 = time.monotonic()
    copier = LocalCopier(mnt, dest.path)
    try:
        guessed = copier.guess(guess)
        doc, raw = read_manifest(mnt, raw=True)
        mark("frozen manifest read")
        files = doc.get("files")
        kept_dirs = {os.path.dirname(rel) for rel in files or ()}
        gone = sorted((set(held) | set(guessed)) - set(files or ()))
        if files is None or any(os.path.dirname(rel) not in kept_dirs for rel in gone):
            copier.settle(guessed)
            return final_pass(mnt, dest, tracked)      # a directory went away: rsync --delete
        # Vanished files go before the manifest arrives (the target's check would wait for
        # unlisted files to go), the manifest before the rest, so that the target reads it
        # while the copies go on; files not guessed start at once, guesses are checked after.
        copier.remove(gone)
        copier.put_manifest(raw)
        now = copier.start(_stale(files, held, sorted(set(files) - set(guessed))))
        got = copier.settle(guessed)
        mark(f"{len(guessed)} guessed chunks copied")
        again = copier.start(_stale(files, got, sorted(set(guessed) & set(files))))
        copier.finish(now)
        copier.finish(again)
    finally:
        copier.close()
    sent = set(copier.sent)
    return Pass("final pass", copier.bytes, len(sent), sum("/pages/" in n for n in sent),
                time.monotonic() - t0, sorted(sent))


# -- the source mount ------------------------------------------------------------------------
class SourceMount:
    """The source mounted in a fresh temporary directory; unmounted by `close()`.
    The mount command may daemonize itself (`ckptfs mount`) or stay in the foreground."""

    def __init__(self, pid: int, command: list[str] | None = None, timeout: float = 30.0):
        self.pid = pid
        self.dir = tempfile.mkdtemp(prefix=f"ckptfs-migrate-{pid}-")
        self._err = tempfile.TemporaryFile()
        argv = (command or mount_command()) + [str(pid), self.dir]
        self.daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=self._err, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.dir):
            rc = self.daemon.poll()
            if rc is not None and rc != 0 or time.monotonic() > deadline:
                self._fail(f"could not mount process {pid} ({shlex.join(argv)})")
            time.sleep(0.02)

    def _fail(self, what: str):
        if self.daemon.poll() is None:
            self.daemon.kill()
        self.daemon.wait()
        self._err.seek(0)
        os.rmdir(self.dir)
        raise CkptError(f"{what}: {self._err.read().decode(errors='replace').strip()}",
                        step="mount", path=self.dir)

    def ctl(self, word: str) -> None:
        try:
            with open(os.path.join(self.dir, "ctl"), "w") as f:
                f.write(word + "\n")
        except OSError as e:
            raise CkptError(f"echo {word} > ctl: {e.strerror}", step=word,
                            path=os.path.join(self.dir, "ctl"), err=e.errno) from None

    def status(self) -> list[str]:
        with open(os.path.join(self.dir, "status")) as f:
            return f.read().splitlines()

    @property
    def tracking(self) -> str | None:
        for line in self.status()[1:]:
            if line.startswith("tracking: "):
                return line.split(": ", 1)[1]
        return None

    def close(self) -> None:
        # a file closed a moment ago may still hold the mount (its release is asynchronous):
        # a busy mount is tried again for a while before giving up
        deadline = time.monotonic() + UNMOUNT_WAIT
        while os.path.ismount(self.dir):
            r = subprocess.run(["fusermount3", "-u", self.dir], capture_output=True, text=True)
            if r.returncode == 0:
                break
            if "busy" not in r.stderr or time.monotonic() > deadline:
                raise CkptError(f"unmount failed: {r.stderr.strip()}", step="unmount",
                                path=self.dir)
            time.sleep(0.05)
        try:
            self.daemon.wait(10)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        os.rmdir(self.dir)


def mount_command() -> list[str]:
    """The source mount; $CKPTFS_MOUNT overrides (e.g. to try another daemon)."""
    if os.environ.get("CKPTFS_MOUNT"):
        return shlex.split(os.environ["CKPTFS_MOUNT"])
    return [sys.executable, "-m", "ckptfs.cli", "mount", "-f"]


# -- the migration -------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"ckptfs migrate: {msg}", file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# The target builds the process from the running tree while the next passes go on
# (restore/prepare.py), so that after the freeze only changed chunks and registers remain.
ASK_PREPARE = "echo prepare > {ctl} 2>/dev/null; exit 0"
WAIT_PREPARED = """i=0; while [ $i -lt {n} ]; do case $(head -n 1 {status} 2>/dev/null) in
*preparing*) sleep 0.05; i=$((i+1));; *) exit 0;; esac; done"""
PREPARE_WAIT = 60.0


def _target_shell(dest: Dest, script: str, timeout: float) -> None:
    argv = rsh() + [dest.host, script] if dest.host else ["sh", "-c", script]
    try:
        subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def ask_prepare(dest: Dest) -> None:
    """`echo prepare > JOB/ctl`: a target without prepared restores simply restores later."""
    _target_shell(dest, ASK_PREPARE.format(ctl=shlex.quote(f"{dest.path}/ctl")), 30)


def wait_prepared(dest: Dest) -> float:
    """Before the freeze: until the target is done building (bounded); seconds waited."""
    t0 = time.monotonic()
    script = WAIT_PREPARED.format(n=int(PREPARE_WAIT / 0.05),
                                  status=shlex.quote(f"{dest.path}/status"))
    _target_shell(dest, script, PREPARE_WAIT + 10)
    return time.monotonic() - t0


def precopy(mnt: str, dest: Dest, max_passes: int = MAX_PASSES) -> list[Pass]:
    passes: list[Pass] = []
    for i in range(1, max_passes + 1):
        p = rsync_pass(mnt, dest, f"pass {i}")
        passes.append(p)
        log(f"{p.name}: {_mb(p.bytes)} in {p.files} files ({p.chunks} dirty chunks), "
            f"{p.seconds:.2f} s")
        if i == 1:
            ask_prepare(dest)
        if p.bytes < SMALL or (len(passes) > 1 and p.bytes >= SHRINK * passes[-2].bytes):
            break
    return passes


WATCH = """s=; while :; do n=$(head -n 1 {path} 2>/dev/null); if [ "$n" != "$s" ]; then
echo "$n"; s=$n; fi; case $n in restored*|failed*|"dry run"*) exit 0;; esac; sleep 0.01; done"""


class StatusWatch:
    """Follows the target's JOB/status with one long-running shell loop (over one ssh
    connection for a remote job, started before the final pass so its setup overlaps it):
    every change arrives as a line, with the moment it was seen."""

    def __init__(self, dest: Dest):
        script = WATCH.format(path=shlex.quote(f"{dest.path}/status"))
        argv = rsh() + [dest.host, script] if dest.host else ["sh", "-c", script]
        self.dest = dest
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.seen: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.seen.append((time.monotonic(), line.strip()))

    def wait(self, timeout: float) -> str:
        """The final status line, once it says restored; CkptError if it failed or timed out."""
        self._thread.join(timeout)
        self.close()
        err = self.proc.stderr.read().strip() if self.proc.stderr else ""
        return verdict(self.seen, timeout, f"{self.dest}status", err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def verdict(seen: list[tuple[float, str]], timeout: float, where: str, err: str = "") -> str:
    """The target's last status line if it says restored; else why not (CkptError)."""
    last = seen[-1][1] if seen else ""
    if last.startswith("restored"):
        return last
    if last.startswith(("failed", "dry run")):
        raise CkptError(f"target says: {last}", step="restore", path=where)
    raise CkptError(f"target not restored after {timeout:.0f} s (status: {last or 'none'})"
                    + (f"; {err}" if err else ""), step="restore", path=where)


class LocalStatusWatch(StatusWatch):
    """StatusWatch for a job on this machine, from a thread of ours: no shell, no `head` and
    `sleep` started every 10 ms (on two cores their forks take CPU from the copy and the
    restore). Slow (every SLOW s) until `wait()`, called once the final pass is copied and
    only the target's check and restore remain; then every FAST s."""

    SLOW, FAST = 0.02, 0.002

    def __init__(self, dest: Dest):
        self.dest, self.path = dest, os.path.join(dest.path, "status")
        self.seen: list[tuple[float, str]] = []
        self._fast, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="ckptfs-watch")
        self._thread.start()

    def _poll(self) -> None:
        last = ""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb", buffering=0) as f:
                    line = f.read(4096).split(b"\n", 1)[0].decode(errors="replace").strip()
            except OSError:
                line = ""
            if line != last:
                self.seen.append((time.monotonic(), line))
                last = line
                if line.startswith(("restored", "failed", "dry run")):
                    return
            self._stop.wait(self.FAST if self._fast.is_set() else self.SLOW)

    def wait(self, timeout: float) -> str:
        self._fast.set()
        self._thread.join(timeout)
        self.close()
        return verdict(self.seen, timeout, self.path)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


@dataclasses.dataclass
class Result:
    passes: list[Pass]
    downtime: float
    total: float
    status: str
    tracking: str | None
    timeline: list[tuple[float, str]]     # (seconds after the freeze, what happened)
    source_mount: str | None = None       # --keep-source: where the frozen source still is


def migrate(pid: int, dest: Dest, *, keep_source: bool = False, max_passes: int = MAX_PASSES,
            mount_cmd: list[str] | None = None, restore_timeout: float = RESTORE_TIMEOUT) -> Result:
    from .remote import STREAM_PREPASS, start_receiver, stream_pass
    t0 = time.monotonic()
    src = SourceMount(pid, mount_cmd)
    frozen = restored = False
    try:
        tracking = src.tracking
        log(f"process {pid} mounted at {src.dir}; written pages tracked by "
            f"{tracking or 'nothing (every chunk is sent again after the freeze)'}")
        passes = precopy(src.dir, dest, max_passes) if max_passes else []
        if passes:
            waited = wait_prepared(dest)
            if waited > 0.1:
                log(f"waited {waited:.2f} s for the target to prepare the process")
        rx = (start_receiver(dest, restore_timeout) if dest.host and passes and tracking
              else None)
        if rx is not None:
            held = rx.held
        else:
            held = fetch_held(dest) if passes and tracking else None
        guess = guess_chunks(passes) if held is not None else []
        t_freeze = time.monotonic()
        try:
            if rx is not None and guess and STREAM_PREPASS:
                passes.append(stream_pass(src.dir, rx, held, guess, f"pass {len(passes) + 1}"))
                t_freeze = time.monotonic()
            src.ctl("freeze")
        except BaseException:
            if rx is not None:
                rx.close()
            raise
        frozen = True
        marks = [(time.monotonic() - t_freeze, "frozen")]
        watch = rx or (LocalStatusWatch(dest) if dest.host is None else StatusWatch(dest))
        try:
            p = after_freeze(src.dir, dest, held, guess, tracking is not None,
                             lambda what: marks.append((time.monotonic() - t_freeze, what)), rx)
            passes.append(p)
            t_copied = time.monotonic()
            log(f"{p.name}: {_mb(p.bytes)} in {p.files} files ({p.chunks} chunks), "
                f"{p.seconds:.2f} s")
            status = watch.wait(restore_timeout)
        finally:
            watch.close()
        restored = True
        downtime = watch.seen[-1][0] - t_freeze
        timeline = sorted([(t_copied - t_freeze, "final pass copied")] + marks +
                          [(t - t_freeze, line) for t, line in watch.seen])
        log("after the freeze: " + "; ".join(f"+{t * 1000:.0f} ms {what}" for t, what in timeline))
        if keep_source:
            log(f"source {pid} stays frozen under {src.dir} (echo thaw or kill > {src.dir}/ctl)")
        else:
            kill_source(src)
    except BaseException:
        if frozen and not restored:
            restored = back_out(src, dest)
        if not (restored and keep_source) and not (frozen and restored):
            src.close()
        raise
    if not keep_source:
        src.close()
    result = Result(passes, downtime, time.monotonic() - t0, status, tracking, timeline,
                    src.dir if keep_source else None)
    log(f"target: {status}; downtime {downtime * 1000:.0f} ms; total {result.total:.2f} s; "
        f"bytes per pass: {', '.join(_mb(p.bytes) for p in passes)}")
    return result


def tree_pids(root: int) -> list[int]:
    """`root` and its descendants (host pids, parents first), from /proc."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue                 # gone meanwhile: nothing of it left to kill
    return out


def kill_source(src: SourceMount) -> None:
    """`echo kill > ctl` once the target restored the process. Should the mount fail to do it
    (it answered EIO once in the bench, the tree already dead), the source's tree is killed
    here, found from /proc: two running copies are never left, and a migration that did
    arrive is not reported failed."""
    try:
        src.ctl("kill")
        return
    except CkptError as e:
        failed = e
    pids = tree_pids(src.pid)
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log(f"{failed}: killed the source's tasks {pids} directly")


ABORT = """echo abort > {ctl} 2>/dev/null; while :; do s=$(head -n 1 {status} 2>/dev/null)
case $s in restoring*|verifying*) sleep 0.05;; *) echo "$s"; exit 0;; esac; done"""


def back_out(src: SourceMount, dest: Dest) -> bool:
    """After a failure past the freeze: tell the target to drop the job, wait until it is not
    in the middle of a restore, then thaw the source, unless the target did restore it after
    all (then the source stays frozen: never two running copies). True in that case."""
    script = ABORT.format(ctl=shlex.quote(f"{dest.path}/ctl"),
                          status=shlex.quote(f"{dest.path}/status"))
    argv = rsh() + [dest.host, script] if dest.host else ["sh", "-c", script]
    try:
        status = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout.strip()
    except subprocess.TimeoutExpired:
        status = "restoring (still, after 120 s)"
    if status.startswith(("restored", "restoring")):
        log(f"migration failed, but the target says {status!r}: process {src.pid} stays frozen "
            f"under {src.dir} (echo thaw or kill > {src.dir}/ctl)")
        return True
    log(f"migration failed (target: {status or 'no status'}): thawing process {src.pid}, "
        "it keeps running here")
    src.ctl("thaw")
    return False


def run(args) -> int:
    result = migrate(args.pid, Dest.parse(args.dest), keep_source=args.keep_source,
                     max_passes=getattr(args, "passes", MAX_PASSES),
                     restore_timeout=getattr(args, "timeout", RESTORE_TIMEOUT))
    if getattr(args, "json", None):
        doc = dataclasses.asdict(result)
        for p in doc["passes"]:
            del p["names"]
        with open(args.json, "w") as f:
            json.dump(doc, f)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ckptfs.migrate")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("run", help="same as `ckptfs migrate`")
    g.add_argument("--keep-source", action="store_true")
    g.add_argument("--passes", type=int, default=MAX_PASSES)
    g.add_argument("--timeout", type=float, default=RESTORE_TIMEOUT,
                   help="seconds the final pass and the restore may take")
    g.add_argument("--json", metavar="FILE", help="write the result (passes, downtime, "
                   "timeline) there as JSON: for tools/bench_migrate.py")
    g.add_argument("pid", type=int)
    g.add_argument("dest")
    a = p.parse_args(argv)
    try:
        return run(a)
    except CkptError as e:
        print(f"ckptfs migrate: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
