"""epoll, signalfd and timerfd descriptors: tree files, CRIU images (crit decodes them, ckptfs
reads them back and restores from them), and refusals that name the file.

The ZDTM programs tests/zdtm/{epoll,signalfd,timerfd}.c run through every path in
test_zdtm.py; here they are dumped and looked at, sent through CRIU images, and edited.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import zdtm
from helpers.cli import dump

CLI = [sys.executable, "-m", "ckptfs.cli"]


def ckptfs(*args, check=True):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"ckptfs {args}: {r.stdout}\n{r.stderr}"
    return r


def reseal(d: Path) -> None:
    """Rewrite the manifest to match an edited tree (so the edit reaches restore)."""
    from ckptfs import manifest
    doc = manifest.load(str(d / "manifest"))
    (d / "manifest").write_bytes(manifest.build(doc["source"], doc["root"], doc["tasks"],
                                                doc["chunk_size"], "frozen",
                                                manifest.scan_tree(str(d))))


def restored_pid(out: str, old: int) -> int:
    pairs = dict(line.split(" -> ") for line in out.splitlines() if " -> " in line)
    return int(pairs[str(old)])


def text(p: Path) -> str:
    return p.read_text().strip()


def test_tree_files_of_each_kind(zdtm_bin, procs, tmp_path):
    runs = {n: zdtm.start(zdtm_bin, n, tmp_path / n, procs.spawn)
            for n in ("epoll", "signalfd", "timerfd")}
    fds = {n: tmp_path / f"{n}-tree" / "tasks" / str(r.pid) / "fds" for n, r in runs.items()}
    for n, r in runs.items():
        dump(r.pid, tmp_path / f"{n}-tree")

    ep = fds["epoll"] / "20"
    assert text(ep / "type") == "eventpoll"
    assert sorted(p.name for p in (ep / "targets").iterdir()) == ["21", "23", "24"]
    assert text(ep / "targets/21/data") == "0x1111222233334444"
    assert text(ep / "targets/21/events") == "EPOLLIN|EPOLLERR|EPOLLHUP"
    assert text(ep / "targets/23/events") == "EPOLLIN|EPOLLERR|EPOLLHUP|EPOLLET"
    assert text(ep / "targets/24/data") == "0x55"

    sg = fds["signalfd"] / "30"
    assert text(sg / "type") == "signalfd"
    assert text(sg / "sigmask") == f"0x{(1 << 9) | (1 << 0):016x}"   # SIGUSR1 (10), SIGHUP (1)
    assert "O_NONBLOCK" in text(sg / "flags")

    tm = fds["timerfd"]
    assert [text(tm / n / "type") for n in ("40", "41", "42", "43")] == ["timerfd"] * 4
    assert text(tm / "40/clock") == "CLOCK_MONOTONIC"
    assert text(tm / "40/interval") == "0.050000000"
    assert text(tm / "41/ticks") == "1"
    assert text(tm / "42/clock") == "CLOCK_REALTIME"
    assert text(tm / "42/settime_flags") == "TFD_TIMER_ABSTIME"
    assert 990 < float(text(tm / "42/value")) <= 1000
    assert text(tm / "43/value") == text(tm / "43/interval") == "0.000000000"


def _crit(image: Path) -> list[dict]:
    r = subprocess.run(["/usr/bin/crit", "decode", "-i", str(image)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["entries"]


def _crit_entries(images: Path, kind: str) -> list[dict]:
    return [e for e in _crit(images / "files.img") if e["type"] == kind]


def _memfd_images_ok(images: Path, es: list[dict]) -> bool:
    """Two descriptions of one memfd and a second memfd; memfd.img names both; the first's
    shmem pages hold its 10000 bytes."""
    inodes = {i["inode_id"]: i for i in _crit(images / "memfd.img")}
    assert sorted(i["name"] for i in inodes.values()) == ["plain", "zdtm-memfd"], inodes
    big = next(i for i in inodes.values() if i["name"] == "zdtm-memfd")
    pagemap = _crit(images / f"pagemap-shmem-{big['shmid']}.img")
    return len(es) == 3 and {e["memfd"]["inode_id"] for e in es} == set(inodes) and \
        big["size"] == 10000 and big["seals"] == 6 and pagemap[1]["nr_pages"] == 3


CRIT_CHECKS = {
    "epoll": ("EVENTPOLL", lambda es: sorted((t["tfd"], t["data"]) for t in es[0]["epfd"]["tfd"])
              == [(21, 0x1111222233334444), (23, 0xABCDEF), (24, 0x55)]),
    "signalfd": ("SIGNALFD", lambda es: es[0]["sgfd"]["sigmask"] == (1 << 9) | 1),
    "timerfd": ("TIMERFD", lambda es: sorted(e["tfd"]["insec"] for e in es)
                == [0, 0, 0, 50000000]),
    "memfd": ("MEMFD", None),
}


@pytest.mark.parametrize("name", sorted(CRIT_CHECKS))
def test_through_criu_images(name, zdtm_bin, procs, tmp_path):
    """dump -> CRIU images (crit decodes them) -> import -> the same fds/ -> restore: PASS."""
    def move(pid: int, tmp: Path) -> int:
        ckptfs("dump", "--kill", pid, tmp / "tree")
        ckptfs("criu", "export", tmp / "tree", tmp / "images")
        kind, ok = CRIT_CHECKS[name]
        entries = _crit_entries(tmp / "images", kind)
        assert entries and (ok(entries) if ok else _memfd_images_ok(tmp / "images", entries)), \
            entries
        ckptfs("criu", "import", tmp / "images", tmp / "back")
        a, b = (tmp / d / "tasks" / str(pid) / "fds" for d in ("tree", "back"))
        diff = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True)
        assert diff.returncode == 0, diff.stdout
        return restored_pid(ckptfs("restore", tmp / "back").stdout, pid)
    assert zdtm.run_case(zdtm_bin, name, tmp_path, procs, move=move) == "PASS"


def _edited_move(edit):
    def move(pid: int, tmp: Path) -> int:
        ckptfs("dump", "--kill", pid, tmp / "tree")
        edit(tmp / "tree" / "tasks" / str(pid) / "fds")
        reseal(tmp / "tree")
        return restored_pid(ckptfs("restore", tmp / "tree").stdout, pid)
    return move


def test_epoll_cookie_comes_from_the_tree(zdtm_bin, procs, tmp_path):
    """The restored watch carries the tree's data: a changed cookie fails the program."""
    move = _edited_move(lambda fds: (fds / "20/targets/24/data").write_text("0x56\n"))
    verdict = zdtm.run_case(zdtm_bin, "epoll", tmp_path, procs, move=move)
    assert verdict.startswith("FAIL") and "0x56" in verdict, verdict


def test_signalfd_mask_comes_from_the_tree(zdtm_bin, procs, tmp_path):
    """Without SIGHUP in the tree's mask, the SIGHUP sent after the move is not read."""
    move = _edited_move(lambda fds: (fds / "30/sigmask").write_text(f"0x{1 << 9:016x}\n"))
    verdict = zdtm.run_case(zdtm_bin, "signalfd", tmp_path, procs, move=move)
    assert verdict.startswith("FAIL") and "mask lost" in verdict, verdict


def test_epoll_target_without_descriptor_is_refused(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "epoll", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    dump(run.pid, tree)
    targets = tree / "tasks" / str(run.pid) / "fds" / "20" / "targets"
    (targets / "21").rename(targets / "77")
    reseal(tree)
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0
    assert f"tasks/{run.pid}/fds/20/targets/77" in r.stderr and "77" in r.stderr, r.stderr


def test_bad_timerfd_clock_names_the_file(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "timerfd", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    dump(run.pid, tree)
    clock = tree / "tasks" / str(run.pid) / "fds" / "40" / "clock"
    clock.write_text("CLOCK_SOMETIMES\n")
    reseal(tree)
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0
    assert "fds/40/clock" in r.stderr and "CLOCK_SOMETIMES" in r.stderr, r.stderr


def test_tty_tree_files_and_a_changed_terminal_is_refused(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "tty", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    dump(run.pid, tree)
    fd = tree / "tasks" / str(run.pid) / "fds" / "60"
    path = text(fd / "path")
    assert text(fd / "type") == "tty" and path.startswith("/dev/pts/")
    assert text(fd / "rdev") == f"136:{path.rsplit('/', 1)[1]}"
    (fd / "rdev").write_text("136:99999\n")
    reseal(tree)
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0
    assert "fds/60/path" in r.stderr and path in r.stderr and "136:99999" in r.stderr, r.stderr


def test_pty_master_is_refused(procs, tmp_path):
    with open("/dev/ptmx", "rb+", buffering=0) as master:
        holder = procs.spawn(["sleep", "100"], stdin=master)
    tree = tmp_path / "tree"
    dump(holder.pid, tree)
    assert text(tree / "tasks" / str(holder.pid) / "fds" / "0" / "rdev") == "5:2"
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0
    assert "fds/0" in r.stderr and "master" in r.stderr, r.stderr
