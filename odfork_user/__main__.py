"""Command line: python -m odfork_user compare [--sizes 64M,256M,1G] [--rounds N] [--json FILE]"""
import argparse
import json
import os
import platform
import subprocess
import sys

from odfork_user._measure import KINDS, free_bytes, thp_state
from odfork_user.arena import parse_size


def _human(n):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _available_kinds():
    try:
        import numpy  # noqa: F401
        return KINDS
    except ImportError:
        return tuple(k for k in KINDS if k != "numpy-thp")


def compare(args):
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    kinds = _available_kinds()
    print(f"# odfork_user compare: Linux {platform.release()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, THP {thp_state()}")
    print("# bytearray = os.fork with 4 KiB pages; numpy-thp = os.fork with transparent huge pages;")
    print("# odfork = arena with every byte written; odfork-empty = arena with nothing written.")
    print(f"# medians of {args.rounds} rounds, each in a fresh process; the parent writes one byte "
          "per 2 MiB before every fork")
    results = []
    failed = 0
    for size in sizes:
        need = 2 * size + (256 << 20)
        if free_bytes() < need:
            print(f"{_human(size):>6}: skipped, needs {_human(need)} free", flush=True)
            continue
        row = {}
        for kind in kinds:
            print(f"  measuring {kind} at {_human(size)} ...", file=sys.stderr, flush=True)
            # -P: the child imports the same installed package, not a source folder in the cwd
            out = subprocess.run([sys.executable, "-P", "-m", "odfork_user._measure", kind, str(size),
                                  str(args.rounds)], capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"{_human(size)} {kind}: failed\n{out.stderr}", file=sys.stderr)
                failed += 1
                continue
            row[kind] = json.loads(out.stdout)
            results.append(row[kind])
        print(f"\nsize {_human(size)}")
        print(f"  {'kind':<13} {'fork ms':>9} {'round trip ms':>14}")
        for kind, r in row.items():
            print(f"  {kind:<13} {r['fork_ms']:>9.3f} {r['roundtrip_ms']:>14.3f}")
        if "odfork" in row:
            od = row["odfork"]
            for base in ("bytearray", "numpy-thp"):
                if base in row:
                    print(f"  speedup vs os.fork/{base}: fork {row[base]['fork_ms'] / od['fork_ms']:.1f}x, "
                          f"round trip {row[base]['roundtrip_ms'] / od['roundtrip_ms']:.1f}x")
            if "odfork-empty" in row:
                print(f"  odfork written / odfork empty: fork {od['fork_ms'] / row['odfork-empty']['fork_ms']:.2f}x")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"kernel": platform.release(), "python": platform.python_version(),
                                   "cpus": os.cpu_count(), "thp": thp_state()},
                       "results": results}, f, indent=1)
    return 1 if failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m odfork_user", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="odfork vs os.fork latency at a few sizes")
    c.add_argument("--sizes", default="64M,256M,1G", help="comma-separated sizes (default 64M,256M,1G)")
    c.add_argument("--rounds", type=int, default=15, help="forks per measurement (median is printed)")
    c.add_argument("--json", help="write the raw results to this file")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
