"""A container's own user namespace: its uid and gid maps and its setgroups setting.

    isolation/user/uid_map      0 100000 65536    (inside outside count, one range a line,
    isolation/user/gid_map      0 100000 65536     as /proc/PID/uid_map shows it to the host)
    isolation/user/setgroups    allow | deny

A restore makes the user namespace first (the namespace init unshares CLONE_NEWUSER alone),
writes the maps from outside (only a process in the parent namespace may map arbitrary ids),
then the init unshares the other namespaces, which the new user namespace then owns: its
root may mount a tmpfs or proc, configure its network and set its hostname there.

"outside" ids are host ids: the same numbers are used on the restoring host (an operator
moving to a host with other subordinate ranges edits the files). Ids in the rest of the tree
that come from the container's own view (tmpfs owners) go through these maps.
"""
from __future__ import annotations

import dataclasses

from ..errors import BadTree, KernelError, ProcessGone, Unsupported

TREE_DIR = "isolation/user"
MAPS = ("uid_map", "gid_map")
MAX_RANGES = 340       # the kernel's limit of lines in a map (Linux 4.15+)
ID_LIMIT = 1 << 32


@dataclasses.dataclass
class UserNs:
    uid_map: list[tuple[int, int, int]]   # (inside, outside, count)
    gid_map: list[tuple[int, int, int]]
    setgroups: str = "allow"

    def to_inside(self, uid: int, gid: int) -> tuple[int, int]:
        """A host (uid, gid) as the container sees it (the overflow id 65534 if unmapped)."""
        return _inside(self.uid_map, uid), _inside(self.gid_map, gid)


def _inside(ranges, host_id: int) -> int:
    for inside, outside, count in ranges:
        if outside <= host_id < outside + count:
            return inside + host_id - outside
    return 65534


# -- capture ---------------------------------------------------------------------------------------
def capture(pid: int) -> UserNs:
    return UserNs(*(parse_map(_read(f"/proc/{pid}/{m}"), f"/proc/{pid}/{m}") for m in MAPS),
                  setgroups=_read(f"/proc/{pid}/setgroups").strip())


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise ProcessGone("process exited", path=path, step="capture user namespace") from None
    except OSError as e:
        raise KernelError("cannot read", e.errno, path=path, step="capture user namespace") from e


# -- tree files ------------------------------------------------------------------------------------
def map_text(ranges) -> str:
    return "".join(f"{a} {b} {c}\n" for a, b, c in ranges)


def render(u: UserNs | None) -> dict[str, str]:
    if u is None:
        return {}
    return {"user/uid_map": map_text(u.uid_map) or "\n", "user/gid_map": map_text(u.gid_map) or "\n",
            "user/setgroups": u.setgroups + "\n"}


def parse_map(text: str, where: str) -> list[tuple[int, int, int]]:
    out = []
    for line in text.splitlines():
        f = line.split()
        if not f:
            continue
        if len(f) != 3 or not all(x.isdigit() for x in f) or int(f[2]) == 0 or \
                any(int(f[i]) + int(f[2]) > ID_LIMIT for i in (0, 1)):
            raise BadTree(f"expected 'inside outside count' (count > 0, ids below 2^32), "
                          f"not {line.strip()!r}", path=where)
        out.append((int(f[0]), int(f[1]), int(f[2])))
    if len(out) > MAX_RANGES:
        raise BadTree(f"{len(out)} ranges, the kernel takes at most {MAX_RANGES}", path=where)
    return out


def parse(read) -> UserNs | None:
    texts = {name: read(f"user/{name}") for name in (*MAPS, "setgroups")}
    if all(t is None for t in texts.values()):
        return None
    for name, text in texts.items():
        if text is None:
            raise BadTree("missing file (the user namespace's files go together)",
                          path=f"{TREE_DIR}/{name}")
    setgroups = texts["setgroups"].strip()
    if setgroups not in ("allow", "deny"):
        raise BadTree(f"setgroups must be allow or deny, not {setgroups!r}",
                      path=f"{TREE_DIR}/setgroups")
    maps = [parse_map(texts[m], f"{TREE_DIR}/{m}") for m in MAPS]
    for name, ranges in zip(MAPS, maps):
        if not ranges:
            raise BadTree("an empty map: nobody could act inside", path=f"{TREE_DIR}/{name}")
        _no_overlap(ranges, f"{TREE_DIR}/{name}")
    return UserNs(maps[0], maps[1], setgroups)


def _no_overlap(ranges, where: str) -> None:
    for side in (0, 1):
        spans = sorted((r[side], r[side] + r[2]) for r in ranges)
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            if b0 < a1:
                raise BadTree(f"ranges overlap at {b0} ({'inside' if side == 0 else 'outside'})",
                              path=where)


# -- restore (from outside, between the init's unshare(CLONE_NEWUSER) and the rest) ------------
def write_maps(u: UserNs, pid: int) -> None:
    """setgroups first (it must precede gid_map), then the maps of the task `pid`."""
    for name, text in (("setgroups", u.setgroups + "\n"), ("uid_map", map_text(u.uid_map)),
                       ("gid_map", map_text(u.gid_map))):
        path = f"/proc/{pid}/{name}"
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as e:
            raise Unsupported(f"the kernel refused {name} {text.strip()!r}: {e.strerror}",
                              path=f"{TREE_DIR}/{name}", step="user namespace") from e
