"""pytest plugin: run each test's call phase in an odfork child.

    pytest --odfork            every test
    @pytest.mark.odfork        one test

Fixtures are set up and torn down in the pytest process, and the test body runs
in a child forked after the setup: a session fixture built once (for instance a
dataset held in an arena) is shared with every test on demand, each test's
writes stay in its child, and teardown sees the parent's state, untouched.
Outcomes, captured output, skips and xfails come back as pytest reports; a child
that crashes is reported as a failure naming the signal, as pytest-forked does.

`--odfork-with=os` uses os.fork instead (same protocol, for comparisons).
"""
import os
import pickle
import signal

import pytest
from _pytest.runner import call_and_report

from odfork_user._forking import odfork
from odfork_user._pipes import read_to_eof, write_all


def pytest_addoption(parser):
    group = parser.getgroup("odfork", "odfork_user: tests in on-demand-forked children")
    group.addoption("--odfork", action="store_true", default=False,
                    help="run the body of every test in an odfork child")
    group.addoption("--odfork-with", choices=("odfork", "os"), default="odfork",
                    help="fork with odfork (default) or os.fork")


def pytest_configure(config):
    config.addinivalue_line("markers", "odfork: run this test's body in an odfork child")


def _crash_report(item, status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = f"the test's child process was killed by signal {sig} ({signal.Signals(sig).name})"
    else:
        why = f"the test's child process exited with status {os.WEXITSTATUS(status)} without a report"
    return pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                             why, "call", [], 0.0)


def _call_in_child(item):
    fork = os.fork if item.config.getoption("odfork_with") == "os" else odfork
    r, w = os.pipe()
    pid = fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            rep = call_and_report(item, "call", log=False)
            write_all(w, pickle.dumps(item.config.hook.pytest_report_to_serializable(config=item.config,
                                                                                    report=rep)))
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = read_to_eof(r)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if data and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return item.config.hook.pytest_report_from_serializable(config=item.config, data=pickle.loads(data))
    return _crash_report(item, status)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if not (item.config.getoption("odfork") or item.get_closest_marker("odfork")):
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    setup = call_and_report(item, "setup", log=False)
    reports = [setup]
    if setup.passed and not item.config.getoption("setuponly", False):
        reports.append(_call_in_child(item))
    if item.session.shouldfail or item.session.shouldstop:
        nextitem = None
    reports.append(call_and_report(item, "teardown", log=False, nextitem=nextitem))
    for rep in reports:
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
