"""Model -> FreeBSD plan -> files -> plan -> Linux values: round trips, edits, nonsense,
lossy reporting and strict refusal.

The checkpoint is a real one: the threads ZDTM program dumped on this host (stdin a pipe,
stdout/stderr files, no rseq registration), once per module. States a test needs that the
program does not have (registers in a restartable sleep, particular handlers, masks, fd flags,
limits, a zombie) are made by editing a copy of that tree's files, as a user could."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckptfs import flags as L, tree
from ckptfs.errors import BadTree, Unsupported
from ckptfs.translate.freebsd import (dry_run, from_freebsd, read_plan, to_freebsd,
                                      write_plan)
from ckptfs.translate.freebsd import flags as F, rctl as R, regs as G
from helpers import procs as P, zdtm

HANDLER, RESTORER = 0x401136, 0x7F0000001000
U64 = (1 << 64) - 1
CLI = [sys.executable, "-m", "ckptfs.cli"]
USR1, TERM = L.SIGNALS["SIGUSR1"], L.SIGNALS["SIGTERM"]
SA = L.SA_FLAGS
HANDLERS = {USR1: (HANDLER, SA["SA_RESTORER"] | SA["SA_RESTART"] | SA["SA_SIGINFO"],
                   1 << (L.SIGNALS["SIGUSR2"] - 1)),
            TERM: (1, SA["SA_RESTORER"], 0)}
LIMITS = {"memory.max": "268435456", "memory.swap.max": "max", "pids.max": "64",
          "cpu.max": "50000 100000", "cpuset.cpus": "0-1"}
LF = L.OPEN_FLAGS["O_LARGEFILE"]


@pytest.fixture(scope="module")
def dumped(zdtm_bin, tmp_path_factory):
    """The threads program (4 threads) dumped and killed: the tree directory."""
    tmp = tmp_path_factory.mktemp("plan")
    ps = P.ProcSet(tmp / "logs")
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.pthread.rseq=0"}   # rseq would be lossy

    def spawn(argv, **kw):
        return ps.spawn(argv, stdin=subprocess.PIPE, env=env, **kw)
    try:
        run = zdtm.start(zdtm_bin, "threads", tmp / "work", spawn)
        r = subprocess.run([*CLI, "dump", "--kill", str(run.pid), str(tmp / "tree")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        ps.kill_all()
    return tmp / "tree"


def regs_values(rip, rax=0, orig=U64):
    vals = {criu: 0x1000 + i for i, (_, criu) in enumerate(L.GP_REGS)}
    vals.update(ip=rip, ax=rax, orig_ax=orig, cs=0x33, ss=0x2b, ds=0, es=0, fs=0, gs=0,
                flags=0x246, fs_base=0x7F0000002000, gs_base=0)
    return vals


def write(path: Path, codec, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.chmod(path, 0o644)
    path.write_bytes(tree.encode(codec, value))


class Case:
    """A copy of the dumped tree, edited to the state a test needs; `src()` reads it."""

    def __init__(self, dumped: Path, dest: Path, limits=None, own=("uts", "ipc"), handlers=None):
        shutil.copytree(dumped, dest)
        self.root = dest
        [self.pid] = [int(p) for p in os.listdir(dest / "tasks")]
        self.task = dest / f"tasks/{self.pid}"
        tids = sorted(int(t) for t in os.listdir(self.task / "threads"))
        for tid in tids[2:]:                      # two threads: the leader and one worker
            shutil.rmtree(self.task / f"threads/{tid}")
        self.tid = tids[1]
        self.handlers = HANDLERS if handlers is None else handlers
        self.limits = LIMITS if limits is None else limits
        # the leader "sleeps" in nanosleep interrupted with -ERESTARTNOHAND (the real one's
        # -ERESTART_RESTARTBLOCK would be lossy); the worker stopped in user space
        self.set_regs(self.pid, regs_values(0x401002, (-514) & U64, 35))
        self.set_regs(self.tid, regs_values(0x402000))
        self.set_sigmask(self.pid, 1 << (L.SIGNALS["SIGCHLD"] - 1))
        self.set_sigmask(self.tid, (1 << 63) | 1)            # SIGRT31 and SIGHUP
        write(self.task / "comm", tree.STR, "victim")
        for tid in (self.pid, self.tid):               # threads named as the process
            write(self.task / f"threads/{tid}/comm", tree.STR, "victim")
        shutil.rmtree(self.task / "sigactions")
        for sig, (h, fl, mask) in self.handlers.items():
            base = self.task / f"sigactions/{L.SIGNAL_NAMES[sig]}"
            for (name, _, codec), v in zip(tree.SIGACTION_FIELDS, (h, fl, RESTORER, mask)):
                write(base / name, codec, v)
        self.set_fd_flags(1, 1 | L.OPEN_FLAGS["O_APPEND"] | LF | L.O_CLOEXEC)
        self.set_fd_flags(2, 2 | LF)
        iso = dest / "isolation"
        write(iso / "uts/hostname", tree.STR, "web1")
        write(iso / "uts/domainname", tree.STR, "(none)")
        write(iso / "own", tree.STR, " ".join(own) or "none")
        shutil.rmtree(iso / "limits")
        for name, value in self.limits.items():
            write(iso / f"limits/{name}", tree.STR, value)

    def set_regs(self, tid, vals):
        for (name, crit) in L.GP_REGS:
            write(self.task / f"threads/{tid}/regs/{name}", tree.HEX, vals[crit])

    def set_sigmask(self, tid, mask):
        write(self.task / f"threads/{tid}/sigmask", tree.SIGSET, mask)

    def set_fd_flags(self, fd, flags):
        write(self.task / f"fds/{fd}/flags", tree.OPEN, flags)

    def src(self):
        return tree.TreeSource(str(self.root))

    def kernel(self):
        return json.loads((self.root / "manifest").read_text())["source"]["kernel"]


@pytest.fixture
def case(dumped, tmp_path):
    """Factory: case(limits=..., own=..., handlers=...) -> a Case in this test's tmp_path."""
    made = []

    def make(**kw):
        made.append(Case(dumped, tmp_path / f"tree{len(made)}", **kw))
        return made[-1]
    return make


def test_to_freebsd_values(case):
    c = case()
    PID = c.pid
    plan = to_freebsd(c.src())
    task = plan.tasks[0]
    leader = task.threads[0]
    assert list(leader.reg) == list(G.REG_NAMES)
    # -ERESTARTNOHAND: rewound onto the syscall instruction with rax = the call number.
    assert (leader.reg["r_rip"], leader.reg["r_rax"]) == (0x401000, 35)
    assert (leader.reg["r_cs"], leader.reg["r_ss"], leader.fsbase) == (0x43, 0x3b, 0x7F0000002000)
    assert leader.sigmask == (1 << (20 - 1), 0, 0, 0)                # FreeBSD SIGCHLD is 20
    assert task.threads[1].sigmask == (1, 0, 0, 1)   # Linux 64 -> FreeBSD 97: word 3, bit 0
    acts = {sa.signo: sa for sa in task.sigactions}
    assert set(acts) == {30, 15}                                     # SIGUSR1 -> 30
    assert acts[30].flags == F.FBSD_SA["SA_RESTART"] | F.FBSD_SA["SA_SIGINFO"]
    assert acts[30].mask == (1 << 30, 0, 0, 0) and acts[30].restorer == RESTORER
    fds = {f.fd: f for f in task.fds}
    assert fds[1].flags == 1 | 0x8 | 0x100000 and fds[0].flags == 0 and fds[2].flags == 2
    assert plan.jail["host"] == "new" and plan.jail["host.hostname"] == "web1"
    assert [plan.jail[p] for p in ("sysvmsg", "sysvsem", "sysvshm")] == ["new"] * 3
    assert plan.jail["linux.osrelease"] == c.kernel() and plan.jail_name == f"ckptfs_{PID}"
    assert {r.text() for r in plan.rules} == {
        f"jail:ckptfs_{PID}:memoryuse:deny=268435456", f"jail:ckptfs_{PID}:nthr:deny=64",
        f"jail:ckptfs_{PID}:maxproc:deny=64", f"jail:ckptfs_{PID}:pcpu:deny=50"}
    assert plan.cpuset == "0-1"
    lossy = {r.path for r in plan.lossy}
    assert {"isolation/limits/memory.max", "isolation/limits/cpu.max", "isolation/own"} <= lossy
    assert not any(p.startswith("tasks/") for p in lossy)            # nothing lost per task


def test_round_trip_to_linux(case):
    c = case()
    PID, TID = c.pid, c.tid
    src = c.src()
    back = from_freebsd(to_freebsd(src))
    task = back.tasks[PID]
    for tid in (PID, TID):
        want = G.equivalent_linux(
            {t: getattr(src.core(tid).thread_info.gpregs, c) for t, c in L.GP_REGS})
        assert task.regs[tid] == want
    assert task.sigmask == {PID: src.core(PID).tc.blk_sigset,
                            TID: src.core(TID).thread_core.blk_sigset}
    assert task.fds == {0: ("PIPE", 0), 1: ("REG", 1 | 0o2000 | 0o100000 | L.O_CLOEXEC),
                        2: ("REG", 2 | 0o100000)}
    assert task.sigactions == {s: {"handler": h, "flags": f, "restorer": RESTORER, "mask": m}
                               for s, (h, f, m) in c.handlers.items()}
    iso = back.isolation
    assert (iso.hostname, iso.domainname, set(iso.own_namespaces)) == \
        ("web1", "(none)", {"uts", "ipc"})
    assert iso.limits == {**R.equivalent_limits(c.limits), "cpu.max": "50000 100000"}


def test_plan_files_round_trip(case, tmp_path):
    c = case()
    PID, TID = c.pid, c.tid
    plan = to_freebsd(c.src())
    root = write_plan(plan, str(tmp_path))
    assert root == str(tmp_path / "plan")
    for rel in ("jail.conf", "rctl.rules", "cpuset", "lossy", "source", f"tasks/{PID}/regs",
                f"tasks/{PID}/threads/{TID}/regs", f"tasks/{PID}/fds/1/flags",
                f"tasks/{PID}/sigactions"):
        assert os.path.isfile(os.path.join(root, rel)), rel
    assert read_plan(str(tmp_path)) == plan
    text = open(os.path.join(root, f"tasks/{PID}/fds/1/flags")).read()
    assert text == "0x100009 O_WRONLY|O_APPEND|O_CLOEXEC\n"
    assert "30 SIGUSR1 handler=0x401136 flags=SA_RESTART|SA_SIGINFO" in \
        open(os.path.join(root, f"tasks/{PID}/sigactions")).read()
    regs = open(os.path.join(root, f"tasks/{PID}/regs")).read().split("\n")
    assert [ln.split()[0] for ln in regs if ln and not ln.startswith("#")] == \
        [*G.REG_NAMES, "fsbase", "gsbase"]


def _edit(path, old, new):
    text = open(path).read()
    assert old in text, (old, text)
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def test_edits_take_effect(case, tmp_path):
    c = case()
    PID = c.pid
    root = write_plan(to_freebsd(c.src()), str(tmp_path / "out"))
    _edit(os.path.join(root, "jail.conf"), '"web1"', '"web2"')
    _edit(os.path.join(root, "rctl.rules"), "memoryuse:deny=268435456", "memoryuse:deny=512m")
    _edit(os.path.join(root, f"tasks/{PID}/regs"), "r_rip 0x401000", "r_rip 0x401234")
    _edit(os.path.join(root, f"tasks/{PID}/fds/2/flags"), "0x2 O_RDWR", "O_RDWR|O_NONBLOCK")
    _edit(os.path.join(root, f"tasks/{PID}/sigactions"), "flags=SA_RESTART|SA_SIGINFO",
          "flags=SA_SIGINFO")
    back = from_freebsd(read_plan(str(tmp_path / "out")))
    assert back.isolation.hostname == "web2"
    assert back.isolation.limits["memory.max"] == str(512 << 20)
    assert back.tasks[PID].regs[PID]["rip"] == 0x401234
    assert back.tasks[PID].fds[2] == ("REG", 2 | L.OPEN_FLAGS["O_NONBLOCK"] | 0o100000)
    assert back.tasks[PID].sigactions[10]["flags"] == \
        L.SA_FLAGS["SA_SIGINFO"] | L.SA_FLAGS["SA_RESTORER"]


NONSENSE = [
    ("jail.conf", "\tpersist;", "\tenforce_statfs = 7;", "enforce_statfs = 7"),
    ("jail.conf", "\tpersist;", "\tvnet = maybe;", "'maybe'"),
    ("jail.conf", "\tpersist;", "\tfrobnicate = 1;", "frobnicate"),
    ("jail.conf", "\tpersist;", "\tpersist = 3;", "persist"),
    ("jail.conf", "\tpersist;", "\tpersist", "persist"),
    ("rctl.rules", "memoryuse:deny=268435456", "memoryuse:deny=5%", "5%"),
    ("rctl.rules", "memoryuse:deny=268435456", "memoryuse:deny=1.5g", "1.5g"),
    ("rctl.rules", "memoryuse:deny=268435456", "memoryuse:throttle=1", "throttle"),
    ("rctl.rules", "memoryuse:deny=268435456", "memoryfoo:deny=1", "memoryfoo"),
    ("rctl.rules", "jail:", "prison:", "prison"),
    ("cpuset", "0-1", "zero", "zero"),
    ("tasks/{pid}/regs", "r_rip 0x401000", "r_rip banana", "banana"),
    ("tasks/{pid}/regs", "r_fs 0x13", "r_fs 0x10000", "r_fs"),
    ("tasks/{pid}/fds/1/flags", "0x100009 O_WRONLY", "0x100008 O_WRONLY", "disagree"),
    ("tasks/{pid}/fds/1/flags", "O_APPEND", "O_BOGUS", "O_BOGUS"),
    ("tasks/{pid}/sigactions", "30 SIGUSR1", "30 SIGUSR2", "SIGUSR2"),
    ("tasks/{pid}/sigmask", "0x00080000", "0x00080000 0x1", "sigset"),
]


@pytest.mark.parametrize("rel,old,new,word", NONSENSE)
def test_nonsense_names_file_and_value(case, tmp_path, rel, old, new, word):
    c = case()
    rel = rel.format(pid=c.pid)
    root = write_plan(to_freebsd(c.src()), str(tmp_path / "out"))
    _edit(os.path.join(root, rel), old, new)
    with pytest.raises(BadTree) as e:
        read_plan(str(tmp_path / "out"))
    assert rel in str(e.value) and word in str(e.value)


def test_limit_nonsense_and_unknown_limits(case):
    with pytest.raises(BadTree) as e:
        to_freebsd(case(limits={"memory.max": "1.5G"}).src())
    assert "isolation/limits/memory.max" in str(e.value) and "1.5G" in str(e.value)
    plan = to_freebsd(case(limits={"io.max": "8:0 rbps=100 wbps=max\n8:16 rbps=50 riops=7"})
                      .src())
    assert {r.text().split(":", 2)[2] for r in plan.rules} == {"readbps:throttle=50",
                                                               "readiops:throttle=7"}
    reasons = {r.path: r.reason for r in plan.lossy}
    assert "per jail" in reasons["isolation/limits/io.max"]
    # memory.high is outside the tree's vocabulary (no Source carries it): the table itself
    # still reports it rather than dropping it silently
    log = LossLog()
    rules, _ = R.to_rctl({"memory.high": "100"}, "ckptfs_1", log)
    reasons = {r.path: r.reason for r in log.records}
    assert rules == [] and "no RCTL counterpart" in reasons["isolation/limits/memory.high"]


def test_strict_refuses_and_accepts(case):
    with pytest.raises(Unsupported) as e:
        to_freebsd(case().src(), strict=True)
    assert "strict" in str(e.value)
    exact = case(limits={"pids.max": "10", "cpuset.cpus": "0"}, own=("uts",)).src()
    plan = to_freebsd(exact, strict=True)
    assert plan.lossy == []
    stkflt = case(limits={}, own=(), handlers={L.SIGNALS["SIGSTKFLT"]: (HANDLER, 0, 0)}).src()
    with pytest.raises(Unsupported) as e:
        to_freebsd(stkflt, strict=True)
    assert "SIGSTKFLT" in str(e.value)
    assert "SIGSTKFLT" in to_freebsd(stkflt).lossy[0].path


def test_native_freebsd_binary_cannot_go_to_linux(case):
    plan = to_freebsd(case().src())
    plan.source["binary_os"] = "freebsd"
    with pytest.raises(Unsupported) as e:
        from_freebsd(plan)
    assert "native FreeBSD binary" in str(e.value)


def test_dry_run(case, tmp_path):
    c = case()
    PID = c.pid
    root = dry_run(c.src(), str(tmp_path / "out"))
    assert open(os.path.join(root, "jail.conf")).read().startswith("# ckptfs")
    assert f"ckptfs_{PID} {{" in open(os.path.join(root, "jail.conf")).read()
    lossy = open(os.path.join(root, "lossy")).read()
    assert "isolation/limits/memory.max\t268435456\t" in lossy


# -- the values back on the checkpoint (apply.py) ---------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from ckptfs.translate import LossLog  # noqa: E402
from ckptfs.translate.freebsd import apply_linux, through_freebsd  # noqa: E402


@pytest.fixture(scope="module")
def prop_case(dumped, tmp_path_factory):
    return Case(dumped, tmp_path_factory.mktemp("prop") / "tree")


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({c: st.integers(0, U64) for _, c in L.GP_REGS}),
       st.integers(0, U64), st.sets(st.sampled_from(["O_APPEND", "O_NONBLOCK", "O_DIRECT",
                                                     "O_NOATIME", "O_DSYNC"])))
def test_applied_source_carries_the_translation(prop_case, regs, mask, names):
    """Whatever the registers, mask and flags: the applied Source has exactly what a trip
    through the FreeBSD form gives back, and the rest of the checkpoint unchanged."""
    c = prop_case
    PID, TID = c.pid, c.tid
    c.set_regs(TID, regs)
    for sig in F.SIG_LOSSY:                   # those have no exact FreeBSD twin
        mask &= ~(1 << (sig - 1))
    c.set_sigmask(TID, mask)
    extra = 0
    for n in names:
        extra |= L.OPEN_FLAGS[n]
    c.set_fd_flags(2, 2 | extra)
    src = c.src()
    out = apply_linux(src, from_freebsd(to_freebsd(src)))
    got = {t: getattr(out.core(TID).thread_info.gpregs, c) for t, c in L.GP_REGS}
    assert got == G.equivalent_linux({t: regs[c] for t, c in L.GP_REGS})
    assert out.core(TID).thread_core.blk_sigset == mask
    info = {i.fd: i for i in out.fdinfo(PID)}
    back = F.open_to_linux(F.open_to_fbsd(2 | extra, LossLog(), ""), LossLog(), "")
    assert out.file(info[2].id).reg.flags == back & ~L.O_CLOEXEC
    assert out.file(info[2].id).reg.flags & (L.OPEN_FLAGS["O_APPEND"] | L.OPEN_FLAGS["O_NONBLOCK"]) \
        == extra & (L.OPEN_FLAGS["O_APPEND"] | L.OPEN_FLAGS["O_NONBLOCK"])
    assert [bool(info[n].flags & L.FD_CLOEXEC) for n in (0, 1, 2)] == [False, True, False]
    assert out.pstree() == src.pstree() and out.meta() == src.meta()


def _dup_fd1_as_3(c):
    """fds/3: a dup of fd 1 (same open file description, no close-on-exec)."""
    shutil.copytree(c.task / "fds/1", c.task / "fds/3")
    c.set_fd_flags(3, 1 | L.OPEN_FLAGS["O_APPEND"] | LF)


def test_two_fds_of_one_file_given_different_flags_are_refused(case, tmp_path):
    c = case()
    PID = c.pid
    _dup_fd1_as_3(c)

    def edit(plan):
        _edit(f"{plan}/tasks/{PID}/fds/3/flags", "0x9 O_WRONLY|O_APPEND", "O_WRONLY")
    with pytest.raises(BadTree) as e:
        through_freebsd(c.src(), str(tmp_path / "out"), edit)
    assert f"tasks/{PID}/fds/3/flags" in str(e.value) and "fds/1/flags" in str(e.value)
    out = through_freebsd(c.src(), str(tmp_path / "again"))
    assert {i.fd: i.flags for i in out.fdinfo(PID)}[3] == 0    # cloexec is per descriptor


def test_zombie_is_one_lossy_record_and_passes_through(case, tmp_path):
    c = case(limits={}, own=())
    PID = c.pid
    for tid in (PID, c.tid):
        c.set_regs(tid, {crit: 0 for _, crit in L.GP_REGS})
    write(c.task / "state", tree.names(L.TASK_STATES), L.TASK_STATES["zombie"])
    write(c.task / "exit_code", tree.DEC, 3)
    src = c.src()
    plan = to_freebsd(src)
    assert [(r.path, r.value) for r in plan.lossy] == [(f"tasks/{PID}/state", "zombie")]
    out = through_freebsd(src, str(tmp_path / "out"))
    assert out.core(PID) is src.core(PID)          # a zombie's core is left as it was
