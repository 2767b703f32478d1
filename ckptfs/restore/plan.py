"""What a restore will do, checked whole before anything is created.

`make_plan(source)` reads every task of a Source into plain TaskPlans and lists every reason
the restore would fail (`Plan.problems`, one line each, naming the file or task and the
value). Nothing is created, opened for writing or mapped: `dry_run` is exactly this.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import mmap
import os
import stat

from .. import flags as F
from .. import pb
from ..errors import CkptError
from ..model import PAGE_SIZE, Source

V = F.VMA_STATUS
TASK_END = 0x7FFFFFFFF000          # top of user space (4-level paging)
MMAP_MIN = 0x10000
SCRATCH_SIZE = 64 << 10            # our page in every helper: a syscall insn + data
SPECIAL = V["VMA_AREA_VDSO"] | V["VMA_AREA_VVAR"] | V["VMA_AREA_VSYSCALL"]
UNSUPPORTED_VMA = {"VMA_AREA_SYSVIPC": "SysV shared memory", "VMA_AREA_AIORING": "AIO ring",
                   "VMA_AREA_SOCKET": "socket mapping", "VMA_AREA_SHSTK": "shadow stack",
                   "VMA_AREA_UPROBES": "uprobes area"}
SOCKET_KINDS = {F.FD_TYPES[k] for k in ("UNIXSK", "INETSK")}
FD_KINDS = {F.FD_TYPES[k] for k in ("REG", "PIPE", "FIFO", "EVENTFD", "EVENTPOLL", "SIGNALFD",
                                       "TIMERFD", "MEMFD", "TTY")} | SOCKET_KINDS
FD_TYPE_NAMES = {v: k for k, v in F.FD_TYPES.items()}


@dataclasses.dataclass
class TaskPlan:
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: list[int]
    cores: dict[int, object]            # tid -> core_entry
    mm: object
    fs: object
    fdinfo: list
    zombie: bool = False
    files_id: int = 0                   # descriptor table (task_kobj_ids); 0: its own


    @property
    def core(self):
        return self.cores[self.pid]

    @property
    def vmas(self):
        return list(self.mm.vmas)


@dataclasses.dataclass
class Plan:
    source: Source
    tasks: list[TaskPlan]
    scratch: int = 0                    # address free in every task's layout
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    userns: bool = False                # restored into a new user namespace

    def task(self, pid: int) -> TaskPlan:
        return next(t for t in self.tasks if t.pid == pid)


def where(source: Source, pid: int, rel: str = "") -> str:
    """A name for a part of task `pid` in messages: the tree path when the source is a tree."""
    root = getattr(source, "root", None)
    if isinstance(root, str):
        return os.path.join(root, "tasks", str(pid), rel) if rel else os.path.join(root, "tasks", str(pid))
    return f"task {pid}" + (f" {rel}" if rel else "")


# -- this machine ---------------------------------------------------------------------------
_XGETBV = bytes.fromhex("31c90f01d048c1e2204809d0c3")   # xor ecx,ecx; xgetbv; rax |= rdx<<32; ret


@functools.cache
def host_xcr0() -> int:
    """XCR0: the xsave features this CPU and kernel enable for user space (fixed for the
    life of this process, as are the vDSO's place and bytes: each is looked up once)."""
    buf = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_XGETBV)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    value = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)()
    return value


@functools.cache
def _host_vdso() -> tuple:
    return tuple(_read_host_vdso().items())


def host_vdso() -> dict[str, tuple[int, int]]:
    return dict(_host_vdso())


def _read_host_vdso() -> dict[str, tuple[int, int]]:
    """[vdso] / [vvar] / [vvar_vclock] of this process: name -> (start, end)."""
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] in ("[vdso]", "[vvar]", "[vvar_vclock]"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out[parts[5]] = (lo, hi)
    return out


@functools.cache
def host_vdso_bytes() -> bytes:
    lo, hi = host_vdso()["[vdso]"]
    with open("/proc/self/mem", "rb", buffering=0) as f:
        f.seek(lo)
        return f.read(hi - lo)


# -- reading the source -----------------------------------------------------------------------
def read_tasks(source: Source) -> list[TaskPlan]:
    tasks = []
    for ps in source.pstree():
        cores = {tid: source.core(tid) for tid in ps.threads}
        state = cores[ps.pid].tc.task_state
        zombie = state in (F.TASK_STATES["zombie"], F.TASK_STATES["dead"])
        tasks.append(TaskPlan(pid=ps.pid, ppid=ps.ppid, pgid=ps.pgid, sid=ps.sid,
                              threads=list(ps.threads), cores=cores,
                              mm=None if zombie else source.mm(ps.pid),
                              fs=None if zombie else source.fs(ps.pid),
                              fdinfo=[] if zombie else source.fdinfo(ps.pid), zombie=zombie,
                              files_id=0 if zombie else _files_id(source, ps.pid)))
    return tasks


def _files_id(source: Source, pid: int) -> int:
    try:
        return source.ids(pid).files_id
    except NotImplementedError:
        return 0


def table_owner(plan: Plan, t: TaskPlan) -> TaskPlan | None:
    """The task whose descriptor table `t` shares (its parent, restored before it), or None
    when `t` has a table of its own."""
    parent = next((p for p in plan.tasks if p.pid == t.ppid), None)
    if t.files_id and parent is not None and not parent.zombie and parent.files_id == t.files_id:
        return parent
    return None


def make_plan(source: Source, *, same_pids: bool = False, pidns: bool = False,
              userns: bool = False) -> Plan:
    """Read and check everything; problems are collected, not raised. `userns`: the tasks
    go into a new user namespace (a container's), where they start with every capability
    of that namespace, whatever ours are."""
    plan = Plan(source=source, tasks=[], userns=userns)
    try:
        plan.tasks = read_tasks(source)
    except CkptError as e:
        plan.problems.append(str(e))
        return plan
    checks = [check_meta, check_cpu, check_memory, check_vdso, check_files, check_creds,
              check_shared_tables]
    if same_pids:
        checks.append(check_pids_free)
    for check in checks:
        try:
            check(plan)
        except CkptError as e:
            plan.problems.append(str(e))
    plan.problems = list(dict.fromkeys(plan.problems))    # one line per distinct problem
    if not plan.problems:
        plan.scratch = find_scratch(plan)
    return plan


def check_meta(plan: Plan) -> None:
    meta = plan.source.meta()
    if meta.binary_os != "linux":
        plan.problems.append(f"the program is a native {meta.binary_os} binary: it cannot run on Linux")
    if meta.arch not in ("x86_64", ""):
        plan.problems.append(f"checkpoint architecture {meta.arch}, this machine is x86_64")
    for t in plan.tasks:
        for tid, core in t.cores.items():
            if core.thread_info.gpregs.mode == pb.user_x86_regs_mode.Value("COMPAT"):
                plan.problems.append(f"{where(plan.source, t.pid, f'threads/{tid}')}: 32-bit "
                                     "(compat) tasks are not restored")


def check_cpu(plan: Plan) -> None:
    """Every thread's saved xsave components must be ones this CPU enables."""
    from .. import xsave
    xcr0 = host_xcr0()
    for t in plan.tasks:
        for tid, core in t.cores.items():
            fp = core.thread_info.fpregs
            need = xsave.features_of(fp) | (fp.xsave.xstate_bv if fp.HasField("xsave") else 0)
            if need & ~xcr0:
                plan.problems.append(
                    f"{where(plan.source, t.pid, f'threads/{tid}/fpu')}: uses xsave features "
                    f"{need:#x}, this CPU enables {xcr0:#x} (missing {need & ~xcr0:#x})")


def check_memory(plan: Plan) -> None:
    for t in plan.tasks:
        if t.zombie:
            continue
        prev_end = 0
        for vma in t.vmas:
            name = where(plan.source, t.pid, f"maps/{vma.start:x}-{vma.end:x}")
            plan.problems.extend(f"{name}: {p}" for p in vma_problems(vma, prev_end))
            prev_end = max(prev_end, vma.end)
            if vma.status & (V["VMA_AREA_VVAR"] | V["VMA_AREA_VSYSCALL"]):
                continue
            try:
                for r in plan.source.page_ranges(t.pid, vma):
                    if r.start < vma.start or r.end > vma.end or r.start % PAGE_SIZE:
                        plan.problems.append(f"{name}: pages {r.start:#x}-{r.end:#x} lie outside the map")
            except CkptError as e:
                plan.problems.append(str(e))
        plan.problems.extend(mm_problems(plan.source, t))


def vma_problems(vma, prev_end: int) -> list[str]:
    out = []
    if vma.start % PAGE_SIZE or vma.end % PAGE_SIZE:
        out.append("start/end not page aligned")
    if vma.start >= vma.end:
        out.append("empty or inverted range")
    if vma.start < prev_end:
        out.append("overlaps the previous map")
    if vma.prot & ~7:
        out.append(f"bad prot {vma.prot:#x}")
    if vma.status & V["VMA_AREA_VSYSCALL"]:
        return out
    if vma.end > TASK_END or vma.start < MMAP_MIN and not vma.status & SPECIAL:
        out.append(f"address out of range (user space is {MMAP_MIN:#x}-{TASK_END:#x})")
    for name, what in UNSUPPORTED_VMA.items():
        if vma.status & V[name]:
            out.append(f"{what} maps are not restored")
    return out


def mm_problems(source: Source, t: TaskPlan) -> list[str]:
    mm, out = t.mm, []
    fields = ["mm_start_code", "mm_end_code", "mm_start_data", "mm_end_data", "mm_start_stack",
              "mm_start_brk", "mm_brk", "mm_arg_start", "mm_arg_end", "mm_env_start", "mm_env_end"]
    for f in fields:
        v = getattr(mm, f)
        if not MMAP_MIN <= v < TASK_END:
            out.append(f"{where(source, t.pid, 'mm/' + f[3:])}: {v:#x} is outside user space")
    for a, b in (("start_code", "end_code"), ("start_data", "end_data"), ("start_brk", "brk"),
                 ("arg_start", "arg_end"), ("env_start", "env_end")):
        if getattr(mm, "mm_" + a) > getattr(mm, "mm_" + b):
            out.append(f"{where(source, t.pid, 'mm/' + a)}: larger than mm/{b}")
    if len(mm.mm_saved_auxv) * 8 > 8 * 2 * 50:
        out.append(f"{where(source, t.pid, 'mm/auxv')}: {len(mm.mm_saved_auxv)} words, too long")
    return out


def check_vdso(plan: Plan) -> None:
    """The vDSO is not copied, this kernel's is placed where the old one was: same size
    (and the same code, when the checkpoint holds it) or the program would jump into garbage."""
    host = host_vdso()
    mine = {k: hi - lo for k, (lo, hi) in host.items()}
    for t in plan.tasks:
        if t.zombie:
            continue
        kinds = vdso_layout(t)
        if not kinds:
            continue
        name = where(plan.source, t.pid, "maps")
        if "[vdso]" not in host:
            plan.problems.append(f"{name}: this kernel has no vDSO to place")
            continue
        sizes = {k: hi - lo for k, (lo, hi) in kinds.items()}
        vvar_old = sum(v for k, v in sizes.items() if k != "[vdso]")
        vvar_new = sum(v for k, v in mine.items() if k != "[vdso]")
        if sizes.get("[vdso]") != mine["[vdso]"] or vvar_old != vvar_new:
            plan.problems.append(f"{name}: vDSO/vvar of {sizes} differ from this kernel's {mine}")
            continue
        lo, hi = kinds["[vdso]"]
        vdso = next(v for v in t.vmas if v.start == lo)
        try:
            if plan.source.page_ranges(t.pid, vdso) and \
                    plan.source.read_memory(t.pid, lo, hi - lo) != host_vdso_bytes():
                plan.problems.append(f"{where(plan.source, t.pid, f'maps/{lo:x}-{hi:x}')}: the "
                                     "saved vDSO is not this kernel's (another kernel build)")
        except CkptError as e:
            plan.problems.append(str(e))


def vdso_layout(t: TaskPlan) -> dict[str, tuple[int, int]]:
    """The task's vvar pages and vDSO: {'[vvar]': (lo, hi), '[vdso]': (lo, hi)}."""
    out = {}
    for v in t.vmas:
        if v.status & V["VMA_AREA_VDSO"]:
            out["[vdso]"] = (v.start, v.end)
        elif v.status & V["VMA_AREA_VVAR"]:
            out[f"[vvar@{v.start:x}]"] = (v.start, v.end)
    return out


def check_files(plan: Plan) -> None:
    from . import sockets
    src = plan.source
    index = None                # where the tree's sockets are, made at the first socket
    for t in plan.tasks:
        if t.zombie:
            continue
        for fdi in t.fdinfo:
            name = where(src, t.pid, f"fds/{fdi.fd}")
            if fdi.type not in FD_KINDS:
                kind = FD_TYPE_NAMES.get(fdi.type, str(fdi.type))
                plan.problems.append(f"{name}: descriptor {fdi.fd} is a {kind}, which restore "
                                     "does not support yet")
                continue
            fe = src.file(fdi.id)
            if fdi.type in SOCKET_KINDS:
                index = index or sockets.Index(src)
                plan.problems.extend(f"{name}: {p}" for p in sockets.problems(src, fe, index))
                continue
            if fdi.type == F.FD_TYPES["REG"] and src.file_deleted(fdi.id):
                continue          # no path to check: restore makes it from its saved contents
            if fdi.type == F.FD_TYPES["REG"]:
                plan.problems.extend(f"{name}: {p}" for p in reg_problems(fe.reg, check_size=True))
        # A deleted exe or mapped file has no path to check: restore makes it from its
        # saved contents (ghosts/<n>).
        for file_id, what in ((t.mm.exe_file_id, "exe"), (t.fs.cwd_id, "cwd"),
                              (t.fs.root_id, "root")):
            if what != "exe" or not src.file_deleted(file_id):
                plan.problems.extend(f"{where(src, t.pid, what)}: {p}"
                                     for p in reg_problems(src.file(file_id).reg))
        for vma in t.vmas:
            if vma.status & (V["VMA_FILE_PRIVATE"] | V["VMA_FILE_SHARED"]) and \
                    not src.file_deleted(vma.shmid):
                reg = src.file(vma.shmid).reg
                plan.problems.extend(f"{where(src, t.pid, f'maps/{vma.start:x}-{vma.end:x}/path')}: {p}"
                                     for p in reg_problems(reg))


def check_shared_tables(plan: Plan) -> None:
    """Tasks sharing one descriptor table (clone CLONE_FILES) are restored by forking each
    from its parent with CLONE_FILES, so every sharer but the first must be the child of
    another sharer."""
    first: dict[int, int] = {}
    for t in plan.tasks:
        if t.zombie or not t.files_id:
            continue
        if t.files_id in first and table_owner(plan, t) is None:
            plan.problems.append(f"{where(plan.source, t.pid, 'fds')}: shares its descriptor "
                                 f"table with task {first[t.files_id]} but not with its parent "
                                 f"{t.ppid}: such a table is not restored")
        first.setdefault(t.files_id, t.pid)


def reg_problems(reg, check_size: bool = False) -> list[str]:
    path = reg.name
    if not path.startswith("/"):
        return [f"path {path!r} is not absolute"]
    try:
        st = os.stat(path)
    except OSError as e:
        return [f"{path}: {e.strerror}"]
    if check_size and reg.HasField("size") and stat.S_ISREG(st.st_mode) and st.st_size != reg.size:
        return [f"{path}: size is {st.st_size} now, the checkpoint recorded {reg.size}"]
    return []


def check_creds(plan: Plan) -> None:
    """We can only restore what this process may become: any uid as root, no capability we
    do not hold ourselves (permitted, effective, inheritable, ambient: the task starts with
    ours and capset only lowers; in a new user namespace it starts with all of them). A bounding set wider than ours stays ours (a warning):
    it only limits what later programs may gain."""
    valid = (1 << (cap_last() + 1)) - 1
    ours = {k: valid for k in CAP_SETS} if plan.userns else caps_of()
    for t in plan.tasks:
        for tid, core in t.cores.items():
            c = core.thread_core.creds if core.thread_core.HasField("creds") \
                else t.core.thread_core.creds
            name = where(plan.source, t.pid, "creds" if tid == t.pid else f"threads/{tid}/creds")
            if os.geteuid() != 0 and (c.uid, c.euid, c.suid) != (os.getuid(),) * 3:
                plan.problems.append(f"{name}: uid {c.uid} needs root")
            sets = creds_caps(c)
            for k, v in sets.items():
                if v & ~valid:
                    plan.warnings.append(f"{name}/cap_{k}: capabilities {v & ~valid:#x} are "
                                         f"unknown to this kernel (last is {cap_last()}): left out")
            held = ours["prm"]
            for k in ("inh", "prm", "eff", "amb"):
                extra = sets[k] & valid & ~held
                if extra:
                    plan.problems.append(f"{name}/cap_{k}: {sets[k]:#x} needs capabilities "
                                         f"{extra:#x} this restorer does not hold ({held:#x})")
            if sets["bnd"] & valid & ~ours["bnd"]:
                plan.warnings.append(f"{name}/cap_bnd: {sets['bnd']:#x} is wider than this "
                                     f"restorer's {ours['bnd']:#x}: restored as the common part")


CAP_SETS = ("inh", "prm", "eff", "bnd", "amb")


def cap_last() -> int:
    """The highest capability number this kernel knows."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def caps_of(proc: str = "self") -> dict[str, int]:
    """Capability sets of /proc/<proc> (a tid or "self"): {'inh': ..., 'amb': ...}."""
    with open(f"/proc/{proc}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields["Cap" + k.capitalize()], 16) for k in CAP_SETS}


def creds_caps(c) -> dict[str, int]:
    """A creds_entry's capability sets as integers ([low, high] words joined)."""
    return {k: sum(w << (32 * i) for i, w in enumerate(getattr(c, "cap_" + k))) for k in CAP_SETS}


def check_pids_free(plan: Plan) -> None:
    for t in plan.tasks:
        for tid in t.threads:
            if os.path.exists(f"/proc/{tid}"):
                plan.problems.append(f"{where(plan.source, t.pid)}: pid {tid} is taken on this "
                                     "machine (same_pids needs it free; use pidns)")


def find_scratch(plan: Plan) -> int:
    """An address range free in every task's layout (and not below mmap_min)."""
    busy = sorted((v.start, v.end) for t in plan.tasks if not t.zombie for v in t.vmas)
    candidate = 0x10000000
    for lo, hi in busy:
        if candidate + SCRATCH_SIZE <= lo:
            break
        candidate = max(candidate, (hi + 0xFFFF) & ~0xFFFF)
    if candidate + SCRATCH_SIZE > TASK_END:
        raise CkptError("no free address range for the restorer's scratch page", step="plan")
    return candidate
