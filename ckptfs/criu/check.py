"""Does an image directory satisfy what CRIU 4.2's restore insists on?

criu-image-format.md §5.1/§5.2 as a list of rules, each a small function over an ImageSource
that yields problems (text naming the file and the value). `problems(dir)` runs them all;
`check(dir)` raises BadImage listing them. Used on our own exports in tests, and usable on
any directory before handing it to `criu restore`.
"""
from __future__ import annotations

import os

from ..errors import BadImage, CkptError
from ..flags import SIGACTION_SIGNALS, TASK_STATES, VMA_STATUS
from ..model import PAGE_SIZE
from .source import ImageSource, entry_flags, entry_pages
from .framing import PE_PRESENT

KOBJ_IDS = ("vm_id", "files_id", "fs_id", "sighand_id")
# Namespace kinds restore can create from images we know how to check.
NS_IMAGES = {"uts": "utsns-{}.img"}
FILE_MAP = VMA_STATUS["VMA_FILE_PRIVATE"] | VMA_STATUS["VMA_FILE_SHARED"]
NOT_FILE_MAP = VMA_STATUS["VMA_ANON_SHARED"] | VMA_STATUS["VMA_AREA_SYSVIPC"]


def live_pids(img: ImageSource) -> list[int]:
    """Tasks that are not zombies (a zombie has only its core image)."""
    return [pid for pid in img.pids()
            if img.core(pid).tc.task_state != TASK_STATES["dead"]]


def _inventory(img: ImageSource):
    inv = img.inventory()
    if inv.img_version != 2:
        yield f"inventory.img: img_version {inv.img_version}, restore wants 2"
    if not inv.fdinfo_per_id:
        yield "inventory.img: fdinfo_per_id unset (\"Too old image\")"
    if not inv.HasField("root_ids"):
        yield "inventory.img: no root_ids"
    root = img.ids(img.pstree()[0].pid)
    for f in KOBJ_IDS:
        if getattr(root, f) == getattr(inv.root_ids, f):
            yield f"ids-{img.pstree()[0].pid}.img: {f} {getattr(root, f)} equals root_ids.{f}"
    for kind in ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time"):
        field = f"{kind}_ns_id"
        if root.HasField(field) and getattr(root, field) != getattr(inv.root_ids, field):
            name = NS_IMAGES.get(kind, "").format(getattr(root, field))
            if not name or not os.path.exists(img.path(name)):
                yield (f"ids-{img.pstree()[0].pid}.img: own {kind} namespace "
                       f"{getattr(root, field)} but no image to create it from")


def _cores(img: ImageSource):
    live = set(live_pids(img))
    for pid, threads in img.tasks():
        if pid not in threads:
            yield f"pstree.img: task {pid} is not among its own threads {threads}"
        if pid not in live:
            continue
        for tid in threads:
            core = img.core(tid)
            name = f"core-{tid}.img"
            if (tid == pid) != core.HasField("tc"):
                yield f"{name}: tc {'missing in leader' if tid == pid else 'in a non-leader'}"
            if not core.thread_core.HasField("creds"):
                yield f"{name}: no thread_core.creds"
            if tid == pid and core.HasField("tc"):
                yield from _tc(core.tc, name)


def _tc(tc, name):
    if not tc.HasField("timers"):
        yield f"{name}: no tc.timers"
    if not tc.HasField("rlimits"):
        yield f"{name}: no tc.rlimits"
    if len(tc.sigactions) != len(SIGACTION_SIGNALS):
        yield f"{name}: {len(tc.sigactions)} sigactions, want {len(SIGACTION_SIGNALS)}"


def _files(img: ImageSource):
    for pid in live_pids(img):
        mm, fs = img.mm(pid), img.fs(pid)
        refs = [("mm exe_file_id", mm.exe_file_id), ("fs cwd_id", fs.cwd_id),
                ("fs root_id", fs.root_id)]
        refs += [(f"fd {fd.fd}", fd.id) for fd in img.fdinfo(pid)]
        refs += [(f"vma {v.start:#x} shmid", v.shmid) for v in mm.vmas
                 if v.status & FILE_MAP and not v.status & NOT_FILE_MAP]
        for what, fid in refs:
            try:
                img.file(fid)
            except BadImage:
                yield f"files.img: no entry {fid} for task {pid} {what}"


def _memory(img: ImageSource):
    for pid in live_pids(img):
        vmas = img.mm(pid).vmas
        if [v.start for v in vmas] != sorted(v.start for v in vmas):
            yield f"mm-{pid}.img: VMAs not in ascending order"
        msgs, _ = img.image(f"pagemap-{pid}.img", "PAGEMAP", required=False)
        yield from _pagemap(img, f"pagemap-{pid}.img", msgs, vmas)


def _pagemap(img, name, msgs, vmas):
    if not msgs:
        return
    present, last_end = 0, 0
    for e in msgs[1:]:
        n = entry_pages(e)
        end = e.vaddr + n * PAGE_SIZE
        if e.vaddr < last_end:
            yield f"{name}: entry {e.vaddr:#x} overlaps or goes backwards"
        if not _spans(vmas, e.vaddr, end):
            yield f"{name}: entry {e.vaddr:#x}+{n} pages is outside every VMA"
        last_end = end
        present += n if entry_flags(e) & PE_PRESENT else 0
    pages = img.path(f"pages-{msgs[0].pages_id}.img")
    size = os.path.getsize(pages) if os.path.exists(pages) else 0
    if size != present * PAGE_SIZE:
        yield f"{os.path.basename(pages)}: {size} bytes, pagemap wants {present * PAGE_SIZE}"


def _spans(vmas, start, end) -> bool:
    """[start, end) lies in one VMA or in adjacent ones (CRIU may merge pages across a
    boundary)."""
    pos = start
    for v in vmas:
        if v.start <= pos < v.end:
            pos = v.end
    return pos >= end


def _cgroups(img: ImageSource):
    inv = img.inventory()
    entries, _ = img.image("cgroup.img", "CGROUP", required=False)
    known = {s.id for e in entries for s in e.sets} | (
        {inv.root_cg_set} if inv.HasField("root_cg_set") else set())
    for pid, threads in img.tasks():
        for tid in threads:
            core = img.core(tid)
            for holder in (core.thread_core, core.tc):
                if holder.HasField("cg_set") and holder.cg_set not in known:
                    yield f"core-{tid}.img: cg_set {holder.cg_set}: \"No set found\""


RULES = [_inventory, _cores, _files, _memory, _cgroups]


def problems(directory) -> list[str]:
    """Every violation found (empty: restore should accept the directory's structure)."""
    img = ImageSource(directory)
    out = []
    try:
        for rule in RULES:
            try:
                out.extend(rule(img))
            except CkptError as e:     # an unreadable image is itself a problem to report
                out.append(str(e))
    finally:
        img.close()
    return out


def check(directory) -> None:
    found = problems(directory)
    if found:
        raise BadImage("not restorable: " + "; ".join(found), path=os.fspath(directory),
                       step="check images")
