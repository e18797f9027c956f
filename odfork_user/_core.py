"""Loads the C core; the only module that imports odfork_user._ffi."""
import sys

if not sys.platform.startswith("linux"):
    raise ImportError("odfork_user needs Linux (memfd, mremap, SIGSEGV write faults)")

try:
    from odfork_user._ffi import ffi, lib  # noqa: F401
except ImportError as exc:  # pragma: no cover - build problem
    raise ImportError(
        "odfork_user's C core is not built: install with `pip install .` "
        "or build in place with `python odfork_user/_ffi_build.py`"
    ) from exc

CHUNK_SIZE = lib.ODF_CHUNK_SIZE
