"""Background folding: one daemon thread per process that folds the views of
page-mode arenas back into their segments once nobody else shares them.

Why: after a fork every chunk is a private view; pages written since then are
private memory that the next fork copies entry by entry (as os.fork would) and
that a snapshot must fold under the arena's lock.  Folded in place while the
process runs (arena.fold() does the same on request), the next fork and the
next snapshot are O(chunks) again.

When: the thread starts at the first fork made through Python in a process
(os.register_at_fork after_in_parent), so a child that never forks runs no
thread and never folds.  Every FOLD_PERIOD it spends at most FOLD_BUDGET
folding views whose count is back to 1 (and only FOLD_BUDGET apart while the
budget leaves such views behind), one chunk per lock hold: a writer of
a chunk being folded waits for that chunk only (userfaultfd write-protect or
PROT_READ, see csrc/uffd.c).  Shared views are never folded here.
ODFORK_FOLD=0 turns it off (folds then happen only in arena.fold() and
snapshots).  Without a full userfaultfd (FOLD_PROTECT "mprotect") the core
refuses a fold while another thread runs, this one included, so the thread
is not started: views then stay views until the process folds them with no
other thread running (arena.fold() in a single-threaded process).
"""
import os
import threading
import time
import weakref

from odfork_user import _core
from odfork_user._core import ffi, lib

FOLD_PERIOD = 0.02      # seconds between steps
FOLD_BUDGET_NS = 2_000_000  # per step and arena: 10% of a CPU (50% while catching up)
ENABLED = os.environ.get("ODFORK_FOLD", "1").strip() != "0"

_arenas = weakref.WeakSet()
_thread = None
_start_lock = threading.Lock()


def watch(arena):
    """Fold `arena`'s views in the background once this process has forked."""
    _arenas.add(arena)


def _step():
    """One step over every arena; True when the budget left foldable views."""
    left, behind = ffi.new("uint32_t *"), False
    for arena in list(_arenas):
        lock = arena._lock
        if not lock.acquire(blocking=False):
            continue  # busy in an arena method (or a fork): next time
        try:
            if arena._closed:
                continue
            lib.odf_arena_fold_step(arena._h, FOLD_BUDGET_NS, left)
            behind = behind or left[0] > 0
        finally:
            lock.release()
    return behind


def _run():
    behind = False
    while True:
        # views the budget left behind: catch up at half a CPU, else a tenth
        time.sleep(FOLD_BUDGET_NS / 1e9 if behind else FOLD_PERIOD)
        try:
            behind = _step()
        except Exception:  # never let the folder die of one arena's error
            behind = False


def _after_fork_in_parent():
    global _thread
    if not ENABLED or not _arenas or (_thread is not None and _thread.is_alive()):
        return
    if _core.prepare_process()[0] != "userfaultfd":
        return  # a fold is refused while another thread runs (csrc/uffd.c)
    with _start_lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="odfork-folder", daemon=True)
            _thread.start()


def _after_fork_in_child():
    global _thread
    _thread = None  # the parent's thread does not exist here


os.register_at_fork(after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
