"""ImageSource: a CRIU image directory (ours or CRIU's own) as a model.Source.

Images are read lazily and cached (a directory does not change under us). Memory is served
from pages-<pages_id>.img with pread at the offsets the pagemap implies; pages the pagemap
marks PE_PARENT come from the `parent` directory (CRIU's incremental dumps), recursively.

Missing files follow CRIU's restore: an absent optional image (fdinfo, pipes-data, fifo-data,
utsns, cgroup, seccomp ...) reads as empty; an absent required one (inventory, pstree, core,
mm, fs, files, pagemap of a task with memory) is BadImage naming the file.
"""
from __future__ import annotations

import bisect
import os
import threading

from .. import model, pb, sockets, xsave
from ..errors import BadImage
from ..flags import VMA_STATUS
from ..model import PAGE_SIZE, PageRange
from . import cgroups, skqueue
from .framing import PE_PARENT, PE_PRESENT, read_image

REMAP_GHOST = 1 << 31
NS_KINDS = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")
FILE_MAP = VMA_STATUS["VMA_FILE_PRIVATE"] | VMA_STATUS["VMA_FILE_SHARED"]
ANON_SHARED, MEMFD = VMA_STATUS["VMA_ANON_SHARED"], VMA_STATUS["VMA_AREA_MEMFD"]
FILE_SHARED = VMA_STATUS["VMA_FILE_SHARED"]


def entry_pages(e) -> int:
    """Page count of a pagemap entry: nr_pages (4.2) when present, else the old field."""
    return e.nr_pages if e.HasField("nr_pages") else e.compat_nr_pages


def entry_flags(e) -> int:
    """Flags of a pagemap entry; images older than the flags field use in_parent."""
    if e.HasField("flags"):
        return e.flags
    return PE_PARENT if e.in_parent else PE_PRESENT


class ImageSource(model.Source):
    """Messages returned are the cached ones: callers copy before changing them."""
    frozen = True

    def __init__(self, directory):
        self.dir = os.fspath(directory)
        if not os.path.isdir(self.dir):
            raise BadImage("not a directory", path=self.dir, step="open images")
        self._images: dict[str, tuple] = {}
        self._fds: dict[str, int] = {}     # pages image name -> fd
        self._pages: dict[int, list] = {}      # pid -> page index
        self._starts: dict[int, list] = {}     # pid -> start addresses of that index
        self._parent: ImageSource | None = None
        # FUSE calls in from several threads: caches are filled under this lock (reads of
        # page data use pread and need none).
        self._lock = threading.RLock()

    # -- plumbing -------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def image(self, name: str, kind: str, *, required: bool) -> tuple[list, list]:
        """(messages, extras) of one image; a missing optional image is empty."""
        with self._lock:
            return self._load(name, kind, required)

    def _load(self, name: str, kind: str, required: bool) -> tuple[list, list]:
        if name not in self._images:
            p = self.path(name)
            if not os.path.exists(p):
                if required:
                    raise BadImage("required image is missing", path=p, step="read images")
                self._images[name] = ([], [])
            else:
                got, msgs, extras = read_image(p)
                if got != kind:
                    raise BadImage(f"holds a {got} image, expected {kind}", path=p,
                                   step="read images")
                self._images[name] = (msgs, extras)
        return self._images[name]

    def single(self, name: str, kind: str):
        msgs, _ = self.image(name, kind, required=True)
        if len(msgs) != 1:
            raise BadImage(f"holds {len(msgs)} entries, expected one", path=self.path(name),
                           step="read images")
        return msgs[0]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._parent:
            self._parent.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- model.Source ---------------------------------------------------------------------
    def inventory(self):
        return self.single("inventory.img", "INVENTORY")

    def meta(self) -> model.Meta:
        """What images can tell: the arch, the hostname (if the UTS namespace was dumped) and
        the XSAVE features the root thread's registers carry (kernel and CPU flags are not
        recorded by CRIU)."""
        core = self.core(self.pstree()[0].pid)
        uts = self._utsns()
        xfeatures = xsave.features_of(core.thread_info.fpregs) \
            if core.HasField("thread_info") else 0
        return model.Meta(arch=pb.core_entry.march.Name(core.mtype).lower(),
                          hostname=uts.nodename if uts else "",
                          xfeatures=xfeatures,
                          xsave_size=xsave.size_of(xfeatures) if xfeatures else 0)

    def pstree(self) -> list:
        return list(self.image("pstree.img", "PSTREE", required=True)[0])

    def core(self, tid: int):
        return self.single(f"core-{tid}.img", "CORE")

    def ids(self, pid: int):
        if os.path.exists(self.path(f"ids-{pid}.img")):
            return self.single(f"ids-{pid}.img", "IDS")
        core = self.core(pid)          # images before ids-<pid>.img kept them in the core
        if core.HasField("ids"):
            return core.ids
        raise BadImage(f"no ids for task {pid}", path=self.path(f"ids-{pid}.img"),
                       step="read images")

    def mm(self, pid: int):
        return self.single(f"mm-{pid}.img", "MM")

    def fs(self, pid: int):
        return self.single(f"fs-{pid}.img", "FS")

    def fdinfo(self, pid: int) -> list:
        name = f"fdinfo-{self.ids(pid).files_id}.img"
        return sorted(self.image(name, "FDINFO", required=False)[0], key=lambda e: e.fd)

    def file(self, file_id: int):
        index = self._index("files.img", "FILES", lambda f: f.id)
        if file_id not in index:
            raise BadImage(f"no file entry with id {file_id}", path=self.path("files.img"),
                           step="read images")
        return index[file_id]

    def pipe_data(self, pipe_id: int) -> bytes:
        for name, kind in (("pipes-data.img", "PIPES_DATA"), ("fifo-data.img", "FIFO_DATA")):
            msgs, extras = self.image(name, kind, required=False)
            for msg, data in zip(msgs, extras):
                if msg.pipe_id == pipe_id:
                    return bytes(data)
        return b""

    def socket_queue(self, file_id: int) -> list[bytes]:
        """Messages waiting on socket `file_id` (sk-queues.img), oldest first; a TCP
        connection's receive queue (its tcp-stream image)."""
        stream = self._tcp(file_id)
        if stream is not None:
            return [stream[1]] if stream[1] else []
        with self._lock:
            if "#sk-queues" not in self._images:
                self._images["#sk-queues"] = skqueue.read(self.path(skqueue.NAME))
            return self._images["#sk-queues"].get(file_id, [])

    def tcp_stream(self, file_id: int):
        """(tcp_stream_entry, send queue) of a TCP connection, None without its image."""
        stream = self._tcp(file_id)
        return None if stream is None else (stream[0], stream[2])

    def _tcp(self, file_id: int):
        f = self.file(file_id)
        if not f.HasField("isk") or not sockets.is_tcp_connected(f.isk):
            return None
        name = skqueue.tcp_name(f.isk.ino)
        with self._lock:
            if name not in self._images:
                self._images[name] = skqueue.read_tcp(self.path(name))
            return self._images[name]

    # Optional Source methods (LiveSource has them too): files unlinked while open.
    def file_deleted(self, file_id: int) -> bool:
        """A ghost or linked remap names it, or it is a memfd (never linked anywhere)."""
        return self._remap(file_id) is not None or self.file(file_id).HasField("memfd")

    def file_contents(self, file_id: int) -> bytes:
        """Contents of a deleted file: its ghost image (whole or chunked), or for a LINKED
        remap the file the dump linked it to."""
        remap = self._remap(file_id)
        if remap is None:
            raise BadImage(f"file {file_id} is not a deleted file", path=self.path("remap-fpath.img"),
                           step="read images")
        if remap.remap_type == pb.GHOST or remap.remap_id & REMAP_GHOST:
            return self._ghost(remap.remap_id & ~REMAP_GHOST)
        with open(self.file(remap.remap_id).reg.name, "rb") as f:
            return f.read()

    def page_ranges(self, pid: int, vma) -> list[PageRange]:
        """Saved pages inside `vma`, adjacent entries joined (CRIU may split a run of pages
        over several entries, or let one entry span two VMAs)."""
        out: list[PageRange] = []
        for start, end, *_ in self._page_index(pid):
            lo, hi = max(start, vma.start), min(end, vma.end)
            if lo >= hi:
                continue
            if out and out[-1].end == lo:
                out[-1] = PageRange(out[-1].start, hi)
            else:
                out.append(PageRange(lo, hi))
        return out

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return self._read(pid, addr, size, self._unsaved)

    def _read(self, pid: int, addr: int, size: int, unsaved) -> bytes:
        """Saved pages from the pages files (or the parent), `unsaved(pid, addr, n)` between."""
        index, starts = self._page_index(pid), self._starts[pid]
        out, pos, end = [], addr, addr + size
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and pos < index[i][1]:
                start, stop, flags, pages, off = index[i]
                n = min(stop, end) - pos
                out.append(self._pages_data(pid, flags, pages, off + pos - start, pos, n))
            else:
                nxt = starts[i + 1] if i + 1 < len(starts) else end
                n = min(nxt, end) - pos
                out.append(unsaved(pid, pos, n))
            pos += n
        return b"".join(out)

    def _saved_only(self, pid: int, addr: int, n: int) -> bytes:
        raise BadImage(f"task {pid}: no saved pages at {addr:#x} (+{n} bytes), which a child "
                       "image marks PE_PARENT", path=self.path(f"pagemap-{pid}.img"),
                       step="read memory")

    def isolation(self) -> model.Isolation:
        root_pid = self.pstree()[0].pid
        task, host = self.ids(root_pid), self.inventory().root_ids
        present = [k for k in NS_KINDS if task.HasField(f"{k}_ns_id")]
        uts = self._utsns()
        cgroup, limits = self._cgroup(root_pid)
        return model.Isolation(
            hostname=uts.nodename if uts else None,
            domainname=uts.domainname if uts else None,
            namespaces={k: getattr(task, f"{k}_ns_id") for k in present},
            own_namespaces=tuple(k for k in present if host.HasField(f"{k}_ns_id")
                                 and getattr(task, f"{k}_ns_id") != getattr(host, f"{k}_ns_id")),
            cgroup=cgroup, limits=limits)

    # -- helpers --------------------------------------------------------------------------
    def _index(self, name, kind, key) -> dict:
        cache_key = f"{name}#index"
        with self._lock:
            if cache_key not in self._images:
                msgs = self.image(name, kind, required=True)[0]
                self._images[cache_key] = {key(m): m for m in msgs}
            return self._images[cache_key]

    def file_ghost(self, file_id: int) -> int:
        """The ghost a deleted file id stands for (tree.ghost_of): the lowest file id whose
        remap names the same ghost image (CRIU gives every descriptor and map of one deleted
        inode its own remap entry, all with one remap_id)."""
        remap = self._remap(file_id)
        if remap is None or not (remap.remap_type == pb.GHOST or remap.remap_id & REMAP_GHOST):
            return file_id
        msgs, _ = self.image("remap-fpath.img", "REMAP_FPATH", required=False)
        return min(m.orig_id for m in msgs if m.remap_id == remap.remap_id and
                   m.remap_type in (pb.GHOST, pb.LINKED))

    def _remap(self, file_id: int):
        msgs, _ = self.image("remap-fpath.img", "REMAP_FPATH", required=False)
        for m in msgs:
            if m.orig_id == file_id and m.remap_type in (pb.GHOST, pb.LINKED):
                return m
        return None

    def _ghost(self, ghost_id: int) -> bytes:
        name = f"ghost-file-{ghost_id:x}.img"
        msgs, extras = self.image(name, "GHOST_FILE", required=True)
        head = msgs[0]
        if not head.chunks:
            return bytes(extras[0])
        data = bytearray(head.size)       # chunked: holes stay zero
        for chunk, payload in zip(msgs[1:], extras[1:]):
            end = chunk.off + chunk.len
            if end > head.size:
                raise BadImage(f"ghost chunk {chunk.off}+{chunk.len} beyond size {head.size}",
                               path=self.path(name), step="read images")
            data[chunk.off:end] = payload
        return bytes(data)

    def _utsns(self):
        ids = self.ids(self.pstree()[0].pid)
        if not ids.HasField("uts_ns_id"):
            return None
        msgs, _ = self.image(f"utsns-{ids.uts_ns_id}.img", "UTSNS", required=False)
        return msgs[0] if msgs else None

    def _cgroup(self, pid: int) -> tuple[str | None, dict]:
        """(path, limits) of the task's cgroup set in cgroup.img; (None, {}) without one."""
        entries, _ = self.image("cgroup.img", "CGROUP", required=False)
        core = self.core(pid)
        set_id = (core.thread_core.cg_set if core.thread_core.HasField("cg_set")
                  else core.tc.cg_set if core.tc.HasField("cg_set") else None)
        if not entries or set_id is None:
            return None, {}
        cg_set = cgroups.task_set(entries[0], set_id)
        if cg_set is None:
            raise BadImage(f"task {pid} uses cgroup set {set_id}, which is not in the image",
                           path=self.path("cgroup.img"), step="read images")
        members = {m.name: m.path for m in cg_set.ctls}
        return cgroups.cgroup_path(members), cgroups.limits(entries[0], members)

    def _page_index(self, pid: int) -> list:
        """[(start, end, flags, offset in pages file)] of the entries that carry data."""
        with self._lock:
            if pid not in self._pages:
                index = self._build_page_index(pid)
                self._starts[pid] = [e[0] for e in index]
                self._pages[pid] = index
            return self._pages[pid]

    def _build_page_index(self, pid: int) -> list:
        """The task's private pagemap plus, for each shared-memory VMA, the part of its
        object's pagemap-shmem image that the VMA maps."""
        index = self._pagemap(f"pagemap-{pid}.img")
        # a pre-dump directory (a `parent`) holds pagemaps without mm images
        vmas = self.mm(pid).vmas if os.path.exists(self.path(f"mm-{pid}.img")) else []
        for vma in vmas:
            if vma.status & ANON_SHARED or (vma.status & MEMFD and vma.status & FILE_SHARED):
                # (a private memfd map's own pages are its copies: in the task's pagemap)
                lo, hi = vma.pgoff, vma.pgoff + vma.end - vma.start
                for start, end, flags, pages, off in self._pagemap(
                        f"pagemap-shmem-{self._shmem_key(vma)}.img"):
                    a, b = max(start, lo), min(end, hi)
                    if a < b:
                        index.append((vma.start + a - vma.pgoff, vma.start + b - vma.pgoff,
                                      flags, pages, off + a - start))
        index.sort()
        for a, b in zip(index, index[1:]):
            if a[1] > b[0]:
                raise BadImage(f"task {pid}: saved pages overlap at {b[0]:#x}",
                               path=self.path(f"pagemap-{pid}.img"), step="read images")
        return index

    def _pagemap(self, name: str) -> list:
        """[(start, end, flags, pages image, offset in it)] of the entries carrying data."""
        msgs, _ = self.image(name, "PAGEMAP", required=False)
        if not msgs:
            return []
        pages, index, off = f"pages-{msgs[0].pages_id}.img", [], 0
        for e in msgs[1:]:
            n, flags = entry_pages(e), entry_flags(e)
            end = e.vaddr + n * PAGE_SIZE
            if flags & PE_PRESENT:
                index.append((e.vaddr, end, PE_PRESENT, pages, off))
                off += n * PAGE_SIZE
            elif flags & PE_PARENT:
                index.append((e.vaddr, end, PE_PARENT, None, 0))
        return index

    def memfd(self, file_id: int):
        """(memfd_inode_entry, contents) of the memfd descriptor `file_id`: memfd.img names
        its shmem object, whose pagemap-shmem image holds the pages (size cuts the last)."""
        f = self.file(file_id)
        inodes, _ = self.image("memfd.img", "MEMFD_INODE", required=False)
        found = [i for i in inodes if i.inode_id == f.memfd.inode_id]
        if not found:
            raise BadImage(f"no memfd inode {f.memfd.inode_id} for file {file_id}",
                           path=self.path("memfd.img"), step="read images")
        ino = found[0]
        data = bytearray(ino.size)
        for start, end, flags, pages, off in self._pagemap(f"pagemap-shmem-{ino.shmid}.img"):
            if start >= ino.size:
                continue
            n = min(end, ino.size) - start
            data[start:start + n] = self._pages_data(0, flags, pages, off, start, n)
        return ino, bytes(data)

    def _shmem_key(self, vma) -> int:
        """Which pagemap-shmem-<key>.img holds a shared VMA: the shmem inode for shared anon;
        for memfd, the inode recorded in memfd.img for the mapped file (CRIU), else the VMA's
        own shmid (what export writes when it has no memfd.img)."""
        if vma.status & MEMFD:
            f = self.file(vma.shmid)
            if f.HasField("memfd"):
                inodes, _ = self.image("memfd.img", "MEMFD_INODE", required=False)
                for ino in inodes:
                    if ino.inode_id == f.memfd.inode_id:
                        return ino.shmid
        return vma.shmid

    def _pages_data(self, pid: int, flags: int, pages: str, off: int, addr: int, n: int) -> bytes:
        if flags == PE_PARENT:   # must be saved there (or further up), never guessed
            return self._parent_source()._read(pid, addr, n, self._parent_source()._saved_only)
        data = os.pread(self._pages_fd(pages), n, off)
        if len(data) != n:
            raise BadImage(f"truncated: {n} bytes wanted at offset {off}, got {len(data)}",
                           path=self.path(pages), step="read memory")
        return data

    def _pages_fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                try:
                    self._fds[name] = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise BadImage("pages image missing", path=self.path(name),
                                   step="read memory") from None
            return self._fds[name]

    def _parent_source(self) -> "ImageSource":
        with self._lock:
            return self._open_parent()

    def _open_parent(self) -> "ImageSource":
        if self._parent is None:
            p = self.path("parent")
            if not os.path.isdir(p):
                raise BadImage("pagemap has PE_PARENT pages but there is no parent directory",
                               path=p, step="read memory")
            self._parent = ImageSource(os.path.realpath(p))
        return self._parent

    def _unsaved(self, pid: int, addr: int, n: int) -> bytes:
        """Memory the image does not hold: file content for file maps, zeros otherwise."""
        for vma in self.mm(pid).vmas:
            if vma.start <= addr < vma.end and vma.status & FILE_MAP:
                data = self._file_bytes(vma.shmid, vma.pgoff + addr - vma.start, n)
                return data + bytes(n - len(data))
        return bytes(n)

    def _file_bytes(self, file_id: int, off: int, n: int) -> bytes:
        f = self.file(file_id)
        if not f.HasField("reg"):
            return b""
        try:
            with open(f.reg.name, "rb") as fh:
                fh.seek(off)
                return fh.read(n)
        except FileNotFoundError:
            return b""        # the file is not here (another machine): zeros, as for anon
