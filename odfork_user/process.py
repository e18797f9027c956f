"""spawn(): run a function in an odfork child and get its result back."""
import os
import pickle
import signal
import threading

from odfork_user import _child
from odfork_user._errors import ChildError, OdforkTimeoutError, OdforkTypeError, RemoteTraceback


class Child:
    """A running odfork child (see spawn).  Follows multiprocessing.Process for
    pid/join/exitcode/is_alive/kill/terminate and concurrent.futures.Future for
    result/exception/done."""

    def __init__(self, pid, r):
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._exitcode = None
        self._value = None
        self._error = None  # what result() raises, once done
        self._done = threading.Event()
        self._lock = threading.Lock()
        # The reader drains the pipe (a large result never blocks the child)
        # and reaps the child, even if this object is dropped.
        threading.Thread(target=self._reap, args=(r,), name=f"odfork-child-{pid}", daemon=True).start()

    def _reap(self, r):
        try:
            msg = _child.receive(r, self._pidfd)
        except Exception as exc:  # a message that cannot be unpickled here
            msg = ("broken", f"{type(exc).__name__}: {exc}", None)
        finally:
            os.close(r)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # someone else's waitpid(-1) reaped it: status unknown
            code = None
        value, error = None, None
        try:
            if msg is not None and msg[0] == "ok":
                value = msg[1]
            else:
                error = self._failure(msg, code)
        except Exception as exc:  # never leave the waiters without an answer
            error = ChildError(f"child {self.pid}: {type(exc).__name__}: {exc}", exitcode=code)
        with self._lock:
            self._exitcode = code
            self._value, self._error = value, error
            os.close(self._pidfd)
            self._pidfd = None
        self._done.set()

    def _failure(self, msg, code):
        """The exception result() raises for a message other than ("ok", value)."""
        if msg is None:
            return ChildError(f"child {self.pid} ended with exit code {code} without a result", exitcode=code)
        if msg[0] == "broken":
            return ChildError(f"child {self.pid} sent a result that cannot be unpickled: {msg[1]}", exitcode=code)
        if msg[0] != "raised":
            return ChildError(f"child {self.pid}: result could not be pickled: {msg[1]}", exitcode=code)
        text, tb, blob = msg[1], msg[2], msg[3] if len(msg) > 3 else None
        exc = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except Exception:
                exc = None
        if not isinstance(exc, Exception):  # not picklable, or SystemExit & co.: not raised in the parent
            exc = ChildError(f"child {self.pid} raised {text}\n\nRemote traceback:\n{tb}",
                             exitcode=code, remote_traceback=tb)
        exc.__cause__ = RemoteTraceback(tb)
        return exc

    @property
    def exitcode(self):
        """None while running; 0 ok; -N if killed by signal N."""
        return self._exitcode

    def is_alive(self):
        return not self._done.is_set()

    def done(self):
        """True once the child has ended and its outcome is known."""
        return self._done.is_set()

    def join(self, timeout=None):
        """Wait for the child to end (at most `timeout` seconds).  Returns None."""
        self._done.wait(timeout)

    def _signal(self, sig):
        with self._lock:
            if self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:  # exited, not reaped yet
                    pass

    def kill(self):
        """Send SIGKILL (through a pidfd, so a reused pid is never hit)."""
        self._signal(signal.SIGKILL)

    def terminate(self):
        """Send SIGTERM (through a pidfd, like kill())."""
        self._signal(signal.SIGTERM)

    def _wait(self, timeout):
        if not self._done.wait(timeout):
            raise OdforkTimeoutError(f"child {self.pid} did not finish within {timeout} s")

    def result(self, timeout=None):
        """fn's return value.

        Raises:
            the exception fn raised: the same type and arguments (unpickled from
                the child), with the child's traceback as its __cause__
                (a RemoteTraceback whose text is that traceback).
            ChildError: fn raised an exception that cannot be pickled, or one
                that is not an Exception (SystemExit, KeyboardInterrupt); its
                result could not be pickled; or the child died without a result
                (exitcode -N for signal N).
            TimeoutError: not finished within `timeout` (a later call still works).
        """
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout=None):
        """The exception result() would raise, or None if fn returned.
        Raises TimeoutError if not finished within `timeout`."""
        self._wait(timeout)
        return self._error

    def __repr__(self):
        state = "running" if self._exitcode is None else f"exitcode={self._exitcode}"
        return f"<odfork_user.Child pid={self.pid} {state}>"


def spawn(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in an odfork child.

    Returns:
        Child: its result() is fn's return value, pickled back over a pipe.

    Raises:
        TypeError: fn is not callable.
        OSError: the fork failed.
    """
    if not callable(fn):
        raise OdforkTypeError(f"spawn() needs a callable, not {type(fn).__name__}")
    pid, r = _child.fork_call(fn, args, kwargs)
    return Child(pid, r)
