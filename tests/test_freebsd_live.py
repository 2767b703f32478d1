"""A real Linux process (captured live) -> FreeBSD plan files -> parsed back -> Linux form:
what comes back equals what the capture saw, up to the documented equivalences."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from ckptfs import flags as L
from ckptfs.capture.linux import LiveSource
from ckptfs.translate.freebsd import from_freebsd, read_plan, to_freebsd, write_plan
from ckptfs.translate.freebsd import regs as G

CHILD = r"""
import os, signal, sys, time
signal.signal(signal.SIGUSR1, lambda *a: None)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGRTMIN + 3})
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.set_inheritable(fd, False)
r, w = os.pipe()
open(sys.argv[2], "w").write("ready")
time.sleep(1000)
"""


@pytest.fixture
def child(procs, tmp_path):
    ready = tmp_path / "ready"
    proc = procs.spawn([sys.executable, "-c", CHILD, str(tmp_path / "log"), str(ready)])
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "child never got ready"
        time.sleep(0.01)
    while Path(f"/proc/{proc.pid}/syscall").read_text().split()[0] not in ("230", "35", "7",
                                                                              "270", "23"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return proc


def test_live_process_through_freebsd_form(child, tmp_path):
    with LiveSource(child.pid) as src:
        src.freeze()
        plan = to_freebsd(src)
        core = src.core(child.pid)
        fdinfo = {f.fd: f for f in src.fdinfo(child.pid)}
        files = {fd: src.file(f.id) for fd, f in fdinfo.items()}
    write_plan(plan, str(tmp_path))
    back = from_freebsd(read_plan(str(tmp_path)))
    task = back.tasks[child.pid]
    want = G.equivalent_linux({t: getattr(core.thread_info.gpregs, c) for t, c in L.GP_REGS})
    assert task.regs[child.pid] == want
    assert task.sigmask[child.pid] == core.tc.blk_sigset
    usr1, term = L.SIGNALS["SIGUSR1"], L.SIGNALS["SIGTERM"]
    for sig, sa in zip(L.SIGACTION_SIGNALS, core.tc.sigactions):
        if sig in (usr1, term):
            got = task.sigactions[sig]
            assert (got["handler"], got["flags"], got["restorer"], got["mask"]) == \
                (sa.sigaction, sa.flags, sa.restorer, sa.mask)
    assert task.sigactions[term]["handler"] == 1
    # every descriptor's open flags survive (the log file: O_WRONLY|O_APPEND|O_LARGEFILE|cloexec)
    lossy = {r.path for r in plan.lossy}
    for fd, (kind, flags) in task.fds.items():
        if f"tasks/{child.pid}/fds/{fd}/flags" in lossy:
            continue
        entry = files[fd]
        sub = entry.reg if kind == "REG" else getattr(entry, kind.lower(), None)
        orig = (getattr(sub, "flags", 0) & ~L.O_CLOEXEC) | \
            (L.O_CLOEXEC if fdinfo[fd].flags & L.FD_CLOEXEC else 0)
        assert flags == orig, (fd, kind, hex(flags), hex(orig))
    log_fd = next(fd for fd, f in files.items() if f.type == L.FD_TYPES["REG"]
                  and f.reg.name.endswith("/log"))
    assert task.fds[log_fd][1] & (L.O_CLOEXEC | L.OPEN_FLAGS["O_APPEND"] | 1) == \
        L.O_CLOEXEC | L.OPEN_FLAGS["O_APPEND"] | 1
