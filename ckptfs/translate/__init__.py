"""Translators from the canonical (Linux/CRIU) form of a checkpoint to other OSes and back.

Each target OS is a subpackage (`translate.freebsd`). They are pure functions on plain data:
no system calls. What has no exact counterpart on the other side is never dropped silently:
it becomes a `Lossy` record, or, in strict mode, an `errors.Unsupported`.
"""
from __future__ import annotations

import dataclasses
import os

from ..errors import Unsupported


@dataclasses.dataclass(frozen=True)
class Lossy:
    """One value that does not survive the translation exactly.

    `path` names the value in tree vocabulary (e.g. `tasks/42/fds/3/flags`), `value` is the
    source value as text, `reason` says what is lost and why."""
    path: str
    value: str
    reason: str

    def line(self) -> str:
        return f"{self.path}\t{self.value}\t{self.reason}"


class LossLog:
    """Collects Lossy records; in strict mode the first one raises Unsupported instead."""

    def __init__(self, strict: bool = False, step: str = "translate"):
        self.strict, self.step = strict, step
        self.records: list[Lossy] = []

    def note(self, path: str, value, reason: str) -> None:
        rec = Lossy(path, str(value), reason)
        if self.strict:
            raise Unsupported(f"{rec.value}: {reason} (strict mode)", path=path, step=self.step)
        if rec not in self.records:
            self.records.append(rec)


def check_binary_os(source, here: str = "linux") -> None:
    """Refuse a checkpoint whose program is a native binary of another OS (model.Meta.binary_os,
    the manifest's `source.binary_os`): only Linux binaries move between Linux and FreeBSD (the
    Linuxulator runs them there); a FreeBSD binary cannot run on Linux. Raises Unsupported
    naming the manifest and the value; a tree without the field is a Linux one."""
    value = source.meta().binary_os or "linux"
    if value in (here, "linux"):
        return
    root = getattr(source, "root", None)
    path = os.path.join(root, "manifest") if isinstance(root, str) else "manifest"
    raise Unsupported(f'"binary_os": "{value}": the checkpoint is a native {value} program; '
                      f"it cannot run on {here} (only Linux binaries move, and only to "
                      "FreeBSD's Linux emulation and back)", path=path, step=f"restore on {here}")
