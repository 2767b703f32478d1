"""A container's own time namespace: its clocks at the checkpoint, and the offsets that
continue them on the restoring host.

A time namespace shifts CLOCK_MONOTONIC and CLOCK_BOOTTIME by fixed offsets
(/proc/PID/timens_offsets). What a task inside has seen is the host clock plus its offset;
what must not happen after a restore is that clock going backwards (a deadline of
clock_nanosleep or a monotonic timer would then lie far in the future) or leaping forward.

So the tree keeps what CRIU's timens image keeps: the value of each clock as the container
saw it when it was captured (after the freeze, so no task saw a later value):

    isolation/time/monotonic    "100734 514211334"   (seconds nanoseconds)
    isolation/time/boottime     "50734 514227008"

A restore makes a new time namespace whose offset is that value minus this host's clock at
the moment the offset is written (the instant before the namespace's first task exists). Inside,
both clocks continue from the checkpoint: the time the container spent as files does not pass
for it, on any host, whatever the hosts' uptimes. The source's offsets themselves mean nothing
on another host and are not kept.
"""
from __future__ import annotations

import dataclasses
import time

from ..errors import BadTree, KernelError, ProcessGone

CLOCKS = {"monotonic": time.CLOCK_MONOTONIC, "boottime": time.CLOCK_BOOTTIME}
NSEC = 1_000_000_000
TREE_DIR = "isolation/time"


@dataclasses.dataclass
class TimeNs:
    """The container's clocks when it was captured: clock name -> (seconds, nanoseconds)."""
    clocks: dict[str, tuple[int, int]]


# -- capture ----------------------------------------------------------------------------------
def read_offsets(pid: int | str) -> dict[str, int]:
    """clock name -> offset in nanoseconds of the task's time namespace."""
    path = f"/proc/{pid}/timens_offsets"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ProcessGone("process exited", path=path, step="capture time namespace") from None
    except OSError as e:
        raise KernelError("cannot read time offsets", e.errno, path=path,
                          step="capture time namespace") from e
    out = {}
    for line in text.splitlines():
        name, sec, nsec = line.split()
        out[name] = int(sec) * NSEC + int(nsec)
    return out


def capture(pid: int) -> TimeNs:
    """The clocks of `pid`'s time namespace now: our clock, less our offset, plus theirs."""
    theirs, ours = read_offsets(pid), read_offsets("self")
    clocks = {}
    for name, clock in CLOCKS.items():
        ns = time.clock_gettime_ns(clock) - ours.get(name, 0) + theirs.get(name, 0)
        clocks[name] = divmod(ns, NSEC)
    return TimeNs(clocks)


# -- restore ------------------------------------------------------------------------------------
def offsets_now(t: TimeNs) -> dict[str, tuple[int, int]]:
    """Offsets that make each clock of a new namespace read its recorded value now.
    (seconds, nanoseconds) with 0 <= nanoseconds < 1e9, as timens_offsets takes them."""
    out = {}
    for name, (sec, nsec) in t.clocks.items():
        out[name] = divmod(sec * NSEC + nsec - time.clock_gettime_ns(CLOCKS[name]), NSEC)
    return out


# -- tree files -----------------------------------------------------------------------------------
def render(t: TimeNs | None) -> dict[str, str]:
    if t is None:
        return {}
    return {f"time/{name}": f"{sec} {nsec}\n" for name, (sec, nsec) in sorted(t.clocks.items())}


def parse(read) -> TimeNs | None:
    """TimeNs from isolation/time/* (read: relative path -> text or None)."""
    clocks = {}
    for name in CLOCKS:
        text = read(f"time/{name}")
        if text is None:
            continue
        fields = text.split()
        if len(fields) != 2 or not all(f.isdigit() for f in fields) or int(fields[1]) >= NSEC:
            raise BadTree(f"expected 'seconds nanoseconds' (non-negative, nanoseconds below "
                          f"1000000000), not {text.strip()!r}", path=f"{TREE_DIR}/{name}")
        clocks[name] = (int(fields[0]), int(fields[1]))
    if not clocks:
        return None
    missing = sorted(set(CLOCKS) - set(clocks))
    if missing:
        raise BadTree(f"clock {missing[0]} missing (both clocks are recorded together)",
                      path=f"{TREE_DIR}/{missing[0]}")
    return TimeNs(clocks)
