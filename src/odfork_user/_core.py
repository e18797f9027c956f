"""Loads the C core; the only module that imports odfork_user._ffi."""

import errno
import os
import sys
import threading

if not sys.platform.startswith("linux"):
    raise ImportError("odfork_user needs Linux (memfd, mremap, SIGSEGV write faults)")

try:
    from odfork_user._ffi import ffi, lib  # noqa: F401
except ImportError as exc:  # pragma: no cover - build problem
    raise ImportError(
        "odfork_user's C core is not built: install with `pip install .` "
        "or build in place with `python src/odfork_user/_ffi_build.py`"
    ) from exc

from odfork_user._errors import OdforkOSError, OdforkValueError  # noqa: E402 (after the core loaded)

CHUNK_SIZE = lib.ODF_CHUNK_SIZE


def _call_then(module, name, after):
    """Replace module.name by a function that calls it, then after(*args),
    and returns its result; once per process."""
    import functools

    fn = getattr(module, name)
    if getattr(fn, "_odfork_wrapped", False):
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        after(*args)
        return result

    wrapper._odfork_wrapped = True
    setattr(module, name, wrapper)


def _keep_handler_on_top():
    """faulthandler.enable() or signal.signal(SIGSEGV, ...) after an arena
    exists would put another handler in front of the core's SIGSEGV handler,
    and the next copy-on-write fault would be reported as a crash (or, with
    Python's own handler, which only sets a flag and returns, retried for
    ever).  Re-take the front after either (chaining to what they installed)."""
    import faulthandler
    import signal

    _call_then(faulthandler, "enable", lambda *args: lib.odf_handler_ensure())
    _call_then(signal, "signal", lambda signalnum, *rest: signalnum == signal.SIGSEGV and lib.odf_handler_ensure())


# -- folds: how writers of a view being folded are held off ------------------

USERFAULTFD_ENV = "ODFORK_USERFAULTFD"


def _choose_fold_protect():
    """Pick how folds hold writers off; returns (mechanism, reason).
    ODFORK_USERFAULTFD: auto (default), 1 (required: OdforkOSError if
    unavailable), 0 (never: PROT_READ)."""
    want = os.environ.get(USERFAULTFD_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "1", "0"):
        raise OdforkValueError(f"{USERFAULTFD_ENV}={want!r}: expected auto, 1 or 0")
    if want == "0":
        return "mprotect", f"{USERFAULTFD_ENV}=0"
    rc = lib.odf_uffd_enable(1)
    if rc == 0:
        return "userfaultfd", "a full userfaultfd is available"
    why = {
        errno.EPERM: "no privilege for a userfaultfd that sees kernel-mode faults",
        errno.EOPNOTSUPP: "the kernel lacks userfaultfd write-protect on shmem",
        errno.ENOSYS: "the kernel has no userfaultfd",
    }.get(rc, os.strerror(rc))
    if want == "1":
        raise OdforkOSError(rc, f"{USERFAULTFD_ENV}=1, but userfaultfd cannot be used: {why}")
    return "mprotect", why


_prepared = None
_prepare_lock = threading.Lock()


def prepare_process():
    """What the first arena of a process needs, done once, not at import:
    the fold protection chosen (ODFORK_USERFAULTFD; probing userfaultfd), and
    faulthandler.enable / signal.signal wrapped so that the core's SIGSEGV
    handler stays in front.  Returns (FOLD_PROTECT, FOLD_PROTECT_REASON).
    Raises OdforkValueError for a bad ODFORK_USERFAULTFD, OdforkOSError when
    it is 1 and userfaultfd cannot be used."""
    global _prepared
    with _prepare_lock:
        if _prepared is None:
            choice = _choose_fold_protect()
            _keep_handler_on_top()
            _prepared = choice
        return _prepared


# -- kernel writes into chunk-mode arenas -------------------------------------

_EFAULT_NOTE = (
    "odfork_user: EFAULT ('Bad address') here is most likely a system call writing into memory "
    "of an Arena(cow='chunk') that is still shared after a fork: in chunk mode shared chunks are "
    "read-only and a write the kernel makes cannot be trapped.  Remedy: call "
    "arena.prepare_write(view) on the buffer before the call, or use the default page mode, "
    "where kernel writes just work."
)
_chunk_mode_used = False


def explain_efault(exc):
    """Add a note naming the cause and the remedy to an OSError(EFAULT) when
    this process has a chunk-mode arena.  Returns exc."""
    if (
        _chunk_mode_used
        and isinstance(exc, OSError)
        and exc.errno == errno.EFAULT
        and not any(n.startswith("odfork_user:") for n in getattr(exc, "__notes__", ()))
    ):
        exc.add_note(_EFAULT_NOTE)
    return exc


def _chunk_mode_created():
    """A chunk-mode arena exists: uncaught EFAULT errors (main thread and
    threads) carry the note from now on."""
    global _chunk_mode_used
    _chunk_mode_used = True
    if getattr(sys.excepthook, "_odfork_wrapped", False):
        return
    prev_sys, prev_thr = sys.excepthook, threading.excepthook

    def sys_hook(tp, value, tb):
        explain_efault(value)
        prev_sys(tp, value, tb)

    def thr_hook(args):
        explain_efault(args.exc_value)
        prev_thr(args)

    sys_hook._odfork_wrapped = thr_hook._odfork_wrapped = True
    sys.excepthook, threading.excepthook = sys_hook, thr_hook
