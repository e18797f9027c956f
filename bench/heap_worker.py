"""A process holding a dict of N small objects, forked on request.

    python bench/heap_worker.py MODE FREEZE N

MODE: empty (no dict: an empty interpreter's os.fork), os (the dict in the
ordinary heap, os.fork), run (this program unchanged under `python -m odfork_user
run`: the launcher installed the heap), odfork (odfork_user.install() into an arena, then the
dict; the arena's default configuration: page mode (private views at fork time,
the kernel copies the pages written, background folding), odfork-chunk (the same with
Arena(cow="chunk"): whole 2 MiB copies).
FREEZE: 1 runs gc.freeze() after building (the usual trick against the
collector's writes).  Commands on stdin, one per line, each answered with one
JSON line on stdout (timings measured here, in the process that does the work):
  fork    fork, the child _exits at once; {"fork_s": until fork returns}
  pickle  fork, the child pickles the whole dict; {"child_s", "child_copied"}
  collect fork, the child runs gc.collect(); {"child_s", "child_copied"}
  mutate  fork, the child stays alive while the parent rewrites 10% of the
          values; {"parent_s", "parent_copied"}
  stats   {"rss", "build_s", "heap": heap_stats() or None}
"copied" is memory the writes made private: the growth of Private_Dirty
(smaps_rollup; pages the kernel copied) plus the arena's bytes_copied (whole
chunks the core copied into pool segments, shared memory that Private_Dirty
does not count).  Every fork here is os.fork(): with install() it is an on-demand
fork through the at-fork hooks.
"""

import gc
import json
import os
import pickle
import sys
import time

MODE, FREEZE, N = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])


def private_dirty():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if MODE in ("odfork", "odfork-chunk"):
    import odfork_user as ou

    arena = ou.Arena(64 << 30, cow="chunk" if MODE == "odfork-chunk" else None)
    ou.install(arena)
elif MODE == "run":
    # started by `python -m odfork_user run`, which installed the heap before this
    # program ran; odfork_user is imported only to report stats
    import odfork_user as ou

    assert ou.installed(), "MODE run needs python -m odfork_user run"
    arena = ou.default_arena()
t0 = time.perf_counter()
d = {str(i): i for i in range(N)} if MODE != "empty" else {}
build_s = time.perf_counter() - t0
if FREEZE:
    gc.freeze()


def arena_copied():
    """Bytes this process's whole-chunk copies made (chunk mode: the pool's
    pages are shared memory, which Private_Dirty does not count).  In page mode
    the kernel's page copies are private pages of views, already in
    Private_Dirty (bytes_copied counts them too: adding it would count them twice)."""
    return arena.stats()["bytes_copied"] if MODE == "odfork-chunk" else 0


def answer(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fork_child(body):
    """Fork; the child runs body(wfd) and _exits.  Returns (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            body(w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def read_all(fd):
    out = b""
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        out += b
    os.close(fd)
    return out


answer({"ready": True, "n": len(d)})
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "fork":
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        t = time.perf_counter() - t0
        os.waitpid(pid, 0)
        answer({"fork_s": t})
    elif cmd == "pickle":

        def body(w):
            before, before_a = private_dirty(), arena_copied()
            t0 = time.perf_counter()
            data = pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL)
            t = time.perf_counter() - t0
            n = len(data)
            del data  # the pickle's own buffer is not memory the fork made private
            os.write(
                w,
                json.dumps(
                    {"child_s": t, "bytes": n, "child_copied": private_dirty() - before + arena_copied() - before_a}
                ).encode(),
            )

        pid, r = fork_child(body)
        res = json.loads(read_all(r))
        os.waitpid(pid, 0)
        answer(res)
    elif cmd == "collect":
        # what a full collection in a child costs: without gc.freeze() it visits (and
        # writes the header of) every object, so the kernel copies every page of them
        def body(w):
            before = private_dirty()
            t0 = time.perf_counter()
            gc.collect()
            t = time.perf_counter() - t0
            os.write(w, json.dumps({"child_s": t, "child_copied": private_dirty() - before}).encode())

        pid, r = fork_child(body)
        res = json.loads(read_all(r))
        os.waitpid(pid, 0)
        answer(res)
    elif cmd == "mutate":
        go_r, go_w = os.pipe()
        pid, r = fork_child(lambda w: os.read(go_r, 1))
        before, before_a = private_dirty(), arena_copied()
        t0 = time.perf_counter()
        for i in range(0, N, 10):
            d[str(i)] = -i
        t = time.perf_counter() - t0
        copied = private_dirty() - before + arena_copied() - before_a
        os.write(go_w, b"x")
        read_all(r)
        os.waitpid(pid, 0)
        os.close(go_r)
        os.close(go_w)
        answer({"parent_s": t, "parent_copied": copied})
    elif cmd == "stats":
        heap = None
        if MODE in ("odfork", "odfork-chunk", "run"):
            heap = dict(ou.heap_stats(), cow=arena.cow, kernel_writes=arena.kernel_writes)
        answer({"rss": rss(), "build_s": build_s, "heap": heap})
    elif cmd == "quit":
        break
