"""Type hints: the package ships py.typed, mypy passes on it, and a user's code is checked against it."""

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent


def test_py_typed_is_installed():
    files = [str(f) for f in importlib.metadata.distribution("odfork_user").files or ()]
    assert "odfork_user/py.typed" in files, files


def _mypy(*args, cwd):
    pytest.importorskip("mypy")
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    env.pop("PYTHONPATH", None)  # the installed package, as a user's checker sees it
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_mypy_passes_on_the_package(tmp_path):
    if not (SRC / "pyproject.toml").exists():
        pytest.skip("not run from a source tree")
    proc = _mypy("--cache-dir", str(tmp_path / "cache"), cwd=SRC)  # [tool.mypy] in pyproject.toml
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_user_code_is_checked_against_the_public_api(tmp_path):
    (tmp_path / "user.py").write_text(
        textwrap.dedent("""
        import odfork_user as ou

        def square(x: int) -> int:
            return x * x

        child = ou.spawn(square, 3)
        n: int = child.result(timeout=1.0)
        wrong: str = child.result()                 # error: int is not str
        ou.spawn(square, "three")                   # error: str is not int
        with ou.Arena(1 << 22) as arena:
            view: memoryview = arena.alloc(64)
            stats: dict[str, int] = arena.stats()
            with arena.snapshot() as snap:
                snap.buffer()
        pid: int = ou.odfork()
        err: ou.ChildError = ou.ChildError("x", exitcode=1)
        ou.install(arena, size="big")               # error: str is not int | None
    """)
    )
    proc = _mypy("--cache-dir", str(tmp_path / "cache"), "user.py", cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in lines] == ["9", "10", "18"], proc.stdout + proc.stderr
