"""The image model: a checkpoint as CRIU messages, behind one read interface.

Everything above capture sees a checkpoint only through `Source`. Three things implement it:
the live process (capture.linux.LiveSource), a CRIU image directory (criu.ImageSource) and a
tree of files (tree.TreeSource). Whatever consumes a checkpoint (the tree renderer, `dump`,
`criu export`, restore) takes any of them.

Values are CRIU's (Linux form): messages from ckptfs.pb (generated from images/*.proto with
CRIU's message and field numbers). Identifier spaces follow CRIU: file ids index file_entry,
pipe ids are pipe inode numbers, pids are the pids seen in the checkpoint.

Methods raise errors.ProcessGone (live source lost its process), errors.BadTree /
errors.BadImage (malformed input, naming the file), errors.KernelError (a failed syscall).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

PAGE_SIZE = 4096
DEFAULT_CHUNK = 2 << 20  # memory chunk file size in a tree


@dataclasses.dataclass(frozen=True)
class PageRange:
    """Pages of one VMA whose contents belong in the checkpoint: [start, end), page aligned."""
    start: int
    end: int

    @property
    def nr_pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


@dataclasses.dataclass
class Meta:
    """What the checkpoint came from; goes to the tree's manifest (`source`)."""
    os: str = "linux"
    arch: str = "x86_64"
    kernel: str = ""
    hostname: str = ""
    xfeatures: int = 0          # XCR0 bits the xsave areas use (from the xsave header)
    xsave_size: int = 0         # size of the xsave buffer (NT_X86_XSTATE)
    cpu_flags: tuple[str, ...] = ()
    binary_os: str = "linux"    # "freebsd" for a native FreeBSD binary (cannot run on Linux)


@dataclasses.dataclass
class Isolation:
    """Container-level settings in Linux vocabulary (cgroup v2 names for limits)."""
    hostname: str | None = None
    domainname: str | None = None
    namespaces: dict[str, int] = dataclasses.field(default_factory=dict)  # kind -> ns inode
    own_namespaces: tuple[str, ...] = ()   # kinds the root task does not share with its parent
    cgroup: str | None = None              # path of the root task's cgroup
    limits: dict[str, str] = dataclasses.field(default_factory=dict)  # "memory.max" -> "max"
    net: object | None = None      # isolation.NetConfig when the tree has its own net namespace
    mounts: list | None = None     # [isolation.Mount] when it has its own mount namespace


class Source:
    """Read interface to one checkpoint (a process tree). Subclasses implement every method."""

    frozen: bool = True   # a live source says whether reads come from one consistent state

    def meta(self) -> Meta:
        raise NotImplementedError

    def pstree(self) -> list:
        """pstree_entry per process, parents before children; the first is the root."""
        raise NotImplementedError

    def core(self, tid: int):
        """core_entry of one thread. `tc` is filled only for a thread-group leader."""
        raise NotImplementedError

    def ids(self, pid: int):
        """task_kobj_ids_entry of a process."""
        raise NotImplementedError

    def mm(self, pid: int):
        """mm_entry with vmas (ascending), auxv, exe_file_id."""
        raise NotImplementedError

    def fs(self, pid: int):
        """fs_entry: cwd_id, root_id (file ids), umask."""
        raise NotImplementedError

    def fdinfo(self, pid: int) -> list:
        """fdinfo_entry per open descriptor, ascending fd."""
        raise NotImplementedError

    def file(self, file_id: int):
        """file_entry for an id used by fdinfo, vma.shmid, mm.exe_file_id or fs."""
        raise NotImplementedError

    def pipe_data(self, pipe_id: int) -> bytes:
        """Bytes queued in a pipe (empty if none)."""
        raise NotImplementedError

    def file_deleted(self, file_id: int) -> bool:
        """A regular file unlinked while open: only the process still reaches it."""
        return False

    def file_contents(self, file_id: int) -> bytes:
        """The whole contents of a deleted file (CRIU's ghost file)."""
        raise NotImplementedError

    def page_ranges(self, pid: int, vma) -> list[PageRange]:
        """Ranges of `vma` whose contents must be saved (CRIU's rule: private anon or COWed
        pages, shared-anon pages; never vvar/vsyscall; the vDSO whole)."""
        raise NotImplementedError

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        """`size` bytes of memory at `addr` as the process sees them."""
        raise NotImplementedError

    def isolation(self) -> Isolation:
        raise NotImplementedError

    def task_tty(self, pid: int) -> dict:
        """The controlling terminal of task `pid`: {"ctty": "136:3"} plus, for a session
        leader, "tty_pgrp" (the terminal's foreground group); {} = none."""
        return {}

    def socket_queue(self, file_id: int) -> list[bytes]:
        """Messages waiting to be read on socket `file_id`, oldest first (a stream's queued
        bytes are one message)."""
        return []

    def tcp_stream(self, file_id: int):
        """(tcp_stream_entry, send queue bytes) of an established TCP socket; None for any
        other socket, or while the owner runs (repair mode wants a stopped owner)."""
        return None

    # -- helpers every consumer wants -------------------------------------------------------
    def pids(self) -> list[int]:
        return [e.pid for e in self.pstree()]

    def threads(self, pid: int) -> list[int]:
        for e in self.pstree():
            if e.pid == pid:
                return list(e.threads)
        raise KeyError(pid)

    def tasks(self) -> Iterable[tuple[int, list[int]]]:
        for e in self.pstree():
            yield e.pid, list(e.threads)
