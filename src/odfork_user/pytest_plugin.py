"""pytest plugin: run each test's call phase in an odfork child.

    pytest --odfork            every test
    @pytest.mark.odfork        one test

Fixtures are set up and torn down in the pytest process, and the test body runs
in a child forked after the setup: a session fixture built once (for instance a
dataset held in an arena) is shared with every test on demand, each test's
writes stay in its child, and teardown sees the parent's state, untouched.
Every report the call phase makes in the child (the test's own, and those of
subtests: pytest's `subtests` fixture, unittest's subTest) comes back through
pytest's report serialization hooks and is logged by the parent as plain pytest
would; warnings the body raises are raised again in the parent, where pytest's
warnings plugin records them with their category, message and location.  A
child that crashes is reported as a failure naming the signal.  The parent
waits for the test's child only: processes the test leaves behind keep running
(they are not killed and do not hold the run up), as they would under plain
pytest.  The child saves its coverage data before it leaves (coverage gives a
forked process its own data file; pytest-cov combines them).

`--odfork-with=os` uses os.fork instead (same protocol, for comparisons).

The outcome is always plain pytest's: a value in a report that cannot be
pickled (a subtest keyed by an instance of a class defined in the test, a
lambda given to record_property) comes back as its repr, and an error in the
child's side of the protocol becomes the test's failure with its traceback.

pytest imports this module in every run (an entry point); the C core is only
loaded by the first test that runs in a child.
"""

import os
import pickle
import signal
import traceback
import warnings

import pytest
from _pytest.runner import call_and_report

from odfork_user import _child  # plain Python: the package loads its core on first use


def pytest_addoption(parser):
    group = parser.getgroup("odfork", "odfork_user: tests in on-demand-forked children")
    group.addoption(
        "--odfork", action="store_true", default=False, help="run the body of every test in an odfork child"
    )
    group.addoption(
        "--odfork-with", choices=("odfork", "os"), default="odfork", help="fork with odfork (default) or os.fork"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "odfork: run this test's body in an odfork child")


def _failed_report(item, why):
    return pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed", why, "call", [], 0.0)


def _crash_report(item, status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = f"the test's child process was killed by signal {sig} ({signal.Signals(sig).name})"
    else:
        why = f"the test's child process exited with status {os.WEXITSTATUS(status)} without a report"
    return pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed", why, "call", [], 0.0)


def _picklable(obj):
    try:
        pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return True
    except Exception:
        return False


def _travelling(obj):
    """obj with every value that cannot be pickled replaced by its repr
    (the report is still read the way it was made; only such values change)."""
    if _picklable(obj):
        return obj
    if isinstance(obj, dict):
        return {(k if _picklable(k) else repr(k)): _travelling(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_travelling(v) for v in obj) if type(obj) in (list, tuple) else [_travelling(v) for v in obj]
    try:
        return repr(obj)
    except Exception as exc:  # a repr that raises
        return f"<{type(obj).__name__} object (repr failed: {type(exc).__name__})>"


def _run_in_child(item, w):
    """The child's side: run the call phase and send what it made; an error
    of this side itself is sent as its traceback."""
    try:
        msg = _call_phase(item)
    except BaseException:
        msg = {"error": traceback.format_exc()}
    # coverage saved before the message: the parent may finish the session (and
    # pytest-cov combine the data files) as soon as the last test's message is in
    _child.settle()
    try:
        _child.send(w, msg)
    except Exception:  # the message itself would not pickle: say why
        _child.send(w, {"error": traceback.format_exc()})


def _call_phase(item):
    """Run the call phase, collecting every report it logs and every warning
    it raises, serialized for the parent."""
    config = item.config
    logged = []

    def collect(report):
        # serialized now, as plain pytest would print it now: a subtest's arguments
        # may be objects the test goes on changing
        logged.append(config.hook.pytest_report_to_serializable(config=config, report=report))

    for hook in {id(item.ihook): item.ihook, id(config.hook): config.hook}.values():
        # reports logged during the call (subtests) come back instead of being
        # printed here; this is the child, nothing needs restoring
        setattr(hook, "pytest_runtest_logreport", collect)
    with warnings.catch_warnings(record=True) as seen:  # the filters pytest set stay in force
        rep = call_and_report(item, "call", log=False)
    # Plugins settle a report's final outcome when it is logged, from state
    # they keep in this process (the subtests plugin fails a test whose
    # subtests failed): ask them here, where that state is.
    config.hook.pytest_report_teststatus(report=rep, config=config)
    caught = []
    for m in seen:
        try:
            pickle.dumps(m.category)
            caught.append((m.category, str(m.message), m.filename, m.lineno))
        except Exception:  # a warning class defined where pickle cannot find it
            caught.append((UserWarning, f"{m.category.__name__}: {m.message}", m.filename, m.lineno))
    reports = logged + [config.hook.pytest_report_to_serializable(config=config, report=rep)]
    return {"reports": [_travelling(d) for d in reports], "warnings": caught}


_unreaped: list[int] = []


def _reap(block):
    for pid in list(_unreaped):
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _unreaped.remove(pid)


def pytest_sessionfinish(session):
    _reap(block=True)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def _call_in_child(item):
    """Reports of the call phase (the last is the test's own), run in a child."""
    if item.config.getoption("odfork_with") == "os":
        fork = os.fork
    else:
        from odfork_user._forking import odfork as fork  # the C core, loaded by the first such test
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Where pytest itself runs threads (an xdist worker: execnet's), 3.12+
        # warns at every fork that the process is multi-threaded.  The child
        # only runs the test's call phase and reports; plain pytest, which does
        # not fork, prints no such warning, so neither does this.
        warnings.filterwarnings("ignore", r"This process \(pid=\d+\) is multi-threaded", DeprecationWarning)
        pid = fork()
    if pid == 0:
        code = 70
        try:
            os.close(r)
            _run_in_child(item, w)
            code = 0
        finally:
            _child.leave(code)  # flushes stdio, saves coverage data, os._exit
    os.close(w)
    pidfd = os.pidfd_open(pid)
    # Waiting runs as the call phase would: an exception here (pytest-timeout's
    # alarm, which fires in this process because a child has no timers of its
    # parent's, or a KeyboardInterrupt) kills the child and becomes the test's
    # report, and the run goes on.
    try:
        call = pytest.CallInfo.from_call(
            lambda: _child.receive(r, pidfd), when="call", reraise=(KeyboardInterrupt, SystemExit)
        )
    except BaseException:
        _kill(pid)
        raise
    finally:
        os.close(r)
        os.close(pidfd)
    if call.excinfo is not None:
        _kill(pid)
        return [item.ihook.pytest_runtest_makereport(item=item, call=call)]
    msg = call.result
    if msg is None:
        _, status = os.waitpid(pid, 0)
        return [_crash_report(item, status)]
    # The whole message came: the child has nothing left to say, and waiting
    # for its exit (the teardown of a copy of this process) would cost every
    # test a millisecond or more; it is reaped later.
    _unreaped.append(pid)
    _reap(block=False)
    if "error" in msg:
        return [
            _failed_report(item, "error in the test's child process (odfork_user's pytest plugin):\n" + msg["error"])
        ]
    for category, message, filename, lineno in msg["warnings"]:
        warnings.warn_explicit(message, category, filename, lineno)
    return [item.config.hook.pytest_report_from_serializable(config=item.config, data=d) for d in msg["reports"]]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if not (item.config.getoption("odfork") or item.get_closest_marker("odfork")):
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    setup = call_and_report(item, "setup", log=False)
    reports = [setup]
    if setup.passed and not item.config.getoption("setuponly", False):
        reports += _call_in_child(item)
    if item.session.shouldfail or item.session.shouldstop:
        nextitem = None
    reports.append(call_and_report(item, "teardown", log=False, nextitem=nextitem))
    for rep in reports:
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
