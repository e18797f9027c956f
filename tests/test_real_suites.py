"""Parity on real projects' test suites: each suite, from its source release on the
package index, is run by plain pytest and by `pytest --odfork`, and the two runs
must report the same thing test by test: every report (subtests included, with
which subtest), every recorded warning, the exit status.

    ODFORK_REAL_SUITES=all    every suite below (default: more-itertools only, which
                              has 2,300 subtests and warnings; about 20 s)

A suite whose source release cannot be downloaded (no index, no network) is skipped
and says why.  Releases are kept in ~/.cache/odfork_user/suites.
"""

import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

# name, version, test paths, extra pytest arguments (for both runs)
SUITES = [
    ("more-itertools", "10.5.0", ["tests"], []),
    ("toolz", "1.0.0", ["toolz/tests"], []),
    # boltons' conftest uses a hook argument pytest 9 rejects unless the warning is ignored
    ("boltons", "25.0.0", ["tests"], ["-W", "ignore::pytest.PytestRemovedIn9Warning"]),
]
DEFAULT = {"more-itertools"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "odfork_user" / "suites"

# Loaded into both runs with -p: records, in the pytest process, what the terminal
# would report.  Under --odfork the reports arrive there from the children.
RECORDER = """
import json, os, re

_out = {"reports": [], "warnings": []}

def _which(rep):
    ctx = getattr(rep, "context", None)          # a subtest report
    if ctx is None:
        return None
    # which subtest: its message and arguments, values unquoted (some pytest versions
    # repr them once more when a report is serialized, as they would for xdist)
    # (and addresses of objects, which differ from run to run)
    kwargs = sorted((k, re.sub("0x[0-9a-f]+", "0x?", str(v).strip("'\\"")))
                    for k, v in (getattr(ctx, "kwargs", None) or {}).items())
    return [getattr(ctx, "msg", None), kwargs]

def pytest_runtest_logreport(report):
    _out["reports"].append([report.nodeid, report.when, report.outcome, type(report).__name__,
                            _which(report), bool(getattr(report, "wasxfail", None))])

def pytest_warning_recorded(warning_message, when, nodeid, location):
    m = warning_message
    _out["warnings"].append([when, nodeid, m.category.__name__, str(m.message), m.filename, m.lineno])

def pytest_sessionfinish(session, exitstatus):
    _out["exitstatus"] = int(exitstatus)
    with open(os.environ["ODFORK_PARITY_OUT"], "w") as f:
        json.dump(_out, f)
"""


def _extract(tar, dest):
    """tar.extractall with the "data" filter where this Python has it (3.11.4+,
    3.12+); before that (the distribution's 3.11.2), only regular files and
    folders whose names stay inside `dest`."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    members = []
    for m in tar.getmembers():
        target = os.path.realpath(os.path.join(root, m.name))
        if not (m.isfile() or m.isdir()) or os.path.isabs(m.name) or os.path.commonpath([root, target]) != root:
            raise tarfile.TarError(f"refusing to extract {m.name!r} from {tar.name}")
        m.mode = (m.mode | 0o600) & 0o755 if m.isfile() else 0o755
        members.append(m)
    with warnings.catch_warnings():  # 3.12+ run here only in the test that takes this path on purpose
        warnings.filterwarnings("ignore", "Python 3.14 will, by default, filter", DeprecationWarning)
        tar.extractall(dest, members=members)


def _source(name, version):
    """The unpacked source release, downloaded once."""
    dest = CACHE / f"{name}-{version}"
    if (dest / ".complete").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    dl = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(CACHE),
            f"{name}=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    archives = sorted(CACHE.glob(f"{name.replace('-', '[-_]')}-{version}.tar.gz"))
    if dl.returncode or not archives:
        pytest.skip(
            f"the source release {name}=={version} could not be downloaded: "
            f"{(dl.stderr or dl.stdout).strip().splitlines()[-1:]}"
        )
    with tarfile.open(archives[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        _extract(tar, CACHE)
    (CACHE / top).rename(dest) if (CACHE / top) != dest else None
    (dest / ".complete").write_text("")
    return dest


def _run(src, paths, extra, odfork, tmp_path):
    out = tmp_path / ("odfork.json" if odfork else "plain.json")
    (tmp_path / "odfork_parity_recorder.py").write_text(RECORDER)
    env = dict(
        os.environ,
        ODFORK_PARITY_OUT=str(out),
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(src)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)),
    )
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "odfork_parity_recorder",
        "-p",
        "no:randomly",
        *extra,
        *paths,
    ] + (["--odfork"] if odfork else [])
    proc = subprocess.run(args, cwd=src, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout.strip().splitlines()[-1]


def _selected():
    if os.environ.get("ODFORK_REAL_SUITES") == "all":
        return SUITES
    return [s for s in SUITES if s[0] in DEFAULT]


@pytest.mark.parametrize("name,version,paths,extra", _selected(), ids=[s[0] for s in _selected()])
def test_real_suite_reports_the_same_with_odfork(name, version, paths, extra, tmp_path):
    if name == "boltons" and not hasattr(pytest, "PytestRemovedIn9Warning"):
        pytest.skip("boltons 25.0.0's conftest does not load under pytest 9.1+ (plain pytest fails too)")
    src = _source(name, version)
    plain, plain_summary = _run(src, paths, extra, False, tmp_path)
    forked, forked_summary = _run(src, paths, extra, True, tmp_path)
    assert plain["reports"], plain_summary  # the suite ran
    assert forked["exitstatus"] == plain["exitstatus"], (plain_summary, forked_summary)
    assert sorted(map(json.dumps, forked["reports"])) == sorted(map(json.dumps, plain["reports"]))
    assert sorted(map(json.dumps, forked["warnings"])) == sorted(map(json.dumps, plain["warnings"]))
    # the terminal summary lines agree but for the time
    assert forked_summary.rsplit(" in ", 1)[0] == plain_summary.rsplit(" in ", 1)[0]
