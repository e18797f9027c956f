"""Python-level locks held across every fork made through Python.

A lock another thread holds at fork time stays held for ever in the child
(only the forking thread is copied), so the child's first call that takes it
would hang.  Re-creating the lock in the child would not do either: the state
it guards could be half updated.  So, as the C core does with its own locks,
every lock registered here is taken before the fork (os.register_at_fork
before=) and released on both sides after it: a fork waits for a thread to
leave an arena method, and the child starts with every lock free and every
structure whole.

Order (outermost first, the order the code nests them): the heap lock
(pyheap), the default-arena lock, each Arena's lock, each Snapshot's lock.
Locks are RLocks, so a thread that forks while holding one of them does not
deadlock on itself.
"""

import os
import threading
import weakref
from typing import Any

LEVEL_HEAP, LEVEL_DEFAULT, LEVEL_ARENA, LEVEL_SNAPSHOT = range(4)

_owners: list[weakref.WeakSet[Any]] = [weakref.WeakSet() for _ in range(4)]  # objects with a ._lock, per level
_module_locks: dict[int, Any] = {}  # level -> lock of a module
_held = threading.local()


def register(obj, level):
    """Hold obj._lock across forks (obj is kept weakly)."""
    _owners[level].add(obj)


def register_lock(lock, level):
    _module_locks[level] = lock


def _before():
    taken = []
    for level in range(4):
        locks = [_module_locks[level]] if level in _module_locks else []
        locks += [o._lock for o in list(_owners[level])]
        for lock in locks:
            lock.acquire()
            taken.append(lock)
    _held.taken = taken


def _after():
    for lock in reversed(getattr(_held, "taken", ())):
        lock.release()
    _held.taken = ()


os.register_at_fork(before=_before, after_in_parent=_after, after_in_child=_after)
