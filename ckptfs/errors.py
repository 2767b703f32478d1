"""One exception hierarchy for ckptfs; the FUSE boundary maps each class to one errno.

Every error says which step and which file it came from, and keeps the kernel's errno.
"""
import errno as _errno


class CkptError(Exception):
    """Base class. `errno` is what a FUSE request that hit this error answers."""
    errno = _errno.EIO

    def __init__(self, message: str, *, path: str | None = None, step: str | None = None,
                 err: int | None = None):
        self.path, self.step = path, step
        if err is not None:
            self.errno = err
        parts = [p for p in (step, path) if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)


class ProcessGone(CkptError):
    """The process (or thread) no longer exists, or its pid now names another process."""
    errno = _errno.ESRCH


class NotStopped(CkptError):
    """The operation needs a frozen tree (e.g. writing state of a running process)."""
    errno = _errno.EBUSY


class NoAccess(CkptError):
    """The caller may not see this process."""
    errno = _errno.EACCES


class BadTree(CkptError):
    """A tree (directory of files) is malformed or incomplete: names the file and the value."""
    errno = _errno.EINVAL


class BadImage(CkptError):
    """A CRIU image file is malformed (bad magic, truncated entry, undecodable message)."""
    errno = _errno.EINVAL


class Unsupported(CkptError):
    """A kernel object or value that ckptfs cannot capture, translate or restore (yet)."""
    errno = _errno.EOPNOTSUPP


class KernelError(CkptError):
    """A system call failed; keeps its errno."""

    def __init__(self, message: str, err: int, **kw):
        super().__init__(f"{message}: [{_errno.errorcode.get(err, err)}] {__import__('os').strerror(err)}",
                         err=err, **kw)


class RestoreFailed(CkptError):
    """A restore step failed; everything it created has been cleaned up."""
    errno = _errno.EIO
