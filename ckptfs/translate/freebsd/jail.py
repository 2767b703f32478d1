"""Linux namespaces (model.Isolation) <-> FreeBSD jail parameters (jail_set(2), jail.conf(5)).

A jail is one object with parameters; Linux has seven independent namespaces. Each kind
maps to a few parameters when the root task has its own namespace of that kind, and to
"share the host's" when it does not. Kinds without a FreeBSD counterpart are lossy.

Parameter values are Python values: str for strings and jailsys words ("disable", "new",
"inherit"), int for numbers, True/False for booleans (jail.conf `persist;` / `nopersist;`).
"""
from __future__ import annotations

from ...errors import BadTree
from ...model import Isolation
from .. import LossLog

JAILSYS = {"disable": 0, "new": 1, "inherit": 2}
JAIL_CREATE, JAIL_UPDATE, JAIL_ATTACH, JAIL_DYING = 0x1, 0x2, 0x4, 0x8

# Known parameters and their kinds (jail(8) pseudo-parameters included: vnet.interface,
# exec.*, mount.*). Prefix rows end in ".".
PARAM_KINDS = {
    "name": "str", "path": "str", "persist": "bool", "host": "jailsys",
    "host.hostname": "str", "host.domainname": "str", "host.hostuuid": "str",
    "host.hostid": "int", "vnet": "jailsys", "vnet.interface": "str", "ip4": "jailsys",
    "ip4.addr": "str", "ip4.saddrsel": "bool", "ip6": "jailsys", "ip6.addr": "str",
    "ip6.saddrsel": "bool", "sysvmsg": "jailsys", "sysvsem": "jailsys", "sysvshm": "jailsys",
    "enforce_statfs": "int", "children.max": "int", "securelevel": "int",
    "devfs_ruleset": "int", "osrelease": "str", "osreldate": "int", "linux": "jailsys",
    "linux.osname": "str", "linux.osrelease": "str", "linux.oss_version": "int",
    "allow.": "bool", "exec.": "str", "mount.": "str", "mount.devfs": "bool",
}
INT_RANGES = {"enforce_statfs": (0, 2), "children.max": (0, 999999), "securelevel": (-1, 3)}
SYSV = ("sysvmsg", "sysvsem", "sysvshm")

# Per namespace kind: parameters when the root task owns one, when it shares the host's,
# and what is lost when it owns one.
NS_PARAMS = {
    "uts": ({"host": "new", "allow.set_hostname": True}, {"host": "inherit"}, None),
    "ipc": ({p: "new" for p in SYSV}, {p: "inherit" for p in SYSV},
            "SysV IPC keys get their own space (sysv*=new), but POSIX message queues are not "
            "per-jail on FreeBSD"),
    "net": ({"vnet": "new"}, {"ip4": "inherit", "ip6": "inherit"},
            "vnet=new gives an empty network stack: interfaces, addresses, routes, firewall "
            "rules and socket state of the network namespace are not carried"),
    "mnt": ({"enforce_statfs": 1}, {"enforce_statfs": 0},
            "FreeBSD has one global mount table: the jail sees the mounts below its path "
            "(enforce_statfs=1); the namespace's own mounts are not recreated"),
    "pid": ({}, {}, "jails have no PID namespace: PIDs stay host-global (a jail only hides "
                    "other processes), so the checkpoint's PIDs are not guaranteed"),
    "user": ({}, {}, "no user namespaces on FreeBSD: uid/gid maps must be applied to file "
                     "ownership before restore"),
    "cgroup": ({}, {}, "no cgroup namespace: the limits travel as RCTL rules"),
    "time": ({}, {}, "no time namespace: CLOCK_MONOTONIC/BOOTTIME offsets are lost"),
}


def jail_name(root_pid: int) -> str:
    """Jail names may not contain dots (they separate hierarchical names)."""
    return f"ckptfs_{root_pid}"


def to_jail(iso: Isolation, name: str, linux_release: str, log: LossLog,
            path: str = "isolation") -> dict:
    params: dict = {"name": name, "path": "/", "persist": True}
    own = set(iso.own_namespaces)
    for kind, (own_p, shared_p, lost) in NS_PARAMS.items():
        params.update(own_p if kind in own else shared_p)
        if kind in own and lost:
            log.note(f"{path}/own", kind, lost)
    if "uts" in own:
        params["host.hostname"] = iso.hostname or ""
        params["host.domainname"] = iso.domainname or ""
    params["children.max"] = 0
    params["linux"] = "new"
    params["linux.osname"] = "Linux"
    if linux_release:
        params["linux.osrelease"] = linux_release
    return params


def from_jail(params: dict, log: LossLog, path: str = "plan/jail.conf") -> Isolation:
    own = []
    if params.get("host") == "new" or "host.hostname" in params:
        own.append("uts")
    sysv = {params.get(p, "inherit") for p in SYSV}
    if "new" in sysv:
        own.append("ipc")
        if sysv != {"new"}:
            log.note(path, " ".join(f"{p}={params.get(p)}" for p in SYSV),
                     "Linux has one IPC namespace for all three SysV kinds")
    if params.get("vnet") == "new":
        own.append("net")
    if params.get("enforce_statfs", 2) != 0:
        own.append("mnt")
    uts = "uts" in own
    return Isolation(hostname=params.get("host.hostname") if uts else None,
                     domainname=params.get("host.domainname") if uts else None,
                     own_namespaces=tuple(own))


# -- validation (used by the plan parser) --------------------------------------------------------
def param_kind(name: str) -> str | None:
    if name in PARAM_KINDS:
        return PARAM_KINDS[name]
    for prefix, kind in PARAM_KINDS.items():
        if prefix.endswith(".") and name.startswith(prefix) and len(name) > len(prefix):
            return kind
    return None


def check_value(name: str, value, path: str):
    """The value as the kind wants it, or BadTree naming the file, parameter and value."""
    kind = param_kind(name)
    if kind is None:
        raise BadTree(f"unknown jail parameter {name!r}", path=path)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise BadTree(f"{name} is a boolean (write `{name};` or `no{name};`), got {value!r}",
                      path=path)
    if isinstance(value, bool):
        raise BadTree(f"{name} needs a value ({kind})", path=path)
    if kind == "jailsys":
        if value not in JAILSYS:
            raise BadTree(f"{name} = {value!r}: want one of {', '.join(JAILSYS)}", path=path)
        return value
    if kind == "int":
        return _check_int(name, value, path)
    return str(value)


def _check_int(name: str, value, path: str) -> int:
    try:
        num = int(str(value), 0)
    except ValueError:
        raise BadTree(f"{name} = {value!r} is not a number", path=path) from None
    lo, hi = INT_RANGES.get(name, (-(1 << 31), (1 << 31) - 1))
    if not lo <= num <= hi:
        raise BadTree(f"{name} = {num} is out of range {lo}..{hi}", path=path)
    return num
