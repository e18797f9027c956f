"""Exceptions, and the one place where C error codes become Python exceptions."""
import errno
import os


class OdforkError(Exception):
    """Base class of every exception odfork_user defines."""


class CorruptionError(OdforkError, AssertionError):
    """Arena.check() found the family-wide invariants broken."""


class ChildError(OdforkError):
    """A spawned child failed: it raised, its result could not be pickled, or it was killed.

    Attributes:
        exitcode: the child's exit code (-N if killed by signal N), or None.
        remote_traceback: the child's traceback text, if it raised.
    """

    def __init__(self, message, *, exitcode=None, remote_traceback=None):
        super().__init__(message)
        self.exitcode = exitcode
        self.remote_traceback = remote_traceback


def _check(rc, what):
    """Raise the exception that matches errno value `rc` (0 = success)."""
    if rc == 0:
        return
    text = f"{what}: {os.strerror(rc)}"
    if rc == errno.ENOMEM:
        raise MemoryError(text)
    if rc == errno.EINVAL:
        raise ValueError(text)
    raise OSError(rc, text)
