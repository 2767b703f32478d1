"""cgroup v2 limits (model.Isolation.limits) <-> FreeBSD RCTL rules + cpuset.

Rule syntax (rctl(8), rctl_add_rule(2)): `subject:subject-id:resource:action=amount[/per]`.
The kernel (kern_rctl.c rctl_rule_add) accepts `deny` only on DENIABLE resources plus
memoryuse and pcpu, `throttle` only on DECAYING resources except pcpu; amounts are plain
integers, rctl(8) also takes expand_number(3) suffixes (k m g t p e, powers of 1024).
CPU pinning is not RCTL: `cpuset -j JID -l LIST`.
"""
from __future__ import annotations

import dataclasses
import math
import re

from ...errors import BadTree
from .. import LossLog
from . import flags as F

# resource -> (unit, flags): D deniable, Y decaying (kern_racct.c racct_types).
RESOURCES = {
    "cputime": ("seconds", ""), "datasize": ("bytes", "D"), "stacksize": ("bytes", "D"),
    "coredumpsize": ("bytes", "D"), "memoryuse": ("bytes", "d"), "memorylocked": ("bytes", "D"),
    "maxproc": ("count", "D"), "openfiles": ("count", "D"), "vmemoryuse": ("bytes", "D"),
    "pseudoterminals": ("count", "D"), "swapuse": ("bytes", "D"), "nthr": ("count", "D"),
    "msgqqueued": ("count", "D"), "msgqsize": ("bytes", "D"), "nmsgq": ("count", "D"),
    "nsem": ("count", "D"), "nsemop": ("count", "D"), "nshm": ("count", "D"),
    "shmsize": ("bytes", "D"), "wallclock": ("seconds", ""), "pcpu": ("percent", "DY"),
    "readbps": ("bytes/s", "Y"), "writebps": ("bytes/s", "Y"), "readiops": ("ops/s", "Y"),
    "writeiops": ("ops/s", "Y"),
}   # "d": not DENIABLE in racct, but rctl_rule_add accepts deny (RSS is paged out)
SUBJECTS = ("process", "user", "loginclass", "jail")
# kern_rctl.c actionnames[]: every signal up to SIGTHR except SIGCONT.
SIGNAL_ACTIONS = tuple(f"sig{n[3:].lower()}" for n, v in F.FBSD_SIGNALS.items()
                       if v <= 32 and n != "SIGCONT")
ACTIONS = ("deny", "log", "devctl", "throttle") + SIGNAL_ACTIONS
SUFFIX = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
AMOUNT_RE = re.compile(r"^(\d+)([kmgtpe]?)$", re.IGNORECASE)

# cgroup v2 file -> (RCTL resource, action, why it is not exact or None).
LIMIT_RULES = {
    "memory.max": ("memoryuse", "deny", "RCTL memoryuse limits resident memory only (no page "
                   "cache or kernel memory) and pages out instead of refusing/OOM-killing"),
    "memory.swap.max": ("swapuse", "deny", "RCTL swapuse counts swap reservation, not only "
                        "swap in use"),
    "pids.max": ("nthr", "deny", None),
}
IO_KEYS = {"rbps": "readbps", "wbps": "writebps", "riops": "readiops", "wiops": "writeiops"}
PCPU_WHY = ("pcpu is a decaying percentage of one CPU enforced by throttling; cpu.max "
            "quota/period has no exact counterpart")
IO_WHY = ("RCTL IO limits are per jail and count filesystem I/O, not per block device; the "
          "smallest limit over all devices is kept")
DEFAULT_PERIOD = 100000


@dataclasses.dataclass(frozen=True)
class Rule:
    subject: str
    subject_id: str
    resource: str
    action: str
    amount: int
    per: str | None = None

    def text(self) -> str:
        per = f"/{self.per}" if self.per else ""
        return f"{self.subject}:{self.subject_id}:{self.resource}:{self.action}={self.amount}{per}"


# -- parsing and checking ------------------------------------------------------------------------
def parse_amount(text: str, path: str) -> int:
    m = AMOUNT_RE.match(text.strip())
    if not m:
        raise BadTree(f"amount {text!r}: RCTL takes a whole number with an optional k/m/g/t/p/e "
                      "suffix", path=path)
    return int(m.group(1)) << (10 * SUFFIX[m.group(2).lower()])


def parse_rule(line: str, path: str) -> Rule:
    parts = line.strip().split(":")
    if len(parts) != 4 or "=" not in parts[3]:
        raise BadTree(f"rule {line.strip()!r}: want subject:id:resource:action=amount[/per]",
                      path=path)
    subject, sid, resource = parts[:3]
    action, _, rest = parts[3].partition("=")
    amount, _, per = rest.partition("/")
    rule = Rule(subject, sid, resource, action, parse_amount(amount, path), per or None)
    check_rule(rule, path)
    return rule


def check_rule(rule: Rule, path: str) -> None:
    """BadTree for a rule the FreeBSD kernel would refuse."""
    where = f"rule {rule.text()!r}"
    if rule.subject not in SUBJECTS:
        raise BadTree(f"{where}: subject {rule.subject!r} is not one of {SUBJECTS}", path=path)
    if not rule.subject_id:
        raise BadTree(f"{where}: empty subject id", path=path)
    if rule.resource not in RESOURCES:
        raise BadTree(f"{where}: unknown resource {rule.resource!r}", path=path)
    if rule.action not in ACTIONS:
        raise BadTree(f"{where}: unknown action {rule.action!r}", path=path)
    if rule.per is not None and rule.per not in SUBJECTS:
        raise BadTree(f"{where}: per {rule.per!r} is not one of {SUBJECTS}", path=path)
    flags = RESOURCES[rule.resource][1]
    if rule.action == "deny" and not set("Dd") & set(flags):
        raise BadTree(f"{where}: {rule.resource} cannot be denied (use log/devctl/sig*)",
                      path=path)
    if rule.action == "throttle" and ("Y" not in flags or rule.resource == "pcpu"):
        raise BadTree(f"{where}: only readbps/writebps/readiops/writeiops can be throttled",
                      path=path)


# -- cgroup -> RCTL --------------------------------------------------------------------------------
def to_rctl(limits: dict[str, str], jail: str, log: LossLog,
            path: str = "isolation/limits") -> tuple[list[Rule], str | None]:
    rules: list[Rule] = []
    cpuset = None
    for key, value in limits.items():
        where = f"{path}/{key}"
        if key in LIMIT_RULES:
            rules += _simple(key, value, jail, log, where)
        elif key == "cpu.max":
            rules += _cpu_max(value, jail, log, where)
        elif key == "io.max":
            rules += _io_max(value, jail, log, where)
        elif key == "cpuset.cpus":
            cpuset = check_cpulist(value, where) or None
        else:
            log.note(where, value, f"cgroup limit {key} has no RCTL counterpart")
    return rules, cpuset


def _limit_number(value: str, where: str) -> int | None:
    text = value.strip()
    if text == "max":
        return None
    if not text.isdigit():
        raise BadTree(f"limit {text!r}: want a whole number or 'max'", path=where)
    return int(text)


def _simple(key: str, value: str, jail: str, log: LossLog, where: str) -> list[Rule]:
    num = _limit_number(value, where)
    if num is None:
        return []
    resource, action, why = LIMIT_RULES[key]
    if why:
        log.note(where, value, why)
    rules = [Rule("jail", jail, resource, action, num)]
    if key == "pids.max":       # Linux counts tasks = threads; maxproc is implied but explicit
        rules.append(Rule("jail", jail, "maxproc", "deny", num))
    return rules


def _cpu_max(value: str, jail: str, log: LossLog, where: str) -> list[Rule]:
    words = value.split()
    if len(words) not in (1, 2) or (len(words) == 2 and not words[1].isdigit()):
        raise BadTree(f"cpu.max {value!r}: want '<quota|max> [period]'", path=where)
    quota = _limit_number(words[0], where)
    period = int(words[1]) if len(words) == 2 else DEFAULT_PERIOD
    if quota is None:
        return []
    if period <= 0:
        raise BadTree(f"cpu.max {value!r}: period must be positive", path=where)
    log.note(where, value, PCPU_WHY)
    return [Rule("jail", jail, "pcpu", "deny", max(1, math.ceil(100 * quota / period)))]


def _io_max(value: str, jail: str, log: LossLog, where: str) -> list[Rule]:
    smallest: dict[str, int] = {}
    for line in filter(None, (ln.strip() for ln in value.splitlines())):
        dev, *pairs = line.split()
        for pair in pairs:
            key, _, num = pair.partition("=")
            if key not in IO_KEYS:
                raise BadTree(f"io.max {line!r}: unknown key {key!r}", path=where)
            amount = _limit_number(num, where)
            if amount is not None:
                smallest[key] = min(amount, smallest.get(key, amount))
    if smallest:
        log.note(where, value, IO_WHY)
    return [Rule("jail", jail, IO_KEYS[k], "throttle", v) for k, v in smallest.items()]


def check_cpulist(text: str, where: str) -> str:
    t = text.strip()
    if t and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", t):
        raise BadTree(f"cpu list {t!r}: want e.g. 0-3,6", path=where)
    return t


# -- RCTL -> cgroup --------------------------------------------------------------------------------
REVERSE = {"memoryuse": "memory.max", "swapuse": "memory.swap.max", "nthr": "pids.max"}
DEFAULT_LIMITS = {"memory.max": "max", "memory.swap.max": "max", "pids.max": "max",
                  "cpu.max": f"max {DEFAULT_PERIOD}"}


def from_rctl(rules: list[Rule], cpuset: str | None, jail: str, log: LossLog,
              path: str = "plan/rctl.rules") -> dict[str, str]:
    limits = dict(DEFAULT_LIMITS)
    io: dict[str, int] = {}
    seen_nthr = any(r.resource == "nthr" for r in rules)
    for rule in rules:
        if (rule.subject, rule.subject_id) != ("jail", jail) or rule.per not in (None, "jail"):
            log.note(path, rule.text(), f"only rules on jail:{jail} become cgroup limits")
        elif rule.resource in REVERSE and rule.action == "deny":
            limits[REVERSE[rule.resource]] = str(rule.amount)
        elif rule.resource == "maxproc" and rule.action == "deny":
            if not seen_nthr:
                log.note(path, rule.text(), "pids.max counts threads; maxproc only processes")
                limits["pids.max"] = str(rule.amount)
        elif rule.resource == "pcpu" and rule.action == "deny":
            limits["cpu.max"] = f"{rule.amount * DEFAULT_PERIOD // 100} {DEFAULT_PERIOD}"
        elif rule.resource in IO_KEYS.values() and rule.action == "throttle":
            io[rule.resource] = rule.amount
        else:
            log.note(path, rule.text(), "no cgroup v2 counterpart")
    if io:
        log.note(path, " ".join(f"{k}={v}" for k, v in io.items()), "cgroup io.max is per "
                 "block device: MAJ:MIN must be filled in")
        keys = {v: k for k, v in IO_KEYS.items()}
        limits["io.max"] = "MAJ:MIN " + " ".join(f"{keys[k]}={v}" for k, v in io.items())
    if cpuset:
        limits["cpuset.cpus"] = cpuset
    return limits


def equivalent_limits(limits: dict[str, str]) -> dict[str, str]:
    """What a FreeBSD round trip gives back for exactly representable limits."""
    out = dict(DEFAULT_LIMITS)
    out.update({k: v for k, v in limits.items() if k in REVERSE.values() or k == "cpuset.cpus"})
    return {k: v for k, v in out.items() if v != ""}
