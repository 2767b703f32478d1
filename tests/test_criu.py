"""CRIU image layer: framing, export, ImageSource — checked with CRIU's own crit.

The round trips are the proof: every image we write must survive `crit decode | crit encode`
byte for byte (crit 3.17 drops fields it does not know; those are accounted for explicitly),
crit's explorers must follow the cross-file references, and ImageSource must give back
exactly what the exporting source gave.
"""
import base64
import errno
import glob
import json
import os
import subprocess

import pytest
from google.protobuf import json_format
from hypothesis import given, settings, strategies as st

from ckptfs import criu, pb
from ckptfs.errors import BadImage
from ckptfs.model import PAGE_SIZE, PageRange

from criu_fake import SHMID, FakeSource, pattern
from test_images_schema import _DUMP

CRIT = "/usr/bin/crit"
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
def exported(tmp_path_factory):
    src = FakeSource()
    out = tmp_path_factory.mktemp("images")
    criu.export(src, out)
    return src, out


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


# -- export, checked with crit ------------------------------------------------------------
def test_export_file_set(exported):
    src, out = exported
    names = set(os.listdir(out))
    want = {"inventory.img", "pstree.img", "core-100.img", "core-101.img", "core-102.img",
            "ids-100.img", "ids-101.img", "mm-100.img", "mm-101.img", "fs-100.img",
            "fs-101.img", "files.img", "fdinfo-2.img", "fdinfo-3.img", "pagemap-100.img",
            "pagemap-101.img", "pages-1.img", "pages-2.img", "pipes-data.img", "seccomp.img",
            "utsns-9.img", "pagemap-shmem-777.img", "pages-3.img"}
    assert names == want


def test_export_restore_rules(exported):
    src, out = exported
    inv = criu.read_image(out / "inventory.img")[1][0]
    assert inv.img_version == 2 and inv.fdinfo_per_id and inv.ns_per_id
    task = src.ids(src.ROOT)
    for f in ("vm_id", "files_id", "fs_id", "sighand_id"):
        assert getattr(inv.root_ids, f) not in {getattr(src.ids(p), f) for p in src.pids()}
    assert inv.root_ids.uts_ns_id != task.uts_ns_id                 # own UTS namespace
    assert inv.root_ids.net_ns_id == task.net_ns_id                 # shared with CRIU's
    cores = {t: criu.read_image(out / f"core-{t}.img")[1][0] for t in (100, 101, 102)}
    assert not cores[102].HasField("tc")
    for t in (100, 101):
        tc = cores[t].tc
        assert len(tc.sigactions) == 62 and tc.HasField("timers") and len(tc.rlimits.rlimits) == 16
    assert all(c.thread_core.HasField("creds") for c in cores.values())
    files = {f.id for f in criu.read_image(out / "files.img")[1]}
    assert files == {1, 2, 3, 4, 5, 6}
    assert criu.problems(out) == []


@needs_crit
def test_every_image_decodes_with_crit_same_values(exported, crit_fields, tmp_path):
    _, out = exported
    for path, (doc, _) in crit_round_trips(pb_images(out), tmp_path).items():
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
def test_crit_cli(exported, tmp_path):
    """The crit command line itself: decode | encode, byte for byte."""
    _, out = exported
    for name in ("pstree.img", "core-100.img", "files.img"):
        again = tmp_path / name
        crit("encode", "-o", again, data=crit("decode", "-i", out / name))
        assert again.read_bytes() == (out / name).read_bytes(), name


def _from_crit_json(cls, entry):
    """crit's JSON as our message; crit 3.17 calls pagemap field 2 by its old name."""
    if cls.DESCRIPTOR.name == "pagemap_entry" and "nr_pages" in entry:
        entry = {**entry, "compat_nr_pages": entry["nr_pages"]}
        del entry["nr_pages"]
    return json_format.ParseDict(entry, cls())


@needs_crit
def test_crit_round_trip_byte_identical(exported, crit_fields, tmp_path):
    """decode | encode (raw and --pretty) reproduces every image; only fields crit 3.17 does
    not know differ, and those are exactly pagemap_entry.nr_pages (field 5, CRIU 4.2)."""
    _, out = exported
    images = pb_images(out)
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
    assert differ == {"pagemap-100.img": {"nr_pages"}, "pagemap-101.img": {"nr_pages"},
                      "pagemap-shmem-777.img": {"nr_pages"}}


@needs_crit
def test_crit_explorers(exported):
    src, out = exported
    ps = crit("x", out, "ps").decode()
    assert "100" in ps and "101" in ps and "victim" in ps and "child" in ps
    fds = crit("x", out, "fds").decode()
    assert "1: /tmp/ckpt.log" in fds and "4: pipe[5555]" in fds and "cwd: /" in fds
    mems = crit("x", out, "mems").decode()
    assert "7f0000000000" in mems and "/usr/bin/true" in mems
    rss = crit("x", out, "rss").decode()
    assert "7f0000000000 / 768" in rss and "401000 / 1" in rss


def test_pages_size_matches_pagemap(exported):
    src, out = exported
    total = 0
    for name in glob.glob(os.path.join(out, "pagemap-*.img")):
        _, msgs, _ = criu.read_image(name)
        head, entries = msgs[0], msgs[1:]
        assert all(e.flags == criu.PE_PRESENT and e.nr_pages == e.compat_nr_pages > 0
                   for e in entries)
        want = sum(e.nr_pages for e in entries) * PAGE_SIZE
        assert os.path.getsize(out / f"pages-{head.pages_id}.img") == want
        total += want
    # every saved page once; the shared object's pages 2-3 are saved by both tasks
    assert total == (sum(r.nr_pages for pid in src.pids() for v in src.mm(pid).vmas
                         for r in src.page_ranges(pid, v)) - 2) * PAGE_SIZE


def test_shared_memory_goes_to_shmem_pagemap(exported):
    src, out = exported
    _, msgs, _ = criu.read_image(out / "pagemap-shmem-777.img")
    assert [(e.vaddr, e.nr_pages) for e in msgs[1:]] == [(0, 4), (0x4000, 2)]
    private = criu.read_image(out / "pagemap-101.img")[1][1:]
    assert all(not src.SHARED_AT[101] <= e.vaddr < src.SHARED_AT[101] + 0x10000 for e in private)


def test_memory_streams_in_chunks(exported):
    src, _ = exported
    from ckptfs.criu.memory import COPY_CHUNK
    assert 0 < src.max_read <= COPY_CHUNK


# -- ImageSource --------------------------------------------------------------------------
def test_image_source_round_trip(exported):
    src, out = exported
    img = criu.ImageSource(out)
    assert img.pstree() == src.pstree()
    for pid, threads in src.tasks():
        for tid in threads:
            assert img.core(tid) == src.core(tid)
        assert img.ids(pid) == src.ids(pid)
        assert img.mm(pid) == src.mm(pid)
        assert img.fs(pid) == src.fs(pid)
        assert img.fdinfo(pid) == src.fdinfo(pid)
        for fd in src.fdinfo(pid):
            assert img.file(fd.id) == src.file(fd.id)
        for v in src.mm(pid).vmas:
            if v.shmid == SHMID:    # the object's pages saved by any task, as one run
                base = src.SHARED_AT[pid]
                assert img.page_ranges(pid, v) == [PageRange(base, base + 0x6000)]
            else:
                assert img.page_ranges(pid, v) == src.page_ranges(pid, v)
            for r in img.page_ranges(pid, v):
                assert img.read_memory(pid, r.start, r.end - r.start) == \
                    src.read_memory(pid, r.start, r.end - r.start)
    assert img.pipe_data(src.PIPE_ID) == b"hello pipe" and img.pipe_data(1) == b""
    iso = img.isolation()
    assert (iso.hostname, iso.domainname, iso.own_namespaces) == ("ckpt-test", "(none)", ("uts",))
    assert img.meta().arch == "x86_64" and img.meta().hostname == "ckpt-test"
    img.close()


def test_image_source_memory_edges(exported):
    src, out = exported
    with criu.ImageSource(out) as img:
        # straddles saved (0x600000-0x610000) and unsaved heap: zeros past the saved range
        got = img.read_memory(100, 0x60f000 + 100, 8192)
        assert got[:PAGE_SIZE - 100] == pattern((0x60f000 + 100) ^ (100 << 40), PAGE_SIZE - 100)
        assert got[PAGE_SIZE - 100:] == bytes(4196)
        # a big read spanning the 3 MiB range in one call
        assert img.read_memory(100, src.BIG + 5, 2 << 20) == src.read_memory(100, src.BIG + 5, 2 << 20)


def test_image_source_missing_optional_and_required(exported, tmp_path):
    _, out = exported
    for name in os.listdir(out):
        if name not in ("pipes-data.img", "fdinfo-3.img", "utsns-9.img"):
            os.link(out / name, tmp_path / name)
    img = criu.ImageSource(tmp_path)
    assert img.fdinfo(101) == [] and img.pipe_data(FakeSource.PIPE_ID) == b""
    assert img.isolation().hostname is None
    os.unlink(tmp_path / "mm-101.img")
    with pytest.raises(BadImage, match="mm-101.img"):
        img.mm(101)
    with pytest.raises(BadImage, match="no file entry with id 77"):
        img.file(77)


def test_image_source_old_pagemap_and_parent(tmp_path):
    """Pre-4.2 pagemaps (count in field 2 only, in_parent) and PE_PARENT pages."""
    parent, child = tmp_path / "p", tmp_path / "c"
    criu.export(FakeSource(), parent)
    criu.export(FakeSource(), child)
    _, msgs, _ = criu.read_image(child / "pagemap-101.img")
    e = msgs[1]
    e.ClearField("nr_pages")
    e.ClearField("flags")
    e.in_parent = True
    criu.write_image(child / "pagemap-101.img", "PAGEMAP", msgs)
    os.truncate(child / "pages-2.img", 0)
    os.symlink("../p", child / "parent")
    for name in os.listdir(parent):      # the parent as a pre-dump leaves it: memory only
        if not name.startswith(("pagemap-", "pages-", "inventory")):
            os.unlink(parent / name)
    img = criu.ImageSource(child)
    assert img.read_memory(101, e.vaddr, 2 * PAGE_SIZE) == \
        FakeSource().read_memory(101, e.vaddr, 2 * PAGE_SIZE)
    img.close()
    # a PE_PARENT range the parent does not hold is an error, not zeros
    _, pmsgs, _ = criu.read_image(parent / "pagemap-101.img")
    criu.write_image(parent / "pagemap-101.img", "PAGEMAP", pmsgs[:1])
    with pytest.raises(BadImage, match="no saved pages at"):
        criu.ImageSource(child).read_memory(101, e.vaddr, PAGE_SIZE)


def test_image_source_cgroup_path_and_limits(exported, tmp_path):
    """cgroup.img as CRIU writes it on a v1 host: the root task's set, v1 properties."""
    _, out = exported
    for name in os.listdir(out):
        os.link(out / name, tmp_path / name)
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
    d = cpu.dirs.add(dir_name="ckptfs/t1")
    d.properties.add(name="cpu.cfs_quota_us", value="50000")
    d.properties.add(name="cpu.cfs_period_us", value="100000")
    criu.write_image(tmp_path / "cgroup.img", "CGROUP", [cg])
    kind, msgs, extras = criu.read_image(tmp_path / "core-100.img")
    msgs[0].thread_core.cg_set = 2
    criu.write_image(tmp_path / "core-100.img", kind, msgs)
    iso = criu.ImageSource(tmp_path).isolation()
    assert iso.cgroup == "/ckptfs/t1"
    assert iso.limits == {"memory.max": "268435456", "memory.swap.max": "max",
                          "cpu.max": "50000 100000"}
    msgs[0].thread_core.cg_set = 3
    criu.write_image(tmp_path / "core-100.img", kind, msgs)
    with pytest.raises(BadImage, match="cgroup set 3"):
        criu.ImageSource(tmp_path).isolation()


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


def test_export_fills_neutral_task_state(tmp_path):
    """A source without timers or sigactions (unarmed, all default) still exports a core
    CRIU restores; one without rlimits or creds is refused, naming the core file."""
    src = FakeSource()
    src._cores[100].tc.ClearField("timers")
    del src._cores[100].tc.sigactions[:]
    criu.export(src, tmp_path / "a")
    tc = criu.read_image(tmp_path / "a" / "core-100.img")[1][0].tc
    assert tc.timers.real.vsec == 0 and len(tc.sigactions) == 62
    assert all(sa.sigaction == 0 for sa in tc.sigactions)
    src._cores[100].tc.ClearField("rlimits")
    with pytest.raises(BadImage, match="core-100.img.*rlimits"):
        criu.export(src, tmp_path / "b")
    src = FakeSource()
    src._cores[102].thread_core.ClearField("creds")
    with pytest.raises(BadImage, match="core-102.img.*creds"):
        criu.export(src, tmp_path / "c")


def test_export_sorts_vmas_and_wants_shmid(tmp_path):
    src = FakeSource()
    vmas = list(src._mm[101].vmas)
    del src._mm[101].vmas[:]
    src._mm[101].vmas.extend(reversed(vmas))
    criu.export(src, tmp_path / "a")
    got = criu.read_image(tmp_path / "a" / "mm-101.img")[1][0].vmas
    assert [v.start for v in got] == sorted(v.start for v in vmas)
    src._mm[101].vmas[1].shmid = 0           # the shared map (second highest), now second
    with pytest.raises(BadImage, match="mm-101.img.*no shmid"):
        criu.export(src, tmp_path / "b")


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


def test_chunked_ghost(exported, tmp_path):
    _, out = exported
    for name in os.listdir(out):
        os.link(out / name, tmp_path / name)
    criu.write_image(tmp_path / "remap-fpath.img", "REMAP_FPATH",
                     [pb.remap_file_path_entry(orig_id=5, remap_id=3 | 1 << 31,
                                               remap_type=pb.GHOST)])
    head = pb.ghost_file_entry(uid=0, gid=0, mode=0o100644, chunks=True, size=12)
    criu.write_image(tmp_path / "ghost-file-3.img", "GHOST_FILE",
                     [head, pb.ghost_chunk_entry(len=2, off=1), pb.ghost_chunk_entry(len=3, off=9)],
                     [None, b"ab", b"xyz"])
    img = criu.ImageSource(tmp_path)
    assert img.file_contents(5) == b"\0ab\0\0\0\0\0\0xyz" and not img.file_deleted(6)


def test_export_refuses_directory_with_images(exported):
    from ckptfs.errors import CkptError
    _, out = exported
    with pytest.raises(CkptError, match="already holds CRIU images") as e:
        criu.export(FakeSource(), out)
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
    for n in os.listdir(out):
        if n != name:
            os.link(out / n, tmp_path / n)
    kind, msgs, extras = criu.read_image(out / name)
    change(msgs)
    criu.write_image(tmp_path / name, kind, msgs, extras)
    return criu.problems(tmp_path)


@pytest.mark.parametrize("name,change,want", [
    ("core-102.img", lambda m: m[0].thread_core.ClearField("creds"), "core-102.img: no thread_core.creds"),
    ("core-100.img", lambda m: m[0].tc.sigactions.pop(), "core-100.img: 61 sigactions, want 62"),
    ("core-101.img", lambda m: setattr(m[0].thread_core, "cg_set", 5), "cg_set 5"),
    ("ids-100.img", lambda m: setattr(m[0], "files_id", 1), "files_id 1 equals root_ids.files_id"),
    ("ids-100.img", lambda m: setattr(m[0], "net_ns_id", 42), "own net namespace 42"),
    ("fdinfo-3.img", lambda m: setattr(m[0], "id", 99), "no entry 99 for task 101 fd 0"),
    ("pagemap-101.img", lambda m: setattr(m[1], "nr_pages", 3), "pages-2.img: 8192 bytes, pagemap wants 12288"),
    ("pagemap-100.img", lambda m: setattr(m[1], "vaddr", 0x1000), "entry 0x1000+1 pages is outside every VMA"),
    ("mm-101.img", lambda m: m[0].vmas.reverse(), "mm-101.img: VMAs not in ascending order"),
])
def test_check_finds_what_restore_refuses(exported, tmp_path, name, change, want):
    _, out = exported
    found = _corrupt(out, tmp_path, name, change)
    assert any(want in p for p in found), found
    with pytest.raises(BadImage, match="not restorable"):
        criu.check(tmp_path)


def test_zombie_keeps_only_its_core(tmp_path):
    src = FakeSource()
    src._pstree.append(pb.pstree_entry(pid=103, ppid=100, pgid=100, sid=100, threads=[103]))
    zombie = pb.core_entry(mtype=pb.core_entry.X86_64)
    zombie.tc.CopyFrom(src.core(101).tc)
    zombie.tc.task_state, zombie.tc.exit_code = 2, 7
    src._cores[103] = zombie       # src.ids/mm/fs(103) would raise KeyError: must not be asked
    criu.export(src, tmp_path)
    assert [n for n in os.listdir(tmp_path) if "103" in n] == ["core-103.img"]
    assert criu.read_image(tmp_path / "core-103.img")[1][0].tc.exit_code == 7
    assert criu.problems(tmp_path) == []
    if os.path.exists(CRIT):
        assert "103" in crit("x", tmp_path, "ps").decode()


def test_export_refuses_running_source(tmp_path):
    from ckptfs.errors import NotStopped
    src = FakeSource()
    src.frozen = False
    with pytest.raises(NotStopped, match="freeze it first"):
        criu.export(src, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_own_uts_without_namespace_ids(tmp_path):
    """A source without ns ids (a tree) that says "own uts" still gets a UTS namespace."""
    src = FakeSource()
    for ids in src._ids.values():
        for f in [d.name for d, _ in ids.ListFields() if d.name.endswith("_ns_id")]:
            ids.ClearField(f)
    criu.export(src, tmp_path)
    img = criu.ImageSource(tmp_path)
    assert img.ids(100).uts_ns_id == img.ids(101).uts_ns_id
    assert img.inventory().root_ids.uts_ns_id != img.ids(100).uts_ns_id
    iso = img.isolation()
    assert (iso.hostname, iso.own_namespaces) == ("ckpt-test", ("uts",))
    assert criu.problems(tmp_path) == []
    assert not src._ids[100].HasField("uts_ns_id")      # the source's messages are untouched
