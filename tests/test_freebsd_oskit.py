"""oskit.freebsd on Linux (imports, parses, refuses calls), native-binary detection on real
ELF files, and the FreeBSD capture/restore backends against a fake FreeBSD kernel (the only
mock: there is no FreeBSD here)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from ckptfs import flags as L, tree
from ckptfs.errors import KernelError, Unsupported
from ckptfs.oskit import freebsd as O
from ckptfs.restore import freebsd as RF
from ckptfs.capture import freebsd as CF
from ckptfs.translate.freebsd import elf, fpu, regs as G
from ckptfs.translate.freebsd import to_freebsd
from fbsd_fake import FakeFreeBSD, spawn
from helpers import procs as procs_mod, zdtm


# -- oskit on Linux -------------------------------------------------------------------------------
@pytest.mark.parametrize("call,args", [
    ("attach", (1,)), ("detach", (1,)), ("get_regs", (1,)), ("set_regs", (1, bytes(176))),
    ("get_fsbase", (1,)), ("set_fsbase", (1, 0)), ("get_gsbase", (1,)), ("xstate_info", (1,)),
    ("get_xstate", (1,)), ("set_xstate", (1, bytes(576))), ("read_memory", (1, 0, 8)),
    ("write_memory", (1, 0, b"x")), ("vmmap", (1,)), ("filedesc", (1,)),
    ("jail_set", ({"name": "j"},)), ("jail_get", ("j", ["path"])),
    ("rctl_add_rule", ("jail:j:nthr:deny=1",)), ("wait", (1,)), ("cont", (1,))])
def test_calls_refuse_on_linux(call, args):
    assert not O.IS_FREEBSD
    with pytest.raises(Unsupported) as e:
        getattr(O, call)(*args)
    assert "FreeBSD system calls are not available on linux" in str(e.value)


def test_constants_match_reference():
    import json
    ref = "/work/shared/reference/freebsd"
    if not os.path.isdir(ref):
        pytest.skip("reference facts not present")
    reqs = json.load(open(os.path.join(ref, "ptrace_requests.json")))["requests"]
    for row in reqs:
        if row["freebsd"] and hasattr(O, row["freebsd"]):
            assert getattr(O, row["freebsd"]) == row["freebsd_value"], row["freebsd"]
    vm = json.load(open(os.path.join(ref, "vm_fd_introspection.json")))
    assert {v: k.lower() for k, v in vm["KVME_TYPE"].items() if k != "notes"} == O.KVME_TYPE
    assert {k: v for k, v in vm["KF_FLAG"].items() if k != "notes"} == O.KF_FLAG
    assert vm["kinfo_vmentry"]["size"] == O.KINFO_VMENTRY_SIZE
    offs = {f["field"]: f["offset"] for f in vm["kinfo_vmentry"]["fields"]}
    assert offs["kve_path"] == O.KVE_PATH_OFFSET and offs["kve_vn_rdev"] + 8 == O.KVE.size
    offs = {f["field"]: f["offset"] for f in vm["kinfo_file"]["fields"]}
    assert (offs["kf_path"], offs["kf_status"], offs["kf_offset"]) == \
        (O.KF_PATH_OFFSET, O.KF_STATUS_OFFSET, 24)


def kve(start, end, kind, prot, flags=0, path="", offset=0):
    rec = bytearray(O.KINFO_VMENTRY_SIZE)
    struct.pack_into("<iiQQQQ", rec, 0, len(rec), kind, start, end, offset, 77)
    struct.pack_into("<i", rec, 44, flags)
    struct.pack_into("<i", rec, 56, prot)
    rec[O.KVE_PATH_OFFSET:O.KVE_PATH_OFFSET + len(path)] = path.encode()
    return bytes(rec)


def kf(fd, kind, flags, offset=0, path=""):
    rec = bytearray(O.KINFO_FILE_SIZE)
    struct.pack_into("<iiiii", rec, 0, len(rec), kind, fd, 1, flags)
    struct.pack_into("<q", rec, 24, offset)
    rec[O.KF_PATH_OFFSET:O.KF_PATH_OFFSET + len(path)] = path.encode()
    return bytes(rec)


def test_parse_records():
    buf = kve(0x400000, 0x401000, 2, 5, 1, "/bin/x", 0x1000) + kve(0x7f0000, 0x7f2000, 3, 3, 0x21)
    a, b = O.parse_vmmap(buf)
    assert (a.start, a.end, a.kind, a.prot, a.private, a.path, a.offset) == \
        (0x400000, 0x401000, "vnode", 5, True, "/bin/x", 0x1000)
    assert (b.kind, b.private, b.path, b.flags & O.KVME_FLAG["GROWS_DOWN"]) == ("swap", True, "", 0x20)
    f1, f2 = O.parse_filedesc(kf(-5, 1, 1, path="/bin/x") + kf(3, 1, 2 | 4, 100, "/tmp/log"))
    assert (f1.fd, f1.path, f2.fd, f2.flags, f2.offset) == (-5, "/bin/x", 3, 6, 100)
    with pytest.raises(Unsupported):
        O.parse_vmmap(buf[:500])


def test_jail_values_encoded_like_libjail():
    assert O.jail_value("persist", True) == (b"persist\0", None)
    assert O.jail_value("persist", False) == (b"nopersist\0", None)
    assert O.jail_value("vnet", "new") == (b"vnet\0", struct.pack("<i", 1))
    assert O.jail_value("enforce_statfs", 1) == (b"enforce_statfs\0", struct.pack("<i", 1))
    assert O.jail_value("host.hostname", "web1") == (b"host.hostname\0", b"web1\0")
    with pytest.raises(ValueError):
        O.jail_value("sysvmsg", "sometimes")


# -- native binaries --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("gcc missing")
    d = tmp_path_factory.mktemp("elf")
    src = d / "t.c"
    src.write_text("int main(void){return 0;}\n")
    subprocess.run(["gcc", "-o", str(d / "t"), str(src)], check=True)
    return d / "t"


def _with_osabi(path, value, out):
    data = bytearray(path.read_bytes())
    data[7] = value                       # e_ident[EI_OSABI]
    out.write_bytes(bytes(data))
    return str(out)


def test_binary_os_from_elf_header(exe, tmp_path):
    assert elf.binary_os(str(exe)) == "linux"
    fb = _with_osabi(exe, 9, tmp_path / "fbsd")
    assert elf.binary_os(fb) == "freebsd"
    assert elf.binary_os(_with_osabi(exe, 3, tmp_path / "lnx")) == "linux"
    with pytest.raises(Unsupported) as e:
        elf.check_can_run(fb, "linux")
    assert "native FreeBSD binary" in str(e.value) and fb in str(e.value)
    assert elf.check_can_run(fb, "freebsd") == "freebsd"
    (tmp_path / "txt").write_text("hello")
    with pytest.raises(Exception) as e:
        elf.binary_os(str(tmp_path / "txt"))
    assert "txt" in str(e.value)


# -- a fake FreeBSD kernel ----------------------------------------------------------------------------
class FakeKit:
    """Just enough FreeBSD for capture and restore: one stopped process, injected Linux system
    calls answered from a table; every call is recorded."""
    KVME_PROT_EXEC, JAIL_CREATE = O.KVME_PROT_EXEC, O.JAIL_CREATE
    KF_FLAG, KVME_FLAG = O.KF_FLAG, O.KVME_FLAG

    def __init__(self):
        self.log, self.mem, self.next_fd = [], {}, 5
        reg = {n: 0 for n in G.REG_NAMES}
        reg.update(r_rip=0x1000, r_rax=35, r_cs=0x43, r_ss=0x3b, r_ds=0x3b, r_es=0x3b,
                   r_fs=0x13, r_gs=0x1b, r_rflags=0x202, r_rsp=0x7ff000)
        self.regs = G.pack(reg)

    def __getattr__(self, name):            # anything not faked is a test failure
        raise AssertionError(f"unexpected FreeBSD call {name}")

    def jail_set(self, params, flags):
        self.log.append(("jail_set", params["name"], flags))
        return 7

    def rctl_add_rule(self, rule):
        self.log.append(("rctl", rule))

    def attach(self, pid):
        self.log.append(("attach", pid))

    def detach(self, pid, sig):
        self.log.append(("detach", pid))

    def kinfo_proc(self, pid):
        return O.parse_kinfo_proc(O.pack_kinfo_proc(O.KinfoProc(
            pid, 1, pid, pid, 0, 0, 0, 0, 0, (0,), 3, "t", "t", "Linux ELF64", 0, 1, False)))

    def lwps(self, pid):
        return [pid]

    def xfiles(self):                       # a kernel hiding struct file addresses
        return O.parse_xfiles(O.pack_xfile(O.XFile(4242, 1, 0, 1, 9, 2)))

    def auxv(self, pid):
        return [6, 4096, 0, 0]

    def vmmap(self, pid):
        return O.parse_vmmap(kve(0x1000, 0x2000, 2, 5, 1, getattr(self, "exe", "/helper")) +
                             kve(0x7f0000, 0x7f2000, 3, 3, 0x21))

    def filedesc(self, pid):
        return O.parse_filedesc(kf(-5, 1, 1, path=self.exe) + kf(1, 1, 2 | 4, 9, "/tmp/log") +
                                kf(0, 3, 1))

    def read_memory(self, pid, addr, size):
        return bytes(self.mem.get(addr, b"\0" * size)[:size]).ljust(size, b"\0")

    def write_memory(self, pid, addr, data):
        self.mem[addr] = bytes(data)
        if addr != 0x1000 or data[:2] != b"\x0f\x05":
            self.log.append(("write", addr, len(data)))

    def get_regs(self, pid):
        return self.regs

    def set_regs(self, pid, raw):
        self.regs = raw
        self.pending = G.unpack(raw)

    def cont(self, pid, sig):
        r = self.pending
        assert r["r_rip"] == 0x1000 and self.mem[0x1000][:3] == RF.TRAP_CODE
        name = {v: k for k, v in RF.NR.items()}[r["r_rax"]]
        args = [r[a] for a in RF.ARG_REGS]
        self.log.append((name, *args[:4]))
        result = {"open": self.next_fd}.get(name, 0)
        self.regs = G.pack(dict(r, r_rax=result & G.U64, r_rip=0x1003))

    def wait(self, pid):
        return 0x57f                          # stopped by SIGTRAP (5)

    def lwpinfo(self, lwp):
        return O.LwpInfo(lwp, 1, 0, (1 << 29, 0, 0, 0), (0,) * 4, "t", 0)  # FreeBSD SIGUSR1 (30)

    def get_fsbase(self, pid):
        return 0x7f00aa000000

    def get_gsbase(self, pid):
        return 0

    def set_fsbase(self, pid, v):
        self.log.append(("fsbase", v))

    def set_gsbase(self, pid, v):
        self.log.append(("gsbase", v))

    def xstate_info(self, pid):
        return 0x7, 832

    def get_xstate(self, pid):
        buf = bytearray(832)
        struct.pack_into("<HH", buf, 0, 0x37f, 0)
        struct.pack_into("<I", buf, 24, 0x1f80)
        struct.pack_into("<Q", buf, 512, 3)
        return bytes(buf)

    def set_xstate(self, pid, data):
        self.log.append(("xstate", len(data), fpu.header(data)[0]))


def test_capture_reads_linux_form(exe):
    kit = FakeKit()
    kit.exe = str(exe)
    src = CF.FreeBSDSource(4242, kit)
    meta = src.meta()
    assert (meta.os, meta.binary_os, meta.xfeatures, meta.xsave_size) == ("freebsd", "linux", 7, 832)
    core = src.core(4242)
    g = core.thread_info.gpregs
    assert (g.ip, g.ax, g.cs, g.ss, g.orig_ax, g.fs_base) == (0x1000, 35, 0x33, 0x2b, G.U64,
                                                               0x7f00aa000000)
    assert core.thread_info.fpregs.mxcsr == 0x1f80 and core.thread_info.fpregs.cwd == 0x37f
    assert core.tc.blk_sigset == 1 << (L.SIGNALS["SIGUSR1"] - 1)      # FreeBSD 30 -> Linux 10
    assert len(core.tc.sigactions) == 62
    assert sum(1 for e in kit.log if e[0] == "rt_sigaction") == 62
    vmas = src.mm(4242).vmas
    assert [(v.start, v.prot) for v in vmas] == [(0x1000, 5), (0x7f0000, 3)]
    assert vmas[1].flags == L.MAP_FLAGS["MAP_PRIVATE"] | L.MAP_FLAGS["MAP_ANONYMOUS"] | \
        L.MAP_FLAGS["MAP_GROWSDOWN"]
    assert vmas[1].status & L.VMA_STATUS["VMA_AREA_STACK"]
    fds = src.fdinfo(4242)
    assert [f.fd for f in fds] == [0, 1]
    reg = src.file(fds[1].id).reg
    assert (reg.name, reg.pos, reg.flags) == ("/tmp/log", 9, 1 | L.OPEN_FLAGS["O_APPEND"] |
                                               L.OPEN_FLAGS["O_LARGEFILE"])
    assert src.file(fds[0].id).type == L.FD_TYPES["PIPE"]


# -- the restore sequence on a real Linux checkpoint -------------------------------------------------
@pytest.fixture(scope="module")
def sleeping_tree(zdtm_bin, tmp_path_factory):
    """The sleeping ZDTM program dumped (and killed) on this host: its tree directory."""
    tmp = tmp_path_factory.mktemp("oskit")
    ps = procs_mod.ProcSet(tmp / "logs")
    try:
        run = zdtm.start(zdtm_bin, "sleeping", tmp / "work", ps.spawn)
        r = subprocess.run([sys.executable, "-m", "ckptfs.cli", "dump", "--kill", str(run.pid),
                            str(tmp / "tree")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        ps.kill_all()
    return tmp / "tree"


def one_process(sleeping_tree, dest, binary_os=None):
    """A copy of the dumped tree whose only limit is pids.max 32 (two RCTL rules); with
    binary_os, the manifest says the program is that OS's binary."""
    shutil.copytree(sleeping_tree, dest)
    shutil.rmtree(dest / "isolation/limits")
    (dest / "isolation/limits").mkdir()
    (dest / "isolation/limits/pids.max").write_text("32\n")
    if binary_os:
        path = dest / "manifest"
        doc = json.loads(path.read_text())
        doc["source"]["binary_os"] = binary_os
        os.chmod(path, 0o644)
        path.write_text(json.dumps(doc))
    return tree.TreeSource(str(dest))


def anon_private(src, pid):
    """The first private anonymous map (not heap or stack) that has pages saved."""
    bits = L.VMA_STATUS["VMA_ANON_PRIVATE"]
    for v in src.mm(pid).vmas:
        if v.status & bits and v.flags == L.MAP_FLAGS["MAP_PRIVATE"] | L.MAP_FLAGS["MAP_ANONYMOUS"] \
                and src.page_ranges(pid, v):
            return v
    raise AssertionError(f"no private anonymous map with pages in {src.root}")


def test_restore_sequence(monkeypatch, sleeping_tree, tmp_path):
    src = one_process(sleeping_tree, tmp_path / "tree")
    [pid] = [p for p, _ in src.tasks()]
    kit = FakeFreeBSD()
    monkeypatch.setattr(RF, "spawn_helper", spawn(kit))
    pids = RF.restore(src, RF.Target(kit=kit))
    assert pids == [900]
    names = [e[0] for e in kit.log]
    assert names[:4] == ["jail_set", "rctl", "rctl", "attach"]
    assert ("rctl", f"jail:ckptfs_{pid}:nthr:deny=32") in kit.log
    vma = anon_private(src, pid)
    assert ("linux", 900, "mmap", vma.start, vma.end - vma.start, 0x32) in kit.log  # FIXED|ANON|PRIVATE
    for r in src.page_ranges(pid, vma):          # the saved pages are what the helper holds
        assert kit.procs[900].mem.read(r.start, r.end - r.start) == \
            src.read_memory(pid, r.start, r.end - r.start)
    assert any(e[:2] == ("write", 900) and vma.start <= e[2] < vma.end for e in kit.log)
    sigact = next(e for e in kit.log if e[:3] == ("linux", 900, "rt_sigaction"))
    assert sigact[3] == L.SIGNALS["SIGUSR2"]     # Linux number (FreeBSD's is 31): a Linux helper
    assert names.index("linux") < names.index("fsbase")
    want = to_freebsd(src).tasks[0].threads[0]
    final = G.unpack(kit.procs[900].lwps[900])
    assert (final["r_rip"], final["r_cs"]) == (want.reg["r_rip"], 0x43)
    fs_base = src.core(pid).thread_info.gpregs.fs_base
    assert fs_base and ("fsbase", 900, fs_base) in kit.log and names[-1] == "detach"


def test_restore_applies_an_edited_plan(monkeypatch, sleeping_tree, tmp_path):
    """The plan files a dry run wrote, edited, are what the FreeBSD restore applies."""
    from ckptfs.translate.freebsd import plan_dry_run, read_plan
    src = one_process(sleeping_tree, tmp_path / "tree")
    [pid] = [p for p, _ in src.tasks()]
    kit = FakeFreeBSD()
    monkeypatch.setattr(RF, "spawn_helper", spawn(kit))
    root = plan_dry_run(src, str(tmp_path)).root
    with open(f"{root}/rctl.rules", "a") as f:
        f.write(f"jail:ckptfs_{pid}:memoryuse:deny=1g\n")
    text = open(f"{root}/tasks/{pid}/regs").read()
    old = next(ln for ln in text.splitlines() if ln.startswith("r_rip "))
    rip = int(old.split()[1], 16) + 0x10
    with open(f"{root}/tasks/{pid}/regs", "w") as f:
        f.write(text.replace(old, f"r_rip {rip:#x}"))
    again = plan_dry_run(src, str(tmp_path))        # kept and checked, not rewritten
    assert not again.fresh and f"r_rip {rip:#x}" in open(f"{root}/tasks/{pid}/regs").read()
    RF.restore(src, RF.Target(kit=kit), plan=read_plan(root))
    assert ("rctl", f"jail:ckptfs_{pid}:memoryuse:deny={1 << 30}") in kit.log
    assert G.unpack(kit.procs[900].lwps[900])["r_rip"] == rip


def test_restore_refuses_native_freebsd(sleeping_tree, tmp_path):
    native = one_process(sleeping_tree, tmp_path / "tree", binary_os="freebsd")
    with pytest.raises(Unsupported) as e:
        RF.restore(native, RF.Target(kit=FakeKit()))
    assert "native FreeBSD binary" in str(e.value)


def test_restore_on_linux_says_unsupported(sleeping_tree, tmp_path):
    plan = to_freebsd(one_process(sleeping_tree, tmp_path / "tree"))
    with pytest.raises(Unsupported) as e:
        RF.setup_isolation(plan, RF.Target())
    assert "not available on linux" in str(e.value)


def test_injected_error_keeps_linux_errno():
    kit = FakeKit()
    kit.mem[0x1000] = b"\x90\x90\x90"
    calls = RF.LinuxCalls(kit, 900, 0x1000, 0x7f0000)
    kit.cont = lambda pid, sig: setattr(kit, "regs", G.pack(dict(kit.pending, r_rax=(-13) & G.U64)))
    with pytest.raises(KernelError) as e:
        calls("mprotect", 0x600000, 4096, 7)
    assert e.value.errno == 13 and "mprotect" in str(e.value)
    calls.close()
    assert kit.mem[0x1000] == b"\x90\x90\x90"
