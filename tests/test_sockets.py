"""Sockets: capture (sock_diag + peeked queues), the fds/<n>/ files, CRIU images, and the
sockets restore makes (restore/sockets.py), on real processes and real sockets.

Whole-process moves of sockets are the ZDTM programs sk_unix_pair and sk_listen
(tests/test_zdtm.py); here each layer is checked on its own.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from ckptfs import criu, sockets, tree
from ckptfs.capture import files as capture_files
from ckptfs.capture.linux import LiveSource
from ckptfs.errors import RestoreFailed
from ckptfs.restore import sockets as rsk

from helpers import procs as _procs

PY = sys.executable
CRIT_PY = "/usr/bin/python3"
SO_PEEK_OFF = 42

PAIRS = """
import socket
def keep(s):
    s.setblocking(True)
    return s
sa, sb = socket.socketpair()
sa.send(b"A" * 3000); sb.send(b"to b")
da, db = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for m in (b"1", b"22" * 350, b"3" * 5000):
    db.send(m)
qa, qb = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
qb.send(b"first"); qb.send(b"second"); qb.shutdown(socket.SHUT_WR)
FACTS = {n: s.fileno() for n, s in dict(sa=sa, sb=sb, da=da, db=db, qa=qa, qb=qb).items()}
"""

LISTENERS = """
import socket
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", 0)); t.listen(7)
u = socket.socket(socket.AF_UNIX); u.bind("here.sock"); u.listen(3)
os.chmod("here.sock", 0o600)
a = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.bind(b"\\0ckptfs-test-%d" % os.getpid()); a.listen(2)
v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); v6.bind(("::1", 0))
FACTS = {"t": t.fileno(), "port": t.getsockname()[1], "u": u.fileno(), "a": a.fileno(),
         "v6": v6.fileno(), "v6port": v6.getsockname()[1]}
"""


def py_child(procs, tmp_path: Path, body: str):
    """A Python child in `tmp_path/work` running `body`; returns (proc, FACTS)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    out = tmp_path / f"facts{len(procs.procs)}.json"
    tmp = f"{out}.tmp"
    code = ("import json, os, sys, time\n" + body +
            f"\njson.dump(FACTS, open({tmp!r}, 'w')); os.rename({tmp!r}, {str(out)!r})\n"
            "while True: time.sleep(100)\n")
    proc = procs.spawn([PY, "-c", code], cwd=str(work))
    deadline = time.monotonic() + 10
    while not out.exists():
        assert proc.popen.poll() is None, (proc.log / "stderr").read_text()
        assert time.monotonic() < deadline, "child never wrote its facts"
        time.sleep(0.02)
    return proc, json.loads(out.read_text())


def dump(pid: int, out: Path, kill: bool = True) -> Path:
    with LiveSource(pid) as src:
        src.freeze()
        tree.write_tree(src, str(out))
    if kill:
        os.kill(pid, signal.SIGKILL)
        assert _procs.wait_gone(pid, 5)
    return out


def fd_dir(d: Path, pid: int, fd: int) -> Path:
    return d / "tasks" / str(pid) / "fds" / str(fd)


def grab(pid: int, fd: int) -> socket.socket:
    return socket.socket(fileno=capture_files.grab_fd(pid, fd))


def fdinfo_of(src, pid: int, fd: int):
    return next(f for f in src.fdinfo(pid) if f.fd == fd)


def drain(sk: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            m = sk.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        if not m:
            return out
        out.append(m)


# -- capture and tree -------------------------------------------------------------------------
def test_pairs_in_the_tree_and_the_queues_stay(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, PAIRS)
    d = dump(proc.pid, tmp_path / "tree", kill=False)
    f = lambda name, rel: (fd_dir(d, proc.pid, fx[name]) / rel).read_bytes()  # noqa: E731
    ino = {n: os.stat(f"/proc/{proc.pid}/fd/{fd}").st_ino for n, fd in fx.items()}
    assert f("sa", "family") == b"unix\n" and f("sa", "sock_type") == b"stream\n"
    assert f("sa", "inode") == f"{ino['sa']}\n".encode()
    assert f("sa", "peer") == f"{ino['sb']}\n".encode()
    assert f("sb", "peer") == f"{ino['sa']}\n".encode()
    assert f("sa", "state") == b"established\n"
    assert f("sa", "queue/0") == b"to b" and f("sb", "queue/0") == b"A" * 3000
    assert not (fd_dir(d, proc.pid, fx["db"]) / "queue").exists()     # nothing waits there
    dq = fd_dir(d, proc.pid, fx["da"]) / "queue"
    assert sorted(os.listdir(dq)) == ["0", "1", "2"]                # boundaries kept
    assert [(dq / n).read_bytes() for n in "012"] == [b"1", b"22" * 350, b"3" * 5000]
    assert f("qa", "shutdown") == b"read\n" and f("qb", "shutdown") == b"write\n"
    assert f("qa", "queue/0") == b"first" and f("qa", "queue/1") == b"second"
    # nothing was consumed, and the sockets' own peek offsets are back to "off"
    for name, want in (("sa", [b"to b"]), ("da", [b"1", b"22" * 350, b"3" * 5000])):
        sk = grab(proc.pid, fx[name])
        assert sk.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) == -1
        assert drain(sk) == want
        sk.close()


def test_long_datagrams_are_peeked_whole(procs, tmp_path):
    body = """
import socket
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for m in (b"s", b"L" * 150000, b"t"):
    b.send(m)
FACTS = {"a": a.fileno()}
"""
    proc, fx = py_child(procs, tmp_path, body)
    with LiveSource(proc.pid) as live:
        live.freeze()
        got = live.socket_queue(fdinfo_of(live, proc.pid, fx["a"]).id)
    assert got == [b"s", b"L" * 150000, b"t"]


def test_tree_reads_back_what_was_rendered(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, PAIRS + LISTENERS.replace("FACTS =", "FACTS2 =")
                        + "\nFACTS.update(FACTS2)\n")
    with LiveSource(proc.pid) as live:
        live.freeze()
        tree.write_tree(live, str(tmp_path / "tree"))
        want = {fd: tree.fd_values(live, fdinfo_of(live, proc.pid, fd)) for fd in fx.values()
                if isinstance(fd, int) and fd > 2 and fd < 1000}
    ts = tree.TreeSource(str(tmp_path / "tree"))
    assert not ts.unsupported()
    for fd, values in want.items():
        got = tree.fd_values(ts, fdinfo_of(ts, proc.pid, fd))
        assert {k: v for k, v in got.items() if k != "open_file"} == \
               {k: v for k, v in values.items() if k != "open_file"}, fd


@given(st.binary(min_size=1, max_size=100))
def test_unix_names_round_trip(raw):
    for name in (b"\0" + raw, raw.replace(b"\0", b"") + b"\0"):
        if name == b"\0":
            continue
        text = sockets.render_name(name)
        assert "\n" not in text and sockets.parse_name(text) == name


def test_listeners_in_the_tree(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, LISTENERS)
    d = dump(proc.pid, tmp_path / "tree", kill=False)
    t, u, a, v6 = (fd_dir(d, proc.pid, fx[n]) for n in ("t", "u", "a", "v6"))
    assert (t / "state").read_text() == "listen\n" and (t / "backlog").read_text() == "7\n"
    assert (t / "src_addr").read_text() == "127.0.0.1\n"
    assert (t / "src_port").read_text() == f"{fx['port']}\n"
    assert (t / "opts/reuseaddr").read_text() == "1\n"
    assert not (t / "dst_addr").exists()
    assert (u / "name").read_text() == "here.sock\n"
    assert (u / "name_dir").read_text() == f"{tmp_path / 'work'}\n"
    assert (u / "perms/mode").read_text() == "0140600\n" and (u / "backlog").read_text() == "3\n"
    assert (a / "name").read_text() == f"@ckptfs-test-{proc.pid}\n"
    assert (a / "sock_type").read_text() == "seqpacket\n"
    assert (v6 / "family").read_text() == "inet6\n" and (v6 / "src_addr").read_text() == "::1\n"
    assert (v6 / "proto").read_text() == "udp\n" and (v6 / "state").read_text() == "close\n"


# -- restore: the sockets the restorer makes --------------------------------------------------
def made(ts, pid: int, fd: int, maker=None) -> socket.socket:
    maker = maker or rsk.Sockets(ts)
    fdi = fdinfo_of(ts, pid, fd)
    return socket.socket(fileno=maker.make(ts.file(fdi.id), f"tasks/{pid}/fds/{fd}"))


def test_pairs_made_again_with_their_queues(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, PAIRS)
    ts = tree.TreeSource(str(dump(proc.pid, tmp_path / "tree")))
    maker = rsk.Sockets(ts)
    try:
        s = {n: made(ts, proc.pid, fx[n], maker) for n in fx}
    finally:
        maker.close()
    assert drain(s["sa"]) == [b"to b"]
    assert b"".join(drain(s["sb"])) == b"A" * 3000
    assert drain(s["da"]) == [b"1", b"22" * 350, b"3" * 5000]       # one recv per message
    assert drain(s["qa"]) == [b"first", b"second"]                   # then end of file
    assert s["qa"].recv(10, socket.MSG_DONTWAIT) == b""
    with pytest.raises(BrokenPipeError):
        s["qb"].send(b"x", socket.MSG_NOSIGNAL)
    s["sa"].send(b"ping")
    assert s["sb"].recv(10) == b"ping"                               # the two ends are a pair
    old = int((fd_dir(tmp_path / "tree", proc.pid, fx["sa"]) / "inode").read_text())
    assert os.fstat(s["sa"].fileno()).st_ino != old                  # a new socket
    for sk in s.values():
        sk.close()


def test_sockets_made_in_the_tasks_network_namespace(procs, tmp_path):
    import fcntl
    proc, fx = py_child(procs, tmp_path, PAIRS)
    ts = tree.TreeSource(str(dump(proc.pid, tmp_path / "tree")))
    holder = procs.spawn(["unshare", "-n", "sleep", "100"])
    ns = f"/proc/{holder.pid}/ns/net"
    deadline = time.monotonic() + 5
    while os.stat(ns).st_ino == os.stat("/proc/self/ns/net").st_ino:
        assert time.monotonic() < deadline, "unshare -n never made its namespace"
        time.sleep(0.01)
    maker = rsk.Sockets(ts, netns=ns)
    try:
        sk = made(ts, proc.pid, fx["da"], maker)
        nsfd = fcntl.ioctl(sk.fileno(), 0x894C)          # SIOCGSKNS: the socket's namespace
        assert os.fstat(nsfd).st_ino == os.stat(ns).st_ino
        assert os.stat("/proc/self/ns/net").st_ino != os.stat(ns).st_ino
        assert drain(sk) == [b"1", b"22" * 350, b"3" * 5000]
        os.close(nsfd)
        sk.close()
    finally:
        maker.close()


def test_listeners_made_again(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, LISTENERS)
    ts = tree.TreeSource(str(dump(proc.pid, tmp_path / "tree")))
    assert (tmp_path / "work" / "here.sock").exists()          # the dead original's file
    s = {n: made(ts, proc.pid, fx[n]) for n in ("t", "u", "a", "v6")}
    try:
        assert s["t"].getsockname() == ("127.0.0.1", fx["port"])
        assert s["t"].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert s["u"].getsockname() == "here.sock"               # bound by its relative name
        assert os.stat(tmp_path / "work" / "here.sock").st_mode & 0o7777 == 0o600
        assert s["v6"].getsockname()[:2] == ("::1", fx["v6port"])
        for name, family, addr in (("t", socket.AF_INET, ("127.0.0.1", fx["port"])),
                                   ("u", socket.AF_UNIX, str(tmp_path / "work" / "here.sock"))):
            c = socket.socket(family)
            c.connect(addr)
            conn, _ = s[name].accept()
            c.send(b"hi")
            assert conn.recv(2) == b"hi"
            conn.close()
            c.close()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c.connect(b"\0ckptfs-test-%d" % proc.pid)
        c.close()
    finally:
        for sk in s.values():
            sk.close()


def test_datagram_client_connects_to_its_named_server_again(procs, tmp_path):
    body = """
import socket
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); srv.bind("log.sock")
cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); cli.connect("log.sock")
FACTS = {"cli": cli.fileno(), "srv": srv.fileno()}
"""
    proc, fx = py_child(procs, tmp_path, body)
    ts = tree.TreeSource(str(dump(proc.pid, tmp_path / "tree")))
    assert problems_of(ts, proc.pid, fx["cli"]) == []
    maker = rsk.Sockets(ts)
    try:
        cli = made(ts, proc.pid, fx["cli"], maker)           # the client first: it makes the server
        srv = made(ts, proc.pid, fx["srv"], maker)
        assert cli.getpeername() == "log.sock"
        cli.send(b"line")
        assert srv.recv(10) == b"line"
    finally:
        maker.close()


def test_unlinked_bound_path_stays_unlinked(procs, tmp_path):
    body = """
import socket
s = socket.socket(socket.AF_UNIX); s.bind("gone.sock"); s.listen(1); os.unlink("gone.sock")
FACTS = {"s": s.fileno()}
"""
    proc, fx = py_child(procs, tmp_path, body)
    d = dump(proc.pid, tmp_path / "tree")
    assert (fd_dir(d, proc.pid, fx["s"]) / "deleted").read_text() == "1\n"
    assert not (fd_dir(d, proc.pid, fx["s"]) / "perms").exists()
    sk = made(tree.TreeSource(str(d)), proc.pid, fx["s"])
    assert sk.getsockname() == "gone.sock"
    assert sk.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert not (tmp_path / "work" / "gone.sock").exists()
    sk.close()


def test_frozen_original_listener_is_handed_over(procs, tmp_path):
    """Same host, original frozen (a move in progress): the listener is the original socket
    (its port is not free, and connections waiting in its backlog come along)."""
    proc, fx = py_child(procs, tmp_path, LISTENERS)
    waiting = socket.create_connection(("127.0.0.1", fx["port"]))
    with LiveSource(proc.pid) as live:
        live.freeze()
        tree.write_tree(live, str(tmp_path / "tree"))
        ts = tree.TreeSource(str(tmp_path / "tree"))
        sk = made(ts, proc.pid, fx["t"])
        assert os.fstat(sk.fileno()).st_ino == os.stat(f"/proc/{proc.pid}/fd/{fx['t']}").st_ino
        conn, _ = sk.accept()
        waiting.send(b"x")
        assert conn.recv(1) == b"x"
        conn.close()
        sk.close()
    waiting.close()


# -- refusals: before anything is made, naming the socket -------------------------------------
def problems_of(ts, pid: int, fd: int) -> list[str]:
    return rsk.problems(ts, ts.file(fdinfo_of(ts, pid, fd).id))


TCP_PAIR = LISTENERS + """
c = socket.create_connection(("127.0.0.1", FACTS["port"])); s, _ = t.accept()
c.send(b"c->s" * 1000); s.send(b"s->c")
time.sleep(0.2)
FACTS.update(c=c.fileno(), s=s.fileno(), cport=c.getsockname()[1])
"""


def test_tcp_connection_made_again_by_repair(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, TCP_PAIR)
    d = dump(proc.pid, tmp_path / "tree")
    c_dir = fd_dir(d, proc.pid, fx["c"])
    assert (c_dir / "state").read_text() == "established\n"
    assert (c_dir / "dst_port").read_text() == f"{fx['port']}\n"
    assert (c_dir / "queue/0").read_bytes() == b"s->c"
    assert (c_dir / "tcp/options").read_text() == \
        "TCPI_OPT_TIMESTAMPS|TCPI_OPT_SACK|TCPI_OPT_WSCALE\n"
    assert (c_dir / "tcp/outq").read_bytes() == b""          # all of it acknowledged
    ts = tree.TreeSource(str(d))
    assert problems_of(ts, proc.pid, fx["c"]) == []
    maker = rsk.Sockets(ts)
    c, s = (made(ts, proc.pid, fx[n], maker) for n in ("c", "s"))
    try:
        assert c.getpeername() == ("127.0.0.1", fx["port"]) and c.getsockname()[1] == fx["cport"]
        assert c.recv(100) == b"s->c"
        got = b""
        while len(got) < 4000:
            got += s.recv(4000)
        assert got == b"c->s" * 1000
        c.send(b"new")
        assert s.recv(10) == b"new"                           # the connection lives on
        s.send(b"back")
        assert c.recv(10) == b"back"
    finally:
        c.close()
        s.close()
        maker.close()


def test_silenced_connections_close_without_a_word(procs, tmp_path):
    """After a move the original is killed; its connections must not reset the peers (who
    talk to the restored copy now)."""
    body = """
import socket
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
FACTS = {"c": c.fileno()}
"""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(2)
    proc, fx = py_child(procs, tmp_path, body.replace("sys.argv[1]", str(lst.getsockname()[1])))
    peer, _ = lst.accept()
    with LiveSource(proc.pid) as live:
        live.freeze()
        assert capture_files.silence_connections(proc.pid) == [fx["c"]]
        os.kill(proc.pid, signal.SIGKILL)
    assert _procs.wait_gone(proc.pid, 5)
    time.sleep(0.1)
    with pytest.raises(BlockingIOError):          # no end of file, no reset: silence
        peer.recv(1, socket.MSG_DONTWAIT)
    peer.close()
    lst.close()


def test_half_closed_tcp_is_refused_with_its_addresses(procs, tmp_path):
    body = LISTENERS + """
c = socket.create_connection(("127.0.0.1", FACTS["port"])); s, _ = t.accept()
cport = c.getsockname()[1]; c.close(); time.sleep(0.2)
FACTS.update(s=s.fileno(), cport=cport)
"""
    proc, fx = py_child(procs, tmp_path, body)
    ts = tree.TreeSource(str(dump(proc.pid, tmp_path / "tree")))
    found = problems_of(ts, proc.pid, fx["s"])
    assert found == [f"TCP socket tcp 127.0.0.1:{fx['port']} -> 127.0.0.1:{fx['cport']} is "
                     "close_wait: only established connections are restored"]
    with pytest.raises(RestoreFailed) as e:
        made(ts, proc.pid, fx["s"])
    assert f"fds/{fx['s']}" in str(e.value)


def test_port_in_use_is_refused(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, LISTENERS)
    ts = tree.TreeSource(str(dump(proc.pid, tmp_path / "tree")))
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", fx["port"]))
    squatter.listen(1)
    try:
        found = problems_of(ts, proc.pid, fx["t"])
        assert found == [f"address tcp 127.0.0.1:{fx['port']} is in use on this host"]
    finally:
        squatter.close()
    assert problems_of(ts, proc.pid, fx["t"]) == []


def test_bad_trees_are_refused(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, PAIRS + LISTENERS.replace("FACTS =", "FACTS2 =")
                        + "\nFACTS.update(FACTS2)\n")
    d = dump(proc.pid, tmp_path / "tree")
    (fd_dir(d, proc.pid, fx["sa"]) / "peer").write_text("12345\n")       # a peer not in the tree
    os.unlink(tmp_path / "work" / "here.sock")
    (tmp_path / "work" / "here.sock").write_text("not a socket")
    (fd_dir(d, proc.pid, fx["da"]) / "opts" / "nosuch").write_text("1\n")
    with pytest.raises(Exception) as e:
        tree.TreeSource(str(d))
    assert "nosuch" in str(e.value) and "opts" in str(e.value)
    os.unlink(fd_dir(d, proc.pid, fx["da"]) / "opts" / "nosuch")
    ts = tree.TreeSource(str(d))
    assert "peer socket 12345 is not in the tree" in problems_of(ts, proc.pid, fx["sa"])[0]
    assert "exists and is not a socket file" in problems_of(ts, proc.pid, fx["u"])[0]


def test_queue_bigger_than_this_hosts_buffers_is_refused(procs, tmp_path, monkeypatch):
    proc, fx = py_child(procs, tmp_path, PAIRS)
    d = dump(proc.pid, tmp_path / "tree")
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    (fd_dir(d, proc.pid, fx["sa"]) / "queue" / "0").write_bytes(b"q" * (2 * wmem_max + 1))
    ts = tree.TreeSource(str(d))
    assert problems_of(ts, proc.pid, fx["sa"]) == []           # CAP_NET_ADMIN: forced buffers
    maker = rsk.Sockets(ts)
    try:
        sa = made(ts, proc.pid, fx["sa"], maker)
        assert len(b"".join(drain(sa))) == 2 * wmem_max + 1
        sa.close()
    finally:
        maker.close()
    monkeypatch.setattr(rsk, "_has_net_admin", lambda: False)
    found = problems_of(ts, proc.pid, fx["sa"])
    assert len(found) == 1 and f"{2 * wmem_max + 1} queued bytes need a send buffer" in found[0]


def test_other_families_are_shown_and_refused(procs, tmp_path):
    body = "import socket\nn = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n" \
           "FACTS = {'n': n.fileno()}\n"
    proc, fx = py_child(procs, tmp_path, body)
    d = dump(proc.pid, tmp_path / "tree")
    assert (fd_dir(d, proc.pid, fx["n"]) / "family").read_text() == "netlink\n"
    ts = tree.TreeSource(str(d))
    assert (str(fd_dir(d, proc.pid, fx["n"])), "socket") in ts.unsupported()
    assert problems_of(ts, proc.pid, fx["n"]) == [
        "socket of an unknown family (only unix, inet and inet6 are restored)"]


# -- CRIU images --------------------------------------------------------------------------------
needs_crit = pytest.mark.skipif(not os.path.exists("/usr/bin/crit"), reason="crit not installed")


@needs_crit
def test_criu_images_carry_sockets_and_queues(procs, tmp_path):
    proc, fx = py_child(procs, tmp_path, PAIRS + TCP_PAIR.replace("FACTS", "FACTS2")
                        + "\nFACTS.update(FACTS2)\n")
    d = dump(proc.pid, tmp_path / "tree")
    ts = tree.TreeSource(str(d))
    criu.export(ts, tmp_path / "img")
    c_ino = int((fd_dir(d, proc.pid, fx["c"]) / "inode").read_text())
    for name in ("files.img", "sk-queues.img", f"tcp-stream-{c_ino:x}.img"):
        img = tmp_path / "img" / name
        js = subprocess.run(["/usr/bin/crit", "decode", "-i", str(img)], capture_output=True,
                            check=True).stdout
        back = subprocess.run(["/usr/bin/crit", "encode", "-o", str(tmp_path / (name + ".crit"))],
                              input=js, capture_output=True)
        assert back.returncode == 0, back.stderr
        assert (tmp_path / (name + ".crit")).read_bytes() == img.read_bytes(), name
    entries = json.loads(subprocess.run(["/usr/bin/crit", "decode", "-i",
                                         str(tmp_path / "img" / "sk-queues.img")],
                                        capture_output=True, check=True).stdout)["entries"]
    assert [e["length"] for e in entries if e["id_for"] == fdinfo_of(ts, proc.pid, fx["da"]).id] \
        == [1, 700, 5000]
    with criu.ImageSource(tmp_path / "img") as img:
        for fd in (fx["sa"], fx["sb"], fx["da"], fx["qa"], fx["t"], fx["u"], fx["a"], fx["v6"],
                   fx["c"], fx["s"]):
            want = tree.fd_values(ts, fdinfo_of(ts, proc.pid, fd))
            got = tree.fd_values(img, fdinfo_of(img, proc.pid, fd))
            assert {k: v for k, v in got.items() if k != "open_file"} == \
                   {k: v for k, v in want.items() if k != "open_file"}, fd


# -- side item: a FIFO restored next to its frozen original -----------------------------------
FIFO = """
os.mkfifo("f")
r = os.open("f", os.O_RDONLY | os.O_NONBLOCK); w = os.open("f", os.O_WRONLY)
os.write(w, b"saved bytes")
FACTS = {"r": r, "w": w}
"""


def fionread(fd: int) -> int:
    import fcntl
    import termios
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def test_fifo_next_to_its_frozen_original_is_not_filled_twice(procs, tmp_path):
    from ckptfs.restore.files import FileTable
    proc, fx = py_child(procs, tmp_path, FIFO)
    with LiveSource(proc.pid) as live:
        live.freeze()
        tree.write_tree(live, str(tmp_path / "tree"))
        ts = tree.TreeSource(str(tmp_path / "tree"))
        table = FileTable(ts, log=lambda m: None)
        try:
            fd = table.description(fdinfo_of(ts, proc.pid, fx["r"]).id, where="fds/r")
            assert fionread(fd) == len(b"saved bytes")          # the same pipe: queued once
        finally:
            table.close()
        extra = os.open(str(tmp_path / "work" / "f"), os.O_WRONLY | os.O_NONBLOCK)
        os.write(extra, b"+")
        os.close(extra)
        table = FileTable(ts, log=lambda m: None)
        try:
            with pytest.raises(RestoreFailed, match="already holds 12 bytes"):
                table.description(fdinfo_of(ts, proc.pid, fx["r"]).id, where="fds/r")
        finally:
            table.close()


# -- whole programs: restore next to the frozen original ----------------------------------------
# (dump + restore, pidns, cp and rsync of tests/zdtm/sk_*.c run in test_zdtm.py's matrix)
SOCKET_PROGRAMS = sorted(p.stem for p in (Path(__file__).resolve().parent / "zdtm").glob("sk_*.c"))


@pytest.fixture
def restored(procs):
    def add(result):
        for pid in result.pids.values():
            procs.adopt(pid)
        return result
    return add


@pytest.mark.parametrize("name", SOCKET_PROGRAMS)
def test_program_restored_next_to_frozen_original(name, zdtm_bin, procs, restored, tmp_path):
    """What `cp` of a frozen mount into a target on the same host does: the original is
    still there (frozen) while the copy is restored, and killed after."""
    from ckptfs.restore import restore
    from helpers import zdtm

    def move(pid, tmpdir):
        with LiveSource(pid) as live:
            live.freeze()
            tree.write_tree(live, str(Path(tmpdir) / "tree"))
            new = restored(restore(str(Path(tmpdir) / "tree"), log=lambda m: None)).pids[pid]
            os.kill(pid, signal.SIGKILL)
        assert _procs.wait_gone(pid, 5)
        return new
    assert zdtm.run_case(zdtm_bin, name, tmp_path, procs, move=move) == "PASS"
