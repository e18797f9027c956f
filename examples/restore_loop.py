"""Expensive state once, many trials that mutate it (the fuzzing pattern), three ways:

  restore     one process; arena.restore(snapshot) after each trial
  odfork      each trial in a fresh odfork child (state in an arena)
  os.fork     each trial in a fresh os.fork child (state in a bytearray, 4 KiB pages)

Prints trials per second.  Run:  python examples/restore_loop.py [--size 256M] [--trials 200]
"""

import argparse
import os
import random
import time

import odfork_user as ou
from odfork_user.arena import parse_size


def trial(buf, rng):
    # a trial mutates a few scattered places, as a fuzzed input would
    n = len(buf)
    for _ in range(8):
        off = rng.randrange(n - 8)
        buf[off : off + 8] = rng.randbytes(8)


def per_second(fn, trials):
    t0 = time.perf_counter()
    fn(trials)
    return trials / (time.perf_counter() - t0)


def run(size, trials):
    out = {}
    rng = random.Random(1)
    with ou.Arena(size) as arena:
        buf = arena.alloc(size)
        buf[:] = b"\x05" * size  # the expensive initialisation
        snap = arena.snapshot()

        def by_restore(k):
            for _ in range(k):
                trial(buf, rng)
                arena.restore(snap)

        out["restore"] = per_second(by_restore, trials)
        assert bytes(buf[:16]) == b"\x05" * 16 and buf.tobytes().count(5) == size

        def by_odfork(k):
            for _ in range(k):
                pid = ou.odfork()
                if pid == 0:
                    trial(buf, rng)
                    os._exit(0)
                os.waitpid(pid, 0)

        out["odfork"] = per_second(by_odfork, trials)
        snap.close()
        del buf
    state = bytearray(b"\x05" * size)

    def by_fork(k):
        for _ in range(k):
            pid = os.fork()
            if pid == 0:
                trial(state, rng)
                os._exit(0)
            os.waitpid(pid, 0)

    out["os.fork"] = per_second(by_fork, trials)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M")
    p.add_argument("--trials", type=int, default=200)
    a = p.parse_args(argv)
    res = run(parse_size(a.size), a.trials)
    print(f"state {a.size}, {a.trials} trials")
    for name, rate in res.items():
        print(f"  {name:<8} {rate:10.0f} trials/s")
    return res


if __name__ == "__main__":
    main()
