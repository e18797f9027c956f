"""Arena: memory that forks on demand."""
import os
import re
import sys
import threading
import weakref

from odfork_user._alloc import BlockAllocator
from odfork_user._core import CHUNK_SIZE, ffi, lib
from odfork_user._errors import CorruptionError, _check

_STATS_KEYS = (
    "chunks", "chunks_resident", "chunks_shared", "faults", "cow_copies", "reuses",
    "bytes_copied", "forks", "segments_live", "segments_max", "slots_used", "uffd_faults",
    "folds",
)


def _closed_error():
    return ValueError("arena closed or invalid")


class Arena:
    """A range of memory whose 2 MiB chunks are shared between forked processes
    by reference count and copied only when first written while shared.

    Args:
        size: bytes to reserve, rounded up to whole chunks.  Virtual until written.
        max_procs: processes (and snapshots) a family can hold at once (default 1024).
        cow: what the first write to a shared chunk copies.  "page" maps the chunk
            privately so the kernel copies only the 4 KiB pages written; the
            userfaultfd thread folds such chunks back into whole segments once the
            process is quiet (stats()["folds"]), so later forks stay O(chunks).
            "chunk" copies the whole 2 MiB at once.  Default: "page" where kernel
            writes go through userfaultfd (the folding thread exists), else
            "chunk".  In page mode stats()["cow_copies"] counts chunks made
            private, and "bytes_copied" the bytes of folds (the kernel's page
            copies are not counted).

    Raises:
        TypeError: size is not an int.
        ValueError: size <= 0.
        MemoryError: the range cannot be reserved.
    """

    chunk_size = CHUNK_SIZE

    def __init__(self, size, *, max_procs=None, cow=None, _max_segments=0):
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"Arena size must be an int, not {type(size).__name__}")
        if size <= 0:
            raise ValueError(f"Arena size must be > 0, got {size}")
        if max_procs is not None and (not isinstance(max_procs, int) or max_procs < 2):
            raise ValueError("max_procs must be an int >= 2")
        if cow not in (None, "chunk", "page"):
            raise ValueError(f"cow must be 'chunk' or 'page', not {cow!r}")
        out = ffi.new("odf_arena_t **")
        _check(lib.odf_arena_create(size, max_procs or 0, _max_segments, out),
               f"cannot reserve an arena of {size} bytes")
        self._h = out[0]
        if cow is None:
            cow = "page" if lib.odf_arena_uffd(self._h) else "chunk"
        self.cow = cow
        lib.odf_arena_set_page_cow(self._h, cow == "page")
        self._base = lib.odf_arena_base(self._h)
        self._size = lib.odf_arena_size(self._h)
        self._alloc = BlockAllocator(self._size)
        self._blocks = {}  # offset -> [rounded size, exporter, nbytes]
        self._lock = threading.RLock()
        self._snaps = weakref.WeakSet()
        self._closed = False
        self._holds_heap = False  # odfork_user.install() put the Python heap here

    # -- properties ---------------------------------------------------------
    @property
    def size(self):
        """Reserved bytes, a multiple of chunk_size."""
        return self._size

    @property
    def closed(self):
        return self._closed

    @property
    def kernel_writes(self):
        """How this arena takes writes the kernel makes into shared chunks in
        this process: "userfaultfd" (they just work) or "signal" (they fail
        with EFAULT unless prepare_write() made the range private first)."""
        return "userfaultfd" if lib.odf_arena_uffd(self._live()) else "signal"

    @property
    def address(self):
        """Address of the first byte (the same in every process of the family)."""
        return self._base

    def _live(self):
        if self._closed:
            raise _closed_error()
        return self._h

    # -- blocks -------------------------------------------------------------
    def alloc(self, nbytes):
        """Allocate a zero-filled block.

        Returns:
            A writable 1-D memoryview of format 'B' and length nbytes, 64-byte aligned.

        Raises:
            TypeError: nbytes is not an int.  ValueError: nbytes <= 0.
            MemoryError: no free extent is large enough (the arena stays usable).
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool):
            raise TypeError(f"alloc size must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ValueError(f"alloc size must be > 0, got {nbytes}")
        with self._lock:
            self._live()
            lib.odf_handler_ensure()  # a SIGSEGV handler installed since: chain to it, stay on top
            got = self._alloc.alloc(nbytes)
            if got is None:
                raise MemoryError(
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

    def ndarray(self, shape, dtype="float64"):
        """A zero-filled numpy array on arena memory (needs numpy)."""
        try:
            import numpy as np
        except ImportError as exc:  # pragma: no cover - numpy is an optional extra
            raise ImportError("Arena.ndarray needs numpy: pip install 'odfork_user[numpy]'") from exc
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        count = 1
        for n in shape:
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"bad shape {shape!r}")
            count *= n
        buf = self.alloc(max(count * dt.itemsize, 1))
        return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)

    def _block_offset(self, obj):
        try:
            ptr = ffi.from_buffer(obj)
        except TypeError as exc:
            raise ValueError(f"free() takes a buffer from this arena, not {type(obj).__name__}") from exc
        off = int(ffi.cast("uintptr_t", ptr)) - self._base
        del ptr
        if off not in self._blocks:
            raise ValueError("buffer is not a block of this arena, or was already freed")
        return off

    def free(self, obj):
        """Give a block (the memoryview or array that alloc/ndarray returned) back.

        Raises:
            ValueError: obj is not a block of this arena, or was already freed.
        """
        with self._lock:
            self._live()
            off = self._block_offset(obj)
            rounded = self._blocks.pop(off)[0]
            self._alloc.free(off, rounded)

    def _exports(self):
        # Each memoryview made from a block's exporter holds one reference to
        # it (slices and numpy arrays share that view's managed buffer).
        return sum(sys.getrefcount(b[1]) - 2 for b in self._blocks.values())

    # -- state --------------------------------------------------------------
    def stats(self):
        """This process's view of the arena (see the Stats table of the API)."""
        with self._lock:
            st = ffi.new("odf_stats_t *")
            _check(lib.odf_arena_stats(self._live(), st), "stats")
            return {k: int(getattr(st, k)) for k in _STATS_KEYS}

    def check(self):
        """Verify the family-wide invariants; raises CorruptionError if broken."""
        with self._lock:
            msg = ffi.new("char[]", lib.ODF_CHECK_MSG_LEN)
            rc = lib.odf_arena_check(self._live(), msg, lib.ODF_CHECK_MSG_LEN)
            if rc == 117:  # EUCLEAN
                raise CorruptionError(ffi.string(msg).decode(errors="replace"))
            _check(rc, "check")

    def prepare_write(self, view, nbytes=None):
        """Make the memory of `view` private and writable now (copying its
        shared chunks).

        Needed only where kernel_writes == "signal": there a write the kernel
        makes into a shared chunk (read(2), recv_into, readinto) fails with
        EFAULT, because no signal handler sees it; calling this first makes it
        work.  With userfaultfd such writes are trapped and this is optional.
        """
        with self._lock:
            ptr = ffi.from_buffer(view)
            n = len(ffi.buffer(ptr)) if nbytes is None else nbytes
            _check(lib.odf_arena_prepare_write(self._live(), int(ffi.cast("uintptr_t", ptr)), n),
                   "prepare_write")

    # -- snapshots ----------------------------------------------------------
    def snapshot(self):
        """A frozen copy of the whole arena, taken in O(chunks) with no data copied."""
        from odfork_user.snapshot import Snapshot
        with self._lock:
            out = ffi.new("uint64_t *")
            lib.odf_handler_ensure()
            _check(lib.odf_snapshot_take(self._live(), out), "snapshot")
            snap = Snapshot(self, int(out[0]))
            self._snaps.add(snap)
            return snap

    def restore(self, snap):
        """Roll the arena back to `snap` in O(chunks); views already handed out
        see the restored bytes.  The snapshot stays valid."""
        from odfork_user.snapshot import Snapshot
        if not isinstance(snap, Snapshot) or snap._arena is not self:
            raise ValueError("restore() takes a snapshot of this arena")
        if self._holds_heap:
            raise ValueError("cannot restore the arena that holds the Python heap: live objects would "
                             "be rolled back under the interpreter")
        with self._lock:
            snap._restore_into(self._live())

    def close(self):
        """Unmap the arena in this process (other processes keep their view).

        Raises:
            BufferError: views or arrays of the arena are still alive.
        """
        with self._lock:
            if self._closed:
                return
            if self._holds_heap:
                raise BufferError("cannot close the arena that holds the Python heap (odfork_user.install)")
            n = self._exports() + sum(1 for s in self._snaps if s._views_alive())
            if n:
                raise BufferError(f"cannot close arena: {n} exported view(s) still alive")
            for snap in list(self._snaps):  # their references go with the arena's slot
                snap.close()
            self._closed = True
            self._blocks.clear()
            lib.odf_arena_close(self._h)
            self._h = ffi.NULL

    def __enter__(self):
        self._live()
        return self

    def __exit__(self, *exc):
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

    def __repr__(self):
        state = "closed" if self._closed else f"at 0x{self._base:x}"
        return f"<odfork_user.Arena size={self._size} {state}>"


_default = None
_default_lock = threading.Lock()
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text):
    """'64G', '512M', '1048576' -> bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r} (examples: 1G, 256M, 1048576)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def default_arena():
    """The process-wide arena, created on first use (size: ODFORK_ARENA_SIZE, default 64G)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Arena(parse_size(os.environ.get("ODFORK_ARENA_SIZE", "64G")))
        return _default
