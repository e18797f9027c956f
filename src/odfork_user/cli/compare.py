"""`python -m odfork_user compare`: odfork vs os.fork on this machine, each kind of memory in a
fresh process (odfork_user.cli.measure), every metric, medians."""

import json
import os
import platform
import subprocess
import sys

from odfork_user.arena import parse_size
from odfork_user.cli.measure import KINDS, free_bytes, plot_latency, thp_state

METRICS = [
    ("fork_ms", "fork returns (ms)"),
    ("roundtrip_ms", "fork+exit+wait (ms)"),
    ("first_write_parent_us", "first write, parent (us)"),
    ("first_write_child_us", "first write, child (us)"),
    ("dense_ms", "fork+child rewrites all (ms)"),
    ("sparse_ms", "fork+child 1 B/2 MiB (ms)"),
    ("read_parent_ms", "read all, parent (ms)"),
    ("read_child_ms", "read all, child (ms)"),
    ("dense_copied", "copied by dense (MiB)"),
    ("sparse_copied", "copied by sparse (MiB)"),
]


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


def _fmt(key, v):
    if v is None:
        return "-"
    if key.endswith("_copied"):
        return f"{v / (1 << 20):.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def print_table(size, row, out=sys.stdout):
    """One size: every metric of every kind, and two ratios: os.fork of 4 KiB
    pages (bytearray) and of transparent huge pages (numpy-thp), each over
    odfork's value (above 1: odfork takes less)."""
    kinds = list(row)
    print(f"\nsize {_human(size)}", file=out)
    print(f"  {'metric':<30}" + "".join(f"{k:>14}" for k in kinds) + f"{'4K/odfork':>12}{'THP/odfork':>12}", file=out)
    for key, label in METRICS:
        vals = [row[k].get(key) for k in kinds]
        if all(v is None for v in vals):
            continue
        od = row.get("odfork", {}).get(key)
        ratios = ""
        for base_kind in ("bytearray", "numpy-thp"):
            base = row.get(base_kind, {}).get(key)
            ratios += f"{(f'{base / od:.2f}x' if base and od else '-'):>12}"
        print(f"  {label:<30}" + "".join(f"{_fmt(key, v):>14}" for v in vals) + ratios, file=out)
    if "odfork" in row and "odfork-empty" in row:
        print(
            f"  odfork written / empty arena, fork: {row['odfork']['fork_ms'] / row['odfork-empty']['fork_ms']:.2f}x",
            file=out,
        )


def plot(results, path):
    panels = [
        (title, {k: [(r["size"], r[key]) for r in results if r["kind"] == k and key in r] for k in KINDS})
        for key, title in (("fork_ms", "fork returns in the parent"), ("roundtrip_ms", "fork + child exit + wait"))
    ]
    plot_latency(panels, path, f"os.fork vs odfork, Linux {platform.release()}, {os.cpu_count()} CPUs")


def compare(args):
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    kinds = _available_kinds()
    print(
        f"# odfork_user compare: Linux {platform.release()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, THP {thp_state()}"
    )
    print("# bytearray = os.fork with 4 KiB pages; numpy-thp = os.fork with transparent huge pages;")
    print("# odfork = arena with every byte written; odfork-empty = arena with nothing written.")
    print("# 4K/odfork, THP/odfork: os.fork's value over odfork's (above 1: odfork takes less).")
    from odfork_user._core import prepare_process

    FOLD_PROTECT = prepare_process()[0]
    print(
        "# odfork configuration: the default (page mode: private views at fork, the kernel copies the "
        f"pages written; folds hold writers off with {FOLD_PROTECT})."
    )
    print(
        f"# medians: {args.rounds} forks for latency, {args.heavy_rounds} for the others; each kind in a "
        "fresh process; the parent writes one byte per 2 MiB before every fork"
    )
    results, failed = [], 0
    for size in sizes:
        need = 2 * size + (256 << 20)
        if free_bytes() < need:
            print(
                f"\nsize {_human(size)}: skipped, needs {_human(need)} available, {free_bytes() >> 20} MiB free",
                flush=True,
            )
            continue
        row = {}
        for kind in kinds:
            # -P: the child imports the same installed package, not a source folder in the cwd
            out = subprocess.run(
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "odfork_user.cli.measure",
                    kind,
                    str(size),
                    str(args.rounds),
                    str(args.heavy_rounds),
                ],
                stdout=subprocess.PIPE,
                stderr=None if args.progress else subprocess.DEVNULL,
                text=True,
                check=False,
            )
            if out.returncode:
                print(f"{_human(size)} {kind}: measurement failed (exit {out.returncode})", file=sys.stderr)
                failed += 1
                continue
            row[kind] = json.loads(out.stdout)
            results.append(row[kind])
        print_table(size, row)
        sys.stdout.flush()
    machine = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "thp": thp_state(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=1)
    if args.plot and results:
        plot(results, args.plot)
        print(f"\nplot written to {args.plot}")
    return 1 if failed else 0
