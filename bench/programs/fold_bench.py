"""What a fold costs per written page, against a 4 KiB memcpy.

For each pages-per-chunk P and chunk count N: an arena of N chunks, every
byte written, forked; while the child lives P pages of each chunk are written
(spread over the chunk: P runs of one page, the worst case for the copy),
then the child exits and is reaped, so that every chunk is a private view of
count 1 holding P private pages (written before the exit: the exit returns
only views nobody wrote), and arena.fold() is timed.  The background folder is off (background_fold=False).
Each (P, N) runs --trials times; beside every trial a memcpy of the same
number of 4 KiB pages between two resident buffers is timed, so that the
ratio compares costs measured in the same moment.  Medians; JSON on stdout,
a table on stderr.

    python -P bench/programs/fold_bench.py [--pages 1,16,128,512]
        [--chunks 1,64,512,8192] [--trials 5] [--max-gib 12]

Configurations whose arena plus private copies exceed --max-gib are skipped.
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import numpy as np

import odfork_user as ou

CHUNK = ou.CHUNK_SIZE
PAGE = 4096
PPC = CHUNK // PAGE


def memcpy_per_page_us(npages, src, dst):
    """Microseconds per 4 KiB page of a memcpy of npages pages between two
    resident buffers (bulk copies of up to 64 MiB)."""
    n = min(max(npages, 4096), len(src) // PAGE)  # at least 16 MiB: a call's overhead is not a page's
    s, d = ctypes.addressof(src), ctypes.addressof(dst)
    reps = max(1, npages // n)
    t0 = time.perf_counter()
    for _ in range(reps):
        ctypes.memmove(d, s, n * PAGE)
    return (time.perf_counter() - t0) * 1e6 / (reps * n)


def one(p, n, trials, src, dst):
    arena = ou.Arena(n * CHUNK + 2 * CHUNK, background_fold=False)
    buf = arr = chunks = None
    try:
        buf = arena.alloc(n * CHUNK + CHUNK)
        arr = np.frombuffer(buf, dtype=np.uint8)
        lead = (-arr.ctypes.data) % CHUNK  # first chunk boundary inside the block
        full = n
        arr[:] = 1
        chunks = arr[lead : lead + full * CHUNK].reshape(full, PPC, PAGE)
        pages = np.arange(0, PPC, PPC // p)[:p]
        fold_us, copy_us, folded = [], [], []
        for t in range(trials):
            go_r, go_w = os.pipe()
            pid = ou.odfork()
            if pid == 0:
                os.read(go_r, 1)
                os._exit(0)
            chunks[:, pages, 7] += 1  # P private pages per chunk, while the child shares them
            os.write(go_w, b"x")
            os.waitpid(pid, 0)
            os.close(go_r)
            os.close(go_w)
            f0 = arena.stats()["folds"]
            t0 = time.perf_counter()
            arena.fold()
            dt = time.perf_counter() - t0
            folded.append(arena.stats()["folds"] - f0)
            fold_us.append(dt * 1e6)
            copy_us.append(memcpy_per_page_us(full * p, src, dst))
        wp = full * p
        fmed, cmed = statistics.median(fold_us), statistics.median(copy_us)
        return {
            "pages_per_chunk": p,
            "chunks": full,
            "written_pages": wp,
            "fold_ms": round(fmed / 1e3, 3),
            "fold_us_per_page": round(fmed / wp, 3),
            "fold_us_per_chunk": round(fmed / full, 2),
            "memcpy_us_per_page": round(cmed, 3),
            "ratio": round(fmed / wp / cmed, 2),
            "folds_per_trial": statistics.median(folded),
        }
    finally:
        chunks = arr = buf = None
        arena.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", default="1,16,128,512")
    ap.add_argument("--chunks", default="1,64,512,8192")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--max-gib", type=float, default=12)
    args = ap.parse_args()
    src = (ctypes.c_char * (64 << 20))()
    dst = (ctypes.c_char * (64 << 20))()
    ctypes.memset(src, 1, len(src))
    ctypes.memset(dst, 2, len(dst))
    rows = []
    print(
        f"{'P':>4} {'N':>5} {'fold ms':>9} {'us/page':>8} {'us/chunk':>9} {'memcpy us':>9} {'ratio':>6}",
        file=sys.stderr,
    )
    for n in (int(x) for x in args.chunks.split(",")):
        for p in (int(x) for x in args.pages.split(",")):
            need = n * CHUNK * (1 + p / PPC)
            if need > args.max_gib * (1 << 30):
                print(f"{p:>4} {n:>5} skipped ({need / (1 << 30):.1f} GiB > --max-gib)", file=sys.stderr)
                continue
            r = one(p, n, args.trials, src, dst)
            rows.append(r)
            print(
                f"{p:>4} {r['chunks']:>5} {r['fold_ms']:>9} {r['fold_us_per_page']:>8} "
                f"{r['fold_us_per_chunk']:>9} {r['memcpy_us_per_page']:>9} {r['ratio']:>6}",
                file=sys.stderr,
                flush=True,
            )
    json.dump(
        {"fold_protect": ou.FOLD_PROTECT, "kernel": os.uname().release, "trials": args.trials, "rows": rows},
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
