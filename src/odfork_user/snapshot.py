"""Snapshots: a frozen copy of an arena inside the same process, O(chunks), no copying."""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal

from odfork_user import _forklocks
from odfork_user._core import ffi, lib
from odfork_user._errors import OdforkBufferError, OdforkValueError, _check

if TYPE_CHECKING:
    from odfork_user.arena import Arena

_WRITE_STEP = 64 << 20


class Snapshot:
    """The arena's bytes as of Arena.snapshot().  Holds chunk references like a
    process does: the arena's next write to a chunk copies it (or reuses it once
    the snapshot is closed).  A fork gives the child its own copy of it.

    Use as a context manager or call close(); a closed snapshot raises ValueError.
    """

    def __init__(self, arena: Arena, snap_id: int) -> None:
        self._arena = arena
        self._id = snap_id
        self._addr = 0
        self._exporter: Any = None
        self._lock = threading.RLock()
        self._closed = False
        _forklocks.register(self, _forklocks.LEVEL_SNAPSHOT)

    def _check_open(self):
        if self._closed:
            raise OdforkValueError("snapshot closed")
        return self._arena._live()

    @property
    def closed(self) -> bool:
        return self._closed

    def buffer(self) -> memoryview:
        """A read-only memoryview of the arena's bytes as of the snapshot
        (mapped at its own address range)."""
        with self._lock:
            h = self._check_open()
            if self._exporter is None:
                out = ffi.new("uintptr_t *")
                _check(lib.odf_snapshot_map(h, self._id, out), "snapshot.buffer")
                self._addr = out[0]
                self._exporter = ffi.buffer(ffi.cast("char *", self._addr), self._arena.size)
            return memoryview(self._exporter).toreadonly()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot's bytes to `path`.  Safe to run in a background
        thread while the arena keeps changing; the GIL is released while writing."""
        view = self.buffer()
        try:
            with open(path, "wb", buffering=0) as f:
                for off in range(0, len(view), _WRITE_STEP):
                    part = view[off : off + _WRITE_STEP]
                    while part:
                        n = f.write(part)
                        part = part[n:]
        finally:
            view.release()

    def _restore_into(self, h):
        with self._lock:
            if self._closed:
                raise OdforkValueError("snapshot closed")
            _check(lib.odf_snapshot_restore(h, self._id), "restore")

    def _views_alive(self):
        return self._exporter is not None and sys.getrefcount(self._exporter) > 2

    def close(self) -> None:
        """Drop the snapshot's references.  Raises BufferError while views from buffer() are alive."""
        with self._lock:
            if self._closed:
                return
            if self._exporter is not None:
                if self._views_alive():
                    raise OdforkBufferError("cannot close snapshot: views from buffer() are still alive")
                lib.odf_snapshot_unmap(self._addr, self._arena.size)
                self._exporter = None
            self._closed = True
            if not self._arena.closed:
                _check(lib.odf_snapshot_release(self._arena._h, self._id), "snapshot.close")

    def __enter__(self) -> Snapshot:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<odfork_user.Snapshot id={self._id}{' closed' if self._closed else ''}>"
