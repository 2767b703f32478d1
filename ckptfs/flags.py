"""Linux's own tables (x86_64): flag bits, signal numbers, register order, resource names.

The tree shows flag sets symbolically ("O_RDWR|O_APPEND") so a file means the same on every
OS; these tables are the one place that knows the Linux numbers. Translators for other OSes
map names, never Linux numbers.
"""
from __future__ import annotations

from .errors import BadTree

# open(2) flags as the kernel reports them in /proc/PID/fdinfo (octal). Access mode is separate.
ACCESS_MODES = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
OPEN_FLAGS = {
    "O_CREAT": 0o100, "O_EXCL": 0o200, "O_NOCTTY": 0o400, "O_TRUNC": 0o1000,
    "O_APPEND": 0o2000, "O_NONBLOCK": 0o4000, "O_DSYNC": 0o10000, "O_ASYNC": 0o20000,
    "O_DIRECT": 0o40000, "O_LARGEFILE": 0o100000, "O_DIRECTORY": 0o200000,
    "O_NOFOLLOW": 0o400000, "O_NOATIME": 0o1000000, "O_CLOEXEC": 0o2000000,
    "__O_SYNC": 0o4000000, "O_PATH": 0o10000000, "__O_TMPFILE": 0o20000000,
}
O_ACCMODE = 3
O_CLOEXEC = OPEN_FLAGS["O_CLOEXEC"]
FD_CLOEXEC = 1

PROT = {"PROT_READ": 1, "PROT_WRITE": 2, "PROT_EXEC": 4}
MAP_FLAGS = {
    "MAP_SHARED": 0x1, "MAP_PRIVATE": 0x2, "MAP_DROPPABLE": 0x8, "MAP_FIXED": 0x10,
    "MAP_ANONYMOUS": 0x20, "MAP_GROWSDOWN": 0x100, "MAP_DENYWRITE": 0x800,
    "MAP_EXECUTABLE": 0x1000, "MAP_LOCKED": 0x2000, "MAP_NORESERVE": 0x4000,
    "MAP_POPULATE": 0x8000, "MAP_NONBLOCK": 0x10000, "MAP_STACK": 0x20000,
    "MAP_HUGETLB": 0x40000,
}
# CRIU's vma_entry.status bits (images/vma.proto semantics).
VMA_STATUS = {
    "VMA_AREA_REGULAR": 1 << 0, "VMA_AREA_STACK": 1 << 1, "VMA_AREA_VSYSCALL": 1 << 2,
    "VMA_AREA_VDSO": 1 << 3, "VMA_AREA_HEAP": 1 << 5, "VMA_FILE_PRIVATE": 1 << 6,
    "VMA_FILE_SHARED": 1 << 7, "VMA_ANON_SHARED": 1 << 8, "VMA_ANON_PRIVATE": 1 << 9,
    "VMA_AREA_SYSVIPC": 1 << 10, "VMA_AREA_SOCKET": 1 << 11, "VMA_AREA_VVAR": 1 << 12,
    "VMA_AREA_AIORING": 1 << 13, "VMA_AREA_MEMFD": 1 << 14, "VMA_AREA_SHSTK": 1 << 15,
    "VMA_AREA_GUARD": 1 << 16, "VMA_AREA_UPROBES": 1 << 17,
}
# madvise advice numbers; vma_entry.madv holds 1 << advice. Keys are smaps VmFlags codes.
MADV = {"MADV_RANDOM": 1, "MADV_SEQUENTIAL": 2, "MADV_DONTFORK": 10, "MADV_MERGEABLE": 12,
        "MADV_HUGEPAGE": 14, "MADV_NOHUGEPAGE": 15, "MADV_DONTDUMP": 16, "MADV_WIPEONFORK": 18}
VMFLAG_MADV = {"rr": "MADV_RANDOM", "sr": "MADV_SEQUENTIAL", "dc": "MADV_DONTFORK",
               "mg": "MADV_MERGEABLE", "hg": "MADV_HUGEPAGE", "nh": "MADV_NOHUGEPAGE",
               "dd": "MADV_DONTDUMP", "wf": "MADV_WIPEONFORK"}
MADV_BITS = {name: 1 << n for name, n in MADV.items()}

SA_FLAGS = {"SA_NOCLDSTOP": 0x1, "SA_NOCLDWAIT": 0x2, "SA_SIGINFO": 0x4,
            "SA_UNSUPPORTED": 0x400, "SA_EXPOSE_TAGBITS": 0x800, "SA_RESTORER": 0x04000000,
            "SA_ONSTACK": 0x08000000, "SA_RESTART": 0x10000000, "SA_NODEFER": 0x40000000,
            "SA_RESETHAND": 0x80000000}
SS_FLAGS = {"SS_ONSTACK": 1, "SS_DISABLE": 2, "SS_AUTODISARM": 1 << 31}

SIGNALS = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
    "SIGBUS": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12,
    "SIGPIPE": 13, "SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16, "SIGCHLD": 17,
    "SIGCONT": 18, "SIGSTOP": 19, "SIGTSTP": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23,
    "SIGXCPU": 24, "SIGXFSZ": 25, "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28,
    "SIGIO": 29, "SIGPWR": 30, "SIGSYS": 31,
}
SIGRTMIN = 32
SIGNALS.update({f"SIGRT{n}": SIGRTMIN + n for n in range(33)})   # SIGRT0 .. SIGRT32 = 32 .. 64
SIGNAL_NAMES = {v: k for k, v in SIGNALS.items()}
# CRIU stores exactly these 62 sigactions: 1..64 minus SIGKILL and SIGSTOP.
SIGACTION_SIGNALS = [n for n in range(1, 65) if n not in (9, 19)]

RLIMITS = ["RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE",
           "RLIMIT_RSS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS",
           "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
           "RLIMIT_RTPRIO", "RLIMIT_RTTIME"]
RLIM_INFINITY = (1 << 64) - 1

# struct user_regs_struct, in kernel order (= CRIU user_x86_regs_entry fields 1..27).
# Tree name (sys/user.h) -> CRIU field name.
GP_REGS = [("r15", "r15"), ("r14", "r14"), ("r13", "r13"), ("r12", "r12"), ("rbp", "bp"),
           ("rbx", "bx"), ("r11", "r11"), ("r10", "r10"), ("r9", "r9"), ("r8", "r8"),
           ("rax", "ax"), ("rcx", "cx"), ("rdx", "dx"), ("rsi", "si"), ("rdi", "di"),
           ("orig_rax", "orig_ax"), ("rip", "ip"), ("cs", "cs"), ("eflags", "flags"),
           ("rsp", "sp"), ("ss", "ss"), ("fs_base", "fs_base"), ("gs_base", "gs_base"),
           ("ds", "ds"), ("es", "es"), ("fs", "fs"), ("gs", "gs")]

# CRIU fd_types enum values and the tree's `type` words.
FD_TYPES = {"UND": 0, "REG": 1, "PIPE": 2, "FIFO": 3, "INETSK": 4, "UNIXSK": 5, "EVENTFD": 6,
            "EVENTPOLL": 7, "INOTIFY": 8, "SIGNALFD": 9, "PACKETSK": 10, "TTY": 11,
            "FANOTIFY": 12, "NETLINKSK": 13, "NS": 14, "TUNF": 15, "EXT": 16, "TIMERFD": 17,
            "MEMFD": 18, "BPFMAP": 19, "PIDFD": 20}

TASK_STATES = {"alive": 1, "dead": 2, "stopped": 3, "zombie": 6}

PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4


# -- symbolic flag sets --------------------------------------------------------------------
def render_bits(value: int, table: dict[str, int], zero: str = "0") -> str:
    """`A|B|0x40` for a bit set; bits without a name are kept as hex so nothing is lost."""
    names = []
    for name, bit in table.items():
        if bit and value & bit == bit and not name.startswith("__"):
            names.append(name)
            value &= ~bit
    if value:
        names.append(hex(value))
    return "|".join(names) if names else zero


def parse_bits(text: str, table: dict[str, int], *, path: str = "") -> int:
    value = 0
    for word in filter(None, (w.strip() for w in text.strip().split("|"))):
        if word in table:
            value |= table[word]
        else:
            try:
                value |= int(word, 0)
            except ValueError:
                raise BadTree(f"unknown flag {word!r}", path=path) from None
    return value


def render_open_flags(flags: int) -> str:
    """Open flags as fdinfo shows them: access mode first, then the other bits."""
    mode = ACCESS_MODES.get(flags & O_ACCMODE, hex(flags & O_ACCMODE))
    rest = render_bits(flags & ~O_ACCMODE, OPEN_FLAGS, zero="")
    return f"{mode}|{rest}" if rest else mode


def parse_open_flags(text: str, *, path: str = "") -> int:
    table = {**OPEN_FLAGS, **{v: k for k, v in ACCESS_MODES.items()}}
    return parse_bits(text, table, path=path)


def render_prot(prot: int) -> str:
    return "".join(c if prot & bit else "-" for c, bit in (("r", 1), ("w", 2), ("x", 4)))


def parse_prot(text: str, *, path: str = "") -> int:
    t = text.strip()
    if len(t) != 3 or any(c not in ok for c, ok in zip(t, ("r-", "w-", "x-"))):
        raise BadTree(f"bad prot {t!r} (want three of r/w/x or -, like 'rw-')", path=path)
    return sum(bit for c, bit in zip(t, (1, 2, 4)) if c != "-")


def render_sigset(mask: int) -> str:
    return f"0x{mask:016x}"
