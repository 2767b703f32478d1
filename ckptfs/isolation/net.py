"""A container's network namespace: interfaces, addresses and routes, read and re-created.

Reading runs `ip -j` inside the container's net namespace (`nsenter -t PID -n`): a short-lived
process, so no thread of the caller ever changes namespace. Left out, because the kernel makes
them by itself: IPv6 link-local addresses, loopback's 127.0.0.1/8 and ::1, and routes with
protocol `kernel` (the prefix route of an address), IPv6 multicast and link-local routes.

Re-creating runs inside the new net namespace (the namespace init, create.py) with pyroute2.
A checkpoint has no peer to connect to, so an interface is re-created as itself only where that
needs nothing outside the namespace: loopback; a veth pair whose two ends were both inside;
a bridge. Every other interface (a veth whose peer was on the host, a macvlan, a NIC) becomes a
stand-in with the same name, MAC, MTU, state and addresses that carries no traffic out: a
`dummy` device, or an empty `bridge` where the kernel has no dummy driver (this machine: an
empty bridge is up with carrier, like a dummy). Routes go back with the same destination,
gateway, device and metric.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess

from ..errors import CkptError, ProcessGone, Unsupported
from . import Link, NetConfig

STAND_INS = ("dummy", "bridge")        # tried in order for an interface with no peer here
SELF_CONTAINED = ("bridge", "dummy")   # kinds that exist without anything outside
EOPNOTSUPP = 95
_AUTO_ADDRS = {"127.0.0.1/8", "::1/128"}   # loopback gets these when it goes up


# -- capture ---------------------------------------------------------------------------------
def _ip_json(pid: int, args: list[str]):
    argv = ["nsenter", "-t", str(pid), "-n", "ip", "-j", *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessGone("process exited", path=f"/proc/{pid}/ns/net", step="capture net")
        raise CkptError(f"{' '.join(argv)} failed: {r.stderr.strip()}",
                        path=f"/proc/{pid}/ns/net", step="capture net")
    return json.loads(r.stdout or "[]")


def link_from_json(entry: dict) -> Link:
    kind = entry.get("linkinfo", {}).get("info_kind") or \
        ("loopback" if entry.get("link_type") == "loopback" else entry.get("link_type", "ether"))
    peer = entry.get("link") if kind == "veth" and "link_netnsid" not in entry else None
    addrs = tuple(f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])
                  if not (a.get("family") == "inet6" and a.get("scope") == "link"))
    if kind == "loopback":
        addrs = tuple(a for a in addrs if a not in _AUTO_ADDRS)
    return Link(name=entry["ifname"], kind=kind, mac=entry.get("address", "00:00:00:00:00:00"),
                mtu=int(entry.get("mtu", 1500)), up="UP" in entry.get("flags", []),
                addrs=addrs, peer=peer)


def _kernel_made(r: dict) -> bool:
    dst = r.get("dst", "")
    return r.get("protocol") == "kernel" or r.get("type", "unicast") != "unicast" or \
        dst.startswith("fe80:") or dst.startswith("ff00:")


def route_from_json(r: dict) -> str | None:
    if _kernel_made(r):
        return None
    words = [r["dst"]]
    for key, word in (("gateway", "via"), ("dev", "dev"), ("prefsrc", "src"), ("metric", "metric")):
        if key in r:
            words += [word, str(r[key])]
    if r.get("scope") not in (None, "global", "universe"):
        words += ["scope", r["scope"]]
    return " ".join(words)


def capture(pid: int) -> NetConfig:
    links = sorted((link_from_json(e) for e in _ip_json(pid, ["-d", "addr", "show"])),
                   key=lambda link: link.name)     # the tree's order
    routes = _ip_json(pid, ["-4", "route", "show"]) + _ip_json(pid, ["-6", "route", "show"])
    return NetConfig(links=links, routes=[s for s in map(route_from_json, routes) if s])


# -- validation (before anything is created) -------------------------------------------------
def parse_route(line: str) -> dict[str, str]:
    """`ip route` words -> {"dst": ..., "via": ..., "dev": ..., "metric": ..., ...}."""
    words = line.split()
    if not words or len(words) % 2 == 0:
        raise ValueError(f"expected 'DST [via GW] dev DEV [metric N]', got {line!r}")
    out = {"dst": words[0]}
    out.update(zip(words[1::2], words[2::2]))
    return out


def validate(net: NetConfig) -> None:
    from ..errors import BadTree
    names = {link.name for link in net.links}
    for link in net.links:
        for a in link.addrs:
            try:
                ipaddress.ip_interface(a)
            except ValueError:
                raise BadTree(f"not an address/prefix: {a!r}",
                              path=f"isolation/net/links/{link.name}/addrs") from None
    for line in net.routes:
        try:
            r = parse_route(line)
        except ValueError as e:
            raise BadTree(str(e), path="isolation/net/routes") from None
        if r.get("dev") not in names:
            raise BadTree(f"route {line!r} names no recorded interface",
                          path="isolation/net/routes")


# -- re-create (runs inside the new net namespace) -------------------------------------------
def apply(net: NetConfig) -> dict[str, str]:
    """Create and configure every link, then the routes. Returns name -> kind actually made."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        made = _create_links(ipr, net.links)
        for link in net.links:
            _configure(ipr, link)
        for line in net.routes:
            _add_route(ipr, line)
    return made


def _create_links(ipr, links: list[Link]) -> dict[str, str]:
    from pyroute2.netlink.exceptions import NetlinkError
    names, made = {link.name for link in links}, {}
    for link in links:
        if link.kind == "loopback" or link.name in made:
            made.setdefault(link.name, link.kind)
            continue
        if link.kind == "veth" and link.peer in names:
            _netlink(lambda: ipr.link("add", ifname=link.name, kind="veth", peer=link.peer),
                     link, "kind", link.kind)
            made[link.name] = made[link.peer] = "veth"
            continue
        kinds = ((link.kind,) if link.kind in SELF_CONTAINED else ()) + STAND_INS
        for kind in kinds:
            try:
                ipr.link("add", ifname=link.name, kind=kind)
            except NetlinkError as e:
                if e.code == EOPNOTSUPP:
                    continue
                raise _refused(link, "kind", link.kind, e) from e
            made[link.name] = kind
            break
        else:
            raise Unsupported(f"no device kind of {kinds} exists here for {link.kind!r}",
                              path=f"isolation/net/links/{link.name}/kind", step="net")
    return made


def _refused(link: Link, fname: str, value, e) -> Unsupported:
    return Unsupported(f"value {value!r} refused: {e}", path=f"isolation/net/links/{link.name}/{fname}",
                       step="net")


def _netlink(call, link: Link, fname: str, value):
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        return call()
    except NetlinkError as e:
        raise _refused(link, fname, value, e) from e


def _configure(ipr, link: Link) -> None:
    idx = ipr.link_lookup(ifname=link.name)[0]
    if link.kind != "loopback":
        _netlink(lambda: ipr.link("set", index=idx, address=link.mac), link, "mac", link.mac)
        _netlink(lambda: ipr.link("set", index=idx, mtu=link.mtu), link, "mtu", link.mtu)
    for a in link.addrs:
        iface = ipaddress.ip_interface(a)
        _netlink(lambda: ipr.addr("add", index=idx, address=str(iface.ip),
                                  prefixlen=iface.network.prefixlen), link, "addrs", a)
    state = "up" if link.up else "down"
    _netlink(lambda: ipr.link("set", index=idx, state=state), link, "state", state)


def _add_route(ipr, line: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    r = parse_route(line)
    v6 = ":" in r.get("via", "") or ":" in r["dst"] or ":" in r.get("src", "")
    spec = {"dst": ("::/0" if v6 else "0.0.0.0/0") if r["dst"] == "default" else r["dst"],
            "oif": ipr.link_lookup(ifname=r["dev"])[0]}
    if "via" in r:
        spec["gateway"] = r["via"]
    if "metric" in r:
        spec["priority"] = int(r["metric"])
    if "src" in r:
        spec["prefsrc"] = r["src"]
    if "scope" in r:
        spec["scope"] = {"link": 253, "host": 254, "global": 0}.get(r["scope"], 0)
    try:
        ipr.route("add", **spec)
    except NetlinkError as e:
        raise Unsupported(f"route {line!r} refused: {e}", path="isolation/net/routes",
                          step="net") from e
