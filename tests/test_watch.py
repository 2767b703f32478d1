"""ckptfs watch: trees copied into a plain spool directory by real cp -a and rsync -a restore
once when complete; status lives in SPOOL/.ckptfs/<job>.status, never inside the job."""
import os
import signal
import subprocess
import sys
import time

import pytest

from ckptfs.watch import Watcher
from test_target import ROOT, Calls, make_src, recording_restore  # noqa: F401

TESTS = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(TESTS)


def status(spool, job):
    try:
        with open(os.path.join(spool, ".ckptfs", f"{job}.status")) as f:
            return f.read().rstrip("\n")
    except FileNotFoundError:
        return ""


def wait_status(spool, job, prefix, timeout=10):
    deadline = time.monotonic() + timeout
    while not (st := status(spool, job)).startswith(prefix):
        assert time.monotonic() < deadline, f"{job}: status {st!r}, wanted {prefix!r}"
        time.sleep(0.05)
    return st


@pytest.fixture
def watcher(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    w = Watcher(str(spool), restore=Calls(), debounce=0.2)
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_src(d, chunks=4)
    return str(d)


def test_cp_a_into_spool_restores_once(watcher, src):
    subprocess.run(["cp", "-a", src, os.path.join(watcher.spool, "j")], check=True)
    assert wait_status(watcher.spool, "j", "restored") == "restored pid=777"
    assert watcher.completion._restore.trees == [os.path.join(watcher.spool, "j")]
    subprocess.run(["rsync", "-a", "-c", src + "/", os.path.join(watcher.spool, "j/")],
                   check=True)
    time.sleep(0.5)
    assert len(watcher.completion._restore.trees) == 1
    assert not os.path.exists(os.path.join(watcher.spool, "j", ".ckptfs"))
    assert sorted(os.listdir(os.path.join(watcher.spool, ".ckptfs"))) == ["j.json", "j.status"]


def test_slow_rsync_is_not_restored_early(watcher, tmp_path):
    make_src(tmp_path / "s", chunks=12)
    dst = os.path.join(watcher.spool, "slow") + "/"
    p = subprocess.Popen(["rsync", "-a", "--bwlimit=30m", str(tmp_path / "s") + "/", dst])
    try:
        seen = set()
        while p.poll() is None:
            seen.add(status(watcher.spool, "slow").split(":")[0])
            assert not watcher.completion._restore.trees
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0
    wait_status(watcher.spool, "slow", "restored")
    assert len(watcher.completion._restore.trees) == 1 and "restored pid=777" not in seen


def test_incomplete_and_corrupt_trees_wait(watcher, tmp_path):
    chunks = make_src(tmp_path / "s", chunks=2)
    with open(tmp_path / "s" / chunks[0], "r+b") as f:
        f.write(b"\0" * 8)
    subprocess.run(["cp", "-a", str(tmp_path / "s"), os.path.join(watcher.spool, "bad")],
                   check=True)
    assert "checksum" in wait_status(watcher.spool, "bad", f"waiting: {chunks[0]}")
    os.mkdir(os.path.join(watcher.spool, "empty"))
    wait_status(watcher.spool, "empty", "waiting: manifest missing")
    assert watcher.completion._restore.trees == []


def test_existing_jobs_are_found_at_start_and_restored_state_kept(tmp_path, src):
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["cp", "-a", src, str(spool / "early")], check=True)
    calls = Calls()
    w = Watcher(str(spool), restore=calls, debounce=0.1)
    w.start()
    try:
        wait_status(str(spool), "early", "restored")
    finally:
        w.stop()
    again = Calls()
    w = Watcher(str(spool), restore=again, debounce=0.1)
    w.start()
    try:
        time.sleep(0.4)
        assert status(str(spool), "early") == "restored pid=777"
    finally:
        w.stop()
    assert len(calls.trees) == 1 and again.trees == []


def test_watch_command_runs_and_stops_on_sigterm(tmp_path, src):
    spool = tmp_path / "spool"
    spool.mkdir()
    env = dict(os.environ, CKPTFS_TEST_RECORD=str(tmp_path / "record"),
               PYTHONPATH=os.pathsep.join([TOP, TESTS]))
    p = subprocess.Popen([sys.executable, "-m", "ckptfs.watch", "--debounce", "0.2",
                          "--restore-with", "test_target:recording_restore", str(spool)],
                         env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (spool / ".ckptfs").exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        subprocess.run(["rsync", "-a", src + "/", str(spool / "j") + "/"], check=True)
        assert wait_status(str(spool), "j", "restored") == f"restored pid={50000 + ROOT}"
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    assert len((tmp_path / "record").read_text().splitlines()) == 1
