"""Background folding: one daemon thread per process that folds the views of
page-mode arenas back into their segments once nobody else shares them.

Why: after a fork every chunk is a private view; pages written since then are
private memory that the next fork copies entry by entry (as os.fork would) and
that a snapshot must fold under the arena's lock.  Folded in place while the
process runs (arena.fold() does the same on request), the next fork and the
next snapshot are O(chunks) again.

When: the thread starts at the first fork made through Python in a process,
so a child that never forks runs no thread and never folds.  On Python 3.12+
it is stopped (joined) before every fork made through Python and started
again in the parent once the fork has returned, so that no fork sees it: a
fork in a process with more than one thread warns there (DeprecationWarning
"This process is multi-threaded, use of fork() may lead to deadlocks in the
child"; the child would hold no thread anyway).  3.12 counts the threads
before the after-fork hooks run and 3.13 after them, so on 3.13 the restart
waits for os.fork() to return: odfork() restarts it itself, and the
after-fork hook leaves a pending call (Py_AddPendingCall) that the main
thread runs at its next check, once it is out of the fork.  3.11 does not
warn: there it runs on across forks.

What: every FOLD_PERIOD it spends at most FOLD_BUDGET folding views whose
count is back to 1 (and only FOLD_BUDGET apart while the budget leaves such
views behind), in slices of FOLD_SLICE_NS with the arena's lock released
between them, one batch of views per lock hold in the core (csrc/core/cow.c
fold_run): a writer of a view being folded waits for that batch only
(userfaultfd write-protect or PROT_READ, see csrc/core/uffd.c).  While the process
forks often, views with many private pages are left to the kernel (cow.c
FOLD_HOT_PAGES: folding a chunk rewritten every cycle costs more than the
page-table copy it saves).  Shared views are never folded here.
ODFORK_FOLD=0 turns it off (folds then happen only in arena.fold() and
snapshots).  Without a full userfaultfd (FOLD_PROTECT "mprotect") the core
refuses a fold while another thread runs, this one included, so the thread
is not started (start()).
"""

import _thread
import os
import sys
import threading
import time
import weakref
from typing import Any

from odfork_user import _core
from odfork_user._core import ffi, lib

# the pace, the same for every folder: csrc/core/odfork.h, ODF_FOLD_*
FOLD_PERIOD = lib.ODF_FOLD_PERIOD_NS / 1e9  # seconds between steps
FOLD_BUDGET_NS = lib.ODF_FOLD_BUDGET_NS  # per step and arena: 10% of a CPU (50% while catching up)
FOLD_SLICE_NS = lib.ODF_FOLD_SLICE_NS  # per call into the core, the arena's lock held
ENABLED = os.environ.get("ODFORK_FOLD", "1").strip() != "0"
# Python 3.12+ warns when it forks a process with more than one OS thread
# (3.11 does not: there the folder runs on across forks, which costs nothing);
# 3.13+ counts them after the after-fork hooks
_COUNTS_THREADS = sys.version_info >= (3, 12)
_COUNTS_AFTER_HOOKS = sys.version_info >= (3, 13)

_arenas: weakref.WeakSet[Any] = weakref.WeakSet()
# The running thread's (stop, done, [native id]): `stop` and `done` are locks
# the starter holds; releasing `stop` wakes the thread and ends it, which
# releases `done`.  A raw _thread, not a threading.Thread: Thread.start() waits
# until the new thread runs, and right after a fork it would queue behind the
# child (measured: +1.6 ms per odfork() of a 1 GiB arena on 2 CPUs).
_handle = None
_start_lock = threading.Lock()


def watch(arena):
    """Fold `arena`'s views in the background once this process has forked."""
    _arenas.add(arena)


def _step():
    """One step over every arena; True when the budget left foldable views.
    The budget is spent in slices of FOLD_SLICE_NS, the arena's lock released
    between them: a fork (which takes every arena's lock first) waits for one
    slice at most, not for the whole step."""
    left, behind = ffi.new("uint32_t *"), False
    for arena in list(_arenas):
        lock = arena._lock
        end = time.monotonic_ns() + FOLD_BUDGET_NS
        while True:
            if not lock.acquire(blocking=False):
                break  # busy in an arena method (or a fork): next time
            try:
                if arena._closed:
                    break
                left[0] = 0
                lib.odf_arena_fold_step(arena._h, FOLD_SLICE_NS, left)
            finally:
                lock.release()
            if left[0] == 0:
                break
            if time.monotonic_ns() >= end:
                behind = True
                break
            time.sleep(0)  # a thread waiting for the lock (a fork) gets it now
    return behind


def _run(stop, done, tid):
    try:
        tid[0] = threading.get_native_id()
        behind = False
        # views the budget left behind: catch up at half a CPU, else a tenth
        while not stop.acquire(timeout=FOLD_BUDGET_NS / 1e9 if behind else FOLD_PERIOD):
            try:
                behind = _step()
            except Exception:  # never let the folder die of one arena's error
                behind = False
    finally:
        done.release()


def running():
    """True while the folder thread runs in this process."""
    h = _handle
    return h is not None and h[1].locked()


def start():
    """Start the folder thread if it should run and is not running: the one
    place that decides.  Called after a fork, in the parent."""
    global _handle
    if not ENABLED or not _arenas or running():
        return
    if _core.prepare_process()[0] != "userfaultfd":
        return  # a fold is refused while another thread runs (csrc/core/uffd.c)
    with _start_lock:
        if not running():
            stop, done = _thread.allocate_lock(), _thread.allocate_lock()
            stop.acquire()
            done.acquire()
            handle = (stop, done, [0])
            _thread.start_new_thread(_run, handle)
            _handle = handle


def _halt():
    """Stop the thread and wait until its OS thread is gone (the end of
    _run comes before that)."""
    global _handle
    handle = _handle
    if handle is None:
        return
    stop, done, tid = handle
    _handle = None
    stop.release()
    done.acquire()
    task = f"/proc/self/task/{tid[0]}"
    for i in range(20000):  # tens of microseconds in practice; the bound only guards against a stuck exit
        if not os.path.exists(task):
            break
        if i < 100:
            os.sched_yield()
        else:
            time.sleep(0.0001)


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
    global _handle, _fork_frame
    _handle = None  # it was stopped before the fork; this process starts its own at its first fork
    _fork_frame = None


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
