"""Sockets made again in the restorer (restore/files.py hands them to the tasks).

What is made, per unix_sk_entry / inet_sk_entry:
- a unix pair (both ends in the tree, each the other's peer): socketpair(2); the messages
  waiting on each end are sent from the other end (message boundaries kept), then each end's
  shutdown is applied. A connected stream whose peer was closed (peer 0) gets a pair whose
  other end is closed after queueing (it reads the data, then end of file);
- a bound or listening unix socket: bind to its name (a relative name in its name_dir, from
  a thread with a working directory of its own), the file's mode and owner, listen(backlog).
  A socket file left at the path (the original's, dead or alive) is replaced, as CRIU does:
  the restored program is the one its clients must reach now. Any other file there is refused;
- a bound or listening TCP/UDP socket: options, bind to the address and port, listen;
- an established TCP connection: TCP_REPAIR (tcp.py) re-makes it with its sequence numbers,
  options, window and both queues, without a packet on the wire;
- on the same host, a listener or TCP connection whose original is still frozen here (a move
  in progress) is the original socket itself, taken with pidfd_getfd: connections waiting in
  a backlog come along, and no address or connection exists twice.
`problems()` says, before anything is made, why a socket cannot be restored (a connected TCP
socket, a peer outside the tree, a port in use, a queue too big for this host's buffers ...).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
import threading

from .. import flags as F
from .. import sockets as S
from .. import tcp
from ..errors import KernelError, RestoreFailed
from ..capture import files as capture_files
from ..capture import sockdiag

SO_SNDBUFFORCE, SO_RCVBUFFORCE, SO_BUF_LOCK = 32, 33, 72
SETFL = os.O_NONBLOCK          # the status flag a socket description carries that we set
SHUT = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}
SKB_OVERHEAD = 1024          # kernel bytes charged per queued message beyond its data
MAX_BUF = (1 << 31) - 1
# sk_opts_entry field -> (level, option) set as recorded (buffer sizes are handled apart)
SETTABLE = {"reuseaddr": socket.SO_REUSEADDR, "so_reuseport": socket.SO_REUSEPORT,
            "so_keepalive": socket.SO_KEEPALIVE, "so_passcred": socket.SO_PASSCRED,
            "so_broadcast": socket.SO_BROADCAST, "so_priority": socket.SO_PRIORITY,
            "so_rcvlowat": socket.SO_RCVLOWAT, "so_mark": socket.SO_MARK}


def entry(fe):
    """The unix_sk_entry or inet_sk_entry of a file entry (None for other kinds)."""
    if fe.HasField("usk"):
        return fe.usk
    if fe.HasField("isk"):
        return fe.isk
    return None


def describe(sk) -> str:
    """A socket's address for messages: `unix:path`, `127.0.0.1:8080`, `[::1]:80 -> ...`."""
    if sk.DESCRIPTOR.name == "unix_sk_entry":
        return "unix:" + (S.render_name(sk.name) if sk.name else "(unnamed)")
    src = _inet_addr(sk.family, sk.src_addr, sk.src_port)
    if sk.state in (S.TCP_LISTEN, S.TCP_CLOSE) and not sk.dst_port:
        return f"{S.PROTOS.get(sk.proto, sk.proto)} {src}"
    dst = _inet_addr(sk.family, sk.dst_addr, sk.dst_port)
    return f"{S.PROTOS.get(sk.proto, sk.proto)} {src} -> {dst}"


def _inet_addr(family: int, words, port: int) -> str:
    text = S.addr_text(family, words)
    return f"[{text}]:{port}" if family == socket.AF_INET6 else f"{text}:{port}"


# -- checks before anything is made ---------------------------------------------------------
class Index:
    """Where the tree's sockets are: unix socket inode -> file id, file id -> (pid, fd)."""

    def __init__(self, source):
        self.source = source
        self.by_ino: dict[int, int] = {}
        self.holders: dict[int, tuple[int, int]] = {}
        dead = (F.TASK_STATES["zombie"], F.TASK_STATES["dead"])
        for pid in source.pids():
            if source.core(pid).tc.task_state in dead:
                continue          # a zombie holds no descriptors (and an image has no fdinfo)
            for fdi in source.fdinfo(pid):
                self.holders.setdefault(fdi.id, (pid, fdi.fd))
                if fdi.type == F.FD_TYPES["UNIXSK"]:
                    self.by_ino.setdefault(source.file(fdi.id).usk.ino, fdi.id)

    def named_peer(self, u) -> int | None:
        """File id of the bound datagram socket of the tree that `u` is connect()ed to (a
        one-way peer: the server is not connected back), or None."""
        fid = self.by_ino.get(u.peer) if u.peer and u.type == socket.SOCK_DGRAM else None
        if fid is None:
            return None
        other = self.source.file(fid).usk
        return fid if other.peer != u.ino and other.name else None

    def peer_of(self, u) -> int | None:
        """File id of a unix socket's peer when the two are a pair (each the other's peer)."""
        fid = self.by_ino.get(u.peer) if u.peer else None
        if fid is None:
            return None
        other = self.source.file(fid).usk
        return fid if other.peer == u.ino else None


def problems(source, fe, index: Index | None = None) -> list[str]:
    """Why the socket of file entry `fe` cannot be restored here (empty: it can)."""
    sk = entry(fe)
    if sk is None:
        return ["socket of an unknown family (only unix, inet and inet6 are restored)"]
    index = index or Index(source)
    q = source.socket_queue(fe.id)
    if fe.HasField("usk"):
        return _unix_problems(source, sk, q, index)
    return _inet_problems(sk, q, index, fe.id)


def _unix_problems(source, u, q: list[bytes], index: Index) -> list[str]:
    if u.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        return [f"unix socket type {u.type} is not stream, dgram or seqpacket"]
    out = []
    connected = _connected(u)
    server = index.named_peer(u)
    if server is not None and q:
        out.append(f"{len(q)} message(s) queued on a datagram socket connected to a named "
                   "one: their senders are not known, so they cannot be queued again")
    elif connected and u.peer and index.peer_of(u) is None and server is None:
        out.append(f"peer socket {u.peer} is not in the tree (or not connected back to "
                   f"{u.ino}, or not a named datagram socket): only the tree's own pairs "
                   "and named datagram sockets are connected again")
    if q and not connected:
        out.append(f"{len(q)} message(s) queued on an unconnected socket: their senders are "
                   "not known, so they cannot be queued again")
    if u.name[:1] not in (b"", b"\0"):
        out.extend(_path_problems(u))
    out.extend(_queue_problems(q))
    return out


def _connected(u) -> bool:
    """A unix socket with a peer, or a stream one whose peer is gone (it reads what is left,
    then end of file). A datagram socket reads `established` even when it never connected."""
    return bool(u.peer) or (u.type != socket.SOCK_DGRAM and u.state == S.TCP_ESTABLISHED)


def _path_problems(u) -> list[str]:
    name = _path_name(u)
    if not os.path.isabs(name) and not u.HasField("name_dir"):
        return [f"bound name {name!r} is relative and the tree has no name_dir"]
    path = os.path.join(u.name_dir, name) if u.HasField("name_dir") else name
    if len(os.fsencode(name)) >= 108:
        return [f"bound name {name!r} is longer than a socket address holds (107 bytes)"]
    if not os.path.isdir(os.path.dirname(path) or "/"):
        return [f"directory of the bound name {path!r} does not exist here"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    if not stat.S_ISSOCK(st.st_mode):
        return [f"{path} exists and is not a socket file (bind would fail; refusing to "
                "remove it)"]
    return []


def _queue_problems(q: list[bytes]) -> list[str]:
    need, limit = _fill_need(q), _buffer_limit()
    if need > limit:
        return [f"{sum(map(len, q))} queued bytes need a send buffer of {need} bytes; this "
                f"host allows {limit} (net.core.wmem_max, or more with CAP_NET_ADMIN)"]
    return []


def _inet_problems(i, q: list[bytes], index: Index, fid: int) -> list[str]:
    where = describe(i)
    if i.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return [f"{where}: protocol {i.proto} is not TCP or UDP"]
    if i.proto == socket.IPPROTO_TCP and i.state not in (S.TCP_LISTEN, S.TCP_CLOSE):
        return _tcp_problems(i, index, fid, where)
    if q:
        return [f"{where}: {sum(map(len, q))} queued bytes on an internet socket are not "
                "restored (their senders are not in the tree)"]
    if not i.src_port or _original(index, fid, i.ino) is not None:
        return []
    return _probe_bind(i, where)


def _tcp_problems(i, index: Index, fid: int, where: str) -> list[str]:
    state = S.STATES.get(i.state, i.state)
    if i.state != S.TCP_ESTABLISHED:
        return [f"TCP socket {where} is {state}: only established connections are restored"]
    if _original(index, fid, i.ino) is not None:
        return []
    if index.source.tcp_stream(fid) is None:
        return [f"connected TCP socket {where} has no repair state (tcp/) in the checkpoint"]
    return []


def _probe_bind(i, where: str) -> list[str]:
    """Bind a throw-away socket with the same options: is the address free here?"""
    try:
        probe = _inet_socket(i)
    except OSError as e:
        return [f"{where}: cannot make the socket: {os.strerror(e.errno)}"]
    try:
        _inet_bind(probe, i)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return [f"address {where} is in use on this host"]
        return [f"{where}: bind: {os.strerror(e.errno)}"]
    finally:
        probe.close()
    return []


# -- making them ------------------------------------------------------------------------------
class Sockets:
    """The restorer's sockets, by file id. `make` returns a descriptor the caller owns;
    the other end of a pair waits here until asked for, and close() ends what is left.

    `netns`: a /proc/PID/ns/net path the sockets must belong to when the tasks live in a
    network namespace other than the restorer's (a container's); a socket belongs to the
    namespace it is created in, so each is created on a thread that entered it."""

    def __init__(self, source, netns: str | None = None):
        self.source, self.netns = source, netns
        self._index: Index | None = None
        self._waiting: dict[int, int] = {}
        self._made: set[int] = set()         # file ids handed out (or being made)

    def _new(self, *args) -> socket.socket:
        return self._in_netns(lambda: socket.socket(*args))

    def _new_pair(self, *args) -> tuple[socket.socket, socket.socket]:
        return self._in_netns(lambda: socket.socketpair(*args))

    def _in_netns(self, make):
        if self.netns is None:
            return make()
        fd = os.open(self.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
                return make()
            return sockdiag.in_netns(fd, make, self.netns)
        finally:
            os.close(fd)

    @property
    def index(self) -> Index:
        if self._index is None:
            self._index = Index(self.source)
        return self._index

    def close(self) -> None:
        fds, self._waiting = list(self._waiting.values()), {}
        for fd in fds:
            os.close(fd)

    def make(self, fe, where: str) -> int:
        if fe.id in self._waiting:
            self._made.add(fe.id)
            return self._waiting.pop(fe.id)
        self._made.add(fe.id)
        found = problems(self.source, fe, self.index)
        if found:
            raise RestoreFailed("; ".join(found), path=where, step="socket")
        try:
            return self._make(fe, where)
        except OSError as e:
            raise KernelError(f"make socket {describe(entry(fe))}", e.errno, path=where,
                              step="socket") from None

    def _make(self, fe, where: str) -> int:
        held = self._take_original(fe)
        if held is not None:
            return held
        if fe.HasField("isk") and S.is_tcp_connected(fe.isk):
            return _detach(self._tcp(fe, where))
        if fe.HasField("isk"):
            return _detach(self._inet(fe.isk, where))
        u = fe.usk
        server = self.index.named_peer(u)
        if server is not None:
            return _detach(self._dgram_client(u, server, where))
        if _connected(u):
            return self._pair(fe, where)
        return _detach(self._unix_alone(u, where))

    def _dgram_client(self, u, server_id: int, where: str) -> socket.socket:
        """A datagram socket connect()ed to a named one of the tree: that one is made first
        (it waits here for its own descriptor), then this one connects to its name."""
        if server_id not in self._waiting and server_id not in self._made:
            server = self.source.file(server_id)
            self._waiting[server_id] = self.make(server, where + " (its peer)")
        sk = self._unix_alone(u, where)
        try:
            _unix_connect(sk, self.source.file(server_id).usk)
        except BaseException:
            sk.close()
            raise
        return sk

    def _take_original(self, fe) -> int | None:
        """A listener or TCP connection whose original is frozen on this host is handed over
        itself (a second socket could not have its address, or its connection)."""
        sk = entry(fe)
        if sk.state != S.TCP_LISTEN and not S.is_tcp_connected(sk):
            return None
        held = _original(self.index, fe.id, sk.ino)
        if held is None:
            return None
        pid, fd = held
        return capture_files.grab_fd(pid, fd)

    # unix pairs
    def _pair(self, fe, where: str) -> int:
        u = fe.usk
        peer_id = self.index.peer_of(u)
        a, b = self._new_pair(socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            peer = self.source.file(peer_id).usk if peer_id else None
            _fill(b, a, self.source.socket_queue(fe.id), where)
            if peer is not None:
                _fill(a, b, self.source.socket_queue(peer_id), where)
            _finish(a, u)
            if peer is not None:
                _finish(b, peer)
        except BaseException:
            a.close()
            b.close()
            raise
        if peer is None:
            b.close()          # the peer was closed: this end reads its data, then EOF
        else:
            self._waiting[peer_id] = _detach(b)
        return _detach(a)

    # bound / unconnected unix sockets
    def _unix_alone(self, u, where: str) -> socket.socket:
        sk = self._new(socket.AF_UNIX, u.type | socket.SOCK_CLOEXEC)
        try:
            _set_opts(sk, u.opts)
            if u.name:
                _unix_bind(sk, u)
            if u.state == S.TCP_LISTEN:
                sk.listen(u.backlog)
            _finish(sk, u, opts=False)
        except BaseException:
            sk.close()
            raise
        return sk

    # TCP connections (TCP_REPAIR) / TCP and UDP sockets
    def _tcp(self, fe, where: str) -> socket.socket:
        i = fe.isk
        e, outq = self.source.tcp_stream(fe.id)
        inq = b"".join(self.source.socket_queue(fe.id))
        src = (S.addr_text(i.family, i.src_addr), i.src_port)
        dst = (S.addr_text(i.family, i.dst_addr), i.dst_port)
        try:
            sk = tcp.make(e, i.family, src, dst, inq, outq, new=self._new)
        except OSError as err:
            raise KernelError(f"re-make TCP connection {describe(i)} (TCP_REPAIR)", err.errno,
                              path=where, step="tcp repair") from None
        try:
            _set_opts(sk, i.opts)
            fcntl.fcntl(sk.fileno(), fcntl.F_SETFL, i.flags & SETFL)
        except BaseException:
            sk.close()
            raise
        return sk

    def _inet(self, i, where: str) -> socket.socket:
        sk = _inet_socket(i, self._new)
        try:
            _set_opts(sk, i.opts)
            if i.src_port:
                try:
                    _inet_bind(sk, i)
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        raise RestoreFailed(f"address {describe(i)} is in use on this host",
                                            path=where, step="socket", err=e.errno) from None
                    raise
            if i.state == S.TCP_LISTEN:
                sk.listen(i.backlog)
            elif i.proto == socket.IPPROTO_UDP and i.dst_port:
                sk.connect((S.addr_text(i.family, i.dst_addr), i.dst_port))
            _finish(sk, i, opts=False)
        except BaseException:
            sk.close()
            raise
        return sk


def _original(index: Index, fid: int, ino: int) -> tuple[int, int] | None:
    """(pid, fd) of the original socket if it is still here, frozen (a move on one host)."""
    held = index.holders.get(fid)
    if held is None:
        return None
    pid, fd = held
    try:
        if os.readlink(f"/proc/{pid}/fd/{fd}") != f"socket:[{ino}]":
            return None
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        same_net = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return (pid, fd) if state in ("t", "T") and same_net else None


def _detach(sk: socket.socket) -> int:
    return sk.detach()


def _fill(sender: socket.socket, receiver: socket.socket, q: list[bytes], where: str) -> None:
    """Queue `q` on `receiver` by sending it from `sender`, one send per message. The sender's
    buffer is forced big enough for the whole queue first (its recorded size is set after)."""
    if not q:
        return
    need = _fill_need(q)
    if need > sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
        _set_buf(sender, SO_SNDBUFFORCE, socket.SO_SNDBUF, need)
    for n, msg in enumerate(q):
        view = memoryview(msg)
        while True:
            try:
                sent = sender.send(view)
            except BlockingIOError:
                raise RestoreFailed(f"socket buffer full after {n} of {len(q)} queued "
                                    "messages", path=where, step="socket queue") from None
            if sender.type != socket.SOCK_STREAM or sent == len(view):
                break
            view = view[sent:]


def _fill_need(q: list[bytes]) -> int:
    """Send buffer that holds all of `q` at once (what the kernel charges per message)."""
    return sum(len(m) + SKB_OVERHEAD for m in q) + (64 << 10) if q else 0


def _has_net_admin() -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(eff, 16) >> 12 & 1)          # CAP_NET_ADMIN


def _buffer_limit() -> int:
    """The largest send buffer this process can give a socket (the kernel doubles the value
    it is given, up to net.core.wmem_max unless forced with CAP_NET_ADMIN)."""
    if _has_net_admin():
        return MAX_BUF // 2
    with open("/proc/sys/net/core/wmem_max") as f:
        return int(f.read()) * 2


def _set_buf(sk: socket.socket, forced: int, plain: int, value: int) -> None:
    """A buffer size past net.core.[rw]mem_max where CAP_NET_ADMIN allows (as CRIU does),
    else as far as the limit lets it (the plan refused queues that need more)."""
    try:
        sk.setsockopt(socket.SOL_SOCKET, forced, min(value, MAX_BUF // 2))
    except PermissionError:
        sk.setsockopt(socket.SOL_SOCKET, plain, min(value, MAX_BUF // 2))


def _finish(sk: socket.socket, rec, opts: bool = True) -> None:
    """Recorded buffer sizes and options, shutdown, and the file status flags."""
    if opts:
        _set_opts(sk, rec.opts)
    if rec.HasField("shutdown") and rec.shutdown in SHUT:
        try:
            sk.shutdown(SHUT[rec.shutdown])
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise
    fcntl.fcntl(sk.fileno(), fcntl.F_SETFL, rec.flags & SETFL)


def _set_opts(sk: socket.socket, o) -> None:
    """Buffer sizes as recorded (the kernel doubles what it is given; forced, as CRIU does,
    then the program's own lock bits), timeouts, and the SOL_SOCKET options."""
    sol = socket.SOL_SOCKET
    if o.so_sndbuf:
        _set_buf(sk, SO_SNDBUFFORCE, socket.SO_SNDBUF, o.so_sndbuf // 2)
    if o.so_rcvbuf:
        _set_buf(sk, SO_RCVBUFFORCE, socket.SO_RCVBUF, o.so_rcvbuf // 2)
    lock = o.so_buf_lock if o.HasField("so_buf_lock") else 0
    try:
        sk.setsockopt(sol, SO_BUF_LOCK, lock)     # forcing the sizes locked them: as recorded
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT or lock:  # before 5.14 there is no such option
            raise
    for prefix, opt in capture_files.TIMEOUTS.items():
        sec, usec = getattr(o, f"{prefix}_sec"), getattr(o, f"{prefix}_usec")
        if sec or usec:
            sk.setsockopt(sol, opt, struct.pack("<qq", sec, usec))     # struct timeval
    for field, opt in SETTABLE.items():
        if o.HasField(field) and (getattr(o, field) or field == "so_rcvlowat"):
            try:
                sk.setsockopt(sol, opt, int(getattr(o, field)))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                    raise


def _path_name(u) -> str:
    return os.fsdecode(u.name.split(b"\0", 1)[0])


def _unix_bind(sk: socket.socket, u) -> None:
    """Bind to the recorded name: abstract as is; a path after removing a socket file left
    there; a relative name from a thread whose own working directory is name_dir (the
    restorer's cwd is the whole process's). Then the file's mode and owner, and `deleted`."""
    if u.name[:1] == b"\0":
        sk.bind(u.name)
        return
    name = _path_name(u)
    path = os.path.join(u.name_dir, name) if u.HasField("name_dir") else name
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    if os.path.isabs(name):
        sk.bind(name)
    else:
        _in_dir(u.name_dir, lambda: sk.bind(name))
    if u.HasField("file_perms"):
        os.chmod(path, stat.S_IMODE(u.file_perms.mode))
        os.lchown(path, u.file_perms.uid, u.file_perms.gid)
    if u.HasField("deleted") and u.deleted:
        os.unlink(path)


def _unix_connect(sk: socket.socket, server) -> None:
    """Connect to a unix socket of the tree by its recorded name (a relative one from its
    name_dir, like the bind)."""
    if server.name[:1] == b"\0":
        sk.connect(server.name)
        return
    name = _path_name(server)
    if os.path.isabs(name) or not server.HasField("name_dir"):
        sk.connect(name)
    else:
        _in_dir(server.name_dir, lambda: sk.connect(name))


CLONE_FS = 0x200


def _in_dir(directory: str, fn) -> None:
    """fn() on a thread that unshared its filesystem context and entered `directory`."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    err: list = []

    def run():
        try:
            if libc.unshare(CLONE_FS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_FS)")
            os.chdir(directory)
            fn()
        except BaseException as e:    # handed to the caller's thread
            err.append(e)
    t = threading.Thread(target=run, name="ckptfs-bind")
    t.start()
    t.join()
    if err:
        raise err[0]


def _inet_socket(i, new=socket.socket) -> socket.socket:
    sk = new(i.family, i.type | socket.SOCK_CLOEXEC, i.proto)
    if i.family == socket.AF_INET6 and i.HasField("v6only"):
        sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(i.v6only))
    for field in ("reuseaddr", "so_reuseport"):
        if i.opts.HasField(field) and getattr(i.opts, field):
            sk.setsockopt(socket.SOL_SOCKET, SETTABLE[field], 1)
    return sk


def _inet_bind(sk: socket.socket, i) -> None:
    sk.bind((S.addr_text(i.family, i.src_addr), i.src_port))
