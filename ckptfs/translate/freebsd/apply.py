"""Put the Linux values a FreeBSD plan gives back (`LinuxValues`) onto a checkpoint.

    apply_linux(source, values) -> AppliedSource      a model.Source: `source` with the
        registers, signal masks, signal dispositions, descriptor flags and isolation of
        `values`; memory, maps, files' names and everything else come from `source`
    check_plan(source, plan_dir, strict=False) -> AppliedSource
        a plan directory (perhaps edited) read, translated back and applied: every edit the
        checkpoint cannot take raises BadTree naming the plan file and the value
    through_freebsd(source, workdir, edit=None, strict=False) -> AppliedSource
        the whole trip: to_freebsd -> write_plan(workdir) -> edit(plan dir) -> read_plan ->
        from_freebsd -> apply_linux

What the plan has no file for (memory, maps, file names and positions, creds, rlimits,
timers, sigaltstack, rseq, pending signals, the xsave area) passes through from `source`
unchanged; `to_freebsd` lists the non-default parts of it in plan/lossy as not carried by a
FreeBSD restore, so a Linux restore of the result shows the translation of what the plan does
carry, not everything a FreeBSD host would lose.

Everything is checked and computed when the AppliedSource is made, so an edit the checkpoint
cannot take (a task, thread or descriptor the checkpoint does not have, two descriptors of one
open file given different flags, an io.max without a device) raises BadTree naming the plan
file and the value before anything reads the result: `tree.write_tree(applied, dir)` never
starts on a checkpoint that would fail half way.
"""
from __future__ import annotations

import os

from ... import flags as L
from ... import pb
from ...errors import BadTree
from ...model import Isolation, Source
from . import rctl as R
from .convert import FD_TYPE_NAMES, SUBMESSAGE, LinuxValues, from_freebsd, to_freebsd
from .plan import read_plan, write_plan

DEAD = (L.TASK_STATES["zombie"], L.TASK_STATES["dead"])
NS_ORDER = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
PASS_THROUGH = ("meta", "pstree", "ids", "mm", "fs", "pipe_data", "file_deleted",
                "file_contents", "page_ranges", "read_memory", "socket_queue", "tcp_stream",
                "task_tty")


class AppliedSource(Source):
    """`inner` with the translated values in place (see the module docstring)."""

    def __init__(self, inner: Source, values: LinuxValues, plan_root: str = "plan"):
        self.inner, self.values, self.plan_root = inner, values, plan_root
        self.frozen = inner.frozen
        self.lossy = list(values.lossy)
        self._cores: dict[int, object] = {}
        self._fdinfo: dict[int, list] = {}
        self._files: dict[int, object] = {}
        self._owners: dict[int, tuple[int, str]] = {}   # file id -> (flags, plan file) set
        self._check_tasks()
        for pid, tids in inner.tasks():
            if inner.core(pid).tc.task_state in DEAD:
                continue            # a zombie keeps only its core: nothing of it runs again
            self._apply_task(pid, tids, values.tasks[pid])
        self._iso = self._apply_isolation(inner.isolation(), values.isolation)

    def _where(self, rel: str) -> str:
        return os.path.join(self.plan_root, rel)

    def _check_tasks(self) -> None:
        have = set(self.inner.pids())
        want = set(self.values.tasks)
        if have != want:
            extra, missing = sorted(want - have), sorted(have - want)
            raise BadTree(f"the plan has tasks {sorted(want)}, the checkpoint {sorted(have)}"
                          f" (extra {extra}, missing {missing}): tasks cannot be added or "
                          "removed by editing the plan", path=self._where("tasks"))

    # -- per task ------------------------------------------------------------------------------
    def _apply_task(self, pid: int, tids: list[int], task) -> None:
        base = f"tasks/{pid}"
        if set(tids) != set(task.regs):
            raise BadTree(f"the plan has threads {sorted(task.regs)}, the checkpoint "
                          f"{sorted(tids)}", path=self._where(f"{base}/threads"))
        for tid in tids:
            core = pb.core_entry()
            core.CopyFrom(self.inner.core(tid))
            gp = core.thread_info.gpregs
            for tree_name, criu_name in L.GP_REGS:
                setattr(gp, criu_name, task.regs[tid][tree_name])
            if tid == pid:
                core.tc.blk_sigset = task.sigmask[tid]
                self._apply_sigactions(core.tc, task.sigactions)
            else:
                core.thread_core.blk_sigset = task.sigmask[tid]
            self._cores[tid] = core
        self._fdinfo[pid] = self._apply_fds(pid, task.fds)

    @staticmethod
    def _apply_sigactions(tc, acts: dict) -> None:
        """All CRIU slots, in order; a signal the plan does not name gets the default action
        (what the FreeBSD side would have: its disposition was dropped as lossy)."""
        del tc.sigactions[:]
        for sig in L.SIGACTION_SIGNALS:
            a = acts.get(sig, {"handler": 0, "flags": 0, "restorer": 0, "mask": 0})
            tc.sigactions.add(sigaction=a["handler"], flags=a["flags"], restorer=a["restorer"],
                              mask=a["mask"])

    def _apply_fds(self, pid: int, fds: dict) -> list:
        base = f"tasks/{pid}/fds"
        infos = list(self.inner.fdinfo(pid))
        have = {i.fd for i in infos}
        if have != set(fds):
            raise BadTree(f"the plan has descriptors {sorted(fds)}, the checkpoint "
                          f"{sorted(have)}: descriptors cannot be added or removed by editing "
                          "the plan", path=self._where(base))
        out = []
        for info in infos:
            kind, flags = fds[info.fd]
            path = self._where(f"{base}/{info.fd}/type")
            real_kind = FD_TYPE_NAMES.get(info.type, str(info.type))
            if kind != real_kind:
                raise BadTree(f"type {kind!r}: the checkpoint's descriptor {info.fd} is "
                              f"{real_kind} (the type cannot be changed)", path=path)
            new = pb.fdinfo_entry()
            new.CopyFrom(info)
            new.flags = (info.flags & ~L.FD_CLOEXEC) | (L.FD_CLOEXEC if flags & L.O_CLOEXEC else 0)
            self._set_file_flags(info, kind, flags & ~L.O_CLOEXEC,
                                 self._where(f"{base}/{info.fd}/flags"))
            out.append(new)
        return out

    def _set_file_flags(self, info, kind: str, flags: int, path: str) -> None:
        """Open flags belong to the open file, which several descriptors may share."""
        file_id, entry = info.id, self._file(info.id)
        sub_name = SUBMESSAGE.get(kind)
        if sub_name is None or not entry.HasField(sub_name):
            return
        sub = getattr(entry, sub_name)
        if kind == "FIFO":                       # a FIFO keeps its open flags in its reg entry
            file_id, entry = sub.regf_id, self._file(sub.regf_id)
            sub = entry.reg
        if "flags" not in sub.DESCRIPTOR.fields_by_name:
            return
        done = self._owners.get(file_id)
        if done is not None and done[0] != flags:
            raise BadTree(f"flags {L.render_open_flags(flags)}: this descriptor shares its open "
                          f"file with {done[1]}, which says {L.render_open_flags(done[0])}; "
                          "give both the same flags", path=path)
        self._owners[file_id] = (flags, path)
        sub.flags = flags

    def _file(self, file_id: int):
        if file_id not in self._files:
            entry = pb.file_entry()
            entry.CopyFrom(self.inner.file(file_id))
            self._files[file_id] = entry
        return self._files[file_id]

    # -- isolation -----------------------------------------------------------------------------
    def _apply_isolation(self, inner: Isolation, back: Isolation) -> Isolation:
        """Hostname, namespaces the task owns and limits as the plan says; what a jail does
        not carry (namespace inodes, cgroup path, network, mounts) stays the checkpoint's."""
        own = set(back.own_namespaces)
        iso = Isolation(namespaces=dict(inner.namespaces), cgroup=inner.cgroup, net=inner.net,
                        mounts=inner.mounts,
                        own_namespaces=tuple(k for k in NS_ORDER if k in own),
                        hostname=back.hostname if "uts" in own else inner.hostname,
                        domainname=back.domainname if "uts" in own else inner.domainname)
        iso.limits = dict(back.limits)
        if "io.max" in iso.limits:
            iso.limits["io.max"] = self._io_max(inner.limits.get("io.max"), iso.limits["io.max"])
        return iso

    def _io_max(self, inner: str | None, back: str) -> str:
        """RCTL IO limits have no device: put the amounts back on the checkpoint's devices."""
        amounts = back.split()[1:]
        devices = [ln.split()[0] for ln in (inner or "").splitlines() if ln.strip()]
        if not devices:
            rules = " ".join(f"{R.IO_KEYS[k]}={v}" for k, _, v in (a.partition("=") for a in amounts))
            raise BadTree(f"{rules}: cgroup io.max limits one block device, and the checkpoint "
                          "names none; remove these rules", path=self._where("rctl.rules"))
        return "\n".join(f"{dev} {' '.join(amounts)}" for dev in devices)

    # -- the Source interface ------------------------------------------------------------------
    def core(self, tid: int):
        return self._cores.get(tid) or self.inner.core(tid)

    def fdinfo(self, pid: int) -> list:
        return self._fdinfo[pid] if pid in self._fdinfo else self.inner.fdinfo(pid)

    def file(self, file_id: int):
        return self._files.get(file_id) or self.inner.file(file_id)

    def isolation(self) -> Isolation:
        return self._iso

    def __getattr__(self, name: str):
        # Anything else a particular Source offers (TreeSource.unsupported, chunk_path ...).
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _delegate(name: str):
    def method(self, *args):
        return getattr(self.inner, name)(*args)
    method.__name__ = name
    method.__doc__ = f"Unchanged from the checkpoint (`inner.{name}`)."
    return method


for _name in PASS_THROUGH:
    setattr(AppliedSource, _name, _delegate(_name))


def apply_linux(source: Source, values: LinuxValues, plan_root: str = "plan") -> AppliedSource:
    """`source` with `values` in place; plan_root names the plan directory in messages."""
    return AppliedSource(source, values, plan_root)


def check_plan(source: Source, plan_dir: str, strict: bool = False) -> AppliedSource:
    values = from_freebsd(read_plan(plan_dir), strict=strict)
    return apply_linux(source, values, plan_dir)


def through_freebsd(source: Source, workdir: str, edit=None, strict: bool = False) -> AppliedSource:
    """Linux checkpoint -> FreeBSD plan files under workdir/plan -> `edit(plan_dir)` (if
    given: change the files as a user would) -> parsed back -> Linux form -> applied."""
    root = write_plan(to_freebsd(source, strict=strict), workdir)
    if edit is not None:
        edit(root)
    return check_plan(source, root, strict)
