"""What the kernel tells about one socket through NETLINK_SOCK_DIAG (what `ss` and CRIU use).

procfs names a socket only by inode; the peer of a unix socket, a listener's backlog and its
waiting connections, a shutdown, and the inode of a bound path are only in sock_diag. A diag
socket answers for the network namespace it was made in, so it is made in the namespace of
the socket asked about (a thread of ours enters it, makes the netlink socket, and leaves).

    message := nlmsghdr(len u32, type u16, flags u16, seq u32, pid u32) body attributes*
    attr    := len u16, type u16, payload, padding to 4
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import socket
import struct
import threading

from ..errors import KernelError

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSG = struct.Struct("<IHHII")
NLATTR = struct.Struct("<HH")
NOCOOKIE = 0xFFFFFFFF
CLONE_NEWNET = 0x40000000
SIOCGSKNS = 0x894C

# unix_diag (linux/unix_diag.h)
UNIX_REQ = struct.Struct("<BBHIIIII")        # family proto pad states ino show cookie[2]
UNIX_MSG = struct.Struct("<BBBBIII")         # family type state pad ino cookie[2]
UDIAG_SHOW = {"name": 0x1, "vfs": 0x2, "peer": 0x4, "icons": 0x8, "rqlen": 0x10}
UNIX_ATTR = {0: "name", 1: "vfs", 2: "peer", 3: "icons", 4: "rqlen", 6: "shutdown"}
# inet_diag (linux/inet_diag.h): req_v2 with a zero socket id; msg up to idiag_inode
INET_REQ = struct.Struct("<BBBBI48s")
INET_MSG = struct.Struct("<BBBB48sIIIII")
ALL_STATES = 0xFFFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass
class UnixDiag:
    ino: int
    type: int
    state: int                  # TCP_* numbers, as the kernel keeps sk_state
    name: bytes = b""           # sun_path as bound (abstract names start with NUL)
    vfs: tuple[int, int] | None = None   # (inode, dev) of the bound path's file
    peer: int = 0               # inode of the peer socket
    icons: list[int] = dataclasses.field(default_factory=list)   # connections not accepted yet
    rqueue: int = 0             # listen: connections waiting; else bytes/packets queued
    wqueue: int = 0             # listen: the backlog
    shutdown: int = 0           # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2


@dataclasses.dataclass
class InetDiag:
    ino: int
    state: int
    rqueue: int                 # listen: connections waiting to be accepted
    wqueue: int                 # listen: the backlog


def unix(sock: socket.socket, ino: int, where: str) -> UnixDiag | None:
    """The diag record of a unix socket (None if the kernel no longer knows that inode)."""
    show = sum(UDIAG_SHOW.values())
    req = UNIX_REQ.pack(socket.AF_UNIX, 0, 0, ALL_STATES, ino, show, NOCOOKIE, NOCOOKIE)
    for body in _ask(sock, req, NLM_F_REQUEST, where):
        return _parse_unix(body)
    return None


def inet(sock: socket.socket, ino: int, where: str) -> InetDiag | None:
    """The diag record of a TCP/UDP socket, found by inode in a dump of its family."""
    proto = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
    req = INET_REQ.pack(sock.family, sock.proto or proto.get(sock.type, 0), 0, 0, ALL_STATES,
                        bytes(48))
    for body in _ask(sock, req, NLM_F_REQUEST | NLM_F_DUMP, where):
        family, state, _t, _r, _id, _exp, rq, wq, _uid, inode = INET_MSG.unpack_from(body)
        if inode == ino:
            return InetDiag(ino, state, rq, wq)
    return None


def _parse_unix(body: bytes) -> UnixDiag:
    _f, stype, state, _p, ino, _c1, _c2 = UNIX_MSG.unpack_from(body)
    d = UnixDiag(ino, stype, state)
    for kind, payload in _attrs(body[UNIX_MSG.size:]):
        name = UNIX_ATTR.get(kind)
        if name == "name":
            d.name = payload
        elif name == "vfs":
            d.vfs = struct.unpack("<II", payload[:8])
        elif name == "peer":
            d.peer = struct.unpack("<I", payload[:4])[0]
        elif name == "icons":
            d.icons = list(struct.unpack(f"<{len(payload) // 4}I", payload))
        elif name == "rqlen":
            d.rqueue, d.wqueue = struct.unpack("<II", payload[:8])
        elif name == "shutdown":
            d.shutdown = payload[0]
    return d


def _attrs(data: bytes):
    pos = 0
    while pos + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, pos)
        if length < NLATTR.size:
            return
        yield kind & 0x3FFF, data[pos + NLATTR.size:pos + length]
        pos += (length + 3) & ~3


def _ask(sock: socket.socket, req: bytes, flags: int, where: str) -> list[bytes]:
    """Bodies of the answers to one request, asked in the socket's network namespace."""
    nl = _diag_socket_for(sock, where)
    try:
        nl.send(NLMSG.pack(NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + req)
        return _replies(nl, where)
    finally:
        nl.close()


def _replies(nl: socket.socket, where: str) -> list[bytes]:
    out = []
    while True:
        data = nl.recv(1 << 16)
        pos = 0
        while pos + NLMSG.size <= len(data):
            length, kind, _fl, _seq, _pid = NLMSG.unpack_from(data, pos)
            body = data[pos + NLMSG.size:pos + length]
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                err = -struct.unpack_from("<i", body)[0]
                if err in (0, errno.ENOENT):
                    return out
                raise KernelError("sock_diag", err, step="sock_diag", path=where)
            out.append(body)
            pos += (length + 3) & ~3
        if not _more_follows(data):
            return out


def _more_follows(data: bytes) -> bool:
    """A dump answers in several datagrams until NLMSG_DONE; a single answer is one message
    with no multi-part flag (0x2)."""
    if len(data) < NLMSG.size:
        return False
    return bool(NLMSG.unpack_from(data)[2] & 0x2)


def _diag_socket_for(sock: socket.socket, where: str) -> socket.socket:
    try:
        ns = _socket_netns(sock)
    except OSError as e:
        raise KernelError("SIOCGSKNS (the socket's network namespace)", e.errno, path=where,
                          step="sock_diag") from None
    try:
        if os.fstat(ns).st_ino == os.stat("/proc/self/ns/net").st_ino:
            return _netlink()
        return in_netns(ns, _netlink, where)
    finally:
        os.close(ns)


def _netlink() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_SOCK_DIAG)


def _socket_netns(sock: socket.socket) -> int:
    import fcntl
    return fcntl.ioctl(sock.fileno(), SIOCGSKNS)


def in_netns(ns_fd: int, make, where: str):
    """make() run on a thread of ours that entered `ns_fd` (setns changes one thread only);
    the thread goes back to our own namespace before it ends."""
    result: dict = {}
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def run():
        if _libc.setns(ns_fd, CLONE_NEWNET) != 0:
            result["err"] = ctypes.get_errno()
            return
        try:
            result["value"] = make()
        finally:
            _libc.setns(home, CLONE_NEWNET)
    try:
        t = threading.Thread(target=run, name="ckptfs-netns")
        t.start()
        t.join()
    finally:
        os.close(home)
    if "err" in result:
        raise KernelError("setns into the socket's network namespace", result["err"],
                          path=where, step="sock_diag")
    return result["value"]
