"""`python -m odfork_user run` and ODFORK_RUN: an unmodified program, run as python runs it,
with its heap (and numpy's data) in an arena, and every fork it makes isolated."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import os, sys
    print("argv", sys.argv)
    print("name", __name__)
    print("path", sys.path)
    print("spec", __spec__.name if __spec__ else None)
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "raise":
        def inner():
            raise ValueError("boom")
        inner()
    if what == "interrupt":
        raise KeyboardInterrupt
    if what.isdigit():
        sys.exit(int(what))
""")


def _py(args, cwd, env=None):
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "prog.py").write_text(PROBE)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(PROBE)
    return tmp_path


@pytest.mark.parametrize(
    "argv",
    [
        ["prog.py", "a", "b"],
        ["prog.py", "3"],
        ["prog.py", "raise"],
        ["prog.py", "--flag", "-q", "-m", "x"],
        ["-m", "pkg", "x"],
        ["-m", "pkg", "4"],
        ["-m", "pkg", "raise"],
        ["-m", "pkg", "--odfork", "-q", "-p", "no:x"],
    ],
    ids=[
        "script",
        "script-exit",
        "script-raise",
        "script-options",
        "module",
        "module-exit",
        "module-raise",
        "module-options",
    ],
)
def test_run_behaves_as_python(probe, argv):
    plain = _py(argv, probe)
    ran = _py(["-P", "-m", "odfork_user", "run", *argv], probe)
    # -m: python puts the cwd in sys.path[0] and so must run; a script's own folder otherwise
    assert (ran.returncode, ran.stdout, ran.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert plain.returncode == {"3": 3, "4": 4, "raise": 1}.get(argv[-1], 0)


def test_an_interrupted_program_ends_as_under_python(probe):
    plain = _py(["prog.py", "interrupt"], probe)
    ran = _py(["-P", "-m", "odfork_user", "run", "prog.py", "interrupt"], probe)
    assert plain.returncode == ran.returncode == -signal.SIGINT
    assert ran.stderr == plain.stderr


WORKLOAD = textwrap.dedent("""
    import os, sys, multiprocessing
    import odfork_user as ou
    data = {i: "v%d" % i for i in range(200000)}
    blob = bytearray(b"p" * (8 << 20))
    arena = ou.default_arena()
    def in_arena(addr):
        return arena.address <= addr < arena.address + arena.size
    print("installed:", ou.installed())
    print("objects in arena:", in_arena(id(data[12345])), in_arena(id(blob)))
    try:
        import numpy as np
        from numpy._core.multiarray import get_handler_name
    except ImportError:
        np = None
    if np is not None:
        arr = np.full(1 << 20, 7, dtype=np.int64)
        print("numpy handler:", get_handler_name(arr), in_arena(arr.ctypes.data))
    def child_writes(_):
        blob[:4] = b"CHLD"
        data[0] = "child"
        if np is not None:
            arr[:] = -1
        return bytes(blob[:4]), data[0], (int(arr.sum()) if np is not None else None)
    with multiprocessing.get_context("fork").Pool(2, maxtasksperchild=1) as pool:
        got = pool.map(child_writes, range(4))
    print("children saw:", sorted(set(got)))
    print("parent sees:", bytes(blob[:4]), data[0], int(arr.sum()) if np is not None else None)
    pid = os.fork()
    if pid == 0:
        blob[:4] = b"FORK"
        os._exit(0 if bytes(blob[:4]) == b"FORK" else 1)
    _, status = os.waitpid(pid, 0)
    print("os.fork child:", status, bytes(blob[:4]))
""")


@pytest.mark.parametrize("how", ["run", "env"])
def test_forks_of_an_unmodified_program_are_isolated(tmp_path, how):
    (tmp_path / "work.py").write_text(WORKLOAD)
    if how == "run":
        p = _py(["-P", "-m", "odfork_user", "run", "work.py"], tmp_path)
    else:
        p = _py(["work.py"], tmp_path, env={"ODFORK_RUN": "1"})
    assert p.returncode == 0, p.stderr
    out = dict(line.split(": ", 1) for line in p.stdout.splitlines())
    assert out["installed"] == "True"
    if sys.version_info < (3, 12):
        # the headers of small objects come from pymalloc's arenas made before install while
        # those have free pools, which on 3.12+ they still have when the program starts
        assert out["objects in arena"] == "True True"
    assert "parent sees" in out and out["parent sees"].startswith("b'pppp' v0")
    assert out["children saw"].startswith("[(b'CHLD', 'child'")
    assert out["os.fork child"] == "0 b'pppp'"
    if "numpy handler" in out:
        assert out["numpy handler"] == "odfork_user True"  # numpy's data went to the arena heap
        assert out["parent sees"] == "b'pppp' v0 " + str(7 << 20)
        assert out["children saw"] == "[(b'CHLD', 'child', -1048576)]"


def test_without_run_nothing_is_installed(tmp_path):
    (tmp_path / "work.py").write_text(WORKLOAD)
    p = _py(["work.py"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "installed: False" in p.stdout
    assert "numpy handler: odfork_user" not in p.stdout
    assert "objects in arena: False False" in p.stdout


def test_heap_stats_names_where_memory_is(tmp_path):
    (tmp_path / "big.py").write_text("data = [str(i) * 20 for i in range(300000)]\n")
    p = _py(["-P", "-m", "odfork_user", "run", "--heap-stats", "big.py"], tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    heap = [ln for ln in lines if ln.strip().startswith("arena heap:")]
    assert heap, p.stderr
    in_arenas = float(heap[0].split(" in blocks, ")[1].split()[0])
    assert in_arenas >= 20, heap  # the strings are in the heap's pymalloc arenas (~ 40 MiB)
    assert any("[heap]" in ln for ln in lines)


def test_gc_freeze_option_freezes_before_every_fork(tmp_path):
    (tmp_path / "g.py").write_text(
        textwrap.dedent("""
        import gc, os
        objs = [[i] for i in range(1000)]
        r, w = os.pipe()
        if os.fork() == 0:
            os.write(w, str(gc.get_freeze_count()).encode())
            os._exit(0)
        os.wait()
        print(int(os.read(r, 32)) >= 1000)
    """)
    )
    on = _py(["-P", "-m", "odfork_user", "run", "--gc-freeze", "g.py"], tmp_path)
    off = _py(["-P", "-m", "odfork_user", "run", "g.py"], tmp_path)
    env = _py(["g.py"], tmp_path, env={"ODFORK_RUN": "1", "ODFORK_GC_FREEZE": "1"})
    assert (on.stdout, off.stdout, env.stdout) == ("True\n", "False\n", "True\n"), (on.stderr, off.stderr)


PASS_WARN_FAIL = textwrap.dedent("""
    import warnings
    def test_a():
        pass
    def test_b():
        warnings.warn("mine")
    def test_c():
        assert 1 == 2
""")  # three tests: one passes, one warns, one fails


def test_pytest_under_run_reports_what_plain_pytest_reports(tmp_path):
    (tmp_path / "test_x.py").write_text(PASS_WARN_FAIL)
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:cov", "-p", "no:hypothesispytest"]
    plain = _py(args, tmp_path)
    ran = _py(["-P", "-m", "odfork_user", "run", *args], tmp_path)
    ran_forked = _py(["-P", "-m", "odfork_user", "run", *args, "--odfork"], tmp_path)
    summary = [p.stdout.strip().splitlines()[-1].rsplit(" in ", 1)[0] for p in (plain, ran, ran_forked)]
    assert summary == ["1 failed, 2 passed, 1 warning"] * 3, (summary, ran.stdout[-2000:])
    assert plain.returncode == ran.returncode == ran_forked.returncode == 1


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_pytest_under_run_never_dies_in_a_loop(tmp_path):
    # The stress form of the test above, as an ordinary user runs it (no full
    # userfaultfd): ODFORK_STRESS_LOOPS runs (default 200) of pytest --odfork
    # under run, every one with the same outcome.  A fold racing a signal frame
    # on faulthandler's alternate stack (in the arena under run) killed about
    # one run in eight with SIGSEGV.  Run by CI with -m slow.
    (tmp_path / "test_x.py").write_text(PASS_WARN_FAIL)
    args = [
        "-P",
        "-m",
        "odfork_user",
        "run",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:cov",
        "-p",
        "no:hypothesispytest",
        "test_x.py",
        "--odfork",
    ]
    codes = {}
    for _ in range(int(os.environ.get("ODFORK_STRESS_LOOPS", "200"))):
        p = _py(args, tmp_path)
        codes[p.returncode] = codes.get(p.returncode, 0) + 1
        if p.returncode != 1:
            last = p.stdout[-2000:] + p.stderr[-2000:]
    assert list(codes) == [1], (codes, last)
