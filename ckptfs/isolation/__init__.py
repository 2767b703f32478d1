"""Container isolation on Linux: capture it from a live container, re-create it for a restore.

What a container has of its own is recorded in `ckptfs.model.Isolation` (namespaces, uts names,
cgroup limits in v2 vocabulary) plus two records this package adds: the network namespace's
configuration (`NetConfig`) and the mount namespace's own mounts (`Mount`). `ContainerIsolation`
is an `Isolation` with those two fields, until model.Isolation carries them itself.

Tree files for the two records (render_extra / parse_extra; docs/FORMAT.md `isolation/`):

    isolation/net/links/<ifname>/kind    veth | bridge | dummy | loopback | ... (IFLA_INFO_KIND)
    isolation/net/links/<ifname>/mac     02:11:22:33:44:55
    isolation/net/links/<ifname>/mtu     1500
    isolation/net/links/<ifname>/state   up | down          (IFF_UP, the administrative state)
    isolation/net/links/<ifname>/addrs   10.9.0.2/24        (one per line; empty line if none)
    isolation/net/links/<ifname>/peer    eth0p              (veth only, and only if the peer is
                                                             in the same namespace)
    isolation/net/routes                 default via 10.9.0.1 dev eth0   (one per line, `ip route`
                                                             syntax; routes the kernel adds by
                                                             itself for an address are left out)
    isolation/mounts                     tmpfs /scratch tmpfs rw,nosuid,size=1024k   (fstab form)

Further records, each in its own module (render / parse there; load_extra reads them all):

    isolation/time/{monotonic,boottime}   the container's clocks at the capture (timens.py)
    isolation/user/{uid_map,gid_map,setgroups}   its user namespace (userns.py)
    isolation/tmpfs/<n>/{target,index,files/...}   the files of each own tmpfs (tmpfs.py;
                                          kept on the Mount as `contents`)

`isolation/mounts` holds one line per mount the container has of its own, in fstab order
(source, mount point, type, options), with fstab's octal escapes for blanks. The facts come
from /proc/PID/mountinfo; the form is fstab's because mountinfo's ids and device numbers mean
nothing on another host, and a bind mount needs its source as a host path (type `none`,
option `bind`). The net tree exists only when the container has its own net namespace, and
`mounts` only when it has its own mount namespace.

Public API:
    capture_isolation(pid, reference=None) -> ContainerIsolation        (capture.py)
    render_extra(iso) -> {rel: text}; load_extra(iso, read, listdir, locate=None) -> iso
    copy_extra(src, dst): the records kept beside the dataclass fields (time, userns)
    Container.start(iso, argv, **popen_kw) / Container.create(...)      (create.py)
    spawn_in_namespaces(iso, argv, **popen_kw) -> Container             (create.py)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..errors import BadTree
from ..capture.procfs import unescape
from ..model import Isolation


@dataclasses.dataclass
class Link:
    """One network interface of the container's net namespace."""
    name: str
    kind: str = "loopback"
    mac: str = "00:00:00:00:00:00"
    mtu: int = 65536
    up: bool = True
    addrs: tuple[str, ...] = ()   # "10.9.0.2/24", "fd00::2/64"
    peer: str | None = None       # veth peer name when the peer is in the same namespace


@dataclasses.dataclass
class NetConfig:
    links: list[Link] = dataclasses.field(default_factory=list)
    routes: list[str] = dataclasses.field(default_factory=list)  # `ip route` syntax


@dataclasses.dataclass
class Mount:
    """One mount of the container's own, as an fstab line (bind mounts: fstype "none").
    `contents`: the files of a tmpfs (tmpfs.Contents), absent from the fstab line."""
    source: str
    target: str
    fstype: str
    options: str = "rw"
    contents: object | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def is_bind(self) -> bool:
        return "bind" in self.options.split(",")


ContainerIsolation = Isolation  # model.Isolation carries net and mounts itself now

# -- fstab escapes ---------------------------------------------------------------------------
_ESCAPES = {" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}


def escape(field: str) -> str:
    return "".join(_ESCAPES.get(c, c) for c in field)


# -- tree rendering: relative path under isolation/ -> text --------------------------------
def render_extra(iso: Isolation) -> dict[str, str]:
    """Files for the records this package adds to `iso` (absent records give no files).
    A tmpfs file's contents come as `tmpfs.Blob` (bytes whose encode() is themselves)."""
    from . import timens, tmpfs, userns
    files: dict[str, str] = {}
    files.update(timens.render(getattr(iso, "time", None)))
    files.update(userns.render(getattr(iso, "userns", None)))
    files.update(tmpfs.render(getattr(iso, "mounts", None) or []))
    net = getattr(iso, "net", None)
    if net is not None:
        for link in net.links:
            files.update(_render_link(link))
        files["net/routes"] = "".join(r + "\n" for r in net.routes) or "\n"
    mounts = getattr(iso, "mounts", None)
    if mounts is not None:
        files["mounts"] = "".join(render_mount(m) + "\n" for m in mounts) or "\n"
    return files


def _render_link(link: Link) -> dict[str, str]:
    d = f"net/links/{link.name}/"
    files = {d + "kind": link.kind + "\n", d + "mac": link.mac + "\n", d + "mtu": f"{link.mtu}\n",
             d + "state": ("up" if link.up else "down") + "\n",
             d + "addrs": "".join(a + "\n" for a in link.addrs) or "\n"}
    if link.peer is not None:
        files[d + "peer"] = link.peer + "\n"
    return files


def render_mount(m: Mount) -> str:
    return " ".join(escape(f) for f in (m.source, m.target, m.fstype, m.options))


def parse_mount(line: str, path: str = "isolation/mounts") -> Mount:
    fields = line.split()
    if len(fields) != 4:
        raise BadTree(f"expected 'source target type options', got {line!r}", path=path)
    return Mount(*(unescape(f) for f in fields))


# -- tree parsing ----------------------------------------------------------------------------
Reader = Callable[[str], "str | None"]   # relative path under isolation/ -> text, None if absent
Lister = Callable[[str], "list[str]"]    # relative dir under isolation/ -> entry names


def parse_extra(read: Reader, listdir: Lister) -> tuple[NetConfig | None, list[Mount] | None]:
    """The net and mount records from tree files (read gives None for an absent file)."""
    return _parse_net(read, listdir), _parse_mounts(read)


Locate = Callable[[str], str]      # relative path under isolation/ -> path of the tree file


def load_extra(iso: Isolation, read: Reader, listdir: Lister, locate: Locate | None = None) -> Isolation:
    """Fill `iso` with every record of this package from tree files: net, mounts, the time
    namespace's clocks, the user namespace's maps, and (with `locate`, which names the tree
    files binary contents are read from) each tmpfs's contents on its Mount."""
    from . import timens, tmpfs, userns
    iso.net, iso.mounts = parse_extra(read, listdir)
    iso.time = timens.parse(read)
    iso.userns = userns.parse(read)
    if locate is not None:
        tmpfs.attach(iso.mounts, read, listdir, locate)
    return iso


EXTRA_ATTRS = ("time", "userns")   # records kept on an Isolation beyond its dataclass fields


def copy_extra(src: Isolation, dst: Isolation) -> Isolation:
    """dataclasses.replace keeps fields only: carry the other records along."""
    for name in EXTRA_ATTRS:
        setattr(dst, name, getattr(src, name, None))
    return dst


def _parse_mounts(read: Reader) -> list[Mount] | None:
    text = read("mounts")
    if text is None:
        return None
    return [parse_mount(line) for line in text.splitlines() if line.strip()]


def _parse_net(read: Reader, listdir: Lister) -> NetConfig | None:
    routes = read("net/routes")
    names = listdir("net/links")
    if routes is None and not names:
        return None
    links = [_parse_link(read, name) for name in sorted(names)]
    return NetConfig(links=links, routes=[r.strip() for r in (routes or "").splitlines() if r.strip()])


def _need(read: Reader, rel: str) -> str:
    text = read(rel)
    if text is None:
        raise BadTree("missing file", path=f"isolation/{rel}")
    return text.strip()


def _parse_link(read: Reader, name: str) -> Link:
    d = f"net/links/{name}/"
    state, mtu = _need(read, d + "state"), _need(read, d + "mtu")
    if state not in ("up", "down"):
        raise BadTree(f"state must be up or down, not {state!r}", path=f"isolation/{d}state")
    if not mtu.isdigit():
        raise BadTree(f"mtu must be a decimal number, not {mtu!r}", path=f"isolation/{d}mtu")
    peer = read(d + "peer")
    addrs = tuple(a.strip() for a in (read(d + "addrs") or "").splitlines() if a.strip())
    return Link(name=name, kind=_need(read, d + "kind"), mac=_need(read, d + "mac"), mtu=int(mtu),
                up=state == "up", addrs=addrs, peer=peer.strip() if peer is not None else None)


def __getattr__(name):
    # Lazy re-exports: the namespace-init child imports create.py without pulling in capture.
    if name == "capture_isolation":
        from .capture import capture_isolation
        return capture_isolation
    if name in ("Container", "spawn_in_namespaces"):
        from . import create
        return getattr(create, name)
    raise AttributeError(name)
