"""Written-page tracking on real processes (ckptfs.capture.dirty): uffd-wp + PAGEMAP_SCAN and
the checksum fallback, and the chunk clock the mount uses for rsync's quick check."""
from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from ckptfs import stamps
from ckptfs.capture import dirty
from ckptfs.capture.dirty import ChunkClock, DirtyTracker

MiB = 1 << 20
PAGE = 4096

# One workload for dirty tracking, migration tests and tools/bench_migrate.py:
# TOTAL MiB of private anonymous memory, each page holding its number (first and last word),
# and a WSET MiB working set at WOFF MiB whose pages get the round number in word 1.
WORKLOAD_C = r"""
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t *mem, *extra; static size_t pages, wfirst, wcount;
static volatile uint64_t round_no; static volatile sig_atomic_t verify_req;

static void rewrite(void) {
    uint64_t r = round_no + 1;
    for (size_t p = wfirst; p < wfirst + wcount; p++) mem[p * 512 + 1] = r;
    round_no = r;
}
static long verify(void) {
    for (size_t p = 0; p < pages; p++) {
        uint64_t *w = mem + p * 512;
        int in = p >= wfirst && p < wfirst + wcount;
        if (w[0] != p || w[1] != (in ? round_no : 0) || w[511] != ~(uint64_t)p) return (long)p;
    }
    return -1;
}
static void on_usr1(int s) { (void)s; verify_req = 1; }
static void report(void) {
    long bad = verify();
    if (bad < 0) printf("ok round=%llu\n", (unsigned long long)round_no);
    else printf("bad page %ld\n", bad);
    fflush(stdout);
}
/* wset TOTAL_MIB WSET_MIB WSET_OFF_MIB cmd|loop [USLEEP]
   cmd: stdin bytes 'w' rewrite the working set, 'm' map 4 MiB more (answer "new=ADDR"),
   'n' write page 3 of that map, 'v' verify; 'w' and 'n' answer 'k'.
   loop: rewrite continuously (sleep USLEEP us between rounds); SIGUSR1 verifies. */
int main(int argc, char **argv) {
    if (argc < 5) return 2;
    size_t total = strtoul(argv[1], 0, 0) << 20;
    wcount = (strtoul(argv[2], 0, 0) << 20) / 4096;
    wfirst = (strtoul(argv[3], 0, 0) << 20) / 4096;
    pages = total / 4096;
    mem = mmap(0, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 3;
    for (size_t p = 0; p < pages; p++) { mem[p * 512] = p; mem[p * 512 + 511] = ~(uint64_t)p; }
    signal(SIGUSR1, on_usr1);          /* before "addr=": a check may follow at once */
    printf("addr=%p size=%zu\n", (void *)mem, total);
    fflush(stdout);
    if (!strcmp(argv[4], "loop")) {
        useconds_t pause_us = argc > 5 ? (useconds_t)strtoul(argv[5], 0, 0) : 1000;
        for (;;) {
            rewrite();
            if (verify_req) { verify_req = 0; report(); }
            if (pause_us) usleep(pause_us);
        }
    }
    int c;
    while ((c = getchar()) != EOF) {
        if (c == 'w') { rewrite(); putchar('k'); fflush(stdout); }
        else if (c == 'm') {
            extra = mmap(0, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(extra, 7, 4 << 20);
            printf("new=%p\n", (void *)extra); fflush(stdout);
        }
        else if (c == 'n') { extra[3 * 512 + 5] += 1; putchar('k'); fflush(stdout); }
        else if (c == 'v') report();
        else if (c == 'q') return 0;
    }
    return 0;
}
"""


def build_workload(directory) -> str:
    """Compile the workload into `directory`; its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "wset.c").write_text(WORKLOAD_C)
    subprocess.run(["gcc", "-O2", "-o", str(d / "wset"), str(d / "wset.c")], check=True)
    return str(d / "wset")


@pytest.fixture(scope="module")
def wset_bin(tmp_path_factory):
    return build_workload(tmp_path_factory.mktemp("wset"))


class Workload:
    """The workload in cmd mode, driven through pipes; killed by pid at teardown."""

    def __init__(self, binary, total=256, wset=16, woff=64):
        self.p = subprocess.Popen([binary, str(total), str(wset), str(woff), "cmd"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.p.stdout.readline().decode()
        assert line.startswith("addr="), line
        self.addr = int(line.split()[0].split("=")[1], 16)
        self.size = total * MiB
        self.wset = (self.addr + woff * MiB, self.addr + (woff + wset) * MiB)
        self.pid = self.p.pid

    def cmd(self, c: bytes, reply: int | None = 1) -> bytes:
        self.p.stdin.write(c)
        self.p.stdin.flush()
        return self.p.stdout.readline() if reply is None else self.p.stdout.read(reply)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture
def workload(wset_bin):
    made = []

    def start(**kw):
        w = Workload(wset_bin, **kw)
        made.append(w)
        return w
    yield start
    for w in made:
        w.kill()


def inside(ranges, lo, hi):
    """The parts of `ranges` within [lo, hi)."""
    return [(max(s, lo), min(e, hi)) for s, e in ranges if s < hi and e > lo]


def region_digest(pid, addr, size) -> str:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        return hashlib.sha256(f.read(size)).hexdigest()


def wp_bits(pid, addr, size) -> int:
    """How many pages of the range have pagemap bit 57 (uffd-wp) set."""
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as f:
        data = os.pread(f.fileno(), size // PAGE * 8, addr // PAGE * 8)
    return sum(1 for (e,) in struct.iter_unpack("<Q", data) if e >> 57 & 1)


def tracer_of(pid) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("TracerPid:")[1].split()[0])


# -- uffd-wp + PAGEMAP_SCAN --------------------------------------------------------------------
def test_ioctl_numbers_match_the_kernel_headers():
    # _IOWR(0xAA, 0x3F, 24), _IOWR(0xAA, 0, 32), _IOR(0xAA, 1, 16), _IOWR('f', 16, 96)
    assert dirty.UFFDIO_API == 0xC018AA3F
    assert dirty.UFFDIO_REGISTER == 0xC020AA00
    assert dirty.UFFDIO_UNREGISTER == 0x8010AA01
    assert dirty.PAGEMAP_SCAN == 0xC0606610
    assert ctypes.sizeof(dirty.PmScanArg) == 96 and ctypes.sizeof(dirty.PageRegion) == 24
    assert ctypes.sizeof(dirty.UffdioRegister) == 32 and ctypes.sizeof(dirty.UffdioApi) == 24


def test_rewritten_working_set_is_exactly_what_is_reported(workload):
    w = workload()
    with DirtyTracker(w.pid) as t:
        assert t.method == dirty.UFFD_METHOD, t.reason
        first = t.reset()   # the first period: everything counts as written
        assert inside(first, w.addr, w.addr + w.size) == [(w.addr, w.addr + w.size)]
        assert inside(t.reset(), w.addr, w.addr + w.size) == []   # nothing written since
        assert w.cmd(b"w") == b"k"
        assert inside(t.written_ranges(), w.addr, w.addr + w.size) == [w.wset]
        assert inside(t.reset(), w.addr, w.addr + w.size) == [w.wset]
        assert inside(t.written_ranges(), w.addr, w.addr + w.size) == []
        # outside the region only a few pages (stack, stdio buffer) may have been written
        assert dirty.page_count(t.reset()) < 64


def test_close_leaves_the_process_exactly_as_it_was(workload):
    w = workload()
    before = region_digest(w.pid, w.addr, w.size)
    t = DirtyTracker(w.pid)
    t.reset()
    assert wp_bits(w.pid, w.addr, w.size) == w.size // PAGE     # really protected
    assert tracer_of(w.pid) == 0                                 # ptrace only at setup
    t.close()
    assert wp_bits(w.pid, w.addr, w.size) == 0
    smaps = Path(f"/proc/{w.pid}/smaps").read_text()
    assert " uw" not in "".join(l for l in smaps.splitlines() if l.startswith("VmFlags"))
    assert not [fd for fd in os.listdir(f"/proc/{w.pid}/fd")
                if "userfaultfd" in os.readlink(f"/proc/{w.pid}/fd/{fd}")]
    assert region_digest(w.pid, w.addr, w.size) == before
    assert w.cmd(b"w") == b"k"                  # runs on, writes work, memory consistent
    assert w.cmd(b"v", None) == b"ok round=1\n"


def test_a_new_vma_is_registered_on_the_next_pass(workload):
    w = workload(total=16, wset=1, woff=0)
    with DirtyTracker(w.pid) as t:
        t.reset()
        new = int(w.cmd(b"m", None).decode().split("=")[1], 16)
        got = t.reset()
        assert (new, new + 4 * MiB) in got         # unknown history: written whole, once
        assert inside(t.reset(), new, new + 4 * MiB) == []
        assert w.cmd(b"n") == b"k"
        assert inside(t.reset(), new, new + 4 * MiB) == [(new + 3 * PAGE, new + 4 * PAGE)]


def test_checksum_fallback_reports_the_cells_of_the_working_set(workload):
    w = workload(total=64, wset=4, woff=16)
    with DirtyTracker(w.pid, method="checksum") as t:
        assert t.method == "checksum"
        assert w.cmd(b"w") == b"k"
        first = t.reset()
        assert inside(first, w.addr, w.addr + w.size) == [(w.addr, w.addr + w.size)]
        assert inside(t.reset(), w.addr, w.addr + w.size) == []
        assert w.cmd(b"w") == b"k"
        got = inside(t.reset(), w.addr, w.addr + w.size)
        covered = sum(e - s for s, e in got)
        lo, hi = w.wset
        assert got[0][0] <= lo and got[-1][1] >= hi
        assert covered <= (hi - lo) + 2 * dirty.DEFAULT_CHUNK    # cell granularity


def test_tracking_a_continuously_writing_process(wset_bin, procs):
    p = procs.spawn([wset_bin, "128", "8", "32", "loop", "500"])
    deadline = time.monotonic() + 10
    while not Path(p.logdir / "stdout").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    addr = int(Path(p.logdir / "stdout").read_text().split()[0].split("=")[1], 16)
    with DirtyTracker(p.pid) as t:
        for _ in range(5):
            t.reset()
            time.sleep(0.02)
            got = inside(t.reset(), addr, addr + 128 * MiB)
            assert got == [(addr + 32 * MiB, addr + 40 * MiB)]
    os.kill(p.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "round" not in Path(p.logdir / "stdout").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "ok round=" in Path(p.logdir / "stdout").read_text()


# -- the chunk clock ---------------------------------------------------------------------------
class FakeTime:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_chunk_mtimes_move_only_for_written_cells(workload):
    w = workload(total=64, wset=4, woff=16)
    now = FakeTime()
    t = DirtyTracker(w.pid)
    clock = ChunkClock({w.pid: t}, 2 * MiB, clock=now)
    try:
        first = clock.new_pass()
        assert first["dirty_cells"] >= 32
        vma = next(s for s, e in t.vmas() if s <= w.addr < e)
        off = lambda a: a - vma  # noqa: E731
        cells = range(off(w.addr) // (2 * MiB) * 2 * MiB, off(w.addr + w.size), 2 * MiB)
        stamps1 = {c: clock.mtime(w.pid, vma, c) for c in cells}
        assert len(set(stamps1.values())) == 1
        clock.new_pass()                              # same second, nothing written
        assert {c: clock.mtime(w.pid, vma, c) for c in cells} == stamps1
        assert w.cmd(b"w") == b"k"
        info = clock.new_pass()                       # still the same wall-clock second
        assert info["written_bytes"] >= 4 * MiB
        stamps2 = {c: clock.mtime(w.pid, vma, c) for c in cells}
        lo, hi = off(w.wset[0]), off(w.wset[1])
        for c in cells:
            written = c + 2 * MiB > lo and c < hi
            assert (stamps2[c] != stamps1[c]) == written, hex(c)
            if written:
                assert stamps2[c] > stamps1[c] and stamps2[c] % 10**9 == clock.salt
        # a VMA no pass has seen yet gets a stamp of its own, newer than any given
        fresh = clock.mtime(w.pid, 0x1000, 0)
        assert fresh > max(stamps2.values())
        assert clock.mtime(w.pid, 0x1000, 0) == fresh
    finally:
        clock.close()


def test_chunk_paths_are_recognised():
    assert dirty.chunk_key("/tasks/42/maps/7f00-7f80/pages/0x200000") == (42, 0x7f00, 0x200000)
    assert dirty.chunk_key("/tasks/42/maps/7f00-7f80/prot") is None
    assert dirty.chunk_key("/manifest") is None


# -- the tracking mount: rsync's quick check does the pre-copy ----------------------------------
def rsync(src, dst) -> list[str]:
    """rsync -a the mount to dst; the names of the files it sent."""
    r = subprocess.run(["rsync", "-a", "-W", "--delete", "--modify-window=-1", "--exclude=/ctl",
                        "--exclude=/status", "--out-format=%n", f"{src}/", f"{dst}/"],
                       capture_output=True, text=True, check=True)
    return [n for n in r.stdout.splitlines() if n and not n.endswith("/")]


def test_tracked_mount_sends_only_written_chunks_and_an_exact_frozen_manifest(
        workload, tmp_path, tmp_mount):
    import json
    import sys
    import xxhash
    w = workload(total=64, wset=4, woff=16)
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    tmp_mount([sys.executable, "-m", "ckptfs.cli", "mount", "-f", str(w.pid), str(mnt)], mnt)
    assert (mnt / "status").read_text() == "running\ntracking: uffd-wp+pagemap-scan\n"
    first = rsync(mnt, copy)
    assert sum("/pages/" in n for n in first) >= 32
    vma = next(d for d in os.listdir(mnt / "tasks" / str(w.pid) / "maps")
               if int(d.split("-")[0], 16) <= w.addr < int(d.split("-")[1], 16))
    start = int(vma.split("-")[0], 16)
    # idle process: nothing of its region; at most the page where the kernel updates the
    # thread's rseq area each time the mount's register reads stopped it
    idle = rsync(mnt, copy)
    assert not [n for n in idle if vma in n] and len(idle) <= 2, idle
    assert w.cmd(b"w") == b"k"
    sent = rsync(mnt, copy)
    cells = {f"tasks/{w.pid}/maps/{vma}/pages/{c:#x}"
             for c in range((w.wset[0] - start) // (2 * MiB) * 2 * MiB, w.wset[1] - start, 2 * MiB)}
    chunks = {n for n in sent if "/pages/" in n}
    # exactly the working set's cells of the region; elsewhere only what the command loop
    # itself wrote (stdio buffers, stack, libc data: small maps, one chunk each)
    assert {n for n in chunks if vma in n} == cells, sorted(chunks)
    assert len(chunks - cells) <= 10, sorted(chunks - cells)
    assert w.cmd(b"w") == b"k"                    # written after the last copy: only the freeze's
    (mnt / "ctl").write_text("freeze\n")          # pass can catch it
    sent = rsync(mnt, copy)
    assert cells <= set(sent) and "manifest" in sent
    doc = json.loads((copy / "manifest").read_text())
    assert doc["state"] == "frozen"
    for path, entry in doc["files"].items():      # the copy is exactly what the manifest says
        data = (copy / path).read_bytes()
        assert (len(data), xxhash.xxh3_64_hexdigest(data)) == (entry["size"], entry["xxh3_64"]), path
    (mnt / "ctl").write_text("thaw\n")


def test_content_stamps_move_only_when_content_does():
    now = FakeTime()
    c = stamps.ContentStamps(now)
    a = c.observe("/x", b"1")
    assert c.observe("/x", b"1") == a
    b = c.observe("/x", b"2")                    # same second, still a new stamp
    assert b > a and b % 10**9 == c.salt and a // 10**9 == 1000
    assert c.observe("/x", b"1") > b             # back to old bytes: newer again, never reused


def test_frozen_manifest_waits_for_a_chunk_read_in_progress():
    import threading
    import xxhash
    sums = stamps.ChunkSums()
    data = ctypes.create_string_buffer(os.urandom(2 * MiB), 2 * MiB)
    half = MiB
    path = "/tasks/1/maps/1000-201000/pages/0x0"
    sums.opened(7, path, 42)
    sums.data(7, 0, ctypes.addressof(data), half)

    def finish():
        time.sleep(0.05)
        sums.data(7, half, ctypes.addressof(data) + half, half)
        sums.released(7, 2 * MiB)
    threading.Thread(target=finish).start()
    t0 = time.monotonic()
    got = sums._read_sum(path, 42, 2 * MiB)      # the read in progress, not a second read
    assert got == (2 * MiB, xxhash.xxh3_64_hexdigest(data.raw))
    assert time.monotonic() - t0 >= 0.04
    assert sums._read_sum(path, 43, 2 * MiB) is None          # written since: read again
    # a reader that stops reading is not waited for beyond the stall time
    sums.opened(8, path + "0", 42)
    sums.data(8, 0, ctypes.addressof(data), half)
    t0 = time.monotonic()
    assert sums._read_sum(path + "0", 42, 2 * MiB) is None
    assert time.monotonic() - t0 < 1.0
    # nor one that jumps around (no checksum of one sequential read to come)
    sums.data(8, half + 4096, ctypes.addressof(data), 4096)
    assert sums._read_sum(path + "0", 42, 2 * MiB) is None


def test_falls_back_to_checksums_when_the_process_is_already_traced(workload):
    from ckptfs import ptrace
    w = workload(total=16, wset=2, woff=4)
    ptrace.seize(w.pid)                         # someone else's tracer: no injection possible
    try:
        with DirtyTracker(w.pid) as t:
            assert t.method == "checksum" and "userfaultfd" in t.reason
            t.reset()
            with pytest.raises(dirty.TrackingUnavailable):
                DirtyTracker(w.pid, method=dirty.UFFD_METHOD)
    finally:
        ptrace.interrupt(w.pid)                 # detaching needs a stopped tracee
        dirty._wait_interrupt_stop(w.pid)
        ptrace.detach(w.pid)
    assert w.cmd(b"w") == b"k"
