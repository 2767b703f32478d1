"""The FreeBSD capture of a multi-threaded Linux process, through the strict fake FreeBSD
kernel: the real `threads` ZDTM program (4 threads, a mask each, run under another uid with
supplementary groups) is dumped on Linux, restored into the fake, captured back from it
(PT_GETLWPLIST, per-lwp registers/bases/masks, kinfo_proc credentials and ki_comm) and
rendered as a tree. The creds, comm and per-thread files must read as the Linux capture's."""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from ckptfs import tree
from ckptfs.capture import freebsd as CF
from ckptfs.oskit import freebsd as O
from ckptfs.restore import freebsd as RF
from ckptfs.errors import Unsupported
from fbsd_fake import Desc, FakeFreeBSD, Pipe, spawn
from helpers import zdtm
from helpers.cli import dump

GROUPS = [27, 100, 4400]
CREDS = ("uid", "gid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid", "groups")


@pytest.fixture
def captured(zdtm_bin, procs, tmp_path, request):
    """(Linux tree dir, its pid, FreeBSD-captured tree dir, the fake pid, kit)."""
    work = Path(tempfile.mkdtemp(prefix="ckptfs-fbsd-"))   # reachable by another uid
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    os.chmod(work, 0o777)
    # same uid/gid as us: Linux's prlimit() of another uid's process needs CAP_SYS_RESOURCE
    as_user = functools.partial(procs.spawn, extra_groups=GROUPS)
    run = zdtm.start(zdtm_bin, "threads", work, as_user)
    src = dump(run.pid, tmp_path / "linux")
    kit = FakeFreeBSD()
    old = RF.spawn_helper
    RF.spawn_helper = spawn(kit)
    try:
        [new] = RF.restore(src, RF.Target(kit=kit))
    finally:
        RF.spawn_helper = old
    kit.attach(new)                         # a capture attaches to the running process
    tree.write_tree(CF.FreeBSDSource(new, kit), str(tmp_path / "freebsd"))
    return tmp_path / "linux", run.pid, tmp_path / "freebsd", new, kit


def read(path):
    return open(path, "rb").read()


def thread_dirs(root, pid):
    names = os.listdir(root / f"tasks/{pid}/threads")
    return [root / f"tasks/{pid}/threads/{t}" for t in sorted(names, key=lambda t: (int(t) != pid,
                                                                                     int(t)))]


def test_creds_and_comm_read_as_the_linux_capture(captured):
    lin, old, fb, new, _ = captured
    for name in CREDS:
        assert read(fb / f"tasks/{new}/creds/{name}") == read(lin / f"tasks/{old}/creds/{name}"), name
    assert read(lin / f"tasks/{old}/creds/groups").split() == [b"27", b"100", b"4400"]
    assert read(fb / f"tasks/{new}/comm") == read(lin / f"tasks/{old}/comm") == b"threads\n"


def test_kinfo_proc_ids_map_to_linux_creds():
    """Distinct ids everywhere: kinfo_proc's effective uid is ki_uid, the real ki_ruid, the
    saved ki_svuid; the effective gid is ki_groups[0] and the rest are the supplementary
    groups; Linux's fs ids follow the effective ones; no capabilities (the Linuxulator's)."""
    kit = FakeFreeBSD()
    p = kit.new_helper()
    kit.attach(p.pid)
    p.creds = dict(uid=1000, ruid=1001, svuid=1002, rgid=2001, svgid=2002, groups=(2000, 27, 5))
    c = CF.FreeBSDSource(p.pid, kit).creds()
    assert (c.uid, c.euid, c.suid, c.fsuid) == (1001, 1000, 1002, 1000)
    assert (c.gid, c.egid, c.sgid, c.fsgid) == (2001, 2000, 2002, 2000)
    assert list(c.groups) == [27, 5] and list(c.cap_eff) == [0, 0]


def test_every_thread_with_its_own_mask_registers_and_base(captured):
    lin, old, fb, new, kit = captured
    a, b = thread_dirs(lin, old), thread_dirs(fb, new)
    assert len(a) == len(b) == 4
    assert b[0].name == str(new) and all(int(t.name) >= 100100 for t in b[1:])   # lwp ids
    masks = [read(t / "sigmask") for t in a]
    assert len(set(masks)) == 4                          # each worker blocks its own signal
    assert [read(t / "sigmask") for t in b] == masks
    for x, y in zip(a, b):
        for reg in ("rsp", "rbx", "r12", "fs_base"):
            assert read(y / f"regs/{reg}") == read(x / f"regs/{reg}"), (y, reg)
        assert read(y / "fpu")[:464] == read(x / "fpu")[:464]   # 464: XCR0 of each CPU
        assert read(y / "comm") == b"threads\n"
    # FreeBSD ptrace was asked per lwp, never per pid for a non-main thread
    assert kit.lwps(new) == [new] + [int(t.name) for t in b[1:]]


def test_kinfo_proc_layout_round_trips_through_the_record():
    """The offsets the capture reads (sys/sys/user.h, amd64): a record packed at them parses
    back, and one of another size is refused."""
    rec = O.KinfoProc(77, 1, 77, 70, 1000, 1001, 1002, 1003, 1004, tuple(range(5, 21)), 3,
                      "a-long-command-nm", "t", "Linux ELF64", 9, 4, True)
    raw = O.pack_kinfo_proc(rec)
    assert len(raw) == 1088 and raw[447:447 + 17] == b"a-long-command-nm"
    assert O.parse_kinfo_proc(raw) == rec and O.parse_jid(raw) == 9
    with pytest.raises(Exception) as e:
        O.parse_kinfo_proc(raw[:1000])
    assert "1088" in str(e.value)


def pipe_process(both_ends):
    """A fake process holding a pipe's read end (fd 5) with 10 bytes queued, and its
    (blocking) write end as fd 6 if `both_ends`."""
    kit = FakeFreeBSD()
    p = kit.new_helper()
    kit.attach(p.pid)
    pipe = kit.pipes[0] = Pipe(0)
    pipe.buf += b"0123456789"
    pipe.readers = pipe.writers = 1
    kit._install(p, Desc("pipe", "pipe:0:r", 0, pipe=pipe, reads=True), fd=5)
    if both_ends:
        kit._install(p, Desc("pipe", "pipe:0:w", 1, pipe=pipe, writes=True), fd=6)
    src = CF.FreeBSDSource(p.pid, kit)
    info = {i.fd: i for i in src.fdinfo(p.pid)}
    return kit, p, src, src.file(info[5].id).pipe.pipe_id


def test_pipe_data_is_read_and_put_back():
    """No tee(2) on FreeBSD: read out and written back, the pipe holds what it held and the
    write end is blocking again; both ends carry one pipe id."""
    kit, p, src, pipe_id = pipe_process(both_ends=True)
    info = {i.fd: i for i in src.fdinfo(p.pid)}
    assert src.file(info[6].id).pipe.pipe_id == pipe_id and info[5].id != info[6].id
    assert src.pipe_data(pipe_id) == b"0123456789"
    assert bytes(kit.pipes[0].buf) == b"0123456789"
    assert not p.fds[6].flags & 0o4000
    assert [e for e in kit.log if e[:3] == ("linux", p.pid, "setfl")] == \
        [("linux", p.pid, "setfl", "pipe:0:w", 1 | 0o4000), ("linux", p.pid, "setfl", "pipe:0:w", 1)]


def test_pipe_data_without_the_write_end_is_refused_naming_the_file():
    kit, p, src, pipe_id = pipe_process(both_ends=False)
    with pytest.raises(Unsupported) as e:
        src.pipe_data(pipe_id)
    assert f"tasks/{p.pid}/fds/5/data" in str(e.value) and "10 bytes" in str(e.value)
    assert bytes(kit.pipes[0].buf) == b"0123456789"          # nothing was read
