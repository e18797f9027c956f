"""Arena: memory that forks on demand."""

from __future__ import annotations

import errno
import operator
import os
import re
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from odfork_user import _core, _folder, _forklocks
from odfork_user._alloc import BlockAllocator
from odfork_user._core import CHUNK_SIZE, ffi, lib
from odfork_user._errors import (
    CorruptionError,
    OdforkBufferError,
    OdforkMemoryError,
    OdforkTypeError,
    OdforkValueError,
    _check,
)

if TYPE_CHECKING:
    from odfork_user.snapshot import Snapshot

_STATS_KEYS = (
    "chunks",
    "chunks_resident",
    "chunks_shared",
    "faults",
    "cow_copies",
    "reuses",
    "bytes_copied",
    "forks",
    "segments_live",
    "segments_max",
    "slots_used",
    "views",
    "folds",
    "returns",
)
MAX_ARENAS = 64  # per process (ODF_MAX_ARENAS in the core)
_open_arenas: weakref.WeakSet[Arena] = weakref.WeakSet()


def _closed_error():
    return OdforkValueError("arena closed or invalid")


class Arena:
    """A range of memory whose 2 MiB chunks are shared between forked processes
    by reference count and copied only when first written while shared.

    Args:
        size: bytes to reserve, rounded up to whole chunks.  Virtual until written.
        max_procs: processes (and snapshots) a family can hold at once (default 1024).
        cow: what a write to a shared chunk copies.  "page" (the default): at a
            fork or snapshot every chunk becomes a private view of its segment,
            so the kernel copies only the 4 KiB pages written, by user code or
            by the kernel (read(2), recv_into: they just work); views are
            folded back into segments by fold(), by the background folder
            and by snapshots.  "chunk": shared chunks are read-only and the
            first write copies the whole 2 MiB (a trap per chunk); kernel
            writes into a shared chunk then need prepare_write() first.
        background_fold: page mode: once this process has forked, a daemon
            thread folds views nobody else shares back into their segments
            (at most ~10% of a CPU, one batch of views per lock hold), so that the next
            fork or snapshot is O(chunks) again (default True; ODFORK_FOLD=0
            turns it off for every arena).  Only with a full userfaultfd
            (FOLD_PROTECT "userfaultfd"): without one a fold is refused while
            other threads run, and no folder is started.

    Raises:
        TypeError: size is not an int.
        ValueError: size <= 0, or a bad option.
        MemoryError: the range cannot be reserved, or the process already has
            64 arenas open.
    """

    chunk_size: int = CHUNK_SIZE

    def __init__(
        self,
        size: int,
        *,
        max_procs: int | None = None,
        cow: str | None = None,
        background_fold: bool = True,
        _max_segments: int = 0,
    ) -> None:
        if not isinstance(size, int) or isinstance(size, bool):
            raise OdforkTypeError(f"Arena size must be an int, not {type(size).__name__}")
        if size <= 0:
            raise OdforkValueError(f"Arena size must be > 0, got {size}")
        if max_procs is not None and (not isinstance(max_procs, int) or max_procs < 2):
            raise OdforkValueError("max_procs must be an int >= 2")
        if cow not in (None, "chunk", "page"):
            raise OdforkValueError(f"cow must be 'chunk' or 'page', not {cow!r}")
        self._closed = True  # until built
        _core.prepare_process()
        out = ffi.new("odf_arena_t **")
        opts = ffi.new(
            "odf_arena_opts_t *", {"max_slots": max_procs or 0, "max_segs": _max_segments, "chunk_cow": cow == "chunk"}
        )
        rc = lib.odf_arena_create(size, opts, out)
        if rc == errno.ENOMEM and sum(1 for a in list(_open_arenas) if not a._closed) >= MAX_ARENAS:
            raise OdforkMemoryError(
                f"cannot create an arena: a process can have at most {MAX_ARENAS} arenas open (close one first)"
            )
        _check(rc, f"cannot reserve an arena of {size} bytes")
        self._h = out[0]
        self.cow: str = cow or "page"
        if self.cow == "chunk":
            _core._chunk_mode_created()
        elif background_fold:
            _folder.watch(self)
        lib.odf_arena_background(self._h, 1 if self.cow == "page" and background_fold else 0)
        self._base = lib.odf_arena_base(self._h)
        self._size = lib.odf_arena_size(self._h)
        self._alloc = BlockAllocator(self._size)
        self._blocks: dict[int, list[Any]] = {}  # offset -> [rounded size, exporter, nbytes]
        self._freed: dict[int, list[Any]] = {}  # offset -> [rounded size, exporter]: freed while views lived
        self._lock = threading.RLock()
        self._snaps: weakref.WeakSet[Snapshot] = weakref.WeakSet()
        self._closed = False
        self._holds_heap = False  # odfork_user.install() put the Python heap here
        _open_arenas.add(self)
        _forklocks.register(self, _forklocks.LEVEL_ARENA)

    # -- properties ---------------------------------------------------------
    @property
    def size(self) -> int:
        """Reserved bytes, a multiple of chunk_size."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def kernel_writes(self) -> str:
        """How writes the kernel makes into shared chunks (read(2), recv_into)
        fare: "direct" in page mode (they just work, as after fork(2)),
        "prepare_write" in chunk mode (EFAULT unless prepare_write() made the
        range writable first)."""
        self._live()
        return "direct" if self.cow == "page" else "prepare_write"

    @property
    def address(self) -> int:
        """Address of the first byte (the same in every process of the family)."""
        return self._base

    def _live(self):
        if self._closed:
            raise _closed_error()
        return self._h

    def _host_heap(self, size, create):
        """For odfork_user.install: take a chunk-aligned extent of `size` bytes,
        call create(handle, address) to build the heap there (its failure gives
        the extent back), and mark this arena as holding the Python heap (it can
        no longer be closed or restored)."""
        with self._lock:
            h = self._live()
            off = self._alloc.alloc_aligned(size, self.chunk_size)
            if off is None:
                raise OdforkValueError(f"no free extent of {size} bytes in the arena for the heap")
            try:
                create(h, self._base + off)
            except BaseException:
                self._alloc.free(off, size)
                raise
            self._holds_heap = True
            lib.odf_handler_ensure()

    # -- blocks -------------------------------------------------------------
    def alloc(self, nbytes: int) -> memoryview:
        """Allocate a zero-filled block.

        Returns:
            A writable 1-D memoryview of format 'B' and length nbytes, 64-byte aligned.

        Raises:
            TypeError: nbytes is not an int.  ValueError: nbytes <= 0.
            MemoryError: no free extent is large enough (the arena stays usable).
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool):
            raise OdforkTypeError(f"alloc size must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise OdforkValueError(f"alloc size must be > 0, got {nbytes}")
        with self._lock:
            self._live()
            lib.odf_handler_ensure()  # a SIGSEGV handler installed since: chain to it, stay on top
            self._sweep_freed()
            got = self._alloc.alloc(nbytes)
            if got is None:
                raise OdforkMemoryError(
                    f"arena has no free block of {nbytes} bytes "
                    f"({self._alloc.free_bytes()} bytes free in all, size {self._size})"
                )
            off, rounded, dirty_end = got
            addr = self._base + off
            # Map the block's fresh chunks now (zero segments, not populated) so
            # that a kernel write into new memory finds a mapping.
            rc = lib.odf_arena_populate(self._h, addr, nbytes)
            if rc:
                self._alloc.free(off, rounded)
                _check(rc, f"cannot map {nbytes} bytes of the arena")
            if dirty_end > off:  # reused space: zero what an earlier block left
                lib.memset(ffi.cast("void *", addr), 0, dirty_end - off)
            exporter = ffi.buffer(ffi.cast("char *", addr), nbytes)
            self._blocks[off] = [rounded, exporter, nbytes]
            return memoryview(exporter)

    def ndarray(self, shape: int | Sequence[int], dtype: Any = "float64") -> Any:
        """A zero-filled numpy array on arena memory (needs numpy)."""
        try:
            import numpy as np
        except ImportError as exc:  # pragma: no cover - numpy is an optional extra
            raise ImportError("Arena.ndarray needs numpy: pip install 'odfork_user[numpy]'") from exc
        dt = np.dtype(dtype)
        try:
            dims = (
                (operator.index(cast(Any, shape)),)
                if not isinstance(shape, (tuple, list))
                else tuple(operator.index(n) for n in shape)
            )
        except TypeError:
            raise OdforkValueError(f"bad shape {shape!r}: expected an int or a sequence of ints") from None
        count = 1
        for n in dims:
            if n < 0:
                raise OdforkValueError(f"bad shape {dims!r}: negative dimension")
            count *= n
        buf = self.alloc(max(count * dt.itemsize, 1))
        return np.frombuffer(buf, dtype=dt, count=count).reshape(dims)

    def _block_offset(self, obj):
        try:
            ptr = ffi.from_buffer(obj)
        except TypeError as exc:
            raise OdforkValueError(f"free() takes a buffer from this arena, not {type(obj).__name__}") from exc
        except ValueError as exc:  # a memoryview free() released already
            raise OdforkValueError("buffer was already freed (its memoryview is released)") from exc
        off = int(ffi.cast("uintptr_t", ptr)) - self._base
        del ptr
        if off not in self._blocks:
            raise OdforkValueError("buffer is not a block of this arena, or was already freed")
        return off

    def free(self, obj: Any) -> None:
        """Give a block (the memoryview or array that alloc/ndarray returned) back.

        A memoryview passed in is released: using it afterwards raises
        ValueError.  Space that other views (slices, numpy arrays) still show
        is only reused once they are gone, so a write through a stale view
        never lands in another block; close() refuses while they live.

        Raises:
            ValueError: obj is not a block of this arena, or was already freed.
        """
        with self._lock:
            self._live()
            off = self._block_offset(obj)
            rounded, exporter, _ = self._blocks.pop(off)
            if isinstance(obj, memoryview):
                try:
                    obj.release()
                except BufferError:  # something was made from it (an array): it lives on
                    pass
            del obj
            self._freed[off] = [rounded, exporter]
            del exporter
            self._sweep_freed()

    def _sweep_freed(self):
        """Return freed blocks that no view shows any more to the allocator."""
        for off, (rounded, exporter) in list(self._freed.items()):
            if sys.getrefcount(exporter) <= 3:  # the list, the loop variable, the call's argument
                del self._freed[off]
                self._alloc.free(off, rounded)

    def _exports(self):
        # Each memoryview made from a block's exporter holds one reference to
        # it (slices and numpy arrays share that view's managed buffer).
        self._sweep_freed()
        return sum(sys.getrefcount(b[1]) - 2 for b in self._blocks.values()) + sum(
            sys.getrefcount(b[1]) - 2 for b in self._freed.values()
        )

    # -- state --------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """This process's view of the arena (see the Stats table of the API)."""
        with self._lock:
            st = ffi.new("odf_stats_t *")
            _check(lib.odf_arena_stats(self._live(), st), "stats")
            return {k: int(getattr(st, k)) for k in _STATS_KEYS}

    def check(self) -> None:
        """Verify the family-wide invariants; raises CorruptionError if broken."""
        with self._lock:
            msg = ffi.new("char[]", lib.ODF_CHECK_MSG_LEN)
            rc = lib.odf_arena_check(self._live(), msg, lib.ODF_CHECK_MSG_LEN)
            if rc == errno.EUCLEAN:
                raise CorruptionError(ffi.string(msg).decode(errors="replace"))
            _check(rc, "check")

    def prepare_write(self, view: Any, nbytes: int | None = None) -> None:
        """Make the memory of `view` writable now, keeping every byte written
        so far.

        Needed only in chunk mode (kernel_writes == "prepare_write"): there a
        write the kernel makes into a shared chunk (read(2), recv_into,
        readinto) fails with EFAULT, because no signal handler sees it; this
        copies the shared chunks first.  In page mode it only maps chunks that
        were never touched (views take kernel writes as they are).
        """
        with self._lock:
            ptr = ffi.from_buffer(view)
            n = len(ffi.buffer(ptr)) if nbytes is None else nbytes
            _check(lib.odf_arena_prepare_write(self._live(), int(ffi.cast("uintptr_t", ptr)), n), "prepare_write")

    def fold(self, max_dirty: int | None = None) -> None:
        """Fold this process's private views back into their segments where
        nobody else shares them (page mode): their copied pages are written
        into the segment, so that the next fork has no page-table entries to
        copy for them.  Forks do not fold; call this off the critical path
        after heavy writes.  `max_dirty`: skip views with more private pages
        than this.  Without a full userfaultfd (FOLD_PROTECT "mprotect") views
        are folded only while this is the process's only thread (a kernel
        write for another thread could not wait for the fold); otherwise they
        stay views."""
        with self._lock:
            n = 0xFFFFFFFF if max_dirty is None else int(max_dirty)
            _check(lib.odf_arena_fold(self._live(), n), "fold")

    # -- snapshots ----------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """A frozen copy of the whole arena, taken in O(chunks) with no data copied."""
        from odfork_user.snapshot import Snapshot

        with self._lock:
            out = ffi.new("uint64_t *")
            lib.odf_handler_ensure()
            _check(lib.odf_snapshot_take(self._live(), out), "snapshot")
            snap = Snapshot(self, int(out[0]))
            self._snaps.add(snap)
            return snap

    def restore(self, snap: Snapshot) -> None:
        """Roll the arena back to `snap` in O(chunks); views already handed out
        see the restored bytes.  The snapshot stays valid."""
        from odfork_user.snapshot import Snapshot

        if not isinstance(snap, Snapshot) or snap._arena is not self:
            raise OdforkValueError("restore() takes a snapshot of this arena")
        if self._holds_heap:
            raise OdforkValueError(
                "cannot restore the arena that holds the Python heap: live objects would "
                "be rolled back under the interpreter"
            )
        with self._lock:
            snap._restore_into(self._live())

    def close(self) -> None:
        """Unmap the arena in this process (other processes keep their view).

        Raises:
            BufferError: views or arrays of the arena are still alive.
        """
        with self._lock:
            if self._closed:
                return
            if self._holds_heap:
                raise OdforkBufferError("cannot close the arena that holds the Python heap (odfork_user.install)")
            n = self._exports() + sum(1 for s in self._snaps if s._views_alive())
            if n:
                raise OdforkBufferError(f"cannot close arena: {n} exported view(s) still alive")
            for snap in list(self._snaps):  # their references go with the arena's slot
                snap.close()
            self._closed = True
            self._blocks.clear()
            self._freed.clear()
            lib.odf_arena_close(self._h)
            self._h = ffi.NULL

    def __enter__(self) -> Arena:
        self._live()
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def __del__(self):
        try:
            if not self._closed and not self._exports() and not self._holds_heap:
                self.close()
            # with live views the mapping is deliberately kept: unmapping would
            # turn those views into dangling pointers.
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at 0x{self._base:x}"
        return f"<odfork_user.Arena size={self._size} {state}>"


_default: Arena | None = None
_default_lock = threading.RLock()
_forklocks.register_lock(_default_lock, _forklocks.LEVEL_DEFAULT)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'64G', '512M', '1048576' -> bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise OdforkValueError(f"cannot parse size {text!r} (examples: 1G, 256M, 1048576)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def default_arena() -> Arena:
    """The process-wide arena, created on first use (size: ODFORK_ARENA_SIZE, default 64G)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Arena(parse_size(os.environ.get("ODFORK_ARENA_SIZE", "64G")))
        return _default
