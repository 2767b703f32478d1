"""manifest.py: checksums, deterministic build, hostile-manifest refusals, completeness check."""
import json
import os

import pytest
import xxhash

from ckptfs import manifest
from ckptfs.errors import BadTree

META = {"os": "linux", "arch": "x86_64", "kernel": "6.18", "hostname": "a"}
CHUNK = 2 << 20


def make_tree(d, pages=2):
    """A small frozen tree on disk with a manifest built from its real checksums."""
    files = {"tasks/10/comm": b"sleep\n", "tasks/10/ppid": b"1\n",
             "isolation/uts/hostname": b"a\n"}
    for i in range(pages):
        files[f"tasks/10/maps/1000-201000/pages/{i * CHUNK:#x}"] = os.urandom(4096) * (i + 1)
    for rel, data in files.items():
        os.makedirs(os.path.dirname(d / rel), exist_ok=True)
        (d / rel).write_bytes(data)
    (d / "ctl").write_bytes(b"")
    (d / "status").write_bytes(b"frozen\n")
    listed = manifest.scan_tree(str(d))
    (d / "manifest").write_bytes(manifest.build(META, 10, [10], CHUNK, "frozen", listed))
    return files


def test_checksum_is_xxh3_64_hex():
    assert manifest.checksum(b"") == xxhash.xxh3_64(b"").hexdigest()
    assert len(manifest.checksum(b"abc")) == 16
    assert manifest.checksum(b"abc") != manifest.checksum(b"abd")


def test_checksum_file_streams(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert manifest.checksum_file(str(tmp_path / "f")) == manifest.checksum(data)


def test_build_is_deterministic_and_loads(tmp_path):
    files = {"b": (1, "0" * 16), "a": (2, "f" * 16)}
    one = manifest.build(META, 5, [5, 6], CHUNK, "frozen", files)
    two = manifest.build(dict(reversed(META.items())), 5, [5, 6], CHUNK, "frozen",
                         dict(reversed(files.items())))
    assert one == two and one.endswith(b"\n")
    doc = manifest.load(one)
    assert doc["files"]["a"] == {"size": 2, "xxh3_64": "f" * 16}
    assert list(json.loads(one)) == sorted(json.loads(one))
    (tmp_path / "manifest").write_bytes(one)
    assert manifest.load(str(tmp_path / "manifest")) == doc


def test_running_manifest_has_no_files_and_is_never_complete(tmp_path):
    doc = manifest.load(manifest.build(META, 5, [5], CHUNK, "running", None))
    assert "files" not in doc
    assert manifest.check(str(tmp_path), doc) == ["manifest: state is 'running', not frozen"]


def _doc(**change):
    doc = json.loads(manifest.build(META, 5, [5], CHUNK, "frozen", {"tasks/5/comm": (3, "a" * 16)}))
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not JSON"),
    (b"[1]", "not an object"),
    (_doc(format=2), "unknown format 2"),
    (_doc(checksum="md5"), "unknown checksum"),
    (_doc(root=7), "root 7 not in tasks"),
    (_doc(chunk_size=12345), "bad chunk_size"),
    (_doc(state="running"), "must not have files"),
    (_doc(files={"../etc/passwd": {"size": 1, "xxh3_64": "a" * 16}}), "'..'"),
    (_doc(files={"/etc/passwd": {"size": 1, "xxh3_64": "a" * 16}}), "absolute path"),
    (_doc(files={"a//b": {"size": 1, "xxh3_64": "a" * 16}}), "empty"),
    (_doc(files={"status": {"size": 1, "xxh3_64": "a" * 16}}), "never listed"),
    (_doc(files={"x": {"size": 1, "xxh3_64": "zz"}}), "16 hex digits"),
    (_doc(files={"tasks/5/maps/0-1/pages/0x0": {"size": 100 << 30, "xxh3_64": "a" * 16}}),
     "outside 0..2097152"),
    (_doc(files={"x": {"size": -1, "xxh3_64": "a" * 16}}), "outside"),
])
def test_load_refuses_bad_manifests(raw, words):
    with pytest.raises(BadTree) as e:
        manifest.load(raw)
    assert words in str(e.value) and "manifest" in str(e.value)


def test_load_names_missing_keys_and_file(tmp_path):
    (tmp_path / "manifest").write_text('{"format": 1}')
    with pytest.raises(BadTree, match=r"manifest: missing keys: state, source"):
        manifest.load(str(tmp_path / "manifest"))
    with pytest.raises(BadTree, match="cannot read"):
        manifest.load(str(tmp_path / "absent"))


def test_load_refuses_a_million_files():
    entry = {"size": 1, "xxh3_64": "a" * 16}
    doc = json.loads(_doc())
    doc["files"] = {f"f{i}": entry for i in range(1_000_000)}
    with pytest.raises(BadTree, match="lists 1000000 files, more than 200000"):
        manifest.load(json.dumps(doc, separators=(",", ":")).encode())


def test_check_complete_tree(tmp_path):
    make_tree(tmp_path)
    assert manifest.check(str(tmp_path), manifest.load(str(tmp_path / "manifest"))) == []


def test_check_names_missing_wrong_size_and_corrupt_chunk(tmp_path):
    files = make_tree(tmp_path)
    doc = manifest.load(str(tmp_path / "manifest"))
    chunk = "tasks/10/maps/1000-201000/pages/0x200000"
    data = bytearray(files[chunk])
    data[100] ^= 1
    (tmp_path / chunk).write_bytes(bytes(data))
    assert manifest.check(str(tmp_path), doc) == [f"{chunk}: checksum "
                                                  f"{manifest.checksum(bytes(data))}, want "
                                                  f"{manifest.checksum(files[chunk])}"]
    os.unlink(tmp_path / "tasks/10/comm")
    (tmp_path / "tasks/10/.comm.Ab12Cd").write_bytes(b"sl")
    (tmp_path / "tasks/10/ppid").write_bytes(b"1234\n")
    assert manifest.check(str(tmp_path), doc) == [
        "tasks/10/comm: missing (copy in progress: tasks/10/.comm.Ab12Cd)",
        "tasks/10/ppid: size 5, want 2"]


def test_check_ignores_stale_temp_beside_correct_file(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "tasks/10/.comm.Zz99Yy").write_bytes(b"junk")
    assert manifest.check(str(tmp_path), manifest.load(str(tmp_path / "manifest"))) == []


def test_check_refuses_symlinks_out_of_the_tree(tmp_path):
    make_tree(tmp_path / "t")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(tmp_path / "t/tasks/10/comm", outside / "comm")
    os.symlink(outside / "comm", tmp_path / "t/tasks/10/comm")
    os.rename(tmp_path / "t/isolation", outside / "isolation")
    os.symlink(outside / "isolation", tmp_path / "t/isolation")
    doc = manifest.load(str(tmp_path / "t/manifest"))
    assert manifest.check(str(tmp_path / "t"), doc) == [
        "isolation/uts/hostname: missing", "tasks/10/comm: is a symlink (refused)"]


def test_check_sparse_100g_chunk_is_not_read(tmp_path):
    make_tree(tmp_path)
    doc = manifest.load(str(tmp_path / "manifest"))
    with open(tmp_path / "tasks/10/maps/1000-201000/pages/0x0", "r+b") as f:
        f.truncate(100 << 30)   # sparse: checking must stop at the size
    assert manifest.check(str(tmp_path), doc) == [
        f"tasks/10/maps/1000-201000/pages/0x0: size {100 << 30}, want 4096"]
