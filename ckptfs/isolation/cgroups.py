"""Cgroup limits in cgroup v2 vocabulary: read from v1 or v2, re-created on whichever is here.

The tree names limits as v2 does (docs/FORMAT.md `isolation/limits/`). A controller is used
through the hierarchy that has it: a v1 mount listing it (`/sys/fs/cgroup/memory`), else the
v2 unified mount if the controller is available there. v1 files say the same things in other
words; the translation both ways is a pair of tables of small functions:

    v2 name           v1 file(s)                                    notes
    memory.max        memory.limit_in_bytes                         >= 0x7ffffffffffff000 = max
    memory.swap.max   memory.memsw.limit_in_bytes - memory.limit..  memsw counts memory + swap
    pids.max          pids.max
    cpu.max           cpu.cfs_quota_us cpu.cfs_period_us            quota -1 = max
    cpuset.cpus       cpuset.cpus                                   a new v1 cpuset needs mems too
    io.max            blkio.throttle.{read,write}_{bps,iops}_device one line per device:
                                                                    "8:0 rbps=N wbps=max riops=max wiops=max"

Only the task's own cgroup is read (as v2 shows a cgroup's own limit), not its ancestors.
A value equal to v2's default is not written when re-creating, so a host without, say, swap
accounting still takes a tree whose swap limit is `max`. v1 rounds memory limits down to whole
pages: a limit that is not a page multiple comes back rounded.

Where new cgroups go: on v1, below the creating process's own cgroup of each hierarchy (a
restored container stays inside the limits its restorer lives under); on v2, below the root,
since v2 forbids controllers in a cgroup that has processes of its own.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import time
from typing import Callable

from ..errors import BadTree, KernelError, Unsupported
from . import mounts as _mounts

V1_UNLIMITED = 0x7FFFFFFFFFFFF000    # PAGE_COUNTER_MAX pages in bytes, x86_64: v1's "no limit"
LIMITS = ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cpuset.cpus", "io.max")
V2_CONTROLLER = {"memory.max": "memory", "memory.swap.max": "memory", "pids.max": "pids",
                 "cpu.max": "cpu", "cpuset.cpus": "cpuset", "io.max": "io"}
V1_CONTROLLER = {**V2_CONTROLLER, "io.max": "blkio"}
DEFAULTS = {"memory.max": "max", "memory.swap.max": "max", "pids.max": "max",
            "cpu.max": "max 100000", "io.max": ""}
IO_KEYS = {"rbps": "read_bps_device", "wbps": "write_bps_device",
           "riops": "read_iops_device", "wiops": "write_iops_device"}

_NUM_OR_MAX = re.compile(r"^(max|\d+)$")
_SYNTAX = {
    "memory.max": _NUM_OR_MAX, "memory.swap.max": _NUM_OR_MAX, "pids.max": _NUM_OR_MAX,
    "cpu.max": re.compile(r"^(max|\d+)( \d+)?$"),
    "cpuset.cpus": re.compile(r"^(\d+(-\d+)?(,\d+(-\d+)?)*)?$"),
    "io.max": re.compile(r"^(\d+:\d+( (rbps|wbps|riops|wiops)=(max|\d+))+\n?)*$"),
}

Read = Callable[[str], "str | None"]   # file name in the cgroup's directory -> text or None


def tree_file(name: str) -> str:
    return f"isolation/limits/{name}"


# -- hierarchies -----------------------------------------------------------------------------
def hierarchies(mountinfo: list[_mounts.MountInfo]) -> tuple[dict[str, _mounts.MountInfo],
                                                              _mounts.MountInfo | None]:
    """(v1 controller -> its mount, the v2 mount) from the reader's mountinfo."""
    v1, v2 = {}, None
    for m in mountinfo:
        if m.fstype == "cgroup2" and v2 is None:
            v2 = m
        elif m.fstype == "cgroup":
            for opt in m.super_options.split(","):
                if opt not in ("rw", "ro") and "=" not in opt:
                    v1.setdefault(opt, m)
    return v1, v2


def v2_controllers(v2: _mounts.MountInfo | None) -> set[str]:
    if v2 is None:
        return set()
    return set((_read_file(os.path.join(v2.target, "cgroup.controllers")) or "").split())


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup -> {v1 controller: path, "": v2 path}."""
    out = {}
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def cgroup_dir(mount: _mounts.MountInfo, path: str) -> str:
    """Directory of cgroup `path` (as /proc/PID/cgroup shows it) under `mount`."""
    if mount.root != "/" and _mounts._within(mount.root, path):
        path = path[len(mount.root):]
    return os.path.join(mount.target, path.lstrip("/")).rstrip("/")


def _read_file(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _reader(d: str) -> Read:
    return lambda name: _read_file(os.path.join(d, name))


# -- v1 -> v2 (reading) ----------------------------------------------------------------------
def _v1_bytes(text: str | None) -> int | None:
    """A v1 byte limit, None for no limit (or no file)."""
    if text is None:
        return None
    value = int(text)
    return None if value >= V1_UNLIMITED else value


def v1_memory(read: Read) -> dict[str, str]:
    mem = _v1_bytes(read("memory.limit_in_bytes"))
    memsw = _v1_bytes(read("memory.memsw.limit_in_bytes"))
    swap = "max" if memsw is None or mem is None else str(max(0, memsw - mem))
    return {"memory.max": "max" if mem is None else str(mem), "memory.swap.max": swap}


def v1_cpu(read: Read) -> dict[str, str]:
    quota, period = read("cpu.cfs_quota_us"), read("cpu.cfs_period_us") or "100000"
    return {"cpu.max": f"{'max' if quota is None or int(quota) < 0 else quota} {period}"}


def v1_pids(read: Read) -> dict[str, str]:
    return {"pids.max": read("pids.max") or "max"}


def v1_cpuset(read: Read) -> dict[str, str]:
    return {"cpuset.cpus": read("cpuset.cpus") or online_cpus()}


def v1_blkio(read: Read) -> dict[str, str]:
    devs: dict[str, dict[str, str]] = {}
    for key, suffix in IO_KEYS.items():
        for line in (read(f"blkio.throttle.{suffix}") or "").splitlines():
            dev, value = line.split()
            devs.setdefault(dev, {k: "max" for k in IO_KEYS})[key] = value
    return {"io.max": render_io(devs)} if devs else {}


def render_io(devs: dict[str, dict[str, str]]) -> str:
    def key(dev):
        return tuple(int(x) for x in dev.split(":"))
    return "\n".join(f"{d} " + " ".join(f"{k}={devs[d][k]}" for k in IO_KEYS)
                     for d in sorted(devs, key=key))


def parse_io(text: str) -> dict[str, dict[str, str]]:
    devs: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        dev, *pairs = line.split()
        entry = devs.setdefault(dev, {k: "max" for k in IO_KEYS})
        entry.update(p.split("=", 1) for p in pairs)
    return devs


V1_READERS = {"memory": v1_memory, "pids": v1_pids, "cpu": v1_cpu, "cpuset": v1_cpuset,
              "blkio": v1_blkio}


def v2_read(read: Read, name: str) -> str | None:
    if name == "cpuset.cpus":
        return read("cpuset.cpus") or read("cpuset.cpus.effective")
    if name == "io.max":
        text = read("io.max")
        return render_io(parse_io(text)) if text else None
    return read(name)


def online_cpus() -> str:
    return _read_file("/sys/devices/system/cpu/online") or "0"


def _default(name: str) -> str:
    return online_cpus() if name == "cpuset.cpus" else DEFAULTS[name]


def task_limits(pid: int | str) -> tuple[str | None, dict[str, str]]:
    """(cgroup path as isolation/cgroup/path shows it, limits) of a task, as this host sees it.

    io.max is present only if some device is throttled."""
    with open(f"/proc/{pid}/cgroup") as f:
        paths = parse_proc_cgroup(f.read())
    v1, v2 = hierarchies(_mounts.read_mountinfo("self"))
    out: dict[str, str] = {}
    for ctrl, reader in V1_READERS.items():
        if ctrl in v1 and ctrl in paths:
            out.update(reader(_reader(cgroup_dir(v1[ctrl], paths[ctrl]))))
    avail = v2_controllers(v2)
    for name in LIMITS:
        if name not in out and V2_CONTROLLER[name] in avail and "" in paths:
            value = v2_read(_reader(cgroup_dir(v2, paths[""])), name)
            if value:
                out[name] = value
        if name not in out and name != "io.max":
            out[name] = _default(name)
    main = paths.get("memory") if "memory" in v1 else paths.get("")
    return main, {n: out[n] for n in LIMITS if n in out}


# -- v2 -> files (writing) -------------------------------------------------------------------
def validate(limits: dict[str, str]) -> None:
    """Names and syntax, before anything is created: BadTree naming the file and value."""
    for name, value in limits.items():
        if name not in _SYNTAX:
            raise BadTree(f"unknown limit {name!r} (known: {' '.join(LIMITS)})",
                          path=tree_file(name))
        if not _SYNTAX[name].match(value.strip()):
            raise BadTree(f"malformed value {value!r}", path=tree_file(name))


def _is_default(name: str, value: str) -> bool:
    """True for a value that needs no write (v2's default; all online CPUs for cpuset.cpus)."""
    return value.strip() == (online_cpus() if name == "cpuset.cpus" else DEFAULTS.get(name))


Write = tuple[str, str, str, str]   # (controller, file, value, v2 limit name it comes from)


def v1_writes(limits: dict[str, str]) -> list[Write]:
    """v1 file writes, in an order the kernel accepts (memory before memsw, period before quota)."""
    out: list[Write] = []
    lim = {n: v.strip() for n, v in limits.items() if not _is_default(n, v)}
    if "memory.max" in lim:
        out.append(("memory", "memory.limit_in_bytes", lim["memory.max"], "memory.max"))
    if "memory.swap.max" in lim:
        mem = limits.get("memory.max", "max").strip()
        if mem == "max":
            raise Unsupported(f"cgroup v1 cannot limit swap ({lim['memory.swap.max']!r}) "
                              "without a memory limit", path=tree_file("memory.swap.max"))
        out.append(("memory", "memory.memsw.limit_in_bytes",
                    str(int(mem) + int(lim["memory.swap.max"])), "memory.swap.max"))
    if "pids.max" in lim:
        out.append(("pids", "pids.max", lim["pids.max"], "pids.max"))
    if "cpu.max" in lim:
        quota, _, period = lim["cpu.max"].partition(" ")
        out.append(("cpu", "cpu.cfs_period_us", period or "100000", "cpu.max"))
        out.append(("cpu", "cpu.cfs_quota_us", "-1" if quota == "max" else quota, "cpu.max"))
    if "cpuset.cpus" in lim:
        out.append(("cpuset", "cpuset.cpus", lim["cpuset.cpus"], "cpuset.cpus"))
    for dev, keys in parse_io(lim.get("io.max", "")).items():
        out += [("blkio", f"blkio.throttle.{IO_KEYS[k]}", f"{dev} {v}", "io.max")
                for k, v in keys.items() if v != "max"]
    return out


def v2_writes(limits: dict[str, str]) -> list[Write]:
    out: list[Write] = []
    for name in LIMITS:
        value = limits.get(name)
        if value is None or _is_default(name, value):
            continue
        lines = value.strip().splitlines() if name == "io.max" else [value.strip()]
        out += [(V2_CONTROLLER[name], name, line, name) for line in lines]
    return out


# -- a new cgroup with limits ----------------------------------------------------------------
class CgroupSet:
    """One new cgroup per hierarchy a limit needs; removed again by `remove()`."""

    def __init__(self, name: str):
        self.name = name
        self.dirs: list[str] = []      # created directories, in creation order

    @classmethod
    def create(cls, name: str, limits: dict[str, str]) -> "CgroupSet":
        """Create the cgroups and write the limits; on any failure remove what was created."""
        validate(limits)
        cg = cls(name)
        try:
            cg._build(limits)
        except BaseException:
            cg.remove()
            raise
        return cg

    def _build(self, limits: dict[str, str]) -> None:
        v1, v2 = hierarchies(_mounts.read_mountinfo("self"))
        v2_avail = v2_controllers(v2)
        with open("/proc/self/cgroup") as f:
            mine = parse_proc_cgroup(f.read())
        plan_v1 = [w for w in v1_writes(limits) if w[0] in v1]
        plan_v2 = [w for w in v2_writes(limits)
                   if V1_CONTROLLER[w[3]] not in v1 and w[0] in v2_avail]
        self._refuse_unplaced(limits, v1, v2_avail)
        needed = {V1_CONTROLLER[n] for n in limits if V1_CONTROLLER[n] in v1}
        for ctrl in [c for c in ("memory", "pids", "cpu", "cpuset", "blkio") if c in needed]:
            self._v1_dir(v1[ctrl], mine.get(ctrl, "/"), ctrl)
        for ctrl, fname, value, limit in plan_v1:
            self._write(self._dir_of(v1[ctrl], mine.get(ctrl, "/")), fname, value, limit)
        v2_ctrls = {V2_CONTROLLER[n] for n in limits
                    if V1_CONTROLLER[n] not in v1 and V2_CONTROLLER[n] in v2_avail}
        if v2_ctrls:
            d = self._v2_dir(v2, v2_ctrls)
            for _, fname, value, limit in plan_v2:
                self._write(d, fname, value, limit)

    @staticmethod
    def _refuse_unplaced(limits, v1, v2_avail) -> None:
        for name, value in limits.items():
            if V1_CONTROLLER[name] not in v1 and V2_CONTROLLER[name] not in v2_avail \
                    and not _is_default(name, value):
                raise Unsupported(f"no cgroup controller for {name} on this host (value {value!r})",
                                  path=tree_file(name))

    def _dir_of(self, mount, my_path: str) -> str:
        return os.path.join(cgroup_dir(mount, my_path), self.name)

    def _mkdir(self, d: str) -> None:
        if d in self.dirs:
            return     # co-mounted v1 controllers share one directory
        try:
            os.mkdir(d)
        except OSError as e:
            raise KernelError("cannot create cgroup", e.errno, path=d, step="cgroup") from e
        self.dirs.append(d)

    def _v1_dir(self, mount, my_path: str, ctrl: str) -> None:
        d = self._dir_of(mount, my_path)
        self._mkdir(d)
        if ctrl == "cpuset":     # a new v1 cpuset is empty: tasks cannot join until both are set
            parent = os.path.dirname(d)
            for fname in ("cpuset.mems", "cpuset.cpus"):
                self._write(d, fname, _read_file(os.path.join(parent, fname)) or "", None)

    def _v2_dir(self, v2, ctrls: set[str]) -> str:
        for c in sorted(ctrls):
            self._write(v2.target, "cgroup.subtree_control", f"+{c}", None)
        d = os.path.join(v2.target, self.name)
        self._mkdir(d)
        return d

    @staticmethod
    def _write(d: str, fname: str, value: str, limit: str | None) -> None:
        path = os.path.join(d, fname)
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            if limit is None:
                raise KernelError(f"cannot write {value!r}", e.errno, path=path, step="cgroup") from e
            raise Unsupported(f"value {value!r} refused by {path}: [{errno.errorcode.get(e.errno)}] "
                              f"{os.strerror(e.errno)}", path=tree_file(limit), step="cgroup") from e

    # -- membership ---------------------------------------------------------------------------
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def add(self, pid: int) -> None:
        for path in self.procs_files():
            try:
                with open(path, "w") as f:
                    f.write(str(pid))
            except OSError as e:
                raise KernelError(f"cannot move pid {pid}", e.errno, path=path, step="cgroup") from e

    def pids(self) -> set[int]:
        out: set[int] = set()
        for path in self.procs_files():
            out |= {int(p) for p in (_read_file(path) or "").split()}
        return out

    def remove(self, timeout: float = 5.0) -> None:
        """SIGKILL whatever is still inside, then rmdir each cgroup (children first)."""
        deadline = time.monotonic() + timeout
        for d in reversed(self.dirs):
            while os.path.isdir(d):
                if self._try_rmdir(d, deadline):
                    break
        self.dirs = [d for d in self.dirs if os.path.isdir(d)]

    def _try_rmdir(self, d: str, deadline: float) -> bool:
        try:
            os.rmdir(d)
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise KernelError("cannot remove cgroup", e.errno, path=d, step="cleanup") from e
        for pid in (_read_file(os.path.join(d, "cgroup.procs")) or "").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass     # exited between the read and the kill
        time.sleep(0.01)
        return False


def remove_dirs(dirs: list[str], timeout: float = 5.0) -> None:
    """Remove cgroups a restore left to its container (Container.release), killing what is
    still inside; children first (the list is in creation order)."""
    cg = CgroupSet("")
    cg.dirs = list(dirs)
    cg.remove(timeout)
