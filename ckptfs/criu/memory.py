"""Memory of an export: pagemap-<pid>.img, pagemap-shmem-<shmid>.img and their pages-N.img.

A pagemap lists runs of pages (PE_PRESENT, count in both the old and the 4.2 field); the
pages file holds their contents back to back, copied from the source COPY_CHUNK bytes at a
time so a 1 GiB process never sits in our memory. Private pages go to the task's pagemap;
pages of shared objects (shared anonymous, memfd) go once per object to a shmem pagemap whose
"addresses" are offsets in the object, whichever task's map they were read through.
"""
from __future__ import annotations

import os

from .. import pb
from ..errors import BadImage
from ..flags import VMA_STATUS
from ..model import PAGE_SIZE
from .framing import PE_PRESENT

SHMEM = VMA_STATUS["VMA_ANON_SHARED"] | VMA_STATUS["VMA_AREA_MEMFD"]    # maps naming an object
MEMFD, FILE_SHARED = VMA_STATUS["VMA_AREA_MEMFD"], VMA_STATUS["VMA_FILE_SHARED"]


def is_shmem(status: int) -> bool:
    """Pages that live in a shared object's pagemap-shmem image: shared anonymous memory and
    shared memfd maps (a private memfd map's copied pages are the task's own)."""
    return bool(status & VMA_STATUS["VMA_ANON_SHARED"]) or \
        (status & MEMFD and status & FILE_SHARED) == MEMFD | FILE_SHARED
COPY_CHUNK = 1 << 20        # bytes of memory held at once while writing pages


def write_all(src, out: str, mms: dict, write_image) -> None:
    """Every task's pagemap (pages ids 1..N in task order), then one per shared object."""
    shmem: dict[int, dict] = {}
    for pages_id, (pid, mm) in enumerate(mms.items(), start=1):
        runs = task_runs(src, pid, mm, shmem, os.path.join(out, f"pagemap-{pid}.img"))
        write_pagemap(src, out, f"pagemap-{pid}.img", pages_id, runs, write_image)
    for pages_id, shmid in enumerate(sorted(shmem), start=len(mms) + 1):
        write_pagemap(src, out, f"pagemap-shmem-{shmid}.img", pages_id,
                      shmem_runs(shmem[shmid]), write_image)


def task_runs(src, pid: int, mm, shmem: dict, where: str) -> list:
    """Runs (vaddr, pid, source addr, pages) of the task's private pages; pages of shared
    objects are added to `shmem` (shmid -> {offset: (pid, addr)}) instead."""
    runs = []
    for vma in mm.vmas:
        for r in sorted(src.page_ranges(pid, vma), key=lambda r: r.start):
            _check_range(r, vma, where)
            if is_shmem(vma.status):
                pages = shmem.setdefault(vma.shmid, {})
                for addr in range(r.start, r.end, PAGE_SIZE):
                    pages.setdefault(vma.pgoff + addr - vma.start, (pid, addr))
            else:
                runs.append((r.start, pid, r.start, r.nr_pages))
    return runs


def shmem_runs(pages: dict) -> list:
    """Runs of object offsets whose source pages are also adjacent in one task."""
    runs = []
    for off in sorted(pages):
        pid, addr = pages[off]
        last = runs[-1] if runs else None
        if last and last[0] + last[3] * PAGE_SIZE == off and last[1] == pid \
                and last[2] + last[3] * PAGE_SIZE == addr:
            runs[-1] = (last[0], pid, last[2], last[3] + 1)
        else:
            runs.append((off, pid, addr, 1))
    return runs


def write_pagemap(src, out: str, name: str, pages_id: int, runs, write_image) -> None:
    """The pagemap `name` and pages-<pages_id>.img (renamed into place when complete)."""
    entries = [pb.pagemap_head(pages_id=pages_id)]
    pages_path = os.path.join(out, f"pages-{pages_id}.img")
    with open(pages_path + ".tmp", "wb") as pages:
        for vaddr, pid, addr, n in runs:
            entries.append(pb.pagemap_entry(vaddr=vaddr, compat_nr_pages=n,
                                            flags=PE_PRESENT, nr_pages=n))
            copy(src, pid, addr, addr + n * PAGE_SIZE, pages, pages_path)
    os.replace(pages_path + ".tmp", pages_path)
    write_image(name, "PAGEMAP", entries)


def copy(src, pid: int, start: int, end: int, out, where: str) -> None:
    for addr in range(start, end, COPY_CHUNK):
        size = min(COPY_CHUNK, end - addr)
        data = src.read_memory(pid, addr, size)
        if len(data) != size:
            raise BadImage(f"pid {pid}: read {len(data)} of {size} bytes at {addr:#x}",
                           path=where, step="export")
        out.write(data)


def _check_range(r, vma, where: str) -> None:
    if r.start % PAGE_SIZE or r.end % PAGE_SIZE or not vma.start <= r.start < r.end <= vma.end:
        raise BadImage(f"page range {r.start:#x}-{r.end:#x} outside or misaligned in VMA "
                       f"{vma.start:#x}-{vma.end:#x}", path=where, step="export")
