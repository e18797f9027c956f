"""What a full collection in a forked child costs, and what gc.freeze() saves.

    python bench/programs/gc_freeze.py 0|1                         (1: gc.freeze() before the fork)
    python -m odfork_user run [--gc-freeze] bench/programs/gc_freeze.py 0

Builds 2,000,000 tuples and lists (objects the collector tracks), forks, and the
child runs gc.collect(): prints its time and the memory it made private
(Private_Dirty growth), which is every page of tracked objects unless they were
frozen before the fork.
"""

import gc
import json
import os
import sys
import time

freeze = len(sys.argv) > 1 and sys.argv[1] == "1"
data = [(str(i), [i]) for i in range(2_000_000)]
if freeze:
    gc.freeze()


def private_dirty():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) << 10
    return 0


r, w = os.pipe()
pid = os.fork()
if pid == 0:
    before, t = private_dirty(), time.perf_counter()
    gc.collect()
    t = time.perf_counter() - t
    os.write(w, json.dumps([t, private_dirty() - before]).encode())
    os._exit(0)
os.close(w)
t, copied = json.loads(os.read(r, 100))
os.waitpid(pid, 0)
print(
    f"gc.freeze() before the fork: {freeze or gc.get_freeze_count() > 0}; child's gc.collect() "
    f"{t * 1e3:.0f} ms, copied {copied / 2**20:.0f} MiB"
)
