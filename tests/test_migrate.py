"""`ckptfs migrate` on real processes: rsync pre-copy into a real `ckptfs target`, locally and
between two simulated hosts over ssh; the source thaws when the target never restores."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptfs import migrate
from ckptfs.errors import CkptError
from helpers import procs as P
from test_dirty import build_workload

CLI = [sys.executable, "-m", "ckptfs.cli"]
TOTAL, WSET, WOFF = 64, 4, 16          # MiB: region, working set rewritten continuously, offset


@pytest.fixture(scope="module")
def wset_bin(tmp_path_factory):
    return build_workload(tmp_path_factory.mktemp("wset"))


def start_workload(procs, wset_bin, logdir: Path):
    """The workload rewriting its working set; its answers go to logdir/stdout."""
    p = procs.spawn([wset_bin, TOTAL, WSET, WOFF, "loop", "1000"], logdir=logdir)
    P.wait_file(logdir / "stdout", None, proc=p)
    return p, logdir / "stdout"


def verify(pid: int, out: str, timeout: float = 10.0) -> str:
    """Ask the (possibly restored) workload to check all its memory; its answer line."""
    before = Path(out).read_text().count("\n")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = Path(out).read_text().splitlines()
        if len(lines) > before:
            return lines[-1]
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not answer the memory check in {out}")


def restored_pid(status: str) -> int:
    assert status.startswith("restored pid="), status
    return int(status.split("=", 1)[1])


def test_dest_parsing():
    assert migrate.Dest.parse("root@hostb:/in/job") == migrate.Dest("root@hostb", "/in/job")
    assert migrate.Dest.parse("hostb:/in/job/") == migrate.Dest("hostb", "/in/job")
    assert migrate.Dest.parse("/mnt/in/job") == migrate.Dest(None, "/mnt/in/job")
    with pytest.raises(CkptError):
        migrate.Dest.parse("hostb:/in/")
        migrate.Dest.parse("hostb:/")


def test_migrate_locally_with_shrinking_passes(wset_bin, procs, tmp_path, tmp_mount):
    dst, store = tmp_path / "in", tmp_path / "store"
    dst.mkdir()
    tmp_mount([*CLI, "target", "-f", "--store", str(store), str(dst)], dst)
    src, out = start_workload(procs, wset_bin, tmp_path / "wl")
    result = migrate.migrate(src.pid, migrate.Dest(None, str(dst / "job")))
    new = restored_pid(result.status)
    procs.adopt(new)
    assert result.tracking == "uffd-wp+pagemap-scan"
    first, *rest = result.passes
    assert first.bytes >= TOTAL << 20
    # every later pass (pre-copy and final) carries about the working set, not the region
    assert rest and all(p.bytes < (WSET + 4) << 20 for p in rest), result.passes
    assert rest[-1].name == "final pass" and rest[-1].chunks <= WSET // 2 + 3
    assert P.wait_gone(src.pid, 10)                       # the source was killed
    assert verify(new, str(out)).startswith("ok round=")  # every page as it was, still running
    assert 0 < result.downtime < result.total
    # the target built the process during pre-copy and only finished it after the freeze
    log = (store / "log").read_text()
    assert "process prepared" in log and "restoring normally" not in log, log
    # the final pass sent the difference to what the target held, not a whole rsync pass:
    # copied here, starting with the chunks the last pre-copy pass sent
    whats = [what for _, what in result.timeline]
    assert "frozen manifest read" in whats
    assert any(w.endswith("guessed chunks copied") and not w.startswith("0 ") for w in whats)
    assert not list((dst / "job").rglob(".*.??????"))     # no rsync temp file was left


def test_guesses_are_the_chunks_both_last_passes_sent():
    P = migrate.Pass
    one = P("pass 1", 0, 0, 0, 0.0, ["meta", "tasks/1/maps/a-b/pages/0x0", "tasks/1/maps/a-b/pages/0x200000"])
    two = P("pass 2", 0, 0, 0, 0.0, ["tasks/1/core", "tasks/1/maps/a-b/pages/0x200000"])
    three = P("pass 3", 0, 0, 0, 0.0, ["tasks/1/core", "tasks/1/maps/a-b/pages/0x200000",
                                       "tasks/1/maps/c-d/pages/0x0"])
    assert migrate.guess_chunks([one]) == []              # a first pass sends everything
    assert migrate.guess_chunks([one, two]) == ["tasks/1/maps/a-b/pages/0x200000"]
    assert migrate.guess_chunks([one, two, three]) == ["tasks/1/maps/a-b/pages/0x200000"]


def test_final_pass_copy_in_place(tmp_path):
    mnt, job = tmp_path / "mnt", tmp_path / "job"
    (mnt / "a" / "b").mkdir(parents=True)
    (job / "a").mkdir(parents=True)
    big = os.urandom(migrate.BLOCK * 2)                  # a whole number of blocks
    (mnt / "a" / "chunk").write_bytes(big)
    (mnt / "a" / "b" / "new").write_bytes(b"fresh\n")
    os.chmod(mnt / "a" / "b" / "new", 0o444)
    (job / "a" / "chunk").write_bytes(b"old and longer than nothing" * 100000)
    inode = (job / "a" / "chunk").stat().st_ino
    import xxhash
    assert migrate.copy_file(str(mnt), str(job), "a/chunk", True) == \
        (len(big), xxhash.xxh3_64_hexdigest(big))
    assert (job / "a" / "chunk").read_bytes() == big
    assert (job / "a" / "chunk").stat().st_ino == inode   # rewritten in place
    assert migrate.copy_file(str(mnt), str(job), "a/b/new") == (6, None)
    assert (job / "a" / "b" / "new").read_bytes() == b"fresh\n"
    assert (job / "a" / "b" / "new").stat().st_mode & 0o777 == 0o444   # a new file: its mode
    # guesses: a file the mount no longer has is left out, one that failed half way is unknown
    (job / "a" / "dir").mkdir()
    (mnt / "a" / "dir").write_bytes(b"x")                # cannot replace a directory
    c = migrate.LocalCopier(str(mnt), str(job))
    try:
        got = c.settle(c.guess(["a/chunk", "a/vanished", "a/dir"]))
    finally:
        c.close()
    assert got == {"a/chunk": (xxhash.xxh3_64_hexdigest(big), len(big)), "a/dir": None}
    assert c.sent == ["a/chunk"] and c.bytes == len(big)
    files = {"a/chunk": {"size": len(big), "xxh3_64": xxhash.xxh3_64_hexdigest(big)},
             "a/dir": {"size": 1, "xxh3_64": "0" * 16}}
    assert migrate._stale(files, got, sorted(files)) == ["a/dir"]


def test_failure_thaws_the_source(wset_bin, procs, tmp_path):
    src, out = start_workload(procs, wset_bin, tmp_path / "wl")
    plain = tmp_path / "nobody-restores-here" / "job"     # a plain directory: no target
    plain.parent.mkdir()
    with pytest.raises(CkptError, match="not restored"):
        migrate.migrate(src.pid, migrate.Dest(None, str(plain)), max_passes=1,
                        restore_timeout=1.0)
    assert src.alive()
    status = Path(f"/proc/{src.pid}/status").read_text()
    assert "TracerPid:\t0" in status and "State:\tT" not in status
    assert not [l for l in Path("/proc/self/mountinfo").read_text().splitlines()
                if f"ckptfs-migrate-{src.pid}-" in l]     # the source mount is gone
    assert verify(src.pid, str(out)).startswith("ok round=")
    line1 = verify(src.pid, str(out))
    time.sleep(0.05)
    assert verify(src.pid, str(out)) != line1              # rounds go on: it runs


def remote_env(host, receive: list[str] = ()) -> dict:
    """Environment for a migrate run on `host`: ssh through the hosts' config, the far side's
    receiver from this checkout (optionally behind a `receive` wrapper)."""
    top = str(Path(__file__).parents[1])
    return dict(os.environ, CKPTFS_RSH=host.ssh_cmd(), PYTHONPATH=top,
                CKPTFS_RECEIVE=shlex.join([*receive, sys.executable, "-m", "ckptfs.cli",
                                           "receive"]))


@pytest.mark.two_hosts
def test_migrate_between_two_hosts_over_ssh(wset_bin, procs, tmp_path, tmp_mount, two_hosts):
    a, b, disk = two_hosts.a, two_hosts.b, two_hosts.disk
    dst, store = f"{disk}/in-{tmp_path.name}", f"{disk}/store-{tmp_path.name}"
    os.makedirs(b.path(dst))
    tmp_mount([*CLI, "target", "-f", "--store", store, dst], dst, runner=b, timeout=30)
    logdir = tmp_path / "wl"
    src = a.spawn([wset_bin, TOTAL, WSET, WOFF, "loop", "1000"], procs=procs, logdir=logdir)
    out = logdir / "stdout"
    P.wait_file(out, None, proc=src)
    if not os.path.exists(b.path(str(out))):              # no shared /tmp: the log travels too
        b.run(["mkdir", "-p", str(logdir)], check=True)
        a.run(["rsync", "-a", "-e", a.ssh_cmd(), f"{logdir}/", f"{b.name}:{logdir}/"], check=True)
    r = a.run([sys.executable, "-m", "ckptfs.migrate", "run", str(src.pid),
               f"{b.name}:{dst}/job"], env=remote_env(a), timeout=120)
    assert r.returncode == 0, r.stderr
    status = open(b.path(f"{dst}/job/status")).read().strip()
    new = restored_pid(status)
    procs.adopt(new)
    assert "pass 2:" in r.stderr and "downtime" in r.stderr, r.stderr
    # the final pass went through the receiver's session, opened before the freeze
    assert "receiver on hostb ready" in r.stderr and "final pass sent" in r.stderr, r.stderr
    assert P.wait_gone(src.pid, 10)
    assert verify(new, b.path(str(out))).startswith("ok round=")


def test_keep_source_leaves_it_frozen_under_its_mount(wset_bin, procs, tmp_path, tmp_mount):
    dst, store = tmp_path / "in", tmp_path / "store"
    dst.mkdir()
    tmp_mount([*CLI, "target", "-f", "--store", str(store), str(dst)], dst)
    src, out = start_workload(procs, wset_bin, tmp_path / "wl")
    result = migrate.migrate(src.pid, migrate.Dest(None, str(dst / "job")), keep_source=True,
                             max_passes=1)
    procs.adopt(restored_pid(result.status))
    mnt = result.source_mount
    try:
        assert Path(mnt, "status").read_text().startswith("frozen\n")
        assert src.alive()
        os.kill(src.pid, signal.SIGUSR1)        # a frozen source does not answer
        time.sleep(0.2)
        assert "ok" not in Path(out).read_text()
        assert verify(restored_pid(result.status), str(out)).startswith("ok round=")
        Path(mnt, "ctl").write_text("kill\n")
        assert P.wait_gone(src.pid, 10)
    finally:
        subprocess.run(["fusermount3", "-u", mnt])
        os.rmdir(mnt)
