"""cgroup.img -> the model's Isolation.cgroup path and limits (cgroup v2 vocabulary).

CRIU records, per controller hierarchy, the directories it dumped with their property files
(v1 names on a v1 hierarchy, v2 names on the unified one). The model speaks v2: this module
picks the root task's directory and translates the few limits the model carries.
"""
from __future__ import annotations

V1_UNLIMITED = 0x7FFFFFFFFFFFF000          # memory.limit_in_bytes when no limit is set


def _memory_max(props: dict) -> str | None:
    v = props.get("memory.limit_in_bytes")
    if v is None:
        return None
    return "max" if int(v) >= V1_UNLIMITED else str(int(v))


def _swap_max(props: dict) -> str | None:
    """v1 memsw is memory+swap; v2 swap.max is swap alone."""
    memsw, mem = props.get("memory.memsw.limit_in_bytes"), props.get("memory.limit_in_bytes")
    if memsw is None or mem is None:
        return None
    if int(memsw) >= V1_UNLIMITED:
        return "max"
    return str(max(int(memsw) - int(mem), 0))


def _cpu_max(props: dict) -> str | None:
    quota, period = props.get("cpu.cfs_quota_us"), props.get("cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return f"{'max' if int(quota) < 0 else int(quota)} {int(period)}"


# v2 limit -> how to get it from the properties of one directory (v2 names are taken as is).
LIMITS = {
    "memory.max": _memory_max,
    "memory.swap.max": _swap_max,
    "pids.max": lambda p: p.get("pids.max"),
    "cpu.max": _cpu_max,
    "cpuset.cpus": lambda p: p.get("cpuset.cpus"),
}


def task_set(entry, set_id: int):
    for s in entry.sets:
        if s.id == set_id:
            return s
    return None


def cgroup_path(members: dict[str, str]) -> str | None:
    """The v2 path, else the v1 memory controller's (FORMAT.md isolation/cgroup/path)."""
    if "" in members:
        return members[""]
    for name, path in members.items():
        if "memory" in name.split(","):
            return path
    return None


def _find_dir(dirs, parts: list[str]):
    """The cgroup_dir_entry at `parts` below a controller's top directories."""
    for d in dirs:
        names = [p for p in d.dir_name.strip("/").split("/") if p]
        if parts[:len(names)] == names:
            rest = parts[len(names):]
            return d if not rest else _find_dir(d.children, rest)
    return None


def _member_path(members: dict[str, str], cnames) -> str | None:
    """The task's path in the hierarchy holding `cnames` (a member is named "cpu,cpuacct";
    the v2 hierarchy is named "")."""
    want = {c for c in cnames if c}
    for name, path in members.items():
        if {c for c in name.split(",") if c} == want:
            return path
    return None


def limits(entry, members: dict[str, str]) -> dict[str, str]:
    """Limits of the task's cgroups in v2 names, from whatever properties CRIU recorded."""
    props: dict[str, str] = {}
    for ctl in entry.controllers:
        path = _member_path(members, ctl.cnames)
        if path is None:
            continue
        d = _find_dir(ctl.dirs, [p for p in path.strip("/").split("/") if p])
        if d is not None:
            props.update({p.name: p.value for p in d.properties})
    out = {}
    for name, get in LIMITS.items():
        value = props[name] if name in props else get(props)
        if value is not None:
            out[name] = value.strip()
    return out
