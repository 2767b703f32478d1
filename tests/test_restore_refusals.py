"""Refusals that come before anything is created: a native FreeBSD program on Linux."""
from __future__ import annotations

import json
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "ckptfs.cli"]


def test_native_freebsd_binary_is_refused(procs, tmp_path):
    sleeper = procs.spawn(["sleep", "1000"])
    time.sleep(0.2)
    subprocess.run([*CLI, "dump", str(sleeper.pid), str(tmp_path / "tree")], check=True,
                   capture_output=True)
    manifest = tmp_path / "tree" / "manifest"
    doc = json.loads(manifest.read_text())
    doc["source"]["binary_os"] = "freebsd"
    manifest.write_text(json.dumps(doc))
    sleeps = {p for p in procs_now() if is_sleep(p)}  # the restorer's helpers are `sleep`s
    for extra in ([], ["--dry-run"]):
        r = subprocess.run([*CLI, "restore", *extra, str(tmp_path / "tree")], capture_output=True,
                           text=True, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert str(manifest) in out and '"binary_os": "freebsd"' in out, out
    assert {p for p in procs_now() if is_sleep(p)} == sleeps, "nothing may be left running"


def procs_now() -> list[int]:
    import os
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def is_sleep(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/comm").read().strip() == "sleep"
    except OSError:
        return False
