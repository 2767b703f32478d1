"""CRIU image layer: framing, export, ImageSource — checked with CRIU's own crit.

The round trips are the proof: every image we write must survive `crit decode | crit encode`
byte for byte (crit 3.17 drops fields it does not know; those are accounted for explicitly),
crit's explorers must follow the cross-file references, and ImageSource must give back
exactly what the exporting source gave.

The images come from a real process tree (tests/zdtm/criu_mix.c, see tests/helpers/criu_mix.py)
frozen and exported once per module by LiveSource + criu.export; what the frozen source
answered is recorded for comparison. States a real process cannot be in (an image missing,
a field cleared, a corrupt entry) are made by editing a copy of that real dump.
"""
import base64
import dataclasses
import errno
import glob
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format
from hypothesis import given, settings, strategies as st

from ckptfs import criu, pb, tree
from ckptfs.errors import BadImage
from ckptfs.flags import TASK_STATES, VMA_STATUS
from ckptfs.model import PAGE_SIZE, PageRange

from helpers import criu_mix as mix_
from helpers import procs as _procs
from helpers import zdtm
from test_images_schema import _DUMP

CRIT = "/usr/bin/crit"
FILE_MAP = VMA_STATUS["VMA_FILE_PRIVATE"] | VMA_STATUS["VMA_FILE_SHARED"]
ANON_SHARED = VMA_STATUS["VMA_ANON_SHARED"]
needs_crit = pytest.mark.skipif(not os.path.exists(CRIT), reason="crit not installed")


def crit(*args, data=None):
    res = subprocess.run([CRIT, *args], input=data, capture_output=True, timeout=60)
    assert res.returncode == 0, (args, res.stderr.decode())
    return res.stdout


# crit's own decode and encode functions (pycriu.cli, what `crit decode -i X -o J` and
# `crit encode -i J -o Y` run) over many images in one interpreter: one process start instead
# of two per image keeps these tests fast. The CLI itself is exercised by test_crit_cli.
_CRIT_BATCH = r"""
import json, sys
from pycriu import cli
for src, js, dst, pretty in json.load(sys.stdin):
    cli.decode({"in": src, "out": js, "pretty": pretty, "nopl": False})
    cli.encode({"in": js, "out": dst})
"""


def crit_round_trips(images, scratch, pretty=False):
    """{image: (crit's JSON, crit's re-encoded bytes)} for every image."""
    tag = "pretty" if pretty else "raw"
    jobs = [(str(p), os.path.join(scratch, f"{os.path.basename(p)}.{tag}.json"),
             os.path.join(scratch, f"{os.path.basename(p)}.{tag}.crit"), pretty) for p in images]
    res = subprocess.run(["/usr/bin/python3", "-c", _CRIT_BATCH], input=json.dumps(jobs),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return {src: (json.load(open(js)), open(dst, "rb").read()) for src, js, dst, _ in jobs}


@pytest.fixture(scope="module")
def crit_fields():
    """Field numbers crit (pycriu 3.17) knows, per message full name."""
    res = subprocess.run(["/usr/bin/python3", "-c", _DUMP], capture_output=True, text=True)
    if res.returncode:
        pytest.skip("pycriu not available")
    return {m: {int(n) for n in f} for m, f in json.loads(res.stdout)["messages"].items()}


def strip_unknown(msg, known):
    """A copy of msg without the fields crit does not know (what crit decode/encode keeps)."""
    out = type(msg)()
    out.CopyFrom(msg)
    _strip(out, known)
    return out


def _strip(msg, known):
    fields = known.get(msg.DESCRIPTOR.full_name, set())
    for d, value in msg.ListFields():
        if d.number not in fields:
            msg.ClearField(d.name)
        elif d.message_type is not None:
            for sub in (value if d.is_repeated else [value]):
                _strip(sub, known)


def pb_images(directory):
    return sorted(p for p in glob.glob(os.path.join(directory, "*.img"))
                  if not os.path.basename(p).startswith("pages-"))


# -- framing ------------------------------------------------------------------------------
def test_framing_bytes(tmp_path):
    p = tmp_path / "seccomp.img"
    criu.write_image(p, "SECCOMP", [pb.seccomp_entry()])
    assert p.read_bytes() == bytes.fromhex("19435654" "49304164" "00000000")
    p = tmp_path / "pstree.img"
    criu.write_image(p, "PSTREE", [pb.pstree_entry(pid=21633, ppid=0, pgid=21633, sid=21633,
                                                   threads=[21633])])
    assert p.read_bytes() == bytes.fromhex("19435654" "30302750" "12000000"
                                           "0881a901" "1000" "1881a901" "2081a901" "2881a901")
    assert criu.read_image(p)[0] == "PSTREE"


def test_inventory_has_no_head(tmp_path):
    p = tmp_path / "inventory.img"
    criu.write_image(p, "INVENTORY", [pb.inventory_entry(img_version=2)])
    assert p.read_bytes()[:4] == (0x58313116).to_bytes(4, "little")
    kind, msgs, _ = criu.read_image(p)
    assert kind == "INVENTORY" and msgs[0].img_version == 2


def test_bad_magic_names_file_offset_value(tmp_path):
    p = tmp_path / "core-1.img"
    p.write_bytes(bytes.fromhex("19435654" "efbeadde"))
    with pytest.raises(BadImage) as e:
        criu.read_image(p)
    assert str(p) in str(e.value) and "offset 4" in str(e.value) and "0xdeadbeef" in str(e.value)


@pytest.mark.parametrize("tail,what", [
    ("0a000000" "0801", "truncated pstree_entry entry: size 10, 2 bytes follow"),
    ("02", "truncated entry size"),
    ("02000000" "ffff", "cannot decode pstree_entry"),
    ("00000000", "cannot decode pstree_entry"),     # required pid/ppid/... missing
])
def test_truncated_or_undecodable(tmp_path, tail, what):
    p = tmp_path / "pstree.img"
    p.write_bytes(bytes.fromhex("19435654" "30302750") + bytes.fromhex(tail))
    with pytest.raises(BadImage) as e:
        criu.read_image(p)
    assert str(p) in str(e.value) and what in str(e.value) and "offset 8" in str(e.value)


def test_write_refuses_incomplete_message(tmp_path):
    with pytest.raises(BadImage, match="pid"):
        criu.write_image(tmp_path / "pstree.img", "PSTREE", [pb.pstree_entry(ppid=1)])


def test_pipe_data_extra_round_trip(tmp_path):
    p = tmp_path / "pipes-data.img"
    msgs = [pb.pipe_data_entry(pipe_id=7, bytes=3), pb.pipe_data_entry(pipe_id=8, bytes=0)]
    criu.write_image(p, "PIPES_DATA", msgs, [b"xyz", b""])
    kind, got, extras = criu.read_image(p)
    assert (kind, got, extras) == ("PIPES_DATA", msgs, [b"xyz", b""])
    with pytest.raises(BadImage, match="announces 3"):
        criu.write_image(p, "PIPES_DATA", msgs[:1], [b"ab"])


def test_ghost_file_layouts(tmp_path):
    p = tmp_path / "ghost-file-1.img"
    criu.write_image(p, "GHOST_FILE", [pb.ghost_file_entry(uid=0, gid=0, mode=0o100644)],
                     [b"whole content"])
    assert criu.read_image(p)[2] == [b"whole content"]
    head = pb.ghost_file_entry(uid=0, gid=0, mode=0o100644, chunks=True, size=10)
    chunks = [pb.ghost_chunk_entry(len=2, off=0), pb.ghost_chunk_entry(len=3, off=7)]
    criu.write_image(p, "GHOST_FILE", [head, *chunks], [None, b"ab", b"cde"])
    kind, msgs, extras = criu.read_image(p)
    assert msgs == [head, *chunks] and extras == [None, b"ab", b"cde"]


# -- the real process: criu_mix dumped live once for the module ----------------------------
HOSTNAME = "ckpt-test"
PG = PAGE_SIZE


@dataclasses.dataclass
class Mix:
    lay: mix_.Layout
    rec: mix_.Recorded       # what the frozen LiveSource answered
    out: Path                # its CRIU images

    @property
    def shmid(self) -> int:
        """Object id of the anonymous map root and child share."""
        (v,) = [v for v in self.rec.mm[self.lay.root].vmas if v.start == self.lay.shm]
        return v.shmid

    def fd(self, pid: int, fd: int):
        (got,) = [f for f in self.rec.fdinfo[pid] if f.fd == fd]
        return got

    @property
    def pipe_id(self) -> int:
        return self.rec.files[self.fd(self.lay.root, mix_.PIPE_R).id].pipe.pipe_id

    def names(self) -> dict:
        """Values the file names and messages below are written with."""
        lay, rec = self.lay, self.rec
        return dict(R=lay.root, C=lay.child, T=lay.thread,
                    rfiles=rec.ids[lay.root].files_id, cfiles=rec.ids[lay.child].files_id,
                    uts=rec.ids[lay.root].uts_ns_id, shmid=self.shmid)


@pytest.fixture(scope="module")
def mix(zdtm_bin, tmp_path_factory):
    """tests/zdtm/criu_mix.c in a UTS namespace of its own, frozen and exported once. It runs
    on for the tests that want it live (a second dump, a running source) and must still
    PASS its own check at the end: nothing the dumps did was noticed."""
    tmp = tmp_path_factory.mktemp("mix")
    ps = _procs.ProcSet(tmp / "logs")
    try:
        run = mix_.start(zdtm_bin, tmp / "work", ps, CRIU_MIX_HOSTNAME=HOSTNAME)
        lay = mix_.layout(run)
        rec = mix_.dump(run.pid, tmp / "images")
        yield Mix(lay, rec, tmp / "images")
        assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"
    finally:
        ps.kill_all()


def edit(directory, name, change):
    """Rewrite image `name` in `directory` with `change(messages)` applied (an image whose
    messages carry no extra payload may lose or gain messages)."""
    kind, msgs, extras = criu.read_image(directory / name)
    change(msgs)
    criu.write_image(directory / name, kind, msgs, None if not any(extras) else extras)


# -- export, checked with crit ------------------------------------------------------------
def test_export_file_set(mix):
    n = mix.names()
    assert n["rfiles"] != n["cfiles"]         # fork copied the fd table: one image each
    want = {"inventory.img", "pstree.img", "files.img", "pipes-data.img", "seccomp.img",
            "pages-1.img", "pages-2.img", "pages-3.img", "utsns-{uts}.img",
            "pagemap-shmem-{shmid}.img", "fdinfo-{rfiles}.img", "fdinfo-{cfiles}.img",
            "core-{R}.img", "core-{T}.img", "core-{C}.img"}
    for pid in ("R", "C"):
        want |= {f"{what}-{{{pid}}}.img" for what in ("ids", "mm", "fs", "pagemap")}
    assert set(os.listdir(mix.out)) == {w.format(**n) for w in want}


def test_export_restore_rules(mix):
    rec, out, n = mix.rec, mix.out, mix.names()
    inv = criu.read_image(out / "inventory.img")[1][0]
    assert inv.img_version == 2 and inv.fdinfo_per_id and inv.ns_per_id
    task = rec.ids[n["R"]]
    for f in ("vm_id", "files_id", "fs_id", "sighand_id"):
        assert getattr(inv.root_ids, f) not in {getattr(i, f) for i in rec.ids.values()}
    assert inv.root_ids.uts_ns_id != task.uts_ns_id                 # own UTS namespace
    assert inv.root_ids.net_ns_id == task.net_ns_id                 # shared with CRIU's
    cores = {t: criu.read_image(out / f"core-{n[t]}.img")[1][0] for t in "RCT"}
    assert not cores["T"].HasField("tc")
    for t in "RC":
        tc = cores[t].tc
        assert len(tc.sigactions) == 62 and tc.HasField("timers") and len(tc.rlimits.rlimits) == 16
    assert all(c.thread_core.HasField("creds") for c in cores.values())
    # files.img holds exactly the files something refers to
    wanted = {fd.id for fds in rec.fdinfo.values() for fd in fds}
    for pid, mm in rec.mm.items():
        wanted |= {mm.exe_file_id, rec.fs[pid].cwd_id, rec.fs[pid].root_id}
        wanted |= {v.shmid for v in mm.vmas if v.status & FILE_MAP and not v.status & ANON_SHARED}
    files = {f.id: f for f in criu.read_image(out / "files.img")[1]}
    assert set(files) == wanted
    dat = files[mix.fd(n["R"], mix_.FILE_FD).id].reg
    assert dat.name == f"{mix.lay.workdir}/criu_mix.dat" and dat.pos == mix_.FILE_POS
    assert dat.flags & os.O_ACCMODE == os.O_RDWR
    ends = [files[mix.fd(n["R"], fd).id].pipe for fd in (mix_.PIPE_R, mix_.PIPE_W)]
    assert ends[0].pipe_id == ends[1].pipe_id and [e.flags & os.O_ACCMODE for e in ends] == \
        [os.O_RDONLY, os.O_WRONLY]
    assert criu.problems(out) == []


@needs_crit
def test_every_image_decodes_with_crit_same_values(mix, crit_fields, tmp_path):
    for path, (doc, _) in crit_round_trips(pb_images(mix.out), tmp_path).items():
        kind, msgs, extras = criu.read_image(path)
        assert doc["magic"] == kind, path
        assert len(doc["entries"]) == len(msgs), path
        # crit's JSON read back with our schema: the values we wrote (less the fields crit
        # does not know)
        for entry, msg, extra in zip(doc["entries"], msgs, extras):
            crit_extra = entry.pop("extra", None)
            assert _from_crit_json(type(msg), entry) == strip_unknown(msg, crit_fields), path
            if crit_extra is not None:
                assert base64.b64decode(crit_extra) == extra


@needs_crit
def test_crit_cli(mix, tmp_path):
    """The crit command line itself: decode | encode, byte for byte."""
    for name in ("pstree.img", f"core-{mix.lay.root}.img", "files.img"):
        again = tmp_path / name
        crit("encode", "-o", again, data=crit("decode", "-i", mix.out / name))
        assert again.read_bytes() == (mix.out / name).read_bytes(), name


def _from_crit_json(cls, entry):
    """crit's JSON as our message; crit 3.17 calls pagemap field 2 by its old name."""
    if cls.DESCRIPTOR.name == "pagemap_entry" and "nr_pages" in entry:
        entry = {**entry, "compat_nr_pages": entry["nr_pages"]}
        del entry["nr_pages"]
    return json_format.ParseDict(entry, cls())


@needs_crit
def test_crit_round_trip_byte_identical(mix, crit_fields, tmp_path):
    """decode | encode (raw and --pretty) reproduces every image; only fields crit 3.17 does
    not know differ, and those are exactly pagemap_entry.nr_pages (field 5, CRIU 4.2)."""
    images = pb_images(mix.out)
    raw = crit_round_trips(images, tmp_path)
    pretty = crit_round_trips(images, tmp_path, pretty=True)
    differ = {}
    for path in images:
        again = raw[path][1]
        kind, msgs, extras = criu.read_image(path)
        stripped = [strip_unknown(m, crit_fields) for m in msgs]
        assert again == criu.image_bytes(kind, stripped, extras), path
        assert pretty[path][1] == again, path      # hex/flags/dev forms give the same bytes
        if again != open(path, "rb").read():
            differ[os.path.basename(path)] = {d.name for m in msgs for d, _ in m.ListFields()
                                              if d.number not in crit_fields[m.DESCRIPTOR.full_name]}
    want = ("pagemap-{R}.img", "pagemap-{C}.img", "pagemap-shmem-{shmid}.img")
    assert differ == {w.format(**mix.names()): {"nr_pages"} for w in want}


@needs_crit
def test_crit_explorers(mix):
    lay, out = mix.lay, mix.out
    ps = crit("x", out, "ps").decode()
    assert str(lay.root) in ps and str(lay.child) in ps and "criu_mix" in ps
    fds = crit("x", out, "fds").decode()
    assert f"{mix_.FILE_FD}: {lay.workdir}/criu_mix.dat" in fds
    assert f"{mix_.PIPE_W}: pipe[{mix.pipe_id}]" in fds and f"cwd: {lay.workdir}" in fds
    mems = crit("x", out, "mems").decode()
    assert f"{lay.big:x}-{lay.big + mix_.BIG_LEN:x}" in mems and f"{lay.workdir}/criu_mix.map" in mems
    assert f"{lay.shm:x}-{lay.shm + mix_.SHM_PAGES * PG:x}           rw- shmem" in mems
    rss = crit("x", out, "rss").decode()
    for addr, pages in ((lay.big, 768), (lay.fmap + PG, 1), (lay.part, 16), (lay.part + 32 * PG, 1)):
        assert f"{addr:x} / {pages} " in rss, (hex(addr), pages)


def test_pages_size_matches_pagemap(mix):
    total = 0
    for name in glob.glob(os.path.join(mix.out, "pagemap-*.img")):
        _, msgs, _ = criu.read_image(name)
        head, entries = msgs[0], msgs[1:]
        assert all(e.flags == criu.PE_PRESENT and e.nr_pages == e.compat_nr_pages > 0
                   for e in entries)
        want = sum(e.nr_pages for e in entries) * PAGE_SIZE
        assert os.path.getsize(mix.out / f"pages-{head.pages_id}.img") == want
        total += want
    # every saved page once; the shared object's pages 2-3 are saved by both tasks
    saved = sum(r.nr_pages for ranges in mix.rec.ranges.values() for r in ranges)
    assert total == (saved - 2) * PAGE_SIZE


def test_shared_memory_goes_to_shmem_pagemap(mix):
    lay, rec, out = mix.lay, mix.rec, mix.out
    # each task's page tables held its own pages only: root 0-3, child 2-5
    assert rec.ranges[(lay.root, lay.shm)] == [PageRange(lay.shm, lay.shm + 4 * PG)]
    assert rec.ranges[(lay.child, lay.shm)] == [PageRange(lay.shm + 2 * PG, lay.shm + 6 * PG)]
    _, msgs, _ = criu.read_image(out / f"pagemap-shmem-{mix.shmid}.img")
    assert [(e.vaddr, e.nr_pages) for e in msgs[1:]] == [(0, 4), (0x4000, 2)]
    assert (out / f"pages-{msgs[0].pages_id}.img").read_bytes() == mix_.shared(0, 6 * PG)
    for pid in (lay.root, lay.child):
        private = criu.read_image(out / f"pagemap-{pid}.img")[1][1:]
        assert all(not lay.shm <= e.vaddr < lay.shm + mix_.SHM_PAGES * PG for e in private)


def test_memory_streams_in_chunks(mix):
    from ckptfs.criu.memory import COPY_CHUNK
    assert 0 < max(mix.rec.reads) <= COPY_CHUNK < mix_.BIG_LEN


# -- ImageSource --------------------------------------------------------------------------
def test_image_source_round_trip(mix):
    lay, rec = mix.lay, mix.rec
    img = criu.ImageSource(mix.out)
    # lossless: CRIU's ppid-0 root and the neutral 4.x fields left out are the only changes
    assert img.pstree() == criu.root_pstree(rec.pstree)
    for pid, threads in rec.live():
        for tid in threads:
            assert img.core(tid) == criu.trim_core(rec.cores[tid])
        assert img.ids(pid) == rec.ids[pid]
        assert img.mm(pid) == rec.mm[pid]
        assert img.fs(pid) == rec.fs[pid]
        assert img.fdinfo(pid) == rec.fdinfo[pid]
        for fd in rec.fdinfo[pid]:
            assert img.file(fd.id) == rec.files[fd.id]
        for v in rec.mm[pid].vmas:
            got = img.page_ranges(pid, v)
            if v.status & ANON_SHARED:    # the object's pages saved by any task, as one run
                assert got == [PageRange(lay.shm, lay.shm + 6 * PG)]
                assert img.read_memory(pid, lay.shm, 6 * PG) == mix_.shared(0, 6 * PG)
                continue
            assert got == rec.ranges[(pid, v.start)]
            for r in got:
                assert img.read_memory(pid, r.start, r.end - r.start) == rec.memory[(pid, r.start)]
    assert img.pipe_data(mix.pipe_id) == mix_.PIPE_TEXT and img.pipe_data(1) == b""
    assert img.core(lay.child).thread_core.pdeath_sig == signal.SIGKILL   # prctl in the child
    iso = img.isolation()
    assert (iso.hostname, iso.domainname, iso.own_namespaces) == \
        (HOSTNAME, rec.isolation.domainname, ("uts",))
    m, want = img.meta(), rec.meta
    assert (m.arch, m.hostname) == ("x86_64", HOSTNAME)
    assert (m.xfeatures, m.xsave_size) == (want.xfeatures, want.xsave_size)
    img.close()


def test_image_source_memory_edges(mix):
    lay, R = mix.lay, mix.lay.root
    with criu.ImageSource(mix.out) as img:
        # straddles saved (pages 0-15 of part) and unsaved: zeros past the saved range
        a = lay.part + 15 * PG + 100
        got = img.read_memory(R, a, 8192)
        assert got[:PG - 100] == mix_.private(a, PG - 100)
        assert got[PG - 100:] == bytes(4196)
        # unsaved, saved, unsaved: page 32 of part alone
        assert img.read_memory(R, lay.part + 31 * PG, 3 * PG) == \
            bytes(PG) + mix_.private(lay.part + 32 * PG, PG) + bytes(PG)
        # a big unaligned read spanning most of the 3 MiB region in one call
        assert img.read_memory(R, lay.big + 5, 2 << 20) == mix_.private(lay.big + 5, 2 << 20)
        # the copied-on-write page of the private file map
        assert img.read_memory(R, lay.fmap + PG, PG) == mix_.words(lay.fmap + PG, PG, mix_.KEY_COW)
        # the shared object through either task, across what each task's tables held
        for pid in (R, lay.child):
            assert img.read_memory(pid, lay.shm + 3 * PG + 8, 2 * PG) == \
                mix_.shared(3 * PG + 8, 2 * PG)


def test_image_source_missing_optional_and_required(mix, tmp_path):
    n = mix.names()
    skip = [w.format(**n) for w in ("pipes-data.img", "fdinfo-{cfiles}.img", "utsns-{uts}.img")]
    d = mix_.copy(mix.out, tmp_path / "img", skip=skip)
    img = criu.ImageSource(d)
    assert img.fdinfo(n["C"]) == [] and img.pipe_data(mix.pipe_id) == b""
    assert img.isolation().hostname is None
    os.unlink(d / f"mm-{n['C']}.img")
    with pytest.raises(BadImage, match=f"mm-{n['C']}.img"):
        img.mm(n["C"])
    bogus = max(mix.rec.files) + 1000
    with pytest.raises(BadImage, match=f"no file entry with id {bogus}"):
        img.file(bogus)


def test_image_source_old_pagemap_and_parent(mix, tmp_path):
    """Pre-4.2 pagemaps (count in field 2 only, in_parent) and PE_PARENT pages over two real
    dumps of one process: the module's dump as a pre-dump leaves it (memory only) is the
    parent of a second dump taken later, whose 3 MiB region is marked "in the parent"."""
    lay, R = mix.lay, mix.lay.root
    parent = mix_.copy(mix.out, tmp_path / "p")
    for name in os.listdir(parent):
        if not name.startswith(("pagemap-", "pages-", "inventory")):
            os.unlink(parent / name)
    child = tmp_path / "c"
    rec = mix_.dump(R, child)
    _, msgs, _ = criu.read_image(child / f"pagemap-{R}.img")
    pages = child / f"pages-{msgs[0].pages_id}.img"
    data, kept, off = pages.read_bytes(), [], 0
    for e in msgs[1:]:
        size = e.nr_pages * PG
        e.ClearField("nr_pages")
        e.ClearField("flags")
        if e.vaddr == lay.big:
            assert size == mix_.BIG_LEN
            e.in_parent = True
        else:
            kept.append(data[off:off + size])
        off += size
    assert sum(e.in_parent for e in msgs[1:]) == 1
    criu.write_image(child / f"pagemap-{R}.img", "PAGEMAP", msgs)
    pages.write_bytes(b"".join(kept))         # the child's own file lacks those pages
    os.symlink("../p", child / "parent")
    with criu.ImageSource(child) as img:
        assert img.read_memory(R, lay.big + 8, mix_.BIG_LEN - 8) == \
            mix_.private(lay.big + 8, mix_.BIG_LEN - 8)
        for e in msgs[1:]:    # the others still find theirs in the child's file
            if not e.in_parent:
                assert img.read_memory(R, e.vaddr, e.compat_nr_pages * PG) == \
                    rec.memory[(R, e.vaddr)], hex(e.vaddr)
    # a PE_PARENT range the parent does not hold is an error, not zeros
    def drop_big(pm):
        pm[1:] = [e for e in pm[1:] if e.vaddr != lay.big]
    edit(parent, f"pagemap-{R}.img", drop_big)
    with pytest.raises(BadImage, match="no saved pages at"):
        criu.ImageSource(child).read_memory(R, lay.big, PG)


def test_image_source_cgroup_path_and_limits(mix, tmp_path):
    """cgroup.img as CRIU writes it on a v1 host: the root task's set, v1 properties."""
    d = mix_.copy(mix.out, tmp_path / "img")
    R = mix.lay.root
    cg = pb.cgroup_entry()
    s = cg.sets.add(id=2)
    s.ctls.add(name="memory", path="/ckptfs/t1")
    s.ctls.add(name="cpu,cpuacct", path="/ckptfs/t1")
    s.ctls.add(name="name=systemd", path="/user.slice")
    cg.sets.add(id=1).ctls.add(name="memory", path="/")
    mem = cg.controllers.add(cnames=["memory"])
    top = mem.dirs.add(dir_name="ckptfs")
    t1 = top.children.add(dir_name="t1")
    t1.properties.add(name="memory.limit_in_bytes", value="268435456")
    t1.properties.add(name="memory.memsw.limit_in_bytes", value="9223372036854771712")
    cpu = cg.controllers.add(cnames=["cpu", "cpuacct"])
    dr = cpu.dirs.add(dir_name="ckptfs/t1")
    dr.properties.add(name="cpu.cfs_quota_us", value="50000")
    dr.properties.add(name="cpu.cfs_period_us", value="100000")
    criu.write_image(d / "cgroup.img", "CGROUP", [cg])
    edit(d, f"core-{R}.img", lambda m: setattr(m[0].thread_core, "cg_set", 2))
    iso = criu.ImageSource(d).isolation()
    assert iso.cgroup == "/ckptfs/t1"
    assert iso.limits == {"memory.max": "268435456", "memory.swap.max": "max",
                          "cpu.max": "50000 100000"}
    edit(d, f"core-{R}.img", lambda m: setattr(m[0].thread_core, "cg_set", 3))
    with pytest.raises(BadImage, match="cgroup set 3"):
        criu.ImageSource(d).isolation()


# -- a real process: LiveSource -> export -> crit / ImageSource ----------------------------
@needs_crit
@pytest.mark.parametrize("name", ["pipe_data", "shared_anon", "threads"])
def test_live_export(name, zdtm_bin, procs, tmp_path, crit_fields):
    from helpers import zdtm
    from ckptfs.capture.linux import LiveSource

    run = zdtm.start(zdtm_bin, name, tmp_path / "work", procs.spawn)
    out = tmp_path / "img"
    src = LiveSource(run.pid)
    src.freeze()
    try:
        criu.export(src, out)
        img = criu.ImageSource(out)
        # lossless: what the images say is what the live source said (CRIU's ppid-0 root
        # and the neutral 4.x fields left out are the only normalisations)
        assert img.pstree() == criu.root_pstree(src.pstree())
        m, want = img.meta(), src.meta()
        assert (m.arch, m.xfeatures, m.xsave_size) == (want.arch, want.xfeatures, want.xsave_size)
        for pid, threads in src.tasks():
            assert [img.core(t) for t in threads] == [criu.trim_core(src.core(t)) for t in threads]
            for what in ("ids", "mm", "fs", "fdinfo"):
                assert getattr(img, what)(pid) == getattr(src, what)(pid), what
            for fd in src.fdinfo(pid):
                assert img.file(fd.id) == src.file(fd.id)
            for v in src.mm(pid).vmas:
                live = src.page_ranges(pid, v)
                saved = img.page_ranges(pid, v)
                assert {a for r in live for a in range(r.start, r.end, PAGE_SIZE)} <= \
                    {a for r in saved for a in range(r.start, r.end, PAGE_SIZE)}
                for r in saved:
                    assert img.read_memory(pid, r.start, r.end - r.start) == \
                        src.read_memory(pid, r.start, r.end - r.start), (pid, hex(r.start))
    finally:
        src.thaw()
        src.close()
    # the process did not notice
    assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"
    assert criu.problems(out) == []

    differ = []
    for path, (_, again) in crit_round_trips(pb_images(out), tmp_path).items():
        kind, msgs, extras = criu.read_image(path)
        stripped = [strip_unknown(m, crit_fields) for m in msgs]
        assert again == criu.image_bytes(kind, stripped, extras), path
        if again != open(path, "rb").read():
            differ.append(os.path.basename(path))
    # only pagemaps differ (field 5, nr_pages, is unknown to crit 3.17)
    assert differ and all(n.startswith("pagemap-") for n in differ), differ
    for what in ("ps", "fds", "mems", "rss"):
        assert str(run.pid) in crit("x", out, what).decode()
    total = 0
    for pm in glob.glob(os.path.join(out, "pagemap-*.img")):
        msgs = criu.read_image(pm)[1]
        size = os.path.getsize(out / f"pages-{msgs[0].pages_id}.img")
        assert size == sum(e.nr_pages for e in msgs[1:] if e.flags & criu.PE_PRESENT) * PAGE_SIZE
        total += size
    assert total > 0


def test_export_fills_neutral_task_state(mix, tmp_path):
    """A source without timers or sigactions (unarmed, all default) still exports a core
    CRIU restores; one without rlimits or creds is refused, naming the core file. The
    sources are copies of the real dump with those fields taken out."""
    R, T = mix.lay.root, mix.lay.thread
    assert any(sa.sigaction > 1 for sa in mix.rec.cores[R].tc.sigactions)   # SIGUSR2's handler
    d = mix_.copy(mix.out, tmp_path / "img")

    def no_timers_no_sigactions(m):
        m[0].tc.ClearField("timers")
        del m[0].tc.sigactions[:]
    edit(d, f"core-{R}.img", no_timers_no_sigactions)
    criu.export(criu.ImageSource(d), tmp_path / "a")
    tc = criu.read_image(tmp_path / "a" / f"core-{R}.img")[1][0].tc
    assert tc.timers.real.vsec == 0 and len(tc.sigactions) == 62
    assert all(sa.sigaction == 0 for sa in tc.sigactions)
    edit(d, f"core-{R}.img", lambda m: m[0].tc.ClearField("rlimits"))
    with pytest.raises(BadImage, match=f"core-{R}.img.*rlimits"):
        criu.export(criu.ImageSource(d), tmp_path / "b")
    d = mix_.copy(mix.out, tmp_path / "img2")
    edit(d, f"core-{T}.img", lambda m: m[0].thread_core.ClearField("creds"))
    with pytest.raises(BadImage, match=f"core-{T}.img.*creds"):
        criu.export(criu.ImageSource(d), tmp_path / "c")


def test_export_sorts_vmas_and_wants_shmid(mix, tmp_path):
    C = mix.lay.child
    d = mix_.copy(mix.out, tmp_path / "img")
    edit(d, f"mm-{C}.img", lambda m: m[0].vmas.reverse())
    criu.export(criu.ImageSource(d), tmp_path / "a")
    assert criu.read_image(tmp_path / "a" / f"mm-{C}.img")[1][0] == mix.rec.mm[C]

    def unnamed_shared(m):
        (v,) = [v for v in m[0].vmas if v.start == mix.lay.shm]
        v.shmid = 0
    edit(d, f"mm-{C}.img", unnamed_shared)
    with pytest.raises(BadImage, match=f"mm-{C}.img.*no shmid"):
        criu.export(criu.ImageSource(d), tmp_path / "b")


@needs_crit
def test_live_unlinked_file_becomes_ghost(zdtm_bin, procs, tmp_path):
    from helpers import zdtm
    from ckptfs.capture.linux import LiveSource

    run = zdtm.start(zdtm_bin, "unlinked_file", tmp_path / "work", procs.spawn)
    out = tmp_path / "img"
    with LiveSource(run.pid) as src:
        src.freeze()
        try:
            criu.export(src, out)
            fid = next(fd.id for fd in src.fdinfo(run.pid)
                       if src.file(fd.id).reg.name.endswith("unlinked.dat"))
            want = src.file_contents(fid)
        finally:
            src.thaw()
    assert len(want) == 10000
    remap = criu.read_image(out / "remap-fpath.img")[1]
    assert [(r.orig_id, r.remap_type) for r in remap] == [(fid, pb.GHOST)]
    assert os.path.exists(out / "ghost-file-1.img")
    img = criu.ImageSource(out)
    assert img.file_deleted(fid) and img.file_contents(fid) == want
    assert not img.file_deleted(img.mm(run.pid).exe_file_id)
    for name in ("remap-fpath.img", "ghost-file-1.img"):
        again = tmp_path / name
        crit("encode", "-o", again, data=crit("decode", "-i", out / name))
        assert again.read_bytes() == (out / name).read_bytes()
    assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"


def test_chunked_ghost(mix, tmp_path):
    d = mix_.copy(mix.out, tmp_path / "img")
    dat = mix.fd(mix.lay.root, mix_.FILE_FD).id
    criu.write_image(d / "remap-fpath.img", "REMAP_FPATH",
                     [pb.remap_file_path_entry(orig_id=dat, remap_id=3 | 1 << 31,
                                               remap_type=pb.GHOST)])
    head = pb.ghost_file_entry(uid=0, gid=0, mode=0o100644, chunks=True, size=12)
    criu.write_image(d / "ghost-file-3.img", "GHOST_FILE",
                     [head, pb.ghost_chunk_entry(len=2, off=1), pb.ghost_chunk_entry(len=3, off=9)],
                     [None, b"ab", b"xyz"])
    img = criu.ImageSource(d)
    assert img.file_contents(dat) == b"\0ab\0\0\0\0\0\0xyz" and img.file_deleted(dat)
    assert not img.file_deleted(mix.rec.mm[mix.lay.root].exe_file_id)


def test_export_refuses_directory_with_images(mix):
    from ckptfs.errors import CkptError
    with pytest.raises(CkptError, match="already holds CRIU images") as e:
        criu.export(criu.ImageSource(mix.out), mix.out)
    assert e.value.errno == errno.EEXIST


_u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_u32, st.binary(max_size=300)), max_size=6),
       st.lists(st.tuples(_u32, _u32, st.lists(_u32, max_size=4)), max_size=5))
def test_framing_round_trip_property(tmp_path_factory, pipes, tasks):
    """Whatever we write reads back as the same messages and extras, and the same bytes."""
    d = tmp_path_factory.mktemp("prop")
    msgs = [pb.pipe_data_entry(pipe_id=i, bytes=len(b)) for i, b in pipes]
    extras = [b for _, b in pipes]
    criu.write_image(d / "pipes-data.img", "PIPES_DATA", msgs, extras)
    assert criu.read_image(d / "pipes-data.img") == ("PIPES_DATA", msgs, extras)
    ps = [pb.pstree_entry(pid=p, ppid=q, pgid=p, sid=q, threads=t) for p, q, t in tasks]
    criu.write_image(d / "pstree.img", "PSTREE", ps)
    kind, got, _ = criu.read_image(d / "pstree.img")
    assert got == ps
    assert criu.image_bytes(kind, got) == (d / "pstree.img").read_bytes()


def _corrupt(out, tmp_path, name, change):
    d = mix_.copy(out, tmp_path / "img")
    edit(d, name, change)
    return criu.problems(d)


def _pages_plus_one(m):
    m[1].nr_pages += 1


# (image, change(messages, names), what check reports); names: see Mix.names, plus
# cfd0 (the child's first fd), pmsize (size of its pages file), n1 (pages of the root's first
# pagemap entry)
CORRUPTIONS = {
    "thread-creds": ("core-{T}.img", lambda m, n: m[0].thread_core.ClearField("creds"),
                     "core-{T}.img: no thread_core.creds"),
    "sigactions": ("core-{R}.img", lambda m, n: m[0].tc.sigactions.pop(),
                   "core-{R}.img: 61 sigactions, want 62"),
    "cg-set": ("core-{C}.img", lambda m, n: setattr(m[0].thread_core, "cg_set", 5), "cg_set 5"),
    "files-id": ("ids-{R}.img", lambda m, n: setattr(m[0], "files_id", n["root_files"]),
                 "files_id {root_files} equals root_ids.files_id"),
    "net-ns": ("ids-{R}.img", lambda m, n: setattr(m[0], "net_ns_id", 42), "own net namespace 42"),
    "fdinfo": ("fdinfo-{cfiles}.img", lambda m, n: setattr(m[0], "id", 99999),
               "no entry 99999 for task {C} fd {cfd0}"),
    "pages": ("pagemap-{C}.img", lambda m, n: _pages_plus_one(m),
              "pages-{cpages}.img: {pmsize} bytes, pagemap wants {pmsize_plus}"),
    "outside": ("pagemap-{R}.img", lambda m, n: setattr(m[1], "vaddr", 0x1000),
                "entry 0x1000+{n1} pages is outside every VMA"),
    "order": ("mm-{C}.img", lambda m, n: m[0].vmas.reverse(), "mm-{C}.img: VMAs not in ascending order"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_check_finds_what_restore_refuses(mix, tmp_path, case):
    out, n = mix.out, mix.names()
    C, R = n["C"], n["R"]
    cpm = criu.read_image(out / f"pagemap-{C}.img")[1]
    size = os.path.getsize(out / f"pages-{cpm[0].pages_id}.img")
    n.update(cfd0=mix.rec.fdinfo[C][0].fd, cpages=cpm[0].pages_id, pmsize=size,
             pmsize_plus=size + PG, n1=criu.read_image(out / f"pagemap-{R}.img")[1][1].nr_pages,
             root_files=criu.read_image(out / "inventory.img")[1][0].root_ids.files_id)
    name, change, want = CORRUPTIONS[case]
    found = _corrupt(out, tmp_path, name.format(**n), lambda m: change(m, n))
    assert any(want.format(**n) in p for p in found), found
    with pytest.raises(BadImage, match="not restorable"):
        criu.check(tmp_path / "img")


def test_zombie_keeps_only_its_core(zdtm_bin, procs, tmp_path):
    """A real zombie (criu_mix's second child, exited with 7, not reaped) in the tree: its
    core alone is written; the process reaps it afterwards with the same status."""
    run = mix_.start(zdtm_bin, tmp_path / "work", procs, CRIU_MIX_ZOMBIE="1")
    Z = mix_.layout(run).zombie
    assert Z and _procs.state(Z) == "Z"
    out = tmp_path / "img"
    rec = mix_.dump(run.pid, out)
    assert Z in [e.pid for e in rec.pstree] and Z not in rec.mm
    assert [n for n in os.listdir(out) if re.search(rf"\D{Z}\.img$", n)] == [f"core-{Z}.img"]
    tc = criu.read_image(out / f"core-{Z}.img")[1][0].tc
    assert tc.task_state == TASK_STATES["dead"] and tc.exit_code == 7 << 8   # wait status
    assert criu.problems(out) == []
    img = criu.ImageSource(out)
    assert img.pids() == [e.pid for e in rec.pstree] and img.core(Z) == rec.cores[Z]
    if os.path.exists(CRIT):
        assert str(Z) in crit("x", out, "ps").decode()
    assert zdtm.check(run.pid, run.result, proc=run.proc) == "PASS"


def _flip_big_byte(images: Path, lay: mix_.Layout, offset: int) -> None:
    """Change one byte of the big region in the root's pages file."""
    msgs = criu.read_image(images / f"pagemap-{lay.root}.img")[1]
    pos = 0
    for e in msgs[1:]:
        if e.vaddr == lay.big:
            break
        pos += e.nr_pages * PG
    with open(images / f"pages-{msgs[0].pages_id}.img", "r+b") as f:
        f.seek(pos + offset)
        old = f.read(1)
        f.seek(pos + offset)
        f.write(bytes([old[0] ^ 0xff]))


@pytest.mark.parametrize("damage", [None, 0x64001])
def test_images_restore_the_whole_shape(zdtm_bin, procs, tmp_path, damage):
    """The proof that the images are complete: criu_mix (with its zombie, in its own UTS
    namespace) exported, killed, restored by ckptfs from the CRIU images alone (new pids),
    passes its own check: memory, shared map, pipe, file offset, masks, zombie, hostname.
    With one byte of its memory changed in pages-N.img, the restored process says which."""
    from ckptfs.restore import restore
    run = mix_.start(zdtm_bin, tmp_path / "work", procs, CRIU_MIX_ZOMBIE="1",
                     CRIU_MIX_HOSTNAME=HOSTNAME)
    lay = mix_.layout(run)
    rec = mix_.dump(run.pid, tmp_path / "img")
    pids = [e.pid for e in rec.pstree]
    for pid in reversed(pids):
        os.kill(pid, signal.SIGKILL)
    assert run.proc.wait() == -signal.SIGKILL
    assert all(_procs.wait_gone(pid, 5) for pid in pids)
    if damage is not None:
        _flip_big_byte(tmp_path / "img", lay, damage)
    result = restore(str(tmp_path / "img"))
    for pid in result.pids.values():
        procs.adopt(pid)
    assert sorted(result.pids) == sorted(pids) and result.cgroups == []
    want = "PASS" if damage is None else f"FAIL: big region byte {damage & ~7} changed"
    assert zdtm.check(result.root, run.result) == want


def test_export_refuses_running_source(mix, tmp_path):
    from ckptfs.capture.linux import LiveSource
    from ckptfs.errors import NotStopped
    with LiveSource(mix.lay.root) as src:
        assert not src.frozen
        with pytest.raises(NotStopped, match="freeze it first"):
            criu.export(src, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_own_uts_without_namespace_ids(mix, tmp_path):
    """A source without ns ids (a tree, written from the real dump) that says "own uts"
    still gets a UTS namespace."""
    R, C = mix.lay.root, mix.lay.child
    tree.write_tree(criu.ImageSource(mix.out), str(tmp_path / "tree"))
    src = tree.TreeSource(str(tmp_path / "tree"))
    assert not src.ids(R).HasField("uts_ns_id") and src.isolation().own_namespaces == ("uts",)
    criu.export(src, tmp_path / "img")
    img = criu.ImageSource(tmp_path / "img")
    assert img.ids(R).uts_ns_id == img.ids(C).uts_ns_id
    assert img.inventory().root_ids.uts_ns_id != img.ids(R).uts_ns_id
    iso = img.isolation()
    assert (iso.hostname, iso.own_namespaces) == (HOSTNAME, ("uts",))
    assert criu.problems(tmp_path / "img") == []
    assert not src.ids(R).HasField("uts_ns_id")      # the source's messages are untouched


def test_tree_keeps_pdeath_sig(mix, tmp_path):
    tree.write_tree(criu.ImageSource(mix.out), str(tmp_path / "tree"))
    got = tree.TreeSource(str(tmp_path / "tree")).core(mix.lay.child).thread_core
    assert got.pdeath_sig == signal.SIGKILL
