"""Restore ahead: build the process while pre-copy passes arrive, finish it after the freeze.

    p = prepare(tree_dir, log=None)     # from a running tree (pre-copy): helpers forked in
                                        # shape, every VMA mapped, every chunk present filled
    result = p.finish(tree_dir)         # from the frozen tree: only the chunks that changed
                                        # are written again, then descriptors, signals,
                                        # threads, credentials, registers, and everyone runs
    p.cancel()                          # kill everything prepared (idempotent)

Why: a 1 GiB restore spends most of its time filling memory (0.3 s and more). Pre-copy
passes already bring nearly all of it before the freeze; filling it then leaves the
downtime with the working set (a few chunks) and the per-task calls (milliseconds).

The prepared tasks are ordinary LinuxRestorer tasks stopped half-way (ptrace-stopped, never
run): the restorer keeps its tracer thread between the two halves, and PTRACE_O_EXITKILL
kills them with the daemon. finish() refuses (`Stale`, after killing everything prepared)
when the frozen tree does not fit what was built: other tasks, another memory layout or mm
fields, a scratch page or pidfd slot the frozen tree needs, a chunk that vanished from a
map that cannot simply be zeroed. The caller then restores the normal way. A failure after
the tasks were released is a failed restore (RestoreFailed, everything killed), never Stale.

A chunk is written again when its file in the tree is not the one filled from: key (inode,
size, mtime, ctime), which any rename (rsync) or write changes. Chunk lists come from the
frozen manifest, never from a directory listing (a stale extra file is not memory).
"""
from __future__ import annotations

import os
import threading
import time

from .. import ptrace
from ..errors import CkptError, RestoreFailed
from ..inject import NR
from ..model import PageRange
from ..tree import TreeSource
from . import RestoreResult, binary_problems, memory, quiet_gc, tree_problems
from .files import FileTable
from .linux import PROT_WRITE, LinuxRestorer
from .plan import SPECIAL, V, make_plan

MADV_DONTNEED = 4
FILE_MAPS = V["VMA_FILE_PRIVATE"] | V["VMA_FILE_SHARED"]


class Stale(CkptError):
    """The prepared process does not fit the frozen tree; it was killed: restore normally."""


class ListedTree(TreeSource):
    """A tree whose chunks are the manifest's (frozen), or the chunk files present without
    rsync's hidden temp files (running: a pass may be writing next to us)."""

    def page_ranges(self, pid: int, vma) -> list[PageRange]:
        prefix = f"tasks/{pid}/maps/{vma.start:x}-{vma.end:x}/pages/"
        if self.frozen:
            names = [rel[len(prefix):] for rel in self.manifest["files"]
                     if rel.startswith(prefix) and "/" not in rel[len(prefix):]]
        else:
            try:
                names = [n for n in os.listdir(self._p(prefix)) if not n.startswith(".")]
            except FileNotFoundError:
                return []
        out = []
        for name in names:
            try:
                off = int(name, 16)
            except ValueError:
                raise Stale(f"chunk name {name!r} is not a hex offset", path=self._p(prefix))
            size = min(self.chunk_size, vma.end - vma.start - off)
            if off % self.chunk_size or size <= 0:
                raise Stale(f"chunk {name} is not a cell of this map", path=self._p(prefix))
            out.append(PageRange(vma.start + off, vma.start + off + size))
        return sorted(out, key=lambda r: r.start)


def chunk_key(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open(tree_dir: str) -> ListedTree:
    source = ListedTree(tree_dir)
    from . import container
    if container.isolation_of(source, None) is not None:
        raise Stale("a container is restored the normal way", path=tree_dir, step="prepare")
    return source


def prepare(tree_dir: str, *, log=None, **opts) -> "Prepared":
    """Build the process tree of `tree_dir` (running or frozen) ahead of its restore.
    Raises CkptError (nothing left behind) if it cannot be built."""
    if opts.get("pidns") or opts.get("same_pids"):
        raise Stale("prepared restores keep no pids", step="prepare")
    source = _open(tree_dir)
    if source.isolation().own_namespaces or opts.get("container"):
        # a container is rebuilt in its own namespaces by restore(); building it here would
        # put it in ours
        raise Stale("a container tree restores the normal way", step="prepare", path=source.root)
    p = Prepared(source, log=log)
    p.build()
    return p


class Prepared:
    def __init__(self, source: ListedTree, log=None):
        self.log = log or (lambda msg: None)
        plan = make_plan(source)
        if plan.problems:
            raise Stale("the running tree cannot be built yet:\n  " + "\n  ".join(plan.problems),
                        step="prepare", path=source.root)
        self.r = _Builder(plan, log=self.log)
        self.tracer: ptrace.Tracer | None = None
        self.timing: dict[str, float] = {}
        self._lock = threading.Lock()

    def build(self) -> None:
        t0 = time.monotonic()
        self.tracer = ptrace.Tracer("ckptfs-prepare")
        try:
            self.tracer.call(self.r.build)
        except BaseException:
            self.cancel()
            raise
        self.timing["build"] = time.monotonic() - t0
        self.log(f"prepared {len(self.r.live)} task(s), {self.r.timing.get('bytes', 0) >> 20} MiB "
                 f"in place, {self.timing['build']:.2f} s")

    def finish(self, tree_dir: str) -> RestoreResult:
        """Bring the prepared tasks to the frozen tree at tree_dir and let them run.
        Raises Stale (everything killed; restore normally) or RestoreFailed."""
        t0 = time.monotonic()
        with self._lock, quiet_gc():     # the downtime: no full collection in the middle
            if self.tracer is None:
                raise Stale("already finished or cancelled", step="finish", path=tree_dir)
            try:
                source = _open(tree_dir)
                problems = tree_problems(source) + binary_problems(source)
                plan = make_plan(source)
                problems += plan.problems
                if problems:
                    raise RestoreFailed("the checkpoint cannot be restored:\n  "
                                        + "\n  ".join(problems), step="validate")
                pids = self.tracer.call(self.r.finish, plan)
            except Stale:
                self._cancel()
                raise
            except CkptError as e:
                released = self.r.releasing
                self._cancel()
                if released:
                    raise
                raise Stale(f"finishing the prepared process failed: {e}", step="finish",
                            path=tree_dir) from e
            except BaseException:
                self._cancel()
                raise
            self._close()
        self.timing.update(self.r.timing, finish=time.monotonic() - t0)
        return RestoreResult(pids=pids, warnings=plan.warnings, timing=self.timing)

    def cancel(self) -> None:
        with self._lock:
            self._cancel()

    def _cancel(self) -> None:
        if self.tracer is not None:
            self.tracer.call(self.r._cleanup)
        self._close()

    def _close(self) -> None:
        if self.tracer is not None:
            self.r.files.close()
            self.tracer.close()
            self.tracer = None


class _Builder(LinuxRestorer):
    """LinuxRestorer in two halves: build() = tree + memory; finish(plan) = the rest."""

    def __init__(self, plan, log=None):
        super().__init__(plan, log=log)
        self.filled: dict[tuple[int, int, int], tuple] = {}   # (pid, vma start, off) -> key
        self.writable: dict[int, set[int]] = {}               # pid -> maps made writable
        self.releasing = False
        self.built: dict[int, tuple] = {}     # pid -> (layout, mm) as built, files' keys then

    # -- first half ---------------------------------------------------------------------
    def build(self) -> None:
        self.built = {t.pid: (_layout(self.src, t), _mm(self.src, t))
                      for t in self.plan.tasks if not t.zombie}
        self._create_tree()
        for live in self.live.values():
            if not live.plan.zombie:
                self._build_memory(live)

    def _build_memory(self, live) -> None:
        t, inj, s = live.plan, live.inj, self.scratch
        from .plan import SCRATCH_SIZE, TASK_END
        inj.call(NR["munmap"], 0, s, step="unmap helper")
        inj.call(NR["munmap"], s + SCRATCH_SIZE, TASK_END - s - SCRATCH_SIZE, step="unmap helper")
        self._vdso(live)
        self._mm_map(live)
        fill, task_fds = [], {}
        writable = self.writable.setdefault(t.pid, set())
        for vma in t.vmas:
            if vma.status & SPECIAL:
                continue
            if self._map(live, vma, task_fds):
                fill.append(vma)
                if not vma.prot & PROT_WRITE:
                    writable.add(vma.start)      # stays writable until finish
        for fd in task_fds.values():
            inj.call(NR["close"], fd, step="close map files")
        keys = {}
        for vma in fill:
            for r in self.src.page_ranges(t.pid, vma):
                off = r.start - vma.start
                keys[(t.pid, vma.start, off)] = chunk_key(self.src.chunk_path(t.pid, vma, off))
        t0 = time.monotonic()
        n = memory.fill(self.src, t.pid, live.pid, fill, lambda v: self._where(
            t.pid, f"maps/{v.start:x}-{v.end:x}"), inj=inj, populate=self.populate, uffd=self.uffd)
        self.populate.clear()
        self.uffd.clear()
        self.filled.update(keys)
        self.timing["fill"] = self.timing.get("fill", 0) + time.monotonic() - t0
        self.timing["bytes"] = self.timing.get("bytes", 0) + n

    # -- second half --------------------------------------------------------------------
    def finish(self, plan) -> dict[int, int]:
        t0 = time.monotonic()
        self._adopt_plan(plan)
        for live in self.live.values():
            if not live.plan.zombie:
                self._refill(live)
        self.timing["refill"] = time.monotonic() - t0
        for live in self.live.values():
            if not live.plan.zombie:
                self._finish_task(live)
        self.timing["tasks"] = time.monotonic() - t0
        self.releasing = True
        self._release_all()
        self.timing["total"] = time.monotonic() - t0
        return {old: live.pid for old, live in self.live.items()}

    def _adopt_plan(self, plan) -> None:
        """Take the frozen tree's plan if it fits what was built (else Stale)."""
        old, new = self.plan, plan
        where = plan.source.root
        if _shape(old) != _shape(new):
            raise Stale("the process tree changed since it was prepared", path=where)
        if new.scratch != self.scratch:
            raise Stale("the scratch address moved", path=where)
        if self.pidfd_slot in {fdi.fd for t in new.tasks for fdi in t.fdinfo}:
            raise Stale(f"descriptor {self.pidfd_slot} (the restorer's slot) is now in use",
                        path=where)
        for t_new in new.tasks:
            if not t_new.zombie and self.built.get(t_new.pid) != (_layout(new.source, t_new),
                                                                  _mm(new.source, t_new)):
                raise Stale(f"task {t_new.pid}: memory layout changed since it was prepared",
                            path=where)
        self.files.close()
        self.plan, self.src = new, new.source
        self.files = FileTable(self.src, self.log)
        for t in new.tasks:
            self.live[t.pid].plan = t

    def _refill(self, live) -> None:
        """Write the chunks whose file changed since build; zero the ones that went away."""
        t, inj = live.plan, live.inj
        writable = self.writable.setdefault(t.pid, set())
        pieces, now = [], set()
        for vma in t.vmas:
            if vma.status & SPECIAL or vma.status & V["VMA_FILE_SHARED"]:
                continue
            for r in self.src.page_ranges(t.pid, vma):
                off = r.start - vma.start
                now.add((t.pid, vma.start, off))
                key = chunk_key(self.src.chunk_path(t.pid, vma, off))
                if key is None or key != self.filled.get((t.pid, vma.start, off)):
                    pieces.append((r, vma))
        for (pid, start, off), _ in list(self.filled.items()):
            if pid == t.pid and (pid, start, off) not in now:
                self._zero(live, start, off)
        for vma in {v.start: v for _, v in pieces}.values():
            if not vma.prot & PROT_WRITE and vma.start not in writable:
                inj.call(NR["mprotect"], vma.start, vma.end - vma.start, vma.prot | PROT_WRITE,
                         step="mprotect", path=self._where(t.pid, f"maps/{vma.start:x}-{vma.end:x}"))
                writable.add(vma.start)
        if pieces:
            n = memory._fill_from_chunks(
                self.src, t.pid, live.pid, [(r.start, r.end - r.start, v) for r, v in pieces],
                lambda v: self._where(t.pid, f"maps/{v.start:x}-{v.end:x}"))
            self.timing["refilled"] = self.timing.get("refilled", 0) + n
        for vma in t.vmas:
            if vma.start in writable:
                inj.call(NR["mprotect"], vma.start, vma.end - vma.start, vma.prot, step="mprotect",
                         path=self._where(t.pid, f"maps/{vma.start:x}-{vma.end:x}/prot"))

    def _zero(self, live, start: int, off: int) -> None:
        """A chunk filled at build is no longer saved: a private anonymous page that is not
        saved reads as zeros, which MADV_DONTNEED gives back; anything else is Stale."""
        vma = next(v for v in live.plan.vmas if v.start == start)
        if vma.status & FILE_MAPS or vma.status & V["VMA_ANON_SHARED"]:
            raise Stale(f"a chunk of a shared or file map went away: {start:x}+{off:#x}",
                        path=self._where(live.plan.pid, f"maps/{vma.start:x}-{vma.end:x}"))
        n = min(self.src.chunk_size, vma.end - vma.start - off)
        live.inj.call(NR["madvise"], start + off, n, MADV_DONTNEED, step="drop chunk",
                      path=self._where(live.plan.pid, f"maps/{vma.start:x}-{vma.end:x}"))


def _shape(plan) -> list[tuple]:
    return [(t.pid, t.ppid, t.pgid, t.sid, t.zombie) for t in plan.tasks]


def _layout(source, t) -> list[tuple]:
    out = []
    for v in t.vmas:
        name = _file_identity(source, v.shmid) if v.status & FILE_MAPS else v.shmid
        out.append((v.start, v.end, v.prot, v.flags, v.status, v.pgoff, name, v.madv))
    return out


def _mm(source, t) -> tuple:
    mm = t.mm
    return (mm.mm_start_code, mm.mm_end_code, mm.mm_start_data, mm.mm_end_data,
            mm.mm_start_brk, mm.mm_brk, mm.mm_start_stack, mm.mm_arg_start, mm.mm_arg_end,
            mm.mm_env_start, mm.mm_env_end, tuple(mm.mm_saved_auxv),
            _file_identity(source, mm.exe_file_id),
            mm.dumpable if mm.HasField("dumpable") else None)


def _file_identity(source, file_id: int) -> tuple:
    """A mapped file's name; for a deleted one (a ghost the restore makes from the tree) also
    its contents file's key, so that new contents copied in make the prepared process stale."""
    name = source.file(file_id).reg.name
    ghost = source._ghosts.get(file_id)
    return (name, chunk_key(ghost) if ghost else None)
