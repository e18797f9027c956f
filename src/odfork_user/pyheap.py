"""Python objects in an arena: odfork_user.install() routes CPython's
allocations into one, so that everything built afterwards forks on demand.

What moves (csrc/py/pyalloc.c): pymalloc's arenas, where every object of up to
512 bytes lives, and the blocks of more than 512 bytes of the MEM and OBJ
domains (dict tables, list item arrays, big str/bytes/bytearray, most
C-extension PyMem_Malloc memory).  What does not: memory allocated before
install (it is still freed and resized by the allocator that made it), memory
C libraries take from malloc directly or through PyMem_RawMalloc, thread
stacks, the interpreter's own static state.  numpy array data moves too once
hook_numpy() has run (odfork_user.cli.run does it when numpy is imported).
"""

from __future__ import annotations

import errno
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, Literal

from odfork_user import _forklocks
from odfork_user._core import ffi, lib
from odfork_user._errors import OdforkTypeError, OdforkValueError, _check

_lock = threading.RLock()
_forklocks.register_lock(_lock, _forklocks.LEVEL_HEAP)
if TYPE_CHECKING:
    from odfork_user.arena import Arena

_state: dict[str, Any] = {"arena": None, "heap": None}
_HEAP_STATS = ("live_bytes", "live_blocks", "raw_bytes", "top_bytes", "mapped_bytes", "free_page_bytes", "free_extents")


def install(arena: Arena | None = None, size: int | None = None) -> Arena:
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
            raise OdforkTypeError(f"install() takes an Arena, not {type(arena).__name__}")
        if _state["heap"] is not None:
            if arena is not _state["arena"]:
                raise OdforkValueError("the Python heap already lives in another arena (one per process)")
            _check(lib.odf_py_install(_state["heap"]), "install")
            return arena
        chunk = arena.chunk_size
        if size is None:
            size = arena.size // 2 // chunk * chunk
        if not isinstance(size, int) or size < chunk or size > arena.size:
            raise OdforkValueError(f"heap size must be an int between {chunk} and {arena.size}")
        size = size // chunk * chunk
        out = ffi.new("odf_heap_t **")

        def create(handle, address):
            _check(lib.odf_heap_create(handle, address, size, out), "cannot create the heap")

        arena._host_heap(size, create)
        _state.update(arena=arena, heap=out[0])
        _check(lib.odf_py_install(out[0]), "install")
        return arena


def uninstall() -> None:
    """New allocations go back to the allocators CPython had; objects already
    in the arena stay there (and are freed there)."""
    with _lock:
        lib.odf_py_uninstall()


def installed() -> bool:
    """True while new allocations go to the arena."""
    return bool(lib.odf_py_installed())


class installing:
    """Context manager: install() on entry, uninstall() on exit."""

    def __init__(self, arena: Arena | None = None, size: int | None = None) -> None:
        self.arena, self.size = arena, size

    def __enter__(self) -> Arena:
        return install(self.arena, self.size)

    def __exit__(self, *exc: object) -> Literal[False]:
        uninstall()
        return False


def heap_stats() -> dict[str, int] | None:
    """The heap's own counters (None before install): live bytes and blocks,
    bytes in pymalloc arenas, the extent handed out, resident bytes, free pages."""
    h = _state["heap"]
    if h is None:
        return None
    st = ffi.new("odf_heap_stats_t *")
    lib.odf_heap_stats(h, st)
    return {k: int(getattr(st, k)) for k in _HEAP_STATS}


def heap_check() -> None:
    """Verify the heap's structure; raises CorruptionError if broken."""
    from odfork_user._errors import CorruptionError

    h = _state["heap"]
    if h is not None and lib.odf_heap_check(h):
        raise CorruptionError("the Python heap's free extents or block headers are inconsistent")


def hook_numpy() -> bool:
    """Send numpy's array data to the heap (numpy's NEP 49 allocator hook) in
    this thread's context and in contexts made from it.  Needs install() first
    and numpy >= 1.22; warns (and changes nothing) where numpy is older."""
    rc = lib.odf_py_numpy_hook()
    if rc == errno.ENOTSUP:
        import numpy

        warnings.warn(
            f"numpy {numpy.__version__} has no allocator hook (NEP 49 needs numpy >= 1.22): "
            "its array data stays outside the arena and every fork copies its page-table entries",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    _check(rc, "cannot install numpy's allocator hook")
    return True


class _NumpyImportHook:
    """A meta-path finder that only watches for `import numpy` and hooks
    numpy's allocator once numpy's own module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "numpy":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            hook_numpy()

        spec.loader.exec_module = exec_then_hook
        return spec


def hook_numpy_on_import() -> bool | None:
    """hook_numpy() now if numpy is imported, else right after it is."""
    if "numpy" in sys.modules:
        return hook_numpy()
    if not any(isinstance(f, _NumpyImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _NumpyImportHook())
    return None


_CLASSES = (
    ("arena", "arena: private pages of views (written since a fork)"),
    ("brk", "[heap] (malloc: raw domain, C libraries, objects from before install)"),
    (
        "anon",
        "anonymous mappings (big malloc blocks, pymalloc arenas from before install, "
        "numpy data outside the hook, thread stacks)",
    ),
    ("stack", "main thread's stack"),
    ("file", "files mapped private, pages written (.data, relocations)"),
)


def _smaps_anonymous():
    """Private anonymous bytes per kind of mapping, from /proc/self/smaps: the
    pages a fork copies page-table entries for (and later copies)."""
    from odfork_user.arena import _open_arenas

    ranges = [(a.address, a.address + a.size) for a in list(_open_arenas) if not a.closed]
    out = dict.fromkeys((k for k, _ in _CLASSES), 0)
    kind = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                name = head[5].strip() if len(head) > 5 else ""
                if any(s <= lo and hi <= e for s, e in ranges) or "odfork-" in name:
                    kind = "arena"
                elif name == "[heap]":
                    kind = "brk"
                elif name.startswith("[stack"):
                    kind = "stack"
                elif name == "" or name.startswith("["):
                    kind = "anon"
                else:
                    kind = "file"
            elif head[0] == "Anonymous:":
                out[kind] += int(head[1]) << 10
    return out


def memory_report() -> dict[str, Any]:
    """Where this process's memory is: the heap's own counters (heap_stats()),
    numpy data made through the hook (in the heap, or outside when the heap was
    full or uninstalled), and the private anonymous bytes of every other kind
    of mapping, which a fork still copies page-table entries for."""
    n_in, n_out = ffi.new("size_t *"), ffi.new("size_t *")
    if _state["heap"] is not None:
        lib.odf_py_numpy_stats(n_in, n_out)
    return {
        "heap": heap_stats(),
        "numpy_in_heap": int(n_in[0]),
        "numpy_outside": int(n_out[0]),
        "outside": _smaps_anonymous(),
    }


def format_memory_report(report: dict[str, Any] | None = None) -> str:
    r = report or memory_report()
    mib = 1 << 20
    h = r["heap"]
    lines = ["odfork_user memory report (MiB)"]
    if h is None:
        lines.append("  arena heap: not installed")
    else:
        lines.append(
            f"  arena heap: {h['live_bytes'] / mib:.1f} in blocks, {h['raw_bytes'] / mib:.1f} in "
            f"pymalloc arenas, {h['mapped_bytes'] / mib:.1f} resident"
        )
    lines.append(
        f"  numpy data through the hook: {r['numpy_in_heap'] / mib:.1f} in the heap, "
        f"{r['numpy_outside'] / mib:.1f} outside"
    )
    lines.append("  private anonymous memory by mapping (a fork copies its page-table entries):")
    for key, label in _CLASSES:
        lines.append(f"    {r['outside'][key] / mib:10.1f}  {label}")
    return "\n".join(lines)
