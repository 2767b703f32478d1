"""Descriptors of a FreeBSD restore: FIFOs, eventfds, deleted files and queued pipe data of
real ZDTM programs, dumped on Linux and restored through the strict fake FreeBSD kernel
(tests/fbsd_fake.py: open file descriptions shared by dup and fork, FreeBSD pipe buffer
rules, FIFO open rules, a jail filesystem over this one). What the fake ends up holding must
be what the program had."""
from __future__ import annotations

import os
import shutil
import stat
import sys
import time

import pytest

from ckptfs import flags as L, tree
from ckptfs.errors import Unsupported
from ckptfs.restore import freebsd as RF
from fbsd_fake import FakeFreeBSD, spawn
from helpers import zdtm
from helpers.cli import dump

NONBLOCK = L.OPEN_FLAGS["O_NONBLOCK"]


def pattern(n: int, seed: int, start: int = 0) -> bytes:
    return bytes(((start + i) * 131 + seed) % 251 for i in range(n))


@pytest.fixture
def program(zdtm_bin, procs, tmp_path):
    """Start a ZDTM program and dump it: (old pid, TreeSource, its work dir)."""
    def run(name):
        r = zdtm.start(zdtm_bin, name, tmp_path / "work", procs.spawn)
        return r.pid, dump(r.pid, tmp_path / "tree"), r.workdir
    return run


def restore(src, kit=None):
    kit = kit or FakeFreeBSD()
    old = RF.spawn_helper
    RF.spawn_helper = spawn(kit)
    try:
        pids = RF.restore(src, RF.Target(kit=kit))
    finally:
        RF.spawn_helper = old
    return kit, pids


def fds_of(kit, pid, kind):
    return {fd: d for fd, d in kit.procs[pid].fds.items() if d.kind == kind}


def test_pipe_data_is_queued_again(program):
    old, src, _ = program("pipe_data")
    kit, [new] = restore(src)
    pipes = fds_of(kit, new, "pipe")
    assert sorted(pipes) == [10, 11]
    assert pipes[10].pipe is pipes[11].pipe
    assert bytes(pipes[10].pipe.buf) == pattern(1000, 7)
    assert bytes(pipes[10].pipe.buf) == src.pipe_data(src.file(
        next(i for i in src.fdinfo(old) if i.fd == 10).id).pipe.pipe_id)
    assert not pipes[10].flags & NONBLOCK and not pipes[11].flags & NONBLOCK


def test_fifo_reopened_with_its_bytes(program):
    old, src, work = program("fifo")
    kit, [new] = restore(src)
    fifo = str(work / "zdtm.fifo")
    ends = {fd: d for fd, d in kit.procs[new].fds.items() if d.kind == "fifo"}
    assert {d.path for d in ends.values()} == {fifo}
    modes = sorted(d.flags & 3 for d in ends.values())
    assert modes == [0, 1]
    reader = next(d for d in ends.values() if d.flags & 3 == 0)
    assert reader.flags & NONBLOCK                       # it was opened O_RDONLY|O_NONBLOCK
    assert bytes(reader.pipe.buf) == pattern(777, 19)
    # the O_RDWR holder is gone again: one reader and one writer, as in the program
    assert (reader.pipe.readers, reader.pipe.writers) == (1, 1)


def test_fifo_missing_in_the_jail_is_made(program):
    old, src, work = program("fifo")
    kit = FakeFreeBSD()
    fifo = str(work / "zdtm.fifo")
    kit.gone.add(fifo)                                   # the jail has no such FIFO yet
    kit, [new] = restore(src, kit)
    made = [e for e in kit.log if e[:3] == ("linux", new, "mknod")]
    assert made == [("linux", new, "mknod", fifo, stat.S_IFIFO | 0o600)]
    assert bytes(kit.fs[fifo].pipe.buf) == pattern(777, 19)


def test_eventfds_counter_and_semaphore(program):
    old, src, _ = program("eventfd")
    kit, [new] = restore(src)
    efds = sorted(fds_of(kit, new, "eventfd").values(), key=lambda d: d.count)
    assert [(d.count, d.semaphore) for d in efds] == [(3, True), (12345, False)]
    assert all(d.flags & NONBLOCK for d in efds)


def test_deleted_file_recreated_opened_and_unlinked(program):
    old, src, work = program("unlinked_file")
    kit, [new] = restore(src)
    name = str(work / "unlinked.dat")
    [desc] = [d for d in kit.procs[new].fds.values() if d.kind == "vnode" and d.path == name]
    assert desc.flags & 3 == 2 and desc.pos == 5000
    assert bytes(desc.node.data) == pattern(10000, 17)
    assert bytes(desc.node.data) == src.file_contents(
        next(i for i in src.fdinfo(old) if i.fd == desc_fd(kit, new, desc)).id)
    assert desc.node.mode == 0o600
    assert name in kit.gone and name not in kit.fs       # unlinked again
    assert ("linux", new, "unlink", name) in kit.log


def desc_fd(kit, pid, desc):
    return next(fd for fd, d in kit.procs[pid].fds.items() if d is desc)


def test_deleted_file_name_taken_uses_a_hidden_name(program):
    """The old name exists again in the jail: the contents go to a hidden name beside it."""
    old, src, work = program("unlinked_file")
    name = str(work / "unlinked.dat")
    with open(name, "w") as f:
        f.write("someone else's file\n")
    kit, [new] = restore(src)
    [desc] = [d for d in kit.procs[new].fds.values() if d.kind == "vnode"
              and os.path.dirname(d.path) == str(work) and "ckptfs-ghost" in d.path]
    assert len(desc.node.data) == 10000 and desc.path in kit.gone
    assert name not in kit.gone                          # the other file is left alone


BIG = r"""
import fcntl, os, sys, time
r, w = os.pipe()
fcntl.fcntl(w, 1031, 1 << 20)              # F_SETPIPE_SZ
os.write(w, bytes(i % 251 for i in range(int(sys.argv[1]))))
os.dup2(r, 20); os.dup2(w, 21); os.close(r); os.close(w)
print("ready", flush=True); time.sleep(1000)
"""


def big_pipe(procs, tmp_path, n):
    p = procs.spawn([sys.executable, "-S", "-c", BIG, str(n)])
    end = time.time() + 10
    while "ready" not in p.stdout_text():
        assert time.time() < end, p.stderr_text()
        time.sleep(0.02)
    return p.pid, dump(p.pid, tmp_path / "tree")


def test_pipe_larger_than_pipe_size_goes_in_one_write(procs, tmp_path):
    """40000 bytes: more than PIPE_SIZE, so one write through a scratch map (unmapped
    afterwards) lets the FreeBSD pipe grow to BIG_PIPE_SIZE; 4 KiB pieces would stop at
    16 KiB."""
    old, src = big_pipe(procs, tmp_path, 40000)
    kit, [new] = restore(src)
    pipe = kit.procs[new].fds[20].pipe
    assert bytes(pipe.buf) == bytes(i % 251 for i in range(40000))
    maps = [e for e in kit.log if e[:3] == ("linux", new, "mmap")
            and 0x200000000 <= e[3] < 0x300000000]
    assert len(maps) == 1
    assert ("linux", new, "munmap", maps[0][3], maps[0][4]) in kit.log


def test_pipe_beyond_big_pipe_size_is_refused_naming_the_file(procs, tmp_path):
    old, src = big_pipe(procs, tmp_path, 100000)
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(src, kit)
    assert f"tasks/{old}/fds/20/data" in str(e.value) and "100000" in str(e.value)
    assert kit.killed and not kit.jails


def test_memory_shared_between_processes_is_one_object(program):
    """shared_anon: a MAP_SHARED anonymous map shared with a forked child. The root maps it
    before it forks, so both processes hold one object (MAP_INHERIT_SHARE): the saved pages
    are there, and a write through one process shows in the other."""
    old, src, _ = program("shared_anon")
    kit, pids = restore(src)
    shared = [(pid, v) for pid in src.pids() for v in src.mm(pid).vmas
              if v.status & L.VMA_STATUS["VMA_ANON_SHARED"]]
    assert len({v.shmid for _, v in shared}) == 1 and len(shared) == 2
    (pid, vma), new = shared[0], dict(zip(src.pids(), pids))
    want = src.read_memory(pid, vma.start, vma.end - vma.start)
    assert all(kit._contents(kit.procs[n], vma.start, vma.end - vma.start) == want
               for n in pids)
    maps = [m for n in pids for m in kit.procs[n].maps if m.start == vma.start]
    assert len(maps) == 2 and maps[0].obj is maps[1].obj is not None
    mmaps = [e for e in kit.log if e[:3] == ("linux", new[old], "mmap") and e[3] == vma.start]
    assert len(mmaps) == 1 and mmaps[0][5] & 1             # once, MAP_SHARED, in the root
    assert not any(e[:3] == ("linux", new[src.pids()[1]], "mmap") and e[3] == vma.start
                   for e in kit.log)                     # the child inherits it


def test_shared_memory_at_two_places_is_refused_naming_the_map(program, tmp_path):
    """The child's copy of the shared map moved elsewhere (an edited tree: mremap could do
    it): inheritance cannot place it, so it is refused before anything exists."""
    old, src, _ = program("shared_anon")
    child = src.pids()[1]
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    maps = edited / f"tasks/{child}/maps"
    [name] = [n for n in os.listdir(maps) if (maps / n / "status").read_text().count("SHARED")
              and (maps / n / "shmid").exists()]
    lo, hi = (int(x, 16) for x in name.split("-"))
    moved = f"{0x100000000000:x}-{0x100000000000 + hi - lo:x}"
    os.rename(maps / name, maps / moved)
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(tree.TreeSource(str(edited)), kit)
    assert f"tasks/{child}/maps/{moved}/shmid" in str(e.value)
    assert f"process {old}" in str(e.value)
    assert kit.log == []
