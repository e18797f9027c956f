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


# -- kernel writes: userfaultfd, or the signal path with an explained EFAULT --

KERNEL_WRITES_ENV = "ODFORK_KERNEL_WRITES"
_EFAULT_NOTE = (
    "odfork_user: EFAULT ('Bad address') here is most likely a system call writing into arena "
    "memory that is still shared after a fork: without userfaultfd ({why}) such kernel writes "
    "cannot be trapped.  Remedy: call arena.prepare_write(view) on the buffer before the call, "
    "or give the process a full userfaultfd (run as root or with CAP_SYS_PTRACE, read-write "
    "access to /dev/userfaultfd, or sysctl vm.unprivileged_userfaultfd=1) and do not set "
    f"{KERNEL_WRITES_ENV}=signal."
)


def _choose_kernel_writes():
    """Pick how arenas created in this process take kernel writes; returns
    (mechanism, reason).  ODFORK_KERNEL_WRITES: auto (default), userfaultfd
    (required: ImportError if unavailable), signal (forced fallback)."""
    want = os.environ.get(KERNEL_WRITES_ENV, "auto").strip().lower() or "auto"
    if want not in ("auto", "userfaultfd", "signal"):
        raise ImportError(f"{KERNEL_WRITES_ENV}={want!r}: expected auto, userfaultfd or signal")
    if want == "signal":
        return "signal", f"{KERNEL_WRITES_ENV}=signal"
    rc = lib.odf_uffd_probe()
    if rc == 0:
        rc = lib.odf_uffd_enable(1)
    if rc == 0:
        return "userfaultfd", "a full userfaultfd is available"
    why = {errno.EPERM: "no privilege for a userfaultfd that sees kernel-mode faults",
           errno.EOPNOTSUPP: "the kernel lacks userfaultfd minor/write-protect faults on shmem",
           errno.ENOSYS: "the kernel has no userfaultfd"}.get(rc, os.strerror(rc))
    if want == "userfaultfd":
        raise ImportError(f"{KERNEL_WRITES_ENV}=userfaultfd, but it cannot be used: {why}")
    return "signal", why


KERNEL_WRITES, KERNEL_WRITES_REASON = _choose_kernel_writes()


def explain_efault(exc):
    """Add a note naming the cause and the remedy to an OSError(EFAULT) when
    kernel writes into shared arena chunks cannot be trapped.  Returns exc."""
    if (KERNEL_WRITES == "signal" and isinstance(exc, OSError) and exc.errno == errno.EFAULT
            and not any(n.startswith("odfork_user:") for n in getattr(exc, "__notes__", ()))):
        exc.add_note(_EFAULT_NOTE.format(why=KERNEL_WRITES_REASON))
    return exc


def _install_efault_hooks():
    """In the fallback, uncaught EFAULT errors (main thread and threads) carry the note."""
    if KERNEL_WRITES != "signal" or getattr(sys.excepthook, "_odfork_wrapped", False):
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


_install_efault_hooks()
