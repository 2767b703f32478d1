"""`ckptfs mount` and `ckptfs dump` on real processes: the live tree against /proc."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import procs as P

CLI = [sys.executable, "-m", "ckptfs.cli"]


def ckptfs(*args, check=True, timeout=60):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"ckptfs {' '.join(map(str, args))} failed {r.returncode}:\n{r.stderr}")
    return r


def read(path) -> str:
    with open(path) as f:
        return f.read()


def traced_by(pid: int) -> int:
    return int(next(l for l in read(f"/proc/{pid}/status").splitlines()
                    if l.startswith("TracerPid")).split()[1])


@pytest.fixture
def live_mount(tmp_mount, tmp_path):
    def mount(pid, *extra):
        mnt = tmp_path / f"mnt{pid}"
        mnt.mkdir()
        return os.fspath(tmp_mount([*CLI, "mount", "-f", *extra, str(pid), str(mnt)], mnt))
    return mount


PATTERN_PROG = textwrap.dedent("""
    import ctypes, mmap, os, sys, time
    buf = mmap.mmap(-1, 3 << 20)
    pattern = bytes(range(256)) * 16
    for off in range(0, len(buf), len(pattern)):
        buf[off:off + len(pattern)] = pattern
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    f = open(sys.argv[1] + ".data", "w+b")
    f.write(b"x" * 10000); f.seek(1234)
    r, w = os.pipe(); os.write(w, b"queued bytes")
    with open(sys.argv[1], "w") as ready:
        ready.write(f"{addr:x} {f.fileno()} {r} {w}\\n")
    while True:
        time.sleep(0.05)
""")


@pytest.fixture
def pattern_proc(procs, tmp_path):
    script = tmp_path / "pattern.py"
    script.write_text(PATTERN_PROG)
    ready = tmp_path / "ready"
    proc = procs.spawn([sys.executable, script, ready])
    P.wait_file(ready, None, 10, proc=proc)
    addr, fd, r, w = read(ready).split()
    return proc, int(addr, 16), int(fd), int(r), int(w)


def test_live_tree_matches_proc(live_mount, procs, tmp_path):
    sleeper = procs.spawn(["sleep", "1000"])
    time.sleep(0.2)
    pid = sleeper.pid
    mnt = live_mount(pid)
    task = f"{mnt}/tasks/{pid}"
    assert read(f"{mnt}/status").splitlines()[0] == "running"
    assert "tracking: uffd-wp+pagemap-scan" in read(f"{mnt}/status")
    assert read(f"{task}/comm") == "sleep\n"
    assert sorted(os.listdir(f"{task}/threads")) == [str(pid)]
    # blocked in clock_nanosleep: sp and pc agree with the kernel's view
    sc = read(f"/proc/{pid}/syscall").split()
    regs = f"{task}/threads/{pid}/regs"
    assert int(read(f"{regs}/rsp"), 16) == int(sc[-2], 16)
    assert int(read(f"{regs}/rip"), 16) == int(sc[-1], 16)
    # clock_nanosleep, or restart_syscall once an earlier look interrupted the sleep
    assert int(read(f"{regs}/orig_rax"), 16) in (230, 219) and int(sc[0]) in (230, 219)
    # every map of /proc/PID/maps is a directory with its prot
    want, last = {}, None
    for line in read(f"/proc/{pid}/maps").splitlines():
        rng, perms = line.split()[:2]
        if "[uprobes]" in line:
            continue
        if line.endswith("[vvar_vclock]") and last:  # one area for CRIU, as for us
            del want[last]
            rng = f"{last.split('-')[0]}-{rng.split('-')[1]}"
        want[rng] = perms[:3]
        last = rng if line.endswith("[vvar]") else None
    got = {d: read(f"{task}/maps/{d}/prot").strip() for d in os.listdir(f"{task}/maps")}
    assert got == want
    assert read(f"{task}/ppid").strip() == str(os.getpid()) or read(f"{task}/ppid").strip()
    # reading never leaves the process traced or stopped
    assert traced_by(pid) == 0
    assert P.state(pid) in ("S", "R")


def test_memory_fds_and_pipe(live_mount, pattern_proc):
    proc, addr, fd, r, w = pattern_proc
    pid = proc.pid
    mnt = live_mount(pid)
    task = f"{mnt}/tasks/{pid}"
    vma = next(d for d in os.listdir(f"{task}/maps") if int(d.split("-")[0], 16) <= addr < int(d.split("-")[1], 16))
    start = int(vma.split("-")[0], 16)
    chunks = sorted(os.listdir(f"{task}/maps/{vma}/pages"), key=lambda n: int(n, 16))
    assert chunks, "touched memory must have chunk files"
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for name in chunks:
            off = int(name, 16)
            data = open(f"{task}/maps/{vma}/pages/{name}", "rb").read()
            mem.seek(start + off)
            assert data == mem.read(len(data)), f"chunk {name} differs from /proc/{pid}/mem"
    assert stat.S_IMODE(os.stat(f"{task}/maps/{vma}/pages/{chunks[0]}").st_mode) == 0o600
    # the file at a known offset
    fdinfo = dict(l.split(":", 1) for l in read(f"/proc/{pid}/fdinfo/{fd}").splitlines() if ":" in l)
    assert read(f"{task}/fds/{fd}/pos").strip() == fdinfo["pos"].strip() == "1234"
    assert read(f"{task}/fds/{fd}/type") == "file\n"
    assert read(f"{task}/fds/{fd}/flags").startswith("O_RDWR")
    assert read(f"{task}/fds/{fd}/path").strip().endswith("ready.data")
    # the pipe: same inode on both ends, queued data visible and not consumed
    assert read(f"{task}/fds/{r}/type") == "pipe\n"
    assert read(f"{task}/fds/{r}/pipe_id") == read(f"{task}/fds/{w}/pipe_id")
    echo = f"{mnt}/ctl"
    with open(echo, "w") as c:
        c.write("freeze\n")
    assert read(f"{mnt}/status") == "frozen\n"
    assert open(f"{task}/fds/{r}/data", "rb").read() == b"queued bytes"
    with open(echo, "w") as c:
        c.write("thaw\n")
    assert read(f"{mnt}/status").splitlines()[0] == "running"
    assert traced_by(pid) == 0


def test_threads_and_children(live_mount, procs, tmp_path):
    prog = tmp_path / "t.py"
    prog.write_text("import threading, time, os, sys\n"
                    "for _ in range(2): threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n"
                    "os.system('sleep 1000 & sleep 1000 & wait') if os.fork() == 0 else None\n"
                    "open(sys.argv[1], 'w').write('ready\\n'); time.sleep(1000)\n")
    proc = procs.spawn([sys.executable, prog, tmp_path / "ready"])
    proc.wait_ready(tmp_path / "ready")
    time.sleep(0.3)
    pid = proc.pid
    mnt = live_mount(pid)
    tasks = sorted(int(t) for t in os.listdir(f"{mnt}/tasks"))
    assert tasks == sorted([pid] + P.descendants(pid))
    assert len(tasks) >= 4  # python, forked python, sh, 2 sleeps
    threads = os.listdir(f"{mnt}/tasks/{pid}/threads")
    assert sorted(threads) == sorted(os.listdir(f"/proc/{pid}/task"))
    assert len(threads) == 3
    for t in threads:
        assert read(f"{mnt}/tasks/{pid}/threads/{t}/regs/rip").startswith("0x")


def test_frozen_copy_equals_dump(live_mount, procs, tmp_path):
    # blocked in read(2) on an empty pipe: an interrupted read restarts into the same state,
    # so a dump and a later frozen copy must be identical file for file
    # (pinned to one CPU: the kernel writes the current CPU number into the rseq area)
    reader = procs.spawn(["taskset", "-c", "0", "cat"], stdin=subprocess.PIPE)
    time.sleep(0.2)
    pid = reader.pid
    ckptfs("dump", pid, tmp_path / "dump")
    assert traced_by(pid) == 0 and P.state(pid) == "S"
    mnt = live_mount(pid)
    with open(f"{mnt}/ctl", "w") as c:
        c.write("freeze")
    subprocess.run(["cp", "-r", str(mnt), str(tmp_path / "copy")], check=True)
    with open(f"{mnt}/ctl", "w") as c:
        c.write("thaw")
    diff = subprocess.run(["diff", "-r", str(tmp_path / "copy"), str(tmp_path / "dump")],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:3000]
    # the manifest lists every file of the tree with its checksum
    from ckptfs import manifest
    doc = manifest.load(str(tmp_path / "dump" / "manifest"))
    assert doc["state"] == "frozen"
    assert manifest.check(str(tmp_path / "copy"), doc) == []


def test_exit_while_mounted_gives_esrch(live_mount, procs):
    sleeper = procs.spawn(["sleep", "1000"])
    time.sleep(0.2)
    mnt = live_mount(sleeper.pid)
    assert read(f"{mnt}/tasks/{sleeper.pid}/comm") == "sleep\n"
    sleeper.kill()
    time.sleep(1.5)  # live answers may be up to 1 s old (fs.CachedSource)
    with pytest.raises(OSError) as e:
        read(f"{mnt}/tasks/{sleeper.pid}/threads/{sleeper.pid}/regs/rip")
    assert e.value.errno in (errno.ESRCH, errno.ENOENT)
    # the daemon is still serving
    assert os.path.ismount(mnt)
    os.listdir(str(mnt))


@pytest.mark.parametrize("case", ["nopid", "zombie", "notempty", "traced"])
def test_bad_input_mounts_nothing(case, procs, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = 999999
    if case == "zombie":
        z = subprocess.Popen(["true"])
        z_pid = z.pid
        time.sleep(0.2)  # exited, not reaped: a zombie child of this test
        pid = z_pid
    elif case == "notempty":
        (mnt / "x").write_text("x")
        pid = procs.spawn(["sleep", "100"]).pid
    elif case == "traced":
        target = procs.spawn(["sleep", "100"])
        procs.spawn([sys.executable, "-c", "import sys, time; from ckptfs import ptrace; "
                     "ptrace.seize(int(sys.argv[1])); time.sleep(100)", str(target.pid)])
        deadline = time.monotonic() + 10
        while traced_by(target.pid) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = target.pid
    r = ckptfs("mount", pid, mnt, check=False)
    if os.path.ismount(mnt):  # a wrong success must not leave a mount behind
        subprocess.run(["fusermount3", "-uz", str(mnt)])
    assert r.returncode != 0
    assert r.stderr.strip(), "a refusal says why"
    assert not os.path.ismount(mnt)
    if case == "zombie":
        assert "zombie" in r.stderr
        z.wait()
    if case == "notempty":
        assert "not empty" in r.stderr
    if case == "traced":
        assert "traced" in r.stderr
    if case == "nopid":
        assert "no such process" in r.stderr


def test_images_mount_shows_the_same_tree(tmp_mount, procs, tmp_path):
    reader = procs.spawn(["taskset", "-c", "0", "cat"], stdin=subprocess.PIPE)
    time.sleep(0.2)
    ckptfs("dump", reader.pid, tmp_path / "dump")
    ckptfs("criu", "export", tmp_path / "dump", tmp_path / "images")
    ckptfs("criu", "import", tmp_path / "images", tmp_path / "imported")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = os.fspath(tmp_mount([*CLI, "mount", "-f", "--images", str(tmp_path / "images"), str(mnt)], mnt))
    diff = subprocess.run(["diff", "-r", m, str(tmp_path / "imported")], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout[:2000]
    with pytest.raises(OSError) as e:
        open(f"{m}/tasks/{reader.pid}/comm", "w")
    assert e.value.errno in (errno.EROFS, errno.EACCES)


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_bad_images_mount_nothing(procs, tmp_path, damage):
    reader = procs.spawn(["cat"], stdin=subprocess.PIPE)
    time.sleep(0.2)
    ckptfs("dump", reader.pid, tmp_path / "dump")
    images = tmp_path / "images"
    ckptfs("criu", "export", tmp_path / "dump", images)
    core = next(images.glob("core-*.img"))
    data = core.read_bytes()
    core.write_bytes(b"\xde\xad\xbe\xef" + data[4:] if damage == "magic" else data[:-7])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = ckptfs("mount", "--images", images, mnt, check=False)
    try:
        assert r.returncode != 0 and core.name in r.stderr, r.stderr
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):  # a wrong success must not leave a mount behind
            subprocess.run(["fusermount3", "-uz", str(mnt)])


def test_other_users_cannot_read(live_mount, procs):
    sleeper = procs.spawn(["sleep", "1000"])
    mnt = live_mount(sleeper.pid)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "cat", f"{mnt}/tasks/{sleeper.pid}/comm"], capture_output=True, text=True)
    assert r.returncode != 0 and "denied" in r.stderr.lower(), r.stderr
    mode = stat.S_IMODE(os.stat(f"{mnt}/tasks/{sleeper.pid}/threads/{sleeper.pid}/regs/rip").st_mode)
    assert mode == 0o600


def test_kill_through_ctl_ends_the_tree_and_status_says_gone(live_mount, procs):
    """`echo kill > ctl` on a frozen mount: every task dies (the write succeeds, the daemon
    keeps serving) and status says `gone`, not `running`."""
    parent = procs.spawn(["sh", "-c", "sleep 1000 & wait"])
    time.sleep(0.3)
    child = P.children(parent.pid)[0]
    mnt = live_mount(parent.pid)
    with open(f"{mnt}/ctl", "w") as c:
        c.write("freeze")
    assert read(f"{mnt}/status") == "frozen\n"
    with open(f"{mnt}/ctl", "w") as c:
        c.write("kill")
    assert P.wait_gone(parent.pid, 5) and P.wait_gone(child, 5)
    assert read(f"{mnt}/status") == "gone\n"


POKE_PROG = textwrap.dedent("""
    import mmap, signal, sys, time
    buf = mmap.mmap(-1, 4 << 20)
    buf[:] = b"\\x01" * len(buf)
    def poke(*_):
        buf[4096] = (buf[4096] + 1) % 256
    signal.signal(signal.SIGUSR1, poke)
    open(sys.argv[1], "w").write("ready\\n")
    while True:
        time.sleep(0.05)
""")


def test_running_mount_attr_cache_drops_at_pass_and_freeze(live_mount, procs, tmp_path):
    """A running tracked mount lets the kernel keep attributes (fast `ls -R`), yet a chunk
    written since the last pass shows a new mtime at the very next pass (a readdir of the
    root) and at a freeze, well within the kernel's 1 s attribute timeout."""
    import signal
    script = tmp_path / "poke.py"
    script.write_text(POKE_PROG)
    proc = procs.spawn([sys.executable, script, tmp_path / "ready"])
    P.wait_file(tmp_path / "ready", None, 10, proc=proc)
    mnt = live_mount(proc.pid)
    maps = f"{mnt}/tasks/{proc.pid}/maps"
    vma = next(d for d in os.listdir(maps) if int(d.split("-")[1], 16) - int(d.split("-")[0], 16)
               == 4 << 20 and os.listdir(f"{maps}/{d}/pages"))
    chunk = f"{maps}/{vma}/pages/0x0"

    def stamp_after(action):
        os.listdir(mnt)                       # a pass: the chunk's stamp is settled
        before = os.stat(chunk).st_mtime_ns   # the kernel may now hold this for 1 s
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.1)                       # the handler writes one page
        action()
        after = os.stat(chunk).st_mtime_ns
        assert time.monotonic() - t0 < 1.0, "too slow to tell a cached answer from a fresh one"
        return before, after

    before, after = stamp_after(lambda: os.listdir(mnt))
    assert after > before, "a written chunk kept its mtime across a pass"
    other = f"{maps}/{vma}/pages/0x200000"
    os.listdir(mnt)
    quiet = os.stat(other).st_mtime_ns
    os.listdir(mnt)
    assert os.stat(other).st_mtime_ns == quiet, "an unwritten chunk's mtime moved"

    def freeze():
        with open(f"{mnt}/ctl", "w") as c:
            c.write("freeze")
    before, after = stamp_after(freeze)
    assert after > before, "a chunk written before the freeze kept its mtime"
    with open(f"{mnt}/ctl", "w") as c:
        c.write("thaw")
