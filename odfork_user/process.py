"""spawn(): run a function in an odfork child and get its result back."""
import os
import signal
import threading

from odfork_user import _child
from odfork_user._errors import ChildError, OdforkTimeoutError, OdforkTypeError


class Child:
    """A running odfork child (see spawn).  Follows multiprocessing.Process for
    pid/join/exitcode/is_alive/kill and concurrent.futures.Future for result."""

    def __init__(self, pid, r):
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._exitcode = None
        self._msg = None
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
        with self._lock:
            self._exitcode = code
            self._msg = msg
            os.close(self._pidfd)
            self._pidfd = None
        self._done.set()

    @property
    def exitcode(self):
        """None while running; 0 ok; -N if killed by signal N."""
        return self._exitcode

    def is_alive(self):
        return not self._done.is_set()

    def join(self, timeout=None):
        """Wait for the child to end (at most `timeout` seconds).  Returns None."""
        self._done.wait(timeout)

    def kill(self):
        """Send SIGKILL (through a pidfd, so a reused pid is never hit)."""
        with self._lock:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def result(self, timeout=None):
        """fn's return value.

        Raises:
            TimeoutError: not finished within `timeout` (a later call still works).
            ChildError: fn raised (message includes the remote traceback), its result
                could not be pickled, or the child died (exitcode -N for signal N).
        """
        if not self._done.wait(timeout):
            raise OdforkTimeoutError(f"child {self.pid} did not finish within {timeout} s")
        code, msg = self._exitcode, self._msg
        if msg is None:
            raise ChildError(f"child {self.pid} ended with exit code {code} without a result",
                             exitcode=code)
        if msg[0] == "broken":
            raise ChildError(f"child {self.pid} sent a result that cannot be unpickled: {msg[1]}",
                             exitcode=code)
        if msg[0] == "ok":
            return msg[1]
        if msg[0] == "raised":
            raise ChildError(f"child {self.pid} raised {msg[1]}\n\nRemote traceback:\n{msg[2]}",
                             exitcode=code, remote_traceback=msg[2])
        raise ChildError(f"child {self.pid}: result could not be pickled: {msg[1]}", exitcode=code)

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
