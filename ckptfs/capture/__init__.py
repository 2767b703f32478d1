"""Capture: reading a live process tree (Linux: ptrace + procfs) as a model.Source."""
from .linux import AlreadyTraced, LiveSource, NotCapturable

__all__ = ["LiveSource", "AlreadyTraced", "NotCapturable"]
