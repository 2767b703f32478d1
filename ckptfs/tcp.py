"""A connected TCP socket's state through TCP_REPAIR (Linux 3.5+, needs CAP_NET_ADMIN), both
ways: `read(sock)` on a copy of a frozen task's socket, `make(entry, ...)` in the restorer.

In repair mode the kernel shows and accepts what a connection is: the sequence numbers after
its two queues, the queues' bytes (peeked, never consumed, never sent on the wire), the
options agreed at the handshake, the window. A socket put into repair mode, bound and
connected, comes out ESTABLISHED without a packet: the peer sees nothing happen.
Values are CRIU's tcp_stream_entry; the receive queue travels as the socket's queue.
"""
from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

from . import pb

TCP = socket.IPPROTO_TCP
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WP = 1, 0, -1
RECV_QUEUE, SEND_QUEUE = 1, 2
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
# tcp_info.tcpi_options bits (the handshake's outcome)
OPTIONS = {"TCPI_OPT_TIMESTAMPS": 1, "TCPI_OPT_SACK": 2, "TCPI_OPT_WSCALE": 4,
           "TCPI_OPT_ECN": 8}
WINDOW = struct.Struct("<5I")     # struct tcp_repair_window
WINDOW_FIELDS = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")


def _ioctl_int(sk: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sk.fileno(), request, buf)
    return int.from_bytes(buf, "little", signed=True)


def read(sk: socket.socket) -> tuple[object, bytes, bytes]:
    """(tcp_stream_entry, receive queue, send queue) of an ESTABLISHED socket whose owner is
    stopped. The socket leaves repair mode without a window probe (nothing is sent)."""
    inq, outq, unsent = (_ioctl_int(sk, r) for r in (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD))
    info = sk.getsockopt(TCP, socket.TCP_INFO, 8)
    sk.setsockopt(TCP, TCP_REPAIR, REPAIR_ON)
    try:
        e = pb.tcp_stream_entry(inq_len=inq, outq_len=outq, unsq_len=unsent,
                                opt_mask=info[5], snd_wscale=info[6] & 0xF,
                                rcv_wscale=info[6] >> 4,
                                mss_clamp=sk.getsockopt(TCP, socket.TCP_MAXSEG),
                                timestamp=sk.getsockopt(TCP, TCP_TIMESTAMP) & 0xFFFFFFFF,
                                nodelay=bool(sk.getsockopt(TCP, socket.TCP_NODELAY)),
                                cork=bool(sk.getsockopt(TCP, socket.TCP_CORK)))
        for field, value in zip(WINDOW_FIELDS, WINDOW.unpack(
                sk.getsockopt(TCP, TCP_REPAIR_WINDOW, WINDOW.size))):
            setattr(e, field, value)
        e.inq_seq, rq = _queue(sk, RECV_QUEUE, inq)
        e.outq_seq, sq = _queue(sk, SEND_QUEUE, outq)
        return e, rq, sq
    finally:
        sk.setsockopt(TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)


def _queue(sk: socket.socket, which: int, length: int) -> tuple[int, bytes]:
    """(sequence number after the queue, its bytes) of one queue, in repair mode."""
    sk.setsockopt(TCP, TCP_REPAIR_QUEUE, which)
    seq = sk.getsockopt(TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    data = b""
    if length:
        data = sk.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) != length:
            raise OSError(0, f"queue {which}: peeked {len(data)} of {length} bytes")
    return seq, data


def make(e, family: int, src: tuple, dst: tuple, inq: bytes, outq: bytes,
         new=socket.socket) -> socket.socket:
    """An ESTABLISHED socket from `src` to `dst` carrying the recorded state and queues; the
    unsent tail of the send queue is sent normally once the socket is live. `new` makes the
    bare socket (in another network namespace, say)."""
    sk = new(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, TCP)
    try:
        sk.setsockopt(TCP, TCP_REPAIR, REPAIR_ON)
        _set_seq(sk, RECV_QUEUE, e.inq_seq - len(inq))
        _set_seq(sk, SEND_QUEUE, e.outq_seq - len(outq))
        sk.bind(src)
        sk.connect(dst)
        sk.setsockopt(TCP, TCP_REPAIR_OPTIONS, _options(e))
        sent_part = len(outq) - (e.unsq_len if e.HasField("unsq_len") else 0)
        _fill(sk, SEND_QUEUE, outq[:sent_part])
        _fill(sk, RECV_QUEUE, inq)
        if e.HasField("snd_wl1"):
            sk.setsockopt(TCP, TCP_REPAIR_WINDOW,
                          WINDOW.pack(*(getattr(e, f) for f in WINDOW_FIELDS)))
        if e.HasField("timestamp"):
            sk.setsockopt(TCP, TCP_TIMESTAMP, struct.pack("<I", e.timestamp))
        sk.setsockopt(TCP, TCP_REPAIR_QUEUE, 0)
        sk.setsockopt(TCP, TCP_REPAIR, REPAIR_OFF_NO_WP)   # no probe: the peer may not exist yet
        for opt, field in ((socket.TCP_NODELAY, "nodelay"), (socket.TCP_CORK, "cork")):
            if e.HasField(field) and getattr(e, field):
                sk.setsockopt(TCP, opt, 1)
        if sent_part < len(outq):
            sk.sendall(outq[sent_part:])
    except BaseException:
        sk.close()
        raise
    return sk


def _set_seq(sk: socket.socket, which: int, seq: int) -> None:
    sk.setsockopt(TCP, TCP_REPAIR_QUEUE, which)
    sk.setsockopt(TCP, TCP_QUEUE_SEQ, ctypes.c_int32(seq & 0xFFFFFFFF).value)


def _fill(sk: socket.socket, which: int, data: bytes) -> None:
    """Data put straight into a queue (repair mode: nothing goes on the wire)."""
    sk.setsockopt(TCP, TCP_REPAIR_QUEUE, which)
    view = memoryview(data)
    while view:
        view = view[sk.send(view):]


def _options(e) -> bytes:
    opts = [(TCPOPT_MSS, e.mss_clamp)]
    if e.opt_mask & OPTIONS["TCPI_OPT_WSCALE"]:
        opts.append((TCPOPT_WINDOW, e.snd_wscale | (e.rcv_wscale << 16)))
    if e.opt_mask & OPTIONS["TCPI_OPT_SACK"]:
        opts.append((TCPOPT_SACK_PERM, 0))
    if e.opt_mask & OPTIONS["TCPI_OPT_TIMESTAMPS"]:
        opts.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(struct.pack("<II", code, val) for code, val in opts)
