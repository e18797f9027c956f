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


def _keep_handler_on_top():
    """faulthandler.enable() after an arena exists would put faulthandler in
    front of the core's SIGSEGV handler, and the next copy-on-write fault would
    be reported as a crash.  Re-take the front after it (chaining to it)."""
    import faulthandler
    import functools

    enable = faulthandler.enable
    if getattr(enable, "_odfork_wrapped", False):
        return

    @functools.wraps(enable)
    def enable_then_chain(*args, **kwargs):
        result = enable(*args, **kwargs)
        lib.odf_handler_ensure()
        return result

    enable_then_chain._odfork_wrapped = True
    faulthandler.enable = enable_then_chain


_keep_handler_on_top()
