"""Linux <-> FreeBSD (amd64) flag, signal and errno tables.

Every table is data: rows of (name, Linux value, FreeBSD value). Functions below only walk
them. Linux numbers come from ckptfs.flags (the one place that knows them); FreeBSD numbers
were checked against freebsd-src: sys/sys/fcntl.h, sys/sys/mman.h, sys/sys/signal.h,
sys/sys/errno.h, sys/compat/linux/linux.c (signal tables), linux_errno.inc (errno tables)
and linux_file.c (what the Linuxulator does with open flags).

A restored process runs Linux code under FreeBSD's Linuxulator, so where the Linuxulator
decides the FreeBSD value (open flags, signal numbers) its choice is the table value and
anything it cannot represent is lossy.
"""
from __future__ import annotations

from ... import flags as L
from .. import LossLog

# -- open(2) / fcntl(2) ------------------------------------------------------------------------
# FreeBSD sys/sys/fcntl.h. The access mode (low two bits) is the same on both.
FBSD_OPEN = {
    "O_NONBLOCK": 0x4, "O_APPEND": 0x8, "O_SHLOCK": 0x10, "O_EXLOCK": 0x20, "O_ASYNC": 0x40,
    "O_FSYNC": 0x80, "O_NOFOLLOW": 0x100, "O_CREAT": 0x200, "O_TRUNC": 0x400, "O_EXCL": 0x800,
    "O_NOCTTY": 0x8000, "O_DIRECT": 0x10000, "O_DIRECTORY": 0x20000, "O_EXEC": 0x40000,
    "O_TTY_INIT": 0x80000, "O_CLOEXEC": 0x100000, "O_VERIFY": 0x200000, "O_PATH": 0x400000,
    "O_RESOLVE_BENEATH": 0x800000, "O_DSYNC": 0x1000000,
}
FBSD_ACCESS = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}

# Linux bit(s) -> FreeBSD bit(s), as the Linuxulator's open translates them. Linux O_SYNC is
# __O_SYNC|O_DSYNC; the Linuxulator only looks at the O_DSYNC bit and turns it into O_FSYNC.
OPEN_ROWS = (
    ("O_CREAT", "O_CREAT"), ("O_EXCL", "O_EXCL"), ("O_NOCTTY", "O_NOCTTY"),
    ("O_TRUNC", "O_TRUNC"), ("O_APPEND", "O_APPEND"), ("O_NONBLOCK", "O_NONBLOCK"),
    ("O_ASYNC", "O_ASYNC"), ("O_DIRECT", "O_DIRECT"), ("O_DIRECTORY", "O_DIRECTORY"),
    ("O_NOFOLLOW", "O_NOFOLLOW"), ("O_CLOEXEC", "O_CLOEXEC"),
)
# Linux bits with no exact FreeBSD counterpart and what happens to them.
OPEN_LOSSY = {
    "O_NOATIME": "FreeBSD has no O_NOATIME; the Linuxulator ignores it",
    "__O_TMPFILE": "FreeBSD has no O_TMPFILE; the file must exist as an ordinary unlinked file",
    "O_PATH": "FreeBSD >= 14 has O_PATH (0x400000), but whether the Linuxulator passes "
              "Linux O_PATH through is unverified (13-era versions open a normal fd)",
}
LINUX_O_SYNC = L.OPEN_FLAGS["__O_SYNC"] | L.OPEN_FLAGS["O_DSYNC"]
# fd types whose Linux open forces O_LARGEFILE on 64-bit: it means nothing on FreeBSD (off_t
# is always 64 bit) and is put back on the way home.
LARGEFILE_TYPES = frozenset({"REG", "FIFO", "TTY", "MEMFD"})

FCNTL_CMDS = (  # name, Linux, FreeBSD (None: no counterpart)
    ("F_DUPFD", 0, 0), ("F_GETFD", 1, 1), ("F_SETFD", 2, 2), ("F_GETFL", 3, 3),
    ("F_SETFL", 4, 4), ("F_GETLK", 5, 11), ("F_SETLK", 6, 12), ("F_SETLKW", 7, 13),
    ("F_SETOWN", 8, 6), ("F_GETOWN", 9, 5), ("F_SETSIG", 10, None), ("F_GETSIG", 11, None),
    ("F_SETOWN_EX", 15, None), ("F_GETOWN_EX", 16, None), ("F_OFD_GETLK", 36, None),
    ("F_OFD_SETLK", 37, None), ("F_OFD_SETLKW", 38, None), ("F_SETLEASE", 1024, None),
    ("F_GETLEASE", 1025, None), ("F_NOTIFY", 1026, None), ("F_DUPFD_CLOEXEC", 1030, 17),
    ("F_SETPIPE_SZ", 1031, None), ("F_GETPIPE_SZ", 1032, None), ("F_ADD_SEALS", 1033, 19),
    ("F_GET_SEALS", 1034, 20), ("F_DUP2FD", None, 10), ("F_DUP2FD_CLOEXEC", None, 18),
)
LOCK_TYPES = (("F_RDLCK", 0, 1), ("F_WRLCK", 1, 3), ("F_UNLCK", 2, 2))

# -- mmap --------------------------------------------------------------------------------------
PROT_ROWS = (("PROT_READ", 1, 1), ("PROT_WRITE", 2, 2), ("PROT_EXEC", 4, 4))
FBSD_MAP = {
    "MAP_SHARED": 0x1, "MAP_PRIVATE": 0x2, "MAP_FIXED": 0x10, "MAP_HASSEMAPHORE": 0x200,
    "MAP_STACK": 0x400, "MAP_NOSYNC": 0x800, "MAP_ANON": 0x1000, "MAP_GUARD": 0x2000,
    "MAP_EXCL": 0x4000, "MAP_NOCORE": 0x20000, "MAP_PREFAULT_READ": 0x40000,
    "MAP_32BIT": 0x80000,
}
MAP_ROWS = (  # Linux name -> FreeBSD name (the Linuxulator's mmap does this renaming)
    ("MAP_SHARED", "MAP_SHARED"), ("MAP_PRIVATE", "MAP_PRIVATE"), ("MAP_FIXED", "MAP_FIXED"),
    ("MAP_ANONYMOUS", "MAP_ANON"), ("MAP_GROWSDOWN", "MAP_STACK"),
)
# Linux MAP_ bits FreeBSD cannot express. Most of them collide with unrelated FreeBSD bits,
# which is why flags are only ever translated by name.
MAP_LOSSY = {
    "MAP_DENYWRITE": "ignored by Linux itself; 0x800 is FreeBSD MAP_NOSYNC",
    "MAP_EXECUTABLE": "ignored by Linux itself; 0x1000 is FreeBSD MAP_ANON",
    "MAP_LOCKED": "no FreeBSD mmap flag (mlock after mapping); 0x2000 is MAP_GUARD",
    "MAP_NORESERVE": "FreeBSD removed MAP_NORESERVE; 0x4000 is MAP_EXCL",
    "MAP_POPULATE": "no FreeBSD flag (MAP_PREFAULT_READ only prefaults reads)",
    "MAP_NONBLOCK": "no FreeBSD flag",
    "MAP_STACK": "a no-op hint on Linux; FreeBSD MAP_STACK means grows-down, and 0x20000 "
                 "is MAP_NOCORE",
    "MAP_HUGETLB": "no hugetlbfs on FreeBSD (superpages are transparent)",
    "MAP_DROPPABLE": "no FreeBSD counterpart",
}
# madvise advice numbers. vma_entry.madv holds 1 << advice.
MADV_ROWS = (
    ("MADV_NORMAL", 0, 0), ("MADV_RANDOM", 1, 1), ("MADV_SEQUENTIAL", 2, 2),
    ("MADV_WILLNEED", 3, 3), ("MADV_DONTNEED", 4, 4), ("MADV_FREE", 8, 5),
    ("MADV_REMOVE", 9, None), ("MADV_DONTFORK", 10, None), ("MADV_DOFORK", 11, None),
    ("MADV_MERGEABLE", 12, None), ("MADV_UNMERGEABLE", 13, None), ("MADV_HUGEPAGE", 14, None),
    ("MADV_NOHUGEPAGE", 15, None), ("MADV_DONTDUMP", 16, 8), ("MADV_DODUMP", 17, 9),
    ("MADV_WIPEONFORK", 18, None), ("MADV_KEEPONFORK", 19, None),
    ("MADV_NOSYNC", None, 6), ("MADV_AUTOSYNC", None, 7), ("MADV_PROTECT", None, 10),
)
FBSD_MADV_NAMES = {"MADV_DONTDUMP": "MADV_NOCORE", "MADV_DODUMP": "MADV_CORE"}

# -- signals -----------------------------------------------------------------------------------
FBSD_SIGNALS = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
    "SIGEMT": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGBUS": 10, "SIGSEGV": 11, "SIGSYS": 12,
    "SIGPIPE": 13, "SIGALRM": 14, "SIGTERM": 15, "SIGURG": 16, "SIGSTOP": 17, "SIGTSTP": 18,
    "SIGCONT": 19, "SIGCHLD": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGIO": 23, "SIGXCPU": 24,
    "SIGXFSZ": 25, "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGINFO": 29,
    "SIGUSR1": 30, "SIGUSR2": 31, "SIGTHR": 32, "SIGLIBRT": 33,
}
FBSD_SIGRTMIN, FBSD_SIGRTMAX = 65, 126
# Linux SIGSTKFLT has no FreeBSD signal: the Linuxulator delivers it as SIGBUS (and SIGBUS
# comes back as Linux SIGBUS). SIGPWR becomes the first FreeBSD number past the Linux RT range.
LINUX_TO_FBSD_SPECIAL = {"SIGSTKFLT": "SIGBUS"}
FBSD_SIGPWR_EMU = FBSD_SIGRTMIN + (64 - L.SIGRTMIN) + 1            # 98
FBSD_SIGNAL_NAMES = {v: k for k, v in FBSD_SIGNALS.items()}
FBSD_NSIG_WORDS = 4                                                 # sigset_t: 4 x u32


def _linux_to_fbsd_signals() -> dict[int, int]:
    table = {}
    for name, num in L.SIGNALS.items():
        if num < L.SIGRTMIN:
            target = LINUX_TO_FBSD_SPECIAL.get(name, name)
            table[num] = FBSD_SIGPWR_EMU if name == "SIGPWR" else FBSD_SIGNALS[target]
        else:
            table[num] = FBSD_SIGRTMIN + num - L.SIGRTMIN
    return table


SIG_LINUX_TO_FBSD = _linux_to_fbsd_signals()
# The reverse is not the plain inverse: FreeBSD SIGBUS returns as Linux SIGBUS, never STKFLT.
SIG_FBSD_TO_LINUX = {f: l for l, f in SIG_LINUX_TO_FBSD.items() if l != L.SIGNALS["SIGSTKFLT"]}
SIG_LOSSY = {
    L.SIGNALS["SIGSTKFLT"]: "FreeBSD has no SIGSTKFLT; the Linuxulator delivers it as SIGBUS",
}

# sigaction flags (FreeBSD sys/sys/signal.h). SA_RESTORER: FreeBSD has no sa_restorer field;
# the Linuxulator's rt_sigaction takes the Linux one, so the plan keeps the address and the
# flag comes back from it.
FBSD_SA = {"SA_ONSTACK": 0x1, "SA_RESTART": 0x2, "SA_RESETHAND": 0x4, "SA_NOCLDSTOP": 0x8,
           "SA_NODEFER": 0x10, "SA_NOCLDWAIT": 0x20, "SA_SIGINFO": 0x40}
SA_LOSSY = {"SA_UNSUPPORTED": "a Linux-only probe bit, meaningless once set",
            "SA_EXPOSE_TAGBITS": "Linux-only (tagged-address architectures)"}
FBSD_SS = {"SS_ONSTACK": 1, "SS_DISABLE": 4}
SIGPROCMASK_HOW = (("SIG_BLOCK", 0, 1), ("SIG_UNBLOCK", 1, 2), ("SIG_SETMASK", 2, 3))

# -- errno ---------------------------------------------------------------------------------------
# FreeBSD sys/sys/errno.h (1..97).
FBSD_ERRNO = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7,
    "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EDEADLK": 11, "ENOMEM": 12, "EACCES": 13,
    "EFAULT": 14, "ENOTBLK": 15, "EBUSY": 16, "EEXIST": 17, "EXDEV": 18, "ENODEV": 19,
    "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "ENFILE": 23, "EMFILE": 24, "ENOTTY": 25,
    "ETXTBSY": 26, "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30, "EMLINK": 31,
    "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "EAGAIN": 35, "EINPROGRESS": 36, "EALREADY": 37,
    "ENOTSOCK": 38, "EDESTADDRREQ": 39, "EMSGSIZE": 40, "EPROTOTYPE": 41, "ENOPROTOOPT": 42,
    "EPROTONOSUPPORT": 43, "ESOCKTNOSUPPORT": 44, "EOPNOTSUPP": 45, "EPFNOSUPPORT": 46,
    "EAFNOSUPPORT": 47, "EADDRINUSE": 48, "EADDRNOTAVAIL": 49, "ENETDOWN": 50,
    "ENETUNREACH": 51, "ENETRESET": 52, "ECONNABORTED": 53, "ECONNRESET": 54, "ENOBUFS": 55,
    "EISCONN": 56, "ENOTCONN": 57, "ESHUTDOWN": 58, "ETOOMANYREFS": 59, "ETIMEDOUT": 60,
    "ECONNREFUSED": 61, "ELOOP": 62, "ENAMETOOLONG": 63, "EHOSTDOWN": 64, "EHOSTUNREACH": 65,
    "ENOTEMPTY": 66, "EPROCLIM": 67, "EUSERS": 68, "EDQUOT": 69, "ESTALE": 70, "EREMOTE": 71,
    "EBADRPC": 72, "ERPCMISMATCH": 73, "EPROGUNAVAIL": 74, "EPROGMISMATCH": 75,
    "EPROCUNAVAIL": 76, "ENOLCK": 77, "ENOSYS": 78, "EFTYPE": 79, "EAUTH": 80,
    "ENEEDAUTH": 81, "EIDRM": 82, "ENOMSG": 83, "EOVERFLOW": 84, "ECANCELED": 85,
    "EILSEQ": 86, "ENOATTR": 87, "EDOOFUS": 88, "EBADMSG": 89, "EMULTIHOP": 90,
    "ENOLINK": 91, "EPROTO": 92, "ENOTCAPABLE": 93, "ECAPMODE": 94, "ENOTRECOVERABLE": 95,
    "EOWNERDEAD": 96, "EINTEGRITY": 97,
}
# FreeBSD errnos with no Linux errno of the same name: what the Linuxulator returns instead
# (linux_errtbl in linux_errno.inc).
FBSD_ERRNO_TO_LINUX_SUBST = {
    "EPROCLIM": "EAGAIN", "EBADRPC": "ENXIO", "ERPCMISMATCH": "ENXIO", "EPROGUNAVAIL": "ENXIO",
    "EPROGMISMATCH": "ENXIO", "EPROCUNAVAIL": "ENXIO", "EFTYPE": "EBADF", "EAUTH": "ENXIO",
    "ENEEDAUTH": "ENXIO", "ENOATTR": "ENODATA", "EDOOFUS": "EINVAL", "ENOTCAPABLE": "EPERM",
    "ECAPMODE": "EPERM", "EINTEGRITY": "EINVAL",
}
# Linux errnos without a FreeBSD errno of the same name: the Linuxulator's linux_to_bsd_errtbl
# choice. Anything Linux knows that is in neither map becomes EINVAL, as there. (That table
# also sends ENOEXEC to ENOENT and ESOCKTNOSUPPORT to EPROTONOSUPPORT although FreeBSD has
# both names; we keep the same-name errno, which is exact.)
LINUX_ERRNO_TO_FBSD_SUBST = {
    "ENODATA": "ENOATTR", "EBADFD": "EBADF", "ERESTART": "EAGAIN", "ENOMEDIUM": "EIO",
    "EMEDIUMTYPE": "EIO", "ENOKEY": "EIO", "EKEYEXPIRED": "EIO", "EKEYREVOKED": "EIO",
    "EKEYREJECTED": "EIO", "ERFKILL": "ENETDOWN",
}


# -- generic helpers -----------------------------------------------------------------------------
def invert(rows, src: int, dst: int) -> dict:
    """{row[src]: row[dst]} for rows where both exist."""
    return {r[src]: r[dst] for r in rows if r[src] is not None and r[dst] is not None}


def render_fbsd_open(flags: int) -> str:
    mode = FBSD_ACCESS.get(flags & 3, hex(flags & 3))
    rest = L.render_bits(flags & ~3, FBSD_OPEN, zero="")
    return f"{mode}|{rest}" if rest else mode


def parse_fbsd_open(text: str, *, path: str = "") -> int:
    table = {**FBSD_OPEN, **{v: k for k, v in FBSD_ACCESS.items()}}
    return L.parse_bits(text, table, path=path)


# -- open flags ----------------------------------------------------------------------------------
def open_to_fbsd(flags: int, log: LossLog, path: str, fd_type: str = "REG") -> int:
    """Linux open flags (as fdinfo shows them, O_CLOEXEC included) -> FreeBSD f_flag bits."""
    out = flags & L.O_ACCMODE
    rest = flags & ~L.O_ACCMODE
    for lname, fname in OPEN_ROWS:
        if rest & L.OPEN_FLAGS[lname]:
            out |= FBSD_OPEN[fname]
            rest &= ~L.OPEN_FLAGS[lname]
    if rest & LINUX_O_SYNC == LINUX_O_SYNC:
        out |= FBSD_OPEN["O_FSYNC"]
    elif rest & L.OPEN_FLAGS["O_DSYNC"]:
        out |= FBSD_OPEN["O_FSYNC"]
        log.note(path, L.render_open_flags(flags), "O_DSYNC becomes O_FSYNC (full sync) under "
                 "the Linuxulator and comes back as O_SYNC")
    elif rest & L.OPEN_FLAGS["__O_SYNC"]:
        log.note(path, L.render_open_flags(flags), "__O_SYNC without O_DSYNC is ignored")
    rest &= ~LINUX_O_SYNC
    _largefile(rest, fd_type, log, path, flags)
    rest &= ~L.OPEN_FLAGS["O_LARGEFILE"]
    for name, why in OPEN_LOSSY.items():
        if rest & L.OPEN_FLAGS[name]:
            log.note(path, L.render_open_flags(flags), f"{name}: {why}")
            rest &= ~L.OPEN_FLAGS[name]
    if rest:
        log.note(path, L.render_open_flags(flags), f"unknown Linux open bits {rest:#x} dropped")
    return out


def _largefile(rest: int, fd_type: str, log: LossLog, path: str, flags: int) -> None:
    has = bool(rest & L.OPEN_FLAGS["O_LARGEFILE"])
    if has != (fd_type in LARGEFILE_TYPES):
        log.note(path, L.render_open_flags(flags), "O_LARGEFILE is not what a 64-bit open of "
                 f"this kind ({fd_type}) gives; FreeBSD has no such flag to carry it")


def open_to_linux(fflags: int, log: LossLog, path: str, fd_type: str = "REG") -> int:
    """FreeBSD f_flag bits -> Linux open flags (fdinfo form, O_LARGEFILE put back by kind)."""
    out = fflags & 3
    rest = fflags & ~3
    for lname, fname in OPEN_ROWS:
        if rest & FBSD_OPEN[fname]:
            out |= L.OPEN_FLAGS[lname]
            rest &= ~FBSD_OPEN[fname]
    if rest & FBSD_OPEN["O_FSYNC"]:
        out |= LINUX_O_SYNC
    if rest & FBSD_OPEN["O_DSYNC"]:
        out |= L.OPEN_FLAGS["O_DSYNC"]
    rest &= ~(FBSD_OPEN["O_FSYNC"] | FBSD_OPEN["O_DSYNC"])
    if rest & FBSD_OPEN["O_PATH"]:
        out |= L.OPEN_FLAGS["O_PATH"]
        rest &= ~FBSD_OPEN["O_PATH"]
    if fd_type in LARGEFILE_TYPES:
        out |= L.OPEN_FLAGS["O_LARGEFILE"]
    if rest:
        log.note(path, render_fbsd_open(fflags), "FreeBSD-only open bits "
                 f"{L.render_bits(rest, FBSD_OPEN)} have no Linux counterpart")
    return out


# -- mmap ------------------------------------------------------------------------------------------
def map_to_fbsd(flags: int, log: LossLog, path: str) -> int:
    out, rest = 0, flags
    for lname, fname in MAP_ROWS:
        if rest & L.MAP_FLAGS[lname]:
            out |= FBSD_MAP[fname]
            rest &= ~L.MAP_FLAGS[lname]
    for name, why in MAP_LOSSY.items():
        if rest & L.MAP_FLAGS[name]:
            log.note(path, L.render_bits(flags, L.MAP_FLAGS), f"{name}: {why}")
            rest &= ~L.MAP_FLAGS[name]
    if rest:
        log.note(path, hex(flags), f"unknown Linux mmap bits {rest:#x} dropped")
    return out


def map_to_linux(fflags: int, log: LossLog, path: str) -> int:
    out, rest = 0, fflags
    for lname, fname in MAP_ROWS:
        if rest & FBSD_MAP[fname]:
            out |= L.MAP_FLAGS[lname]
            rest &= ~FBSD_MAP[fname]
    if rest:
        log.note(path, L.render_bits(fflags, FBSD_MAP), "FreeBSD-only mmap bits "
                 f"{L.render_bits(rest, FBSD_MAP)} have no Linux counterpart")
    return out


def _madv(bits: int, table: dict[int, int], log: LossLog, path: str, src: str, dst: str) -> int:
    """A madvise bit set (1 << advice) from one OS's advice numbers to the other's."""
    out = 0
    for adv in range(64):
        if bits >> adv & 1:
            if adv in table:
                out |= 1 << table[adv]
            else:
                log.note(path, hex(bits), f"{src} madvise advice {adv} has no {dst} counterpart")
    return out


def madv_to_fbsd(bits: int, log: LossLog, path: str) -> int:
    """vma.madv (1 << Linux advice) -> 1 << FreeBSD advice."""
    return _madv(bits, invert(MADV_ROWS, 1, 2), log, path, "Linux", "FreeBSD")


def madv_to_linux(bits: int, log: LossLog, path: str) -> int:
    return _madv(bits, invert(MADV_ROWS, 2, 1), log, path, "FreeBSD", "Linux")


# -- signals ---------------------------------------------------------------------------------------
def sig_to_fbsd(sig: int, log: LossLog | None = None, path: str = "") -> int:
    if sig not in SIG_LINUX_TO_FBSD:
        raise ValueError(f"not a Linux signal number: {sig}")
    if sig in SIG_LOSSY and log is not None:
        log.note(path, L.SIGNAL_NAMES[sig], SIG_LOSSY[sig])
    return SIG_LINUX_TO_FBSD[sig]


def sig_to_linux(sig: int) -> int | None:
    """FreeBSD signal number -> Linux, None if a Linux-ABI process can never see it."""
    return SIG_FBSD_TO_LINUX.get(sig)


def fbsd_signame(sig: int) -> str:
    if sig in FBSD_SIGNAL_NAMES:
        return FBSD_SIGNAL_NAMES[sig]
    if FBSD_SIGRTMIN <= sig <= FBSD_SIGRTMAX:
        return f"SIGRTMIN+{sig - FBSD_SIGRTMIN}"
    raise ValueError(f"not a FreeBSD signal number: {sig}")


def fbsd_signum(name: str) -> int:
    if name in FBSD_SIGNALS:
        return FBSD_SIGNALS[name]
    if name.startswith("SIGRTMIN+") and name[9:].isdigit():
        num = FBSD_SIGRTMIN + int(name[9:])
        if num <= FBSD_SIGRTMAX:
            return num
    raise ValueError(f"not a FreeBSD signal name: {name}")


def sigset_to_fbsd(mask: int, log: LossLog | None = None, path: str = "") -> tuple[int, ...]:
    """Linux 64-bit sigset (bit n-1 = signal n) -> FreeBSD sigset_t __bits[4] (u32 words)."""
    words = [0] * FBSD_NSIG_WORDS
    for sig in range(1, 65):
        if mask >> (sig - 1) & 1:
            f = sig_to_fbsd(sig, log, path)
            words[(f - 1) // 32] |= 1 << ((f - 1) % 32)
    return tuple(words)


def sigset_to_linux(words, log: LossLog | None = None, path: str = "") -> int:
    mask = 0
    for f in range(1, 32 * FBSD_NSIG_WORDS + 1):
        if words[(f - 1) // 32] >> ((f - 1) % 32) & 1:
            sig = sig_to_linux(f)
            if sig is None:
                if log is not None:
                    log.note(path, fbsd_signame_safe(f), "no Linux signal; dropped from the mask")
                continue
            mask |= 1 << (sig - 1)
    return mask


def fbsd_signame_safe(sig: int) -> str:
    try:
        return fbsd_signame(sig)
    except ValueError:
        return str(sig)


def sa_to_fbsd(flags: int, log: LossLog, path: str) -> int:
    """Linux sa_flags -> FreeBSD. SA_RESTORER is dropped here: the address travels apart."""
    out, rest = 0, flags & ~L.SA_FLAGS["SA_RESTORER"]
    for name, bit in FBSD_SA.items():
        if rest & L.SA_FLAGS[name]:
            out |= bit
            rest &= ~L.SA_FLAGS[name]
    for name, why in SA_LOSSY.items():
        if rest & L.SA_FLAGS[name]:
            log.note(path, L.render_bits(flags, L.SA_FLAGS), f"{name}: {why}")
            rest &= ~L.SA_FLAGS[name]
    if rest:
        log.note(path, hex(flags), f"unknown Linux sa_flags bits {rest:#x} dropped")
    return out


def sa_to_linux(fflags: int, restorer: int, log: LossLog, path: str) -> int:
    out, rest = 0, fflags
    for name, bit in FBSD_SA.items():
        if rest & bit:
            out |= L.SA_FLAGS[name]
            rest &= ~bit
    if restorer:
        out |= L.SA_FLAGS["SA_RESTORER"]
    if rest:
        log.note(path, hex(fflags), f"FreeBSD sa_flags bits {rest:#x} have no Linux counterpart")
    return out


# -- errno -----------------------------------------------------------------------------------------
_ALIASES = {"EDEADLOCK": "EDEADLK", "ENOTSUP": "EOPNOTSUPP", "EWOULDBLOCK": "EAGAIN"}


def _linux_errnos() -> dict[int, str]:
    """Linux errno number -> canonical name (Python's errorcode prefers some aliases)."""
    import errno
    return {num: _ALIASES.get(name, name) for num, name in errno.errorcode.items() if num <= 133}


LINUX_ERRNO_NAMES = _linux_errnos()
LINUX_ERRNO = {name: num for num, name in LINUX_ERRNO_NAMES.items()}
FBSD_ERRNO_NAMES = {v: k for k, v in FBSD_ERRNO.items()}


def errno_to_fbsd(num: int) -> tuple[int, bool]:
    """Linux errno -> (FreeBSD errno, exact?)."""
    name = LINUX_ERRNO_NAMES.get(num)
    if name in FBSD_ERRNO:
        return FBSD_ERRNO[name], True
    return FBSD_ERRNO[LINUX_ERRNO_TO_FBSD_SUBST.get(name, "EINVAL")], False


def errno_to_linux(num: int) -> tuple[int, bool]:
    """FreeBSD errno -> (Linux errno, exact?) as the Linuxulator reports it to Linux code."""
    name = FBSD_ERRNO_NAMES.get(num)
    if name is None:
        return LINUX_ERRNO["EINVAL"], False
    if name in FBSD_ERRNO_TO_LINUX_SUBST:
        return LINUX_ERRNO[FBSD_ERRNO_TO_LINUX_SUBST[name]], False
    return LINUX_ERRNO[name], True
