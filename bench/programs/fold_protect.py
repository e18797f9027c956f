"""What a fork after writes costs with each fold protection.

With a full userfaultfd the background folder folds written views between
forks; without one (an ordinary user on a default kernel) a fold is refused
while other threads run, so no folder runs and the next fork copies the
written views' page-table entries, as os.fork does for those pages.

For each protection, in a fresh process (ODFORK_USERFAULTFD=1 / 0): an arena
of --size bytes written once, then --rounds rounds of: write (one byte per
2 MiB, "sparse", or one byte per 4 KiB page, "dense"), wait --settle seconds
(the folder's time), fork a child that exits at once, reap it.  The time
odfork() takes to return in the parent is recorded; os.fork of the same size
of bytearray (4 KiB pages) beside it.  Medians; JSON on stdout.

    python -P bench/programs/fold_protect.py [--size 1G] [--rounds 15]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time, threading
import odfork_user as ou
size, rounds, settle, pattern = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if pattern == "os.fork":
    buf = bytearray(size)
    buf[::4096] = b"x" * (size // 4096)
    fork = os.fork
else:
    a = ou.Arena(size + (64 << 20))
    buf = a.alloc(size)
    buf[:] = b"x" * size
    fork = ou.odfork
step = 4096 if pattern in ("dense", "os.fork") else ou.CHUNK_SIZE
times = []
for r in range(rounds):
    v = r & 0xff
    for off in range(r % 64 * 8, size, step):
        buf[off] = v
    time.sleep(settle)
    t0 = time.perf_counter()
    pid = fork()
    if pid == 0:
        os._exit(0)
    times.append((time.perf_counter() - t0) * 1e3)
    os.waitpid(pid, 0)
threads = int(next(l for l in open("/proc/self/status") if l.startswith("Threads:")).split()[1])
print(json.dumps({"fork_ms": times, "protect": "-" if pattern == "os.fork" else ou.FOLD_PROTECT,
                  "threads": threads}))
"""


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--settle", type=float, default=0.5)
    args = ap.parse_args()
    size = parse_size(args.size)
    out = {"size": size, "rounds": args.rounds, "settle_s": args.settle, "rows": []}
    for pattern in ("sparse", "dense"):
        for env in ("1", "0"):
            p = subprocess.run(
                [sys.executable, "-P", "-c", CHILD, str(size), str(args.rounds), str(args.settle), pattern],
                env=dict(os.environ, ODFORK_USERFAULTFD=env),
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if p.returncode:
                out["rows"].append({"pattern": pattern, "userfaultfd": env, "error": p.stderr[-500:]})
                continue
            r = json.loads(p.stdout)
            out["rows"].append(
                {
                    "pattern": pattern,
                    "protect": r["protect"],
                    "threads": r["threads"],
                    "fork_ms_median": round(statistics.median(r["fork_ms"][2:]), 3),
                }
            )
    p = subprocess.run(
        [sys.executable, "-P", "-c", CHILD, str(size), str(args.rounds), str(args.settle), "os.fork"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    r = json.loads(p.stdout)
    out["rows"].append(
        {
            "pattern": "os.fork, 4 KiB pages, dense",
            "protect": "-",
            "fork_ms_median": round(statistics.median(r["fork_ms"][2:]), 3),
        }
    )
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
