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
from ckptfs.errors import Unsupported
from ckptfs.capture import freebsd as CF
from ckptfs.restore import freebsd as RF
from ckptfs.translate.freebsd import read_plan, to_freebsd, write_plan
from fbsd_fake import FakeFreeBSD, spawn
from helpers import procs as procs_mod, zdtm
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


# -- a pipe between two processes with bytes queued -------------------------------------------
DATA = b"queued between parent and child\n"


def pipe_across(tree_dir: Path) -> tuple[int, int]:
    """fork_tree's parent given the write end and its first child the read end of one pipe
    holding DATA, as fd 50 of each (an edited dump: a shell pipeline's state)."""
    pids = sorted(int(p) for p in os.listdir(tree_dir / "tasks"))
    parent = int(__import__("json").loads((tree_dir / "manifest").read_text())["root"])
    child = min(p for p in pids if p != parent)
    taken = {int((d / "open_file").read_text()) for p in pids
             for d in (tree_dir / f"tasks/{p}/fds").iterdir() if (d / "open_file").exists()}
    for pid, flags, desc in ((parent, "O_WRONLY", max(taken) + 1), (child, "O_RDONLY",
                                                                    max(taken) + 2)):
        d = tree_dir / f"tasks/{pid}/fds/50"
        d.mkdir()
        for name, text in (("type", "pipe\n"), ("path", "pipe:[777001]\n"), ("flags", flags + "\n"),
                           ("pipe_id", "777001\n"), ("open_file", f"{desc}\n")):
            (d / name).write_text(text)
        (d / "data").write_bytes(DATA)
    return parent, child


def test_pipe_data_between_two_processes_comes_back(zdtm_bin, procs, tmp_path):
    """The reader's process reads the queued bytes out and the writer's process writes them
    back (FreeBSD has no tee and the reader holds no write end): the captured tree carries
    them, the pipe there holds them again, and the Linux restore queues them for the child."""
    kits, seen = [], {}

    def move(pid, tmp):
        def edit(tree_dir):
            seen["old"] = pipe_across(tree_dir)
        new = move_through_fake_freebsd(pid, tmp, kits, edit=edit)
        back = tmp / "back"
        seen["back"] = sorted((d / "fds/50/flags").read_text().strip() + " " +
                              (d / "fds/50/data").read_bytes().decode()
                              for d in (back / "tasks").iterdir() if (d / "fds/50").exists())
        kid = next(c for c in procs_mod.children(new) if os.path.exists(f"/proc/{c}/fd/50"))
        rfd, wfd = zdtm.grab_fd(kid, 50), zdtm.grab_fd(new, 50)
        try:
            os.set_blocking(rfd, False)
            seen["linux"] = os.read(rfd, 4096)
            os.write(wfd, seen["linux"])                 # put back as it was
        finally:
            os.close(rfd)
            os.close(wfd)
        return new
    assert zdtm.run_case(zdtm_bin, "fork_tree", tmp_path, procs, move=move) == "PASS"
    assert seen["back"] == ["O_RDONLY " + DATA.decode(), "O_WRONLY " + DATA.decode()]
    assert seen["linux"] == DATA
    [kit] = kits
    held = [d.pipe.buf for p in kit.procs.values() for fd, d in p.fds.items() if fd == 50]
    assert held and all(bytes(b) == DATA for b in held)      # put back after the capture


def test_a_zombie_child_is_refused_by_name_before_any_child_is_stopped(zdtm_bin, procs,
                                                                       tmp_path):
    """A child that exited unreaped (ki_stat SZOMB) cannot be captured: refused naming its
    state file, seen before its siblings are attached (none is left stopped)."""
    pid = zdtm.start(zdtm_bin, "fork_tree", tmp_path / "work", procs.spawn).pid
    ckptfs("dump", "--kill", pid, tmp_path / "tree")
    src = tree.TreeSource(str(tmp_path / "tree"))
    kit = FakeFreeBSD()
    saved, RF.spawn_helper = RF.spawn_helper, spawn(kit)
    try:
        root, first, second = RF.restore(src, RF.Target(kit=kit))
    finally:
        RF.spawn_helper = saved
    kit.procs[second].stat = 5
    kit.attach(root)
    mark = len(kit.log)
    with pytest.raises(Unsupported) as e:
        CF.FreeBSDTreeSource(root, kit)
    assert f"tasks/{second}/state" in str(e.value) and "zombie" in str(e.value)
    assert not [x for x in kit.log[mark:] if x[0] == "attach"]
    assert not kit.procs[first].attached and kit.procs[root].attached
