"""Helpers shared by the tests: children run through odfork_user's child protocol, fresh
interpreters that import the installed package, and arena fixtures' bodies.  The fixtures
themselves are in conftest.py; a test module imports what it needs from here."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import odfork_user as ou
from odfork_user import _child, odfork

MiB = 1 << 20
CH = ou.CHUNK_SIZE

# A test that forks while its own threads run gets Python 3.12+'s warning that
# the process is multi-threaded, as any program would; it is the test's doing,
# not the library's (tests/test_fork_warnings.py checks that the library makes
# none), so such tests silence it rather than fill the report with it.
forks_with_own_threads = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)


def python(*args, env=None, timeout=60, **kw):
    """Run `python -P ARGS` in a fresh interpreter that imports the same
    odfork_user as this test process (-P and PYTHONPATH: never a source folder
    that happens to be the working directory).  `env`: extra environment
    variables (None values are removed).  Returns the CompletedProcess (text)."""
    e = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    root = os.path.dirname(os.path.dirname(ou.__file__))
    e["PYTHONPATH"] = os.pathsep.join(p for p in [root, e.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-P", *args], capture_output=True, text=True, env=e, timeout=timeout, **kw)


def run_py(code, timeout=60, env=None, **kw):
    """python("-c", code) with `code` dedented."""
    return python("-c", textwrap.dedent(code), env=env, timeout=timeout, **kw)


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
        assert isinstance(self.info.value, ou.OdforkError), f"{type(self.info.value).__name__} is not an OdforkError"
        return out


def reap_all():
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


def start_child(fn, *args, fork=odfork):
    """Run fn(*args) in a forked child (odfork_user's child protocol); returns
    (pid, read_fd)."""
    pid, r = _child.fork_call(fn, args, fork=fork)
    _children.add(pid)
    return pid, r


def finish_child(pid, r):
    """The child's return value; AssertionError with its traceback if it raised,
    or if it died without answering."""
    pidfd = os.pidfd_open(pid)
    try:
        msg = _child.receive(r, pidfd)
    finally:
        os.close(pidfd)
        os.close(r)
    _, status = os.waitpid(pid, 0)
    _children.discard(pid)
    if msg is None:
        raise AssertionError(f"child {pid} died without answering (status {status:#x})")
    if msg[0] != "ok":
        raise AssertionError(f"child failed: {msg[1]}\n{msg[2] or ''}")
    return msg[1]


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
