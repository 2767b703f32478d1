"""Linux -> FreeBSD -> Linux through the strict fake FreeBSD kernel (tests/fbsd_fake.py): a
real ZDTM program is dumped on Linux, its FreeBSD plan written and read back, restored by the
FreeBSD restore into the fake, captured back by the FreeBSD capture from what the fake holds,
written as a tree and restored on this Linux host, where it must pass its own check."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptfs import tree
from ckptfs.capture import freebsd as CF
from ckptfs.restore import freebsd as RF
from ckptfs.translate.freebsd import read_plan, to_freebsd, write_plan
from fbsd_fake import FakeFreeBSD, spawn
from helpers import zdtm
from test_freebsd_roundtrip import ckptfs, new_root


def move_through_fake_freebsd(pid: int, tmp: Path, kits: list) -> int:
    """Dump on Linux -> FreeBSD plan files -> FreeBSD restore into the strict fake kernel ->
    FreeBSD capture of what it holds -> a tree -> `ckptfs restore` on this Linux host."""
    ckptfs("dump", "--kill", pid, tmp / "tree")
    src = tree.TreeSource(str(tmp / "tree"))
    write_plan(to_freebsd(src), str(tmp / "fbsd"))
    kit = FakeFreeBSD()
    kits.append(kit)
    saved, RF.spawn_helper = RF.spawn_helper, spawn(kit)
    try:
        there = RF.restore(src, RF.Target(kit=kit), plan=read_plan(str(tmp / "fbsd")))[0]
    finally:
        RF.spawn_helper = saved
    kit.attach(there)                          # the capture there attaches and stops it
    src = CF.FreeBSDTreeSource(there, kit)     # and the descendants, parents first
    try:
        tree.write_tree(src, str(tmp / "back"))
    finally:
        src.release()
    return new_root(ckptfs("restore", tmp / "back").stdout, there)


# What a FreeBSD restore and a FreeBSD capture both carry (the others: timers, alternate
# stacks and queued signals are not re-made on FreeBSD (plan/lossy says so); unlinked files
# are restored there but not captured back yet).
ROUND_TRIP = ["sleeping", "pipe_data", "half_read_file", "mmap_pattern", "avx_regs",
              "eventfd", "cwd_umask", "fifo", "fork_tree"]


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
