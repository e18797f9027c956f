"""When the folder runs: the thread that folds the views of page-mode arenas
back into their segments once nobody else shares them (csrc/core/folder.c).

Why: after a fork every chunk is a private view; pages written since then are
private memory that the next fork copies entry by entry (as os.fork would) and
that a snapshot must fold under the arena's lock.  Folded in place while the
process runs (arena.fold() does the same on request), the next fork and the
next snapshot are O(chunks) again.  A child's exit returns the views it
shared that nobody wrote at once (csrc/core/sigchld.c); the folder takes
the rest.

The thread is the core's: it runs no Python (no GIL, no allocation in the
arena, every signal blocked), at the pace odfork.h sets (ODF_FOLD_*), one
batch of views per lock hold (csrc/core/cow.c fold_run): a writer of a view
being folded waits for that batch only (userfaultfd write-protect).  While
the process forks often, views with many private pages are left to the
kernel (cow.c FOLD_HOT_PAGES).  Shared views are never folded.

When: it starts at the first fork made through Python in a process, so a
child that never forks runs no thread and never folds.  On Python 3.12+ it is
stopped (joined) before every fork made through Python and started again in
the parent once the fork has returned, so that no fork sees it: a fork in a
process with more than one thread warns there (DeprecationWarning "This
process is multi-threaded, use of fork() may lead to deadlocks in the
child"; the child would hold no thread anyway).  3.12 counts the threads
before the after-fork hooks run and 3.13 after them, so on 3.13 the restart
waits for os.fork() to return: odfork() restarts it itself, and the
after-fork hook leaves a pending call (Py_AddPendingCall) that the main
thread runs at its next check, once it is out of the fork.  3.11 does not
warn: there it runs on across forks.

ODFORK_FOLD=0 turns it off (folds then happen only in arena.fold(), in
snapshots and when a child exits).  Without a full userfaultfd (FOLD_PROTECT
"mprotect") the core refuses a fold while another thread runs, this one
included, so the thread is not started (start()).
"""

import os
import sys
import threading
import weakref
from typing import Any

from odfork_user import _core
from odfork_user._core import lib

ENABLED = os.environ.get("ODFORK_FOLD", "1").strip() != "0"
# Python 3.12+ warns when it forks a process with more than one OS thread
# (3.11 does not: there the folder runs on across forks, which costs nothing);
# 3.13+ counts them after the after-fork hooks
_COUNTS_THREADS = sys.version_info >= (3, 12)
_COUNTS_AFTER_HOOKS = sys.version_info >= (3, 13)

_arenas: weakref.WeakSet[Any] = weakref.WeakSet()
_start_lock = threading.Lock()


def watch(arena):
    """Fold `arena`'s views in the background once this process has forked."""
    _arenas.add(arena)


def running():
    """True while the folder thread runs in this process."""
    return bool(lib.odf_folder_running())


def start():
    """Start the folder thread if it should run and is not running: the one
    place that decides.  Called after a fork, in the parent."""
    if not ENABLED or not _arenas or running():
        return
    if _core.prepare_process()[0] != "userfaultfd":
        return  # a fold is refused while another thread runs (csrc/core/uffd.c)
    with _start_lock:
        lib.odf_folder_start()


def _halt():
    """Stop the thread; returns once its OS thread is gone (from /proc too)."""
    lib.odf_folder_stop()


# -- the restart on 3.13+: after os.fork() has returned ----------------------

_fork_frame: Any = None  # the frame that called os.fork(), and where it was
_fork_lasti = -1
_fork_pid = 0
_pending: Any = None  # (Py_AddPendingCall, the C callback), once made; False where unavailable


def _returned_from_fork():
    """In the pending call: has os.fork() returned?  While the after-fork
    hooks (or the warning) run, the frame that called it is below them,
    still at the call; once it returned, that frame runs (or ran) on."""
    frame = sys._getframe(2)  # 0: here, 1: the pending call
    if frame is _fork_frame:
        return True
    while frame is not None:
        if frame is _fork_frame:
            return frame.f_lasti != _fork_lasti
        frame = frame.f_back
    return True


def _pending_start(_arg):
    global _fork_frame
    try:
        if os.getpid() != _fork_pid:  # a child that inherited the queue
            return 0
        if _fork_frame is not None and not _returned_from_fork():
            _add_pending()  # still inside the fork: at the next check
            return 0
        _fork_frame = None
        start()
    except BaseException:  # never fail the main thread's pending calls (shutdown: no new threads)
        pass
    return 0


def _add_pending():
    global _pending
    if _pending is None:
        try:
            import ctypes

            proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
            add = ctypes.PyDLL(None).Py_AddPendingCall  # its own function object: argtypes stay ours
            add.argtypes, add.restype = [proto, ctypes.c_void_p], ctypes.c_int
            _pending = (add, proto(_pending_start))
        except Exception:
            _pending = False
    if _pending:
        _pending[0](_pending[1], None)


# -- fork hooks ---------------------------------------------------------------


def _before_fork():
    global _fork_frame, _fork_lasti
    if not _COUNTS_THREADS:
        return
    _halt()
    if _COUNTS_AFTER_HOOKS:
        frame = sys._getframe(1)  # os.fork() is C: this is the frame that called it
        _fork_frame, _fork_lasti = frame, frame.f_lasti


def _after_fork_in_parent():
    global _fork_pid
    if not _COUNTS_AFTER_HOOKS:
        start()
    elif ENABLED and _arenas:
        _fork_pid = os.getpid()
        _add_pending()


def after_odfork():
    """odfork() in the parent, after os.fork() returned: start now."""
    global _fork_frame
    _fork_frame = None
    start()


def _after_fork_in_child():
    global _fork_frame
    _fork_frame = None  # no folder came along (the core forgets it): this process starts its own at its first fork


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
