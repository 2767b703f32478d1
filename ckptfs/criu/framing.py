"""CRIU image files: framing and the table of image kinds.

    file   := [HEAD] MAGIC entry*            HEAD: IMG_COMMON, IMG_SERVICE, or none (inventory)
    entry  := SIZE payload [extra]           SIZE: little-endian u32; payload: one protobuf message

Every integer of the framing is '<I' (CRIU writes host order; CRIU images exist only for
little-endian hosts we care about). There is no entry count: entries run to a clean EOF. What
follows an entry ("extra") and which message an entry holds is decided by a per-kind handler;
only the kinds whose layout differs (pagemap head, pipe data, ghost files) get special ones.

read_image() returns (kind, messages, extras): `extras[i]` is the raw payload after
`messages[i]` (bytes) or None. write_image() takes the same three and writes the same bytes.
"""
from __future__ import annotations

import dataclasses
import os
import struct

from google.protobuf.message import DecodeError

from .. import pb
from ..errors import BadImage

U32 = struct.Struct("<I")
IMG_COMMON = 0x54564319
IMG_SERVICE = 0x55105940


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str               # crit's name for the magic ("CORE", "PAGEMAP" ...)
    magic: int
    message: str | None     # entry message (CRIU name); None: no schema here (cannot decode)
    head: int | None = IMG_COMMON
    layout: str = "plain"   # plain | pagemap | data | ghost


# name, magic, message [, head, layout]. Legacy kinds are listed so their files are recognised.
KINDS = [Kind(*row) for row in [
    ("INVENTORY", 0x58313116, "inventory_entry", None),
    ("PSTREE", 0x50273030, "pstree_entry"),
    ("CORE", 0x55053847, "core_entry"),
    ("IDS", 0x54432030, "task_kobj_ids_entry"),
    ("MM", 0x57492820, "mm_entry"),
    ("PAGEMAP", 0x56084025, "pagemap_entry", IMG_COMMON, "pagemap"),
    ("FILES", 0x56303138, "file_entry"),
    ("FDINFO", 0x56213732, "fdinfo_entry"),
    ("FS", 0x51403912, "fs_entry"),
    ("PIPES_DATA", 0x56453709, "pipe_data_entry", IMG_COMMON, "data"),
    ("FIFO_DATA", 0x59333054, "pipe_data_entry", IMG_COMMON, "data"),
    ("REMAP_FPATH", 0x59133954, "remap_file_path_entry"),
    ("GHOST_FILE", 0x52583605, "ghost_file_entry", IMG_COMMON, "ghost"),
    ("MEMFD_INODE", 0x48453499, "memfd_inode_entry"),
    ("TTY_INFO", 0x59453036, "tty_info_entry"),
    ("TTY_DATA", 0x59413026, "tty_data_entry"),
    ("CGROUP", 0x59383330, "cgroup_entry"),
    ("SECCOMP", 0x64413049, "seccomp_entry"),
    ("UTSNS", 0x54473203, "utsns_entry"),
    ("IPC_VAR", 0x53115007, "ipc_var_entry"),
    ("USERNS", 0x55474906, "userns_entry"),
    ("TIMENS", 0x43114433, "timens_entry"),
    ("PIDNS", 0x61157326, "pidns_entry"),
    ("CREDS", 0x54023547, "creds_entry"),
    ("REG_FILES", 0x50363636, "reg_file_entry"),
    ("PIPES", 0x56513555, "pipe_entry"),
    ("FIFO", 0x58364939, "fifo_entry"),
    ("EVENTFD_FILE", 0x44523722, "eventfd_file_entry"),
    ("SIGNALFD", 0x57323820, "signalfd_entry"),
    ("TIMERFD", 0x50493712, "timerfd_entry"),
    ("NS_FILES", 0x61394011, "ns_file_entry"),
    ("UNIXSK", 0x54373943, "unix_sk_entry"),
    ("INETSK", 0x56443851, "inet_sk_entry"),
    ("TTY_FILES", 0x59433025, "tty_file_entry"),
    ("SIGACT", 0x55344201, "sa_entry"),
    ("VMAS", 0x54123737, "vma_entry"),
    ("SK_QUEUES", 0x56264026, None),
    ("TCP_STREAM", 0x51465506, None),
    ("MNTS", 0x55563928, None),
    ("NETNS", 0x55933752, None),
    ("NETDEV", 0x57373951, None),
    ("FILE_LOCKS", 0x54323616, None),
    ("APPARMOR", 0x59423047, None),
    ("STATS", 0x57093306, None, IMG_SERVICE),
    ("IRMAP_CACHE", 0x57004059, None, IMG_SERVICE),
]]
BY_NAME = {k.name: k for k in KINDS}
BY_MAGIC = {k.magic: k for k in KINDS}
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4


def _fail(path, offset, what) -> BadImage:
    return BadImage(f"at offset {offset}: {what}", path=str(path), step="read image")


class _Reader:
    """Cursor over the bytes of one image; every short read names the file and offset."""

    def __init__(self, path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def eof(self) -> bool:
        return self.pos == len(self.data)

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise _fail(self.path, self.pos,
                        f"truncated {what}: need {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return U32.unpack(self.take(4, what))[0]

    def message(self, name: str):
        at = self.pos
        size = self.u32("entry size")
        left = len(self.data) - self.pos
        if size > left:
            raise _fail(self.path, at, f"truncated {name} entry: size {size}, {left} bytes follow")
        payload = self.take(size, name)
        msg = getattr(pb, name)()
        try:
            msg.ParseFromString(payload)
        except DecodeError as e:
            raise _fail(self.path, at, f"cannot decode {name} ({size} bytes): {e}") from None
        if not msg.IsInitialized():   # CRIU (protobuf-c) rejects these too
            raise _fail(self.path, at, f"cannot decode {name} ({size} bytes): required "
                        f"field(s) missing: {', '.join(msg.FindInitializationErrors())}")
        return msg


def _read_plain(r: _Reader, kind: Kind):
    while not r.eof():
        yield r.message(kind.message), None


def _read_pagemap(r: _Reader, kind: Kind):
    if not r.eof():
        yield r.message("pagemap_head"), None
    while not r.eof():
        yield r.message("pagemap_entry"), None


def _read_data(r: _Reader, kind: Kind):
    while not r.eof():
        msg = r.message(kind.message)
        yield msg, r.take(msg.bytes, f"{msg.bytes} bytes of pipe {msg.pipe_id} data")


def _read_ghost(r: _Reader, kind: Kind):
    head = r.message("ghost_file_entry")
    if not head.chunks:
        yield head, r.take(len(r.data) - r.pos, "ghost content")
        return
    yield head, None
    while not r.eof():
        chunk = r.message("ghost_chunk_entry")
        yield chunk, r.take(chunk.len, f"ghost chunk of {chunk.len} bytes")


READERS = {"plain": _read_plain, "pagemap": _read_pagemap, "data": _read_data,
           "ghost": _read_ghost}


def read_header(r: _Reader) -> Kind:
    first = r.u32("magic")
    magic = r.u32("image magic") if first in (IMG_COMMON, IMG_SERVICE) else first
    kind = BY_MAGIC.get(magic)
    if kind is None:
        raise _fail(r.path, r.pos - 4, f"unknown image magic 0x{magic:08x}"
                    + (" (raw pages?)" if os.path.basename(str(r.path)).startswith("pages-")
                       else ""))
    if kind.message is None:
        raise _fail(r.path, r.pos - 4, f"image kind {kind.name} has no schema in ckptfs")
    return kind


def read_image(path) -> tuple[str, list, list]:
    """(kind name, messages, extras) of one PB image file."""
    with open(path, "rb") as f:
        r = _Reader(path, f.read())
    kind = read_header(r)
    pairs = list(READERS[kind.layout](r, kind))
    return kind.name, [m for m, _ in pairs], [x for _, x in pairs]


def encode_entry(msg, path) -> bytes:
    missing = msg.FindInitializationErrors()
    if missing:
        raise BadImage(f"{msg.DESCRIPTOR.name} lacks required field(s) {', '.join(missing)}",
                       path=str(path), step="write image")
    payload = msg.SerializeToString()
    return U32.pack(len(payload)) + payload


def _extra_len(kind: Kind, msg) -> int | None:
    """How many extra bytes an entry announces (None: any amount, e.g. whole ghost content)."""
    if kind.layout == "data":
        return msg.bytes
    if kind.layout == "ghost":
        return msg.len if msg.DESCRIPTOR.name == "ghost_chunk_entry" else None
    return 0


def _check_extra(kind: Kind, msg, extra, path) -> None:
    want, have = _extra_len(kind, msg), len(extra or b"")
    if want is not None and want != have:
        raise BadImage(f"{kind.name}: {msg.DESCRIPTOR.name} announces {want} extra bytes, "
                       f"{have} given", path=str(path), step="write image")


def image_bytes(kind_name: str, messages, extras=None, path="<memory>") -> bytes:
    kind = BY_NAME[kind_name]
    extras = extras if extras is not None else [None] * len(messages)
    if len(extras) != len(messages):
        raise BadImage(f"{len(messages)} messages but {len(extras)} extras", path=str(path),
                       step="write image")
    out = [U32.pack(kind.head)] if kind.head is not None else []
    out.append(U32.pack(kind.magic))
    for msg, extra in zip(messages, extras):
        _check_extra(kind, msg, extra, path)
        out.append(encode_entry(msg, path))
        if extra:
            out.append(bytes(extra))
    return b"".join(out)


def write_image(path, kind_name: str, messages, extras=None) -> None:
    """Write one PB image (atomically: a reader never sees half a file)."""
    data = image_bytes(kind_name, messages, extras, path)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
