"""odfork(): fork(2) with every arena shared on demand."""

import os
import warnings

from odfork_user import _folder
from odfork_user._core import lib
from odfork_user._errors import _check


def odfork() -> int:
    """Fork the process; arenas are shared chunk by chunk and copied on first write.

    Returns:
        0 in the child, the child's pid in the parent (like os.fork()).

    Raises:
        OSError: no family slot is free (EAGAIN) or fork(2) failed; every
            reference count is then as it was.

    os.fork() gets the same isolation (the core's pthread_atfork handlers run on
    every fork); odfork() adds the checks that can still fail before the fork,
    and records the child's pid so that its death is noticed at once.
    """
    lib.odf_handler_ensure()
    _check(lib.odf_fork_check(), "odfork: no room for another process in an arena family")
    try:
        pid = os.fork()
    except OSError:
        lib.odf_fork_abort()
        raise
    if pid:
        _folder.after_odfork()  # stopped before the fork, so that the fork does not see it
        lib.odf_fork_note_child(pid)
        err = lib.odf_fork_last_error()
        if err:
            warnings.warn(
                f"odfork: the child lost its arenas ({os.strerror(err)}); it will crash on arena access",
                RuntimeWarning,
                stacklevel=2,
            )
    return pid
