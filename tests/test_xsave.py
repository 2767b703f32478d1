"""xsave split/join on real NT_X86_XSTATE buffers, with known values in ymm2 and mxcsr."""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from ckptfs import pb, xsave
from ckptfs.capture import LiveSource
from helpers.procs import wait_file

# ymm2 = bytes 0..31; mxcsr with flush-to-zero; then block in pause() by a raw syscall so
# that no libc code runs between loading the registers and the stop.
C_SOURCE = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    unsigned char v[32];
    unsigned int mxcsr = 0x9fc0;
    for (int i = 0; i < 32; i++) v[i] = i;
    FILE *f = fopen(argv[1], "w"); fputs("ready\n", f); fclose(f);
    __asm__ volatile("vmovdqu %0, %%ymm2\n\tldmxcsr %1\n\t"
                     "mov $34, %%eax\n\tsyscall" :: "m"(v), "m"(mxcsr) : "rax", "rcx", "r11", "memory");
    return 0;
}
"""


def _has_avx() -> bool:
    return " avx " in Path("/proc/cpuinfo").read_text().replace("\n", " ")


@pytest.fixture(scope="module")
def ymm_prog(tmp_path_factory):
    d = tmp_path_factory.mktemp("xsave")
    (d / "ymm.c").write_text(C_SOURCE)
    subprocess.run(["gcc", "-O1", "-mavx", "-o", str(d / "ymm"), str(d / "ymm.c")], check=True)
    return d / "ymm"


@pytest.fixture
def ymm_buffer(procs, tmp_path, ymm_prog):
    if not _has_avx():
        pytest.skip("no AVX on this CPU")
    ready = tmp_path / "ready"
    proc = procs.spawn([ymm_prog, ready])
    wait_file(ready, "ready\n", proc=proc)
    deadline_syscall(proc.pid)
    with LiveSource(proc.pid) as src:
        return src.thread_regs(proc.pid).xstate


def deadline_syscall(pid: int) -> None:
    import time
    end = time.monotonic() + 5
    while Path(f"/proc/{pid}/syscall").read_text().split()[0] != "34":
        assert time.monotonic() < end, "the program never blocked in pause()"
        time.sleep(0.01)


def test_split_finds_known_registers(ymm_buffer):
    fp = xsave.split(ymm_buffer)
    assert fp.mxcsr == 0x9fc0
    words = list(struct.unpack("<8I", bytes(range(32))))
    assert list(fp.xmm_space[8:12]) == words[:4]            # xmm2 = low half of ymm2
    assert list(fp.xsave.ymmh_space[8:12]) == words[4:]     # YMM_Hi128 of register 2
    assert fp.xsave.xstate_bv & 0b110 == 0b110             # SSE and YMM in use
    assert len(fp.st_space) == 32 and len(fp.xmm_space) == 64 and len(fp.xsave.ymmh_space) == 64


def test_join_reproduces_the_kernel_buffer(ymm_buffer):
    fp = xsave.split(ymm_buffer)
    assert xsave.join(fp) == ymm_buffer
    xfeatures, size = xsave.sw_bytes(ymm_buffer)
    assert size == len(ymm_buffer) and xfeatures & 0b111 == 0b111
    assert xsave.join(fp, xfeatures, size) == ymm_buffer
    again = pb.user_x86_fpregs_entry.FromString(fp.SerializeToString())
    assert xsave.join(again) == ymm_buffer


def test_component_sizes_follow_xcr0(ymm_buffer):
    xfeatures, size = xsave.sw_bytes(ymm_buffer)
    fp = xsave.split(ymm_buffer)
    for bit, name, off, nbytes, fmt in xsave.COMPONENTS:
        words = len(getattr(fp.xsave, name))
        want = nbytes // struct.calcsize(fmt) if xfeatures >> bit & 1 else 0
        assert words == want, name
    assert xsave.size_of(xfeatures) == size


def test_fxsave_only_and_short_buffers():
    legacy = bytearray(512)
    struct.pack_into("<HH", legacy, 0, 0x37F, 0)
    struct.pack_into("<I", legacy, 24, 0x1F80)
    fp = xsave.split(bytes(legacy))
    assert fp.cwd == 0x37F and fp.mxcsr == 0x1F80 and not fp.HasField("xsave")
    assert xsave.join(fp) == bytes(legacy)
    with pytest.raises(ValueError, match="512"):
        xsave.split(b"\0" * 100)
