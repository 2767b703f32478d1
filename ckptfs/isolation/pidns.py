"""A live tree as the root's own pid namespace sees it: what a container dump records.

A container's tasks know each other by the pids of their pid namespace (the init is 1), and
that is what a restore into a new pid namespace brings back. /proc as ckptfs sees it shows
host pids, so `PidNsView` wraps a live Source and translates both ways:

    out (pstree, timer notify tids)   host pid -> the pid at the root's namespace level
    in  (every pid/tid argument)      namespace pid -> host pid

The level comes from the root's `NSpid` line in /proc/PID/status (one pid per namespace,
outermost first); a task's pid there is its entry at the same index, and `NSpgid` / `NSsid`
give group and session the same way (0 when the leader lives outside the namespace, as for
the init of `unshare --fork`). The root's parent is outside: its ppid is 0.

Live processes are addressed by host pid: whoever signals them (dump --kill, freeze) asks
`host_pids()`, never `pids()`.
"""
from __future__ import annotations

import threading

from ..errors import ProcessGone
from ..model import Source


def ns_fields(pid: int, tid: int | None = None) -> dict[str, list[int]]:
    """NSpid / NSpgid / NSsid of a task (or thread) as lists, outermost namespace first."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone("process exited", path=path, step="pid namespace") from None
    out = {}
    for line in lines:
        key, _, value = line.partition(":\t")
        if key in ("NSpid", "NSpgid", "NSsid"):
            out[key] = [int(v) for v in value.split()]
    return out


class PidNsView(Source):
    """`inner` (a live Source, host pids) with the pids of its root's pid namespace."""

    def __init__(self, inner: Source):
        self.inner = inner
        self.level = len(ns_fields(inner.root)["NSpid"]) - 1
        self._lock = threading.RLock()
        self._to_ns: dict[int, int] = {}
        self._to_host: dict[int, int] = {}

    # -- translation ----------------------------------------------------------------------
    def _ns(self, pid: int, tid: int | None = None) -> dict[str, int]:
        fields = ns_fields(pid, tid)
        return {k: (v[self.level] if len(v) > self.level else 0) for k, v in fields.items()}

    def _learn(self, host: int, ns: int) -> None:
        self._to_ns[host], self._to_host[ns] = ns, host

    def host(self, pid: int) -> int:
        """Host pid of namespace pid `pid` (a task or thread of the tree)."""
        with self._lock:
            if pid not in self._to_host:
                self.pstree()
            if pid not in self._to_host:
                raise ProcessGone(f"no task {pid} in the pid namespace of {self.inner.root}",
                                  path=f"/proc/{self.inner.root}/ns/pid", step="pid namespace")
            return self._to_host[pid]

    def ns_pid(self, host: int) -> int:
        with self._lock:
            if host not in self._to_ns:
                self.pstree()
            return self._to_ns.get(host, 0)

    def host_pids(self) -> list[int]:
        """The tree's processes by host pid (for signals), root first."""
        return self.inner.pids()

    # -- Source ----------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self.inner.frozen

    def pstree(self) -> list:
        out = []
        with self._lock:
            for e in self.inner.pstree():
                try:
                    ns = self._ns(e.pid)
                except ProcessGone:
                    if e.pid == self.inner.root:
                        raise
                    continue        # a short-lived child of a running tree, gone since the walk
                self._learn(e.pid, ns["NSpid"])
                threads = [t for t in e.threads if t == e.pid]
                for tid in e.threads:
                    if tid != e.pid:
                        try:
                            self._learn(tid, self._ns(e.pid, tid)["NSpid"])
                        except ProcessGone:
                            continue
                        threads.append(tid)
                copy = type(e)()
                copy.CopyFrom(e)
                copy.pid, copy.pgid, copy.sid = ns["NSpid"], ns["NSpgid"], ns["NSsid"]
                copy.ppid = self._to_ns.get(e.ppid, 0)
                del copy.threads[:]
                copy.threads.extend(self._to_ns[t] for t in threads)
                out.append(copy)
        return out

    def core(self, tid: int):
        core = self.inner.core(self.host(tid))
        if not core.HasField("tc") or not core.tc.HasField("timers"):
            return core
        posix = [p for p in core.tc.timers.posix if p.notify_thread_id]
        if not posix:
            return core
        copy = type(core)()
        copy.CopyFrom(core)
        for p in copy.tc.timers.posix:
            if p.notify_thread_id:
                p.notify_thread_id = self.ns_pid(p.notify_thread_id)
        return copy

    def ids(self, pid: int):
        return self.inner.ids(self.host(pid))

    def mm(self, pid: int):
        return self.inner.mm(self.host(pid))

    def fs(self, pid: int):
        return self.inner.fs(self.host(pid))

    def fdinfo(self, pid: int) -> list:
        return self.inner.fdinfo(self.host(pid))

    def page_ranges(self, pid: int, vma) -> list:
        return self.inner.page_ranges(self.host(pid), vma)

    def task_tty(self, pid: int) -> dict:
        info = dict(self.inner.task_tty(self.host(pid)))
        if "tty_pgrp" in info:
            info["tty_pgrp"] = self.ns_pid(info["tty_pgrp"])
        return info

    def alive(self) -> bool:
        return self.inner.alive()

    def socket_queue(self, file_id: int) -> list[bytes]:
        return self.inner.socket_queue(file_id)

    def tcp_stream(self, file_id: int):
        return self.inner.tcp_stream(file_id)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return self.inner.read_memory(self.host(pid), addr, size)

    def read_memory_into(self, pid: int, addr: int, buf) -> int:
        return self.inner.read_memory_into(self.host(pid), addr, buf)

    def thread_regs(self, tid: int):
        return self.inner.thread_regs(self.host(tid))

    def maps(self, pid: int):
        return self.inner.maps(self.host(pid))

    def meta(self):
        return self.inner.meta()

    def isolation(self):
        return self.inner.isolation()

    def file(self, file_id: int):
        return self.inner.file(file_id)

    def pipe_data(self, pipe_id: int) -> bytes:
        return self.inner.pipe_data(pipe_id)

    def file_deleted(self, file_id: int) -> bool:
        return self.inner.file_deleted(file_id)

    def file_contents(self, file_id: int) -> bytes:
        return self.inner.file_contents(file_id)

    def __getattr__(self, name):
        # freeze, thaw, close, warnings ...: the live source's own (they act on host pids)
        return getattr(self.inner, name)


def container_view(source: Source) -> PidNsView:
    """The view `ckptfs dump --container` / `mount --container` render (see module doc)."""
    return PidNsView(source)
