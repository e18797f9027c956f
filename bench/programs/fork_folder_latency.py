"""odfork() latency with the background folder running: a 1 GiB arena, every
byte written, the child leaves at once; before each fork the folder has folded
every view back (the steady state of a process that forks now and then).
Prints the median and quartiles of odfork()'s own time over N forks.

    python -P bench/programs/fork_folder_latency.py [N] [GiB]
"""

import os
import statistics
import sys
import time

import odfork_user as ou

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
size = int(float(sys.argv[2]) * (1 << 30)) if len(sys.argv) > 2 else 1 << 30
arena = ou.Arena(size + (64 << 20))
buf = arena.alloc(size)
buf[:] = b"\x01" * size
times = []
for i in range(n + 5):
    deadline = time.time() + 30
    while arena.stats()["views"]:  # the folder folded what the last fork left
        if time.time() > deadline:
            sys.exit(f"views not folded: {arena.stats()}")
        time.sleep(0.005)
    buf[i * 4096 % size] = i & 0xFF  # one written page, as a working process has
    t0 = time.perf_counter()
    pid = ou.odfork()
    t1 = time.perf_counter()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    if i >= 5:  # the first forks start the folder
        times.append((t1 - t0) * 1e3)
q = statistics.quantiles(times, n=4)
print(
    f"python {sys.version.split()[0]}: odfork() of {size >> 20} MiB written, {n} forks: "
    f"median {statistics.median(times):.3f} ms (quartiles {q[0]:.3f}-{q[2]:.3f})"
)
