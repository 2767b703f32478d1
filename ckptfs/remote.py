"""The final pass to another host through one ssh session running `ckptfs receive JOB`.

The session is opened before the freeze (ssh's key exchange, the far Python's start and its
reading of JOB/held all happen while the source still runs) and warmed by one last pre-copy
pass of the working set through it (stream_pass); after the freeze migrate writes
exactly the difference between the frozen manifest and JOB/held into it (stream.py), starting
with the chunks the last pre-copy passes both sent while the mount builds the manifest, and
the same session then reports the job's status until `restored`: nothing else is started
after the freeze.

The far command is $CKPTFS_RECEIVE (default "ckptfs receive"), the job path appended.
"""
from __future__ import annotations

import contextlib
import os
import queue
import shlex
import subprocess
import tempfile
import threading
import time

from .errors import CkptError
from .migrate import RESTORE_TIMEOUT, Pass, _mb, _stale, log, read_manifest, rsh
from .stream import FINAL, StreamWriter

START_TIMEOUT = 60.0
STREAM_TIMEOUT = 120.0  # a pass through the session, until the receiver says it is written
ERROR_GRACE = 2.0       # after a failed write: how long the receiver may take to say why


class _Silent(CkptError):
    """The receiver said nothing within the time given."""


class ReceiverFailed(CkptError):
    """The receiver said why it stopped, or it ended without saying."""


def receive_command() -> list[str]:
    return shlex.split(os.environ.get("CKPTFS_RECEIVE", "ckptfs receive"))


class Receiver:
    """`ssh HOST ckptfs receive JOB`. `held` is what the job holds ({path: (xxh3, size)}) or
    None when it cannot say. Its status lines land in `seen` as (arrival time, line), as
    StatusWatch's do, and `wait()` / `close()` answer like StatusWatch's."""

    def __init__(self, dest, rsh: list[str], timeout: float = START_TIMEOUT,
                 stream_timeout: float = STREAM_TIMEOUT):
        self.dest, self.timeout, self.expired = dest, stream_timeout, None
        remote = shlex.join(receive_command() + [dest.path])
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(rsh + [dest.host, remote], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err)
        self.seen: list[tuple[float, str]] = []
        self._writer: StreamWriter | None = None
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="ckptfs-receiver").start()
        self.held = self._handshake(timeout)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
        self._lines.put(None)

    def _stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace").strip()[-2000:]

    def _next(self, timeout: float, what: str) -> tuple[float, str]:
        """The next reply line; its `error` line or its going away as a CkptError."""
        try:
            item = self._lines.get(timeout=max(timeout, 0))
        except queue.Empty:
            raise _Silent(f"no {what} from the receiver within {timeout:.0f} s",
                            step="final pass", path=str(self.dest)) from None
        if item is None:
            self._lines.put(None)            # every later call sees the end too
            rc = self.proc.wait()
            raise ReceiverFailed(f"the receiver ended (exit {rc}) before its {what}"
                            + (f": {self._stderr()}" if self._stderr() else ""),
                            step="final pass", path=str(self.dest))
        if item[1].startswith("error "):
            raise ReceiverFailed(f"the receiver says: {item[1][6:]}", step="final pass",
                            path=str(self.dest))
        return item

    def _handshake(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        _, first = self._next(timeout, "answer")
        if not first.startswith("held "):
            raise CkptError(f"unexpected first answer {first!r}", step="final pass",
                            path=str(self.dest))
        held = None if first == "held none" else {}
        for _ in range(int(first[5:]) if held is not None else 0):
            parts = self._next(deadline - time.monotonic(), "held list")[1].split(" ", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise CkptError(f"bad held line {' '.join(parts)!r}", step="final pass",
                                path=f"{self.dest}held")
            held[parts[2]] = (parts[0], int(parts[1]))
        if self._next(deadline - time.monotonic(), "ready")[1] != "ready":
            raise CkptError("the receiver did not say ready", step="final pass",
                            path=str(self.dest))
        return held

    def writer(self) -> StreamWriter:
        """The session's one stream (its header is sent on the first call)."""
        if self._writer is None:
            self._writer = StreamWriter(self.proc.stdin.fileno())
        return self._writer

    def synced(self, timeout: float) -> tuple[int, int]:
        """After a sync record: (files, bytes) the receiver has written so far."""
        return self._counts(timeout, "synced")

    @contextlib.contextmanager
    def bounded(self):
        """A pass through the session: should the far side stop reading, a write would block
        for ever (and the source stay frozen); after `timeout` the session is killed, the
        write fails, and `why()` says so."""
        timer = threading.Timer(self.timeout, self._expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self) -> None:
        self.expired = self.timeout
        self.proc.kill()

    def why(self, e: CkptError) -> CkptError:
        """After a failed send: the receiver's own reason when it gives one soon, else `e`."""
        if self.expired:
            return CkptError(f"the stream did not get through within {self.expired:.0f} s "
                             "(the session was killed)", step="final pass", path=str(self.dest))
        if isinstance(e, ReceiverFailed):
            return e
        try:
            while True:
                self._next(ERROR_GRACE, "answer to the stream")
        except _Silent:
            return e
        except CkptError as reason:
            return reason

    def received(self, timeout: float) -> tuple[int, int]:
        """(files, bytes) the receiver wrote, once the whole stream arrived."""
        return self._counts(timeout, "received")

    def _counts(self, timeout: float, word: str) -> tuple[int, int]:
        t, line = self._next(timeout, f"`{word}`")
        if not line.startswith(word + " "):
            raise CkptError(f"unexpected answer {line!r} (waiting for `{word}`)",
                            step="final pass", path=str(self.dest))
        files, nbytes = line.split()[1:3]
        return int(files), int(nbytes)

    def wait(self, timeout: float) -> str:
        """The final status line, once it says restored; CkptError if it failed or timed out."""
        deadline = time.monotonic() + timeout
        last = ""
        try:
            while not last.startswith(FINAL):
                t, line = self._next(deadline - time.monotonic(), "status")
                if line.startswith("status "):
                    last = line[7:]
                    self.seen.append((t, last))
        finally:
            self.close()
        if last.startswith("restored"):
            return last
        raise CkptError(f"target says: {last}", step="restore", path=f"{self.dest}status")

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass                          # the receiver is gone already: nothing to flush
        if self.proc.poll() is None:
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the passes through it ------------------------------------------------------------------
def gone_paths(files: dict, gone: set) -> list[str]:
    """What to delete so that the job holds no file `files` lacks: the `gone` files, then the
    directories left without any listed file, deepest first."""
    kept = {os.path.dirname(rel) for rel in files}
    kept |= {d for rel in kept for d in _parents(rel)}
    dirs = {d for rel in gone for d in _parents(os.path.dirname(rel))} - kept
    return sorted(gone) + sorted(dirs, key=lambda d: (-d.count("/"), d))


def _parents(rel: str) -> list[str]:
    out = []
    while rel:
        out.append(rel)
        rel = os.path.dirname(rel)
    return out


# Before the freeze, the working set goes once more through the receiver's session: a fresh
# ssh connection moves its first megabytes at a third of the speed it reaches later (TCP
# buffers and ssh's channel window grow with the traffic), and that slow start would otherwise
# fall into the downtime. What it sends counts as held; the final pass sends what changed since.
STREAM_PREPASS = os.environ.get("CKPTFS_STREAM_PREPASS", "1") != "0"


def stream_pass(mnt: str, rx, held: dict, rels: list[str], name: str) -> Pass:
    """A pre-copy pass of `rels` through the receiver, `held` updated with what it sent."""
    t0 = time.monotonic()
    w = rx.writer()
    b0, sent = w.bytes, []
    try:
        with rx.bounded():
            for rel in rels:
                if (r := w.file(mnt, rel, rel not in held, missing_ok=True)) is not None:
                    held[rel] = (r[1], r[0])
                    sent.append(rel)
            w.sync()
            rx.synced(rx.timeout)
    except CkptError as e:
        raise rx.why(e) from None
    p = Pass(f"{name} (stream)", w.bytes - b0, len(sent), sum("/pages/" in n for n in sent),
             time.monotonic() - t0, sent)
    log(f"{p.name}: {_mb(p.bytes)} in {p.files} files ({p.chunks} dirty chunks), "
        f"{p.seconds:.2f} s")
    return p


def streamed_pass(mnt: str, rx, held: dict, guess: list[str], mark) -> Pass:
    """The final pass into a job of another host, through the receiver's session: the
    `guess`ed chunks while the mount builds the frozen manifest, then deletions, the
    manifest, the rest of the difference, and those guesses the manifest says changed again."""
    t0 = time.monotonic()
    w = rx.writer()
    b0 = w.bytes
    try:
        with rx.bounded():
            sent = _stream_difference(mnt, w, held, guess, mark)
            rx.received(rx.timeout)
    except CkptError as e:
        raise rx.why(e) from None
    return Pass("final pass", w.bytes - b0, len(sent), sum("/pages/" in n for n in sent),
                time.monotonic() - t0, sent)


def _stream_difference(mnt: str, w, held: dict, guess: list[str], mark) -> list[str]:
    got: dict = {}            # guessed chunks sent: {rel: (xxh3, size)}
    failed: list = []

    def send_guesses():
        try:
            for rel in guess:
                if (r := w.file(mnt, rel, rel not in held, missing_ok=True)) is not None:
                    got[rel] = (r[1], r[0])
        except CkptError as e:
            failed.append(e)

    sender = threading.Thread(target=send_guesses, name="ckptfs-guess", daemon=True)
    sender.start()
    try:
        doc, raw = read_manifest(mnt, raw=True)
        mark("frozen manifest read")
    finally:
        sender.join()
    if failed:
        raise failed[0]
    files = doc.get("files")
    if files is None:
        raise CkptError("the frozen manifest lists no files", step="final pass",
                        path=os.path.join(mnt, "manifest"))
    mark(f"{len(got)} guessed chunks sent")
    # as into a local job: vanished files go before the manifest, the manifest before the rest
    for rel in gone_paths(files, (set(held) | set(got)) - set(files)):
        w.delete(rel)
    w.data("manifest", raw)
    rest = _stale(files, held, sorted(set(files) - set(got)))
    for rel in rest + _stale(files, got, sorted(set(got) & set(files))):
        w.file(mnt, rel, rel not in held)
    w.end()
    mark("final pass sent")
    return sorted(set(got) | set(rest))


def start_receiver(dest, timeout: float = RESTORE_TIMEOUT):
    """The remote final pass's session (remote.Receiver), opened before the freeze; None when
    the far side cannot receive (no `ckptfs receive` there, a job that cannot say what it
    holds): then the final pass goes through rsync, as before. A pass through it that takes
    longer than `timeout` fails."""
    t0 = time.monotonic()
    try:
        rx = Receiver(dest, rsh(), stream_timeout=timeout)
    except CkptError as e:
        log(f"no receiver on {dest.host} ({e}): the final pass goes through rsync")
        return None
    if rx.held is None:
        rx.close()
        return None
    log(f"receiver on {dest.host} ready in {time.monotonic() - t0:.2f} s "
        f"(the job holds {len(rx.held)} files)")
    return rx
