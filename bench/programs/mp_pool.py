"""An ordinary multiprocessing program (nothing of odfork_user in it): a process
holding a dict of str and a numpy array hands tasks to Pool(4,
maxtasksperchild=1), so every task is run by a freshly forked worker.

    python mp_pool.py --dict-bytes 1G --array-bytes 1G --tasks 40 [--json FILE]
    python -m odfork_user run mp_pool.py ...      (the same program, heap in an arena)

Prints tasks per second; each task reads a slice of the array and a few keys.
"""

import argparse
import json
import multiprocessing
import time

import numpy as np

_state = {}


def _size(text):
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text)


def task(i):
    d, a = _state["dict"], _state["array"]
    n = len(d)
    keys = [f"k{(i * 7919 + j) % n}" for j in range(100)]
    step = len(a) // 64
    return sum(len(d[k]) for k in keys) + int(a[(i % 64) * step : (i % 64) * step + 4096].sum())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dict-bytes", type=_size, default=1 << 30)
    p.add_argument("--array-bytes", type=_size, default=1 << 30)
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--json")
    a = p.parse_args()
    t0 = time.perf_counter()
    value = "x" * 100
    _state["dict"] = {f"k{i}": value + str(i) for i in range(a.dict_bytes // 200)}  # ~200 B an entry
    _state["array"] = np.arange(a.array_bytes // 8, dtype=np.int64)
    build = time.perf_counter() - t0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4, maxtasksperchild=1) as pool:
        pool.map(task, range(4))  # start-up of the pool itself
        t0 = time.perf_counter()
        results = pool.map(task, range(a.tasks), chunksize=1)
        wall = time.perf_counter() - t0
    assert results == [task(i) for i in range(a.tasks)]
    out = {
        "tasks": a.tasks,
        "seconds": wall,
        "tasks_per_s": a.tasks / wall,
        "build_s": build,
        "dict_entries": len(_state["dict"]),
        "array_bytes": _state["array"].nbytes,
    }
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
