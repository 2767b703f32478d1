"""One file object behind both a descriptor and a map, on real processes: a deleted file
open and mapped (zdtm deleted_fd_map), a memfd open and mapped or only mapped (zdtm
memfd_map). Both programs go through the whole matrix (test_zdtm.py); here: what the tree
holds (the contents once), what a tree edit changes, and the same through CRIU images.
"""
from __future__ import annotations

import subprocess
from pathlib import Path


from ckptfs import criu, pb
from ckptfs.flags import VMA_STATUS
from ckptfs.tree import FILE_MAPS, TreeSource
from helpers import zdtm
from helpers.cli import ckptfs, restore

CRIT = "/usr/bin/crit"
FD = 70                 # deleted_fd_map.c: the descriptor of the deleted, mapped file
LEN = 4 * 4096
MEMFD = VMA_STATUS["VMA_AREA_MEMFD"]


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


# -- memfd open and mapped, memfd only mapped (zdtm memfd_map) -----------------------------
MEMFD_FD = 80           # memfd_map.c: "zdtm-mapped", 3 pages, also mapped MAP_SHARED
ONLY_PAGES = 2          # memfd_map.c: "only-mapped", its descriptor closed


def memfd_maps(tree: Path, pid: int) -> dict[str, Path]:
    """path (/memfd:name) -> map directory, for the task's shared memfd maps."""
    out = {}
    for m in (tree / "tasks" / str(pid) / "maps").iterdir():
        if (m / "memfd").exists() and "MAP_SHARED" in (m / "flags").read_text():
            out[(m / "path").read_text().strip()] = m
    return out


def memfd_map(zdtm_bin, procs, tmp_path):
    run = zdtm.start(zdtm_bin, "memfd_map", tmp_path / "work", procs.spawn)
    tree = tmp_path / "tree"
    ckptfs("dump", "--kill", run.pid, tree)
    return run, tree


def test_memfd_open_and_mapped_is_saved_once(zdtm_bin, procs, tmp_path):
    """The memfd map names the descriptor's memfd by inode and saves no pages of its own;
    the memfd only maps reach is saved once in memfds/<inode>/ with its name; read back,
    the map's file is a MEMFD entry with that inode; restored, the program passes."""
    run, tree = memfd_map(zdtm_bin, procs, tmp_path)
    maps = memfd_maps(tree, run.pid)
    assert set(maps) == {"/memfd:zdtm-mapped", "/memfd:only-mapped"}
    fd = tree / "tasks" / str(run.pid) / "fds" / str(MEMFD_FD)
    held = maps["/memfd:zdtm-mapped"]
    assert (held / "memfd").read_text() == (fd / "inode").read_text()
    assert not list((held / "pages").iterdir())
    (only,) = sorted((tree / "memfds").iterdir())
    assert (maps["/memfd:only-mapped"] / "memfd").read_text() == f"{only.name}\n"
    assert not list((maps["/memfd:only-mapped"] / "pages").iterdir())
    assert (only / "name").read_text() == "only-mapped\n"
    data = (only / "contents").read_bytes()
    assert len(data) == ONLY_PAGES * 4096 and data[:3] == bytes(zdtm_bytes(0, 3, 53))
    assert not (tree / "ghosts").exists()
    src = TreeSource(str(tree))
    vma = next(v for v in src.mm(run.pid).vmas if v.start == int(held.name.split("-")[0], 16))
    fe = src.file(vma.shmid)
    assert fe.type == pb.fd_types.Value("MEMFD") and fe.memfd.inode_id == int((fd / "inode").read_text())
    root = restore(tree, procs)
    assert zdtm.check(root, run.result) == "PASS"


def zdtm_bytes(start: int, n: int, seed: int) -> list[int]:
    """zdtm.h's zdtm_byte pattern."""
    return [(i * 131 + seed) % 251 for i in range(start, start + n)]


def test_edited_memfd_contents_show_in_the_map(zdtm_bin, procs, tmp_path):
    """Restore maps what memfds/<inode>/contents and fds/80/contents say: an edited byte of
    either is what the program then finds in the map."""
    run, tree = memfd_map(zdtm_bin, procs, tmp_path)
    (only,) = sorted((tree / "memfds").iterdir())
    data = bytearray((only / "contents").read_bytes())
    data[5] ^= 0xff
    (only / "contents").write_bytes(bytes(data))
    root = restore(tree, procs)
    verdict = zdtm.check(root, run.result)
    assert verdict.startswith("FAIL: only-mapped memfd: byte 5 "), verdict

    run, tree = memfd_map(zdtm_bin, procs, tmp_path / "again")
    contents = tree / "tasks" / str(run.pid) / "fds" / str(MEMFD_FD) / "contents"
    data = bytearray(contents.read_bytes())
    data[7] ^= 0xff
    contents.write_bytes(bytes(data))
    root = restore(tree, procs)
    verdict = zdtm.check(root, run.result)
    assert verdict.startswith("FAIL: memfd map: byte 7 "), verdict


def test_memfd_map_without_its_memfd_is_refused(zdtm_bin, procs, tmp_path):
    run, tree = memfd_map(zdtm_bin, procs, tmp_path)
    (only,) = sorted((tree / "memfds").iterdir())
    (only / "contents").unlink()
    r = ckptfs("restore", tree, check=False)
    assert r.returncode != 0 and f"memfds/{only.name}/contents" in r.stderr, r.stderr


def test_criu_images_map_the_memfd_file(zdtm_bin, procs, tmp_path):
    """Tree -> CRIU images: each memfd map's shmid names a MEMFD file entry whose inode has
    a memfd.img entry (name, size) and a shmem pagemap (crit decodes them), the map and
    the descriptor of one memfd share the inode; import gives the tree's shape back and
    the images restore to a process that passes."""
    run, tree = memfd_map(zdtm_bin, procs, tmp_path)
    img = tmp_path / "img"
    ckptfs("criu", "export", tree, img)
    images = criu.ImageSource(str(img))
    vmas = [v for v in images.mm(run.pid).vmas if v.status & FILE_MAPS and v.status & MEMFD]
    inodes = {images.file(v.shmid).memfd.inode_id for v in vmas}
    assert len(vmas) == 3 and len(inodes) == 2      # zdtm-mapped shared + private, only-mapped
    fd_inode = next(images.file(f.id).memfd.inode_id for f in images.fdinfo(run.pid) if f.fd == MEMFD_FD)
    assert fd_inode in inodes
    names = {i.inode_id: i.name for i in criu.read_image(img / "memfd.img")[1]}
    assert names == {fd_inode: "zdtm-mapped", (inodes - {fd_inode}).pop(): "only-mapped"}
    for image in ["memfd.img", "files.img", *(f"pagemap-shmem-{i}.img" for i in inodes)]:
        decoded = subprocess.run([CRIT, "decode", "-i", str(img / image)], capture_output=True,
                                 timeout=60)
        assert decoded.returncode == 0, (image, decoded.stderr)
    back = tmp_path / "back"
    ckptfs("criu", "import", img, back)
    maps = memfd_maps(back, run.pid)
    assert set(maps) == {"/memfd:zdtm-mapped", "/memfd:only-mapped"}
    assert not any(list((m / "pages").iterdir()) for m in maps.values())
    assert [d.name for d in (back / "memfds").iterdir()] == [str((inodes - {fd_inode}).pop())]


def test_criu_images_restore_memfd_maps(zdtm_bin, procs, tmp_path):
    run, tree = memfd_map(zdtm_bin, procs, tmp_path)
    img = tmp_path / "img"
    ckptfs("criu", "export", tree, img)
    root = restore(img, procs)
    assert zdtm.check(root, run.result) == "PASS"
