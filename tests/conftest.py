"""Shared fixtures: real processes, FUSE mounts, ZDTM workloads and two simulated hosts.

Everything a fixture starts is torn down by pid/path in a finalizer, also when the test fails.
"""
from __future__ import annotations

import contextlib

import pytest

from helpers import hosts as _hosts
from helpers import mounts as _mounts
from helpers import procs as _procs
from helpers import zdtm as _zdtm


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "two_hosts: uses the two_hosts fixture (network + mount namespaces, sshd)")


@pytest.fixture
def procs(tmp_path):
    """A ProcSet: `procs.spawn(argv, **popen_kw)`, `procs.adopt(pid)`; all killed at teardown."""
    ps = _procs.ProcSet(tmp_path / "proc-logs")
    yield ps
    ps.kill_all()


@pytest.fixture(scope="session")
def zdtm_bin():
    """Directory holding the compiled ZDTM programs (built once per session)."""
    return _zdtm.build()


@pytest.fixture(scope="module")
def two_hosts():
    """A TwoHosts: `.a` (hosta 10.77.0.1) and `.b` (hostb 10.77.0.2), each with its own netns,
    mount ns, private tmpfs at `.disk` and a running sshd; `.ssh_config` for `ssh -F`."""
    with _hosts.two_hosts() as h:
        yield h


@pytest.fixture
def tmp_mount(procs):
    """Factory: `tmp_mount(cmd, mnt, runner=None, timeout=10) -> Mount`.

    Starts FUSE daemon `cmd` (which mounts on `mnt`), waits for the mount, and unmounts and
    reaps it at teardown. `runner` is a Host to mount inside that host; default: here.
    """
    with contextlib.ExitStack() as stack:
        def mount(cmd, mnt, runner=None, timeout=10.0, **spawn_kw):
            runner = runner or _mounts.Local(procs)
            return stack.enter_context(_mounts.fuse_mount(cmd, mnt, runner=runner, timeout=timeout,
                                                          **spawn_kw))
        yield mount
