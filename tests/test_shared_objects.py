"""One file object behind both a descriptor and a map, on real processes: a deleted file
open and mapped (zdtm deleted_fd_map), a memfd open and mapped or only mapped (zdtm
memfd_map). Both programs go through the whole matrix (test_zdtm.py); here: what the tree
holds (the contents once), what a tree edit changes, and the same through CRIU images.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ckptfs import criu, pb
from ckptfs.tree import FILE_MAPS, TreeSource
from helpers import zdtm

CLI = [sys.executable, "-m", "ckptfs.cli"]
CRIT = "/usr/bin/crit"
FD = 70                 # deleted_fd_map.c: the descriptor of the deleted, mapped file
LEN = 4 * 4096


def ckptfs(*args, check=True):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"ckptfs {' '.join(map(str, args))}: {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def restore(path: Path, procs) -> int:
    out = ckptfs("restore", path).stdout
    pairs = dict(line.split(" -> ") for line in out.splitlines() if " -> " in line)
    root = int(next(iter(pairs.values())))
    procs.adopt(root)
    procs.adopt_tree(root)
    return root


def ghost_dirs(tree: Path) -> list[Path]:
    d = tree / "ghosts"
    return sorted(d.iterdir()) if d.exists() else []


def deleted_fd_map(zdtm_bin, procs, tmp_path):
    """The program started and dumped (--kill): (run, tree, the file's bytes before)."""
    run = zdtm.start(zdtm_bin, "deleted_fd_map", tmp_path / "work", procs.spawn)
    with open(f"/proc/{run.pid}/fd/{FD}", "rb") as f:
        want = f.read()
    tree = tmp_path / "tree"
    ckptfs("dump", "--kill", run.pid, tree)
    return run, tree, want


def test_deleted_file_open_and_mapped_is_saved_once(zdtm_bin, procs, tmp_path):
    """fds/70/ghost names the one ghosts/<id> the map names too; the descriptor keeps its own
    flags and offset and has no contents of its own; read back, the descriptor's and the
    map's file ids stand for one ghost; restored, the program sees one inode."""
    run, tree, want = deleted_fd_map(zdtm_bin, procs, tmp_path)
    assert len(want) == LEN
    (ghost,) = ghost_dirs(tree)
    assert (ghost / "contents").read_bytes() == want
    fd = tree / "tasks" / str(run.pid) / "fds" / str(FD)
    assert (fd / "ghost").read_text() == f"{ghost.name}\n"
    assert (fd / "deleted").read_text() == "1\n"
    assert not (fd / "contents").exists()
    assert (fd / "pos").read_text() == "1000\n"
    assert "O_RDWR" in (fd / "flags").read_text()
    maps = [m for m in (tree / "tasks" / str(run.pid) / "maps").iterdir()
            if (m / "ghost").exists()]
    assert [(m / "ghost").read_text() for m in maps] == [f"{ghost.name}\n"]
    src = TreeSource(str(tree))
    fdi = next(f for f in src.fdinfo(run.pid) if f.fd == FD)
    vma = next(v for v in src.mm(run.pid).vmas if v.status & FILE_MAPS and src.file_deleted(v.shmid))
    assert fdi.id != vma.shmid and src.file(fdi.id).reg.pos == 1000
    assert src.file_ghost(fdi.id) == src.file_ghost(vma.shmid) == vma.shmid
    assert src.file_contents(fdi.id) == want
    root = restore(tree, procs)
    assert zdtm.check(root, run.result) == "PASS"


def test_edited_ghost_shows_through_descriptor_and_map(zdtm_bin, procs, tmp_path):
    """The one contents file feeds both: a byte changed in ghosts/<id>/contents is what both
    the descriptor and the map hold after restore, so the program sees the change in the
    map (its check of the first page fails), not a second, untouched copy."""
    run, tree, want = deleted_fd_map(zdtm_bin, procs, tmp_path)
    (ghost,) = ghost_dirs(tree)
    edited = bytearray(want)
    edited[10] ^= 0xff
    (ghost / "contents").write_bytes(bytes(edited))
    root = restore(tree, procs)
    verdict = zdtm.check(root, run.result)
    assert verdict.startswith("FAIL: map: byte 10 "), verdict


def test_missing_ghost_is_refused_naming_the_descriptor_file(zdtm_bin, procs, tmp_path):
    run, tree, _ = deleted_fd_map(zdtm_bin, procs, tmp_path)
    fd = tree / "tasks" / str(run.pid) / "fds" / str(FD)
    (fd / "ghost").write_text("999\n")
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0 and "ghosts/999/contents" in r.stderr, r.stderr


def test_criu_images_share_one_ghost(zdtm_bin, procs, tmp_path):
    """Tree -> CRIU images: the descriptor's and the map's file ids each have a GHOST remap,
    both to one ghost-file image (crit decodes them); import gives the tree's shape back
    (one ghost, fds/70/ghost) and the images restore to one inode again."""
    run, tree, want = deleted_fd_map(zdtm_bin, procs, tmp_path)
    img = tmp_path / "img"
    ckptfs("criu", "export", tree, img)
    remaps = criu.read_image(img / "remap-fpath.img")[1]
    assert len(remaps) == 2 and {r.remap_type for r in remaps} == {pb.GHOST}
    assert len({r.remap_id for r in remaps}) == 1
    assert len(list(img.glob("ghost-file-*.img"))) == 1
    decoded = subprocess.run([CRIT, "decode", "-i", str(img / "remap-fpath.img")],
                             capture_output=True, timeout=60)
    assert decoded.returncode == 0, decoded.stderr
    back = tmp_path / "back"
    ckptfs("criu", "import", img, back)
    (ghost,) = ghost_dirs(back)
    assert (ghost / "contents").read_bytes() == want
    fd = back / "tasks" / str(run.pid) / "fds" / str(FD)
    assert (fd / "ghost").read_text() == f"{ghost.name}\n" and not (fd / "contents").exists()
    root = restore(img, procs)
    assert zdtm.check(root, run.result) == "PASS"
