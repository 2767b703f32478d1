"""FUSE view of a checkpoint: paths and stat dicts in, errnos out.

Caching policy (written down because live files must never pretend):
- While the tree runs, a file's content is rendered when it is stat'ed or opened and held for
  at most `ttl` seconds (CachedSource); every file is opened with direct_io, so a read returns
  what the handle captured at open, never a stale page-cache copy, and sizes are exact.
- While frozen, nothing changes: results are cached until the next thaw.
- Kernel attribute/entry timeouts are short (1 s) for the same reason.
- With written-page tracking, chunk mtimes move only at a pass (a readdir of the root) and
  small files' mtimes only when the daemon sees their content change. So the kernel may keep
  attributes for 1 s as long as the daemon drops (fuse_invalidate_path) every answer that
  went stale: at every pass it recomputes the attributes it gave out and drops those that
  differ now; at freeze/thaw it drops all; an open that moves a stamp drops that path.
  Recomputing in the daemon is far cheaper than the kernel asking again for everything.
  Without that a running tracked mount would need
  attr_timeout 0, and with default_permissions the kernel then asks for the attributes of
  every directory on a path at each lookup (about 7 getattrs per file of an `ls -R`).

Every operation goes through `_boundary`, which turns exceptions into one errno each:
ckptfs errors carry their own, OSError keeps its errno, anything else is EIO plus a log line.
The daemon never dies from one bad request.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import threading
import time

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # 1 MiB requests; libfuse2 caps at 128 KiB
import mfusepy as fuse  # noqa: E402

from . import stamps, tree
from .errors import CkptError
from .model import Source

log = logging.getLogger("ckptfs.fs")

CACHED = ("meta", "pstree", "core", "ids", "mm", "fs", "fdinfo", "file", "pipe_data",
          "page_ranges", "isolation", "socket_queue", "tcp_stream", "task_tty")
PRIVATE = 0o600  # memory and register files
ATTR_TIMEOUT = 1.0  # seconds the kernel may cache attributes (dropped when they move)
NO_STAMP = ("/ctl", "/status")  # the mount's own files keep the mount's stamp


class CachedSource(Source):
    """Memoizes a Source's answers: forever while frozen, `ttl` seconds while running."""

    def __init__(self, source: Source, ttl: float = 1.0):
        self.inner, self.ttl = source, ttl
        self._cache: dict = {}
        self._lock = threading.Lock()

    @property
    def frozen(self):
        return self.inner.frozen

    def invalidate(self) -> None:
        with self._lock:
            self._cache.clear()

    def _get(self, name, *args):
        key = (name,) + tuple((a.start, a.end) if hasattr(a, "start") and hasattr(a, "end") else a
                              for a in args)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit and (self.inner.frozen or now - hit[0] < self.ttl):
            return hit[1]
        value = getattr(self.inner, name)(*args)
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def read_memory(self, pid, addr, size):
        return self.inner.read_memory(pid, addr, size)

    def file_deleted(self, file_id):
        return self.inner.file_deleted(file_id)

    def file_contents(self, file_id):
        return self.inner.file_contents(file_id)

    def __getattr__(self, name):
        if name in CACHED:
            return functools.partial(self._get, name)
        return getattr(self.inner, name)


for _name in CACHED:  # Source defines these; route them through the cache
    setattr(CachedSource, _name, (lambda n: lambda self, *a: self._get(n, *a))(_name))


def _boundary(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except fuse.FuseOSError:
            raise
        except CkptError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH):
                log.warning("%s%r: %s", fn.__name__, args[:1], e)
            raise fuse.FuseOSError(e.errno) from None
        except KeyError:
            raise fuse.FuseOSError(errno.ENOENT) from None
        except OSError as e:
            raise fuse.FuseOSError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[:1])
            raise fuse.FuseOSError(errno.EIO) from None
    return wrapper


class Control(tree.Node):
    """`ctl`: takes one command word per write; reads as empty."""
    mode = 0o600

    def __init__(self, commands: dict):
        self.commands = commands

    def size(self) -> int:
        return 0

    def read(self, offset, size) -> bytes:
        return b""

    def write(self, data: bytes) -> None:
        for word in data.decode(errors="replace").split():
            if word not in self.commands:
                raise CkptError(f"unknown command {word!r} (know: {', '.join(self.commands)})",
                                path="ctl", err=errno.EINVAL)
        for word in data.decode().split():
            self.commands[word]()


class CheckpointFS(fuse.Operations):
    """A read-only tree (plus `ctl`) over a Source."""
    use_ns = True

    def __init__(self, source: Source, *, chunk_size: int, owner: tuple[int, int] = (0, 0),
                 control: dict | None = None, status=None, clock=None):
        self.source = CachedSource(source)
        # written-page tracking (capture.dirty.ChunkClock): chunk mtimes move only when written
        self.clock = clock
        self.contents = stamps.ContentStamps() if clock else None
        self.sums = stamps.ChunkSums() if clock else None
        self.chunk_size = chunk_size
        self.uid, self.gid = owner
        self.started = time.time_ns()
        self.stamp = self.started
        self._manifest: tuple[int, bytes] | None = None
        self._handles: dict[int, tuple[tree.Node, bytes | None]] = {}
        self._next_fh = 1
        self._lock = threading.Lock()
        self._shown: dict[str, tuple | None] = {}   # path -> attributes the kernel may hold
        self._fuse = None               # libfuse's struct fuse *, taken from a request
        self._can_drop = bool(clock)    # False once an invalidation failed: attr_timeout 0
        extra = {"status": tree.File(lambda: (self._status(status) + "\n").encode()),
                 "manifest": tree.File(self._manifest_bytes)}
        if control is not None:
            extra["ctl"] = Control(control)
        self.renderer = tree.Renderer(self.source, chunk_size)
        self.root = self.renderer.root(extra)

    def _status(self, status) -> str:
        """`running` plus, while it runs with tracking, how written pages are found. A frozen
        tree says just `frozen`, as a dump does (a frozen copy and a dump are diff -r equal);
        a process that ended (killed through ctl, or exited) says `gone`."""
        if status:
            word = status()
        elif not getattr(self.source, "alive", lambda: True)():
            return "gone"
        else:
            word = "frozen" if self.source.frozen else "running"
        tracked = self.clock and not self.source.frozen
        return f"{word}\ntracking: {self.clock.method}" if tracked else word

    def changed(self) -> None:
        """State moved (freeze, thaw): forget everything cached. After a freeze, one more
        tracking pass, so writes up to the freeze have their stamps before the manifest's
        checksums rely on them."""
        self.source.invalidate()
        self.renderer.epoch.bump()
        self._manifest = None
        self.stamp = time.time_ns()
        if self.clock and self.source.frozen:
            self.clock.new_pass()
        if self.clock:
            self._drop_kernel_attrs(all_paths=True)
            self._set_attr_cache()

    def _manifest_bytes(self) -> bytes:
        if not self.source.frozen:
            return tree.manifest_bytes(self.source, self.source.pids()[0], self.chunk_size, None)
        cached = self._manifest
        if cached and cached[0] == self.stamp:
            return cached[1]
        files = self.sums.checksummed(self.root, self.clock) if self.clock \
            else tree.checksummed_files(self.root)
        data = tree.manifest_bytes(self.source, self.source.pids()[0], self.chunk_size, files)
        self._manifest = (self.stamp, data)
        return data

    # lookup ----------------------------------------------------------------------------------
    def _node(self, path: str) -> tree.Node:
        node: tree.Node = self.root
        for part in filter(None, path.split("/")):
            if not isinstance(node, tree.Dir):
                raise fuse.FuseOSError(errno.ENOTDIR)
            entries = node.entries()
            if part not in entries:
                raise fuse.FuseOSError(errno.ENOENT)
            node = entries[part]
        return node

    @_boundary
    def getattr(self, path, fh=None):
        fh = getattr(fh, "fh", fh)  # raw_fi: libfuse3 passes the file info of an open file
        node = self._handles[fh][0] if fh in self._handles else self._node(path)
        st = self._attrs(path, node)
        if self.clock and path:
            self._remember(path, st)
        return st

    def _attrs(self, path: str, node: tree.Node) -> dict:
        st = {"st_uid": self.uid, "st_gid": self.gid, "st_mtime": self.stamp,
              "st_ctime": self.stamp, "st_atime": self.stamp}
        if isinstance(node, tree.Dir):
            st.update(st_mode=stat.S_IFDIR | node.mode, st_nlink=2, st_size=0)
        else:
            st.update(st_mode=stat.S_IFREG | node.mode, st_nlink=1, st_size=node.size(),
                      st_blksize=1 << 20)
            if self.clock:
                st["st_mtime"] = self._tracked_mtime(path, node)
        return st

    def _tracked_mtime(self, path: str, node: tree.Node) -> int:
        key = stamps.chunk_key(path)
        if key is not None:
            return self.clock.mtime(*key)
        if path in NO_STAMP or not isinstance(node, tree.File):
            return self.stamp
        return self.contents.observe(path, node.content())

    @_boundary
    def readdir(self, path, fh):
        node = self._node(path)
        if not isinstance(node, tree.Dir):
            raise fuse.FuseOSError(errno.ENOTDIR)
        names = sorted(node.entries())
        if path == "/" and self.clock:  # every copy starts here: a pass boundary
            self.clock.new_pass()
            if not self.source.frozen:      # frozen: no stamp moves (changed() dropped all)
                self._drop_stale_attrs()
        if path == "/" and "manifest" in names:  # copy tools that keep readdir order copy it last
            names.remove("manifest")
            names.append("manifest")
        return [".", ".."] + names

    @_boundary
    def open(self, path, fi):
        node = self._node(path)
        if isinstance(node, tree.Dir):
            raise fuse.FuseOSError(errno.EISDIR)
        writing = (fi.flags & os.O_ACCMODE) != os.O_RDONLY
        if writing and not isinstance(node, Control):
            raise fuse.FuseOSError(errno.EROFS)
        snapshot = node.content() if isinstance(node, tree.File) else None
        with self._lock:
            fh, self._next_fh = self._next_fh, self._next_fh + 1
            self._handles[fh] = (node, snapshot)
        fi.fh = fh
        fi.direct_io = 1
        if self.clock:
            if snapshot is not None and path not in NO_STAMP:
                before = self.contents.stamp(path)
                if self.contents.observe(path, snapshot) != before:
                    self._drop_kernel_attrs([path])     # the kernel may hold the old stamp
            key = stamps.chunk_key(path)
            if key is not None:
                self.sums.opened(fh, path, self.clock.mtime(*key))
        return 0

    @_boundary
    def read(self, path, size, offset, fi):
        node, snapshot = self._handles[fi.fh]
        if snapshot is not None:
            return snapshot[offset:offset + size]
        return node.read(offset, size)

    @_boundary
    def read_into(self, buf_addr: int, size: int, offset: int, fi) -> int:
        """Memory chunks go straight from the process into FUSE's buffer (no copy in Python)."""
        node, snapshot = self._handles[fi.fh]
        into = getattr(self.source.inner, "read_memory_into", None)
        if snapshot is not None or not isinstance(node, tree.Chunk) or into is None:
            data = self.read(None, size, offset, fi)
            ctypes.memmove(buf_addr, data, len(data))
            return len(data)
        size = max(0, min(size, node.length - offset))
        if size:
            into(node.pid, node.addr + offset, (ctypes.c_char * size).from_address(buf_addr))
        if self.sums:
            self.sums.data(fi.fh, offset, buf_addr, size)
        return size

    @_boundary
    def write(self, path, data, offset, fi):
        node, _ = self._handles[fi.fh]
        if not isinstance(node, Control):
            raise fuse.FuseOSError(errno.EROFS)
        node.write(data)
        return len(data)

    @_boundary
    def truncate(self, path, length, fh=None):
        fh = getattr(fh, "fh", fh)
        if not isinstance(self._node(path), Control):
            raise fuse.FuseOSError(errno.EROFS)
        return 0

    @_boundary
    def release(self, path, fi):
        with self._lock:
            node, _ = self._handles.pop(fi.fh, (None, None))
        if self.sums:
            self.sums.released(fi.fh, getattr(node, "length", -1))
        return 0

    def init_with_config(self, conn, config):
        """With tracking, no kernel attribute cache while the tree runs: a chunk's mtime may
        move at any pass, and a cached older mtime could equal the one a previous copy recorded
        (a lost write). A frozen tree changes no more, so it gets the cache back (`changed`).
        libfuse reads this config for every reply, so it can be changed while mounted."""
        if config is not None and self.clock:
            self._fuse = _current_fuse()    # only inside a mount's own request: see there
            self._fuse_config = config
            self._set_attr_cache()

    def _set_attr_cache(self) -> None:
        config = getattr(self, "_fuse_config", None)
        if config is not None:
            config.attr_timeout = ATTR_TIMEOUT if self.source.frozen or self._can_drop else 0.0

    # kernel attribute cache (tracking) -----------------------------------------------------
    @staticmethod
    def _key(st: dict) -> tuple:
        return st["st_mode"], st["st_size"], st["st_mtime"]

    def _remember(self, path: str, st: dict) -> None:
        """Note what the kernel may now cache for `path`. Two different answers for one path
        since the last check: which one the kernel kept is unknown, so it is dropped."""
        key = self._key(st)
        with self._lock:
            old = self._shown.get(path, key)
            self._shown[path] = key if old == key else None

    def _drop_stale_attrs(self) -> None:
        """At a pass: recompute the attributes of every path the kernel may cache and drop
        those that changed (or vanished). An answer computed before the pass but noted after
        this check is checked at the next pass; until then it is as old as a stat made just
        before this pass, which the clock's rules already allow (an extra copy, no lost write)."""
        with self._lock:
            shown = list(self._shown.items())
        stale = []
        for path, key in shown:
            try:
                now = self._key(self._attrs(path, self._node(path)))
            except (CkptError, KeyError, OSError, fuse.FuseOSError):
                now = None                  # gone or unreadable now: the kernel must ask
            if now is None or now != key:
                stale.append(path)
        self._drop_kernel_attrs(stale)

    def _drop_kernel_attrs(self, paths=(), all_paths: bool = False) -> None:
        """Make the kernel ask again for the attributes of `paths` (or of every path it may
        cache). A reply still in flight meanwhile is discarded by the kernel (the invalidation
        moves the inode's attr_version). When dropping fails, the mount falls back to no
        attribute cache while running."""
        with self._lock:
            if all_paths:
                paths, self._shown = list(self._shown), {}
            else:
                for path in paths:
                    self._shown.pop(path, None)
        if self._fuse is None or not self._can_drop:
            return
        for path in paths:
            ret = _invalidate_path(self._fuse, path.encode())
            if ret < 0 and -ret != errno.ENOENT:    # ENOENT: the kernel holds nothing for it
                log.warning("fuse_invalidate_path(%s): %s; no attribute cache while running",
                            path, os.strerror(-ret))
                self._can_drop = False
                self._set_attr_cache()
                return


def _current_fuse():
    """libfuse's struct fuse * of the request being served. Only called from init: outside
    libfuse's own threads its context key may not exist and the answer is garbage."""
    ctx = fuse._libfuse.fuse_get_context()
    return ctx.contents.fuse if ctx else None


_invalidate_fn = None


def _invalidate_path(f, path: bytes) -> int:
    global _invalidate_fn
    if _invalidate_fn is None:
        _invalidate_fn = fuse._libfuse.fuse_invalidate_path
        _invalidate_fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _invalidate_fn.restype = ctypes.c_int
    return _invalidate_fn(f, path)


class _FUSE(fuse.FUSE):
    """mfusepy, with reads that fill libfuse's buffer in place when the operations can."""

    def read(self, path, buf, size, offset, fip):
        into = getattr(self.operations, "read_into", None)
        if into is None:
            return super().read(path, buf, size, offset, fip)
        return into(ctypes.cast(buf, ctypes.c_void_p).value, size, offset, fip.contents)


def serve(ops: fuse.Operations, mountpoint: str, *, foreground: bool = True, **options) -> None:
    """Mount and serve until unmounted. libfuse3 (1 MiB requests with direct_io)."""
    _FUSE(ops, mountpoint, foreground=foreground, raw_fi=True, nothreads=False,
              fsname="ckptfs", subtype="ckptfs", default_permissions=True, **options)
