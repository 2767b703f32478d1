"""FreeBSD personality: Linux/CRIU checkpoint values <-> what a FreeBSD (amd64) restore applies.

    to_freebsd(source, strict=False) -> FreeBSDPlan     (convert.py)
    from_freebsd(plan, strict=False) -> LinuxValues      (convert.py)
    write_plan(plan, dir) / read_plan(dir)               (plan.py: the editable dry-run files)
    dry_run(source, outdir, strict=False) -> plan dir    (what `restore --os freebsd --dry-run` does)
    apply_linux(source, values) -> Source                (apply.py: the values back on a checkpoint)
    through_freebsd(source, workdir, edit=None) -> Source   (the whole Linux -> FreeBSD -> Linux trip)

Tables: flags.py (open/fcntl/mmap/madvise/signals/SA_/sigset/errno), regs.py (struct reg,
syscall restart), fpu.py (XSAVE), jail.py (namespaces <-> jail), rctl.py (cgroups <-> RCTL).
"""
from .convert import FreeBSDPlan, LinuxValues, from_freebsd, to_freebsd  # noqa: F401
from .plan import read_plan, write_plan  # noqa: F401
from .apply import AppliedSource, apply_linux, through_freebsd  # noqa: F401,E402


def dry_run(source, outdir: str, strict: bool = False) -> str:
    """Translate `source` and write the plan under outdir/plan; returns the plan directory."""
    return write_plan(to_freebsd(source, strict=strict), outdir)
