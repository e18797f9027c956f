"""odfork_user: on-demand fork in user space.

Implementation is in submodules, but the public API is all here (see API.md).

PYTEST_DONT_REWRITE: pytest marks this distribution's package for assertion
rewriting (it holds the pytest plugin), and would warn that it cannot when the
package is imported before pytest starts, as `python -m odfork_user run -m
pytest` does.  Nothing here relies on rewritten asserts.
"""
from odfork_user._errors import (ChildError, CorruptionError, OdforkBufferError, OdforkError, OdforkMemoryError,
                                 OdforkOSError, OdforkTimeoutError, OdforkTypeError, OdforkValueError,
                                 RemoteTraceback)
from odfork_user._core import CHUNK_SIZE, explain_efault
from odfork_user.arena import Arena, default_arena
from odfork_user._forking import odfork
from odfork_user.process import Child, spawn
from odfork_user.snapshot import Snapshot
from odfork_user.pyheap import heap_stats, install, installed, installing, uninstall

__all__ = ["Arena", "default_arena", "odfork", "spawn", "Child", "Snapshot", "OdforkError", "OdforkMemoryError",
           "OdforkValueError", "OdforkTypeError", "OdforkBufferError", "OdforkOSError", "OdforkTimeoutError", "CorruptionError",
           "ChildError", "RemoteTraceback", "CHUNK_SIZE",
           "FOLD_PROTECT", "explain_efault", "install", "uninstall", "installed", "installing",
           "heap_stats"]
__version__ = "0.1.0"  # the only place the version is written (pyproject reads it)


def __getattr__(name):
    # FOLD_PROTECT is known once the process is prepared for arenas (probing
    # userfaultfd): at the first Arena, or here, on first use; not at import
    if name == "FOLD_PROTECT":
        from odfork_user._core import prepare_process
        return prepare_process()[0]
    raise AttributeError(f"module 'odfork_user' has no attribute {name!r}")
