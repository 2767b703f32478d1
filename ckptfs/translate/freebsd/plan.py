"""A FreeBSDPlan as files a user can read, edit and feed back (`--os freebsd --dry-run`).

    plan/source                        key value: os, arch, kernel, binary_os of the checkpoint
    plan/jail.conf                     jail.conf(5): one jail block with its parameters
    plan/rctl.rules                    rctl(8) rules, one per line
    plan/cpuset                        CPU list for `cpuset -j JID -l LIST` (empty: none)
    plan/tasks/<pid>/regs              struct reg in order (`r_r15 0x...`), then fsbase/gsbase
    plan/tasks/<pid>/threads/<tid>/regs   the same for every other thread
    plan/tasks/<pid>/sigmask (and threads/<tid>/sigmask)   sigset_t __bits[0..3], hex words
    plan/tasks/<pid>/fds/<n>/type      CRIU fd type (REG, PIPE, ...)
    plan/tasks/<pid>/fds/<n>/flags     `0x100009 O_WRONLY|O_APPEND|O_CLOEXEC` (FreeBSD values)
    plan/tasks/<pid>/sigactions        `<FreeBSD signo> <NAME> handler=.. flags=.. mask=.. restorer=..`
    plan/lossy                         path<TAB>value<TAB>reason, one per line
    plan/refused                       the same for what the FreeBSD restore refuses (a
                                       descriptor kind the Linuxulator cannot make ...)

Lines starting with `#` are comments. `read_plan` parses everything back, so edits take
effect; a malformed file raises BadTree naming the file and the value.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

from ...errors import BadTree
from .. import Lossy
from . import flags as F
from . import jail as J
from . import rctl as R
from . import regs as G
from .convert import FdPlan, FreeBSDPlan, SigactionPlan, TaskPlan, ThreadPlan

HEADER = "# ckptfs FreeBSD plan: edit and re-run; lines starting with # are ignored\n"


# -- writing -------------------------------------------------------------------------------------
def write_plan(plan: FreeBSDPlan, directory: str) -> str:
    """Write the plan under directory/plan (replacing one that is there); returns that path.

    The files are written into a temporary directory next to it and renamed into place, so a
    reader (or a failure half way) never sees half a plan."""
    root = os.path.join(directory, "plan")
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".plan.", dir=directory)
    try:
        _write_files(plan, tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(root):
            old = tempfile.mkdtemp(prefix=".plan-old.", dir=directory)
            os.rename(root, os.path.join(old, "plan"))
            os.rename(tmp, root)
            shutil.rmtree(old)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_files(plan: FreeBSDPlan, root: str) -> None:
    files = {"source": "".join(f"{k} {v}\n" for k, v in plan.source.items()),
             "jail.conf": render_jail(plan.jail_name, plan.jail),
             "rctl.rules": HEADER + "".join(r.text() + "\n" for r in plan.rules),
             "cpuset": (plan.cpuset or "") + "\n",
             "lossy": "".join(rec.line() + "\n" for rec in plan.lossy),
             "refused": "".join(rec.line() + "\n" for rec in plan.refused)}
    for task in plan.tasks:
        files.update(task_files(task))
    for rel, text in files.items():
        _write(os.path.join(root, rel), text)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def task_files(task: TaskPlan) -> dict[str, str]:
    base = f"tasks/{task.pid}"
    out = {f"{base}/sigactions": "".join(render_sigaction(sa) + "\n" for sa in task.sigactions)}
    for t in task.threads:
        tdir = base if t.tid == task.pid else f"{base}/threads/{t.tid}"
        out[f"{tdir}/regs"] = render_regs(t)
        out[f"{tdir}/sigmask"] = render_sigset(t.sigmask) + "\n"
    for fd in task.fds:
        out[f"{base}/fds/{fd.fd}/type"] = fd.kind + "\n"
        out[f"{base}/fds/{fd.fd}/flags"] = f"{fd.flags:#x} {F.render_fbsd_open(fd.flags)}\n"
    return out


def render_regs(t: ThreadPlan) -> str:
    lines = ["# struct reg (PT_SETREGS), FreeBSD field order"]
    lines += [f"{name} {t.reg[name]:#x}" for name in G.REG_NAMES]
    lines += ["# PT_SETFSBASE / PT_SETGSBASE", f"fsbase {t.fsbase:#x}", f"gsbase {t.gsbase:#x}"]
    return "\n".join(lines) + "\n"


def render_sigset(words) -> str:
    return " ".join(f"0x{w:08x}" for w in words)


def render_sigaction(sa: SigactionPlan) -> str:
    return (f"{sa.signo} {F.fbsd_signame(sa.signo)} handler={sa.handler:#x} "
            f"flags={F.L.render_bits(sa.flags, F.FBSD_SA)} "
            f"mask={','.join(f'0x{w:08x}' for w in sa.mask)} restorer={sa.restorer:#x}")


def render_jail(name: str, params: dict) -> str:
    lines = [HEADER.rstrip("\n"), f"{name} {{"]
    for key, value in params.items():
        if key == "name":
            continue
        if value is True or value is False:
            lines.append(f"\t{'' if value else 'no'}{key};")
        elif isinstance(value, int):
            lines.append(f"\t{key} = {value};")
        else:
            lines.append(f"\t{key} = {_quote(value)};")
    return "\n".join(lines + ["}"]) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- reading -------------------------------------------------------------------------------------
def read_plan(directory: str) -> FreeBSDPlan:
    """Parse directory/plan (or directory itself if it is the plan) back into a FreeBSDPlan."""
    root = directory if os.path.exists(os.path.join(directory, "jail.conf")) else \
        os.path.join(directory, "plan")
    p = lambda rel: os.path.join(root, rel)   # noqa: E731
    name, params = parse_jail(_read(p("jail.conf")), p("jail.conf"))
    rules = parse_rules(_read(p("rctl.rules")), p("rctl.rules"))
    cpuset = R.check_cpulist(_read(p("cpuset")), p("cpuset")) or None
    tasks_dir = p("tasks")
    pids = sorted(_numeric_dirs(tasks_dir, p("tasks")))
    tasks = [read_task(os.path.join(tasks_dir, str(pid)), pid) for pid in pids]
    lossy = parse_lossy(_read(p("lossy")), p("lossy"))
    source = parse_source(_read(p("source")), p("source"))
    refused = parse_lossy(_read(p("refused")), p("refused")) \
        if os.path.exists(p("refused")) else []
    return FreeBSDPlan(name, params, rules, cpuset, tasks, lossy, source, refused)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        raise BadTree("file missing from the plan", path=path) from None


def _lines(text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line.strip()


def _numeric_dirs(path: str, where: str) -> list[int]:
    if not os.path.isdir(path):
        return []
    out = []
    for entry in os.listdir(path):
        if not entry.isdigit():
            raise BadTree(f"unexpected entry {entry!r} (want numbers)", path=where)
        out.append(int(entry))
    return out


def parse_source(text: str, path: str) -> dict:
    out = {}
    for _, line in _lines(text):
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def parse_lossy(text: str, path: str) -> list[Lossy]:
    out = []
    for number, line in _lines(text):
        parts = line.split("\t")
        if len(parts) != 3:
            raise BadTree(f"line {number} {line!r}: want path<TAB>value<TAB>reason", path=path)
        out.append(Lossy(*parts))
    return out


def parse_rules(text: str, path: str) -> list[R.Rule]:
    return [R.parse_rule(line, f"{path}:{number}") for number, line in _lines(text)]


def read_task(tdir: str, pid: int) -> TaskPlan:
    threads = [read_thread(tdir, pid, pid)]
    tids = sorted(_numeric_dirs(os.path.join(tdir, "threads"), os.path.join(tdir, "threads")))
    threads += [read_thread(os.path.join(tdir, "threads", str(t)), t, pid) for t in tids]
    fds = [read_fd(os.path.join(tdir, "fds", str(n)), n)
           for n in sorted(_numeric_dirs(os.path.join(tdir, "fds"), os.path.join(tdir, "fds")))]
    spath = os.path.join(tdir, "sigactions")
    acts = [parse_sigaction(line, f"{spath}:{n}") for n, line in _lines(_read(spath))]
    return TaskPlan(pid, threads, fds, acts)


def read_thread(tdir: str, tid: int, pid: int) -> ThreadPlan:
    reg, fsbase, gsbase = parse_regs(_read(os.path.join(tdir, "regs")), os.path.join(tdir, "regs"))
    mpath = os.path.join(tdir, "sigmask")
    return ThreadPlan(tid, reg, fsbase, gsbase, parse_sigset(_read(mpath).strip(), mpath))


def _number(text: str, path: str, what: str, bits: int = 64) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise BadTree(f"{what} = {text!r} is not a number", path=path) from None
    if not 0 <= value < 1 << bits:
        raise BadTree(f"{what} = {text} does not fit in {bits} bits", path=path)
    return value


def parse_regs(text: str, path: str) -> tuple[dict, int, int]:
    values = {}
    for number, line in _lines(text):
        words = line.split()
        if len(words) != 2:
            raise BadTree(f"line {number} {line!r}: want 'name value'", path=path)
        name, raw = words
        width = G.REG_WIDTH.get(name, 64 if name in ("fsbase", "gsbase") else None)
        if width is None:
            raise BadTree(f"unknown register {name!r}", path=path)
        values[name] = _number(raw, path, name, width)
    missing = [n for n in (*G.REG_NAMES, "fsbase", "gsbase") if n not in values]
    if missing:
        raise BadTree(f"registers missing: {' '.join(missing)}", path=path)
    reg = {n: values[n] for n in G.REG_NAMES}
    return reg, values["fsbase"], values["gsbase"]


def parse_sigset(text: str, path: str) -> tuple:
    words = text.replace(",", " ").split()
    if len(words) != F.FBSD_NSIG_WORDS:
        raise BadTree(f"sigset {text!r}: want {F.FBSD_NSIG_WORDS} 32-bit words", path=path)
    return tuple(_number(w, path, "sigset word", 32) for w in words)


def read_fd(fdir: str, fd: int) -> FdPlan:
    kind = _read(os.path.join(fdir, "type")).strip()
    fpath = os.path.join(fdir, "flags")
    return FdPlan(fd, kind, parse_fd_flags(_read(fpath).strip(), fpath))


def parse_fd_flags(text: str, path: str) -> int:
    """`0x... SYMBOLS`: both if both are given (they must agree), else whichever is there."""
    words = text.split()
    if not words or len(words) > 2:
        raise BadTree(f"flags {text!r}: want '0xNUMBER O_FLAG|O_FLAG'", path=path)
    values = [F.parse_fbsd_open(w, path=path) for w in words]
    if len(values) == 2 and values[0] != values[1]:
        raise BadTree(f"flags {text!r}: the number ({values[0]:#x}) and the names "
                      f"({values[1]:#x}) disagree; edit both or keep one", path=path)
    return values[0]


SIGACTION_RE = re.compile(r"^(\d+)\s+(\S+)\s+(.*)$")


def parse_sigaction(line: str, path: str) -> SigactionPlan:
    m = SIGACTION_RE.match(line)
    if not m:
        raise BadTree(f"{line!r}: want '<signo> <NAME> handler=.. flags=.. mask=.. restorer=..'",
                      path=path)
    signo = int(m.group(1))
    try:
        named = F.fbsd_signum(m.group(2))
    except ValueError as e:
        raise BadTree(str(e), path=path) from None
    if named != signo:
        raise BadTree(f"signal {signo} is not {m.group(2)} (that is {named})", path=path)
    fields = dict(_kv(w, path) for w in m.group(3).split())
    if set(fields) != {"handler", "flags", "mask", "restorer"}:
        raise BadTree(f"{line!r}: want exactly handler= flags= mask= restorer=", path=path)
    return SigactionPlan(signo, _number(fields["handler"], path, "handler"),
                         F.L.parse_bits(fields["flags"], F.FBSD_SA, path=path),
                         parse_sigset(fields["mask"], path),
                         _number(fields["restorer"], path, "restorer"))


def _kv(word: str, path: str) -> tuple[str, str]:
    key, eq, value = word.partition("=")
    if not eq:
        raise BadTree(f"{word!r}: want key=value", path=path)
    return key, value


# -- jail.conf ------------------------------------------------------------------------------------
TOKEN_RE = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{};=])|([^\s{};="#]+))', re.S)


def _tokens(text: str, path: str):
    pos = 0
    while pos < len(text):
        m = TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise BadTree(f"cannot read jail.conf near {text[pos:pos + 20]!r}", path=path)
            return
        pos = m.end()
        if m.group(2):
            yield re.sub(r"\\(.)", r"\1", m.group(2)[1:-1]), True
        elif m.group(3) or m.group(4):
            yield m.group(3) or m.group(4), False


def parse_jail(text: str, path: str) -> tuple[str, dict]:
    """One `name { param = value; flag; noflag; }` block -> (name, checked parameters)."""
    toks = list(_tokens(text, path))
    if len(toks) < 3 or toks[1] != ("{", False) or toks[-1] != ("}", False):
        raise BadTree("want exactly one block: NAME { param = value; ... }", path=path)
    name = toks[0][0]
    if "." in name or not name:
        raise BadTree(f"jail name {name!r}: must be non-empty without dots", path=path)
    params = {"name": name}
    body, i = toks[2:-1], 0
    while i < len(body):
        key, quoted = body[i]
        if quoted or key in "{}=;":
            raise BadTree(f"expected a parameter name, got {key!r}", path=path)
        if i + 1 < len(body) and body[i + 1] == (";", False):
            params.update(_bool_param(key, path))
            i += 2
        elif body[i + 1:i + 2] == [("=", False)] and body[i + 3:i + 4] == [(";", False)] \
                and (body[i + 2][1] or body[i + 2][0] not in "{};="):
            params[key] = J.check_value(key, body[i + 2][0], path)
            i += 4
        else:
            raise BadTree(f"parameter {key!r}: want `{key} = value;` or `{key};`", path=path)
    return name, params


def _bool_param(key: str, path: str) -> dict:
    if J.param_kind(key) is None and key.startswith("no") and J.param_kind(key[2:]) == "bool":
        return {key[2:]: False}
    return {key: J.check_value(key, True, path)}
