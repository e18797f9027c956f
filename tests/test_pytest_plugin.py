"""The pytest plugin (`pytest --odfork`): reports as pytest-forked gives them, and isolation."""

import importlib.metadata
import os

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _same_package(monkeypatch):
    # the inner pytest imports the odfork_user this process imported
    import odfork_user

    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.dirname(odfork_user.__file__)))


SUITE = """
import os, signal, sys
import pytest
import odfork_user as ou

SETUPS = os.environ["SETUP_LOG"]

@pytest.fixture(scope="session")
def data():
    with open(SETUPS, "a") as f:
        f.write("setup\\n")
    arena = ou.Arena(8 << 20)
    buf = arena.alloc(4 << 20)
    buf[:] = b"s" * len(buf)
    yield buf
    assert bytes(buf[:4]) == b"ssss"     # no test's write reached the parent
    with open(SETUPS, "a") as f:
        f.write("teardown ok\\n")

def test_pass(data):
    assert data[0] == ord("s")

def test_write_a(data):
    data[:4] = b"AAAA"
    assert bytes(data[:4]) == b"AAAA"

def test_write_b_sees_original(data):
    assert bytes(data[:4]) == b"ssss"
    data[:4] = b"BBBB"

def test_fail(data):
    print("visible output")
    assert data[0] == 0, "expected failure"

@pytest.mark.skip(reason="skipped on purpose")
def test_skip():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.xfail(strict=True, reason="strict")
def test_xpass_strict():
    pass

def test_crash():
    os.kill(os.getpid(), signal.SIGKILL)

def test_pid_differs():
    assert os.getpid() != int(os.environ["PYTEST_PARENT"])
"""


def _plugin_args():
    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    return [] if "odfork" in names else ["-p", "odfork_user.pytest_plugin"]


@pytest.fixture
def run_suite(pytester, tmp_path, monkeypatch):
    pytester.makepyfile(test_suite=SUITE)
    log = tmp_path / "setups.log"
    monkeypatch.setenv("SETUP_LOG", str(log))

    def run(*args):
        # the child pytest is a subprocess: PYTEST_PARENT is its own pid only in the parent process
        # of the tests, so give it the pid through a conftest instead
        pytester.makeconftest("import os\nos.environ['PYTEST_PARENT'] = str(os.getpid())\n")
        return pytester.runpytest_subprocess(*_plugin_args(), *args, "-rA"), log

    return run


def test_outcomes_match_pytest_forked_conventions(run_suite):
    result, log = run_suite("--odfork")
    result.assert_outcomes(passed=4, failed=3, skipped=1, xfailed=1)
    out = result.stdout.str()
    assert "visible output" in out  # captured output of a failing test
    assert "killed by signal 9 (SIGKILL)" in out  # a crashing child is a failure, not a hang
    assert "XPASS(strict)" in out or "[XPASS(strict)]" in out
    assert log.read_text() == "setup\nteardown ok\n"  # the session fixture was built once, in the parent


def test_without_the_flag_tests_run_in_process(run_suite):
    result, _ = run_suite()
    # no fork: test_write_b_sees_original fails (test_write_a's write is visible), and
    # the crashing test kills pytest itself before the last test runs
    out = result.stdout.str()
    assert "test_suite.py ..FFsxF" in out and result.ret != 0
    assert "test_pid_differs" not in out


def test_marker_selects_single_tests(pytester):
    pytester.makepyfile(
        test_m="""
import os, pytest
PARENT = os.getpid()
@pytest.mark.odfork
def test_forked():
    assert os.getpid() != PARENT
def test_not_forked():
    assert os.getpid() == PARENT
"""
    )
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=2)


PARITY_SUITE = """
import os, time, unittest, warnings
import pytest
import odfork_user as ou

def test_subtests(subtests):
    for i in range(3):
        with subtests.test(i=i):
            assert i != 1, "subtest one fails"

class TestUnit(unittest.TestCase):
    def test_subtest(self):
        for i in range(2):
            with self.subTest(i=i):
                self.assertEqual(i, 0)

def test_warns():
    warnings.warn("body warning", UserWarning)

def test_property(record_property):
    record_property("answer", 42)

def test_leaves_a_process_behind():
    child = ou.spawn(time.sleep, 30)
    with open(os.environ["LEFT_BEHIND"], "a") as f:
        f.write(f"{child.pid}\\n")
"""


def _outcomes(result):
    out = {}
    for rep in result.getreports("pytest_runtest_logreport"):
        if rep.when == "call" or rep.outcome != "passed":
            kwargs = getattr(getattr(rep, "context", None), "kwargs", None)
            # which subtest (some pytest versions repr the values once more when a report is
            # serialized, as they would for xdist: compare the names, and the values unquoted)
            which = None if kwargs is None else sorted((k, str(v).strip("'\"")) for k, v in kwargs.items())
            out.setdefault(rep.nodeid, []).append((type(rep).__name__, rep.outcome, which))
    return out


def test_odfork_reports_what_plain_pytest_reports(pytester, monkeypatch, tmp_path):
    import signal

    left = tmp_path / "left"
    monkeypatch.setenv("LEFT_BEHIND", str(left))
    pytester.makepyfile(test_parity=PARITY_SUITE)
    plain = pytester.inline_run("-p", "no:cacheprovider", "-W", "always")
    forked = pytester.inline_run("--odfork", "-p", "no:cacheprovider", "-W", "always")
    plain_out, forked_out = _outcomes(plain), _outcomes(forked)
    assert forked_out == plain_out
    # the subtest failures make their tests fail in both
    assert any(o == "failed" for _, o, _ in plain_out["test_parity.py::test_subtests"])
    for run in (plain, forked):
        rec = run.getcalls("pytest_warning_recorded")
        assert [str(c.warning_message.message) for c in rec if "body warning" in str(c.warning_message.message)] == [
            "body warning"
        ]
        props = [
            r.user_properties
            for r in run.getreports("pytest_runtest_logreport")
            if r.nodeid.endswith("test_property") and r.when == "call"
        ]
        assert props == [[("answer", 42)]]
    # the run did not wait for the process the test left behind: it is still running
    pids = [int(x) for x in left.read_text().split()]
    assert len(pids) == 2
    try:
        os.kill(pids[1], 0)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


COV_MODULE = """
def a(x):
    if x > 0:
        return "pos"
    return "neg"

def b():
    return 42

def never():
    return 0
"""
COV_TESTS = """
import covmod

def test_a():
    assert covmod.a(1) == "pos"

def test_b():
    assert covmod.b() == 42
"""


def test_coverage_with_odfork_equals_plain(pytester):
    pytest.importorskip("pytest_cov")
    pytester.makepyfile(covmod=COV_MODULE, test_cov=COV_TESTS)

    def total(*extra):
        res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--cov=covmod", "--cov-report=term", *extra)
        line = [ln for ln in res.outlines if ln.startswith("TOTAL")]
        assert line, res.outlines
        return line[-1].split()[-1]

    plain = total()
    assert plain == "75%"  # test_a and test_b leave 2 of 8 statements out
    assert total("--odfork") == plain


def test_pytest_timeout_kills_a_hanging_test_and_the_run_goes_on(pytester):
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(
        test_hang="""
import time

def test_hangs():
    time.sleep(60)

def test_after():
    pass
"""
    )
    res = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--odfork", "--timeout=2", "-o", "timeout_method=signal"
    )
    res.assert_outcomes(failed=1, passed=1)
    assert any("Timeout" in ln for ln in res.outlines), res.outlines


def test_xdist_with_odfork_gives_plain_xdist_outcomes(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_parity=PARITY_SUITE.split("def test_leaves_a_process_behind")[0])

    def summary(*extra):
        res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-W", "always", *extra)
        return res.parseoutcomes()

    plain = summary()
    assert plain.get("failed") == 3 and plain.get("warnings") == 1, plain  # two subtest failures + their test
    assert summary("--odfork") == plain


SELECT_SUITE = """
def test_1_fails():
    assert False

def test_2_passes():
    pass

def test_3_fails():
    assert False

def test_4_passes():
    pass
"""


def test_selection_and_stopping_options_match_plain_pytest(pytester):
    """-x, --maxfail, -k and --lf choose and stop the same tests with --odfork as without."""
    pytester.makepyfile(test_sel=SELECT_SUITE)

    def outcomes(*args):
        # (hypothesis, a plugin of the outer run, would be imported again by every inner run)
        rec = pytester.inline_run("-p", "no:hypothesispytest", *args)
        calls = sorted((r.nodeid, r.outcome) for r in rec.getreports("pytest_runtest_logreport") if r.when == "call")
        return rec.ret, calls

    for args in (["-x"], ["--maxfail=2"], ["-k", "passes or 3"], ["-p", "no:cacheprovider"]):
        plain = outcomes(*args)
        assert outcomes("--odfork", *args) == plain, args
    assert len(outcomes("-x")[1]) == 1 and len(outcomes("--maxfail=2")[1]) == 3
    # --lf after a plain run, and after an --odfork run: the cache the parent writes is the same
    outcomes()
    plain_lf = outcomes("--lf")
    outcomes("--odfork")
    assert outcomes("--odfork", "--lf") == plain_lf
    assert [o for _, o in plain_lf[1]] == ["failed", "failed"]


UNPICKLABLE_SUITE = """
import os, pytest

def test_subtest_keyed_by_a_local_instance(subtests):
    class Key:
        def __repr__(self):
            return "Key()"
    with subtests.test(key=Key()):
        assert True

def test_failing_subtest_keyed_by_a_local_instance(subtests):
    class Key:
        pass
    with subtests.test(key=Key()):
        assert False, "this subtest fails"

def test_property_is_a_lambda(record_property):
    record_property("fn", lambda: 1)
"""


def test_values_that_cannot_be_pickled_give_plain_pytests_outcome(pytester):
    pytester.makepyfile(test_unpicklable=UNPICKLABLE_SUITE)
    plain = pytester.inline_run("-p", "no:cacheprovider")
    forked = pytester.inline_run("--odfork", "-p", "no:cacheprovider")
    plain_out, forked_out = _outcomes(plain), _outcomes(forked)
    assert [n for n in plain_out if "without a report" in str(n)] == []
    assert {k: [(t, o) for t, o, _ in v] for k, v in forked_out.items()} == {
        k: [(t, o) for t, o, _ in v] for k, v in plain_out.items()
    }
    assert forked.ret == plain.ret == 1
    props = [
        r.user_properties
        for r in forked.getreports("pytest_runtest_logreport")
        if r.nodeid.endswith("test_property_is_a_lambda") and r.when == "call"
    ]
    assert len(props) == 1 and props[0][0][0] == "fn" and "lambda" in props[0][0][1]  # shown as its repr


def test_an_error_in_the_childs_protocol_shows_its_traceback(pytester):
    pytester.makeconftest("""
import os
PARENT = os.getpid()
def pytest_report_teststatus(report, config):
    if os.getpid() != PARENT and report.when == "call":
        raise RuntimeError("protocol boom in the child")
""")
    pytester.makepyfile(test_p="def test_p():\n    pass\n")
    result = pytester.runpytest_subprocess(*_plugin_args(), "--odfork", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "RuntimeError: protocol boom in the child" in out and "Traceback" in out
    assert "without a report" not in out


def test_the_plugin_loads_no_core_in_a_run_without_odfork(pytester):
    pytester.makepyfile(
        test_mods="""
import sys
def test_no_core():
    assert "odfork_user.pytest_plugin" in sys.modules      # the plugin is loaded...
    assert "odfork_user._ffi" not in sys.modules            # ...but not the C core
    assert "odfork_user._core" not in sys.modules
"""
    )
    result = pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_odfork_runs_do_not_warn_multi_threaded(pytester):
    """The folder runs in the pytest process (an arena, forks); no fork of the plugin warns (3.12+)."""
    pytester.makepyfile(
        test_w="""
import pytest, odfork_user as ou
ARENA = ou.Arena(16 << 20)        # kept: the folder watches live arenas only
@pytest.fixture(scope="session")
def buf():
    return ARENA.alloc(8 << 20)
@pytest.mark.parametrize("i", range(5))
def test_w(buf, i):
    buf[:] = bytes([i]) * len(buf)
"""
    )
    result = pytester.runpytest_subprocess(
        *_plugin_args(), "--odfork", "-p", "no:cacheprovider", "-W", "always::DeprecationWarning"
    )
    result.assert_outcomes(passed=5)
    assert "multi-threaded" not in result.stdout.str() + result.stderr.str()
