"""A real Linux process -> its tree -> FreeBSD plan files -> back to Linux form -> restored on
Linux: it runs on and passes its own check (ZDTM programs). Edits to the plan files show in
the restored process or are refused naming the file and the value, before anything exists."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptfs import tree
from ckptfs.errors import BadTree, Unsupported
from ckptfs.translate import check_binary_os
from ckptfs.translate.freebsd import through_freebsd
from helpers import zdtm

CLI = [sys.executable, "-m", "ckptfs.cli"]
# Not about the translation: these fail on every path (tests/test_zdtm.py KNOWN says why).
SKIP = {"sighandlers", "posix_timer", "unlinked_file"}


def _program(name):
    """A program whose Linux dump/restore is a known failure (`// zdtm-known: *:` or `dump:`)
    cannot pass through the FreeBSD form either: expected to fail, for the same reason."""
    why = zdtm.KNOWN.get((name, "*")) or zdtm.KNOWN.get((name, "dump"))
    return pytest.param(name, marks=pytest.mark.xfail(reason=why)) if why else name


PROGRAMS = [_program(n) for n in zdtm.PROGRAMS if n not in SKIP]


def ckptfs(*args, ok=True):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, f"ckptfs {args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def new_root(output: str, old: int) -> int:
    pairs = dict(line.split(" -> ") for line in output.splitlines() if " -> " in line)
    return int(pairs[str(old)])


def through(tmp: Path, edit=None) -> Path:
    """tmp/tree -> FreeBSD plan in tmp/fbsd/plan (edited) -> Linux tree in tmp/back."""
    applied = through_freebsd(tree.TreeSource(str(tmp / "tree")), str(tmp / "fbsd"), edit)
    tree.write_tree(applied, str(tmp / "back"))
    return tmp / "back"


def move_via_freebsd(pid: int, tmp: Path, edit=None) -> int:
    ckptfs("dump", "--kill", pid, tmp / "tree")
    return new_root(ckptfs("restore", through(tmp, edit)).stdout, pid)


# State the plan has no file for: it passes through here, plan/lossy must say a FreeBSD
# restore leaves it out.
NOT_CARRIED = {"itimer": "/timers/real\t", "sigaltstack": "/sigaltstack\t",
               "sleeping": "/rseq\t", "threads": "-ERESTART_RESTARTBLOCK"}


@pytest.mark.parametrize("name", PROGRAMS)
def test_zdtm_through_freebsd_form(name, zdtm_bin, procs, tmp_path):
    assert zdtm.run_case(zdtm_bin, name, tmp_path, procs, move=move_via_freebsd) == "PASS"
    if name in NOT_CARRIED:
        assert NOT_CARRIED[name] in (tmp_path / "fbsd/plan/lossy").read_text()


def _edit(path: str, old: str, new: str) -> None:
    text = open(path).read()
    assert old in text, (path, old, text)
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


def _fd_of(tree_dir: Path, pid: int, suffix: str, flags: str) -> int:
    for fd in os.listdir(tree_dir / f"tasks/{pid}/fds"):
        base = tree_dir / f"tasks/{pid}/fds/{fd}"
        if (base / "path").read_text().strip().endswith(suffix) and \
                (base / "flags").read_text().strip() == flags:
            return int(fd)
    raise AssertionError(f"no fd of {pid} on *{suffix} with {flags}")


def test_edited_fd_flags_reach_the_running_process(zdtm_bin, procs, tmp_path):
    """O_NONBLOCK added to the reader's plan/tasks/<pid>/fds/<n>/flags: the restored program
    sees it with fcntl(F_GETFL) (and its own check fails, as it must)."""
    seen = {}

    def move(pid, tmp):
        def edit(plan):
            fd = _fd_of(tmp / "tree", pid, "half_read.dat", "O_RDONLY|O_LARGEFILE")
            _edit(f"{plan}/tasks/{pid}/fds/{fd}/flags", "0x0 O_RDONLY", "O_RDONLY|O_NONBLOCK")
            seen["fd"] = fd
        new = move_via_freebsd(pid, tmp, edit)
        fdinfo = Path(f"/proc/{new}/fdinfo/{seen['fd']}").read_text()
        seen["flags"] = int(fdinfo.split("flags:")[1].split()[0], 8)
        return new

    verdict = zdtm.run_case(zdtm_bin, "half_read_file", tmp_path, procs, move=move)
    assert seen["flags"] & os.O_NONBLOCK
    assert verdict.startswith("FAIL: reader flags") and "want O_RDONLY" in verdict


def test_edited_regs_and_rules_show_in_the_result(zdtm_bin, procs, tmp_path):
    """rcx is overwritten by the `syscall` instruction the sleeping thread restarts at, so an
    edit there shows in the tree and the program still passes; a new RCTL rule becomes a
    cgroup limit."""
    def move(pid, tmp):
        def edit(plan):
            regs = f"{plan}/tasks/{pid}/regs"
            old = next(ln for ln in open(regs) if ln.startswith("r_rcx "))
            _edit(regs, old, "r_rcx 0x1234abcd\n")
            with open(f"{plan}/rctl.rules", "a") as f:
                f.write(f"jail:ckptfs_{pid}:memoryuse:deny=64m\n")
        new = move_via_freebsd(pid, tmp, edit)
        back = tmp / "back"
        assert (back / f"tasks/{pid}/threads/{pid}/regs/rcx").read_text() == "0x1234abcd\n"
        assert (back / "isolation/limits/memory.max").read_text() == f"{64 << 20}\n"
        return new

    assert zdtm.run_case(zdtm_bin, "sleeping", tmp_path, procs, move=move) == "PASS"


@pytest.fixture
def dumped(zdtm_bin, procs, tmp_path):
    """A dumped (and killed) half_read_file: (pid, tmp_path with tmp_path/tree)."""
    run = zdtm.start(zdtm_bin, "half_read_file", tmp_path / "work", procs.spawn)
    ckptfs("dump", "--kill", run.pid, tmp_path / "tree")
    return run.pid, tmp_path


def _append(path, line):
    with open(path, "a") as f:
        f.write(line)


BAD_EDITS = [
    ("regs", lambda plan, pid: _edit(f"{plan}/tasks/{pid}/regs", "r_rip 0x", "r_rip zz"), "zz"),
    ("rctl.rules", lambda plan, pid: _append(f"{plan}/rctl.rules",
                                             f"jail:ckptfs_{pid}:memoryuse:deny=50%\n"), "50%"),
    ("rctl.rules", lambda plan, pid: _append(f"{plan}/rctl.rules",
                                             f"jail:ckptfs_{pid}:readbps:throttle=1m\n"),
     "readbps=1048576"),
    ("jail.conf", lambda plan, pid: _edit(f"{plan}/jail.conf", "\tpersist;", "\tvnet = yes;"),
     "'yes'"),
    ("fds", lambda plan, pid: os.rename(f"{plan}/tasks/{pid}/fds/0",
                                        f"{plan}/tasks/{pid}/fds/77"), "77"),
    ("tasks", lambda plan, pid: os.rename(f"{plan}/tasks/{pid}", f"{plan}/tasks/1"), "[1]"),
]


@pytest.mark.parametrize("where,edit,value", BAD_EDITS, ids=[f"{b[0]}-{i}" for i, b in
                                                             enumerate(BAD_EDITS)])
def test_bad_edits_are_refused_before_anything_exists(dumped, where, edit, value):
    pid, tmp = dumped
    with pytest.raises(BadTree) as e:
        through(tmp, lambda plan: edit(plan, pid))
    msg = str(e.value)
    assert f"{tmp}/fbsd/plan/" in msg and where in msg and value in msg, msg
    assert not (tmp / "back").exists()


def test_native_freebsd_binary_is_refused(dumped):
    """A tree whose manifest says the binary is FreeBSD's: refused naming manifest and value,
    both by the check restore calls and by the translation back to Linux."""
    pid, tmp = dumped
    path = tmp / "tree/manifest"
    doc = json.loads(path.read_text())
    doc["source"]["binary_os"] = "freebsd"
    os.chmod(path, 0o644)
    path.write_text(json.dumps(doc))
    src = tree.TreeSource(str(tmp / "tree"))
    with pytest.raises(Unsupported) as e:
        check_binary_os(src)
    assert str(path) in str(e.value) and '"binary_os": "freebsd"' in str(e.value)
    with pytest.raises(Unsupported) as e:
        through(tmp)
    assert "native FreeBSD binary" in str(e.value)
    assert not (tmp / "back").exists()
    check_binary_os(src, here="freebsd")      # it can go back where it came from


def test_restore_os_freebsd_dry_run_cli_keeps_and_checks_edits(dumped):
    """`ckptfs restore --os freebsd --dry-run DIR`: writes DIR/plan; run again after an edit,
    the edit is kept and checked; nonsense is refused naming the file and the value."""
    pid, tmp = dumped
    d = tmp / "tree"
    first = ckptfs("restore", "--os", "freebsd", "--dry-run", d)
    assert first.stdout.startswith(f"FreeBSD plan written to {d / 'plan'}")
    assert "approximation" in first.stdout
    rules = d / "plan/rctl.rules"
    _append(rules, f"jail:ckptfs_{pid}:maxproc:deny=12\n")
    again = ckptfs("restore", "--os", "freebsd", "--dry-run", d)
    assert "written" not in again.stdout, again.stdout   # the edited plan is checked, not rewritten
    assert f"jail:ckptfs_{pid}:maxproc:deny=12\n" in rules.read_text()
    _append(rules, f"jail:ckptfs_{pid}:maxproc:deny=twelve\n")
    bad = ckptfs("restore", "--os", "freebsd", "--dry-run", d, ok=False)
    assert bad.returncode == 1 and str(rules) in bad.stderr and "twelve" in bad.stderr
    real = ckptfs("restore", "--os", "freebsd", d, ok=False)
    assert real.returncode == 1 and "FreeBSD host" in real.stderr
