"""A fuzzing fork server: a target with an expensive initialisation (its state:
`--size` bytes, 1 GiB by default) runs every input in a fresh copy of that state,
three ways:

  os.fork    each input in a fresh os.fork child (state in a bytearray, 4 KiB pages)
  odfork     each input in a fresh odfork child (state in an arena)
  snapshot   in-process: run the input, then arena.restore(snapshot)

Prints executions per second.  Run:  python examples/fuzz_server.py [--size 1G] [--execs 200]
"""

import argparse
import json
import os
import random
import time

import odfork_user as ou
from odfork_user.arena import parse_size

CH = ou.CHUNK_SIZE


def init_state(buf):
    """The expensive initialisation: fill the whole state (a table of 8-byte slots)."""
    for off in range(0, len(buf), CH):
        n = min(CH, len(buf) - off)
        buf[off : off + n] = bytes(range(256)) * (n // 256) + bytes(n % 256)


def target(buf, data):
    """The code under test: parses the input and updates a few slots of the state.
    'Crashes' (returns True) on one magic input."""
    slots = len(buf) // 8
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & (2**64 - 1)
        i = (h % slots) * 8
        buf[i : i + 8] = h.to_bytes(8, "little")
    return data[:4] == b"BUG!"


def inputs(n, seed=1):
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(1, 9)) for _ in range(n)]


def run_forked(buf, fork, corpus):
    crashes = 0
    t0 = time.perf_counter()
    for data in corpus:
        pid = fork()
        if pid == 0:
            os._exit(1 if target(buf, data) else 0)
        _, st = os.waitpid(pid, 0)
        crashes += os.WEXITSTATUS(st)
    return len(corpus) / (time.perf_counter() - t0), crashes


def run_restore(arena, buf, snap, corpus):
    crashes = 0
    t0 = time.perf_counter()
    for data in corpus:
        crashes += target(buf, data)
        arena.restore(snap)
    return len(corpus) / (time.perf_counter() - t0), crashes


def run(size, execs):
    corpus = inputs(execs) + [b"BUG!"]
    out = {}
    state = bytearray(size)
    init_state(state)
    check = bytes(state[:64])
    out["os.fork"] = run_forked(state, os.fork, corpus)
    assert bytes(state[:64]) == check
    del state
    with ou.Arena(size) as arena:
        buf = arena.alloc(size)
        init_state(buf)
        out["odfork"] = run_forked(buf, ou.odfork, corpus)
        with arena.snapshot() as snap:
            out["snapshot"] = run_restore(arena, buf, snap, corpus)
        assert bytes(buf[:64]) == check  # every execution started from, and left, the same state
        arena.check()
        del buf
    return {k: {"execs_per_s": v[0], "crashes": v[1]} for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G")
    p.add_argument("--execs", type=int, default=200)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    res = run(parse_size(a.size), a.execs)
    print(f"fuzz server, state {a.size}, {a.execs + 1} inputs")
    for name, r in res.items():
        print(f"  {name:<9} {r['execs_per_s']:10.0f} execs/s   crashes found {r['crashes']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": parse_size(a.size), "execs": a.execs + 1, "results": res}, f)
    return res


if __name__ == "__main__":
    main()
