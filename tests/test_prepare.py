"""Prepared restores (ckptfs.restore.prepare) on real processes: built from a tree copied while
the process runs, finished from the frozen tree copied over it; only changed chunks are
written again, and a tree that no longer fits is refused (Stale) with nothing left behind."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from ckptfs import migrate
from ckptfs.restore import prepare
from helpers import procs as P
from test_dirty import build_workload
from test_migrate import verify

MiB = 1 << 20
TOTAL, WSET, WOFF = 64, 4, 16


@pytest.fixture(scope="module")
def wset_bin(tmp_path_factory):
    return build_workload(tmp_path_factory.mktemp("wset"))


def rsync(mnt: str, tree: str) -> None:
    r = subprocess.run(["rsync", *migrate.COMMON, mnt + "/", tree + "/"], capture_output=True,
                       text=True)
    assert r.returncode in migrate.RSYNC_OK, r.stderr


@pytest.fixture
def source(procs, tmp_path):
    """(mounted source, workload process, its stdout file, cmd pipe or None) factory."""
    mounts = []

    def make(argv, cmd=False):
        logdir = tmp_path / "wl"
        p = procs.spawn(argv, logdir=logdir, stdin=subprocess.PIPE if cmd else subprocess.DEVNULL)
        out = logdir / "stdout"
        P.wait_file(out, None, proc=p)
        m = migrate.SourceMount(p.pid)
        mounts.append(m)
        return m, p, str(out)
    yield make
    for m in mounts:
        m.close()


def gone(pids) -> bool:
    return all(P.wait_gone(pid, 5) for pid in pids)


def test_prepared_restore_writes_only_changed_chunks(wset_bin, source, procs, tmp_path):
    src, p, out = source([wset_bin, TOTAL, WSET, WOFF, "loop", "1000"])
    tree = str(tmp_path / "tree")
    rsync(src.dir, tree)                                  # pre-copy while it runs
    ready = prepare.prepare(tree)
    try:
        assert ready.r.timing["bytes"] >= TOTAL * MiB
        time.sleep(0.2)                                   # it rewrites its working set
        src.ctl("freeze")
        rsync(src.dir, tree)                              # the final pass
        src.ctl("kill")
        result = ready.finish(tree)
    except BaseException:
        ready.cancel()
        raise
    new = result.pids[p.pid]
    procs.adopt(new)
    assert 0 < result.timing["refilled"] <= (WSET + 4) * MiB, result.timing
    assert verify(new, out).startswith("ok round=")
    with pytest.raises(prepare.Stale):
        ready.finish(tree)                                # once only


def test_changed_layout_is_stale_and_leaves_nothing(wset_bin, source, tmp_path):
    src, p, out = source([wset_bin, TOTAL, WSET, WOFF, "cmd"], cmd=True)
    tree = str(tmp_path / "tree")
    rsync(src.dir, tree)
    ready = prepare.prepare(tree)
    built = list(ready.r.created)
    assert built and all(P.state(pid) for pid in built)
    p.popen.stdin.write(b"m")                             # a new map: another layout
    p.popen.stdin.flush()
    deadline = time.monotonic() + 5
    while "new=" not in open(out).read():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    src.ctl("freeze")
    rsync(src.dir, tree)
    with pytest.raises(prepare.Stale, match="memory layout changed"):
        ready.finish(tree)
    assert gone(built)
    src.ctl("thaw")


def test_running_tree_is_never_finished(wset_bin, source, tmp_path):
    src, p, out = source([wset_bin, TOTAL, WSET, WOFF, "loop", "1000"])
    tree = str(tmp_path / "tree")
    rsync(src.dir, tree)
    ready = prepare.prepare(tree)
    built = list(ready.r.created)
    with pytest.raises(prepare.Stale, match="only a frozen tree restores"):
        ready.finish(tree)
    assert gone(built)


def test_new_contents_of_a_deleted_mapped_file_is_stale(zdtm_bin, procs, tmp_path):
    """A deleted file the process maps is made again from ghosts/<id>/contents when the
    process is built; contents that arrive new with the frozen tree (rsync delivers a new
    file) no longer fit what was built: Stale, nothing left."""
    from pathlib import Path
    from helpers import zdtm
    run = zdtm.start(zdtm_bin, "deleted_map", tmp_path / "work", procs.spawn)
    procs.adopt_tree(run.pid)                             # its forked child too
    src = migrate.SourceMount(run.pid)
    try:
        tree = str(tmp_path / "tree")
        rsync(src.dir, tree)
        ready = prepare.prepare(tree)
        built = list(ready.r.created)
        src.ctl("freeze")
        rsync(src.dir, tree)
        ghost = next(Path(tree, "ghosts").iterdir()) / "contents"
        new = ghost.with_name(".contents.new")
        new.write_bytes(ghost.read_bytes()[::-1])
        os.replace(new, ghost)
        with pytest.raises(prepare.Stale, match="memory layout changed"):
            ready.finish(tree)
        assert gone(built)
        src.ctl("thaw")
    finally:
        src.close()
