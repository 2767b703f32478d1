"""The final pass of a migration as one byte stream, and `ckptfs receive JOB` at its far end.

`ckptfs migrate` to another host starts `ssh HOST ckptfs receive JOB` before it freezes the
source (so that ssh's connection setup and the receiver's start are not part of the downtime),
then writes exactly the difference between the frozen manifest and what the job holds into
that one session. The receiver writes each file into the job with the rules of the local final
pass (migrate.copy_file: rewritten in place, a new file created with its mode) and follows the
job's status, so nothing else crosses the network after the freeze.

Stream (every integer little-endian):

    header   b"CKPTFS-S" u16 version (1)
    record   u8 kind, then by kind:
      b"F"   file:    u16 path length, path (UTF-8, relative), u32 mode (0: keep the job's,
                      or 0600 for a new file), u64 size, u64 head check, size bytes,
                      u64 xxh3-64 of the bytes
      b"D"   delete:  u16 path length, path, u64 head check (a file is unlinked, a directory
                      removed; absent is fine)
      b"S"   sync:    nothing; the receiver answers once everything before it is written
      b"E"   end:     u32 files, u64 bytes (what the F records carried: a short stream is
                      never mistaken for a complete one)

The head check is the xxh3-64 of the record from its kind byte up to it: a corrupted path,
mode or size is refused before the receiver acts on it. A file up to BUFFERED bytes is
received whole and its checksum verified before a byte of it
reaches the job; a larger one is written as it arrives and verified at its end. Either way a
mismatch stops the receiver with an error naming the file (the job's manifest check then
refuses the job too: its checksums are the source's).

Replies, one text line each on the receiver's stdout:

    held N        then N lines `<xxh3> <size> <path>`: JOB/held, what the job holds
    held none     the job cannot say (a plain directory, an older target)
    ready         the stream may start
    synced N B    after a sync record: N files, B bytes written so far
    received N B  the end record arrived: N files, B bytes written
    status LINE   every change of JOB/status's first line after that, until `restored`,
                  `failed` or `dry run`, or until the stream's writer goes away
    error MSG     the receiver stopped (it exits 1)
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import queue
import select
import struct
import sys
import threading
import time

import xxhash

from .errors import CkptError

MAGIC, VERSION = b"CKPTFS-S", 1
HEADER = struct.Struct("<8sH")
PATHLEN = struct.Struct("<H")
FILEHEAD = struct.Struct("<IQ")
DIGEST = struct.Struct("<Q")
END = struct.Struct("<IQ")
BLOCK = 1 << 20
F_SETPIPE_SZ, PIPE_SIZE = 1031, 1 << 20
BUFFERED = 64 << 20        # files up to this are verified before they reach the job
RESERVED = ("ctl", "status", "held")    # the job's own files: never written by a stream
WATCH_FAST = 0.002
WATCH_TIMEOUT = 300.0
FINAL = ("restored", "failed", "dry run")


class StreamError(CkptError):
    """The stream is malformed, truncated or corrupted: names the file it was carrying."""


def widen_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer (the most an unprivileged process may set), so that reading the
    next block overlaps with ssh sending the last one; the 64 KiB default lets ssh idle while
    the sender reads. Not a pipe (a socket, a file) or refused: the default stays, only the
    overlap is lost, so the error is not raised."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def check_path(rel: str) -> str:
    """A path the stream may name: relative, normalized, inside the job, not a control file."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or "\0" in rel or parts[0] in RESERVED):
        raise StreamError(f"path {rel!r} is not a file of a job", step="receive", path=rel)
    return rel


# -- writing the stream (the migrating side) ------------------------------------------------
class StreamWriter:
    """Frames records onto a file descriptor (the ssh session's stdin). Every OSError (the
    receiver went away: EPIPE) is raised as CkptError naming the file being sent."""

    def __init__(self, fd: int):
        self.fd, self.files, self.bytes = fd, 0, 0
        widen_pipe(fd)
        self._put(HEADER.pack(MAGIC, VERSION), "stream header")

    def _put(self, data, what: str) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            raise CkptError(f"sending to the receiver: {e.strerror or e}", step="final pass",
                            path=what, err=e.errno) from None

    @staticmethod
    def _head(kind: bytes, rel: str, mode: int | None = None, size: int = 0) -> bytes:
        raw = check_path(rel).encode()
        body = kind + PATHLEN.pack(len(raw)) + raw
        if mode is not None:
            body += FILEHEAD.pack(mode, size)
        return body + DIGEST.pack(xxhash.xxh3_64_intdigest(body))

    def data(self, rel: str, data: bytes, mode: int = 0) -> str:
        """One file from memory; its xxh3-64 in hex."""
        digest = xxhash.xxh3_64(data)
        self._put(self._head(b"F", rel, mode, len(data)), rel)
        self._put(data, rel)
        self._put(DIGEST.pack(digest.intdigest()), rel)
        self.files, self.bytes = self.files + 1, self.bytes + len(data)
        return digest.hexdigest()

    def file(self, mnt: str, rel: str, with_mode: bool = True, missing_ok: bool = False
             ) -> tuple[int, str] | None:
        """One file of the (frozen) mount, read in blocks as it is sent: (size, xxh3 hex),
        or None for a file the mount does not have with `missing_ok`. Its size is fstat's;
        a file that reads shorter or longer is an error naming it."""
        try:
            fd = os.open(os.path.join(mnt, rel), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise CkptError("not in the frozen mount", step="final pass", path=rel,
                            err=errno.ENOENT) from None
        except OSError as e:
            raise CkptError(f"cannot open: {e.strerror}", step="final pass", path=rel,
                            err=e.errno) from None
        try:
            st = os.fstat(fd)
            mode = st.st_mode & 0o7777 if with_mode else 0
            self._put(self._head(b"F", rel, mode, st.st_size), rel)
            h, left = xxhash.xxh3_64(), st.st_size
            while left:
                block = os.read(fd, min(BLOCK, left))
                if not block:
                    raise CkptError(f"ended {left} bytes before its size {st.st_size}",
                                    step="final pass", path=rel)
                h.update(block)
                self._put(block, rel)
                left -= len(block)
            if os.read(fd, 1):
                raise CkptError(f"longer than its size {st.st_size}", step="final pass",
                                path=rel)
        except OSError as e:
            raise CkptError(f"reading: {e.strerror}", step="final pass", path=rel,
                            err=e.errno) from None
        finally:
            os.close(fd)
        self._put(DIGEST.pack(h.intdigest()), rel)
        self.files, self.bytes = self.files + 1, self.bytes + st.st_size
        return st.st_size, h.hexdigest()

    def delete(self, rel: str) -> None:
        self._put(self._head(b"D", rel), rel)

    def sync(self) -> None:
        self._put(b"S", "sync")

    def end(self) -> None:
        self._put(b"E" + END.pack(self.files, self.bytes), "end of stream")


# -- reading the stream (the receiving side) -------------------------------------------------
class StreamReader:
    """Parses records from a binary file object; every flaw is a StreamError naming the file."""

    def __init__(self, f):
        self.f = f
        head = self._exact(HEADER.size, "stream header")
        magic, version = HEADER.unpack(head)
        if magic != MAGIC or version != VERSION:
            raise StreamError(f"not a ckptfs stream of version {VERSION} "
                              f"(starts {head!r})", step="receive", path="stream header")

    def _exact(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise StreamError(f"stream ended {n - len(data)} bytes early", step="receive",
                              path=what)
        return data

    def kind(self) -> bytes:
        return self._exact(1, "next record")

    def head(self, kind: bytes) -> tuple[str, int, int]:
        """A record's path, and for a file its mode and size, once its head check holds."""
        length = self._exact(PATHLEN.size, "path length")
        raw = self._exact(PATHLEN.unpack(length)[0], "path")
        name = raw.decode(errors="replace")
        extra = self._exact(FILEHEAD.size, name) if kind == b"F" else b""
        (want,) = DIGEST.unpack(self._exact(DIGEST.size, name))
        if want != xxhash.xxh3_64_intdigest(kind + length + raw + extra):
            raise StreamError("record head checksum mismatch (its path, mode or size is "
                              "corrupted)", step="receive", path=name)
        try:
            rel = check_path(raw.decode())
        except UnicodeDecodeError:
            raise StreamError(f"path {raw!r} is not UTF-8", step="receive", path=name) from None
        mode, size = FILEHEAD.unpack(extra) if extra else (0, 0)
        return rel, mode, size

    def blocks(self, rel: str, size: int):
        """The file's bytes in blocks; after the last one, its checksum is checked."""
        h = xxhash.xxh3_64()
        while size:
            block = self._exact(min(BLOCK, size), rel)
            h.update(block)
            size -= len(block)
            yield block
        (want,) = DIGEST.unpack(self._exact(DIGEST.size, rel))
        if want != h.intdigest():
            raise StreamError(f"checksum mismatch: the stream says {want:016x}, its bytes "
                              f"are {h.intdigest():016x}", step="receive", path=rel)

    def end(self) -> tuple[int, int]:
        return END.unpack(self._exact(END.size, "end of stream"))


@functools.lru_cache(maxsize=4096)
def _beneath(job: str, parent: str) -> bool:
    real = os.path.realpath(job)
    return os.path.realpath(os.path.join(job, parent)).startswith(real + os.sep) or not parent


def beneath(job: str, rel: str) -> str:
    """JOB/rel, refused when a symbolic link in the job would lead it elsewhere (the last
    component is opened with O_NOFOLLOW)."""
    if not _beneath(job, os.path.dirname(rel)):
        raise StreamError("leads out of the job through a symbolic link", step="receive",
                          path=rel)
    return os.path.join(job, rel)


def open_for_write(job: str, rel: str, mode: int) -> int:
    """The job's file, truncated and rewritten in place (the target sees one writer for the
    whole file); a new one created with `mode` (or 0600), its directories made."""
    path = beneath(job, rel)
    try:
        return os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    if mode:
        os.fchmod(fd, mode)
    return fd


def write_blocks(job: str, rel: str, mode: int, blocks) -> int:
    try:
        fd = open_for_write(job, rel, mode)
        try:
            n = 0
            for block in blocks:
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
                n += len(block)
        finally:
            os.close(fd)
    except OSError as e:
        raise CkptError(f"writing into the job: {e.strerror or e}", step="receive", path=rel,
                        err=e.errno) from None
    return n


def remove(job: str, rel: str) -> None:
    path = beneath(job, rel)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CkptError(f"removing from the job: {e.strerror}", step="receive", path=rel,
                        err=e.errno) from None


class Applier:
    """Applies received files and deletions to the job in one thread of its own, in stream
    order, so that the next file arrives (and is verified) while this one is written."""

    def __init__(self, job: str):
        self.job, self.bytes, self.error = job, 0, None
        self.todo: queue.Queue = queue.Queue(maxsize=8)
        self.thread = threading.Thread(target=self._run, daemon=True, name="ckptfs-apply")
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            if self.error is None:
                try:
                    item()
                except CkptError as e:
                    self.error = e
            self.todo.task_done()
        self.todo.task_done()

    def put(self, work) -> None:
        if self.error:
            raise self.error
        self.todo.put(work)

    def drain(self) -> None:
        """Until everything queued is applied; the first failure is raised."""
        self.todo.join()
        if self.error:
            raise self.error

    def file(self, rel: str, mode: int, data: bytes) -> None:
        def work():
            self.bytes += write_blocks(self.job, rel, mode, [data])
        self.put(work)

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()


def apply_stream(f, job: str, synced=None) -> tuple[int, int]:
    """Everything `f` carries, written into `job`: (files, bytes) once the end record came.
    `synced(files, bytes)` is called at each sync record, once all before it is written."""
    reader, applier = StreamReader(f), Applier(job)
    files = 0
    try:
        while (kind := reader.kind()) != b"E":
            if kind == b"D":
                rel = reader.head(kind)[0]
                applier.put(lambda rel=rel: remove(job, rel))
                continue
            if kind == b"S":
                applier.drain()
                if synced:
                    synced(files, applier.bytes)
                continue
            if kind != b"F":
                raise StreamError(f"unknown record kind {kind!r}", step="receive",
                                  path="next record")
            rel, mode, size = reader.head(kind)
            files += 1
            if size <= BUFFERED:
                applier.file(rel, mode, b"".join(reader.blocks(rel, size)))
            else:
                applier.drain()
                applier.bytes += write_blocks(job, rel, mode, reader.blocks(rel, size))
        want_files, want_bytes = reader.end()
        applier.drain()
    finally:
        applier.close()
    if (want_files, want_bytes) != (files, applier.bytes):
        raise StreamError(f"the end record says {want_files} files, {want_bytes} bytes; "
                          f"{files} files, {applier.bytes} bytes arrived", step="receive",
                          path="end of stream")
    return files, applier.bytes


def held_lines(job: str) -> list[str] | None:
    try:
        with open(os.path.join(job, "held")) as f:
            return f.read().splitlines()
    except OSError:
        return None


def first_line(path: str) -> str:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(4096).split(b"\n", 1)[0].decode(errors="replace").strip()
    except OSError:
        return ""


def follow_status(job: str, say, stdin_fd: int, timeout: float) -> None:
    """Say every change of JOB/status until it is final, the writer closed its end of our
    stdin (it gave up: nobody is listening) or `timeout` passed."""
    last, deadline, path = None, time.monotonic() + timeout, os.path.join(job, "status")
    while time.monotonic() < deadline:
        line = first_line(path)
        if line != last:
            say(f"status {line}")
            last = line
            if line.startswith(FINAL):
                return
        if select.select([stdin_fd], [], [], WATCH_FAST)[0] and not os.read(stdin_fd, 1):
            return


def receive(job: str, *, stdin=None, stdout=None, timeout: float = WATCH_TIMEOUT) -> int:
    """`ckptfs receive JOB`: the reply protocol of the module docstring around apply_stream."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout

    def say(line: str) -> None:
        stdout.write(line + "\n")
        stdout.flush()

    widen_pipe(stdin.fileno())
    try:
        if not os.path.isdir(job):
            raise CkptError("no such job directory", step="receive", path=job)
        held = held_lines(job)
        say("held none" if held is None else f"held {len(held)}")
        for line in held or ():
            say(line)
        say("ready")
        files, nbytes = apply_stream(stdin, job, lambda n, b: say(f"synced {n} {b}"))
        say(f"received {files} {nbytes}")
    except CkptError as e:
        say(f"error {e}")
        print(f"ckptfs receive: {e}", file=sys.stderr)
        return 1
    follow_status(job, say, stdin.fileno(), timeout)
    return 0
