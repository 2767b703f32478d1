"""FPU/AVX state of a FreeBSD restore, from a tree: the real avx_regs ZDTM program (ymm0-15
and MXCSR held in registers) is dumped on Linux, read back with TreeSource (which has only
core.thread_info.fpregs, no xsave bytes) and restored through the strict fake FreeBSD kernel
(tests/fbsd_fake.py). The fake applies PT_SETXSTATE / PT_SETFPREGS the way
sys/amd64/amd64/ptrace_machdep.c and fpu.c do and keeps each lwp's save area; the ymm
values a restored thread would load must be the ones the program had."""
from __future__ import annotations

import errno
import struct
import subprocess
import sys

import pytest

from ckptfs import tree
from ckptfs.errors import KernelError
from ckptfs.restore import freebsd as RF
from fbsd_fake import FakeFreeBSD, spawn
from helpers import zdtm

CLI = [sys.executable, "-m", "ckptfs.cli"]
MXCSR = 0x7f80                      # what avx_regs loads (round toward zero)


def pattern(i: int) -> bytes:
    """ymm<i> as avx_regs loads it: zdtm_fill(in, 512, 0, 13), 32 bytes a register."""
    return bytes((j * 131 + 13) % 251 for j in range(32 * i, 32 * i + 32))


@pytest.fixture(scope="module")
def avx_tree(zdtm_bin, tmp_path_factory):
    """avx_regs dumped for real (then killed): its TreeSource."""
    from helpers import procs as P
    tmp = tmp_path_factory.mktemp("avx")
    ps = P.ProcSet(tmp / "logs")
    try:
        run = zdtm.start(zdtm_bin, "avx_regs", tmp / "work", ps.spawn)
        r = subprocess.run([*CLI, "dump", str(run.pid), str(tmp / "tree")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        ps.kill_all()
    return tree.TreeSource(str(tmp / "tree"))


def restore(src, **cpu):
    kit = FakeFreeBSD(**cpu)
    rest = RF.Restorer(src, RF.convert.to_freebsd(src), RF.Target(kit=kit))
    old = RF.spawn_helper
    RF.spawn_helper = spawn(kit)
    try:
        [new] = rest.run()
    finally:
        RF.spawn_helper = old
    return kit, new, rest


def test_tree_source_has_no_xsave_bytes(avx_tree):
    """The restore must rebuild the area: nothing hands it over whole."""
    assert not hasattr(avx_tree, "xsave")
    assert avx_tree.meta().xfeatures & 0x7 == 0x7


def test_ymm_and_mxcsr_reach_the_lwp(avx_tree):
    kit, new, rest = restore(avx_tree)                  # an AVX CPU: XCR0 0x7, 832 bytes
    assert [e for e in kit.log if e[0] == "xstate"] == [("xstate", new, 832)]
    for i in range(16):
        assert kit.ymm(new, i) == pattern(i), f"ymm{i}"
    assert kit.mxcsr(new) == MXCSR
    # PKRU and the AVX-512 state of this host do not fit an AVX-only CPU: noted, not sent
    bv = struct.unpack_from("<Q", kit.fpu[new], 512)[0]
    assert bv & ~0x7 == 0 and bv & 0x4
    if avx_tree.meta().xfeatures & ~0x7:
        assert any(r.path == f"tasks/{avx_tree.pids()[0]}/threads/{avx_tree.pids()[0]}/fpu"
                   for r in rest.log.records)


def test_larger_cpu_takes_the_whole_area(avx_tree):
    """An AVX-512 CPU (XCR0 0x2e7, 2696 bytes): the buffer is that CPU's whole length."""
    kit, new, _ = restore(avx_tree, xsave_mask=0x2e7, xsave_len=2696)
    assert [e[2] for e in kit.log if e[0] == "xstate"] == [2696]
    assert all(kit.ymm(new, i) == pattern(i) for i in range(16))


def test_cpu_without_xsave_gets_the_fxsave_region(avx_tree):
    """No XSAVE (PT_GETXSTATE_INFO: EOPNOTSUPP): PT_SETFPREGS with the legacy region; the
    xmm halves and MXCSR arrive, the ymm upper halves are noted as dropped."""
    kit, new, rest = restore(avx_tree, xsave_mask=None, xsave_len=None)
    assert ("fpregs", new) in kit.log and not any(e[0] == "xstate" for e in kit.log)
    assert all(kit.ymm(new, i)[:16] == pattern(i)[:16] for i in range(16))
    assert kit.mxcsr(new) == MXCSR
    assert any("no XSAVE" in r.reason for r in rest.log.records)


def test_fake_refuses_what_freebsd_refuses():
    """The fake is strict: a bare FXSAVE-sized PT_SETXSTATE, one longer than the CPU's area,
    and an xstate_bv outside XCR0 are EINVAL as in fpusetxstate."""
    kit = FakeFreeBSD()
    p = kit.new_helper()
    kit.attach(p.pid)
    good = bytearray(832)
    struct.pack_into("<Q", good, 512, 0x7)
    kit.set_xstate(p.pid, bytes(good))
    for bad in (bytes(512), bytes(good) + bytes(64)):
        with pytest.raises(KernelError) as e:
            kit.set_xstate(p.pid, bad)
        assert e.value.errno == errno.EINVAL
    struct.pack_into("<Q", good, 512, 0x207)
    with pytest.raises(KernelError) as e:
        kit.set_xstate(p.pid, bytes(good))
    assert e.value.errno == errno.EINVAL
