"""Exceptions, and the one place where C error codes become Python exceptions."""

import errno
import os


class OdforkError(Exception):
    """Base class of every exception odfork_user raises: `except OdforkError`
    catches every failure of the library.  Each subclass also inherits the
    builtin it resembles, so `except MemoryError` (ValueError, ...) keeps working."""


class OdforkMemoryError(OdforkError, MemoryError):
    """No room: the arena, its pool, or the process's arena table is full."""


class OdforkValueError(OdforkError, ValueError):
    """Bad input (a size, a shape, a buffer or snapshot of another arena, a closed object)."""


class OdforkTypeError(OdforkError, TypeError):
    """An argument of the wrong type."""


class OdforkBufferError(OdforkError, BufferError):
    """An arena or snapshot cannot be closed while views of it are alive."""


class OdforkTimeoutError(OdforkError, TimeoutError):
    """A wait (Child.result(timeout=...)) ran out of time."""


class OdforkOSError(OdforkError, OSError):
    """A system call of the core failed (errno and strerror as OSError has them)."""


class CorruptionError(OdforkError, AssertionError):
    """Arena.check() found the family-wide invariants broken."""


class RemoteTraceback(Exception):
    """The __cause__ of an exception re-raised from a child: its str() is the
    child's traceback, so that the parent's traceback shows where it happened."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class ChildError(OdforkError):
    """A spawned child failed where its own exception cannot be re-raised: it
    raised one that cannot be pickled (or a BaseException that is not an
    Exception), its result could not be pickled, or it died without a result.

    Attributes:
        exitcode: the child's exit code (-N if killed by signal N), or None.
        remote_traceback: the child's traceback text, if it raised.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.remote_traceback = remote_traceback


def _check(rc, what):
    """Raise the exception that matches errno value `rc` (0 = success)."""
    if rc == 0:
        return
    text = f"{what}: {os.strerror(rc)}"
    if rc == errno.ENOMEM:
        raise OdforkMemoryError(text)
    if rc == errno.EINVAL:
        raise OdforkValueError(text)
    raise OdforkOSError(rc, text)
