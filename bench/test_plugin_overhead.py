"""Per-test cost of isolating tests: N trivial tests (default 300, ODFORK_PLUGIN_TESTS) run

  plain        pytest as it is (the floor)
  odfork       pytest --odfork (each body in an odfork child)
  forked       pytest --forked (pytest-forked; skipped where it does not run)
  isolate      pytest --isolate (pytest-isolate, run with -p no:timeout: it yields to
               pytest-timeout otherwise; not installed by the extras because it warns at
               every pytest start next to pytest-timeout: pip install pytest-isolate)

each as one fresh pytest process per round, side by side in one run.  extra_info has
the cost per test beyond plain, in ms.  Results are asserted (every test passed), times
never are.
"""

import importlib.util
import os
import subprocess
import sys
import time

import pytest

N = int(os.environ.get("ODFORK_PLUGIN_TESTS", "300"))
KINDS = {
    "plain": [],
    "odfork": ["--odfork"],
    "forked": ["-p", "pytest_forked", "--forked"],
    "isolate": ["-p", "no:timeout", "--isolate"],
}
_plain_s = {}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    d = tmp_path_factory.mktemp("trivial")
    (d / "test_trivial.py").write_text("".join(f"def test_{i}():\n    assert {i} >= 0\n" for i in range(N)))
    return d


def _run(suite, args):
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cov", *args, str(suite)],
        capture_output=True,
        text=True,
        cwd=suite,
    )
    return time.perf_counter() - t0, p


@pytest.mark.parametrize("kind", list(KINDS))
def test_per_test_overhead(benchmark, suite, kind):
    mod = {"forked": "pytest_forked", "isolate": "pytest_isolate"}.get(kind)
    if mod and importlib.util.find_spec(mod) is None:
        pytest.skip(f"{mod} is not installed")
    benchmark.group = f"plugin-per-test-{N}"
    runs = []

    def one():
        runs.append(_run(suite, KINDS[kind]))

    benchmark.pedantic(one, rounds=3, iterations=1)
    seconds, p = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    if kind == "forked" and p.returncode:
        pytest.skip(f"pytest-forked does not run here: {(p.stdout + p.stderr).strip().splitlines()[-1][:200]}")
    assert p.returncode == 0 and f"{N} passed" in p.stdout, p.stdout + p.stderr
    if kind == "plain":
        _plain_s["s"] = seconds
    benchmark.extra_info.update(
        kind=kind,
        tests=N,
        seconds=seconds,
        per_test_beyond_plain_ms=(seconds - _plain_s["s"]) * 1e3 / N if "s" in _plain_s else None,
    )
