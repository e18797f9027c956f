"""spawn(): run a function in an odfork child and get its result back."""

from __future__ import annotations

import os
import pickle
import select
import signal
import threading
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar

from odfork_user import _child
from odfork_user._errors import ChildError, OdforkTimeoutError, OdforkTypeError, RemoteTraceback

T = TypeVar("T")
P = ParamSpec("P")


class Child(Generic[T]):
    """A running odfork child (see spawn).  Follows multiprocessing.Process for
    pid/join/exitcode/is_alive/kill/terminate and concurrent.futures.Future for
    result/exception/done.

    No thread waits for it (a thread would make every later fork of this
    process a fork of a multi-threaded one): the child writes its message into
    a memfd (so it never blocks on a reader), and the calls below wait on its
    pidfd, reap it and read the message.  A Child dropped while its process
    still runs is reaped by a later spawn()."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._pidfd: int | None = os.pidfd_open(pid)
        self._fd: int | None = fd  # the memfd the child writes its message into
        self._exitcode: int | None = None
        self._value: Any = None
        self._error: BaseException | None = None  # what result() raises, once done
        self._finished = False
        self._waiters = 0  # threads polling the pidfd now (it is closed when the last leaves)
        self._lock = threading.Lock()

    def _wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: for ever) for the child's end;
        reap it and read its message then.  True once done."""
        with self._lock:
            if self._finished:
                return True
            self._waiters += 1
            pidfd = self._pidfd
            assert pidfd is not None  # closed only once finished (and no waiter is left)
        ended = False
        try:
            poll = select.poll()
            poll.register(pidfd, select.POLLIN)
            ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
            ended = bool(poll.poll(ms))
        finally:
            with self._lock:
                self._waiters -= 1
                if ended and not self._finished:
                    self._finish()
                done = self._finished
                if done and self._waiters == 0 and self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        return done

    def _finish(self):
        """Reap the child and read its message (under the lock, once it has exited)."""
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # someone else's waitpid(-1) reaped it: status unknown
            code = None
        value, error = None, None
        try:
            try:
                msg = _child.receive_file(self._fd)
            except Exception as exc:  # a message that cannot be unpickled here
                msg = ("broken", f"{type(exc).__name__}: {exc}", None)
            finally:
                os.close(self._fd)
                self._fd = None
            if msg is not None and msg[0] == "ok":
                value = msg[1]
            else:
                error = self._failure(msg, code)
        except Exception as exc:  # never leave the waiters without an answer
            error = ChildError(f"child {self.pid}: {type(exc).__name__}: {exc}", exitcode=code)
        self._exitcode, self._value, self._error = code, value, error
        self._finished = True

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
            exc = ChildError(
                f"child {self.pid} raised {text}\n\nRemote traceback:\n{tb}", exitcode=code, remote_traceback=tb
            )
        exc.__cause__ = RemoteTraceback(tb)
        return exc

    @property
    def exitcode(self) -> int | None:
        """None while running; 0 ok; -N if killed by signal N."""
        return self._exitcode

    def is_alive(self) -> bool:
        return not self._wait(0)

    def done(self) -> bool:
        """True once the child has ended and its outcome is known."""
        return self._wait(0)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child to end (at most `timeout` seconds).  Returns None."""
        self._wait(timeout)

    def _signal(self, sig):
        with self._lock:
            if self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:  # exited, not reaped yet
                    pass

    def kill(self) -> None:
        """Send SIGKILL (through a pidfd, so a reused pid is never hit)."""
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        """Send SIGTERM (through a pidfd, like kill())."""
        self._signal(signal.SIGTERM)

    def _outcome(self, timeout):
        if not self._wait(timeout):
            raise OdforkTimeoutError(f"child {self.pid} did not finish within {timeout} s")

    def result(self, timeout: float | None = None) -> T:
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
        self._outcome(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception result() would raise, or None if fn returned.
        Raises TimeoutError if not finished within `timeout`."""
        self._outcome(timeout)
        return self._error

    def __del__(self):
        try:
            with self._lock:
                if self._finished or self._waiters:
                    return
                pidfd, fd, self._pidfd, self._fd = self._pidfd, self._fd, None, None
            _orphans.append((self.pid, pidfd, fd))
            _reap_orphans()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "running" if not self._finished else f"exitcode={self._exitcode}"
        return f"<odfork_user.Child pid={self.pid} {state}>"


_orphans: list[tuple[int, int, int]] = []  # (pid, pidfd, memfd) of Children dropped before their process ended


def _reap_orphans():
    for item in list(_orphans):
        pid, pidfd, fd = item
        try:
            done = os.waitpid(pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            done = True
        if done:
            try:
                _orphans.remove(item)
            except ValueError:  # another thread got it
                continue
            os.close(pidfd)
            os.close(fd)


def spawn(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Child[T]:
    """Run fn(*args, **kwargs) in an odfork child.

    Returns:
        Child: its result() is fn's return value, pickled back over a pipe.

    Raises:
        TypeError: fn is not callable.
        OSError: the fork failed.
    """
    if not callable(fn):
        raise OdforkTypeError(f"spawn() needs a callable, not {type(fn).__name__}")
    _reap_orphans()
    pid, fd = _child.fork_call(fn, args, kwargs, to_file=True)
    return Child(pid, fd)
