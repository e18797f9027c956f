"""Real workloads, each measured against what a user runs today, in one run on one machine.

  plugin  a generated suite of N tests sharing a session fixture of SIZE bytes:
          pytest --odfork (fixture in an arena) vs pytest --forked (pytest-forked,
          fixture in ordinary memory) vs pytest --odfork --odfork-with=os (our
          protocol with os.fork, fixture in ordinary memory); tests per second
  fuzz    examples/fuzz_server.py: executions per second, os.fork / odfork / snapshot
  kv      examples/kvserver.py: request latency while snapshotting, os.fork / odfork / snapshot
  mp      bench/programs/mp_pool.py, an ordinary multiprocessing program (Pool(4,
          maxtasksperchild=1): a fork per task) holding a dict of str and a numpy
          array: tasks per second under python vs python -m odfork_user run, and an
          empty interpreter's (the floor)

    python bench/workloads.py [--quick] [--json bench/results/workloads.json]

--quick (CI): small sizes, a few seconds each.  bench/report.py puts the JSON into RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CONFTEST = """
import os, pytest
SIZE = int(os.environ["WL_SIZE"])

@pytest.fixture(scope="session")
def data():
    if os.environ["WL_MEMORY"] == "arena":
        import odfork_user as ou
        arena = ou.Arena(SIZE)
        buf = arena.alloc(SIZE)
    else:
        buf = memoryview(bytearray(SIZE))
    block = bytes(range(256)) * 8192
    for off in range(0, SIZE, len(block)):          # the expensive set-up: fill all of it
        buf[off:off + len(block)] = block[:SIZE - off]
    return buf
"""

TESTS = """
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_case(data, i):
    step = len(data) // {n}
    off = i * step
    assert data[off] == off % 256          # every test starts from the fixture's bytes
    data[off] = (data[off] + 1) % 256      # and changes some of them
    data[(off + 12345) % len(data)] ^= 0xFF
"""


def _plugin_args():
    import importlib.metadata

    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    return [] if "odfork" in names else ["-p", "odfork_user.pytest_plugin"]


def _pytest_forked_works():
    """pytest-forked 1.7.5 fails every test under pytest 9.2 (its child exits with status 3):
    probe it on one trivial test.  Returns None if it works, else the reason."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "test_probe.py"), "w") as f:
            f.write("def test_probe():\n    pass\n")
        p = subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "pytest_forked",
                "--forked",
                d,
            ],
            capture_output=True,
            text=True,
            cwd=d,
        )
        if p.returncode == 0:
            return None
        import pytest

        return (
            f"pytest-forked does not run here under pytest {pytest.__version__}: "
            + (p.stdout + p.stderr).strip().splitlines()[-1][:200]
        )


def run_plugin(n, size):
    results = {}
    forked_problem = _pytest_forked_works()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "conftest.py"), "w") as f:
            f.write(CONFTEST)
        with open(os.path.join(d, "test_gen.py"), "w") as f:
            f.write(TESTS.format(n=n))
        configs = {
            "pytest --odfork (arena fixture)": ([*_plugin_args(), "--odfork"], "arena"),
            "pytest --odfork --odfork-with=os (bytearray fixture)": (
                [*_plugin_args(), "--odfork", "--odfork-with=os"],
                "bytearray",
            ),
            "pytest --forked (pytest-forked, bytearray fixture)": (["-p", "pytest_forked", "--forked"], "bytearray"),
        }
        for name, (args, memory) in configs.items():
            if "--forked" in args and forked_problem:
                results[name] = {"tests": n, "unavailable": forked_problem, "ok": True}
                continue
            env = dict(os.environ, WL_SIZE=str(size), WL_MEMORY=memory)
            t0 = time.perf_counter()
            p = subprocess.run(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-p",
                    "no:hypothesispytest",
                    "-p",
                    "no:benchmark",
                    *args,
                    d,
                ],
                capture_output=True,
                text=True,
                env=env,
                cwd=d,
            )
            wall = time.perf_counter() - t0
            ok = p.returncode == 0 and f"{n} passed" in p.stdout
            results[name] = {"tests": n, "seconds": wall, "tests_per_s": n / wall, "ok": ok}
            if not ok:
                results[name]["output"] = (p.stdout + p.stderr)[-2000:]
    return results


def run_example(script, args):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [sys.executable, "-P", os.path.join(ROOT, "examples", script), *args, "--json", f.name],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.load(open(f.name))


def run_mp(dict_bytes, array_bytes, tasks):
    prog = os.path.join(HERE, "programs", "mp_pool.py")
    kinds = {
        "python (empty)": ([], "1M", "1M"),
        "python": ([], dict_bytes, array_bytes),
        "python -m odfork_user run": (["-m", "odfork_user", "run"], dict_bytes, array_bytes),
    }
    out = {}
    for name, (launcher, db, ab) in kinds.items():
        p = subprocess.run(
            [sys.executable, "-P", *launcher, prog, "--dict-bytes", db, "--array-bytes", ab, "--tasks", str(tasks)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--only", choices=("plugin", "fuzz", "kv", "mp"), action="append")
    a = p.parse_args(argv)
    which = a.only or ["plugin", "fuzz", "kv", "mp"]
    out = {"quick": a.quick}
    if "plugin" in which:
        n, size = (20, 32 << 20) if a.quick else (200, 1 << 30)
        out["plugin"] = {"size": size, "results": run_plugin(n, size)}
        print(f"plugin: {n} tests sharing a {size >> 20} MiB session fixture")
        for name, r in out["plugin"]["results"].items():
            if "unavailable" in r:
                print(f"  {name:<55} unavailable: {r['unavailable']}")
                continue
            print(
                f"  {name:<55} {r['tests_per_s']:8.1f} tests/s  ({r['seconds']:.1f} s){'' if r['ok'] else '  FAILED'}"
            )
    if "fuzz" in which:
        out["fuzz"] = run_example(
            "fuzz_server.py", ["--size", "32M", "--execs", "30"] if a.quick else ["--size", "1G", "--execs", "300"]
        )
        print(f"fuzz: state {out['fuzz']['size'] >> 20} MiB")
        for name, r in out["fuzz"]["results"].items():
            print(f"  {name:<10} {r['execs_per_s']:10.1f} execs/s")
    if "kv" in which and os.path.exists(os.path.join(ROOT, "examples", "kvserver.py")):
        out["kv"] = run_example(
            "kvserver.py", ["--size", "32M", "--seconds", "2"] if a.quick else ["--size", "2G", "--seconds", "12"]
        )
        print(f"kv: {out['kv']['size'] >> 20} MiB of data")
        for name, r in out["kv"]["results"].items():
            print(
                f"  {name:<10} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.2f} ms"
                f"  (during snapshots: max {r['max_during_ms']:.2f} ms)"
            )
    if "mp" in which:
        db, ab, n = ("32M", "32M", 20) if a.quick else ("1G", "1G", 200)
        out["mp"] = {"dict_bytes": db, "array_bytes": ab, "results": run_mp(db, ab, n)}
        print(f"mp: multiprocessing Pool(4, maxtasksperchild=1), {db} dict of str + {ab} numpy array")
        for name, r in out["mp"]["results"].items():
            print(f"  {name:<30} {r['tasks_per_s']:8.1f} tasks/s  (build {r['build_s']:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = [n for n, r in out.get("plugin", {}).get("results", {}).items() if not r["ok"]]
    if bad:
        print("failed runs:", bad, file=sys.stderr)
        for n in bad:
            print(out["plugin"]["results"][n].get("output", ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
