"""The one protocol between a forked child and its parent.

The child sends one message, a pickle framed by its 8-byte length, on a pipe
it holds alone, and leaves with os._exit (after flushing stdio and saving its
coverage data): nothing of the parent's runs again in it.  The parent reads
the message and waits for that child only, not for every process that
inherited the pipe (a grandchild the child left behind can keep it open for
ever).

A call's message is ("ok", value), ("raised", "Type: text", traceback,
pickled exception or None) or ("unpicklable", "Type: text", None).  The
exception travels pickled on its own, so that one that cannot (a class
defined inside a function, an attribute that pickle refuses, arguments its
__init__ does not take back) still leaves its text and traceback.  Used by spawn(), the pytest plugin, the
test suite's in_child and the benchmark workers.
"""

import os
import pickle
import select
import struct
import sys
import traceback

_HEADER = struct.Struct("<Q")


def _write_frame(fd, data):
    """Write the length, then every byte of `data` (os.write may write less than asked)."""
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def send(fd, obj):
    """Send obj (pickled, framed) on fd."""
    _write_frame(fd, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def send_outcome(fd, msg, code):
    """Send a call's message; one whose value cannot be pickled becomes
    ("unpicklable", ...).  Returns the exit code the child should use."""
    try:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        data = pickle.dumps(("unpicklable", f"{type(exc).__name__}: {exc}", None))
        code = 1
    _write_frame(fd, data)
    return code


def receive(fd, pidfd=None):
    """The message sent on fd, or None if the writer ended without sending all
    of it.  With `pidfd` (os.pidfd_open of the child), waits for that process
    as well as for the pipe: the answer comes when the message is whole or the
    child has exited, whoever else holds the pipe.  Closes neither and reaps
    nothing."""
    buf = bytearray()
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, pidfd is None)
    try:
        while True:
            if pidfd is not None:
                ready, _, _ = select.select([fd, pidfd], [], [])
            more = _drain(fd, buf, pidfd is None)
            if len(buf) >= _HEADER.size:
                n = _HEADER.unpack_from(buf)[0]
                if len(buf) >= _HEADER.size + n:
                    return pickle.loads(bytes(buf[_HEADER.size : _HEADER.size + n]))
            if not more or (pidfd is not None and pidfd in ready):  # what it wrote was drained above
                return None
    finally:
        os.set_blocking(fd, blocking)


def _drain(fd, buf, blocking):
    """Append what fd has to buf (a blocking fd: one read).  False at end of file."""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buf.extend(chunk)
        if blocking:
            return True


def outcome(fn, *args, **kwargs):
    """(message, exit code) of fn(*args, **kwargs): every exception is caught,
    SystemExit included."""
    try:
        return ("ok", fn(*args, **kwargs)), 0
    except BaseException as exc:  # the child reports everything
        return ("raised", f"{type(exc).__name__}: {exc}", traceback.format_exc(), _pickled_exception(exc)), 1


def _pickled_exception(exc):
    """exc pickled, or None where it cannot be, or where it would not come
    back whole (pickle.loads here stands for the parent's: same classes)."""
    try:
        data = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        back = pickle.loads(data)
    except Exception:
        return None
    return data if type(back) is type(exc) else None


def _save_coverage():
    """os._exit skips coverage's atexit save: save what this process measured
    through coverage's own API (a forked process gets its own data file, which
    pytest-cov and `coverage combine` merge)."""
    cov_module = sys.modules.get("coverage")
    cov = cov_module.Coverage.current() if cov_module is not None else None
    if cov is not None:
        cov.stop()
        cov.save()


_settled = False  # set in a child by settle(); a fork's child starts with its parent's False


def settle():
    """What a child does before it sends its last message: flush stdio and
    save its coverage data, so that a parent that goes on (and combines
    coverage, or reads the child's output) as soon as the message arrives
    finds them complete.  Once per child."""
    global _settled
    if _settled:
        return
    _settled = True
    sys.stdout.flush()
    sys.stderr.flush()
    _save_coverage()


def leave(code):
    """End the child: settle() if it has not been, then os._exit(code)."""
    try:
        settle()
    finally:
        os._exit(code)


def fork_call(fn, args=(), kwargs=None, fork=None, to_file=False):
    """Fork (odfork by default); the child sends outcome(fn, *args, **kwargs)
    and leaves.  Returns (pid, read end) in the parent.  to_file: the message
    goes into a memfd instead of a pipe (returned; read it with
    receive_file() once the child has exited), so that a child whose parent
    reads nothing while it runs never blocks on a full pipe."""
    if fork is None:
        from odfork_user._forking import odfork as fork
    if to_file:
        r = w = os.memfd_create("odfork-result", os.MFD_CLOEXEC)
    else:
        r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = fork()
    except BaseException:
        os.close(r)
        if w != r:
            os.close(w)
        raise
    if pid == 0:
        code = 70
        try:
            if w != r:
                os.close(r)
            msg, code = outcome(fn, *args, **(kwargs or {}))
            settle()
            code = send_outcome(w, msg, code)
        finally:
            leave(code)
    if w != r:
        os.close(w)
    return pid, r


def receive_file(fd):
    """The message a child wrote into memfd `fd` (fork_call(to_file=True)),
    or None if it is not whole.  Call once the child has exited."""
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        return None
    n = _HEADER.unpack(head)[0]
    buf = bytearray()
    while len(buf) < n:
        part = os.pread(fd, min(n - len(buf), 1 << 24), _HEADER.size + len(buf))
        if not part:
            return None
        buf += part
    return pickle.loads(bytes(buf))
