"""Socket descriptors in the tree: the files of fds/<n>/ for a socket, both directions.

render(src, fdi, tname, sub) -> the files of fds/<n>/ beyond type/flags/open_file;
load(ts, base, key, flags) -> (fd type value, file id), or None for a socket kind restore
cannot make (TreeSource then lists it as unsupported and restore refuses it by path).
Queued messages and TCP repair state come from Source.socket_queue / Source.tcp_stream.

One file per value (docs/FORMAT.md, fds/<n>/):

    family      unix | inet | inet6 (netlink, packet: shown only)
    sock_type   stream | dgram | seqpacket
    inode       the socket's inode             state      established | listen | close ...
    peer        inode of the connected peer (unix; absent: none or gone)
    name        unix: the bound address: a path, or @name for an abstract one (\\xNN escapes)
    name_dir    unix: directory a relative name was bound in
    deleted     unix: 1 if the bound path was removed (or now names another file)
    perms/{mode,uid,gid}   unix: the bound path's file
    proto, src_addr, src_port, dst_addr, dst_port, v6only    inet/inet6
    backlog     listen backlog                 shutdown   none | read | write | both
    opts/<name> socket options (SOL_SOCKET), getsockopt's values
    queue/<n>   bytes waiting to be read on THIS end, one file per message in queue order
                (a stream's bytes are one file); absent: nothing queued
    tcp/        an ESTABLISHED TCP socket's repair state (tcp.py; CRIU's tcp_stream_entry):
                inq_seq outq_seq options snd_wscale rcv_wscale mss timestamp snd_wl1 snd_wnd
                max_window rcv_wnd rcv_wup nodelay cork unsent, and outq (the send queue's
                bytes, the last `unsent` of them never sent); the receive queue is queue/0
"""
from __future__ import annotations

import os
import socket

from . import pb, tcp
from .flags import render_bits

SOCK_FAMILIES = {1: "unix", 2: "inet", 10: "inet6", 16: "netlink", 17: "packet"}
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
KINDS = ("UNIXSK", "INETSK", "PACKETSK", "NETLINKSK")
OTHER_KINDS = {"NETLINKSK": "netlink", "PACKETSK": "packet"}   # shown, never restored
# sk_state as the kernel keeps it (TCP_* numbers, unix sockets use the same ones)
STATES = {1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2",
          6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
          11: "closing"}
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
SHUTDOWN = {0: "none", 1: "read", 2: "write", 3: "both"}     # sk_shutdown enum values
PROTOS = {6: "tcp", 17: "udp"}
# tree name under opts/ -> sk_opts_entry field; every one is an integer (bools as 0/1)
OPTS = {"sndbuf": "so_sndbuf", "rcvbuf": "so_rcvbuf", "reuseaddr": "reuseaddr",
        "reuseport": "so_reuseport", "keepalive": "so_keepalive", "passcred": "so_passcred",
        "broadcast": "so_broadcast", "priority": "so_priority", "rcvlowat": "so_rcvlowat",
        "mark": "so_mark", "buf_lock": "so_buf_lock", "snd_timeout_sec": "so_snd_tmo_sec",
        "snd_timeout_usec": "so_snd_tmo_usec", "rcv_timeout_sec": "so_rcv_tmo_sec",
        "rcv_timeout_usec": "so_rcv_tmo_usec"}
# tcp/<name> -> tcp_stream_entry field (integers; options symbolic)
TCP_FIELDS = {"inq_seq": "inq_seq", "outq_seq": "outq_seq", "options": "opt_mask",
              "snd_wscale": "snd_wscale", "rcv_wscale": "rcv_wscale", "mss": "mss_clamp",
              "timestamp": "timestamp", "snd_wl1": "snd_wl1", "snd_wnd": "snd_wnd",
              "max_window": "max_window", "rcv_wnd": "rcv_wnd", "rcv_wup": "rcv_wup",
              "nodelay": "nodelay", "cork": "cork", "unsent": "unsq_len"}


# -- names --------------------------------------------------------------------------------
def render_name(raw: bytes) -> str:
    """A sun_path as one line: abstract names as @..., bytes outside printable ASCII (and a
    backslash, and a path's leading @) as \\xNN, so every name comes back exactly. A path
    name's terminating NUL (the kernel keeps it, and so does CRIU) is not shown."""
    abstract = raw[:1] == b"\0"
    body = raw[1:] if abstract else raw[:-1] if raw.endswith(b"\0") else raw
    out = []
    for i, b in enumerate(body):
        plain = 0x20 < b < 0x7F and b != 0x5C and not (b == 0x40 and i == 0 and not abstract)
        out.append(chr(b) if plain or (b == 0x20 and 0 < i < len(body) - 1) else f"\\x{b:02x}")
    return ("@" if abstract else "") + "".join(out)


def parse_name(text: str) -> bytes:
    abstract = text.startswith("@")
    body = text[1:] if abstract else text
    out, i = bytearray(), 0
    while i < len(body):
        if body[i] == "\\":
            if body[i + 1:i + 2] != "x" or len(body) < i + 4:
                raise ValueError(f"bad escape at {i} (want \\xNN)")
            out.append(int(body[i + 2:i + 4], 16))
            i += 4
        else:
            out += body[i].encode()
            i += 1
    return b"\0" + bytes(out) if abstract else bytes(out) + b"\0"


def addr_text(family: int, words) -> str:
    raw = b"".join(int(w).to_bytes(4, "little") for w in words)
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw[:16])


def addr_words(family: int, text: str) -> list[int]:
    raw = socket.inet_pton(family, text)
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def is_tcp_connected(sk) -> bool:
    return sk.DESCRIPTOR.name == "inet_sk_entry" and sk.proto == socket.IPPROTO_TCP and \
        sk.state == TCP_ESTABLISHED


# -- render: Source -> files ----------------------------------------------------------------
def render(src, fdi, tname: str, sub) -> dict[str, object]:
    if tname in OTHER_KINDS:
        return {"family": OTHER_KINDS[tname]}
    if tname not in ("UNIXSK", "INETSK") or sub is None:
        return {}
    out: dict[str, object] = {}
    if tname == "UNIXSK":
        out.update(_render_unix(sub))
    else:
        out.update(_render_inet(sub))
    if sub.state == TCP_LISTEN:
        out["backlog"] = sub.backlog
    out["shutdown"] = SHUTDOWN.get(sub.shutdown if sub.HasField("shutdown") else 0)
    for name, field in OPTS.items():
        if sub.opts.HasField(field):
            out[f"opts/{name}"] = int(getattr(sub.opts, field))
    for i, msg in enumerate(src.socket_queue(fdi.id)):
        out[f"queue/{i}"] = bytes(msg)
    if is_tcp_connected(sub):
        out.update(_render_tcp(src.tcp_stream(fdi.id)))
    return out


def _render_tcp(stream) -> dict[str, object]:
    if stream is None:
        return {}
    e, outq = stream
    out: dict[str, object] = {}
    for name, field in TCP_FIELDS.items():
        if e.HasField(field):
            value = getattr(e, field)
            shown = render_bits(value, tcp.OPTIONS) if name == "options" else int(value)
            out[f"tcp/{name}"] = shown
    out["tcp/outq"] = bytes(outq)
    return out


def _render_unix(u) -> dict[str, object]:
    out = {"family": "unix", "sock_type": SOCK_TYPES.get(u.type, str(u.type)), "inode": u.ino,
           "state": STATES.get(u.state, str(u.state))}
    if u.peer:
        out["peer"] = u.peer
    if u.name:
        out["name"] = render_name(u.name)
    if u.HasField("name_dir"):
        out["name_dir"] = u.name_dir
    if u.HasField("deleted") and u.deleted:
        out["deleted"] = 1
    if u.HasField("file_perms"):
        p = u.file_perms
        out.update({"perms/mode": f"0{p.mode:o}", "perms/uid": p.uid, "perms/gid": p.gid})
    return out


def _render_inet(i) -> dict[str, object]:
    out = {"family": SOCK_FAMILIES.get(i.family, str(i.family)),
           "sock_type": SOCK_TYPES.get(i.type, str(i.type)), "inode": i.ino,
           "state": STATES.get(i.state, str(i.state)), "proto": PROTOS.get(i.proto, str(i.proto)),
           "src_addr": addr_text(i.family, i.src_addr), "src_port": i.src_port}
    if i.state not in (TCP_LISTEN, TCP_CLOSE) or i.dst_port:
        out["dst_addr"], out["dst_port"] = addr_text(i.family, i.dst_addr), i.dst_port
    if i.HasField("v6only"):
        out["v6only"] = int(i.v6only)
    return out


# -- load: files -> Source -------------------------------------------------------------------
def load(ts, base: str, key: tuple, flags: int):
    """file id of a socket's entry built from fds/<n>/ (None: a family restore cannot make)."""
    from . import tree as T
    family = ts._read(f"{base}/family", T.STR) if ts._exists(f"{base}/family") else None
    if family not in ("unix", "inet", "inet6"):
        return None
    kind = "UNIXSK" if family == "unix" else "INETSK"
    build = _load_unix if family == "unix" else _load_inet

    def make(fid):
        fe = pb.file_entry(type=pb.fd_types.Value(kind), id=fid)
        sub = fe.usk if family == "unix" else fe.isk
        sub.id, sub.flags, sub.ino = fid, flags, ts._read(f"{base}/inode", T.DEC)
        sub.type = _word(ts, f"{base}/sock_type", SOCK_TYPES)
        sub.state = _word(ts, f"{base}/state", STATES)
        sub.fown.SetInParent()
        sub.backlog = ts._read(f"{base}/backlog", T.DEC) if ts._exists(f"{base}/backlog") else 0
        if ts._exists(f"{base}/shutdown"):
            sub.shutdown = _word(ts, f"{base}/shutdown", SHUTDOWN)
        _load_opts(ts, f"{base}/opts", sub.opts)
        build(ts, base, sub, family)
        _load_queue(ts, f"{base}/queue", fid)
        if ts._exists(f"{base}/tcp"):
            _load_tcp(ts, f"{base}/tcp", fid)
        return fe
    return pb.fd_types.Value(kind), ts._file_id(key, make)


def _word(ts, rel: str, table: dict[int, str]) -> int:
    from . import tree as T
    return ts._read(rel, T.names({v: k for k, v in table.items()}))


def _load_unix(ts, base: str, u, family: str) -> None:
    from . import tree as T
    u.uflags = 0
    u.peer = ts._read(f"{base}/peer", T.DEC) if ts._exists(f"{base}/peer") else 0
    u.name = ts._read(f"{base}/name", _NAME) if ts._exists(f"{base}/name") else b""
    if ts._exists(f"{base}/name_dir"):
        u.name_dir = ts._read(f"{base}/name_dir", T.STR)
    if ts._exists(f"{base}/deleted"):
        u.deleted = bool(ts._read(f"{base}/deleted", T.DEC))
    if ts._exists(f"{base}/perms"):
        u.file_perms.mode = ts._read(f"{base}/perms/mode", T._OCTMODE)
        u.file_perms.uid = ts._read(f"{base}/perms/uid", T.DEC)
        u.file_perms.gid = ts._read(f"{base}/perms/gid", T.DEC)


def _load_inet(ts, base: str, i, family: str) -> None:
    from . import tree as T
    fam = socket.AF_INET if family == "inet" else socket.AF_INET6
    i.family = int(fam)
    i.proto = ts._read(f"{base}/proto", T.names({v: k for k, v in PROTOS.items()}))
    i.src_port = ts._read(f"{base}/src_port", T.DEC)
    i.src_addr.extend(ts._read(f"{base}/src_addr", _addr(fam)))
    has_dst = ts._exists(f"{base}/dst_addr")
    i.dst_port = ts._read(f"{base}/dst_port", T.DEC) if has_dst else 0
    i.dst_addr.extend(ts._read(f"{base}/dst_addr", _addr(fam)) if has_dst
                      else addr_words(fam, "0.0.0.0" if fam == socket.AF_INET else "::"))
    if ts._exists(f"{base}/v6only"):
        i.v6only = bool(ts._read(f"{base}/v6only", T.DEC))


def _load_opts(ts, base: str, opts) -> None:
    from . import tree as T
    opts.so_sndbuf = opts.so_rcvbuf = 0
    opts.so_snd_tmo_sec = opts.so_snd_tmo_usec = opts.so_rcv_tmo_sec = opts.so_rcv_tmo_usec = 0
    present = set(os.listdir(ts._p(base))) if ts._exists(base) else set()
    unknown = {n for n in present if not n.startswith(".")} - set(OPTS)
    if unknown:
        from .errors import BadTree
        raise BadTree(f"unknown socket option {sorted(unknown)[0]!r} (known: "
                      f"{', '.join(OPTS)})", path=ts._p(base))
    for name, field in OPTS.items():
        if name in present:
            value = ts._read(f"{base}/{name}", T.DEC)
            kind = opts.DESCRIPTOR.fields_by_name[field].type
            setattr(opts, field, bool(value) if kind == 8 else value)   # 8: TYPE_BOOL


def _load_queue(ts, base: str, fid: int) -> None:
    """Queue files in message order; rsync's hidden temp files are not messages."""
    if not ts._exists(base):
        return
    names = [n for n in os.listdir(ts._p(base)) if not n.startswith(".")]
    bad = [n for n in names if not n.isdigit()]
    if bad:
        from .errors import BadTree
        raise BadTree(f"queue file name {bad[0]!r} is not a message number", path=ts._p(base))
    order = sorted(int(n) for n in names)
    if order != list(range(len(order))):
        from .errors import BadTree
        raise BadTree(f"queue messages are numbered {order}, not 0..{len(order) - 1}",
                      path=ts._p(base))
    ts.socket_queues[fid] = [ts._p(base, str(n)) for n in order]


def _load_tcp(ts, base: str, fid: int) -> None:
    from . import tree as T
    e = pb.tcp_stream_entry()
    for name, field in TCP_FIELDS.items():
        if not ts._exists(f"{base}/{name}"):
            continue
        codec = T.bits(tcp.OPTIONS) if name == "options" else T.DEC
        value = ts._read(f"{base}/{name}", codec)
        setattr(e, field, bool(value) if field in ("nodelay", "cork") else value)
    outq = ts._p(base, "outq")
    if not os.path.exists(outq):
        from .errors import BadTree
        raise BadTree("a TCP socket's repair state needs its send queue", path=outq)
    queued = ts.socket_queues.get(fid, [])
    e.inq_len = sum(os.path.getsize(p) for p in queued)
    e.outq_len = os.path.getsize(outq)
    missing = [n for n in ("inq_seq", "outq_seq", "options", "snd_wscale", "mss")
               if not e.HasField(TCP_FIELDS[n])]
    if missing:
        from .errors import BadTree
        raise BadTree(f"missing TCP state file(s) {', '.join(missing)}", path=ts._p(base))
    ts.tcp_streams[fid] = (e, outq)


def _name_codec():
    from . import tree as T
    return T.Codec(render_name, parse_name)


class _LazyCodec:
    """A tree Codec made on first use (tree imports this module)."""

    def __init__(self, make):
        self._make, self._codec = make, None

    def __getattr__(self, name):
        if self._codec is None:
            self._codec = self._make()
        return getattr(self._codec, name)


_NAME = _LazyCodec(_name_codec)


def _addr(family: int):
    from . import tree as T
    return T.Codec(lambda w: addr_text(family, w), lambda t: addr_words(family, t.strip()))
