"""Model -> FreeBSD plan -> files -> plan -> Linux values: round trips, edits, nonsense,
lossy reporting and strict refusal."""
from __future__ import annotations

import os

import pytest

from ckptfs import flags as L, model, pb
from ckptfs.errors import BadTree, Unsupported
from ckptfs.translate.freebsd import (dry_run, from_freebsd, read_plan, to_freebsd,
                                      write_plan)
from ckptfs.translate.freebsd import flags as F, rctl as R, regs as G

PID, TID = 4242, 4243
HANDLER, RESTORER = 0x401136, 0x7F0000001000
U64 = (1 << 64) - 1


def regs_entry(rip, rax=0, orig=U64):
    vals = {criu: 0x1000 + i for i, (_, criu) in enumerate(L.GP_REGS)}
    vals.update(ip=rip, ax=rax, orig_ax=orig, cs=0x33, ss=0x2b, ds=0, es=0, fs=0, gs=0,
                flags=0x246, fs_base=0x7F0000002000, gs_base=0)
    return pb.user_x86_regs_entry(mode=pb.NATIVE, **vals)


def sa_entries(handlers):
    out = []
    for sig in L.SIGACTION_SIGNALS:
        h = handlers.get(sig)
        out.append(pb.sa_entry(sigaction=h[0], flags=h[1], restorer=RESTORER, mask=h[2])
                   if h else pb.sa_entry(sigaction=0, flags=0, restorer=0, mask=0))
    return out


class FakeSource(model.Source):
    """One process with two threads; the leader sleeps in nanosleep (-ERESTART_RESTARTBLOCK
    would be lossy, so it is interrupted with -ERESTARTNOHAND), fds: a pipe, two files."""

    def __init__(self, limits=None, own=("uts", "ipc"), handlers=None):
        usr1, term = L.SIGNALS["SIGUSR1"], L.SIGNALS["SIGTERM"]
        sa = L.SA_FLAGS
        self.handlers = handlers if handlers is not None else {
            usr1: (HANDLER, sa["SA_RESTORER"] | sa["SA_RESTART"] | sa["SA_SIGINFO"],
                   1 << (L.SIGNALS["SIGUSR2"] - 1)),
            term: (1, sa["SA_RESTORER"], 0)}
        self.limits = limits if limits is not None else {
            "memory.max": "268435456", "memory.swap.max": "max", "pids.max": "64",
            "cpu.max": "50000 100000", "cpuset.cpus": "0-1"}
        self.own = own
        self.cores = {PID: self._core(PID, regs_entry(0x401002, (-514) & U64, 35)),
                      TID: self._core(TID, regs_entry(0x402000))}
        LF = L.OPEN_FLAGS["O_LARGEFILE"]
        self.fds = [(0, 10, "PIPE", 0), (1, 11, "REG", 1 | L.OPEN_FLAGS["O_APPEND"] | LF),
                    (2, 12, "REG", 2 | LF)]

    def _core(self, tid, regs):
        c = pb.core_entry(mtype=pb.core_entry.X86_64)
        c.thread_info.gpregs.CopyFrom(regs)
        c.thread_core.futex_rla, c.thread_core.futex_rla_len = 0, 24
        if tid == PID:
            c.tc.blk_sigset = 1 << (L.SIGNALS["SIGCHLD"] - 1)
            c.tc.comm = "victim"
            c.tc.sigactions.extend(sa_entries(self.handlers))
        else:
            c.thread_core.blk_sigset = (1 << 63) | 1     # SIGRT31 and SIGHUP
        return c

    def meta(self):
        return model.Meta(kernel="6.18.44", hostname="a")

    def pstree(self):
        return [pb.pstree_entry(pid=PID, ppid=1, pgid=PID, sid=PID, threads=[PID, TID])]

    def core(self, tid):
        return self.cores[tid]

    def fdinfo(self, pid):
        return [pb.fdinfo_entry(id=fid, flags=1 if fd == 1 else 0, type=L.FD_TYPES[kind], fd=fd)
                for fd, fid, kind, _ in self.fds]

    def file(self, file_id):
        fd, fid, kind, flags = next(f for f in self.fds if f[1] == file_id)
        if kind == "PIPE":
            return pb.file_entry(type=L.FD_TYPES[kind], id=fid,
                                 pipe=pb.pipe_entry(id=fid, pipe_id=99, flags=flags))
        return pb.file_entry(type=L.FD_TYPES[kind], id=fid,
                             reg=pb.reg_file_entry(id=fid, flags=flags, pos=0, name="/tmp/x"))

    def isolation(self):
        return model.Isolation(hostname="web1", domainname="(none)", own_namespaces=self.own,
                               limits=dict(self.limits))


def test_to_freebsd_values():
    plan = to_freebsd(FakeSource())
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
    assert plan.jail["linux.osrelease"] == "6.18.44" and plan.jail_name == f"ckptfs_{PID}"
    assert {r.text() for r in plan.rules} == {
        f"jail:ckptfs_{PID}:memoryuse:deny=268435456", f"jail:ckptfs_{PID}:nthr:deny=64",
        f"jail:ckptfs_{PID}:maxproc:deny=64", f"jail:ckptfs_{PID}:pcpu:deny=50"}
    assert plan.cpuset == "0-1"
    lossy = {r.path for r in plan.lossy}
    assert {"isolation/limits/memory.max", "isolation/limits/cpu.max", "isolation/own"} <= lossy
    assert not any(p.startswith("tasks/") for p in lossy)            # nothing lost per task


def test_round_trip_to_linux():
    src = FakeSource()
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
                               for s, (h, f, m) in src.handlers.items()}
    iso = back.isolation
    assert (iso.hostname, iso.domainname, set(iso.own_namespaces)) == \
        ("web1", "(none)", {"uts", "ipc"})
    assert iso.limits == {**R.equivalent_limits(src.limits), "cpu.max": "50000 100000"}


def test_plan_files_round_trip(tmp_path):
    plan = to_freebsd(FakeSource())
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


def test_edits_take_effect(tmp_path):
    root = write_plan(to_freebsd(FakeSource()), str(tmp_path))
    _edit(os.path.join(root, "jail.conf"), '"web1"', '"web2"')
    _edit(os.path.join(root, "rctl.rules"), "memoryuse:deny=268435456", "memoryuse:deny=512m")
    _edit(os.path.join(root, f"tasks/{PID}/regs"), "r_rip 0x401000", "r_rip 0x401234")
    _edit(os.path.join(root, f"tasks/{PID}/fds/2/flags"), "0x2 O_RDWR", "O_RDWR|O_NONBLOCK")
    _edit(os.path.join(root, f"tasks/{PID}/sigactions"), "flags=SA_RESTART|SA_SIGINFO",
          "flags=SA_SIGINFO")
    back = from_freebsd(read_plan(str(tmp_path)))
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
    (f"tasks/{PID}/regs", "r_rip 0x401000", "r_rip banana", "banana"),
    (f"tasks/{PID}/regs", "r_fs 0x13", "r_fs 0x10000", "r_fs"),
    (f"tasks/{PID}/fds/1/flags", "0x100009 O_WRONLY", "0x100008 O_WRONLY", "disagree"),
    (f"tasks/{PID}/fds/1/flags", "O_APPEND", "O_BOGUS", "O_BOGUS"),
    (f"tasks/{PID}/sigactions", "30 SIGUSR1", "30 SIGUSR2", "SIGUSR2"),
    (f"tasks/{PID}/sigmask", "0x00080000", "0x00080000 0x1", "sigset"),
]


@pytest.mark.parametrize("rel,old,new,word", NONSENSE)
def test_nonsense_names_file_and_value(tmp_path, rel, old, new, word):
    root = write_plan(to_freebsd(FakeSource()), str(tmp_path))
    _edit(os.path.join(root, rel), old, new)
    with pytest.raises(BadTree) as e:
        read_plan(str(tmp_path))
    assert rel in str(e.value) and word in str(e.value)


def test_limit_nonsense_and_unknown_limits():
    with pytest.raises(BadTree) as e:
        to_freebsd(FakeSource(limits={"memory.max": "1.5G"}))
    assert "isolation/limits/memory.max" in str(e.value) and "1.5G" in str(e.value)
    plan = to_freebsd(FakeSource(limits={"memory.high": "100", "io.max":
                                         "8:0 rbps=100 wbps=max\n8:16 rbps=50 riops=7"}))
    assert {r.text().split(":", 2)[2] for r in plan.rules} == {"readbps:throttle=50",
                                                               "readiops:throttle=7"}
    reasons = {r.path: r.reason for r in plan.lossy}
    assert "no RCTL counterpart" in reasons["isolation/limits/memory.high"]
    assert "per jail" in reasons["isolation/limits/io.max"]


def test_strict_refuses_and_accepts():
    with pytest.raises(Unsupported) as e:
        to_freebsd(FakeSource(), strict=True)
    assert "strict" in str(e.value)
    exact = FakeSource(limits={"pids.max": "10", "cpuset.cpus": "0"}, own=("uts",))
    plan = to_freebsd(exact, strict=True)
    assert plan.lossy == []
    stkflt = FakeSource(limits={}, own=(), handlers={L.SIGNALS["SIGSTKFLT"]: (HANDLER, 0, 0)})
    with pytest.raises(Unsupported) as e:
        to_freebsd(stkflt, strict=True)
    assert "SIGSTKFLT" in str(e.value)
    assert "SIGSTKFLT" in to_freebsd(stkflt).lossy[0].path


def test_native_freebsd_binary_cannot_go_to_linux(tmp_path):
    plan = to_freebsd(FakeSource())
    plan.source["binary_os"] = "freebsd"
    with pytest.raises(Unsupported) as e:
        from_freebsd(plan)
    assert "native FreeBSD binary" in str(e.value)


def test_dry_run(tmp_path):
    root = dry_run(FakeSource(), str(tmp_path))
    assert open(os.path.join(root, "jail.conf")).read().startswith("# ckptfs")
    assert f"ckptfs_{PID} {{" in open(os.path.join(root, "jail.conf")).read()
    lossy = open(os.path.join(root, "lossy")).read()
    assert "isolation/limits/memory.max\t268435456\t" in lossy


# -- the values back on the checkpoint (apply.py) ---------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from ckptfs.translate import LossLog  # noqa: E402
from ckptfs.translate.freebsd import apply_linux, through_freebsd  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({c: st.integers(0, U64) for _, c in L.GP_REGS}),
       st.integers(0, U64), st.sets(st.sampled_from(["O_APPEND", "O_NONBLOCK", "O_DIRECT",
                                                     "O_NOATIME", "O_DSYNC"])))
def test_applied_source_carries_the_translation(regs, mask, names):
    """Whatever the registers, mask and flags: the applied Source has exactly what a trip
    through the FreeBSD form gives back, and the rest of the checkpoint unchanged."""
    src = FakeSource()
    src.cores[TID].thread_info.gpregs.CopyFrom(pb.user_x86_regs_entry(mode=pb.NATIVE, **regs))
    for sig in F.SIG_LOSSY:                   # those have no exact FreeBSD twin
        mask &= ~(1 << (sig - 1))
    src.cores[TID].thread_core.blk_sigset = mask
    extra = 0
    for n in names:
        extra |= L.OPEN_FLAGS[n]
    src.fds[2] = (2, 12, "REG", 2 | extra)
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


def test_two_fds_of_one_file_given_different_flags_are_refused(tmp_path):
    src = FakeSource()
    src.fds.append((3, 11, "REG", 1 | L.OPEN_FLAGS["O_APPEND"]))      # a dup of fd 1

    def edit(plan):
        _edit(f"{plan}/tasks/{PID}/fds/3/flags", "0x9 O_WRONLY|O_APPEND", "O_WRONLY")
    with pytest.raises(BadTree) as e:
        through_freebsd(src, str(tmp_path), edit)
    assert f"tasks/{PID}/fds/3/flags" in str(e.value) and "fds/1/flags" in str(e.value)
    src2 = FakeSource()
    src2.fds.append((3, 11, "REG", 1 | L.OPEN_FLAGS["O_APPEND"]))
    out = through_freebsd(src2, str(tmp_path / "again"))
    assert {i.fd: i.flags for i in out.fdinfo(PID)}[3] == 0    # cloexec is per descriptor


def test_zombie_is_one_lossy_record_and_passes_through(tmp_path):
    src = FakeSource(limits={}, own=())
    for tid in (PID, TID):
        src.cores[tid].thread_info.gpregs.CopyFrom(pb.user_x86_regs_entry(
            mode=pb.NATIVE, **{c: 0 for _, c in L.GP_REGS}))
    src.cores[PID].tc.task_state, src.cores[PID].tc.exit_code = L.TASK_STATES["zombie"], 3
    plan = to_freebsd(src)
    assert [(r.path, r.value) for r in plan.lossy] == [(f"tasks/{PID}/state", "zombie")]
    out = through_freebsd(src, str(tmp_path))
    assert out.core(PID) is src.core(PID)          # a zombie's core is left as it was
