"""A real process tree dumped live into CRIU images, for tests/test_criu.py.

The workload is tests/zdtm/criu_mix.c (see its header for the shape: a root with two
threads, a child sharing an anonymous MAP_SHARED map, a regular file at an offset, a pipe
with queued bytes, private anonymous memory whose every 8-byte word is a function of its
address, a private file map with a copied-on-write page; optionally a zombie and its own UTS
namespace). `dump()` freezes it with LiveSource, exports it with criu.export and records what
the frozen source answered (`Recorded`), so tests compare the images with the live answers
after the process runs again.
"""
from __future__ import annotations

import array
import dataclasses
import functools
import os
from pathlib import Path

from ckptfs import criu
from ckptfs.capture.linux import LiveSource
from ckptfs.flags import TASK_STATES
from ckptfs.model import PAGE_SIZE

from . import zdtm

NAME = "criu_mix"
KEY_PRIV = 0x5A5A5A5A5A5A5A5A     # the keys of criu_mix.c
KEY_COW = 0x0123456789ABCDEF
KEY_SHM = 0x00000C0000000000
BIG_LEN = 3 << 20
PART_PAGES, SHM_PAGES, FMAP_PAGES = 64, 16, 4
FILE_FD, PIPE_R, PIPE_W, FILE_POS = 20, 21, 22, 1234
PIPE_TEXT = b"hello pipe"


def words(origin: int, size: int, key: int) -> bytes:
    """`size` bytes from position `origin` of memory whose 8-byte word at position p holds
    p ^ key (p is the address for private memory, the object offset for shared memory)."""
    first = origin & ~7
    raw = array.array("Q", (w ^ key for w in range(first, origin + size, 8))).tobytes()
    return raw[origin - first: origin - first + size]


def private(addr: int, size: int) -> bytes:
    return words(addr, size, KEY_PRIV)


def shared(offset: int, size: int) -> bytes:
    return words(offset, size, KEY_SHM)


@dataclasses.dataclass
class Layout:
    """Where criu_mix put things (from criu_mix.addrs) and who is who in the tree."""
    root: int
    thread: int
    child: int
    zombie: int
    big: int
    part: int
    fmap: int
    shm: int
    workdir: Path


def layout(run: zdtm.Run) -> Layout:
    addrs = {k: int(v, 16) for k, v in (line.split() for line in
                                         (run.workdir / "criu_mix.addrs").read_text().splitlines())}
    tids = sorted(int(t) for t in os.listdir(f"/proc/{run.pid}/task"))
    (thread,) = [t for t in tids if t != run.pid]
    return Layout(root=run.pid, thread=thread, child=addrs["child"], zombie=addrs["zombie"],
                  big=addrs["big"], part=addrs["part"], fmap=addrs["fmap"], shm=addrs["shm"],
                  workdir=run.workdir)


def start(bindir: Path, workdir: Path, procs, **env: str) -> zdtm.Run:
    """Start criu_mix in `workdir` with extra environment `env` (CRIU_MIX_ZOMBIE,
    CRIU_MIX_HOSTNAME); `procs` (a ProcSet) kills it at teardown."""
    spawn = functools.partial(procs.spawn, env={**os.environ, **env})
    return zdtm.start(bindir, NAME, workdir, spawn)


@dataclasses.dataclass
class Recorded:
    """What a frozen LiveSource answered, for comparison after it thawed."""
    pstree: list
    cores: dict          # tid -> core_entry
    ids: dict            # pid -> task_kobj_ids_entry (live tasks only, as below)
    mm: dict
    fs: dict
    fdinfo: dict
    files: dict          # file id -> file_entry
    ranges: dict         # (pid, vma start) -> [PageRange]
    memory: dict         # (pid, range start) -> bytes of that range
    pipes: dict          # pipe id -> queued bytes
    isolation: object
    meta: object
    reads: list          # sizes of every read_memory call the export made

    def live(self) -> list[tuple[int, list[int]]]:
        """(pid, threads) of the tasks that are not zombies."""
        return [(e.pid, list(e.threads)) for e in self.pstree if e.pid in self.mm]


def record(src: LiveSource, reads: list) -> Recorded:
    pstree = src.pstree()
    zombies = {e.pid for e in pstree if e.pid != src.root
               and src.core(e.pid).tc.task_state == TASK_STATES["dead"]}
    live = [e for e in pstree if e.pid not in zombies]
    rec = Recorded(pstree=pstree, cores={}, ids={}, mm={}, fs={}, fdinfo={}, files={},
                   ranges={}, memory={}, pipes={}, isolation=src.isolation(), meta=src.meta(),
                   reads=reads)
    for e in pstree:
        rec.cores.update({t: src.core(t) for t in e.threads})
    for e in live:
        pid = e.pid
        rec.ids[pid], rec.mm[pid], rec.fs[pid] = src.ids(pid), src.mm(pid), src.fs(pid)
        rec.fdinfo[pid] = src.fdinfo(pid)
        for fd in rec.fdinfo[pid]:
            rec.files[fd.id] = f = src.file(fd.id)
            if f.HasField("pipe"):
                rec.pipes[f.pipe.pipe_id] = src.pipe_data(f.pipe.pipe_id)
        for v in rec.mm[pid].vmas:
            rec.ranges[(pid, v.start)] = got = src.page_ranges(pid, v)
            for r in got:
                rec.memory[(pid, r.start)] = src.read_memory(pid, r.start, r.end - r.start)
    return rec


class ReadSizes:
    """A LiveSource seen through the export, noting the size of every memory read."""

    def __init__(self, src: LiveSource, sizes: list):
        self._src, self._sizes = src, sizes

    def __getattr__(self, name):
        return getattr(self._src, name)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        self._sizes.append(size)
        return self._src.read_memory(pid, addr, size)


def dump(pid: int, out: Path) -> Recorded:
    """Freeze the tree of `pid`, export it to `out`, record the answers, let it run again."""
    reads: list = []
    with LiveSource(pid) as src:
        src.freeze()
        try:
            criu.export(ReadSizes(src, reads), out)
            return record(src, reads)
        finally:
            src.thaw()


def copy(images: Path, dest: Path, skip=()) -> Path:
    """A copy of an image directory (hard links: rewrite files whole, as write_image does)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(images):
        if name not in skip:
            os.link(images / name, dest / name)
    return dest


def pages_of(ranges) -> set[int]:
    return {a for r in ranges for a in range(r.start, r.end, PAGE_SIZE)}
