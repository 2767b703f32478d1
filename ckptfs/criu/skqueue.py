"""Socket payload images, the way CRIU keeps them.

    sk-queues.img          := IMG_COMMON SK_QUEUES-magic packet*
    packet                 := SIZE sk_packet_entry  `length` bytes   (id_for: receiving socket)
    tcp-stream-<ino>.img   := IMG_COMMON TCP_STREAM-magic SIZE tcp_stream_entry
                              `inq_len` bytes (receive queue)  `outq_len` bytes (send queue)

Packets of one socket are in queue order. framing.KINDS knows these magics but no layout
for them yet, so this module frames them with framing's pieces ('<I' integers, same checks).
"""
from __future__ import annotations

import os

from .. import pb
from ..errors import BadImage
from . import framing

NAME = "sk-queues.img"
KIND = framing.BY_NAME["SK_QUEUES"]
TCP_KIND = framing.BY_NAME["TCP_STREAM"]


def tcp_name(ino: int) -> str:
    return f"tcp-stream-{ino:x}.img"


def _write(path: str, kind, parts: list[bytes]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join([framing.U32.pack(kind.head), framing.U32.pack(kind.magic), *parts]))
    os.replace(tmp, path)


def _reader(path: str, kind, what: str):
    with open(path, "rb") as f:
        r = framing._Reader(path, f.read())
    head, magic = r.u32("magic"), r.u32("image magic")
    if (head, magic) != (kind.head, kind.magic):
        raise BadImage(f"not a {what} image (magic 0x{head:08x} 0x{magic:08x})",
                       path=str(path), step="read image")
    return r


def write(path: str, packets: list[tuple[int, bytes]]) -> None:
    """(socket file id, message bytes) pairs, in queue order per socket."""
    parts = []
    for id_for, data in packets:
        parts.append(framing.encode_entry(pb.sk_packet_entry(id_for=id_for, length=len(data)),
                                          path))
        parts.append(bytes(data))
    _write(path, KIND, parts)


def write_tcp(path: str, entry, inq: bytes, outq: bytes) -> None:
    e = pb.tcp_stream_entry()
    e.CopyFrom(entry)
    e.inq_len, e.outq_len = len(inq), len(outq)
    _write(path, TCP_KIND, [framing.encode_entry(e, path), bytes(inq), bytes(outq)])


def read_tcp(path: str):
    """(tcp_stream_entry, receive queue, send queue), or None if the image is absent."""
    if not os.path.exists(path):
        return None
    r = _reader(path, TCP_KIND, "tcp-stream")
    e = r.message("tcp_stream_entry")
    inq = r.take(e.inq_len, f"{e.inq_len} bytes of receive queue")
    outq = r.take(e.outq_len, f"{e.outq_len} bytes of send queue")
    if not r.eof():
        raise BadImage(f"{len(r.data) - r.pos} bytes after the send queue", path=str(path),
                       step="read image")
    return e, inq, outq


def read(path: str) -> dict[int, list[bytes]]:
    """socket file id -> its queued messages, oldest first ({} if the image is absent)."""
    if not os.path.exists(path):
        return {}
    r = _reader(path, KIND, "sk-queues")
    out: dict[int, list[bytes]] = {}
    while not r.eof():
        e = r.message("sk_packet_entry")
        if e.scm:
            raise BadImage(f"a message queued on socket {e.id_for} carries descriptors "
                           "(scm), which ckptfs does not restore", path=str(path),
                           step="read image")
        out.setdefault(e.id_for, []).append(r.take(e.length, f"{e.length} bytes of a message "
                                                             f"queued on socket {e.id_for}"))
    return out
