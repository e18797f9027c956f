"""Python objects in an arena (odfork_user.install) vs the ordinary heap, side by side.

A worker process (bench/heap_worker.py) holds a dict of ODFORK_HEAP_OBJECTS
str -> int entries (default 8,000,000, ~1.1 GB here) in one of:
  empty        an empty interpreter (the floor of os.fork)
  os           the ordinary heap (pymalloc + glibc malloc, 4 KiB pages), os.fork
  run          the same worker, unmodified, under `python -m odfork_user run` (the
               launcher installs the heap, in the default arena, before the program)
  odfork       odfork_user.install() into an arena before building, the default configuration
               (page mode: private views at fork time, background folding)
  odfork-chunk the same, Arena(cow="chunk"): whole 2 MiB copies
each with and without gc.freeze().  Groups:
  heap-0-build          building the dict (the allocator's speed; measured once per worker)
  heap-1-fork-latency   fork until it returns in the parent
  heap-2-child-pickle   the child pickles the whole dict (reference counts are written:
                        a reading child still copies), with the memory it made private
  heap-3-parent-mutate  the parent rewrites 10% of the values while a child is alive
  heap-4-child-collect  the child runs gc.collect() (what gc.freeze() saves), with the
                        memory it made private
The timed call is one command to the worker and its answer (a pipe round trip,
~50 us, the same for every kind); the worker's own timing of the operation is
in extra_info["inner_s"], and bench/report.py reports that.
"""

import json
import os
import subprocess
import sys

import pytest

from benchlib import require_memory

HERE = os.path.dirname(os.path.abspath(__file__))
N = int(os.environ.get("ODFORK_HEAP_OBJECTS", "8000000"))
KINDS = [
    ("empty", 0),
    ("os", 0),
    ("os", 1),
    ("run", 0),
    ("run", 1),
    ("odfork", 0),
    ("odfork", 1),
    ("odfork-chunk", 0),
    ("odfork-chunk", 1),
]


class Worker:
    def __init__(self, mode, freeze, n):
        env = dict(os.environ)
        # the worker imports the same odfork_user as this process (installed or built in place)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__import__("odfork_user").__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_parent, env.get("PYTHONPATH", "")] if p)
        # run: the unmodified worker under the launcher, which installs the heap before it
        launcher = ["-m", "odfork_user", "run"] if mode == "run" else []
        self.p = subprocess.Popen(
            [sys.executable, "-P", *launcher, os.path.join(HERE, "heap_worker.py"), mode, str(freeze), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self.read()
        assert ready["ready"] and ready["n"] == (n if mode != "empty" else 0)

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died (exit {self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.ask("quit")
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        self.p.wait(timeout=60)


@pytest.fixture(scope="module", params=KINDS, ids=lambda k: f"{k[0]}{'-freeze' if k[1] else ''}")
def worker(request):
    mode, freeze = request.param
    if mode != "empty":
        require_memory(N * 150, 2.5)  # ~140 bytes per entry here; a child may copy all of it
    w = Worker(mode, freeze, N)
    w.kind = f"{mode}{'-freeze' if freeze else ''}"
    yield w
    w.close()


def _run(benchmark, worker, group, cmd, key, rounds):
    benchmark.group = f"{group}-{N // 1000}k"
    inner, extra = [], {}

    def target():
        res = worker.ask(cmd)
        inner.append(res[key])
        for k, v in res.items():
            extra.setdefault(k, []).append(v)
        return res

    res = benchmark.pedantic(target, rounds=rounds, warmup_rounds=0)
    stats = worker.ask("stats")
    inner.sort()
    benchmark.extra_info.update(
        kind=worker.kind,
        objects=N,
        inner_s=inner[len(inner) // 2],
        rss=stats["rss"],
        build_s=stats["build_s"],
        heap=stats["heap"],
        **{k: sorted(v)[len(v) // 2] for k, v in extra.items() if k != key},
    )
    return res


def test_build(benchmark, worker):
    # the build ran when the worker started; this records it (the timed call is a stats query)
    benchmark.group = f"heap-0-build-{N // 1000}k"
    stats = benchmark.pedantic(lambda: worker.ask("stats"), rounds=1)
    benchmark.extra_info.update(
        kind=worker.kind, objects=N, inner_s=stats["build_s"], rss=stats["rss"], heap=stats["heap"]
    )
    assert stats["build_s"] >= 0


def test_fork_latency(benchmark, worker):
    res = _run(benchmark, worker, "heap-1-fork-latency", "fork", "fork_s", 15)
    assert res["fork_s"] > 0


def test_child_pickle(benchmark, worker):
    if worker.kind == "empty":
        pytest.skip("nothing to pickle")
    res = _run(benchmark, worker, "heap-2-child-pickle", "pickle", "child_s", 3)
    assert res["bytes"] > N * 5  # the whole dict was pickled


def test_child_collect(benchmark, worker):
    if worker.kind == "empty":
        pytest.skip("nothing to collect")
    res = _run(benchmark, worker, "heap-4-child-collect", "collect", "child_s", 3)
    assert res["child_s"] > 0


def test_parent_mutate(benchmark, worker):
    if worker.kind == "empty":
        pytest.skip("nothing to mutate")
    res = _run(benchmark, worker, "heap-3-parent-mutate", "mutate", "parent_s", 3)
    assert res["parent_s"] > 0
