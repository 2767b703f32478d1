"""Open files of live processes as CRIU file_entry / fdinfo_entry messages.

File ids follow CRIU (criu-image-format.md section 3): one id per open file description
(descriptors that share one, by dup or fork, share the id: confirmed with kcmp(KCMP_FILE)
among descriptors of the same inode) and one per distinct file used as a mapping, exe, cwd
or root (REG entries with flags 0). Ids count from 1 and stay stable for the life of a
`Files` table. Everything about a file is read when asked (live) from a remembered
(pid, fd) or path; the caller caches while frozen.

What procfs cannot tell about sockets (peers, backlog, shutdown) comes from sock_diag
(sockdiag.py) on a pidfd_getfd copy of the descriptor; the F_SETOWN owner is left at CRIU's
default (zeros).
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import socket
import stat as st
import struct
import termios
import threading

from .. import flags as lf
from .. import pb
from ..errors import KernelError, ProcessGone, Unsupported
from . import procfs, sockdiag

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_KCMP, SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 312, 434, 438
KCMP_FILE, KCMP_VM, KCMP_FILES, KCMP_FS, KCMP_SIGHAND = 0, 1, 2, 3, 4
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SPLICE_F_NONBLOCK = 2
EFD_SEMAPHORE = 1
TTY_MAJORS = {4, 5, 136}          # vt/serial, /dev/tty + console, pty slaves
NS_CFLAGS = {"mnt": 0x00020000, "uts": 0x04000000, "ipc": 0x08000000, "user": 0x10000000,
             "pid": 0x20000000, "net": 0x40000000, "cgroup": 0x02000000, "time": 0x00000080}
ANON_TYPES = {"anon_inode:[eventfd]": "EVENTFD", "anon_inode:[eventpoll]": "EVENTPOLL",
              "anon_inode:[signalfd]": "SIGNALFD", "anon_inode:[timerfd]": "TIMERFD",
              "anon_inode:inotify": "INOTIFY", "anon_inode:[fanotify]": "FANOTIFY",
              "anon_inode:[pidfd]": "PIDFD"}


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int:
    """0 if the two objects are the same; raises on error (ESRCH -> ProcessGone)."""
    r = _libc.syscall(SYS_KCMP, pid1, pid2, kind, idx1, idx2)
    if r < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise ProcessGone("process is gone", step="kcmp", path=f"/proc/{pid1}")
        raise KernelError(f"kcmp({pid1}, {pid2}, {kind}, {idx1}, {idx2})", err, step="kcmp")
    return r


def fown() -> "pb.fown_entry":
    return pb.fown_entry(uid=0, euid=0, signum=0, pid_type=0, pid=0)


@dataclasses.dataclass
class Ref:
    """Where a file id's file can be read again."""
    pid: int
    fd: int | None        # an open descriptor, or None for a path entry
    path: str             # /proc path that opens or stats the file
    name: str = ""        # for path entries: the name to record
    as_reg: bool = False  # a FIFO's companion REG entry (fifo_entry.regf_id): path, flags, pos


def fd_path(pid: int, fd: int) -> str:
    return f"/proc/{pid}/fd/{fd}"


class Files:
    """The file-id table of one LiveSource. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = 1
        self.refs: dict[int, Ref] = {}
        self._by_fd: dict[tuple, int] = {}          # (pid, fd, dev, ino) -> id
        self._by_inode: dict[tuple, list[int]] = {}  # (dev, ino) -> fd ids
        self._by_path: dict[tuple, int] = {}        # (dev, ino) -> path entry id

    def _new(self, ref: Ref) -> int:
        fid, self._next = self._next, self._next + 1
        self.refs[fid] = ref
        return fid

    def forget_fds(self) -> None:
        """Drop the (pid, fd) shortcut: ids are found again through kcmp (used on freeze)."""
        with self._lock:
            self._by_fd.clear()

    def fd_id(self, pid: int, fd: int) -> int:
        s = procfs.stat(fd_path(pid, fd))
        key = (pid, fd, s.st_dev, s.st_ino)
        with self._lock:
            if key in self._by_fd:
                return self._by_fd[key]
            fid = self._same_description(pid, fd, (s.st_dev, s.st_ino))
            if fid is None:
                fid = self._new(Ref(pid, fd, fd_path(pid, fd)))
                self._by_inode.setdefault((s.st_dev, s.st_ino), []).append(fid)
            self._by_fd[key] = fid
            return fid

    def _same_description(self, pid: int, fd: int, inode: tuple) -> int | None:
        for fid in self._by_inode.get(inode, []):
            ref = self.refs[fid]
            try:
                if kcmp(pid, ref.pid, KCMP_FILE, fd, ref.fd) == 0:
                    ref.pid, ref.fd, ref.path = pid, fd, fd_path(pid, fd)  # a live holder
                    return fid
            except (ProcessGone, KernelError):
                continue   # that holder closed it or exited: not the same description
        return None

    def path_id(self, pid: int, proc_path: str, name: str, inode: tuple | None = None) -> int:
        """Id of a REG entry for the file behind `proc_path` (exe, cwd, root, map_files).
        `inode` = (st_dev, st_ino) when already known (a maps line): no stat needed."""
        if inode is None:
            s = procfs.stat(proc_path)
            inode = (s.st_dev, s.st_ino)
        with self._lock:
            key = inode
            if key not in self._by_path:
                self._by_path[key] = self._new(Ref(pid, None, proc_path, name))
            return self._by_path[key]

    def companion_id(self, fid: int) -> int:
        """Id of the REG entry that names the file of descriptor entry `fid` (for a FIFO)."""
        with self._lock:
            key = ("companion", fid)
            if key not in self._by_path:
                ref = self.refs[fid]
                self._by_path[key] = self._new(Ref(ref.pid, ref.fd, ref.path, as_reg=True))
            return self._by_path[key]

    def any_fd_of(self, inode: int, kinds=("pipe",)) -> Ref | None:
        """A remembered descriptor whose link names `kind:[inode]` (pipes), or a fifo path."""
        with self._lock:
            refs = [self.refs[f] for ids in self._by_inode.values() for f in ids]
        for ref in refs:
            try:
                link = os.readlink(ref.path)
            except OSError:
                continue
            parsed = procfs.parse_fd_link(link)
            if parsed and parsed[0] in kinds and parsed[1] == inode:
                return ref
            if parsed is None and os.stat(ref.path).st_ino == inode:
                return ref
        return None


# -- building file_entry ------------------------------------------------------------------
def _reg(fid: int, name: str, flags: int, pos: int, s: os.stat_result):
    name, _ = procfs.strip_deleted(name)
    reg = pb.reg_file_entry(id=fid, flags=flags, pos=pos, fown=fown(), name=name, mode=s.st_mode)
    write_append = flags & lf.O_ACCMODE == os.O_WRONLY and flags & os.O_APPEND
    if st.S_ISREG(s.st_mode) and not write_append:
        reg.size = s.st_size
    return reg


def path_entry(fid: int, ref: Ref):
    """A mapping / exe / cwd / root file: REG with flags 0, or MEMFD for a memfd mapping
    (its inode is the memfd's: a descriptor of the same memfd has the same inode_id, as in
    CRIU, where a memfd VMA's shmid names a memfd file entry)."""
    s = procfs.stat(ref.path)
    if ref.name.startswith("/memfd:"):
        return pb.file_entry(type=pb.MEMFD, id=fid, memfd=pb.memfd_file_entry(
            id=fid, flags=os.O_RDWR, pos=0, fown=fown(), inode_id=s.st_ino))
    return pb.file_entry(type=pb.REG, id=fid, reg=_reg(fid, ref.name, 0, 0, s))


def fd_entry(fid: int, ref: Ref, ns_ids=None, regf_id=None):
    """file_entry for the descriptor `ref` points at. `regf_id(fid)` gives a FIFO's
    companion REG entry id."""
    link = procfs.readlink(ref.path)
    info = procfs.parse_fdinfo(procfs.read_text(f"/proc/{ref.pid}/fdinfo/{ref.fd}"))
    flags = procfs.fdinfo_flags(info) & ~lf.O_CLOEXEC
    s = procfs.stat(ref.path)
    parsed = procfs.parse_fd_link(link)
    if ref.as_reg:
        return pb.file_entry(type=pb.REG, id=fid,
                             reg=_reg(fid, link, flags, int(info.get("pos", 0)), s))
    if parsed is None and st.S_ISFIFO(s.st_mode):
        return pb.file_entry(type=pb.FIFO, id=fid, fifo=pb.fifo_entry(
            id=fid, pipe_id=s.st_ino, regf_id=regf_id(fid) if regf_id else 0))
    if parsed is None:
        e = _path_fd(fid, link, flags, int(info.get("pos", 0)), s)
        if e.HasField("tty") and regf_id:       # the terminal's path, as CRIU's regf_id
            e.tty.regf_id = regf_id(fid)
        return e
    kind, ino = parsed
    if kind == "pipe":
        return pb.file_entry(type=pb.PIPE, id=fid,
                             pipe=pb.pipe_entry(id=fid, pipe_id=ino, flags=flags, fown=fown()))
    if kind == "socket":
        return _socket(fid, ref, ino, flags)
    if kind in NS_CFLAGS:
        return pb.file_entry(type=pb.NS, id=fid, nsf=pb.ns_file_entry(
            id=fid, ns_id=(ns_ids or {}).get(ino, 0), ns_cflag=NS_CFLAGS[kind], flags=flags))
    return _anon(fid, ANON_TYPES.get(kind, "UND"), flags, info, s)


def _path_fd(fid: int, link: str, flags: int, pos: int, s: os.stat_result):
    if link.startswith("/memfd:"):
        return pb.file_entry(type=pb.MEMFD, id=fid, memfd=pb.memfd_file_entry(
            id=fid, flags=flags, pos=pos, fown=fown(), inode_id=s.st_ino))
    if st.S_ISCHR(s.st_mode) and os.major(s.st_rdev) in TTY_MAJORS:
        return pb.file_entry(type=pb.TTY, id=fid, tty=pb.tty_file_entry(
            id=fid, tty_info_id=s.st_rdev, flags=flags, fown=fown()))
    return pb.file_entry(type=pb.REG, id=fid, reg=_reg(fid, link, flags, pos, s))


def _anon(fid: int, kind: str, flags: int, info: dict, s: os.stat_result):
    e = pb.file_entry(type=getattr(pb, kind), id=fid)
    if kind == "EVENTFD":
        # EFD_SEMAPHORE (1) is not an open flag; CRIU's entry has no field for it, and bit 0
        # is free here (eventfds are always O_RDWR), so it travels in `flags`.
        sem = EFD_SEMAPHORE if info.get("eventfd-semaphore", "0").strip() == "1" else 0
        e.efd.CopyFrom(pb.eventfd_file_entry(id=fid, flags=flags | sem, fown=fown(),
                                             counter=int(info.get("eventfd-count", "0"), 16)))
    elif kind == "EVENTPOLL":
        e.epfd.CopyFrom(pb.eventpoll_file_entry(id=fid, flags=flags, fown=fown()))
        e.epfd.tfd.extend(_epoll_targets(fid, info.get("tfds", [])))
    elif kind == "SIGNALFD":
        e.sgfd.CopyFrom(pb.signalfd_entry(id=fid, flags=flags, fown=fown(),
                                          sigmask=int(info.get("sigmask", "0"), 16)))
    elif kind == "TIMERFD":
        e.tfd.CopyFrom(_timerfd(fid, flags, info))
    elif kind == "PIDFD":
        nspid = int((info.get("NSpid") or info.get("Pid") or "-1").split()[-1])
        e.pidfd.CopyFrom(pb.pidfd_entry(id=fid, ino=s.st_ino, flags=flags, nspid=nspid,
                                        fown=fown()))
    return e


def _epoll_targets(fid: int, lines: list[str]) -> list:
    """eventpoll_tfd_entry per `tfd:` line of an epoll's fdinfo, which reads
    `tfd: N events: HEX data: HEX  pos:P ino:HEX sdev:HEX` (fs/eventpoll.c). N is the number
    the watched file had in the adding task's table when it was added: the kernel keys the
    watch on (file, N), so restore adds it under that same number."""
    out = []
    for line in lines:
        words = ("tfd: " + line).replace(":", ": ").split()
        v = dict(zip(words[0::2], words[1::2]))
        # (CRIU's optional dev/inode/pos are left out: anonymous files share one inode)
        out.append(pb.eventpoll_tfd_entry(id=fid, tfd=int(v["tfd:"]),
                                          events=int(v["events:"], 16), data=int(v["data:"], 16)))
    return out


def _timespec(text: str) -> tuple[int, int]:
    sec, nsec = text.strip("() ").split(",")
    return int(sec), int(nsec)


def _timerfd(fid: int, flags: int, info: dict):
    vsec, vnsec = _timespec(info.get("it_value", "(0, 0)"))
    isec, insec = _timespec(info.get("it_interval", "(0, 0)"))
    return pb.timerfd_entry(id=fid, flags=flags, fown=fown(), clockid=int(info.get("clockid", 0)),
                            ticks=int(info.get("ticks", 0)),
                            settime_flags=int(info.get("settime flags", "0"), 8),
                            vsec=vsec, vnsec=vnsec, isec=isec, insec=insec)


# -- sockets: a copy of the descriptor (pidfd_getfd) answers getsockopt -------------------
def grab_fd(pid: int, fd: int) -> int:
    """A duplicate of another process's descriptor in ours (pidfd_getfd, Linux 5.6+)."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        raise _sys_error("pidfd_open", pid)
    try:
        got = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            raise _sys_error("pidfd_getfd", pid)
        return got
    finally:
        os.close(pidfd)


def _sys_error(step: str, pid: int):
    err = ctypes.get_errno()
    if err == errno.ESRCH:
        return ProcessGone("process is gone", step=step, path=f"/proc/{pid}")
    return KernelError(step, err, step=step, path=f"/proc/{pid}")


# SOL_SOCKET options kept in sk_opts_entry: field -> option number (bools read as ints)
SK_OPTS = {"reuseaddr": socket.SO_REUSEADDR, "so_reuseport": socket.SO_REUSEPORT,
           "so_keepalive": socket.SO_KEEPALIVE, "so_passcred": socket.SO_PASSCRED,
           "so_broadcast": socket.SO_BROADCAST, "so_priority": socket.SO_PRIORITY,
           "so_rcvlowat": socket.SO_RCVLOWAT, "so_mark": socket.SO_MARK,
           "so_buf_lock": 72}     # SO_BUF_LOCK (5.14+): buffer sizes the program set itself
TIMEOUTS = {"so_snd_tmo": socket.SO_SNDTIMEO, "so_rcv_tmo": socket.SO_RCVTIMEO}


def sk_opts(sk: socket.socket):
    """The socket options CRIU keeps, as getsockopt gives them (buffer sizes doubled)."""
    g = lambda opt: sk.getsockopt(socket.SOL_SOCKET, opt)  # noqa: E731
    e = pb.sk_opts_entry(so_sndbuf=g(socket.SO_SNDBUF), so_rcvbuf=g(socket.SO_RCVBUF))
    for prefix, opt in TIMEOUTS.items():
        sec, usec = struct.unpack("<qq", sk.getsockopt(socket.SOL_SOCKET, opt, 16))
        setattr(e, f"{prefix}_sec", sec)
        setattr(e, f"{prefix}_usec", usec)
    for field, opt in SK_OPTS.items():
        try:
            value = g(opt)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                continue        # not an option of this family (SO_PASSCRED on inet, 6.x)
            raise
        is_bool = e.DESCRIPTOR.fields_by_name[field].type == 8
        setattr(e, field, bool(value) if is_bool else value)
    return e


def _socket(fid: int, ref: Ref, ino: int, flags: int):
    sk = socket.socket(fileno=grab_fd(ref.pid, ref.fd))
    try:
        family = sk.family
        if family == socket.AF_UNIX:
            return pb.file_entry(type=pb.UNIXSK, id=fid, usk=_unix(fid, ref, ino, flags, sk))
        if family in (socket.AF_INET, socket.AF_INET6) and sk.proto in (socket.IPPROTO_TCP,
                                                                         socket.IPPROTO_UDP):
            return pb.file_entry(type=pb.INETSK, id=fid, isk=_inet(fid, ref, ino, flags, sk))
        kind = {socket.AF_NETLINK: pb.NETLINKSK, socket.AF_PACKET: pb.PACKETSK}.get(family, pb.UND)
        return pb.file_entry(type=kind, id=fid)
    finally:
        sk.close()


def _unix(fid: int, ref: Ref, ino: int, flags: int, sk: socket.socket):
    d = sockdiag.unix(sk, ino, ref.path) or sockdiag.UnixDiag(ino, int(sk.type), TCP_CLOSE)
    e = pb.unix_sk_entry(id=fid, ino=ino, type=int(sk.type), state=d.state, flags=flags,
                         uflags=0, backlog=d.wqueue if d.state == TCP_LISTEN else 0,
                         peer=d.peer, fown=fown(), opts=sk_opts(sk), name=d.name)
    if d.shutdown:
        e.shutdown = d.shutdown
    if d.name[:1] not in (b"", b"\0"):
        _bound_path(e, ref.pid, d)
    return e


def _bound_path(e, pid: int, d) -> None:
    """Where a path-bound socket's file is: a relative name is looked up in the task's cwd
    (CRIU's name_dir); the file's mode and owner come along; a path that is gone or now
    names another file makes the socket `deleted`."""
    name = os.fsdecode(d.name.split(b"\0", 1)[0])
    if name.startswith("/"):
        at = f"/proc/{pid}/root{name}"
    else:
        at = f"/proc/{pid}/cwd/{name}"
        e.name_dir = procfs.readlink(f"/proc/{pid}/cwd")
    try:
        s = os.stat(at, follow_symlinks=False)
    except OSError:
        s = None
    if s is None or d.vfs is None or s.st_ino != d.vfs[0] or not st.S_ISSOCK(s.st_mode):
        e.deleted = True
        return
    e.file_perms.mode, e.file_perms.uid, e.file_perms.gid = s.st_mode, s.st_uid, s.st_gid


TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10


def _inet(fid: int, ref: Ref, ino: int, flags: int, sk: socket.socket):
    d = sockdiag.inet(sk, ino, ref.path)
    state = d.state if d else TCP_CLOSE
    src = sk.getsockname()
    try:
        dst = sk.getpeername()
    except OSError:
        dst = ("0.0.0.0" if sk.family == socket.AF_INET else "::", 0)
    e = pb.inet_sk_entry(id=fid, ino=ino, family=int(sk.family), type=int(sk.type),
                         proto=sk.proto, state=state, src_port=src[1], dst_port=dst[1],
                         flags=flags, backlog=d.wqueue if d and state == TCP_LISTEN else 0,
                         fown=fown(), opts=sk_opts(sk))
    e.src_addr.extend(_addr_words(sk.family, src[0]))
    e.dst_addr.extend(_addr_words(sk.family, dst[0]))
    if sk.family == socket.AF_INET6:
        e.v6only = bool(sk.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return e


def _addr_words(family: int, text: str) -> list[int]:
    raw = socket.inet_pton(family, text)
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def tcp_stream(ref: Ref) -> tuple[object, bytes]:
    """(tcp_stream_entry, send queue) of an ESTABLISHED TCP socket whose task is stopped,
    read in TCP_REPAIR mode (tcp.py); its receive queue is the socket's queue."""
    from .. import tcp
    sk = socket.socket(fileno=grab_fd(ref.pid, ref.fd))
    try:
        entry, _inq, outq = tcp.read(sk)
        return entry, outq
    except OSError as e:
        raise KernelError("read TCP state (TCP_REPAIR)", e.errno or errno.EIO, path=ref.path,
                          step="tcp repair") from None
    finally:
        sk.close()


def silence_connections(pid: int, dying: set[int] = frozenset()) -> list[int]:
    """Put every ESTABLISHED TCP socket of process `pid` into TCP_REPAIR mode, so that when it
    is killed after a move its connections close without a FIN or RST reaching the peers
    (which now talk to the restored copy): what CRIU does to a dumped task. A socket some
    process outside `dying` (and `pid`) also holds is left alone: a copy restored on this
    host took over that very socket, and it lives on. Returns the fds put in repair mode."""
    from .. import tcp
    done, links = [], _socket_links(pid)
    held = _held_elsewhere(set(links.values()), dying | {pid, os.getpid()}) if links else set()
    for name, link in links.items():
        if link in held:
            continue
        sk = socket.socket(fileno=grab_fd(pid, int(name)))
        try:
            if sk.family in (socket.AF_INET, socket.AF_INET6) and \
                    sk.type == socket.SOCK_STREAM and sk.getsockopt(socket.IPPROTO_TCP,
                                                                    socket.TCP_INFO, 1)[0] == 1:
                sk.setsockopt(socket.IPPROTO_TCP, tcp.TCP_REPAIR, tcp.REPAIR_ON)
                done.append(int(name))
        finally:
            sk.close()
    return done


def _socket_links(pid: int) -> dict[str, str]:
    """fd name -> `socket:[ino]` for every socket descriptor of `pid`."""
    out = {}
    for name in procfs.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[name] = link
    return out


def _held_elsewhere(links: set[str], skip: set[int]) -> set[str]:
    """Which of `links` some process not in `skip` has open."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            names = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for name in names:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{name}")
            except OSError:
                continue
            if link in links:
                found.add(link)
    return found


# -- socket queues without consuming them ---------------------------------------------------
SO_PEEK_OFF = 42
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
PEEK_BUF = 64 << 10        # first buffer for a queued message; grown to the longest one


def socket_queue(ref: Ref) -> list[bytes]:
    """Messages waiting to be read on the socket `ref` names, oldest first, left in place
    (CRIU's way: SO_PEEK_OFF at 0, then MSG_PEEK reads that each move the offset on; the
    socket's own peek offset is put back). A stream's bytes come as one message. Queued
    descriptors (SCM_RIGHTS) are refused, naming the socket."""
    sk = socket.socket(fileno=grab_fd(ref.pid, ref.fd))
    try:
        if sk.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
            return []
        if sk.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return []
        saved = sk.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        try:
            msgs = _peek_all(sk, ref.path)
        finally:
            sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, saved)
        if sk.type == socket.SOCK_STREAM and msgs:
            return [b"".join(msgs)]
        return msgs
    except OSError as e:
        raise KernelError("peek socket queue", e.errno, path=ref.path, step="socket queue") \
            from None
    finally:
        sk.close()


def _peek_all(sk: socket.socket, where: str) -> list[bytes]:
    buf, out, offset = bytearray(PEEK_BUF), [], 0
    # MSG_TRUNC tells a datagram's whole length; on TCP it would drop the data instead
    flags = PEEK if sk.type == socket.SOCK_STREAM else PEEK | socket.MSG_TRUNC
    while True:
        try:
            n, _anc, mflags, _addr = sk.recvmsg_into([buf], 0, flags)
        except BlockingIOError:
            return out
        except OSError as e:
            if e.errno == errno.ENOTCONN:    # a TCP socket never connected: nothing queued
                return out
            raise
        if mflags & socket.MSG_CTRUNC:
            raise Unsupported("a queued message carries descriptors or credentials "
                              "(SCM_RIGHTS), which are not captured", path=where,
                              step="socket queue")
        if n > len(buf) and sk.type != socket.SOCK_STREAM:
            buf = bytearray(n)                # longer than the buffer: peek it again whole
            sk.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
            continue
        if n == 0:
            # the peer shut down its side (a zero-length datagram reads the same: CRIU
            # stops there too, so such a message is not kept)
            return out
        out.append(bytes(buf[:n]))
        offset += n


# -- pipe contents without consuming them -------------------------------------------------
_libc.tee.restype = ctypes.c_ssize_t
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]


def pipe_peek(proc_fd_path: str) -> bytes:
    """Bytes queued in the pipe or FIFO behind /proc/PID/fd/N, left in place.

    Opening the /proc link with O_RDONLY|O_NONBLOCK gives a read end of the same pipe even
    if the process holds only the write end; tee(2) duplicates the queued buffers into a
    private pipe of ours without consuming them.
    """
    try:
        src = os.open(proc_fd_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise procfs.os_error(e, proc_fd_path, "open") from None
    try:
        queued = _fionread(src)
        if queued == 0:
            return b""
        return _tee_all(src, queued, fcntl.fcntl(src, F_GETPIPE_SZ), proc_fd_path)
    finally:
        os.close(src)


def _fionread(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def _tee_all(src: int, queued: int, size: int, path: str) -> bytes:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if size > fcntl.fcntl(w, F_GETPIPE_SZ):
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
        n = _libc.tee(src, w, queued, SPLICE_F_NONBLOCK)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EAGAIN:
                return b""
            raise KernelError("tee", err, step="tee", path=path)
        out = bytearray()
        while len(out) < n:
            out += os.read(r, n - len(out))
        return bytes(out)
    finally:
        os.close(r)
        os.close(w)


def read_whole(proc_path: str) -> bytes:
    """Contents of the file behind a /proc link (deleted files: /proc/PID/fd/N)."""
    try:
        fd = os.open(proc_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise procfs.os_error(e, proc_path, "open") from None
    try:
        out, off = [], 0
        while True:
            b = os.pread(fd, 1 << 20, off)
            if not b:
                return b"".join(out)
            out.append(b)
            off += len(b)
    finally:
        os.close(fd)
