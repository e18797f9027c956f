import os
import pickle
import signal
import traceback

import pytest

import odfork_user as ou
from odfork_user import odfork
from odfork_user._core import lib

MiB = 1 << 20
CH = ou.CHUNK_SIZE

# ODFORK_TEST_BREAK=cow runs the suite against a broken core (shared chunks made
# writable without a copy) to show which tests catch it.
if os.environ.get("ODFORK_TEST_BREAK") == "cow":
    _orig_init = ou.Arena.__init__

    def _broken_init(self, *a, **kw):
        _orig_init(self, *a, **kw)
        lib._odf_debug_break(self._h, lib.ODF_DEBUG_BROKEN_COW, 0)

    ou.Arena.__init__ = _broken_init

_children = set()


class raises_odfork:
    """pytest.raises(exc), and the exception must also be an ou.OdforkError
    (every failure of the library is one, and the builtin it resembles)."""

    def __init__(self, exc, **kw):
        self._cm = pytest.raises(exc, **kw)

    def __enter__(self):
        self.info = self._cm.__enter__()
        return self.info

    def __exit__(self, *exc):
        out = self._cm.__exit__(*exc)
        assert isinstance(self.info.value, ou.OdforkError), \
            f"{type(self.info.value).__name__} is not an OdforkError"
        return out


def _reap_all():
    for pid in list(_children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        _children.discard(pid)


@pytest.fixture(autouse=True)
def reap_children():
    """No forked child outlives its test, whatever the test did."""
    yield
    _reap_all()


def start_child(fn, *args, fork=odfork):
    """Run fn(*args) in a forked child; returns (pid, read_fd).  The child sends
    back ('ok', value) or ('err', traceback text) and leaves with os._exit."""
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            try:
                msg = ("ok", fn(*args))
            except BaseException:
                msg = ("err", traceback.format_exc())
                code = 1
            data = pickle.dumps(msg)
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    _children.add(pid)
    return pid, r


def finish_child(pid, r, timeout=60):
    chunks = []
    with os.fdopen(r, "rb") as f:
        while True:
            b = f.read(1 << 16)
            if not b:
                break
            chunks.append(b)
    _, status = os.waitpid(pid, 0)
    _children.discard(pid)
    if not chunks:
        raise AssertionError(f"child {pid} died without answering (status {status:#x})")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "err":
        raise AssertionError(f"child failed:\n{value}")
    return value


def in_child(fn, *args, fork=odfork):
    """fn(*args) run in a forked child; its return value, or AssertionError with its traceback."""
    pid, r = start_child(fn, *args, fork=fork)
    return finish_child(pid, r)


def close_arena(a, strict=False):
    """Close a after collecting garbage.  strict=False: views a failing test
    still holds leave the mapping in place (close() refuses with BufferError)."""
    import gc
    gc.collect()
    try:
        a.close()
    except BufferError:
        if strict:
            raise


def checked_arena(a, strict=False):
    """Fixture body: yield a, then check its invariants and close it."""
    yield a
    try:
        a.check()
    finally:
        close_arena(a, strict)


@pytest.fixture
def arena():
    yield from checked_arena(ou.Arena(32 * CH))


@pytest.fixture
def chunk_arena():
    """An arena in whole-chunk copy mode (the default where userfaultfd is
    missing), for tests that count chunk copies and segments."""
    yield from checked_arena(ou.Arena(32 * CH, cow="chunk"))
