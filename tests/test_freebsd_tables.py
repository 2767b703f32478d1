"""FreeBSD translation tables: they match the reference facts (or our checked corrections),
and every mapping that claims to be exact is invertible (hypothesis)."""
from __future__ import annotations

import json
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from ckptfs import flags as L
from ckptfs.errors import Unsupported
from ckptfs.translate import LossLog
from ckptfs.translate.freebsd import flags as F
from ckptfs.translate.freebsd import fpu, regs as G, rctl as R, jail as J

REF = "/work/shared/reference/freebsd"
pytestmark = pytest.mark.skipif(not os.path.isdir(REF), reason="reference facts not present")


def ref(name):
    with open(os.path.join(REF, name)) as f:
        return json.load(f)


# -- reference agreement ------------------------------------------------------------------------
def test_open_flags_match_reference():
    rows = {r["name"]: r for r in ref("open_fcntl_flags.json")["open_flags"]}
    for lname, fname in F.OPEN_ROWS:
        assert rows[lname]["linux_kernel"] == L.OPEN_FLAGS[lname]
        assert rows[lname]["freebsd"] == F.FBSD_OPEN[fname], lname
    for name in ("O_DSYNC", "O_PATH"):
        assert rows[name]["freebsd"] == F.FBSD_OPEN[name]
    assert rows["O_SYNC"]["freebsd"] == F.FBSD_OPEN["O_FSYNC"]
    assert rows["O_LARGEFILE"]["linux_kernel"] == L.OPEN_FLAGS["O_LARGEFILE"]
    for name in ("O_NOATIME", "O_LARGEFILE", "O_TMPFILE"):
        assert rows[name]["freebsd"] is None
    for name in ("O_EXEC/O_SEARCH", "O_SHLOCK", "O_EXLOCK", "O_TTY_INIT", "O_VERIFY",
                 "O_RESOLVE_BENEATH"):
        if name in rows:
            assert rows[name]["freebsd"] == F.FBSD_OPEN[name.split("/")[0]]


def test_fcntl_and_lock_tables_match_reference():
    data = ref("open_fcntl_flags.json")
    mine = {name: (lin, fb) for name, lin, fb in F.FCNTL_CMDS}
    for row in data["fcntl_commands"]:
        if row["name"] in mine:
            assert mine[row["name"]] == (row["linux"], row["freebsd"]), row["name"]
    assert {r["name"]: (r["linux"], r["freebsd"]) for r in data["lock_types"]} == \
        {n: (lv, fv) for n, lv, fv in F.LOCK_TYPES}


def test_mmap_tables_match_reference():
    data = ref("mmap_flags.json")
    maps = {r["name"]: r for r in data["map_flags"]}
    for lname, fname in F.MAP_ROWS:
        assert maps[lname]["linux"] == L.MAP_FLAGS[lname]
        assert maps[lname]["freebsd"] == F.FBSD_MAP[fname], lname
    for name in F.MAP_LOSSY:
        if name in maps:
            assert maps[name]["freebsd"] is None, name
    for name in ("MAP_NOSYNC", "MAP_GUARD", "MAP_EXCL", "MAP_NOCORE", "MAP_PREFAULT_READ",
                 "MAP_HASSEMAPHORE"):
        assert maps[name]["freebsd"] == F.FBSD_MAP[name]
    assert maps["MAP_32BIT"]["freebsd"] == F.FBSD_MAP["MAP_32BIT"]
    for r in data["madvise"]:
        mine = {n: (lv, fv) for n, lv, fv in F.MADV_ROWS}[r["name"]]
        want_fb = r["freebsd"]
        if isinstance(want_fb, str):          # "MADV_NOCORE=8"
            want_fb = int(want_fb.split("=")[1])
        assert mine == (r["linux"], want_fb), r["name"]
    assert [(r["linux"], r["freebsd"]) for r in data["prot"][1:4]] == \
        [(lv, fv) for _, lv, fv in F.PROT_ROWS]


def test_signals_match_reference():
    data = ref("signals.json")
    for row in data["signals_1_31"]:
        assert F.sig_to_fbsd(row["linux"]) == row["freebsd"], row["name"]
    for row in data["freebsd_only"]:
        assert F.FBSD_SIGNALS[row["name"]] == row["freebsd"]
        assert F.sig_to_linux(row["freebsd"]) is None
    rt = data["realtime"]
    assert (F.FBSD_SIGRTMIN, F.FBSD_SIGRTMAX) == (rt["freebsd_SIGRTMIN"], rt["freebsd_SIGRTMAX"])
    for sig in range(rt["linux_kernel_SIGRTMIN"], rt["linux_kernel_SIGRTMAX"] + 1):
        assert F.sig_to_fbsd(sig) == 65 + sig - 32
    assert F.sig_to_fbsd(L.SIGNALS["SIGPWR"]) == 98 and F.sig_to_linux(98) == 30
    for row in data["sa_flags"]:
        assert L.SA_FLAGS[row["name"]] == row["linux"]
        assert F.FBSD_SA.get(row["name"]) == row["freebsd"], row["name"]
    misc = {r["name"]: r for r in data["misc"]}
    assert F.FBSD_SS["SS_DISABLE"] == misc["SS_DISABLE"]["freebsd"]
    assert {n: (lv, fv) for n, lv, fv in F.SIGPROCMASK_HOW} == \
        {n: (misc[n]["linux"], misc[n]["freebsd"]) for n in ("SIG_BLOCK", "SIG_UNBLOCK",
                                                             "SIG_SETMASK")}


def test_errno_matches_reference():
    data = ref("errno.json")
    for row in data["linux_to_freebsd"]:
        fb, exact = F.errno_to_fbsd(row["linux"])
        if row["freebsd_same_name"] is not None:
            assert (fb, exact) == (row["freebsd_same_name"], True), row["name"]
        else:
            # No errno of that name on FreeBSD: we follow the Linuxulator's choice.
            assert (fb, exact) == (row["linuxulator_linux_to_bsd_value"], False), row["name"]
    for row in data["freebsd_to_linux"]:
        assert F.FBSD_ERRNO[row["name"]] == row["freebsd"]
        assert F.errno_to_linux(row["freebsd"]) == (row["linux"], not row["lossy"]), row["name"]


def test_struct_reg_matches_reference():
    data = ref("amd64_registers.json")
    assert list(G.REG_NAMES) == data["freebsd_struct_reg"]["order"]
    assert G.REG_STRUCT.size == data["freebsd_struct_reg"]["size"]
    offsets, off = {}, 0
    for name, code, _ in G.FBSD_REG:
        offsets[name] = off
        off += struct.calcsize("<" + code)
    for row in data["gp_mapping"]:
        if row["freebsd_field"]:
            assert offsets[row["freebsd_field"]] == row["freebsd_offset"]
            assert G.REG_WIDTH[row["freebsd_field"]] // 8 == row["freebsd_size"]
            assert dict((f, lname) for f, _, lname in G.FBSD_REG)[row["freebsd_field"]] == \
                row["linux_field"]
    for row in data["freebsd_only"]:
        assert offsets[row["freebsd_field"]] == row["offset"]


def test_rctl_resources_match_reference():
    data = ref("cgroups_rctl.json")
    assert {r["resource"] for r in data["resources"]} == set(R.RESOURCES)
    for r in data["resources"]:
        deniable = "DENIABLE" in r["racct_flags"] and "not deniable" not in r["racct_flags"]
        assert ("D" in R.RESOURCES[r["resource"]][1]) == deniable, r["resource"]
        assert ("Y" in R.RESOURCES[r["resource"]][1]) == ("DECAYING" in r["racct_flags"])
    assert set(data["actions"]["signals"]) == set(R.SIGNAL_ACTIONS)


def test_memoryuse_deny_is_accepted():
    # freebsd-facts.md section 9 says `deny` excludes memoryuse. Wrong: kern_rctl.c
    # rctl_rule_add refuses deny on non-DENIABLE resources *except* RACCT_RSS (memoryuse) and
    # RACCT_PCTCPU (pcpu), which it enforces by paging out / throttling.
    for text in ("jail:j:memoryuse:deny=1g", "jail:j:pcpu:deny=50"):
        R.parse_rule(text, "x")
    with pytest.raises(Exception):
        R.parse_rule("jail:j:wallclock:deny=10", "x")


def test_jail_tables_match_reference():
    data = ref("namespaces_jail.json")
    assert J.JAILSYS == data["jailsys_values"]
    names = {p["name"] for p in data["parameters"]}
    for name in ("name", "path", "persist", "host.hostname", "host.domainname", "vnet",
                 "sysvmsg", "sysvsem", "sysvshm", "enforce_statfs", "children.max",
                 "linux.osname", "linux.osrelease", "allow.set_hostname"):
        assert name in names and J.param_kind(name), name


def test_selectors_are_freebsd_gdt_values():
    # amd64_registers.json calls the fs/gs selectors GUFS_SEL/GUGS_SEL; FreeBSD's x86
    # segments.h names them GUFS32_SEL (2) and GUGS32_SEL (3): _ufssel = 0x13, _ugssel = 0x1b.
    assert {n: fv for n, _, fv in G.SELECTORS} == {"cs": 0x43, "ss": 0x3b, "ds": 0x3b,
                                                   "es": 0x3b, "fs": 0x13, "gs": 0x1b}


# -- invertibility --------------------------------------------------------------------------------
EXACT_OPEN = [L.OPEN_FLAGS[l] for l, _ in F.OPEN_ROWS]


@given(st.sampled_from([0, 1, 2]), st.lists(st.sampled_from(EXACT_OPEN), unique=True),
       st.booleans())
def test_open_flags_round_trip(mode, bits, sync):
    flags = mode | sum(bits) | (F.LINUX_O_SYNC if sync else 0) | L.OPEN_FLAGS["O_LARGEFILE"]
    log = LossLog(strict=True)
    assert F.open_to_linux(F.open_to_fbsd(flags, log, "p", "REG"), log, "p", "REG") == flags


def test_open_flags_lossy_and_strict():
    log = LossLog()
    out = F.open_to_fbsd(2 | L.OPEN_FLAGS["O_NOATIME"] | L.OPEN_FLAGS["O_DSYNC"], log, "fd/3", "REG")
    assert out == 2 | F.FBSD_OPEN["O_FSYNC"]
    reasons = " ".join(r.reason for r in log.records)
    assert "O_NOATIME" in reasons and "O_DSYNC" in reasons and "O_LARGEFILE" in reasons
    with pytest.raises(Unsupported) as e:
        F.open_to_fbsd(L.OPEN_FLAGS["O_NOATIME"] | L.OPEN_FLAGS["O_LARGEFILE"],
                       LossLog(strict=True), "fd/3", "REG")
    assert "fd/3" in str(e.value)
    # a pipe never has O_LARGEFILE: nothing lost, nothing added back
    assert F.open_to_linux(F.open_to_fbsd(1, LossLog(True), "p", "PIPE"), LossLog(True), "p",
                           "PIPE") == 1


@given(st.lists(st.sampled_from([L.MAP_FLAGS[l] for l, _ in F.MAP_ROWS]), unique=True))
def test_map_flags_round_trip(bits):
    log = LossLog(strict=True)
    assert F.map_to_linux(F.map_to_fbsd(sum(bits), log, "m"), log, "m") == sum(bits)


def test_map_collisions_are_lossy():
    log = LossLog()
    assert F.map_to_fbsd(L.MAP_FLAGS["MAP_PRIVATE"] | L.MAP_FLAGS["MAP_NORESERVE"], log, "m") \
        == F.FBSD_MAP["MAP_PRIVATE"]           # 0x4000 must not become FreeBSD MAP_EXCL
    assert "MAP_NORESERVE" in log.records[0].reason


@given(st.lists(st.sampled_from([lv for _, lv, fv in F.MADV_ROWS if lv is not None and fv
                                 is not None]), unique=True))
def test_madvise_round_trip(advs):
    bits = sum(1 << a for a in advs)
    log = LossLog(strict=True)
    assert F.madv_to_linux(F.madv_to_fbsd(bits, log, "m"), log, "m") == bits


@given(st.integers(1, 64).filter(lambda s: s != L.SIGNALS["SIGSTKFLT"]))
def test_signal_numbers_invert(sig):
    assert F.sig_to_linux(F.sig_to_fbsd(sig)) == sig
    assert F.fbsd_signum(F.fbsd_signame(F.sig_to_fbsd(sig))) == F.sig_to_fbsd(sig)


@given(st.integers(0, (1 << 64) - 1))
def test_sigset_round_trip(mask):
    stkflt = 1 << (L.SIGNALS["SIGSTKFLT"] - 1)
    words = F.sigset_to_fbsd(mask, LossLog(), "m")
    assert len(words) == 4 and all(0 <= w < 1 << 32 for w in words)
    back = F.sigset_to_linux(words)
    if mask & stkflt:       # STKFLT comes back as SIGBUS: the one lossy signal
        assert back == (mask & ~stkflt) | (1 << (L.SIGNALS["SIGBUS"] - 1))
    else:
        assert back == mask


def test_sigset_layout():
    # Linux SIGUSR1 (10) is FreeBSD 30: bit 29 of word 0; Linux SIGRTMIN (32) is FreeBSD 65:
    # bit 0 of word 2.
    assert F.sigset_to_fbsd(1 << 9) == (1 << 29, 0, 0, 0)
    assert F.sigset_to_fbsd(1 << 31) == (0, 0, 1, 0)
    assert F.sigset_to_fbsd(1 << 29) == (0, 0, 0, 1 << 1)        # SIGPWR -> 98


@given(st.lists(st.sampled_from(list(F.FBSD_SA)), unique=True), st.booleans())
def test_sa_flags_round_trip(names, restorer):
    lin = sum(L.SA_FLAGS[n] for n in names) | (L.SA_FLAGS["SA_RESTORER"] if restorer else 0)
    log = LossLog(strict=True)
    assert F.sa_to_linux(F.sa_to_fbsd(lin, log, "s"), 0x1000 if restorer else 0, log, "s") == lin


@given(st.sampled_from(sorted(F.LINUX_ERRNO_NAMES)))
def test_errno_exact_mappings_invert(num):
    fb, exact = F.errno_to_fbsd(num)
    if exact:
        assert F.errno_to_linux(fb) == (num, True)


U64 = st.integers(0, (1 << 64) - 1)


@given(st.fixed_dictionaries({n: U64 for n in G.LINUX_NAMES}))
def test_regs_round_trip_is_equivalent(linux):
    log = LossLog()
    reg, fsb, gsb = G.to_fbsd(linux, log, "r")
    assert list(reg) == list(G.REG_NAMES)
    assert G.unpack(G.pack(reg)) == reg
    back = G.to_linux(reg, fsb, gsb, LossLog(), "r")
    assert back == G.equivalent_linux(linux)


def test_syscall_restart_resolved():
    base = {n: 0 for n in G.LINUX_NAMES}
    base.update(cs=0x33, ss=0x2b, eflags=0x246, rip=0x401002, orig_rax=35,
                rax=(-514) & G.U64)                     # nanosleep, -ERESTARTNOHAND
    log = LossLog(strict=True)
    reg, _, _ = G.to_fbsd(base, log, "r")
    assert (reg["r_rax"], reg["r_rip"], reg["r_cs"], reg["r_ss"]) == (35, 0x401000, 0x43, 0x3b)
    back = G.to_linux(reg, 0, 0, log, "r")
    assert back["orig_rax"] == G.NOT_IN_SYSCALL and back["rax"] == 35 and back["cs"] == 0x33
    block = dict(base, rax=(-516) & G.U64)
    with pytest.raises(Unsupported):
        G.to_fbsd(block, LossLog(strict=True), "r")
    done = dict(base, rax=0)                            # syscall finished: nothing to redo
    assert G.to_fbsd(done, LossLog(True), "r")[0]["r_rip"] == 0x401002


@settings(max_examples=30)
@given(st.binary(min_size=64, max_size=64), st.integers(0, 7))
def test_xsave_round_trip(ymm, bv):
    size = 832
    linux = bytearray(size)
    linux[0:2] = b"\x7f\x03"
    struct.pack_into("<Q", linux, 512, bv)
    linux[576:640] = ymm
    mask = 0x7
    linux = fpu.to_linux(bytes(linux), mask)            # Linux's own sw bytes in 464..511
    assert fpu.linux_xfeatures(linux) == mask
    fb = fpu.to_fbsd(linux, LossLog(strict=True), "fpu", target_mask=mask, target_len=size)
    assert fb[464:512] == bytes(48) and fb[:464] == linux[:464] and fb[512:] == linux[512:]
    assert fpu.to_linux(fb, mask) == linux
    assert fpu.fpreg(fb) == fb[:512]


def test_xsave_lossy_on_smaller_cpu():
    buf = bytearray(1088)
    struct.pack_into("<Q", buf, 512, 0xe7)              # AVX-512 state present
    buf[1000] = 1
    log = LossLog()
    out = fpu.to_fbsd(bytes(buf), log, "fpu", target_mask=0x7, target_len=832)
    assert len(out) == 832 and fpu.header(out)[0] == 0x7 and len(log.records) == 2
    struct.pack_into("<Q", buf, 520, 1 << 63)
    with pytest.raises(Unsupported):
        fpu.to_fbsd(bytes(buf), LossLog(), "fpu")
    assert fpu.unpack_xstate_info(fpu.pack_xstate_info(0x2e7, 2696)) == (0x2e7, 2696)
    assert len(fpu.pack_xstate_info(1, 2)) == 16
