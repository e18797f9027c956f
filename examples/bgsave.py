"""Save an arena-backed table to disk while it keeps being updated (the Redis BGSAVE pattern),
three ways, and report how long the updating loop stalled in each:

  os.fork     the table in ordinary memory (a bytearray, 4 KiB pages); the child writes it out
  odfork      the table in an arena; the child writes it out
  snapshot    arena.snapshot() and a background thread that saves it, no fork at all

Run:  python examples/bgsave.py [--size 256M] [--seconds 1]
"""

import argparse
import os
import tempfile
import threading
import time

import odfork_user as ou
from odfork_user.arena import parse_size

RECORD = 64


def update_loop(table, seconds, start_save):
    """Update records round-robin; returns the longest gap between two updates (the stall)."""
    n = len(table) // RECORD
    worst, i, t_end = 0.0, 0, time.perf_counter() + seconds
    saved = False
    last = time.perf_counter()
    while True:
        now = time.perf_counter()
        if now > t_end:
            break
        worst = max(worst, now - last)
        last = now
        off = (i * 7919 % n) * RECORD
        table[off : off + 8] = i.to_bytes(8, "little")
        i += 1
        if not saved and now > t_end - seconds / 2:
            saved = True
            start_save()
            last = time.perf_counter()
            worst = max(worst, last - now)
    return worst, i


def save_by_fork(table, fork, path):
    pid = fork()
    if pid == 0:
        with open(path, "wb", buffering=0) as f:
            f.write(table)
        os._exit(0)
    return pid


def run(size, seconds):
    out = {}
    tmp = tempfile.mkdtemp()
    # os.fork: ordinary memory
    table = bytearray(size)
    table[:] = b"\x01" * size
    pids = []
    stall, n = update_loop(table, seconds, lambda: pids.append(save_by_fork(table, os.fork, f"{tmp}/a")))
    for p in pids:
        os.waitpid(p, 0)
    out["os.fork"] = (stall, n)
    del table
    with ou.Arena(size) as arena:
        table = arena.alloc(size)
        table[:] = b"\x01" * size
        pids = []
        stall, n = update_loop(table, seconds, lambda: pids.append(save_by_fork(table, ou.odfork, f"{tmp}/b")))
        for p in pids:
            os.waitpid(p, 0)
        out["odfork"] = (stall, n)
        threads = []

        def start_snapshot_save():
            snap = arena.snapshot()

            def save():
                with snap:
                    snap.save(f"{tmp}/c")

            t = threading.Thread(target=save)
            t.start()
            threads.append(t)

        stall, n = update_loop(table, seconds, start_snapshot_save)
        for t in threads:
            t.join()
        out["snapshot"] = (stall, n)
        for name in "bc":
            assert os.path.getsize(f"{tmp}/{name}") in (size, arena.size)
        del table
    for name in "abc":
        os.unlink(f"{tmp}/{name}")
    os.rmdir(tmp)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M")
    p.add_argument("--seconds", type=float, default=1.0)
    a = p.parse_args(argv)
    res = run(parse_size(a.size), a.seconds)
    print(f"table {a.size}: longest stall of the updating loop while a save starts and runs")
    for name, (stall, n) in res.items():
        print(f"  {name:<9} stall {stall * 1e3:8.3f} ms   updates {n}")
    return res


if __name__ == "__main__":
    main()
