"""Quick mode of the real workloads (bench/workloads.py): they run, agree with each other, and
every mode of each produces its result (timings are reported, never asserted)."""

import json
import os

import pytest

from testlib import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "bench", "workloads.py")), reason="no bench/ folder")
def test_workloads_quick(tmp_path):
    pytest.importorskip("pytest_forked")
    out = tmp_path / "w.json"
    p = python(os.path.join(ROOT, "bench", "workloads.py"), "--quick", "--json", str(out), timeout=600)
    assert p.returncode == 0, p
    res = json.loads(out.read_text())
    plugin = res["plugin"]["results"]
    assert all(r["ok"] and r["tests"] == 20 for r in plugin.values())
    # our runners always run; pytest-forked may be unavailable (it breaks under some pytest versions)
    assert all("unavailable" not in r for k, r in plugin.items() if "--odfork" in k)
    fuzz = res["fuzz"]["results"]
    assert set(fuzz) == {"os.fork", "odfork", "snapshot"} and all(r["crashes"] == 1 for r in fuzz.values())
    kv = res["kv"]["results"]
    assert set(kv) == {"os.fork", "odfork", "snapshot"}
    assert all(r["requests"] > 100 and r["snapshots"] >= 1 for r in kv.values())
