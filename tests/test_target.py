"""ckptfs target: the core without a mount, the errno boundary, and real mounts fed by real
cp -a, cp -r, rsync -a, rsync --inplace, rsync --delete and tar -x.

The restore step is injected (`--restore-with test_target:recording_restore`): a real callable
that checks the tree it is given on its own and records the call, so a test can count restores.
"""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ckptfs import manifest
from ckptfs.errors import BadTree
from ckptfs.target import TargetCore

PY = sys.executable
TESTS = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(TESTS)
CHUNK = 2 << 20
ROOT = 10


class Restored:
    def __init__(self, pids):
        self.pids = pids


def recording_restore(tree_dir, **opts):
    """The test seam: verify the tree independently, record the call, pretend new pids."""
    doc = manifest.load(os.path.join(tree_dir, "manifest"))
    problems = manifest.check(tree_dir, doc)
    with open(os.environ["CKPTFS_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"tree": tree_dir, "problems": problems}) + "\n")
    if problems:
        raise BadTree(f"restored an incomplete tree: {problems}")
    return Restored({t: 50000 + t for t in doc["tasks"]})


def failing_restore(tree_dir, **opts):
    raise BadTree("no such register", path="tasks/10/threads/10/regs/rip")


def make_src(d, chunks=3, **extra):
    """A frozen source tree as a plain directory (manifest with real checksums, ctl, status)."""
    files = {f"tasks/{ROOT}/comm": b"sleep\n", f"tasks/{ROOT}/ppid": b"1\n",
             f"tasks/{ROOT}/maps/1000-{0x1000 + chunks * CHUNK:x}/status": b"VMA_AREA_REGULAR\n"}
    for i in range(chunks):
        files[f"tasks/{ROOT}/maps/1000-{0x1000 + chunks * CHUNK:x}/pages/{i * CHUNK:#x}"] = \
            os.urandom(CHUNK)
    files.update(extra)
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data)
    open(os.path.join(d, "ctl"), "wb").close()
    with open(os.path.join(d, "status"), "wb") as f:
        f.write(b"frozen\n")
    listed = manifest.scan_tree(str(d))
    with open(os.path.join(d, "manifest"), "wb") as f:
        f.write(manifest.build({"os": "linux"}, ROOT, [ROOT], CHUNK, "frozen", listed))
    return sorted(r for r in files if "/pages/" in r)


# ---------------------------------------------------------------------------------------------
# a real mount

class Mount:
    def __init__(self, tmp, restore="recording_restore", auto=True, name="mnt", extra=(),
                 command=("ckptfs.targetfs",)):
        self.command = list(command)     # ("ckptfs.cli", "target"): through the lead CLI
        self.mnt, self.store = str(tmp / name), str(tmp / f"{name}-store")
        self.record = str(tmp / f"{name}-record")
        self.restore, self.auto, self.extra = restore, auto, list(extra)
        self.proc = None
        os.makedirs(self.mnt, exist_ok=True)

    def start(self):
        env = dict(os.environ, FUSE_LIBRARY_NAME="fuse3", CKPTFS_TEST_RECORD=self.record,
                   PYTHONPATH=os.pathsep.join([TOP, TESTS]))
        args = [PY, "-m", *self.command, "-f", "--store", self.store, self.mnt]
        if self.restore:
            args[-1:-1] = ["--restore-with", f"test_target:{self.restore}"]
        if not self.auto:
            args.insert(-1, "--no-auto")
        args[-1:-1] = self.extra
        self.proc = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mnt) or _dead_mount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mount did not come up; log:\n{self.log()}")
            time.sleep(0.02)
        return self

    def stop(self):
        self._unmount()
        if self.proc and self.proc.poll() is None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._unmount()     # a daemon that mounted late or was killed leaves its mount behind

    def _unmount(self):
        while os.path.ismount(self.mnt) or _dead_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], check=False,
                           stderr=subprocess.DEVNULL)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log(self):
        try:
            with open(os.path.join(self.store, "log")) as f:
                return f.read()
        except OSError:
            return "(no log)"

    def status(self, job):
        with open(os.path.join(self.mnt, job, "status")) as f:
            return f.read().rstrip("\n")

    def wait_status(self, job, prefix, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(job)
            if st.startswith(prefix):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{job}: status {st!r}, wanted {prefix!r}\n{self.log()}")
            time.sleep(0.05)

    def restores(self, job=None):
        try:
            with open(self.record) as f:
                calls = [json.loads(line) for line in f]
        except FileNotFoundError:
            return []
        return [c for c in calls if job is None or c["tree"].endswith(f"/jobs/{job}")]


def _dead_mount(path):
    try:
        os.listdir(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


@contextlib.contextmanager
def mounted(tmp, **kw):
    m = Mount(tmp, **kw)
    try:
        yield m.start()
    finally:
        m.stop()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    make_src(d)
    return str(d)


@pytest.fixture(scope="module")
def mnt(tmp_path_factory):
    with mounted(tmp_path_factory.mktemp("t")) as m:
        yield m


def run(*cmd, ok=True):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if ok:
        assert p.returncode == 0, f"{cmd}: {p.returncode}\n{p.stderr}"
    return p


def same_tree(src, dst):
    """diff -r, except the job's own status (which is the target's)."""
    p = run("diff", "-r", "--exclude=status", src, dst, ok=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert run("diff", os.path.join(src, "tasks/10/maps"), os.path.join(dst, "tasks/10/maps"),
               "-r").returncode == 0


COPIES = {
    "cp_a": lambda s, d: [run("cp", "-a", s, d)],
    "cp_r": lambda s, d: [run("cp", "-r", s, d)],
    "rsync_a": lambda s, d: [run("rsync", "-a", s + "/", d + "/")],
    "rsync_inplace": lambda s, d: [run("rsync", "-a", "--inplace", s + "/", d + "/")],
    "rsync_delete": lambda s, d: [os.mkdir(d), open(os.path.join(d, "junk"), "w").close(),
                                  run("rsync", "-a", "--delete", s + "/", d + "/")],
    "tar_x": lambda s, d: [os.mkdir(d), subprocess.run(
        f"tar -C {s} -cf - . | tar -C {d} -xf -", shell=True, check=True)],
}


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copy_restores_once(mnt, src, how):
    dst = os.path.join(mnt.mnt, how)
    COPIES[how](src, dst)
    assert mnt.wait_status(how, "restored") == f"restored pid={50000 + ROOT}"
    same_tree(src, dst)
    assert not os.path.exists(os.path.join(dst, "junk"))
    COPIES["rsync_a"](src, dst)       # copying again changes nothing and restores nothing
    time.sleep(0.4)
    assert mnt.status(how) == f"restored pid={50000 + ROOT}"
    calls = mnt.restores(how)
    assert len(calls) == 1 and calls[0]["problems"] == []


def test_copied_control_files_have_no_effect(mnt, tmp_path):
    make_src(tmp_path / "s", chunks=1)
    with open(tmp_path / "s/ctl", "w") as f:
        f.write("")
    dst = os.path.join(mnt.mnt, "ctlcopy")
    os.mkdir(dst)
    with open(os.path.join(dst, "status"), "w") as f:   # overwriting status: accepted, dropped
        f.write("frozen\n")
    mnt.wait_status("ctlcopy", "waiting: manifest missing")
    with pytest.raises(OSError) as e:
        with open(os.path.join(dst, "ctl"), "w") as f:
            f.write("freeze\n")
    assert e.value.errno == errno.EINVAL
    assert os.listdir(dst) == ["ctl", "status"]
    os.unlink(os.path.join(dst, "ctl"))
    run("rsync", "-a", str(tmp_path / "s") + "/", dst + "/")
    mnt.wait_status("ctlcopy", "restored")
    assert sorted(os.listdir(os.path.join(mnt.store, "jobs/ctlcopy"))) == ["manifest", "tasks"]


def test_corrupt_chunk_never_restores_and_is_named(mnt, tmp_path):
    chunks = make_src(tmp_path / "s", chunks=2)
    bad = tmp_path / "s" / chunks[1]
    good = bad.read_bytes()
    with open(bad, "r+b") as f:
        f.write(b"\xff" * 16)
    run("cp", "-a", str(tmp_path / "s"), os.path.join(mnt.mnt, "corrupt"))
    st = mnt.wait_status("corrupt", "waiting: " + chunks[1])
    assert "checksum" in st
    time.sleep(0.3)
    assert mnt.restores("corrupt") == []
    bad.write_bytes(good)
    run("rsync", "-a", "--checksum", str(tmp_path / "s") + "/", os.path.join(mnt.mnt, "corrupt/"))
    mnt.wait_status("corrupt", "restored")
    assert len(mnt.restores("corrupt")) == 1


def test_hostile_trees_are_refused_and_daemon_keeps_serving(mnt, tmp_path):
    jobs = os.path.join(mnt.mnt, "evil")
    make_src(tmp_path / "s", chunks=1)
    doc = json.loads((tmp_path / "s/manifest").read_bytes())
    # 1. a manifest naming a path outside the job
    doc["files"]["../../etc/passwd"] = {"size": 1, "xxh3_64": "0" * 16}
    (tmp_path / "s/manifest").write_text(json.dumps(doc))
    run("cp", "-a", str(tmp_path / "s"), jobs)
    assert "'..'" in mnt.wait_status("evil", "waiting: manifest refused")
    # a refused job is fixed by copying a good tree over it
    run("cp", "-a", str(tmp_path / "s"), os.path.join(mnt.mnt, "evil2"))
    make_src(tmp_path / "s2", chunks=1)
    run("rsync", "-a", "-c", str(tmp_path / "s2") + "/", os.path.join(mnt.mnt, "evil2/"))
    mnt.wait_status("evil2", "restored")
    # 2. a listed file replaced by an absolute symlink out of the job
    make_src(tmp_path / "s3", chunks=1)
    os.unlink(tmp_path / "s3/tasks/10/comm")
    os.symlink("/etc/hostname", tmp_path / "s3/tasks/10/comm")
    run("cp", "-a", str(tmp_path / "s3"), os.path.join(mnt.mnt, "evil3"))
    assert mnt.wait_status("evil3", "waiting: tasks/10/comm: is a symlink (refused)")
    # 3. a 100 GiB sparse chunk
    make_src(tmp_path / "s4", chunks=1)
    run("rsync", "-a", "--exclude=pages", str(tmp_path / "s4") + "/",
        os.path.join(mnt.mnt, "evil4/"))
    chunk = [r for r in manifest.scan_tree(str(tmp_path / "s4")) if "/pages/" in r][0]
    os.makedirs(os.path.dirname(os.path.join(mnt.mnt, "evil4", chunk)))
    with open(os.path.join(mnt.mnt, "evil4", chunk), "wb") as f:
        f.truncate(100 << 30)
    assert f"size {100 << 30}, want {CHUNK}" in mnt.wait_status("evil4", f"waiting: {chunk}")
    assert mnt.restores("evil") == mnt.restores("evil3") == mnt.restores("evil4") == []
    assert os.path.ismount(mnt.mnt) and os.listdir(mnt.mnt)


def test_second_writer_of_a_file_is_refused(mnt, src):
    dst = os.path.join(mnt.mnt, "twice")
    os.mkdir(dst)
    with open(os.path.join(dst, "f"), "wb") as f:
        f.write(b"x")
        with pytest.raises(OSError) as e:
            open(os.path.join(dst, "f"), "r+b")
        assert e.value.errno == errno.EBUSY
    assert "refused a second writer" in mnt.log()
    procs = [subprocess.Popen(["rsync", "-a", src + "/", dst + "/"], stderr=subprocess.DEVNULL)
             for _ in range(2)]
    [p.wait() for p in procs]
    run("rsync", "-a", src + "/", dst + "/")
    mnt.wait_status("twice", "restored")
    assert len(mnt.restores("twice")) == 1


def test_no_auto_waits_for_ctl(tmp_path, src):
    with mounted(tmp_path, auto=False) as m:
        run("cp", "-a", src, os.path.join(m.mnt, "j"))
        m.wait_status("j", "waiting: complete; write restore to ctl")
        assert m.restores() == []
        with open(os.path.join(m.mnt, "j/ctl"), "w") as f:
            f.write("restore\n")
        m.wait_status("j", "restored pid=")
        with pytest.raises(OSError) as e:
            with open(os.path.join(m.mnt, "j/ctl"), "w") as f:
                f.write("restore\n")
        assert e.value.errno == errno.EBUSY
        assert len(m.restores("j")) == 1


def test_failed_restore_is_reported_and_not_retried(tmp_path, src):
    with mounted(tmp_path, restore="failing_restore") as m:
        run("cp", "-a", src, os.path.join(m.mnt, "j"))
        st = m.wait_status("j", "failed:")
        assert st == "failed: tasks/10/threads/10/regs/rip: no such register"
        with open(os.path.join(m.mnt, "j/ctl"), "w") as f:
            f.write("abort\n")
        assert m.status("j").startswith("failed: aborted")
        m.stop()
        m.start()
        time.sleep(0.4)
        assert m.status("j").startswith("failed: aborted")
        with open(os.path.join(m.mnt, "j/ctl"), "w") as f:
            f.write("restore\n")          # an explicit restore tries again
        m.wait_status("j", "failed: tasks/10")


def test_killed_rsync_then_rerun_restores_once(tmp_path):
    make_src(tmp_path / "s", chunks=24)
    with mounted(tmp_path) as m:
        dst = os.path.join(m.mnt, "j") + "/"
        p = subprocess.Popen(["rsync", "-a", "--bwlimit=20m", str(tmp_path / "s") + "/", dst])
        deadline = time.monotonic() + 10
        while len(manifest.scan_tree(os.path.join(m.store, "jobs/j"))
                  if os.path.isdir(os.path.join(m.store, "jobs/j")) else ()) < 6:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        p.kill()
        p.wait()
        time.sleep(0.4)
        assert m.status("j").split(":")[0] in ("waiting", "verifying")
        run("rsync", "-a", str(tmp_path / "s") + "/", dst)
        m.wait_status("j", "restored")
        assert len(m.restores("j")) == 1


def test_daemon_killed_mid_copy_resumes_and_never_restores_twice(tmp_path):
    make_src(tmp_path / "s", chunks=24)
    m = Mount(tmp_path)
    try:
        m.start()
        dst = os.path.join(m.mnt, "j") + "/"
        p = subprocess.Popen(["rsync", "-a", "--bwlimit=20m", str(tmp_path / "s") + "/", dst],
                             stderr=subprocess.DEVNULL)
        time.sleep(0.8)
        m.kill9()
        p.wait()
        assert _dead_mount(m.mnt)
        m.start()                      # detaches the dead mount, finds the job again
        assert m.status("j").split(":")[0] in ("waiting", "verifying")
        run("rsync", "-a", str(tmp_path / "s") + "/", dst)
        m.wait_status("j", "restored")
        m.stop()
        m.start()                      # restored state survives a restart
        time.sleep(0.4)
        assert m.status("j") == f"restored pid={50000 + ROOT}"
        assert len(m.restores("j")) == 1
    finally:
        m.stop()


def test_rm_rf_removes_a_job(mnt, src):
    run("cp", "-a", src, os.path.join(mnt.mnt, "gone"))
    mnt.wait_status("gone", "restored")
    run("rm", "-rf", os.path.join(mnt.mnt, "gone"))
    assert "gone" not in os.listdir(mnt.mnt)
    assert not os.path.exists(os.path.join(mnt.store, "state/gone.json"))


def test_top_level_accepts_only_directories(mnt):
    for fn in (lambda: open(os.path.join(mnt.mnt, "file"), "w"),
               lambda: os.symlink("/etc", os.path.join(mnt.mnt, "link"))):
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == errno.EPERM
    os.mkdir(os.path.join(mnt.mnt, "a"))
    os.mkdir(os.path.join(mnt.mnt, "b"))
    open(os.path.join(mnt.mnt, "a/f"), "w").close()
    with pytest.raises(OSError) as e:
        os.rename(os.path.join(mnt.mnt, "a/f"), os.path.join(mnt.mnt, "b/f"))
    assert e.value.errno == errno.EXDEV
    os.mkfifo(os.path.join(mnt.mnt, "a/fifo"))
    with pytest.raises(OSError) as e:
        os.mknod(os.path.join(mnt.mnt, "a/null"), 0o600 | 0o020000, os.makedev(1, 3))
    assert e.value.errno == errno.EPERM
    os.link(os.path.join(mnt.mnt, "a/f"), os.path.join(mnt.mnt, "a/hard"))
    assert os.stat(os.path.join(mnt.mnt, "a/hard")).st_nlink == 2
    os.symlink("../f", os.path.join(mnt.mnt, "a/l"))
    assert os.readlink(os.path.join(mnt.mnt, "a/l")) == "../f"
    st = os.statvfs(mnt.mnt)
    assert st.f_bsize > 0 and st.f_blocks > 0
    with pytest.raises(OSError) as e:
        os.getxattr(os.path.join(mnt.mnt, "a/f"), "user.x")
    assert e.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)


# ---------------------------------------------------------------------------------------------
# the core without a mount

class Calls:
    def __init__(self):
        self.trees = []

    def __call__(self, tree_dir, **opts):
        self.trees.append(tree_dir)
        return Restored({ROOT: 777})


def wait_core(core, job, prefix, timeout=5):
    deadline = time.monotonic() + timeout
    while not core.completion.status(job).startswith(prefix):
        assert time.monotonic() < deadline, core.completion.status(job)
        time.sleep(0.02)
    return core.completion.status(job)


@pytest.fixture
def core(tmp_path):
    c = TargetCore(str(tmp_path / "store"), restore=Calls(), debounce=0.05)
    c.start()
    yield c
    c.stop()


def write_tree(core, job, src):
    """Copy src into the job through the core's operations, as a copy tool would."""
    core.mkdir(f"/{job}", 0o755)
    for top, dirs, names in os.walk(src):
        rel = os.path.relpath(top, src)
        base = f"/{job}" if rel == "." else f"/{job}/{rel}"
        for d in dirs:
            core.mkdir(f"{base}/{d}", 0o755)
        for n in names:
            fh = core.create(f"{base}/{n}", 0o644, os.O_WRONLY | os.O_EXCL)
            with open(os.path.join(top, n), "rb") as f:
                core.write(fh, f.read(), 0)
            core.flush(fh)
            core.release(fh)


def test_core_restores_a_written_tree_once(core, src):
    write_tree(core, "j", src)
    assert wait_core(core, "j", "restored") == "restored pid=777"
    assert core.completion._restore.trees == [os.path.join(core.jobs_dir, "j")]
    core.completion.poke("j")
    time.sleep(0.2)
    assert len(core.completion._restore.trees) == 1


def test_core_restart_keeps_restored_state(tmp_path, src):
    store = str(tmp_path / "store")
    one = TargetCore(store, restore=Calls(), debounce=0.05)
    one.start()
    write_tree(one, "j", src)
    wait_core(one, "j", "restored")
    one.stop()
    two = TargetCore(store, restore=Calls(), debounce=0.05)
    two.start()
    time.sleep(0.2)
    assert two.completion.status("j") == "restored pid=777"
    assert two.completion._restore.trees == []
    two.stop()


def test_core_interrupted_restore_is_not_retried(tmp_path, src):
    store = str(tmp_path / "store")
    os.makedirs(os.path.join(store, "state"))
    with open(os.path.join(store, "state/j.json"), "w") as f:
        json.dump({"attempted": True, "status": "restoring"}, f)
    c = TargetCore(store, restore=Calls(), debounce=0.05)
    write_tree(c, "j", src)
    c.start()
    time.sleep(0.2)
    assert c.completion.status("j") == "failed: daemon stopped while restoring; not retried"
    c.stop()


def test_core_restore_not_available(tmp_path, src, monkeypatch):
    import ckptfs.target as target

    def missing():
        raise ImportError("No module named 'ckptfs.restore'")
    monkeypatch.setattr(target, "_default_restore", missing)
    c = TargetCore(str(tmp_path / "store"), debounce=0.05)
    c.start()
    write_tree(c, "j", src)
    assert wait_core(c, "j", "failed") == \
        "failed: restore not available: No module named 'ckptfs.restore'"
    c.stop()


def test_core_control_files(core):
    core.mkdir("/j", 0o755)
    with pytest.raises(OSError) as e:       # the process that made the job does not see them
        core.getattr("/j/status")
    assert e.value.errno == errno.ENOENT
    core.caller = lambda: 4242              # anyone else does
    assert core.getattr("/j/status")["st_size"] == len(core.completion.status("j")) + 1
    fh = core.open("/j/ctl", os.O_WRONLY)
    with pytest.raises(OSError) as e:
        core.write(fh, b"thaw\n", 0)
    assert e.value.errno == errno.EINVAL
    assert core.write(fh, b"rest", 0) == 4 and not core.completion._jobs["j"].wanted
    core.write(fh, b"ore", 4)
    core.flush(fh)                          # the last line acts at close
    assert core.completion._jobs["j"].wanted
    core.release(fh)
    fh = core.create("/j/.status.aB3dE9", 0o600, os.O_WRONLY | os.O_EXCL)
    core.write(fh, b"frozen\n", 0)
    core.release(fh)
    core.rename("/j/.status.aB3dE9", "/j/status")
    assert os.listdir(os.path.join(core.jobs_dir, "j")) == []
    assert core.readdir("/j") == [".", "..", "ctl", "status"]
    with pytest.raises(OSError) as e:
        core.rename("/j/status", "/j/x")
    assert e.value.errno == errno.EPERM


def test_core_refuses_changes_while_restoring(core):
    core.mkdir("/j", 0o755)
    core.completion._jobs["j"].status = "restoring"
    with pytest.raises(OSError) as e:
        core.create("/j/f", 0o644, os.O_WRONLY)
    assert e.value.errno == errno.EBUSY


def test_boundary_maps_exceptions_to_errnos(tmp_path):
    import mfusepy
    from ckptfs import targetfs

    class FakeCore:
        def getattr(self, path, fh):
            raise {"/bad": BadTree("x", path="manifest"), "/gone": FileNotFoundError(2, "x"),
                   "/bug": RuntimeError("bug")}[path]

    ops = targetfs._operations_class()(FakeCore())
    for path, want in (("/bad", errno.EINVAL), ("/gone", errno.ENOENT), ("/bug", errno.EIO)):
        with pytest.raises(mfusepy.FuseOSError) as e:
            ops.getattr(path)
        assert e.value.errno == want


def test_core_second_writer_neither_opens_nor_truncates(core):
    core.mkdir("/j", 0o755)
    fh = core.create("/j/f", 0o644, os.O_WRONLY)
    core.write(fh, b"data", 0)
    with pytest.raises(OSError) as e:
        core.open("/j/f", os.O_WRONLY | os.O_TRUNC)
    assert e.value.errno == errno.EBUSY
    assert os.path.getsize(core.real("/j/f")) == 4
    core.release(fh)
    fh = core.open("/j/f", os.O_WRONLY | os.O_TRUNC)
    assert os.path.getsize(core.real("/j/f")) == 0
    core.release(fh)
    assert core.completion._jobs["j"].writers == 0


def test_real_dump_copied_with_rsync_runs_again(tmp_path, procs):
    """End to end: a dumped shell loop, rsync'ed into a target with the real restore."""
    from ckptfs import tree
    from ckptfs.capture.linux import LiveSource
    out = tmp_path / "count"
    p = procs.spawn(["sh", "-c", f'while :; do echo x >> {out}; sleep 0.05; done'])
    time.sleep(0.3)
    with LiveSource(p.pid) as live:
        live.freeze()
        tree.write_tree(live, str(tmp_path / "tree"))
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with mounted(tmp_path, restore=None) as m:
        run("rsync", "-a", str(tmp_path / "tree") + "/", os.path.join(m.mnt, "job") + "/")
        st = m.wait_status("job", "restored pid=", timeout=20)
        new = int(st.split("=")[1])
        procs.adopt(new)
        before = out.stat().st_size
        time.sleep(0.5)
        assert out.stat().st_size > before, "the restored loop does not run"
    with mounted(tmp_path, restore=None, name="dry", extra=["--dry-run"]) as m:
        run("cp", "-a", str(tmp_path / "tree"), os.path.join(m.mnt, "job"))
        assert m.wait_status("job", "dry run:", timeout=20) == "dry run: would restore"
        with open(os.path.join(m.store, "state/job.plan")) as f:
            assert f.read() == "no problems: the tree would restore\n"


def test_freebsd_dry_run_shows_an_editable_plan_in_the_job(tmp_path, procs):
    """`ckptfs target --os freebsd --dry-run`: a complete job gets JOB/plan/ (jail.conf, rctl.rules, struct
    reg per task, fd flags, FreeBSD signal numbers, lossy); edits made through the mount are
    checked when `restore` is written to ctl: nonsense fails naming the file and the value,
    a fixed plan is checked and kept as edited."""
    from ckptfs import tree
    from ckptfs.capture.linux import LiveSource
    from ckptfs.translate.freebsd import regs as G
    p = procs.spawn(["sleep", "1000"])
    time.sleep(0.2)
    with LiveSource(p.pid) as live:
        live.freeze()
        tree.write_tree(live, str(tmp_path / "tree"))
    pid = p.pid
    with mounted(tmp_path, restore=None, name="fbsd", extra=["--os", "freebsd", "--dry-run"],
                 command=("ckptfs.cli", "target")) as m:
        job = os.path.join(m.mnt, "job")
        run("cp", "-a", str(tmp_path / "tree"), job)
        st = m.wait_status("job", "dry run:", timeout=20)
        assert st.startswith("dry run: FreeBSD plan written to job/plan"), st
        plan = os.path.join(job, "plan")
        with open(os.path.join(plan, "jail.conf")) as f:
            assert f"ckptfs_{pid} {{" in f.read()
        with open(os.path.join(plan, f"tasks/{pid}/regs")) as f:
            names = [ln.split()[0] for ln in f if ln.strip() and not ln.startswith("#")]
        assert names == [*G.REG_NAMES, "fsbase", "gsbase"]
        with open(os.path.join(plan, f"tasks/{pid}/fds/0/flags")) as f:
            assert f.read().startswith("0x")
        with open(os.path.join(plan, "lossy")) as f:
            lossy = f.read()
        with open(os.path.join(m.store, "state/job.plan")) as f:
            assert lossy in f.read()
        rules = os.path.join(plan, "rctl.rules")
        with open(rules, "a") as f:                      # through the mount
            f.write(f"jail:ckptfs_{pid}:memoryuse:deny=5%\n")
        with open(os.path.join(job, "ctl"), "w") as f:
            f.write("restore\n")
        st = m.wait_status("job", "failed:", timeout=20)
        assert "job/plan/rctl.rules" in st and "5%" in st, st
        with open(rules) as f:
            text = f.read().replace("deny=5%", "deny=64m")
        with open(rules, "w") as f:
            f.write(text)
        with open(os.path.join(job, "ctl"), "w") as f:
            f.write("restore\n")
        st = m.wait_status("job", "dry run: FreeBSD plan in job/plan checked", timeout=20)
        with open(rules) as f:
            assert f"jail:ckptfs_{pid}:memoryuse:deny=64m\n" in f.read()
        assert not any(n.startswith(".plan") for n in os.listdir(job))


def test_freebsd_target_without_dry_run_is_refused_here(tmp_path):
    """There is no FreeBSD kernel here: the target says so instead of pretending."""
    os.makedirs(tmp_path / "m")
    r = run(PY, "-m", "ckptfs.cli", "target", "-f", "--os", "freebsd", "--store",
            str(tmp_path / "s"), str(tmp_path / "m"), ok=False)
    assert r.returncode == 1 and "--dry-run" in r.stderr and "FreeBSD host" in r.stderr
    assert not os.path.ismount(tmp_path / "m")


# ---------------------------------------------------------------------------------------------
# verified sums, the undebounced check, JOB/held

def copy_file(core, job, src, rel, temp=False):
    """One file as rsync writes it: into a hidden temp name, then renamed (or in place)."""
    d = os.path.dirname(rel)
    for i in range(1, len(d.split("/")) + 1 if d else 0):
        with contextlib.suppress(FileExistsError):
            core.mkdir(f"/{job}/" + "/".join(d.split("/")[:i]), 0o755)
    name = f"{d}/.{os.path.basename(rel)}.Xy12Z9" if temp and d else \
        f".{rel}.Xy12Z9" if temp else rel
    fh = core.create(f"/{job}/{name}", 0o644, os.O_WRONLY | os.O_EXCL)
    with open(os.path.join(src, rel), "rb") as f:
        core.write(fh, f.read(), 0)
    core.release(fh)
    if temp:
        core.rename(f"/{job}/{name}", f"/{job}/{rel}")


def listed(src):
    return sorted(manifest.load(os.path.join(src, "manifest"))["files"])


def test_core_complete_copy_restores_without_quiet_period(tmp_path, src):
    c = TargetCore(str(tmp_path / "store"), restore=Calls(), debounce=30)
    c.start()
    try:
        c.mkdir("/j", 0o755)
        copy_file(c, "j", src, "manifest", temp=True)     # rsync's order: manifest first
        *rest, last = listed(src)
        for rel in rest:
            copy_file(c, "j", src, rel, temp=True)
        time.sleep(0.2)
        assert c.completion.status("j").startswith("waiting")
        t0 = time.monotonic()
        copy_file(c, "j", src, last, temp=True)
        assert wait_core(c, "j", "restored", timeout=5) == "restored pid=777"
        assert time.monotonic() - t0 < 2               # not the 30 s quiet period
    finally:
        c.stop()


def test_core_extra_files_wait_for_the_quiet_period(tmp_path, src):
    """An early check that sees files the manifest does not list waits: a copy with
    --delete may still be about to remove them (a stale chunk must not be restored)."""
    c = TargetCore(str(tmp_path / "store"), restore=Calls(), debounce=1.0)
    c.start()
    try:
        c.mkdir("/j", 0o755)
        copy_file(c, "j", src, "manifest")
        copy_file(c, "j", src, listed(src)[0])
        stale = "tasks/10/maps/9000-209000/pages/0x0"
        os.makedirs(os.path.dirname(os.path.join(tmp_path, "x", stale)))
        with open(os.path.join(tmp_path, "x", stale), "wb") as f:
            f.write(b"stale")
        copy_file(c, "j", str(tmp_path / "x"), stale)
        t0 = time.monotonic()
        for rel in listed(src)[1:]:
            copy_file(c, "j", src, rel)
        wait_core(c, "j", "restored", timeout=5)
        assert time.monotonic() - t0 >= 0.9
    finally:
        c.stop()


def test_core_restore_on_ctl_checks_at_once(tmp_path, src):
    # no automatic restore (the last listed file landing would start one at once): only the
    # ctl word may restore, and it must not wait for the 30 s quiet period
    c = TargetCore(str(tmp_path / "store"), auto=False, restore=Calls(), debounce=30)
    c.start()
    try:
        c.mkdir("/j", 0o755)
        for rel in listed(src) + ["manifest"]:
            copy_file(c, "j", src, rel)
        c.caller = lambda: 4242
        fh = c.open("/j/ctl", os.O_WRONLY)
        c.write(fh, b"restore\n", 0)
        c.release(fh)
        assert wait_core(c, "j", "restored", timeout=3) == "restored pid=777"
    finally:
        c.stop()


def test_core_sums_follow_rewrites_and_held_lists_them(core, src):
    core.completion.auto = False
    write_tree(core, "j", src)
    rel = listed(src)[0]
    path = os.path.join(core.jobs_dir, "j", rel)
    want = manifest.checksum_file(path)
    assert core.sums.known(path, os.lstat(path)) == want        # taken at release
    fh = core.open(f"/j/{rel}", os.O_RDWR)                       # rewritten in place
    assert core.sums.known(path, os.lstat(path)) is None
    core.write(fh, b"\xff", 0)
    core.release(fh)
    assert core.sums.known(path, os.lstat(path)) == manifest.checksum_file(path) != want
    core.truncate(f"/j/{rel}", 1)
    assert core.sums.known(path, os.lstat(path)) is None
    fh = core.open("/j/held", os.O_RDONLY)
    held = core.read(fh, 1 << 20, 0).decode().splitlines()
    core.release(fh)
    assert "/j/held" not in [f"/j/{n}" for n in core.readdir("/j")]   # found by name only
    rows = {line.split(" ", 2)[2]: line.split(" ", 2)[:2] for line in held}
    assert set(rows) == set(listed(src))           # never manifest, ctl, status
    assert rows[rel] == [manifest.checksum_file(path), "1"]
    with pytest.raises(OSError) as e:
        core.open("/j/held", os.O_WRONLY)
    assert e.value.errno == errno.EACCES


def test_core_attribute_changes_pass_while_restoring(core):
    core.mkdir("/j", 0o755)
    core.mkdir("/j/d", 0o755)
    core.completion._jobs["j"].status = "restoring"
    core.utimens("/j/d", (1, 2))          # rsync sets directory times after the last file
    core.chmod("/j/d", 0o700)
    with pytest.raises(OSError) as e:
        core.unlink("/j/d")
    assert e.value.errno in (errno.EBUSY, errno.EISDIR, errno.EPERM)
