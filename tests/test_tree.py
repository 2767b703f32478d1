"""The tree mapping both ways: live -> tree -> model -> tree is lossless; CRIU images in between
too; a wrong file gives an error naming the file and the value."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from ckptfs import criu, tree
from ckptfs.errors import BadTree
from ckptfs.capture.linux import LiveSource


def diff(a, b) -> str:
    r = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
    return r.stdout


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """A tree of a real process: threads, a pipe with data, a file at an offset, handlers."""
    d = tmp_path_factory.mktemp("tree")
    prog = d / "w.py"
    prog.write_text(
        "import os, signal, sys, threading, time, mmap\n"
        "signal.signal(signal.SIGUSR1, lambda *a: None)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})\n"
        "m = mmap.mmap(-1, 5 << 20); m[:5] = b'hello'; m[3 << 20:(3 << 20) + 5] = b'world'\n"
        "r, w = os.pipe(); os.write(w, b'in the pipe')\n"
        "f = open(sys.argv[1] + '.log', 'a'); f.write('x' * 100); f.flush()\n"
        "threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()\n"
        "open(sys.argv[1], 'w').write('ready\\n')\n"
        "time.sleep(1000)\n")
    ready = d / "ready"
    p = subprocess.Popen([sys.executable, prog, ready], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (ready.exists() and ready.read_text() == "ready\n"):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.02)
        src = LiveSource(p.pid)
        src.freeze()
        try:
            tree.write_tree(src, str(d / "dump"))
        finally:
            src.thaw()
            src.close()
    finally:
        p.kill()
        p.wait()
    return d / "dump", p.pid


def test_tree_round_trip_is_lossless(dumped, tmp_path):
    dump, pid = dumped
    again = tmp_path / "again"
    tree.write_tree(tree.TreeSource(str(dump)), str(again))
    assert diff(dump, again) == ""
    # what the process had is there
    task = dump / "tasks" / str(pid)
    assert len(os.listdir(task / "threads")) == 2
    assert (task / "sigactions" / "SIGUSR1" / "handler").read_text().startswith("0x")
    assert "SIGUSR2" not in os.listdir(task / "sigactions")
    assert int((task / "threads" / str(pid) / "sigmask").read_text(), 16) & (1 << 11)
    pipes = [fd for fd in os.listdir(task / "fds") if (task / "fds" / fd / "type").read_text() == "pipe\n"]
    assert any((task / "fds" / fd / "data").read_bytes() == b"in the pipe" for fd in pipes)


# What a CRIU image directory does not hold: namespace inodes, cgroup limits of a task in our
# own cgroup, the CPU description, the root's real parent (CRIU writes 0) and 4.x-only fields
# left out so that crit 3.17 round-trips our images byte for byte.
CRIU_LOSSY = ("isolation", "manifest", "ppid", "no_new_privs")


def test_criu_export_import_round_trip(dumped, tmp_path):
    dump, pid = dumped
    images = tmp_path / "images"
    criu.export(tree.TreeSource(str(dump)), str(images))
    back = tmp_path / "back"
    tree.write_tree(criu.ImageSource(str(images)), str(back))
    lines = [l for l in diff(dump, back).splitlines()
             if l.startswith(("diff ", "Only in")) and not any(x in l for x in CRIU_LOSSY)]
    assert lines == []
    assert (back / "tasks" / str(pid) / "ppid").read_text() == "0\n"
    # and CRIU -> tree -> CRIU gives the same images, byte for byte
    images2 = tmp_path / "images2"
    criu.export(tree.TreeSource(str(back)), str(images2))
    for name in sorted(os.listdir(images)):
        if name in ("inventory.img", "stats-dump"):
            continue
        assert (images / name).read_bytes() == (images2 / name).read_bytes(), name
    if shutil.which("crit"):
        r = subprocess.run(["crit", "x", str(images), "ps"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def _copy(dump, tmp_path):
    d = tmp_path / "edit"
    shutil.copytree(dump, d)
    for root, dirs, files in os.walk(d):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return d


def _first_map(task, pred=lambda d: True):
    return next(m for m in sorted(os.listdir(task / "maps")) if pred(task / "maps" / m))


@pytest.mark.parametrize("edit,value", [
    ("prot", "rwz\n"),
    ("regs", "hello\n"),
    ("flags", "O_RDWR|O_BOGUS\n"),
    ("map_name", None),
    ("chunk_size", b"x" * 100),
    ("rlimit", "lots\n"),
])
def test_bad_edit_names_file_and_value(dumped, tmp_path, edit, value):
    dump, pid = dumped
    d = _copy(dump, tmp_path)
    task = d / "tasks" / str(pid)
    if edit == "prot":
        target = task / "maps" / _first_map(task) / "prot"
    elif edit == "regs":
        target = task / "threads" / str(pid) / "regs" / "rip"
    elif edit == "flags":
        target = task / "fds" / "0" / "flags"
    elif edit == "rlimit":
        target = task / "rlimits" / "RLIMIT_NOFILE"
    elif edit == "map_name":
        m = _first_map(task)
        target = task / "maps" / "zz-10"
        os.rename(task / "maps" / m, target)
    else:
        m = _first_map(task, lambda p: os.listdir(p / "pages"))
        chunk = sorted(os.listdir(task / "maps" / m / "pages"))[0]
        target = task / "maps" / m / "pages" / chunk
    if value is not None:
        (target.write_bytes if isinstance(value, bytes) else target.write_text)(value)
    with pytest.raises(BadTree) as e:
        src = tree.TreeSource(str(d))
        for pid_ in src.pids():
            for vma in src.mm(pid_).vmas:
                src.page_ranges(pid_, vma)
    msg = str(e.value)
    assert str(target) in msg or target.name in msg, msg
    if edit in ("prot", "regs", "rlimit"):
        assert value.strip() in msg, msg


def test_missing_file_is_incomplete(dumped, tmp_path):
    dump, pid = dumped
    d = _copy(dump, tmp_path)
    os.unlink(d / "tasks" / str(pid) / "threads" / str(pid) / "regs" / "rsp")
    with pytest.raises(BadTree, match="regs/rsp: missing file"):
        tree.TreeSource(str(d))


def test_stray_files_in_pages_are_not_memory(dumped, tmp_path):
    dump, pid = dumped
    d = _copy(dump, tmp_path)
    task = d / "tasks" / str(pid)
    m = _first_map(task, lambda p: os.listdir(p / "pages"))
    pages = task / "maps" / m / "pages"
    chunk = sorted(os.listdir(pages))[0]
    (pages / f".{chunk}.AbC123").write_bytes(b"half a copy")      # rsync's temp file
    src = tree.TreeSource(str(d))
    vma = next(v for v in src.mm(pid).vmas if f"{v.start:x}-{v.end:x}" == m)
    before = src.page_ranges(pid, vma)
    # a chunk file the frozen manifest does not list is not memory either
    spare = [hex(off) for off in range(0, vma.end - vma.start, src.chunk_size)
             if hex(off) not in os.listdir(pages)]
    if spare:
        (pages / spare[0]).write_bytes(bytes(min(src.chunk_size, vma.end - vma.start - int(spare[0], 16))))
    assert tree.TreeSource(str(d)).page_ranges(pid, vma) == before
