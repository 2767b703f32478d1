"""Descriptors of a FreeBSD restore: FIFOs, eventfds, deleted files and queued pipe data of
real ZDTM programs, dumped on Linux and restored through the strict fake FreeBSD kernel
(tests/fbsd_fake.py: open file descriptions shared by dup and fork, FreeBSD pipe buffer
rules, FIFO open rules, a jail filesystem over this one). What the fake ends up holding must
be what the program had."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import time

import pytest

from ckptfs import flags as L, tree
from ckptfs.errors import KernelError, Unsupported
from ckptfs.capture import freebsd as CF
from ckptfs.restore import freebsd as RF
from ckptfs.translate.freebsd import plan_dry_run, read_plan, to_freebsd
from fbsd_fake import FakeFreeBSD, spawn
from helpers import zdtm
from helpers.cli import dump

NONBLOCK = L.OPEN_FLAGS["O_NONBLOCK"]


def pattern(n: int, seed: int, start: int = 0) -> bytes:
    return bytes(((start + i) * 131 + seed) % 251 for i in range(n))


@pytest.fixture
def program(zdtm_bin, procs, tmp_path):
    """Start a ZDTM program and dump it: (old pid, TreeSource, its work dir)."""
    def run(name):
        r = zdtm.start(zdtm_bin, name, tmp_path / "work", procs.spawn)
        return r.pid, dump(r.pid, tmp_path / "tree"), r.workdir
    return run


def restore(src, kit=None):
    kit = kit or FakeFreeBSD()
    old = RF.spawn_helper
    RF.spawn_helper = spawn(kit)
    try:
        pids = RF.restore(src, RF.Target(kit=kit))
    finally:
        RF.spawn_helper = old
    return kit, pids


def fds_of(kit, pid, kind):
    return {fd: d for fd, d in kit.procs[pid].fds.items() if d.kind == kind}


def test_pipe_data_is_queued_again(program):
    old, src, _ = program("pipe_data")
    kit, [new] = restore(src)
    pipes = fds_of(kit, new, "pipe")
    assert sorted(pipes) == [10, 11]
    assert pipes[10].pipe is pipes[11].pipe
    assert bytes(pipes[10].pipe.buf) == pattern(1000, 7)
    assert bytes(pipes[10].pipe.buf) == src.pipe_data(src.file(
        next(i for i in src.fdinfo(old) if i.fd == 10).id).pipe.pipe_id)
    assert not pipes[10].flags & NONBLOCK and not pipes[11].flags & NONBLOCK


def test_fifo_reopened_with_its_bytes(program):
    old, src, work = program("fifo")
    kit, [new] = restore(src)
    fifo = str(work / "zdtm.fifo")
    ends = {fd: d for fd, d in kit.procs[new].fds.items() if d.kind == "fifo"}
    assert {d.path for d in ends.values()} == {fifo}
    modes = sorted(d.flags & 3 for d in ends.values())
    assert modes == [0, 1]
    reader = next(d for d in ends.values() if d.flags & 3 == 0)
    assert reader.flags & NONBLOCK                       # it was opened O_RDONLY|O_NONBLOCK
    assert bytes(reader.pipe.buf) == pattern(777, 19)
    # the O_RDWR holder is gone again: one reader and one writer, as in the program
    assert (reader.pipe.readers, reader.pipe.writers) == (1, 1)


def test_fifo_missing_in_the_jail_is_made(program):
    old, src, work = program("fifo")
    kit = FakeFreeBSD()
    fifo = str(work / "zdtm.fifo")
    kit.gone.add(fifo)                                   # the jail has no such FIFO yet
    kit, [new] = restore(src, kit)
    made = [e for e in kit.log if e[:3] == ("linux", new, "mknod")]
    assert made == [("linux", new, "mknod", fifo, stat.S_IFIFO | 0o600)]
    assert bytes(kit.fs[fifo].pipe.buf) == pattern(777, 19)


def test_eventfds_counter_and_semaphore(program):
    old, src, _ = program("eventfd")
    kit, [new] = restore(src)
    efds = sorted(fds_of(kit, new, "eventfd").values(), key=lambda d: d.count)
    assert [(d.count, d.semaphore) for d in efds] == [(3, True), (12345, False)]
    assert all(d.flags & NONBLOCK for d in efds)


def test_deleted_file_recreated_opened_and_unlinked(program):
    old, src, work = program("unlinked_file")
    kit, [new] = restore(src)
    name = str(work / "unlinked.dat")
    [desc] = [d for d in kit.procs[new].fds.values() if d.kind == "vnode" and d.path == name]
    assert desc.flags & 3 == 2 and desc.pos == 5000
    assert bytes(desc.node.data) == pattern(10000, 17)
    assert bytes(desc.node.data) == src.file_contents(
        next(i for i in src.fdinfo(old) if i.fd == desc_fd(kit, new, desc)).id)
    assert desc.node.mode == 0o600
    assert name in kit.gone and name not in kit.fs       # unlinked again
    assert ("linux", new, "unlink", name) in kit.log


def desc_fd(kit, pid, desc):
    return next(fd for fd, d in kit.procs[pid].fds.items() if d is desc)


def test_deleted_file_name_taken_uses_a_hidden_name(program):
    """The old name exists again in the jail: the contents go to a hidden name beside it."""
    old, src, work = program("unlinked_file")
    name = str(work / "unlinked.dat")
    with open(name, "w") as f:
        f.write("someone else's file\n")
    kit, [new] = restore(src)
    [desc] = [d for d in kit.procs[new].fds.values() if d.kind == "vnode"
              and os.path.dirname(d.path) == str(work) and "ckptfs-ghost" in d.path]
    assert len(desc.node.data) == 10000 and desc.path in kit.gone
    assert name not in kit.gone                          # the other file is left alone


BIG = r"""
import fcntl, os, sys, time
r, w = os.pipe()
fcntl.fcntl(w, 1031, 1 << 20)              # F_SETPIPE_SZ
os.write(w, bytes(i % 251 for i in range(int(sys.argv[1]))))
os.dup2(r, 20); os.dup2(w, 21); os.close(r); os.close(w)
print("ready", flush=True); time.sleep(1000)
"""


def big_pipe(procs, tmp_path, n):
    p = procs.spawn([sys.executable, "-S", "-c", BIG, str(n)])
    end = time.time() + 10
    while "ready" not in p.stdout_text():
        assert time.time() < end, p.stderr_text()
        time.sleep(0.02)
    return p.pid, dump(p.pid, tmp_path / "tree")


def test_pipe_larger_than_pipe_size_goes_in_one_write(procs, tmp_path):
    """40000 bytes: more than PIPE_SIZE, so one write through a scratch map (unmapped
    afterwards) lets the FreeBSD pipe grow to BIG_PIPE_SIZE; 4 KiB pieces would stop at
    16 KiB."""
    old, src = big_pipe(procs, tmp_path, 40000)
    kit, [new] = restore(src)
    pipe = kit.procs[new].fds[20].pipe
    assert bytes(pipe.buf) == bytes(i % 251 for i in range(40000))
    maps = [e for e in kit.log if e[:3] == ("linux", new, "mmap")
            and 0x200000000 <= e[3] < 0x300000000]
    assert len(maps) == 1
    assert ("linux", new, "munmap", maps[0][3], maps[0][4]) in kit.log


def test_pipe_beyond_big_pipe_size_is_refused_naming_the_file(procs, tmp_path):
    old, src = big_pipe(procs, tmp_path, 100000)
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(src, kit)
    assert f"tasks/{old}/fds/20/data" in str(e.value) and "100000" in str(e.value)
    assert kit.killed and not kit.jails


def test_memory_shared_between_processes_is_one_object(program):
    """shared_anon: a MAP_SHARED anonymous map shared with a forked child. The root maps it
    before it forks, so both processes hold one object (MAP_INHERIT_SHARE): the saved pages
    are there, and a write through one process shows in the other."""
    old, src, _ = program("shared_anon")
    kit, pids = restore(src)
    shared = [(pid, v) for pid in src.pids() for v in src.mm(pid).vmas
              if v.status & L.VMA_STATUS["VMA_ANON_SHARED"]]
    assert len({v.shmid for _, v in shared}) == 1 and len(shared) == 2
    (pid, vma), new = shared[0], dict(zip(src.pids(), pids))
    want = src.read_memory(pid, vma.start, vma.end - vma.start)
    assert all(kit._contents(kit.procs[n], vma.start, vma.end - vma.start) == want
               for n in pids)
    maps = [m for n in pids for m in kit.procs[n].maps if m.start == vma.start]
    assert len(maps) == 2 and maps[0].obj is maps[1].obj is not None
    mmaps = [e for e in kit.log if e[:3] == ("linux", new[old], "mmap") and e[3] == vma.start]
    assert len(mmaps) == 1 and mmaps[0][5] & 1             # once, MAP_SHARED, in the root
    assert not any(e[:3] == ("linux", new[src.pids()[1]], "mmap") and e[3] == vma.start
                   for e in kit.log)                     # the child inherits it


def test_shared_memory_at_two_places_is_refused_naming_the_map(program, tmp_path):
    """The child's copy of the shared map moved elsewhere (an edited tree: mremap could do
    it): inheritance cannot place it, so it is refused before anything exists."""
    old, src, _ = program("shared_anon")
    child = src.pids()[1]
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    maps = edited / f"tasks/{child}/maps"
    [name] = [n for n in os.listdir(maps) if (maps / n / "status").read_text().count("SHARED")
              and (maps / n / "shmid").exists()]
    lo, hi = (int(x, 16) for x in name.split("-"))
    moved = f"{0x100000000000:x}-{0x100000000000 + hi - lo:x}"
    os.rename(maps / name, maps / moved)
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(tree.TreeSource(str(edited)), kit)
    assert f"tasks/{child}/maps/{moved}/shmid" in str(e.value)
    assert f"process {old}" in str(e.value)
    assert kit.log == []


# -- the kinds the Linuxulator makes (translate/freebsd/fdkinds.py) ----------------------------
def test_unix_pairs_with_queues_in_both_directions(program):
    """sk_unix_pair: each pair is one socketpair there; every end holds exactly the messages
    queued on it (boundaries kept), sent from its peer after the buffers were raised to hold
    them; the seqpacket end that shut its writing side is shut again."""
    old, src, _ = program("sk_unix_pair")
    kit, [new] = restore(src)
    socks = {fd: d.sock for fd, d in fds_of(kit, new, "socket").items()}
    assert sorted(socks) == [10, 11, 12, 13, 14, 15]
    for a, b in ((10, 11), (12, 13), (14, 15)):
        assert socks[a]["peer"] is socks[b] and socks[b]["peer"] is socks[a]
    by_fd = {i.fd: i.id for i in src.fdinfo(old)}
    for fd, sock in socks.items():
        want = src.socket_queue(by_fd[fd])
        assert sock["rq"] == [bytes(m) for m in want], fd
    assert [len(m) for m in socks[12]["rq"]] == [1, 700, 5000]
    assert socks[15]["shut"] == 2 and socks[14]["shut"] == 1      # by 15's SHUT_WR only
    assert [e[4] for e in kit.log if e[:3] == ("linux", new, "shutdown")] == [1]    # SHUT_WR
    # the 5000-byte datagram is more than maxdgram (2048): the sender's buffer was raised
    assert socks[13]["snd"] == 5701 and socks[12]["rcv"] == 16384
    assert not any(d.flags & NONBLOCK for d in fds_of(kit, new, "socket").values())


def test_unix_queue_bigger_than_the_default_buffer(program, tmp_path):
    """20000 bytes waiting on a stream end: more than PIPSIZ, so the buffers are raised
    first (SO_SNDBUF/SO_RCVBUF) and the whole queue goes in; a host whose sb_max is lower
    fails with ENOBUFS naming the queue, and nothing is left behind."""
    old, src, _ = program("sk_unix_pair")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    (edited / f"tasks/{old}/fds/10/queue/0").write_bytes(pattern(20000, 3))
    src = tree.TreeSource(str(edited))
    kit, [new] = restore(src)
    sock = kit.procs[new].fds[10].sock
    assert sock["rq"] == [pattern(20000, 3)] and sock["rcv"] == 20000
    kit = FakeFreeBSD()
    kit.SB_MAX = 16384                                   # kern.ipc.maxsockbuf lower than that
    with pytest.raises(KernelError) as e:
        restore(src, kit)
    assert e.value.errno == errno.ENOBUFS
    assert f"tasks/{old}/fds/10/queue" in str(e.value)
    assert kit.killed and not kit.jails


def test_epoll_watches_under_the_tasks_numbers(program):
    """epoll: a kqueue there with the three watches keyed on the task's own numbers (21, 23,
    24), their events and cookies, each on the description now at that number; made after
    every other descriptor is in place (closing a number drops its kevents)."""
    old, src, _ = program("epoll")
    kit, [new] = restore(src)
    p = kit.procs[new]
    ep = p.fds[20]
    assert ep.kind == "kqueue"
    got = {fd: (ev, data) for fd, (ev, data, _) in ep.watches.items()}
    # EPOLLERR|EPOLLHUP (0x18) as Linux's fdinfo shows them (always reported there)
    assert got == {21: (0x19, 0x1111222233334444), 23: (0x19 | 1 << 31, 0xabcdef),
                   24: (0x19, 0x55)}
    assert all(ep.watches[fd][2] is p.fds[fd] for fd in got)
    assert p.fds[21].pipe is p.fds[22].pipe and bytes(p.fds[24].pipe.buf) == b"abc"


def test_epoll_event_outside_the_linuxulator_is_refused_naming_the_target(program, tmp_path):
    old, src, _ = program("epoll")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    (edited / f"tasks/{old}/fds/20/targets/21/events").write_text("EPOLLIN|EPOLLWAKEUP\n")
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(tree.TreeSource(str(edited)), kit)
    assert f"tasks/{old}/fds/20/targets/21/events" in str(e.value)
    assert "LINUX_EPOLL_EVSUP" in str(e.value) and kit.log == []


def test_timerfds_armed_with_time_left(program):
    """timerfd: the periodic, the expired one-shot, the absolute one (its deadline the
    FreeBSD clock's now + what was left) and the disarmed non-blocking one."""
    old, src, _ = program("timerfd")
    kit, [new] = restore(src)
    t = {fd: d.timer for fd, d in fds_of(kit, new, "timerfd").items()}
    assert sorted(t) == [40, 41, 42, 43]
    assert t[40]["clock"] == 1 and t[40]["interval"] == (0, 50_000_000)
    assert 0 < t[40]["value"][1] <= 50_000_000 and t[40]["value"][0] == 0
    # the spent one-shot with its expiration unread: armed 1 ns ahead, so it holds one again
    assert t[41]["interval"] == (0, 0) and t[41]["value"] == (0, 1)
    assert t[42]["clock"] == 0 and t[42]["flags"] == RF.TFD_TIMER_ABSTIME
    now = kit.CLOCK_NOW[0][0]
    assert now + 990 < t[42]["value"][0] <= now + 1001
    assert t[43]["value"] == (0, 0) and kit.procs[new].fds[43].flags & NONBLOCK
    lossy = {r.path for r in to_freebsd(src).lossy}
    assert f"tasks/{old}/fds/41/ticks" not in lossy           # one unread: kept exactly


def test_timerfd_on_boottime_is_refused_in_plan_and_restore(program, tmp_path):
    old, src, _ = program("timerfd")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    (edited / f"tasks/{old}/fds/40/clock").write_text("CLOCK_BOOTTIME\n")
    src = tree.TreeSource(str(edited))
    out = plan_dry_run(src, str(tmp_path / "dry"))
    lines = (tmp_path / "dry/plan/refused").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [f"tasks/{old}/fds/40/clock"]
    assert "plan/refused" in str(out) and "kern_timerfd_create" in lines[0]
    assert read_plan(str(tmp_path / "dry")).refused[0].path == f"tasks/{old}/fds/40/clock"
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(src, kit)
    assert f"tasks/{old}/fds/40/clock" in str(e.value) and kit.log == []


def test_memfd_contents_offset_and_seals(program):
    """memfd: one shm object per memfd with its name, contents and the seals FreeBSD has;
    the second description of the same memfd is that object's one description (FreeBSD
    cannot open a shared memory object again), which plan/lossy says."""
    old, src, _ = program("memfd")
    kit, [new] = restore(src)
    p = kit.procs[new]
    a, b, c = p.fds[50], p.fds[51], p.fds[52]
    assert a.kind == b.kind == c.kind == "shm"
    assert a.shm["name"] == "zdtm-memfd" and c.shm["name"] == "plain"
    assert len(a.shm["data"]) == 10000 and bytes(c.shm["data"]) == b"hello"
    assert a.shm["seals"] == 0x2 | 0x4 and c.shm["seals"] == 0x1
    assert a is b and a.pos == 777 and c.pos == 3
    lossy = {r.path for r in to_freebsd(src).lossy}
    assert f"tasks/{old}/fds/51/pos" in lossy


def test_abstract_unix_name_is_refused_naming_it(program, tmp_path):
    """sk_listen's fd 12 is bound to an abstract name, which FreeBSD does not have."""
    old, src, _ = program("sk_listen")
    plan_dry_run(src, str(tmp_path / "dry"))
    refused = (tmp_path / "dry/plan/refused").read_text()
    assert refused.startswith(f"tasks/{old}/fds/12/name\t@") and "abstract" in refused
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(src, kit)
    assert f"tasks/{old}/fds/12/name" in str(e.value) and kit.log == []


def test_listeners_bound_again(program, tmp_path):
    """sk_listen without its abstract socket: the TCP listener (SO_REUSEADDR, port, backlog
    7) and the unix one bound to its path in its name_dir, mode 0600, listening; a socket file
    left at the path (the original's) is replaced."""
    old, src, work = program("sk_listen")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    shutil.rmtree(edited / f"tasks/{old}/fds/12")
    src = tree.TreeSource(str(edited))
    kit, [new] = restore(src)
    socks = {fd: d.sock for fd, d in fds_of(kit, new, "socket").items()}
    assert sorted(socks) == [10, 11]
    port = src.file(next(i.id for i in src.fdinfo(old) if i.fd == 10)).isk.src_port
    assert socks[10]["name"] == ("127.0.0.1", port) and socks[10]["opts"]["reuseaddr"] == 1
    assert (socks[10]["state"], socks[10]["backlog"]) == ("listening", 7)
    path = str(work / "zdtm.sock")
    assert socks[11]["name"] == path and socks[11]["state"] == "listening"
    assert kit.fs[path].kind == "socket" and kit.fs[path].mode == 0o600
    assert ("linux", new, "unlink", path) in kit.log or not os.path.exists(path)


@pytest.mark.parametrize("name, fd, words", [
    ("signalfd", 30, ("DUMMY(signalfd4)", "ENOSYS")),
    ("sk_tcp", 10, ("TCP_REPAIR", "established")),
])
def test_kinds_the_linuxulator_lacks_are_refused_naming_the_fd(name, fd, words, program,
                                                               tmp_path):
    """signalfd (a stub there) and an established TCP connection (no TCP_REPAIR): the dry
    run's plan/refused names the descriptor and why, and restore refuses it the same way
    before anything exists."""
    old, src, _ = program(name)
    out = plan_dry_run(src, str(tmp_path / "dry"))
    refused = (tmp_path / "dry/plan/refused").read_text()
    assert f"tasks/{old}/fds/{fd}\t" in refused and all(w in refused for w in words)
    assert "plan/refused" in str(out)
    again = plan_dry_run(src, str(tmp_path / "dry"))         # the plan there, checked
    assert not again.fresh and f"tasks/{old}/fds/{fd}" in str(again)
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(src, kit)
    assert f"tasks/{old}/fds/{fd}" in str(e.value) and words[0] in str(e.value)
    assert kit.log == []


def test_listener_address_taken_or_path_not_a_socket_fails_naming_it(program, tmp_path):
    """The TCP port already bound in the jail: bind's EADDRINUSE names fds/10's address. A
    regular file at the unix socket's path is never removed: bind fails naming the path."""
    old, src, work = program("sk_listen")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    shutil.rmtree(edited / f"tasks/{old}/fds/12")
    src = tree.TreeSource(str(edited))
    port = src.file(next(i.id for i in src.fdinfo(old) if i.fd == 10)).isk.src_port
    kit = FakeFreeBSD()
    kit.ports[(2, 1, port)] = {}                         # someone else listens there
    with pytest.raises(KernelError) as e:
        restore(src, kit)
    assert e.value.errno == errno.EADDRINUSE and f"tasks/{old}/fds/10/src_addr" in str(e.value)
    assert f"127.0.0.1:{port}" in str(e.value) and kit.killed and not kit.jails
    path = work / "zdtm.sock"
    if path.exists():
        path.unlink()
    path.write_text("not a socket\n")
    kit = FakeFreeBSD()
    with pytest.raises(KernelError) as e:
        restore(src, kit)
    assert e.value.errno == errno.EADDRINUSE and f"tasks/{old}/fds/11/name" in str(e.value)
    assert str(path) not in kit.gone and kit.fs[str(path)].kind == "file"


@pytest.mark.parametrize("name, fd", [("epoll", 20), ("timerfd", 40), ("memfd", 50),
                                      ("sk_unix_pair", 10)])
def test_capture_back_names_the_kinds_it_does_not_read_yet(name, fd, program):
    """What the FreeBSD restore makes of these kinds is not captured back yet (a kqueue's
    kevents need kern.proc.kqueue, a datagram queue can only be read by draining it): the
    FreeBSD capture refuses naming the descriptor, rather than calling it foreign."""
    old, src, _ = program(name)
    kit, [new] = restore(src)
    kit.attach(new)
    with pytest.raises(Unsupported) as e:
        CF.FreeBSDTreeSource(new, kit).fdinfo(new)
    assert f"tasks/{new}/fds/{fd}" in str(e.value) and "not captured" in str(e.value)


def test_timerfd_unread_count_of_a_periodic_timer_is_listed_lost(program, tmp_path):
    old, src, _ = program("timerfd")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "tree", edited)
    (edited / f"tasks/{old}/fds/40/ticks").write_text("3\n")
    lossy = [r for r in to_freebsd(tree.TreeSource(str(edited))).lossy
             if r.path == f"tasks/{old}/fds/40/ticks"]
    assert len(lossy) == 1 and lossy[0].value == "3" and "TFD_IOC_SET_TICKS" in lossy[0].reason


def test_unix_pair_between_parent_and_child_is_made_before_the_fork(program, zdtm_bin, procs,
                                                                     tmp_path):
    """The two ends of a stream pair in two processes (sk_unix_pair's fds 10 and 11 given
    to fork_tree's parent and first child as fd 50): the pair is made in the root before it
    forks, so each process holds its end of the one pair, with its queue."""
    old, pair_src, _ = program("sk_unix_pair")
    r = zdtm.start(zdtm_bin, "fork_tree", tmp_path / "work2", procs.spawn)
    dump(r.pid, tmp_path / "tree2")
    t2 = tmp_path / "tree2"
    pids = sorted(int(p) for p in os.listdir(t2 / "tasks"))
    child = min(p for p in pids if p != r.pid)
    taken = {int((d / "open_file").read_text()) for p in pids
             for d in (t2 / f"tasks/{p}/fds").iterdir() if (d / "open_file").exists()}
    for pid, fd, desc in ((r.pid, 10, max(taken) + 1), (child, 11, max(taken) + 2)):
        shutil.copytree(tmp_path / f"tree/tasks/{old}/fds/{fd}", t2 / f"tasks/{pid}/fds/50")
        (t2 / f"tasks/{pid}/fds/50/open_file").write_text(f"{desc}\n")
    src = tree.TreeSource(str(t2))
    kit, new = restore(src)
    new = dict(zip(src.pids(), new))
    a, b = kit.procs[new[r.pid]].fds[50].sock, kit.procs[new[child]].fds[50].sock
    assert a["peer"] is b and b["peer"] is a
    assert a["rq"] == [pattern(3000, 1)] and b["rq"] == [pattern(1500, 2)]
    made = [e for e in kit.log if e[:3] == ("linux", new[r.pid], "socketpair")]
    assert len(made) == 1 and not any(e[2] == "socketpair" for e in kit.log
                                      if e[:2] == ("linux", new[child]))


def test_memfd_map_is_refused_naming_the_map(program, tmp_path):
    """A map of a memfd (memfd_map): the FreeBSD restore maps files by path, and a memfd has
    none there, so plan/refused and restore name the map."""
    old, src, _ = program("memfd_map")
    plan_dry_run(src, str(tmp_path / "dry"))
    refused = (tmp_path / "dry/plan/refused").read_text().splitlines()
    assert refused and all(ln.startswith(f"tasks/{old}/maps/") and "\tmemfd\t" in ln
                           for ln in refused)
    kit = FakeFreeBSD()
    with pytest.raises(Unsupported) as e:
        restore(src, kit)
    assert f"tasks/{old}/maps/" in str(e.value) and "memfd" in str(e.value) and kit.log == []
