"""odfork_user: on-demand fork in user space.

Implementation is in submodules, but the public API is all here (see API.md).
Names are imported on first use (PEP 562): `import odfork_user` loads no C
core, so that the pytest plugin (an entry point pytest imports in every run)
costs nothing in a run that does not use it.  The exceptions are plain Python
and imported at once.

PYTEST_DONT_REWRITE: pytest marks this distribution's package for assertion
rewriting (it holds the pytest plugin), and would warn that it cannot when the
package is imported before pytest starts, as `python -m odfork_user run -m
pytest` does.  Nothing here relies on rewritten asserts.
"""

import importlib
from typing import TYPE_CHECKING, Any

from odfork_user._errors import (
    ChildError,
    CorruptionError,
    OdforkBufferError,
    OdforkError,
    OdforkMemoryError,
    OdforkOSError,
    OdforkTimeoutError,
    OdforkTypeError,
    OdforkValueError,
    RemoteTraceback,
)

if TYPE_CHECKING:  # what the names below resolve to, for type checkers
    from odfork_user._forking import odfork
    from odfork_user.arena import Arena, default_arena
    from odfork_user.process import Child, spawn
    from odfork_user.pyheap import heap_stats, install, installed, installing, uninstall
    from odfork_user.snapshot import Snapshot

    CHUNK_SIZE: int  # 2 MiB
    FOLD_PROTECT: str  # "userfaultfd" or "mprotect"

    def explain_efault(exc: BaseException) -> BaseException: ...


__all__ = [
    "Arena",
    "default_arena",
    "odfork",
    "spawn",
    "Child",
    "Snapshot",
    "OdforkError",
    "OdforkMemoryError",
    "OdforkValueError",
    "OdforkTypeError",
    "OdforkBufferError",
    "OdforkOSError",
    "OdforkTimeoutError",
    "CorruptionError",
    "ChildError",
    "RemoteTraceback",
    "CHUNK_SIZE",
    "FOLD_PROTECT",
    "explain_efault",
    "install",
    "uninstall",
    "installed",
    "installing",
    "heap_stats",
]
__version__ = "0.1.0"  # the only place the version is written (pyproject reads it)

_LAZY = {
    "CHUNK_SIZE": "_core",
    "explain_efault": "_core",
    "Arena": "arena",
    "default_arena": "arena",
    "odfork": "_forking",
    "Child": "process",
    "spawn": "process",
    "Snapshot": "snapshot",
    "heap_stats": "pyheap",
    "install": "pyheap",
    "installed": "pyheap",
    "installing": "pyheap",
    "uninstall": "pyheap",
}


def __getattr__(name: str) -> Any:
    # FOLD_PROTECT is known once the process is prepared for arenas (probing
    # userfaultfd): at the first Arena, or here, on first use; not at import
    if name == "FOLD_PROTECT":
        from odfork_user._core import prepare_process

        return prepare_process()[0]
    if name in _LAZY:
        value = getattr(importlib.import_module(f"odfork_user.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'odfork_user' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
