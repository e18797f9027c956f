"""Packaging: what the installed distribution and the source distribution carry."""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import odfork_user as ou

SRC = Path(__file__).resolve().parent.parent  # the source tree these tests came from


def _dist():
    return importlib.metadata.distribution("odfork_user")


def test_version_is_written_once_and_matches_the_metadata():
    assert _dist().version == ou.__version__
    if (SRC / "pyproject.toml").exists():
        import tomllib

        project = tomllib.loads((SRC / "pyproject.toml").read_text())["project"]
        assert "version" not in project and "version" in project["dynamic"]


def test_license_is_mit_with_its_file():
    meta = _dist().metadata
    assert meta.get("License-Expression") == "MIT", dict(meta)
    files = [str(f) for f in _dist().files or ()]
    assert any(f.endswith("LICENSE") for f in files), files
    text = (SRC / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the odfork_user authors" in text


def test_build_script_is_not_in_the_installed_package():
    files = [str(f) for f in _dist().files or ()]
    assert any(f.endswith("odfork_user/__init__.py") for f in files), files
    assert not [f for f in files if "_ffi_build" in f]
    assert not (Path(ou.__file__).parent / "_ffi_build.py").exists()


def test_sdist_carries_tests_docs_and_the_build_script(tmp_path):
    pytest.importorskip("build")
    if not (SRC / "setup.py").exists():
        pytest.skip("not run from a source tree")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(SRC)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS=""),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "license` as a TOML table is deprecated" not in proc.stdout + proc.stderr
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for want in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "CONTRIBUTING.md",
        "docs/API.md",
        "docs/DESIGN.md",
        "docs/LIMITS.md",
        "tests/conftest.py",
        "tests/test_core.py",
        "csrc/core/odfork.h",
        "src/odfork_user/_ffi_build.py",
        "setup.py",
        "pyproject.toml",
    ):
        assert want in names, want
    assert not [n for n in names if "__pycache__" in n or n.endswith((".so", ".pyc"))]
