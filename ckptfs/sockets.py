"""Socket descriptors in the tree: fds/<n>/ files of a socket, both directions.

render(src, fdi, fe, sub) -> the files of fds/<n>/ beyond type/flags/open_file;
load(ts, base, key, flags) -> (fd type value, file id) or None when the tree's socket is not
restorable yet (TreeSource then lists it as unsupported and restore refuses it by path).
"""
from __future__ import annotations

SOCK_FAMILIES = {1: "unix", 2: "inet", 10: "inet6", 16: "netlink", 17: "packet"}
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
KINDS = ("UNIXSK", "INETSK", "PACKETSK", "NETLINKSK")


def render(src, fdi, tname: str, sub) -> dict[str, object]:
    if tname not in ("UNIXSK", "INETSK") or sub is None:
        return {}
    family = "unix" if tname == "UNIXSK" else SOCK_FAMILIES.get(sub.family, str(sub.family))
    return {"inode": sub.ino, "family": family,
            "sock_type": SOCK_TYPES.get(sub.type, str(sub.type))}


def load(ts, base: str, key: tuple, flags: int):
    """Not restorable yet: the caller records it as unsupported."""
    return None
