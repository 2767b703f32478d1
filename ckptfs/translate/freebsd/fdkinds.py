"""Which Linux descriptor kinds a FreeBSD restore can make, as the Linuxulator allows them.

The restore makes every description by an injected Linux system call (restore/freebsd.py),
so what it can make is what sys/compat/linux implements (freebsd-src):

    EVENTPOLL  linux_event.c linux_epoll_create1 (O_CLOEXEC only) + linux_epoll_ctl: a kqueue;
               events outside LINUX_EPOLL_EVSUP (linux_event.h) are EINVAL; the kevent is
               keyed on the descriptor NUMBER, and closing that number (knote_fdclose) drops
               it; a kqueue is not inherited by fork (kqueue(2))
    TIMERFD    linux_event.c linux_timerfd_create/settime over sys_timerfd.c: CLOCK_REALTIME
               and CLOCK_MONOTONIC only (kern_timerfd_create: EINVAL otherwise); no way to
               set the unread expiration count (Linux's TFD_IOC_SET_TICKS)
    MEMFD      linux_file.c linux_memfd_create (kern_shm_open2, SHM_GROW_ON_WRITE) and
               fcntl LINUX_F_ADD_SEALS: seal_bitmap maps SEAL, SHRINK, GROW, WRITE only
    UNIXSK     linux_socket.c linux_socketpair (PF_LOCAL), linux_bind/listen/sendto/shutdown;
               no abstract names on FreeBSD
    INETSK     linux_socket.c: socket/bind/listen; no TCP_REPAIR (linux_to_bsd_tcp_sockopt
               knows no such option), so an established connection cannot be re-made
    SIGNALFD   linux_dummy.c DUMMY(signalfd4): ENOSYS
    TTY, and the others: no counterpart the restore makes

`problems(source, pid, info, log)`: the refusals for one descriptor (path, value, reason),
approximations noted in `log`.
"""
from __future__ import annotations

import socket

from ... import flags as L
from ... import sockets as S

SUPPORTED = ("REG", "PIPE", "FIFO", "EVENTFD", "EVENTPOLL", "TIMERFD", "MEMFD", "UNIXSK",
             "INETSK")
REFUSED = {
    "SIGNALFD": "signalfd4 is a stub in the Linuxulator (linux_dummy.c DUMMY(signalfd4), "
                "ENOSYS) and FreeBSD has no signalfd",
    "TTY": "a terminal is not reopened on FreeBSD (the jail's terminals are FreeBSD pts "
           "devices, not this Linux device; session and controlling terminal are not re-made)",
    "INOTIFY": "inotify watches are not re-made by the FreeBSD restore",
    "FANOTIFY": "the Linuxulator has no fanotify (linux_dummy.c DUMMY(fanotify_init))",
    "PACKETSK": "FreeBSD has no AF_PACKET socket",
    "NETLINKSK": "netlink sockets are not re-made by the FreeBSD restore",
    "PIDFD": "the Linuxulator has no pidfd (linux_dummy.c DUMMY(pidfd_open))",
    "NS": "FreeBSD has no namespace descriptors",
}
# linux_event.h LINUX_EPOLL_EVSUP: what linux_epoll_ctl turns into kevents
EPOLL_SUPPORTED = 0x80000000 | 0x40000000 | 0x010 | 0x008 | 0x002 | 0x001 | 0x040 | \
    0x004 | 0x100 | 0x2000
TIMERFD_CLOCKS = (0, 1)              # Linux CLOCK_REALTIME, CLOCK_MONOTONIC
SEALS_SUPPORTED = 0x1 | 0x2 | 0x4 | 0x8   # linux_file.c seal_bitmap


def kind_name(info) -> str:
    return {v: k for k, v in L.FD_TYPES.items()}.get(info.type, str(info.type))


def problems(source, pid: int, info, log) -> list[tuple[str, str, str]]:
    """(path, value, reason) for each reason descriptor `info` of `pid` cannot be made on
    FreeBSD; what is made only in part goes to `log` (a LossLog)."""
    kind = kind_name(info)
    where = f"tasks/{pid}/fds/{info.fd}"
    if kind in REFUSED or kind not in SUPPORTED:
        return [(where, kind, REFUSED.get(kind, f"a {kind} descriptor is not restored on "
                                                "FreeBSD"))]
    check = CHECKS.get(kind)
    return check(source, pid, info, where, log) if check else []


def _epoll(source, pid, info, where, log):
    out = []
    for t in source.file(info.id).epfd.tfd:
        extra = t.events & ~EPOLL_SUPPORTED
        if extra:
            out.append((f"{where}/targets/{t.tfd}/events", f"{t.events:#x}",
                        f"events {extra:#x} are outside what the Linuxulator's epoll_ctl "
                        "takes (linux_event.h LINUX_EPOLL_EVSUP: EINVAL)"))
    users = {p for p in source.pids() if any(i.id == info.id for i in source.fdinfo(p))}
    if len(users) > 1:
        out.append((where, f"{len(users)} processes", "an epoll shared by several processes "
                    "cannot be re-made: a FreeBSD kqueue is not inherited across fork"))
    return out


def _timerfd(source, pid, info, where, log):
    t = source.file(info.id).tfd
    if t.clockid not in TIMERFD_CLOCKS:
        return [(f"{where}/clock", str(t.clockid), "FreeBSD's timerfd takes CLOCK_REALTIME "
                 "and CLOCK_MONOTONIC only (sys_timerfd.c kern_timerfd_create: EINVAL)")]
    spent = not (t.vsec or t.vnsec or t.isec or t.insec)
    if t.ticks and not (spent and t.ticks == 1):
        log.note(f"{where}/ticks", t.ticks, "unread expirations are lost (a spent one-shot "
                 "keeps one): FreeBSD has no way to set a timerfd's count (Linux's "
                 "TFD_IOC_SET_TICKS)")
    return []


def _memfd(source, pid, info, where, log):
    from ... import fdkinds
    seals = fdkinds.memfd_state(source, info.id, where).seals
    if seals & ~SEALS_SUPPORTED:
        log.note(f"{where}/seals", hex(seals), "F_SEAL_FUTURE_WRITE / F_SEAL_EXEC have no "
                 "FreeBSD counterpart (linux_file.c seal_bitmap drops them)")
    m = source.file(info.id).memfd
    first = min(i.id for p in source.pids() for i in source.fdinfo(p)
                if i.type == L.FD_TYPES["MEMFD"] and source.file(i.id).memfd.inode_id == m.inode_id)
    if first != info.id:
        log.note(f"{where}/pos", m.pos, f"one description with the other descriptions of memfd "
                 f"{m.inode_id} on FreeBSD (a shared memory object cannot be opened again): "
                 "their offset and access mode are shared")
    return []


def _unix(source, pid, info, where, log):
    u = source.file(info.id).usk
    if u.name[:1] == b"\0":
        return [(f"{where}/name", S.render_name(u.name), "FreeBSD has no abstract unix "
                 "socket names")]
    if u.type not in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        return [(f"{where}/sock_type", str(u.type), "not a stream, dgram or seqpacket socket")]
    queued = source.socket_queue(info.id)
    if u.peer and _peer_in_tree(source, u) is None:
        return [(f"{where}/peer", str(u.peer), "the peer is not this socket's pair in the "
                 "tree: only pairs are connected again on FreeBSD")]
    if queued and not u.peer:
        return [(f"{where}/queue", f"{len(queued)} message(s)", "data queued on a socket "
                 "without a peer in the tree cannot be queued again")]
    if u.name and not u.peer and u.state not in (S.TCP_LISTEN, S.TCP_CLOSE):
        return [(where, S.STATES.get(u.state, str(u.state)), "a named socket is restored "
                 "bound or listening only")]
    return []


def _peer_in_tree(source, u):
    for pid in source.pids():
        for i in source.fdinfo(pid):
            if i.type == L.FD_TYPES["UNIXSK"]:
                other = source.file(i.id).usk
                if other.ino == u.peer and other.peer == u.ino:
                    return i.id
    return None


def _inet(source, pid, info, where, log):
    i = source.file(info.id).isk
    if i.proto == socket.IPPROTO_TCP and i.state not in (S.TCP_LISTEN, S.TCP_CLOSE):
        return [(where, S.STATES.get(i.state, str(i.state)), "an established TCP connection "
                 "cannot be re-made on FreeBSD: it has no TCP_REPAIR (the Linuxulator's "
                 "setsockopt knows no such option), and a new connection would not be this one")]
    if i.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return [(f"{where}/proto", str(i.proto), "only TCP and UDP sockets are restored")]
    if i.proto == socket.IPPROTO_UDP and i.dst_port:
        return [(f"{where}/dst_port", str(i.dst_port), "a connected UDP socket is not "
                 "restored on FreeBSD")]
    if source.socket_queue(info.id):
        return [(f"{where}/queue", "data", "data queued on an internet socket is not restored "
                 "(its senders are not in the tree)")]
    return []


def map_problems(source, pid: int) -> list[tuple[str, str, str]]:
    """Maps the FreeBSD restore cannot make: a memfd's pages (it maps files by path, and a
    memfd has none there)."""
    memfd = L.VMA_STATUS["VMA_AREA_MEMFD"]
    return [(f"tasks/{pid}/maps/{v.start:x}-{v.end:x}", "memfd", "a map of a memfd is not "
             "restored on FreeBSD (maps are made from files by path)")
            for v in source.mm(pid).vmas if v.status & memfd]


CHECKS = {"EVENTPOLL": _epoll, "TIMERFD": _timerfd, "MEMFD": _memfd, "UNIXSK": _unix,
          "INETSK": _inet}
