"""sk-queues.img: messages waiting on sockets, the way CRIU keeps them.

    file   := IMG_COMMON SK_QUEUES-magic packet*
    packet := SIZE sk_packet_entry  `length` raw bytes      (id_for: the receiving socket's id)

Packets of one socket are in queue order. framing.KINDS knows the magic but no layout for it
yet, so this module frames it with framing's pieces (same '<I' integers, same checks).
"""
from __future__ import annotations

import os

from .. import pb
from ..errors import BadImage
from . import framing

NAME = "sk-queues.img"
KIND = framing.BY_NAME["SK_QUEUES"]


def write(path: str, packets: list[tuple[int, bytes]]) -> None:
    """(socket file id, message bytes) pairs, in queue order per socket."""
    out = [framing.U32.pack(KIND.head), framing.U32.pack(KIND.magic)]
    for id_for, data in packets:
        out.append(framing.encode_entry(pb.sk_packet_entry(id_for=id_for, length=len(data)), path))
        out.append(bytes(data))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(out))
    os.replace(tmp, path)


def read(path: str) -> dict[int, list[bytes]]:
    """socket file id -> its queued messages, oldest first ({} if the image is absent)."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        r = framing._Reader(path, f.read())
    head, magic = r.u32("magic"), r.u32("image magic")
    if (head, magic) != (KIND.head, KIND.magic):
        raise BadImage(f"not an sk-queues image (magic 0x{head:08x} 0x{magic:08x})",
                       path=str(path), step="read image")
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
