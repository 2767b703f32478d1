"""Linux -> FreeBSD -> Linux through the strict fake FreeBSD kernel (tests/fbsd_fake.py): a
real ZDTM program is dumped on Linux, its FreeBSD plan written and read back, restored by the
FreeBSD restore into the fake, captured back by the FreeBSD capture from what the fake holds,
written as a tree and restored on this Linux host, where it must pass its own check."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from ckptfs import tree
from ckptfs.capture import freebsd as CF
from ckptfs.restore import freebsd as RF
from ckptfs.translate.freebsd import read_plan, to_freebsd, write_plan
from fbsd_fake import FakeFreeBSD, spawn
from helpers import zdtm
from test_freebsd_roundtrip import ckptfs, new_root


def move_through_fake_freebsd(pid: int, tmp: Path, kits: list, edit=None,
                              kernel=FakeFreeBSD, captures=None) -> int:
    """Dump on Linux -> FreeBSD plan files -> FreeBSD restore into the strict fake kernel ->
    FreeBSD capture of what it holds -> a tree -> `ckptfs restore` on this Linux host.
    `edit(tree_dir)` changes the dumped tree first; `captures` collects the capture."""
    ckptfs("dump", "--kill", pid, tmp / "tree")
    if edit is not None:
        edit(tmp / "tree")
    src = tree.TreeSource(str(tmp / "tree"))
    write_plan(to_freebsd(src), str(tmp / "fbsd"))
    kit = kernel()
    kits.append(kit)
    saved, RF.spawn_helper = RF.spawn_helper, spawn(kit)
    try:
        there = RF.restore(src, RF.Target(kit=kit), plan=read_plan(str(tmp / "fbsd")))[0]
    finally:
        RF.spawn_helper = saved
    kit.attach(there)                          # the capture there attaches and stops it
    src = CF.FreeBSDTreeSource(there, kit)     # and the descendants, parents first
    if captures is not None:
        captures.append(src)
    try:
        tree.write_tree(src, str(tmp / "back"))
    finally:
        src.release()
    return new_root(ckptfs("restore", tmp / "back").stdout, there)


# What a FreeBSD restore and a FreeBSD capture both carry (the others: timers, alternate
# stacks and queued signals are not re-made on FreeBSD (plan/lossy says so); unlinked files
# are restored there but not captured back yet).
ROUND_TRIP = ["sleeping", "pipe_data", "half_read_file", "mmap_pattern", "avx_regs",
              "eventfd", "cwd_umask", "fifo", "fork_tree", "criu_mix", "shared_anon"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_zdtm_round_trip_through_freebsd_capture(name, zdtm_bin, procs, tmp_path):
    kits = []
    assert zdtm.run_case(zdtm_bin, name, tmp_path, procs,
                         move=lambda pid, tmp: move_through_fake_freebsd(pid, tmp, kits)) == "PASS"


def test_threads_round_trip_through_freebsd_capture(zdtm_bin, procs, tmp_path):
    """The multi-threaded program comes back from FreeBSD with its 4 threads, each thread's
    TLS and signal mask, and passes its own check."""
    kits = []
    verdict = zdtm.run_case(zdtm_bin, "threads", tmp_path, procs,
                            move=lambda pid, tmp: move_through_fake_freebsd(pid, tmp, kits))
    assert verdict == "PASS"
    [kit] = kits
    there = kit.procs[min(kit.procs)]
    assert len(there.lwps) == 4 and len({m for m in there.masks.values()}) == 4
    back = tmp_path / "back"
    [task] = os.listdir(back / "tasks")
    assert len(os.listdir(back / f"tasks/{task}/threads")) == 4
    # each thread's clear-tid address (what pthread_join waits on) went there and came back
    orig = tmp_path / "tree/tasks"
    [pid] = os.listdir(orig)
    want = sorted(int((orig / pid / "threads" / t / "clear_tid_addr").read_text(), 16)
                  for t in os.listdir(orig / pid / "threads"))
    assert sorted(there.clear_tid.values()) == want and all(want)
    assert sorted(int((back / f"tasks/{task}/threads/{t}/clear_tid_addr").read_text(), 16)
                  for t in os.listdir(back / f"tasks/{task}/threads")) == want
    # and each thread's robust list head, set there by that thread and read back from it
    heads = sorted((orig / pid / "threads" / t / "futex_rla").read_text()
                   for t in os.listdir(orig / pid / "threads"))
    assert sorted((back / f"tasks/{task}/threads/{t}/futex_rla").read_text()
                  for t in os.listdir(back / f"tasks/{task}/threads")) == heads
    assert len(set(heads)) == 4 and "0x0\n" not in heads


# -- descriptors sharing one open file description ---------------------------------------------
def dup_reader(tree_dir: Path) -> None:
    """A copy of the reader's fds/<n> (same open_file) as a new descriptor: a dup of it, as
    half_read_file itself has none."""
    [pid] = os.listdir(tree_dir / "tasks")
    fds = tree_dir / f"tasks/{pid}/fds"
    reader = next(n for n in os.listdir(fds)
                  if (fds / n / "path").read_text().strip().endswith("half_read.dat")
                  and (fds / n / "flags").read_text().startswith("O_RDONLY"))
    shutil.copytree(fds / reader, fds / "40")


_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP, KCMP_FILE = 312, 0


def same_description(pid: int, a: int, b: int) -> bool:
    """kcmp(KCMP_FILE): do fds a and b of pid refer to one open file description?"""
    r = _libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, a, b)
    if r < 0:
        raise OSError(ctypes.get_errno(), f"kcmp {pid} fds {a} {b}")
    return r == 0


def reader_fds(back: Path) -> tuple[int, int, str, str]:
    [pid] = os.listdir(back / "tasks")
    fds = back / f"tasks/{pid}/fds"
    both = sorted(int(n) for n in os.listdir(fds)
                  if (fds / n / "path").read_text().strip().endswith("half_read.dat")
                  and (fds / n / "flags").read_text().startswith("O_RDONLY"))
    assert len(both) == 2, both
    a, b = both
    return a, b, (fds / str(a) / "open_file").read_text(), (fds / str(b) / "open_file").read_text()


def test_dup_shares_its_open_file_description_through_freebsd(zdtm_bin, procs, tmp_path):
    """A dup of the half-read descriptor: FreeBSD's kern.file gives both the same struct
    file address, so the captured tree has one open_file for both and the Linux restore makes
    them one description again (kcmp), the program passing its own check."""
    kits, seen = [], {}

    def move(pid, tmp):
        new = move_through_fake_freebsd(pid, tmp, kits, edit=dup_reader)
        a, b, fa, fb = reader_fds(tmp / "back")
        seen.update(same_tree=fa == fb, same_kernel=same_description(new, a, b))
        return new
    assert zdtm.run_case(zdtm_bin, "half_read_file", tmp_path, procs, move=move) == "PASS"
    assert seen == {"same_tree": True, "same_kernel": True}


class FakeFreeBSDHidingFiles(FakeFreeBSD):
    """The fake kernel as one that hides kernel addresses from kern.file (xf_file reads 0)."""

    def xfiles(self):
        return [dataclasses.replace(x, file=0) for x in super().xfiles()]


def test_without_file_addresses_the_sharing_loss_is_logged(zdtm_bin, procs, tmp_path):
    """Without struct file addresses the dup comes back as a separate open (its own offset),
    and the capture's loss log says so for that descriptor."""
    kits, captures, seen = [], [], {}

    def move(pid, tmp):
        new = move_through_fake_freebsd(pid, tmp, kits, edit=dup_reader,
                                        kernel=FakeFreeBSDHidingFiles, captures=captures)
        a, b, fa, fb = reader_fds(tmp / "back")
        seen.update(same_tree=fa == fb, same_kernel=same_description(new, a, b), b=b)
        return new
    assert zdtm.run_case(zdtm_bin, "half_read_file", tmp_path, procs, move=move) == "PASS"
    assert (seen["same_tree"], seen["same_kernel"]) == (False, False)
    [src] = captures
    notes = [r for r in src.log.records if r.path.endswith(f"/fds/{seen['b']}/open_file")]
    assert len(notes) == 1 and "separate open" in notes[0].reason
