"""`ckptfs migrate` on real processes: rsync pre-copy into a real `ckptfs target`, locally and
between two simulated hosts over ssh; the source thaws when the target never restores."""
from __future__ import annotations

import io
import os
import re
import struct
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import xxhash

from ckptfs import migrate, remote, stream
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


def test_kill_source_kills_the_tree_when_the_mount_cannot(procs, tmp_path):
    """After a restore the source must die even if `echo kill > ctl` fails (the mount
    answered EIO once in the bench): its tree is killed from /proc."""
    parent = procs.spawn(["sh", "-c", "sleep 100 & echo $!; wait"], logdir=tmp_path / "t")
    child = int(P.wait_file(tmp_path / "t" / "stdout", None, proc=parent).split()[0])
    procs.adopt(child)

    class Broken:                 # a source mount whose ctl fails as that one did
        pid = parent.pid

        def ctl(self, word):
            raise CkptError("echo kill > ctl: Input/output error", step=word, path="ctl")
    assert migrate.tree_pids(parent.pid) == [parent.pid, child]
    migrate.kill_source(Broken())
    assert P.wait_gone(child, 5) and P.wait_gone(parent.pid, 5)


# A remote shell that runs the command here: `sh -c 'shift; exec sh -c "$1"' rsh HOST CMD`.
HERE_RSH = ["sh", "-c", 'shift; exec sh -c "$1"', "rsh"]


def test_streamed_pass_into_a_real_target_removes_vanished_directories(
        wset_bin, procs, tmp_path, tmp_mount, monkeypatch):
    """The receiver's session without ssh (HERE_RSH), into a real target: a file the job
    holds in a directory the frozen tree no longer has (a mapping unmapped after the
    pre-copy) goes, with its emptied directories, and the process restores."""
    dst, store = tmp_path / "in", tmp_path / "store"
    dst.mkdir()
    tmp_mount([*CLI, "target", "-f", "--store", str(store), str(dst)], dst)
    monkeypatch.setenv("CKPTFS_RECEIVE", shlex.join([sys.executable, "-m", "ckptfs.cli",
                                                     "receive"]))
    src_proc, out = start_workload(procs, wset_bin, tmp_path / "wl")
    job = dst / "job"
    src = migrate.SourceMount(src_proc.pid)
    rx = None
    try:
        migrate.rsync_pass(src.dir, migrate.Dest(None, str(job)), "pass 1")
        dead = job / "tasks" / str(src_proc.pid) / "maps" / "dead-beef"
        (dead / "pages").mkdir(parents=True)
        (dead / "pages" / "0x0").write_bytes(b"unmapped since")
        rx = remote.Receiver(migrate.Dest("here", str(job)), HERE_RSH)
        assert rx.held[f"tasks/{src_proc.pid}/maps/dead-beef/pages/0x0"][1] == 14
        src.ctl("freeze")
        p = remote.streamed_pass(src.dir, rx, rx.held, [], lambda what: None)
        new = restored_pid(rx.wait(30))
        procs.adopt(new)
        src.ctl("kill")
    finally:
        if rx is not None:
            rx.close()
        src.close()
    assert p.name == "final pass" and p.bytes < (WSET + 4) << 20
    assert not (job / "tasks" / str(src_proc.pid) / "maps" / "dead-beef").exists()
    assert verify(new, str(out)).startswith("ok round=")


# -- the final-pass stream, without hosts ----------------------------------------------------
def make_stream(tmp_path: Path, build) -> Path:
    """The bytes `build(writer)` frames, in a file."""
    path = tmp_path / "stream"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        build(stream.StreamWriter(fd))
    finally:
        os.close(fd)
    return path


def test_stream_writes_the_difference_into_the_job(tmp_path):
    mnt, job = tmp_path / "mnt", tmp_path / "job"
    (mnt / "t" / "pages").mkdir(parents=True)
    big = os.urandom(3 * stream.BLOCK + 5)
    (mnt / "t" / "pages" / "0x0").write_bytes(big)
    (mnt / "t" / "new").write_bytes(b"fresh\n")
    os.chmod(mnt / "t" / "new", 0o444)
    (job / "t" / "pages").mkdir(parents=True)
    (job / "t" / "pages" / "0x0").write_bytes(b"old" * 1000)
    (job / "t" / "stale").write_bytes(b"x")
    (job / "gone" / "deep").mkdir(parents=True)
    (job / "gone" / "deep" / "f").write_bytes(b"y")
    inode = (job / "t" / "pages" / "0x0").stat().st_ino

    def build(w):
        for rel in remote.gone_paths({"t/pages/0x0": {}, "t/new": {}},
                                      {"t/stale", "gone/deep/f"}):
            w.delete(rel)
        w.data("manifest", b"{}\n")
        assert w.file(str(mnt), "t/pages/0x0", with_mode=False) == \
            (len(big), xxhash.xxh3_64_hexdigest(big))
        w.file(str(mnt), "t/new")
        assert w.file(str(mnt), "t/absent", missing_ok=True) is None
        w.end()
    with open(make_stream(tmp_path, build), "rb") as f:
        assert stream.apply_stream(f, str(job)) == (3, len(big) + 6 + 3)
    assert (job / "t" / "pages" / "0x0").read_bytes() == big
    assert (job / "t" / "pages" / "0x0").stat().st_ino == inode      # rewritten in place
    assert (job / "t" / "new").read_bytes() == b"fresh\n"
    assert (job / "t" / "new").stat().st_mode & 0o777 == 0o444       # a new file: its mode
    assert (job / "manifest").read_bytes() == b"{}\n"
    assert not (job / "t" / "stale").exists() and not (job / "gone").exists()


def test_gone_paths_removes_emptied_directories_deepest_first():
    files = {"tasks/1/comm": {}, "tasks/1/maps/a-b/pages/0x0": {}}
    gone = {"tasks/1/maps/c-d/pages/0x0", "tasks/1/maps/c-d/flags", "tasks/2/comm"}
    assert remote.gone_paths(files, gone) == [
        "tasks/1/maps/c-d/flags", "tasks/1/maps/c-d/pages/0x0", "tasks/2/comm",
        "tasks/1/maps/c-d/pages", "tasks/1/maps/c-d", "tasks/2"]


def test_stream_flaws_are_refused_naming_the_file(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "chunk").write_bytes(b"held before")

    def build(w):
        w.data("first", b"a" * 100)
        w.data("chunk", b"b" * 1000)
        w.end()
    good = make_stream(tmp_path, build).read_bytes()
    at = good.index(b"b" * 1000) + 500                   # one byte inside `chunk`'s bytes
    bad = good[:at] + bytes([good[at] ^ 1]) + good[at + 1:]
    with pytest.raises(stream.StreamError, match=r"receive: chunk: checksum mismatch"):
        stream.apply_stream(io.BytesIO(bad), str(job))
    assert (job / "first").read_bytes() == b"a" * 100    # the files before it arrived
    assert (job / "chunk").read_bytes() == b"held before"  # verified before it was written
    with pytest.raises(stream.StreamError, match=r"receive: chunk: stream ended 600 bytes"):
        stream.apply_stream(io.BytesIO(good[:at - 100]), str(job))
    with pytest.raises(stream.StreamError, match=r"end of stream: stream ended"):
        stream.apply_stream(io.BytesIO(good[:-3]), str(job))
    at = good.index(b"chunk")                          # a flipped bit in the path
    bad = good[:at] + b"c" + bytes([good[at + 1] ^ 2]) + good[at + 2:]
    with pytest.raises(stream.StreamError, match=r"receive: cjunk: record head checksum"):
        stream.apply_stream(io.BytesIO(bad), str(job))
    assert not (job / "cjunk").exists()
    with pytest.raises(stream.StreamError, match=r"stream header: not a ckptfs stream"):
        stream.apply_stream(io.BytesIO(b"rsync..." + good[8:]), str(job))
    # an end record that does not match what arrived: a stream cut between two records
    second = 10 + 1 + 2 + len("first") + 12 + 8 + 100 + 8   # header, first record
    assert good[second:second + 1] == b"F"
    cut = good[:second] + good[-13:]
    with pytest.raises(stream.StreamError, match=r"says 2 files, 1100 bytes; 1 files, 100"):
        stream.apply_stream(io.BytesIO(cut), str(job))
    # symbolic links in the job lead nowhere outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    (job / "link").symlink_to(outside)
    (job / "file-link").symlink_to(outside / "victim")

    def through_links(w):
        w.data("link/planted", b"x")
        w.end()
    with open(make_stream(tmp_path, through_links), "rb") as f:
        with pytest.raises(stream.StreamError, match=r"link/planted: leads out of the job"):
            stream.apply_stream(f, str(job))

    def onto_link(w):
        w.data("file-link", b"x")
        w.end()
    with open(make_stream(tmp_path, onto_link), "rb") as f:
        with pytest.raises(CkptError, match=r"file-link: writing into the job: Too many"):
            stream.apply_stream(f, str(job))
    assert list(outside.iterdir()) == []
    for rel in ("../escape", "/abs", "a//b", "ctl", "held", "status", "a/./b"):
        with pytest.raises(stream.StreamError, match="is not a file of a job"):
            stream.check_path(rel)
    raw = b"../x"
    body = b"D" + struct.pack("<H", len(raw)) + raw
    evil = good[:10] + body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + good[-13:]
    with pytest.raises(stream.StreamError, match=r"'\.\./x' is not a file of a job"):
        stream.apply_stream(io.BytesIO(evil), str(job))


def remote_env(host, receive: list[str] = ()) -> dict:
    """Environment for a migrate run on `host`: ssh through the hosts' config, the far side's
    receiver from this checkout (optionally behind a `receive` wrapper)."""
    top = str(Path(__file__).parents[1])
    return dict(os.environ, CKPTFS_RSH=host.ssh_cmd(), PYTHONPATH=top,
                CKPTFS_RECEIVE=shlex.join([*receive, sys.executable, "-m", "ckptfs.cli",
                                           "receive"]))


def remote_job(two_hosts, procs, tmp_path, tmp_mount, wset_bin):
    """A target mounted on hostb, the workload running on hosta: (dst, src, out)."""
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
    return dst, src, out


def migrate_on(host, pid: int, dest: str, env: dict, *options: str):
    return host.run([sys.executable, "-m", "ckptfs.migrate", "run", *options, str(pid), dest],
                    env=env, timeout=120)


@pytest.mark.two_hosts
def test_migrate_between_two_hosts_over_ssh(wset_bin, procs, tmp_path, tmp_mount, two_hosts):
    a, b = two_hosts.a, two_hosts.b
    dst, src, out = remote_job(two_hosts, procs, tmp_path, tmp_mount, wset_bin)
    r = migrate_on(a, src.pid, f"{b.name}:{dst}/job", remote_env(a))
    assert r.returncode == 0, r.stderr
    status = open(b.path(f"{dst}/job/status")).read().strip()
    new = restored_pid(status)
    procs.adopt(new)
    assert "pass 2:" in r.stderr and "downtime" in r.stderr, r.stderr
    # the final pass went through the receiver's session, opened before the freeze: the
    # working set's chunks, not a whole pass
    assert "receiver on hostb ready" in r.stderr and "final pass sent" in r.stderr, r.stderr
    final = re.search(r"final pass: ([\d.]+) MB in (\d+) files \((\d+) chunks\)", r.stderr)
    assert final and 0 < float(final[1]) < WSET + 4 and int(final[3]) <= WSET // 2 + 3, r.stderr
    assert P.wait_gone(src.pid, 10)
    assert verify(new, b.path(str(out))).startswith("ok round=")   # every page as it was


@pytest.mark.two_hosts
def test_without_a_receiver_the_final_pass_goes_through_rsync(wset_bin, procs, tmp_path,
                                                              tmp_mount, two_hosts):
    a, b = two_hosts.a, two_hosts.b
    dst, src, out = remote_job(two_hosts, procs, tmp_path, tmp_mount, wset_bin)
    env = dict(remote_env(a), CKPTFS_RECEIVE="ckptfs-no-such-command")
    r = migrate_on(a, src.pid, f"{b.name}:{dst}/job", env)
    assert r.returncode == 0, r.stderr
    assert "no receiver on hostb" in r.stderr and "exit 127" in r.stderr, r.stderr
    assert "(stream)" not in r.stderr and "final pass sent" not in r.stderr, r.stderr
    new = restored_pid(open(b.path(f"{dst}/job/status")).read().strip())
    procs.adopt(new)
    assert P.wait_gone(src.pid, 10)
    assert verify(new, b.path(str(out))).startswith("ok round=")


FAULT = """\
import os, signal, struct, subprocess, sys, time
mode, at, marker, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
child = subprocess.Popen(cmd, stdin=subprocess.PIPE)
stdin, armed, after = sys.stdin.buffer, False, 0

def take(n):
    data = stdin.read(n)
    if len(data) < n:                        # the writer went away: so does the receiver
        child.stdin.write(data)
        child.stdin.close()
        sys.exit(child.wait())
    return data

def put(data):
    child.stdin.write(data)
    child.stdin.flush()

put(take(10))
while (kind := take(1)) != b"E":
    put(kind)
    if kind == b"S":                         # the freeze comes once this is answered
        armed = True
        continue
    name = take(struct.unpack("<H", take(2))[0])
    put(struct.pack("<H", len(name)) + name)
    if kind == b"D":
        put(take(8))
        continue
    head = take(20)
    put(head)
    if armed and mode == "stall":             # stops reading, as a hung host would
        open(marker, "w").write(f"{os.getpid()}\\n")
        time.sleep(60)
        sys.exit(1)
    data = bytearray(take(struct.unpack("<IQ", head[:12])[1] + 8))
    if armed and mode == "kill" and after + len(data) > at:
        put(data[:at - after])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        open(marker, "w").write(f"killed in {name.decode()}\\n")
        sys.exit(137)
    if armed and mode == "flip" and len(data) > at + 8:
        data[at] ^= 0xFF
        open(marker, "w").write(name.decode())
        mode = "flipped"
    after += len(data) if armed else 0
    put(data)
put(kind + take(12))
child.stdin.close()
sys.exit(child.wait())
"""


def fault_wrapper(tmp_path: Path, mode: str, at: int) -> tuple[list[str], Path]:
    """A receive wrapper for hostb: passes the stream on to the real receiver but after the
    freeze (the sync record before it), at byte `at` of the files sent, kills the receiver
    (mode kill) or flips byte `at` of the first file longer than that (mode flip); the
    marker file says which file. Mode stall stops reading at the first file after the
    freeze (the marker holds the wrapper's pid)."""
    script, marker = tmp_path / "fault.py", tmp_path / "fault.marker"
    script.write_text(FAULT)
    return [sys.executable, str(script), mode, str(at), str(marker)], marker


def assert_left_running(src, out: Path) -> None:
    """The source was thawed: not stopped, not traced, no mount left, still working."""
    assert src.alive()
    status = Path(f"/proc/{src.pid}/status").read_text()
    assert "TracerPid:\t0" in status and "State:\tT" not in status
    assert not [l for l in Path("/proc/self/mountinfo").read_text().splitlines()
                if f"ckptfs-migrate-{src.pid}-" in l]
    line1 = verify(src.pid, str(out))
    assert line1.startswith("ok round=")
    time.sleep(0.05)
    assert verify(src.pid, str(out)) != line1              # rounds go on: it runs


@pytest.mark.two_hosts
def test_receiver_killed_mid_stream_leaves_the_source_running(wset_bin, procs, tmp_path,
                                                              tmp_mount, two_hosts):
    a, b = two_hosts.a, two_hosts.b
    dst, src, out = remote_job(two_hosts, procs, tmp_path, tmp_mount, wset_bin)
    wrap, marker = fault_wrapper(tmp_path, "kill", 1 << 20)   # 1 MiB into the final pass
    r = migrate_on(a, src.pid, f"{b.name}:{dst}/job", remote_env(a, wrap))
    assert r.returncode == 1, r.stderr
    assert marker.read_text().startswith("killed in tasks/"), r.stderr   # mid-stream
    assert "(stream)" in r.stderr                             # after the freeze, not before
    assert "receiver on hostb ready" in r.stderr and "thawing process" in r.stderr, r.stderr
    status = open(b.path(f"{dst}/job/status")).read()
    assert status.startswith("failed: aborted"), status       # nothing restored there
    assert_left_running(src, out)


@pytest.mark.two_hosts
def test_corrupted_stream_is_refused_naming_the_file(wset_bin, procs, tmp_path, tmp_mount,
                                                     two_hosts):
    a, b = two_hosts.a, two_hosts.b
    dst, src, out = remote_job(two_hosts, procs, tmp_path, tmp_mount, wset_bin)
    wrap, marker = fault_wrapper(tmp_path, "flip", 5000)      # after the freeze
    r = migrate_on(a, src.pid, f"{b.name}:{dst}/job", remote_env(a, wrap))
    assert r.returncode == 1, r.stderr
    assert f"receive: {marker.read_text()}: checksum mismatch" in r.stderr, r.stderr
    status = open(b.path(f"{dst}/job/status")).read()
    assert status.startswith("failed: aborted"), status
    assert_left_running(src, out)


@pytest.mark.two_hosts
def test_a_stalled_receiver_times_out_and_the_source_thaws(wset_bin, procs, tmp_path,
                                                           tmp_mount, two_hosts):
    a, b = two_hosts.a, two_hosts.b
    dst, src, out = remote_job(two_hosts, procs, tmp_path, tmp_mount, wset_bin)
    wrap, marker = fault_wrapper(tmp_path, "stall", 0)
    t0 = time.monotonic()
    r = migrate_on(a, src.pid, f"{b.name}:{dst}/job", remote_env(a, wrap), "--timeout", "3")
    took = time.monotonic() - t0
    procs.adopt(int(marker.read_text()))                  # the stalled wrapper on hostb
    assert r.returncode == 1, r.stderr
    assert "did not get through within 3 s" in r.stderr, r.stderr
    assert took < 60, took
    status = open(b.path(f"{dst}/job/status")).read()
    assert status.startswith("failed: aborted"), status
    assert_left_running(src, out)


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
