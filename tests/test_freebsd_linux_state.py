"""Linux process state the Linuxulator keeps outside registers and memory, restored on FreeBSD
(strict fake kernel, real Linux checkpoints): the program break (linux_brk moves the break of
the executable the kernel started, so the recorded one is reached only when the helper's data
segment ends where the program's heap begins), robust futex lists (set_robust_list, per
thread), thread names (no Linux call sets one on FreeBSD: listed in plan/lossy)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ckptfs import tree
from ckptfs.capture import freebsd as CF
from ckptfs.restore import freebsd as RF
from ckptfs.translate.freebsd import to_freebsd
from fbsd_fake import FakeFreeBSD, spawn
from helpers import procs as P, zdtm

CLI = [sys.executable, "-m", "ckptfs.cli"]


def dump_program(zdtm_bin, tmp, name):
    ps = P.ProcSet(tmp / "logs")
    try:
        run = zdtm.start(zdtm_bin, name, tmp / "work", ps.spawn)
        r = subprocess.run([*CLI, "dump", "--kill", str(run.pid), str(tmp / "tree")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        ps.kill_all()
    return tmp / "tree"


@pytest.fixture(scope="module")
def sleeping(zdtm_bin, tmp_path_factory):
    return dump_program(zdtm_bin, tmp_path_factory.mktemp("sleeping"), "sleeping")


@pytest.fixture(scope="module")
def threads(zdtm_bin, tmp_path_factory):
    return dump_program(zdtm_bin, tmp_path_factory.mktemp("threads"), "threads")


def restore(src, kit):
    saved, RF.spawn_helper = RF.spawn_helper, spawn(kit)
    report = []
    try:
        [*pids] = RF.restore(src, RF.Target(kit=kit), report=report)
    finally:
        RF.spawn_helper = saved
    return pids, report


def only_pid(src):
    [pid] = [p for p, _ in src.tasks()]
    return pid


def heap(src, pid):
    mm = src.mm(pid)
    return mm.mm_start_brk, mm.mm_brk


def test_break_of_the_helper_cannot_reach_the_program_heap(sleeping):
    """A helper whose data segment is far below the program (a PIE's heap is terabytes
    away, beyond RLIMIT_DATA): brk(mm_brk) answers the old break; the restore says so,
    naming tasks/<pid>/mm/brk, and the heap is still there as an anonymous map."""
    src = tree.TreeSource(str(sleeping))
    pid = only_pid(src)
    start, brk = heap(src, pid)
    kit = FakeFreeBSD()
    [new], report = restore(src, kit)
    assert ("linux", new, "brk", brk, 0x601000) in kit.log      # asked, and refused
    assert kit.procs[new].brk == 0x601000
    [warning] = [w for w in report if "/mm/brk" in w]
    assert warning.startswith(f"tasks/{pid}/mm/brk: the break stays the helper's")
    if brk > start:
        assert any(m.start <= start < m.end for m in kit.procs[new].maps)


def test_break_set_when_the_helper_data_ends_at_the_heap(sleeping):
    """A helper placed so its data segment ends at the program's heap start: the injected
    brk moves the break to the recorded one (kern_break maps the heap), no warning."""
    src = tree.TreeSource(str(sleeping))
    pid = only_pid(src)
    start, brk = heap(src, pid)
    kit = FakeFreeBSD(helper_bss=(start - 0x1000, start))
    [new], report = restore(src, kit)
    assert kit.procs[new].brk == brk
    assert ("linux", new, "brk", brk, brk) in kit.log
    assert not [w for w in report if "/mm/brk" in w], report


def test_capture_reads_the_break_back(sleeping):
    """brk(0) in the captured process: the recorded break when the Linuxulator's break is
    the program's; otherwise the heap map's end, and the loss log says why."""
    src = tree.TreeSource(str(sleeping))
    pid = only_pid(src)
    start, brk = heap(src, pid)
    for bss, exact in (((start - 0x1000, start), True), (None, False)):
        kit = FakeFreeBSD(**({"helper_bss": bss} if bss else {}))
        [new], _ = restore(src, kit)
        kit.attach(new)
        there = CF.FreeBSDSource(new, kit)
        got = there.mm(new)
        notes = [r for r in there.log.records if r.path == f"tasks/{new}/mm/brk"]
        if exact:
            assert (got.mm_start_brk, got.mm_brk, notes) == (start, brk, [])
        else:
            assert [n.value for n in notes] == ["0x601000"]      # the helper's break
        assert ("linux", new, "brk", 0, kit.procs[new].brk) in kit.log


def test_robust_list_of_every_thread(threads):
    """Each thread's robust list head goes to set_robust_list made by that thread (24-byte
    head, what linux_set_robust_list accepts; it keeps the head per calling thread): the
    main thread suspended while a worker makes its call."""
    src = tree.TreeSource(str(threads))
    pid = only_pid(src)
    kit = FakeFreeBSD()
    [new], report = restore(src, kit)
    p = kit.procs[new]
    heads = {t: src.core(t).thread_core.futex_rla for t in src.threads(pid)}
    assert all(heads.values()) and len(set(heads.values())) == len(heads)
    lwp_of = {t: lwp for t, lwp in zip(sorted(heads), sorted(p.lwps))}
    assert p.robust == {lwp_of[t]: h for t, h in heads.items()}
    assert not [w for w in report if "futex_rla" in w]
    worker, head = lwp_of[max(heads)], heads[max(heads)]
    around = [e for e in kit.log if e[0] in ("suspend", "resume")
              or e == ("linux", new, "set_robust_list", head)]
    i = around.index(("linux", new, "set_robust_list", head))
    assert around[i - 2:i + 3] == [("suspend", new), ("resume", worker),
                                   ("linux", new, "set_robust_list", head),
                                   ("suspend", worker), ("resume", new)]


def test_set_robust_list_with_a_wrong_length_is_refused_by_the_kernel(threads, tmp_path):
    """A robust list length other than 24 (an edited tree): the injected call fails with
    the Linuxulator's EINVAL, the restore stops naming the file and removes its helpers."""
    root = tmp_path / "tree"
    shutil.copytree(threads, root)
    [pid] = os.listdir(root / "tasks")
    path = root / f"tasks/{pid}/threads/{pid}/futex_rla_len"
    os.chmod(path, 0o644)
    path.write_text("16\n")
    kit = FakeFreeBSD()
    with pytest.raises(Exception) as e:
        restore(tree.TreeSource(str(root)), kit)
    assert getattr(e.value, "errno", None) == 22 and "futex_rla" in str(e.value)
    assert not kit.procs and not kit.jails


def test_thread_names_are_listed_as_lost(threads, tmp_path):
    """A worker named by the program (an edited copy: the threads program names none):
    the plan's lossy list names its comm file; an unnamed worker is not listed."""
    root = tmp_path / "tree"
    shutil.copytree(threads, root)
    [pid] = os.listdir(root / "tasks")
    tids = sorted(int(t) for t in os.listdir(root / f"tasks/{pid}/threads"))
    named = tids[1]
    path = root / f"tasks/{pid}/threads/{named}/comm"
    os.chmod(path, 0o644)
    path.write_text("worker-1\n")
    lossy = {r.path: r for r in to_freebsd(tree.TreeSource(str(root))).lossy}
    comm = [p for p in lossy if p.endswith("/comm")]
    assert comm == [f"tasks/{pid}/threads/{named}/comm"]
    assert lossy[comm[0]].value == "worker-1"
