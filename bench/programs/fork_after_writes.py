"""How long a fork takes right after the parent wrote, odfork against os.fork.

Each variant runs in a fresh process that holds --size bytes written once,
then for --rounds rounds: writes (the pattern), forks at once (the child
exits), reaps; the time until the fork returns in the parent is recorded.
Variants (KIND/PATTERN):
  bytearray/dense     os.fork of a bytearray (4 KiB pages), 1 B per page written
  numpy-thp/sparse    os.fork of a numpy array (transparent huge pages), 1 B per 2 MiB
  numpy-thp/dense     the same, 1 B per 4 KiB page (a write to a huge page the
                      last child shared splits it: 4 KiB entries from then on)
  odfork-empty/sparse odfork of an arena with nothing in it (the loop runs over scratch)
  odfork/sparse       odfork, 1 B per 2 MiB written before each fork
  odfork/dense        odfork, 1 B per 4 KiB page (every page) written before each fork
Every variant runs --repeat times, interleaved (one process of each in turn),
so that the machine's drift hits all alike; the median of each process's
median is reported, with the CPU the process's other threads (the
background folder) used, in percent of one CPU over the process's life.  --python adds the same odfork variants run by another
interpreter (another installed version: "before"), tagged with its path;
--env "NAME=VALUE ...",... runs the odfork variants once per setting.  JSON on
stdout, a table on stderr.

    python -P bench/programs/fork_after_writes.py [--sizes 64M,1G,4G] [--rounds 11] [--repeat 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, threading, time
try:
    from odfork_user.cli.measure import Holder
except ImportError:  # an installed version from before odfork_user.cli (a baseline run with --python)
    from odfork_user._measure import Holder
t_start = time.perf_counter()
kind, size, rounds, pattern = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
h = Holder(kind, size)
lat = []
for r in range(rounds + 2):
    h.touch(4096 if pattern == "dense" else h.arena.chunk_size if h.arena is not None else 2 << 20)
    t0 = time.perf_counter()
    pid = h.fork()
    if pid == 0:
        os._exit(0)
    lat.append((time.perf_counter() - t0) * 1e3)
    os.waitpid(pid, 0)
stats = h.arena.stats() if h.arena is not None else {}
def other_threads_cpu_ms():  # the folder's CPU (every thread but this one), from /proc
    me, tot = str(threading.get_native_id()), 0
    for tid in os.listdir("/proc/self/task"):
        if tid != me:
            with open(f"/proc/self/task/{tid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            tot += int(st[11]) + int(st[12])  # utime, stime
    return tot * 1e3 / os.sysconf("SC_CLK_TCK")
wall = time.perf_counter() - t_start
cpu = other_threads_cpu_ms()
h.close()
print(json.dumps({"fork_ms": lat[2:], "folds": stats.get("folds", 0), "folder_cpu_ms": cpu, "wall_s": wall}))
"""

BASE = [("bytearray", "dense"), ("numpy-thp", "sparse"), ("numpy-thp", "dense"), ("odfork-empty", "sparse")]
ODF = [("odfork", "sparse"), ("odfork", "dense")]


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64M,1G,4G")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--python", action="append", default=[], help="another interpreter for the odfork variants")
    ap.add_argument(
        "--env",
        default="",
        help="settings for the odfork variants, comma-separated; "
        "a setting is NAME=VALUE, or several separated by spaces",
    )
    ap.add_argument("--no-base", action="store_true", help="only the odfork variants")
    args = ap.parse_args()
    envs = [e for e in args.env.split(",") if e] or [""]
    variants = [] if args.no_base else [(sys.executable, "", k, p) for k, p in BASE]
    for py in [sys.executable] + args.python:
        for e in envs:
            variants += [(py, e, k, p) for k, p in ODF]
    out = {
        "thp": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip(),
        "kernel": os.uname().release,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "rows": [],
    }
    for size in (parse_size(s) for s in args.sizes.split(",")):
        meds = {v: [] for v in variants}
        folds, cpu = {}, {}
        for _ in range(args.repeat):
            for v in variants:
                py, e, kind, pattern = v
                env = dict(os.environ)
                for assign in e.split():
                    name, _, val = assign.partition("=")
                    env[name] = val
                p = subprocess.run(
                    [py, "-P", "-c", CHILD, kind, str(size), str(args.rounds), pattern],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=3600,
                    cwd="/",
                )
                if p.returncode:
                    print(f"{v}: {p.stderr[-400:]}", file=sys.stderr)
                    continue
                r = json.loads(p.stdout)
                meds[v].append(statistics.median(r["fork_ms"]))
                folds[v] = r["folds"]
                cpu.setdefault(v, []).append(r["folder_cpu_ms"] / r["wall_s"] / 10)
        for v, m in meds.items():
            if not m:
                continue
            py, e, kind, pattern = v
            row = {
                "size": size,
                "kind": kind,
                "pattern": pattern,
                "python": py,
                "env": e,
                "fork_ms": round(statistics.median(m), 3),
                "per_process": [round(x, 3) for x in m],
                "folds": folds.get(v, 0),
                "folder_cpu_pct": round(statistics.median(cpu.get(v, [0])), 1),
            }
            out["rows"].append(row)
            print(
                f"{size >> 20:>6}M {kind:>13}/{pattern:<6} {e:<20} {os.path.basename(os.path.dirname(os.path.dirname(py))):<16}"
                f" {row['fork_ms']:>9.3f} ms  folder {row['folder_cpu_pct']:>5.1f}% CPU  {row['per_process']}",
                file=sys.stderr,
                flush=True,
            )
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
