"""A process's cgroup limits in cgroup v2 vocabulary, read from v1 or v2 hierarchies.

Each limit is read from the hierarchy that has the controller: a v1 mount that lists it
(`/sys/fs/cgroup/memory`), else the v2 unified mount if the file exists there. A controller
found nowhere gives v2's default ("max", all online CPUs). Only the task's own cgroup is read,
not its ancestors (a v2 file shows that cgroup's own limit; so does ours).

v1 -> v2 names:
    memory.limit_in_bytes                            -> memory.max
    memory.memsw.limit_in_bytes - memory.limit...    -> memory.swap.max (memsw counts both)
    pids.max                                         -> pids.max
    cpu.cfs_quota_us (-1 = none), cpu.cfs_period_us  -> cpu.max "quota period"
    cpuset.cpus                                      -> cpuset.cpus
"""
from __future__ import annotations

import os

from . import procfs

# v1 memory counters say "no limit" with PAGE_COUNTER_MAX pages: 0x7ffffffffffff000 on x86_64.
V1_UNLIMITED = 0x7FFFFFFFFFFFF000
LIMITS = ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cpuset.cpus")
_CONTROLLER = {"memory.max": "memory", "memory.swap.max": "memory", "pids.max": "pids",
               "cpu.max": "cpu", "cpuset.cpus": "cpuset"}


def mounts(mountinfo: list[procfs.Mount]) -> dict[str, procfs.Mount]:
    """Controller name -> its v1 mount; "" -> the v2 unified mount."""
    out = {}
    for m in mountinfo:
        if m.fstype == "cgroup2":
            out.setdefault("", m)
        elif m.fstype == "cgroup":
            for opt in m.super_options.split(","):
                if opt not in ("rw", "ro") and "=" not in opt:
                    out.setdefault(opt, m)
    return out


def task_path(lines: list[procfs.CgroupLine], controller: str) -> str | None:
    """Cgroup path of a task for a controller ("" = v2)."""
    for line in lines:
        if (controller == "" and not line.controllers and line.hierarchy == 0) or \
                controller in line.controllers:
            return line.path
    return None


def main_path(lines: list[procfs.CgroupLine]) -> str | None:
    """The task's cgroup as isolation/cgroup/path shows it: v1 memory's path, else v2's."""
    return task_path(lines, "memory") or task_path(lines, "")


def _dir(mount: procfs.Mount, path: str) -> str:
    if mount.root != "/" and path.startswith(mount.root):
        path = path[len(mount.root):]
    return os.path.join(mount.mount_point, path.lstrip("/"))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _v1_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    value = int(text)
    return None if value >= V1_UNLIMITED else value


def _v1_memory(d: str) -> dict[str, str]:
    mem = _v1_bytes(_read(os.path.join(d, "memory.limit_in_bytes")))
    memsw = _v1_bytes(_read(os.path.join(d, "memory.memsw.limit_in_bytes")))
    swap = "max" if memsw is None or mem is None else str(max(0, memsw - mem))
    return {"memory.max": "max" if mem is None else str(mem), "memory.swap.max": swap}


def _v1_cpu(d: str) -> dict[str, str]:
    quota = _read(os.path.join(d, "cpu.cfs_quota_us"))
    period = _read(os.path.join(d, "cpu.cfs_period_us")) or "100000"
    q = "max" if quota is None or int(quota) < 0 else quota
    return {"cpu.max": f"{q} {period}"}


def _v1_one(name: str):
    return lambda d: {name: _read(os.path.join(d, name)) or _default(name)}


_V1 = {"memory": _v1_memory, "cpu": _v1_cpu, "pids": _v1_one("pids.max"),
       "cpuset": _v1_one("cpuset.cpus")}


def _default(name: str) -> str:
    if name == "cpuset.cpus":
        return _read("/sys/devices/system/cpu/online") or ""
    return "max 100000" if name == "cpu.max" else "max"


def _v2(d: str, name: str) -> str | None:
    if name == "cpuset.cpus":
        return _read(os.path.join(d, "cpuset.cpus")) or _read(os.path.join(d, "cpuset.cpus.effective"))
    return _read(os.path.join(d, name))


def limits(lines: list[procfs.CgroupLine], mountinfo: list[procfs.Mount]) -> dict[str, str]:
    """The five v2 limits of a task (cgroup lines of /proc/PID/cgroup, our mountinfo)."""
    by_ctrl = mounts(mountinfo)
    out: dict[str, str] = {}
    for ctrl, reader in _V1.items():
        path = task_path(lines, ctrl)
        if ctrl in by_ctrl and path is not None:
            out.update(reader(_dir(by_ctrl[ctrl], path)))
    v2path = task_path(lines, "")
    for name in LIMITS:
        if name in out:
            continue
        value = None
        if "" in by_ctrl and v2path is not None:
            value = _v2(_dir(by_ctrl[""], v2path), name)
        out[name] = value if value else _default(name)
    return {name: out[name] for name in LIMITS}
