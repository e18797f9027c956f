"""Python objects in an arena: odfork_user.install() routes CPython's
allocations into one, so that everything built afterwards forks on demand.

What moves (csrc/py/pyalloc.c): pymalloc's arenas, where every object of up to
512 bytes lives, and the blocks of more than 512 bytes of the MEM and OBJ
domains (dict tables, list item arrays, big str/bytes/bytearray, most
C-extension PyMem_Malloc memory).  What does not: memory allocated before
install (it is still freed and resized by the allocator that made it), memory
C libraries take from malloc directly or through PyMem_RawMalloc, numpy array
data (numpy has its own allocator hooks), thread stacks, the interpreter's own
static state.
"""
import threading

from odfork_user import _forklocks
from odfork_user._core import ffi, lib
from odfork_user._errors import _check

_lock = threading.RLock()
_forklocks.register_lock(_lock, _forklocks.LEVEL_HEAP)
_state = {"arena": None, "heap": None}
_HEAP_STATS = ("live_bytes", "live_blocks", "raw_bytes", "top_bytes", "mapped_bytes",
               "free_page_bytes", "free_extents")


def install(arena=None, size=None):
    """Allocate the interpreter's objects in `arena` (default: default_arena())
    from now on.  `size` bytes of the arena (default: half of it, whole chunks)
    become the heap: the lowest free extent that holds them, so that the
    chunks in use stay low (a fork's bookkeeping is proportional to the
    highest chunk in use).  Calling it again after
    uninstall() resumes with the same heap; another arena raises ValueError.

    The arena can no longer be closed or restored in this process (its memory
    holds live objects); its family's other processes are unaffected.
    """
    from odfork_user.arena import Arena, default_arena
    with _lock:
        if arena is None:
            arena = _state["arena"] or default_arena()
        if not isinstance(arena, Arena):
            raise TypeError(f"install() takes an Arena, not {type(arena).__name__}")
        if _state["heap"] is not None:
            if arena is not _state["arena"]:
                raise ValueError("the Python heap already lives in another arena (one per process)")
            _check(lib.odf_py_install(_state["heap"]), "install")
            return arena
        chunk = arena.chunk_size
        if size is None:
            size = arena.size // 2 // chunk * chunk
        if not isinstance(size, int) or size < chunk or size > arena.size:
            raise ValueError(f"heap size must be an int between {chunk} and {arena.size}")
        size = size // chunk * chunk
        with arena._lock:
            h = arena._live()
            got = arena._alloc.alloc_aligned(size, chunk)
            if got is None:
                raise ValueError(f"no free extent of {size} bytes in the arena for the heap")
            off = got
            out = ffi.new("odf_heap_t **")
            rc = lib.odf_heap_create(h, arena.address + off, size, out)
            if rc:
                arena._alloc.free(off, size)
                _check(rc, "cannot create the heap")
            arena._holds_heap = True
            lib.odf_handler_ensure()
        _state.update(arena=arena, heap=out[0])
        _check(lib.odf_py_install(out[0]), "install")
        return arena


def uninstall():
    """New allocations go back to the allocators CPython had; objects already
    in the arena stay there (and are freed there)."""
    with _lock:
        lib.odf_py_uninstall()


def installed():
    """True while new allocations go to the arena."""
    return bool(lib.odf_py_installed())


class installing:
    """Context manager: install() on entry, uninstall() on exit."""

    def __init__(self, arena=None, size=None):
        self.arena, self.size = arena, size

    def __enter__(self):
        return install(self.arena, self.size)

    def __exit__(self, *exc):
        uninstall()
        return False


def heap_stats():
    """The heap's own counters (None before install): live bytes and blocks,
    bytes in pymalloc arenas, the extent handed out, resident bytes, free pages."""
    h = _state["heap"]
    if h is None:
        return None
    st = ffi.new("odf_heap_stats_t *")
    lib.odf_heap_stats(h, st)
    return {k: int(getattr(st, k)) for k in _HEAP_STATS}


def heap_check():
    """Verify the heap's structure; raises CorruptionError if broken."""
    from odfork_user._errors import CorruptionError
    h = _state["heap"]
    if h is not None and lib.odf_heap_check(h):
        raise CorruptionError("the Python heap's free extents or block headers are inconsistent")
