"""Turn a pytest-benchmark JSON file into bench/RESULTS.md and PNG plots.

    python bench/report.py bench/results/results.json bench/RESULTS.md

Run by bench/run.sh after the suite; nothing here is measured, only summarised.
"""

import glob
import json
import os
import platform
import sys
from collections import defaultdict

KINDS = ("bytearray", "numpy-thp", "odfork", "odfork-empty", "odfork-chunk")
METRICS = [  # group prefix, title, unit
    ("1-fork-latency", "1. Fork latency (until fork returns in the parent)", "ms"),
    ("2-roundtrip", "2. Round trip (fork, child _exit, waitpid)", "ms"),
    ("3-first-write-parent", "3a. First write after the fork, in the parent (child alive)", "us"),
    ("3-first-write-child", "3b. First write after the fork, in the child (asked over a pipe, ~20 us of it)", "us"),
    ("4-dense-writes", "4. Dense rewrite: fork + the child rewrites every byte + exit + wait", "ms"),
    ("5-sparse-writes", "5. Sparse writes: fork + the child writes one byte per 2 MiB + exit + wait", "ms"),
    ("6-read-parent", "6a. Read everything after the fork, in the parent (child alive)", "ms"),
    ("6-read-child", "6b. Read everything after the fork, in the child (asked over a pipe)", "ms"),
    (
        "8-kernel-write-parent",
        "8. Kernel write (os.preadv of 4 KiB) into memory shared with a live child, "
        "in the parent; odfork-chunk must call prepare_write first (timed)",
        "us",
    ),
]
SCALE = {"ms": 1e3, "us": 1e6}

# What would close a goal this design does not meet (kept here so the report says it every time).
CLOSE = {
    "fork-1G": "The floor is the process's own fork: inside pytest, with every other benchmark's holder in "
    "memory, an empty arena forks in about 1.4 ms and the written one in about the same (the child's exit "
    "returned every view to its segment before the parent wrote again, csrc/core/sigchld.c).  65x "
    "os.fork of 4 KiB pages would need 0.2 ms, less than this process's fork of nothing.  In a lean "
    "process (bench/programs/fork_after_writes.py, docs/BENCHMARKS.md) the same fork takes 0.50 ms at "
    "1 GiB against 19.5 for os.fork: 39x.  What would close it: a smaller process (install() moves the "
    "interpreter's heap into the arena too).",
    "fork-16G": "Not measured inside pytest when 1.3x the size is not free next to the other holders; in a lean "
    "process (fork_after_writes.py) 1.25 ms at 16 GiB against 209 for os.fork: 167x.",
    "flat": "What grows from 64 MiB to 16 GiB is the O(chunks) part (the child's page table and every chunk's "
    "count, 8192 chunks at 16 GiB); inside pytest the process's own fork dominates at the small sizes.",
    "roundtrip-1G": "As fork-1G, plus the interpreter's exit and the child's exit handler in the parent "
    "(returning the views: one scan and one mremap per 64 chunks).",
    "first-write": "A first write to a view allocates a page table for its 2 MiB and copies one page from the "
    "page cache (kernel COW of a private file mapping): a few microseconds, as os.fork's.",
    "dense": "Every page a child rewrites is a kernel copy-on-write fault of a private file mapping (a page-cache "
    "lookup, a page allocation and a 4 KiB copy): the same per-page work as os.fork's anonymous COW, "
    'plus the lookup.  Whole-chunk copies (cow="chunk") trade 512 faults for one 2 MiB copy into fresh '
    "memory (~1 ms per chunk in this VM).",
    "sparse": "Fork, one page-table allocation and one page copy per chunk touched, exit: what remains is the "
    "fork's floor (fork-1G) and the child's exit.",
    "read": "A view starts without page-table entries: reads take file read faults (fault-around maps 16 "
    "pages at a time) where os.fork's child inherited the entries.  Populating at fork "
    "(MADV_POPULATE_READ, ~163 us per chunk) would put the cost back on the fork's critical path; "
    "populating from the folder thread while the child reads (the same page-cache work, off the reader's "
    "path but on a shared CPU) is the next thing to try; shmem huge pages would map 2 MiB per fault but "
    "are off by default (`shmem_enabled` never) and only root can turn them on.",
}


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)  # (metric, size) -> kind -> (median seconds, extra)
    for b in data["benchmarks"]:
        group = b["group"] or ""
        for prefix, _, _ in METRICS:
            if group.startswith(prefix + "-"):
                size = b["extra_info"]["size"]
                rows[(prefix, size)][b["extra_info"]["kind"]] = (b["stats"]["median"], b["extra_info"])
    return data, rows


def human(n):
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def ratio(rows, metric, size, base="bytearray", other="odfork"):
    r = rows.get((metric, size), {})
    if base in r and other in r and r[other][0] > 0:
        return r[base][0] / r[other][0]
    return None


def goals(rows, sizes):
    out = []

    def add(key, text, value, ok, unit="x"):
        out.append((key, text, "-" if value is None else f"{value:.2f}{unit}", ok))

    for size, key, want in ((1 << 30, "fork-1G", 65), (16 << 30, "fork-16G", 300)):
        v = ratio(rows, "1-fork-latency", size)
        add(key, f"fork latency os.fork/odfork >= {want}x at {human(size)}", v, v is not None and v >= want)
    lat = [rows[("1-fork-latency", s)]["odfork"][0] for s in sizes if "odfork" in rows.get(("1-fork-latency", s), {})]
    flat = max(lat) / min(lat) if lat else None
    add(
        "flat",
        f"odfork latency flat within 1.5x over {human(min(sizes))}..{human(max(sizes))} measured",
        flat,
        flat is not None and flat <= 1.5,
    )
    v = ratio(rows, "2-roundtrip", 1 << 30)
    add("roundtrip-1G", "round trip os.fork/odfork >= 20x at 1 GiB", v, v is not None and v >= 20)
    big = max((s for s in sizes if ("4-dense-writes", s) in rows), default=None)
    if big:
        for who in ("parent", "child"):
            v = ratio(rows, f"3-first-write-{who}", big, "odfork", "bytearray")
            add(
                "first-write",
                f"first write after the fork, {who}, odfork/os.fork <= 2x ({human(big)})",
                v,
                v is not None and v <= 2,
            )
        v = ratio(rows, "4-dense-writes", big, "odfork", "bytearray")
        add("dense", f"dense rewrite total odfork/os.fork <= 1x ({human(big)})", v, v is not None and v <= 1)
        v = ratio(rows, "5-sparse-writes", big, "odfork", "bytearray")
        r = rows[("5-sparse-writes", big)]
        mem = (
            r["odfork"][1].get("copied", 0) / max(r["bytearray"][1].get("copied", 1), 1)
            if "odfork" in r and "bytearray" in r
            else None
        )
        add("sparse", f"sparse writes total odfork/os.fork <= 0.5x ({human(big)})", v, v is not None and v <= 0.5)
        add(
            "sparse",
            f"sparse writes copied memory odfork/os.fork <= 1x ({human(big)})",
            mem,
            mem is not None and mem <= 1,
        )
        for who, want in (("parent", 1.2), ("child", 1.0)):
            v = ratio(rows, f"6-read-{who}", big, "odfork", "bytearray")
            add(
                "read",
                f"read after fork, {who}, odfork/os.fork <= {want}x ({human(big)})",
                v,
                v is not None and v <= want,
            )
    return out


def plots(rows, sizes, outdir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from odfork_user.cli.measure import plot_latency

    panels = [
        (
            title,
            {k: [(s, rows[(metric, s)][k][0] * 1e3) for s in sizes if k in rows.get((metric, s), {})] for k in KINDS},
        )
        for metric, title in (("1-fork-latency", "fork latency"), ("2-roundtrip", "round trip"))
    ]
    plot_latency(panels, os.path.join(outdir, "latency.png"))
    made = ["latency.png"]
    big = max((s for s in sizes if ("4-dense-writes", s) in rows), default=None)
    if big:
        fig, ax = plt.subplots(figsize=(11, 4.2))
        metrics = [m for m in METRICS if m[0].startswith(("3", "4", "5", "6"))]
        kinds = ("bytearray", "numpy-thp", "odfork")
        width = 0.27
        for i, kind in enumerate(kinds):
            vals = [rows.get((m[0], big), {}).get(kind, (0,))[0] * 1e3 for m in metrics]
            ax.bar([j + (i - 1) * width for j in range(len(metrics))], vals, width, label=kind)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m[0][2:] for m in metrics], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("median (ms)")
        ax.set_title(f"after the fork, {human(big)}")
        ax.legend()
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "after_fork.png"), dpi=100)
        made.append("after_fork.png")
    return made


def workload_section(w):
    out = ["## Workloads (`python bench/workloads.py`)", ""]
    if "plugin" in w:
        res = w["plugin"]["results"]
        n = next(iter(res.values()))["tests"]
        out += [
            f"### pytest: {n} tests sharing a {human(w['plugin']['size'])} session fixture",
            "",
            "| runner | tests/s | wall (s) |",
            "|---|---|---|",
        ]
        out += [
            f"| {k} | {r['tests_per_s']:.1f} | {r['seconds']:.1f} |"
            if "unavailable" not in r
            else f"| {k} | unavailable: {r['unavailable']} | - |"
            for k, r in res.items()
        ]
        od = [r for k, r in res.items() if k.startswith("pytest --odfork (")]
        fk = [r for k, r in res.items() if "pytest-forked" in k and "unavailable" not in r]
        if od and fk:
            out += [
                "",
                f"Goal 10x pytest --forked: {od[0]['tests_per_s'] / fk[0]['tests_per_s']:.1f}x "
                f"({'met' if od[0]['tests_per_s'] >= 10 * fk[0]['tests_per_s'] else 'not met'}).  "
                "pytest-forked forks before fixture setup, so its children rebuild the session "
                "fixture; the os.fork row runs this plugin's protocol (fixture once, in the parent) "
                "with os.fork, which isolates the cost of the fork itself.",
            ]
        out.append("")
    if "fuzz" in w:
        res = w["fuzz"]["results"]
        out += [
            f"### Fuzzing fork server: state of {human(w['fuzz']['size'])}, {w['fuzz']['execs']} inputs",
            "",
            "| mode | execs/s |",
            "|---|---|",
        ]
        out += [f"| {k} | {r['execs_per_s']:.1f} |" for k, r in res.items()]
        r = res["odfork"]["execs_per_s"] / res["os.fork"]["execs_per_s"]
        out += [
            "",
            f"Goal 5x os.fork: odfork {r:.1f}x, snapshot restore "
            f"{res['snapshot']['execs_per_s'] / res['os.fork']['execs_per_s']:.1f}x "
            f"({'met' if r >= 5 else 'not met'}).",
            "",
        ]
    if "kv" in w:
        res = w["kv"]["results"]
        out += [
            f"### Key-value server: {human(w['kv']['size'])} of data, {w['kv']['seconds']:g} s of load per mode",
            "",
            "| snapshot by | requests | p50 (ms) | p99 (ms) | max (ms) | max during snapshots (ms) | snapshot (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {k} | {r['requests']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['max_ms']:.2f} | "
            f"{r['max_during_ms']:.2f} | {r['snapshot_s']:.2f} |"
            for k, r in res.items()
        ]
        base = res["os.fork"]
        lines = []
        for mode in ("odfork", "snapshot"):
            r = res[mode]
            worst = r["max_during_ms"] / base["max_during_ms"]
            served = r["requests"] / base["requests"]
            lines.append(
                f"{mode}: requests {served:.2f}x os.fork's (goal >= 1x: "
                f"{'met' if served >= 1 else 'not met'}), worst request during a snapshot "
                f"{worst:.2f}x os.fork's (goal <= 0.1x: {'met' if worst <= 0.1 else 'not met'})."
            )
        out += [
            "",
            " ".join(lines) + "  After the fork every write is a kernel page copy, as with os.fork, so "
            "the worst request is no longer a copy; what remains in both rows is the machine: three busy "
            "processes (server, load generator, the child or thread streaming the table to disk) on 2 vCPUs, "
            "and for odfork the fork itself, which copies the entries of views the server wrote since the "
            "last fold (the folder thread gets 10% of a CPU, half a CPU while it is behind, and the segments "
            "are shared while the child saves).  Single runs vary by 2x here.",
            "",
        ]
    if "mp" in w:
        res = w["mp"]["results"]
        out += [
            f"### multiprocessing: Pool(4, maxtasksperchild=1), a {w['mp']['dict_bytes']} dict of str and a "
            f"{w['mp']['array_bytes']} numpy array (bench/programs/mp_pool.py, unmodified)",
            "",
            "| interpreter | tasks/s | build (s) |",
            "|---|---|---|",
        ]
        out += [f"| {k} | {r['tasks_per_s']:.1f} | {r['build_s']:.1f} |" for k, r in res.items()]
        plain, ran, empty = (res[k]["tasks_per_s"] for k in ("python", "python -m odfork_user run", "python (empty)"))
        out += [
            "",
            f"Goal 10x python: {ran / plain:.1f}x ({'met' if ran >= 10 * plain else 'not met'}); "
            f"an empty interpreter's rate is {empty / ran:.2f}x run's.",
            "",
        ]
    return out


def redis_section(bench_dir):
    """Redis under the preload (bench/programs/redis_bgsave.py -> bench/results/redis*.json,
    bench/programs/redis_testsuite.py -> bench/results/redis_suite.json), where present."""
    runs = [
        (p, json.load(open(p)))
        for p in sorted(glob.glob(os.path.join(bench_dir, "redis*.json")))
        if not p.endswith("redis_suite.json")
    ]
    suite_path = os.path.join(bench_dir, "redis_suite.json")
    if not runs and not os.path.exists(suite_path):
        return []
    out = [
        "## Redis under the preload (`python -m odfork_user exec -- redis-server ...`)",
        "",
        "Debian's redis-server (jemalloc), stock vs under the preload, same run.  Fork = Redis's own "
        "`latest_fork_usec` (the main thread frozen in fork); cow = `rdb_last_cow_size`.  Load: rounds of "
        "redis-benchmark (20 clients, SET then GET of 100 B values, random keys over the data set), a "
        "BGSAVE started inside each; per-round numbers from redis-benchmark's report, medians over rounds "
        "(max: the median round's worst request, and the worst round's).  `rdb_last_cow_size` is what the "
        "save's child found private in its own memory: stock, the pages the parent wrote while the child "
        "lived (the child keeps the originals); under the preload the parent's writes are copied into the "
        "parent's own views and the child's pages stay shared, so its number is not the same measure.",
        "",
    ]
    for path, r in runs:
        res = r["results"]
        gib = res["stock"]["used_memory"] / 2**30
        how = "both servers up, rounds alternating" if r.get("side_by_side") else "one server at a time"
        out += [
            f"### {r['keys']:,} keys x {r['value']} B ({gib:.2f} GiB used_memory), `{os.path.basename(path)}` "
            f"({r.get('rounds', 0)} load rounds per mode, {how})",
            "",
            "| | stock | odfork | odfork/stock |",
            "|---|---|---|---|",
        ]

        def row(name, key, fmt, f=lambda x: x):
            a, b = f(key(res["stock"])), f(key(res["odfork"]))
            return f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.3g}x |" if a and b else None

        rows = [
            row("fork, idle (ms, median)", lambda x: x["latest_fork_usec_median"], "{:.2f}", lambda v: v / 1e3),
            row("cow of a save, idle (MiB)", lambda x: x["rdb_last_cow_size_median"], "{:.1f}", lambda v: v / 2**20),
        ]
        L = {m: res[m].get("load", {}) for m in ("stock", "odfork")}
        if L["stock"].get("rounds"):
            rows += [
                row("fork under load (ms)", lambda x: x["load"]["fork_usec_median"], "{:.2f}", lambda v: v / 1e3),
                row(
                    "cow of a save under load (MiB)",
                    lambda x: x["load"]["rdb_last_cow_size_median"],
                    "{:.1f}",
                    lambda v: v / 2**20,
                ),
            ]
            for op in ("SET", "GET"):
                rows += [
                    row(f"{op} requests/s", lambda x: x["load"][op]["rps_median"], "{:.0f}"),
                    row(f"{op} p99.9 (ms)", lambda x: x["load"][op]["p999_ms_median"], "{:.3f}"),
                    row(f"{op} max (ms, median round)", lambda x: x["load"][op]["max_ms_median"], "{:.2f}"),
                    row(f"{op} max (ms, worst round)", lambda x: x["load"][op]["max_ms_worst"], "{:.2f}"),
                ]
        out += [x for x in rows if x]
        out += [
            "",
            f"DEBUG DIGEST equal (both modes, after DEBUG RELOAD, each mode's RDB in a stock server): "
            f"{r['digests_equal']}.",
            "",
        ]
    if os.path.exists(suite_path):
        st = json.load(open(suite_path))
        out += [
            f"### Redis's own test suite against the server (`bench/programs/redis_testsuite.py`, {st['units']})",
            "",
            "| mode | outcomes | forks (BGSAVE, AOF rewrite: the server's log) | wall (s) |",
            "|---|---|---|---|",
        ]
        for m, x in st["runs"].items():
            out.append(
                f"| {m} | "
                + ", ".join(f"{k} {v}" for k, v in sorted(x["outcomes"].items()))
                + f" | {x['forks']} | {x['wall_s']} |"
            )
        out += [
            "",
            f"Tests whose outcome differs between the modes: {len(st['differences'])}"
            + "".join(f"\n- {d}" for d in st["differences"]),
            "",
        ]
    return out


HEAP_GROUPS = [
    ("heap-0-build", "building the dict", "s"),
    ("heap-1-fork-latency", "fork latency", "ms"),
    ("heap-2-child-pickle", "child pickles the whole dict", "s"),
    ("heap-3-parent-mutate", "parent rewrites 10% of the values, child alive", "ms"),
    ("heap-4-child-collect", "child runs gc.collect()", "ms"),
]
HEAP_KINDS = (
    "empty",
    "os",
    "os-freeze",
    "run",
    "run-freeze",
    "odfork",
    "odfork-freeze",
    "odfork-chunk",
    "odfork-chunk-freeze",
)


def heap_section(data):
    """Python objects in an arena (bench/test_objects_fork.py): the workers' own timings."""
    rows = defaultdict(dict)
    n = None
    for b in data["benchmarks"]:
        g = b.get("group") or ""
        for prefix, _, _ in HEAP_GROUPS:
            if g.startswith(prefix + "-"):
                rows[prefix][b["extra_info"]["kind"]] = b["extra_info"]
                n = b["extra_info"]["objects"]
    if not rows:
        return []
    out = [
        f"## Python objects in an arena (`odfork_user.install()`), a dict of {n:,} str -> int",
        "",
        "A worker process per kind (bench/heap_worker.py); times are the worker's own (medians), memory is "
        "the Private_Dirty growth of the process that wrote plus the arena's bytes_copied.  **os** = the "
        "ordinary heap, os.fork; **run** = the same worker, unmodified, under `python -m odfork_user run`; "
        "**odfork** = install() into an arena before building, default "
        "configuration (page mode, background folding); **odfork-chunk** = the same with "
        '`Arena(cow="chunk")`; **-freeze** = gc.freeze() after building; **empty** = an empty '
        "interpreter's os.fork.",
        "",
        "| metric | " + " | ".join(HEAP_KINDS) + " |",
        "|---" * (len(HEAP_KINDS) + 1) + "|",
    ]
    for prefix, title, unit in HEAP_GROUPS:
        r = rows.get(prefix, {})
        scale = 1e3 if unit == "ms" else 1
        out.append(
            f"| {title} ({unit}) | "
            + " | ".join(f"{r[k]['inner_s'] * scale:.3g}" if k in r else "-" for k in HEAP_KINDS)
            + " |"
        )
        if prefix == "heap-2-child-pickle":
            out.append(
                "| child's copied memory (MiB) | "
                + " | ".join(f"{r[k].get('child_copied', 0) / (1 << 20):.0f}" if k in r else "-" for k in HEAP_KINDS)
                + " |"
            )
        if prefix == "heap-4-child-collect":
            out.append(
                "| child's copied memory by gc.collect() (MiB) | "
                + " | ".join(f"{r[k].get('child_copied', 0) / (1 << 20):.0f}" if k in r else "-" for k in HEAP_KINDS)
                + " |"
            )
        if prefix == "heap-3-parent-mutate":
            out.append(
                "| parent's copied memory (MiB) | "
                + " | ".join(f"{r[k].get('parent_copied', 0) / (1 << 20):.0f}" if k in r else "-" for k in HEAP_KINDS)
                + " |"
            )
    b = rows.get("heap-0-build", {})
    out.append(
        "| RSS after building (MiB) | "
        + " | ".join(f"{b[k]['rss'] / (1 << 20):.0f}" if k in b else "-" for k in HEAP_KINDS)
        + " |"
    )
    out.append("")

    def t(prefix, kind):
        v = rows.get(prefix, {}).get(kind)
        return v["inner_s"] if v else None

    lines = ["| goal | measured | met |", "|---|---|---|"]
    for kind, base in (
        ("run", "os"),
        ("run-freeze", "os-freeze"),
        ("odfork", "os"),
        ("odfork-freeze", "os-freeze"),
        ("odfork-chunk", "os"),
        ("odfork-chunk-freeze", "os-freeze"),
    ):
        f_os, f_od, f_empty = (
            t("heap-1-fork-latency", base),
            t("heap-1-fork-latency", kind),
            t("heap-1-fork-latency", "empty"),
        )
        if f_os and f_od:
            lines.append(
                f"| fork latency {base}/{kind} >= 50x | {f_os / f_od:.1f}x | "
                f"{'yes' if f_os / f_od >= 50 else '**no**'} |"
            )
        if f_empty and f_od:
            lines.append(
                f"| fork latency {kind}/empty interpreter <= 1.5x | {f_od / f_empty:.2f}x | "
                f"{'yes' if f_od / f_empty <= 1.5 else '**no**'} |"
            )
        p_os, p_od = t("heap-2-child-pickle", base), t("heap-2-child-pickle", kind)
        if p_os and p_od:
            lines.append(
                f"| child pickling {kind}/{base} <= 1x | {p_od / p_os:.2f}x | {'yes' if p_od <= p_os else '**no**'} |"
            )
        b_os, b_od = t("heap-0-build", base), t("heap-0-build", kind)
        if b_os and b_od:
            lines.append(
                f"| building the dict {kind}/{base} <= 2x | {b_od / b_os:.2f}x | "
                f"{'yes' if b_od <= 2 * b_os else '**no**'} |"
            )
    return out + lines + [""]


def plugin_section(data):
    """Per-test cost of the test isolators (bench/test_plugin_overhead.py)."""
    rows = [b["extra_info"] for b in data["benchmarks"] if (b.get("group") or "").startswith("plugin-per-test")]
    if not rows:
        return []
    out = [
        f"## Per-test cost of isolating tests ({rows[0]['tests']} trivial tests, a fresh pytest per round)",
        "",
        "| runner | wall (s) | beyond plain pytest, per test (ms) |",
        "|---|---|---|",
    ]
    names = {
        "plain": "pytest",
        "odfork": "pytest --odfork",
        "forked": "pytest --forked (pytest-forked)",
        "isolate": "pytest --isolate (pytest-isolate)",
    }
    for r in rows:
        extra = r.get("per_test_beyond_plain_ms")
        out.append(
            f"| {names.get(r['kind'], r['kind'])} | {r['seconds']:.2f} | {'-' if extra is None else f'{extra:.1f}'} |"
        )
    od = [r for r in rows if r["kind"] == "odfork"]
    if od and od[0].get("per_test_beyond_plain_ms") is not None:
        v = od[0]["per_test_beyond_plain_ms"]
        out += [
            "",
            f"Goal <= 3 ms a test beyond plain pytest: {v:.1f} ms ({'met' if v <= 3 else 'not met'}).  "
            "Runners that are not installed are left out.",
        ]
    return out + [""]


def main(src, dst, workloads=None):
    data, rows = load(src)
    sizes = sorted({s for (_, s) in rows})
    mi = data.get("machine_info", {})
    extra = next(iter(data["benchmarks"]), {}).get("extra_info", {})
    lines = [
        "# odfork_user benchmark results",
        "",
        "Generated by `bash bench/run.sh` (pytest-benchmark JSON -> `bench/report.py`); do not edit by hand.",
        "",
        f"- machine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, {os.cpu_count()} CPUs "
        f"(this run's host: {platform.node() or '?'})",
        f"- kernel {extra.get('kernel', platform.release())}, Python {mi.get('python_version', '?')}, "
        f"THP: `{extra.get('thp', '?')}`, chunk 2 MiB",
        f"- date: {data.get('datetime', '?')}",
        "- memory kinds: **bytearray** = os.fork, heap memory in 4 KiB pages (the baseline of every ratio); "
        "**numpy-thp** = os.fork, numpy array in transparent huge pages; **odfork** = the same bytes in an "
        "arena, default configuration (page mode: private views of the segments at fork time, the kernel "
        'copies the pages written, background folding); **odfork-chunk** = `Arena(cow="chunk")`, '
        "read-only shared chunks, a SIGSEGV and a whole 2 MiB copy on each chunk's first write; "
        "**odfork-empty** = an arena with nothing written.",
        "- every number is the median of the rounds pytest-benchmark ran (shown), measured side by side in "
        "one run; the parent writes one byte per 2 MiB before each round.",
        "",
    ]
    for prefix, title, unit in METRICS:
        present = [s for s in sizes if (prefix, s) in rows]
        if not present:
            continue
        kinds = [k for k in KINDS if any(k in rows[(prefix, s)] for s in present)]
        lines += [
            f"## {title}",
            "",
            "| size | "
            + " | ".join(f"{k} ({unit})" for k in kinds)
            + " | os.fork(bytearray)/odfork | os.fork(numpy-thp)/odfork |",
            "|---" * (len(kinds) + 3) + "|",
        ]
        for s in present:
            r = rows[(prefix, s)]
            cells = [f"{r[k][0] * SCALE[unit]:.3g}" if k in r else "-" for k in kinds]
            r1, r2 = ratio(rows, prefix, s), ratio(rows, prefix, s, "numpy-thp")
            lines.append(
                f"| {human(s)} | "
                + " | ".join(cells)
                + f" | {'-' if r1 is None else f'{r1:.2f}x'} | {'-' if r2 is None else f'{r2:.2f}x'} |"
            )
        if prefix in ("4-dense-writes", "5-sparse-writes"):
            lines += [
                "",
                "Extra memory (the child's Private_Dirty growth, MiB):",
                "",
                "| size | " + " | ".join(kinds) + " |",
                "|---" * (len(kinds) + 1) + "|",
            ]
            for s in present:
                r = rows[(prefix, s)]
                lines.append(
                    f"| {human(s)} | "
                    + " | ".join(f"{r[k][1].get('copied', 0) / (1 << 20):.1f}" if k in r else "-" for k in kinds)
                    + " |"
                )
        lines.append("")
    lines += ["## Goals (os.fork = the bytearray baseline)", "", "| goal | measured | met |", "|---|---|---|"]
    unmet = []
    for key, text, value, ok in goals(rows, sizes):
        lines.append(f"| {text} | {value} | {'yes' if ok else '**no**'} |")
        if not ok and key not in unmet:
            unmet.append(key)
    lines.append("")
    if unmet:
        lines += ["### Goals not met, and what would close them", ""]
        lines += [f"- **{k}**: {CLOSE[k]}" for k in unmet]
        lines.append("")
    lines += heap_section(data)
    lines += plugin_section(data)
    if workloads and os.path.exists(workloads):
        lines += workload_section(json.load(open(workloads)))
    lines += redis_section(os.path.dirname(os.path.abspath(src)))
    # the plots beside the JSON they come from (bench/results/), linked from dst
    outdir = os.path.dirname(os.path.abspath(src))
    made = plots(rows, sizes, outdir)
    if made:
        rel = os.path.relpath(outdir, os.path.dirname(os.path.abspath(dst)))
        lines += ["## Plots", ""] + [f"![{m}]({rel}/{m})" for m in made] + [""]
    with open(dst, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {dst} ({len(rows)} tables' rows, plots: {', '.join(made) or 'none'})")


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2] if len(sys.argv) > 2 else "bench/RESULTS.md",
        sys.argv[3] if len(sys.argv) > 3 else None,
    )
