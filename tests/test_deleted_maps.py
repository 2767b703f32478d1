"""Mapped deleted files and a deleted executable (CRIU's ghost files), on real processes.

The ZDTM programs deleted_map and deleted_exe go through the whole matrix (test_zdtm.py);
here: what the tree holds (ghosts/<id>/ once per file, maps/<range>/ghost, exe_ghost), the
restore when the file's name is taken again, a tree whose saved contents are missing, and
the same files through CRIU images.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ckptfs import criu, pb
from ckptfs.errors import BadTree
from ckptfs.tree import FILE_MAPS, TreeSource
from helpers import procs as procs_mod
from helpers import zdtm
from helpers.cli import ckptfs, restore

CRIT = "/usr/bin/crit"
PAGES = 16          # deleted_map.c: the file is 16 pages, mapped three times


def ghost_dirs(tree: Path) -> list[Path]:
    d = tree / "ghosts"
    return sorted(d.iterdir()) if d.exists() else []


def file_maps(tree: Path, pid: int, name: str) -> list[Path]:
    return [m for m in sorted((tree / "tasks" / str(pid) / "maps").iterdir())
            if (m / "path").read_text().strip().endswith(name)]


def test_tree_saves_a_deleted_mapped_file_once(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "deleted_map", tmp_path / "work", procs.spawn)
    (child,) = procs_mod.children(run.pid)
    shared = next(lo for lo, hi, perms, path in zdtm.mappings(run.pid)
                  if "mapped.dat" in path and perms[3] == "s" and hi - lo == PAGES * 4096)
    with open(f"/proc/{run.pid}/map_files/{shared:x}-{shared + PAGES * 4096:x}", "rb") as f:
        want = f.read()
    tree = tmp_path / "tree"
    ckptfs("dump", run.pid, tree)
    (ghost,) = ghost_dirs(tree)            # one file: three maps in each of two tasks
    assert (ghost / "contents").read_bytes() == want
    assert (ghost / "mode").read_text() == "0100640\n"
    for pid in (run.pid, child):
        maps = file_maps(tree, pid, "/work/mapped.dat")
        assert len(maps) == 3
        assert {(m / "ghost").read_text() for m in maps} == {f"{ghost.name}\n"}
        assert not any((m / "contents").exists() for m in maps)
        assert not (tree / "tasks" / str(pid) / "exe_ghost").exists()
    # read back: every map names one deleted file whose contents are the saved ones
    src = TreeSource(str(tree))
    ids = {v.shmid for pid in (run.pid, child) for v in src.mm(pid).vmas
           if v.status & FILE_MAPS and src.file(v.shmid).reg.name.endswith("mapped.dat")}
    (fid,) = ids
    assert src.file_deleted(fid) and src.file_contents(fid) == want
    assert src.file(fid).reg.mode == 0o100640
    assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"


def test_name_taken_again_gets_a_hidden_name(zdtm_bin, procs, tmp_path):
    """A new file now has the deleted file's name: the restored maps get a file of their own
    under a hidden name in the same directory, the new file is left alone, nothing stays."""
    run = zdtm.start(zdtm_bin, "deleted_map", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    ckptfs("dump", "--kill", run.pid, tree)
    taken = run.workdir / "mapped.dat"
    taken.write_bytes(b"someone else's file\n")
    before = sorted(os.listdir(run.workdir))
    root = restore(tree, procs)
    paths = {path for _, _, _, path in zdtm.mappings(root) if "mapped.dat" in path}
    (path,) = paths
    assert path.startswith(f"{run.workdir}/.mapped.dat.") and path.endswith(" (deleted)")
    assert taken.read_bytes() == b"someone else's file\n"
    assert sorted(os.listdir(run.workdir)) == before
    taken.unlink()         # the program checks its file's name is free, as it left it
    assert zdtm.check(root, run.result) == "PASS"


def test_deleted_exe_tree(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "deleted_exe", tmp_path / "work", procs.spawn)
    assert os.readlink(f"/proc/{run.pid}/exe").endswith("/exe-copy (deleted)")
    tree = tmp_path / "tree"
    ckptfs("dump", run.pid, tree)
    (ghost,) = ghost_dirs(tree)
    task = tree / "tasks" / str(run.pid)
    assert (task / "exe_ghost").read_text() == f"{ghost.name}\n"
    assert (task / "exe").read_text() == f"{run.workdir}/exe-copy\n"
    assert (ghost / "contents").read_bytes() == (zdtm_bin / "deleted_exe").read_bytes()
    assert (ghost / "mode").read_text() == "0100755\n"
    text = file_maps(tree, run.pid, "/exe-copy")
    assert text and {(m / "ghost").read_text() for m in text} == {f"{ghost.name}\n"}
    src = TreeSource(str(tree))
    exe = src.mm(run.pid).exe_file_id
    assert src.file_deleted(exe) and {v.shmid for v in src.mm(run.pid).vmas
                                      if v.start in {int(m.name.split("-")[0], 16) for m in text}} == {exe}
    assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"


def test_missing_saved_contents_is_refused(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "deleted_exe", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    ckptfs("dump", run.pid, tree)
    (ghost,) = ghost_dirs(tree)
    (ghost / "contents").unlink()
    with pytest.raises(BadTree, match=f"{ghost}/contents"):
        TreeSource(str(tree))
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0 and f"{ghost}/contents" in r.stderr
    assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"


@pytest.mark.skipif(not os.path.exists(CRIT), reason="crit not installed")
def test_criu_images_carry_the_deleted_mapped_file(zdtm_bin, procs, tmp_path):
    """Tree -> CRIU images: the mapped file's id has a GHOST remap and a ghost-file image
    (crit reads them), import makes the same ghost again, and the images restore to a
    process that passes its check."""
    run = zdtm.start(zdtm_bin, "deleted_map", tmp_path / "work", procs.spawn)
    tree, img = tmp_path / "tree", tmp_path / "img"
    ckptfs("dump", "--kill", run.pid, tree)
    ckptfs("criu", "export", tree, img)
    src = TreeSource(str(tree))
    fid = next(v.shmid for v in src.mm(run.pid).vmas
               if v.status & FILE_MAPS and src.file_deleted(v.shmid))
    remaps = criu.read_image(img / "remap-fpath.img")[1]
    assert [(r.orig_id, r.remap_type) for r in remaps] == [(fid, pb.GHOST)]
    decoded = subprocess.run([CRIT, "decode", "-i", str(img / "remap-fpath.img")],
                             capture_output=True, timeout=60)
    assert decoded.returncode == 0, decoded.stderr
    images = criu.ImageSource(str(img))
    assert images.file_contents(fid) == src.file_contents(fid)
    back = tmp_path / "back"             # and back into a tree: the same single ghost
    ckptfs("criu", "import", img, back)
    (ghost,) = ghost_dirs(back)
    assert (ghost / "contents").read_bytes() == src.file_contents(fid)
    assert (ghost / "mode").read_text() == "0100640\n"
    root = restore(img, procs)
    assert zdtm.check(root, run.result) == "PASS"


def test_failed_restore_leaves_no_file_behind(zdtm_bin, procs, tmp_path):
    """All or nothing: the exe's saved mode lost its execute bits, so setting the exe fails
    after its file was made; the restore fails naming the step, and neither the file (under
    any name) nor a process is left."""
    run = zdtm.start(zdtm_bin, "deleted_exe", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    ckptfs("dump", "--kill", run.pid, tree)
    (ghost,) = ghost_dirs(tree)
    os.chmod(ghost / "mode", 0o644)
    (ghost / "mode").write_text("0100600\n")
    before = sorted(os.listdir(run.workdir))
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0 and "PR_SET_MM_MAP" in r.stderr, r.stderr
    assert sorted(os.listdir(run.workdir)) == before
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _runs(p, str(run.workdir))]


def _runs(pid: str, where: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").startswith(where)
    except OSError:
        return False
