"""mtimes and checksums the source mount serves when written-page tracking is on.

Chunk files take their mtime from the tracker's ChunkClock (capture/dirty.py); the small state
files from their content (ContentStamps); the frozen manifest reuses the checksums a copy tool's
reads already paid for (ChunkSums). Together they make rsync's quick check (size + mtime) skip
exactly what did not change since the previous pass.
"""
from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable

import xxhash

from . import tree
from .capture.dirty import _salt, chunk_key  # noqa: F401 (chunk_key: the fs uses it from here)


class ContentStamps:
    """mtimes for small state files that move only when their content does.

    Every time the mount renders a file (for a stat, or the snapshot an open takes) its
    xxh3 is compared with the last one seen for that path; a difference gives the path a new
    stamp, strictly greater (whole seconds) than any it had. A copy records the stamp of its
    stat and the bytes of its later open; if those bytes differed, the open already moved
    the stamp; anything that changes after is seen by the next stat. So an unchanged stamp
    means the copy holds the current bytes, and after a freeze only the files whose content
    really changed (registers, the manifest) are sent again."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._now = clock
        self.salt = _salt()
        self._seen: dict[str, tuple[int, int]] = {}     # path -> (xxh3, stamp in s)
        self._lock = threading.Lock()

    def stamp(self, path: str) -> int | None:
        """The path's current mtime in ns, None before its content was first seen."""
        with self._lock:
            old = self._seen.get(path)
        return None if old is None else old[1] * 10**9 + self.salt

    def observe(self, path: str, content: bytes) -> int:
        """The path's mtime in ns after seeing `content`."""
        digest = xxhash.xxh3_64_intdigest(content)
        with self._lock:
            old = self._seen.get(path)
            if old is None or old[0] != digest:
                stamp = max(int(self._now()), old[1] + 1) if old else int(self._now())
                old = self._seen[path] = (digest, stamp)
            return old[1] * 10**9 + self.salt


class ChunkSums:
    """xxh3 of chunk files, taken while a copy tool reads them whole and in order, and reused
    by the frozen manifest when the chunk's stamp has not moved since the read was opened.

    Why that is exact: the stamp seen at open came from a pass before the open, so the bytes
    read include every write before that pass; any write after it is found by a later pass
    (the mount makes one right after the freeze) and moves the stamp. Same stamp after the
    freeze = no write since = the bytes read are the bytes now. Saves hashing all of memory
    while the process is frozen (about 0.4 s per GiB).

    A chunk being read with the current stamp while the manifest is built (`ckptfs migrate`
    copies the chunks it expects to have changed while it waits for the manifest) is not read
    a second time: the manifest waits for that read, unless it stalls for STALL seconds."""

    STALL = 0.1

    def __init__(self):
        self._open: dict[int, list] = {}   # fh -> [path, stamp, hasher, next offset, last read]
        self._done: dict[str, tuple[int, int, str]] = {}   # path -> (stamp, size, hex)
        self._lock = threading.Lock()
        self._moved = threading.Condition(self._lock)     # a read ended or was given up

    def opened(self, fh: int, path: str, stamp: int) -> None:
        with self._lock:
            self._open[fh] = [path, stamp, xxhash.xxh3_64(), 0, time.monotonic()]

    def data(self, fh: int, offset: int, addr: int, n: int) -> None:
        with self._lock:
            st = self._open.get(fh)
            if st is not None and offset != st[3]:
                del self._open[fh]               # not one sequential read: no checksum
                self._moved.notify_all()
                return
        if st is not None:                      # one reader per handle: no lock needed
            st[2].update((ctypes.c_char * n).from_address(addr))   # hashed in place
            st[3] += n
            st[4] = time.monotonic()

    def released(self, fh: int, length: int) -> None:
        with self._lock:
            st = self._open.pop(fh, None)
            if st is not None and st[3] == length:
                self._done[st[0]] = (st[1], length, st[2].hexdigest())
            self._moved.notify_all()

    def checksummed(self, top, clock) -> dict[str, tuple[int, str]]:
        """tree.checksummed_files(top), with chunks whose stamp did not move taken from here.
        Chunks come last, so that reads going on meanwhile have the most time to finish."""
        out, chunks = {}, []
        for path, node in tree.walk(top):
            if isinstance(node, tree.Dir) or path in tree.CTL_FILES or path == "manifest":
                continue
            key = chunk_key("/" + path)
            if key is None:
                out[path] = _checksum(node)
            else:
                chunks.append((path, node, clock.mtime(*key)))
        for path, node, stamp in chunks:
            out[path] = self._read_sum("/" + path, stamp, node.size()) or _checksum(node)
        return out

    def _read_sum(self, path: str, stamp: int, size: int) -> tuple[int, str] | None:
        """(size, hex) from a whole read of `path` opened at `stamp`, waiting for one in
        progress; None when there is none (or it stalled)."""
        with self._lock:
            while True:
                hit = self._done.get(path)
                if hit and hit[0] == stamp and hit[1] == size:
                    return hit[1:]
                last = max((st[4] for st in self._open.values()
                            if st[0] == path and st[1] == stamp), default=None)
                if last is None or time.monotonic() - last > self.STALL:
                    return None
                self._moved.wait(self.STALL)


def _checksum(node) -> tuple[int, str]:
    h, size = xxhash.xxh3_64(), 0
    for piece in tree._pieces(node):
        h.update(piece)
        size += len(piece)
    return size, h.hexdigest()
