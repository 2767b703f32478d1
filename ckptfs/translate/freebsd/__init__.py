"""FreeBSD personality: Linux/CRIU checkpoint values <-> what a FreeBSD (amd64) restore applies.

    to_freebsd(source, strict=False) -> FreeBSDPlan     (convert.py)
    from_freebsd(plan, strict=False) -> LinuxValues      (convert.py)
    write_plan(plan, dir) / read_plan(dir)               (plan.py: the editable dry-run files)
    plan_dry_run(source, outdir, strict=False) -> DryRun (what `restore --os freebsd --dry-run`
        does: write outdir/plan, or check the one there with its edits); dry_run: its .root
    apply_linux(source, values) -> Source                (apply.py: the values back on a checkpoint)
    check_plan(source, plan_dir) -> Source               (an edited plan checked and applied)
    through_freebsd(source, workdir, edit=None) -> Source   (the whole Linux -> FreeBSD -> Linux trip)

Tables: flags.py (open/fcntl/mmap/madvise/signals/SA_/sigset/errno), regs.py (struct reg,
syscall restart), fpu.py (XSAVE), jail.py (namespaces <-> jail), rctl.py (cgroups <-> RCTL).
"""
import dataclasses
import os

from .convert import FreeBSDPlan, LinuxValues, from_freebsd, to_freebsd  # noqa: F401
from .plan import read_plan, write_plan  # noqa: F401
from .apply import AppliedSource, apply_linux, check_plan, through_freebsd  # noqa: F401


@dataclasses.dataclass
class DryRun:
    """What a dry run did: `root` the plan directory; `fresh` True if it was just written from
    the checkpoint, False if a plan already there (perhaps edited) was checked and kept;
    `lossy` every approximation (the plan's own and any its edits add)."""
    root: str
    fresh: bool
    lossy: list
    refused: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        n = len(self.lossy)
        if self.fresh:
            text = (f"FreeBSD plan written to {self.root}: {n} approximation(s) listed in "
                    "plan/lossy; edit the files and run again to check the edits")
            if self.refused:
                first = self.refused[0]
                text += (f"; {len(self.refused)} thing(s) a FreeBSD restore refuses, listed "
                         f"in plan/refused (first: {first.path}: {first.reason})")
            return text
        text = f"FreeBSD plan in {self.root} checked with its edits: {n} approximation(s)"
        if self.refused:
            first = self.refused[0]
            text += (f"; a FreeBSD restore refuses {len(self.refused)} thing(s) (first: "
                     f"{first.path}: {first.reason})")
        return text


def plan_dry_run(source, outdir: str, strict: bool = False) -> DryRun:
    """`restore --os freebsd --dry-run`: the first run writes outdir/plan from the checkpoint;
    later runs keep that plan (the user's edits) and check it against the checkpoint, raising
    BadTree/Unsupported that names the plan file and the value. Remove outdir/plan to start
    over."""
    root = os.path.join(outdir, "plan")
    if os.path.isdir(root):
        from .. import LossLog
        from .convert import refusals
        refused = refusals(source, source.pids(), LossLog())
        return DryRun(root, False, check_plan(source, root, strict=strict).lossy, refused)
    plan = to_freebsd(source, strict=strict)
    return DryRun(write_plan(plan, outdir), True, list(plan.lossy), list(plan.refused))


def dry_run(source, outdir: str, strict: bool = False) -> str:
    """plan_dry_run, returning only the plan directory."""
    return plan_dry_run(source, outdir, strict).root
