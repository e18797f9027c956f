"""fork() of a language runtime's heap, plain vs under `python -m odfork_user exec`
(the preload heap), side by side on one machine.

    python bench/programs/runtime_fork.py [--runtime ruby|aligned|both] [--mib 500]
                                          [--forks 11] [--json FILE]

ruby     Debian's ruby, unmodified: an array of strings, arrays and hashes
         (--mib of resident memory, about), then Process.fork.
aligned  a model runtime in C (built here with gcc): its objects in 64 KiB
         pages from posix_memalign(65536, 65536), as runtimes that align their
         object pages allocate them, --mib of them, written, then fork().

Three modes: plain, exec, exec-mmap (exec --mmap: small anonymous private
mmaps in the arena too, where Ruby's object pages come from).  All modes'
processes are built first and stay up; then --forks rounds, the modes in
turn, the order reversed every other round: each round the
process forks once, its child exits at once; the parent times fork() itself
(fork_ms: how long the program was frozen) and fork + the child's exit + wait
(cycle_ms).  Medians per mode, the ratios plain/exec and plain/exec-mmap, and the process's
resident memory and how much of it lies in the arena (odfork-pool mappings in
/proc/PID/smaps).  Output: JSON (stdout, and --json FILE).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

RUBY = r"""
mib = Integer(ARGV[0])
# an element: a 40-byte string (its own buffer), a 4-element array, a 2-entry
# hash with a 40-byte string; ~650 bytes resident with their slots and tables
n = mib * 1024 * 1024 / 650
$data = Array.new(n) { |i| ["s#{i}".ljust(40, "x"), [i, i + 1, i.to_s, nil], {k: i, v: "v#{i}".ljust(40, "y")}] }
GC.start
STDOUT.sync = true
puts "ready"
while (line = STDIN.gets)
  break if line.strip == "quit"
  t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  pid = Process.fork { exit!(0) }
  t1 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  Process.wait(pid)
  t2 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  puts "#{(t1 - t0) * 1e3} #{(t2 - t0) * 1e3}"
end
"""

ALIGNED_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e3 + t.tv_nsec / 1e6; }
int main(int argc, char **argv)
{
    size_t pages = (size_t)atol(argv[1]) * 16; /* 64 KiB pages */
    void **page = malloc(pages * sizeof(void *));
    for (size_t i = 0; i < pages; i++) {
        if (posix_memalign(&page[i], 65536, 65536))
            return 1;
        memset(page[i], (int)i, 65536);
        char *small = malloc(48); /* the runtime's own bookkeeping between its pages */
        if (!small)
            return 1;
        memset(small, 1, 48);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    puts("ready");
    char line[64];
    while (fgets(line, sizeof(line), stdin) && strncmp(line, "quit", 4)) {
        double t0 = now();
        pid_t pid = fork();
        if (pid == 0)
            _exit(0);
        double t1 = now();
        waitpid(pid, NULL, 0);
        printf("%f %f\n", t1 - t0, now() - t0);
    }
    return 0;
}
"""

MODES = ("plain", "exec", "exec-mmap")  # exec-mmap: exec --mmap (small anonymous mmaps in the arena too)


def smaps_kib(pid):
    total = arena = 0
    cur_arena = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Size")):
                cur_arena = "odfork-pool" in line
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                arena += kib if cur_arena else 0
    return total, arena


def start(cmd, mode):
    if mode != "plain":
        cmd = (
            [sys.executable, "-P", "-m", "odfork_user", "exec"]
            + (["--mmap"] if mode == "exec-mmap" else [])
            + ["--"]
            + cmd
        )
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{cmd}: {line!r}, exit {p.poll()}")
    return p


def run_runtime(name, mib, forks, workdir):
    if name == "ruby":
        src = os.path.join(workdir, "fork.rb")
        with open(src, "w") as f:
            f.write(RUBY)
        cmd = ["ruby", src, str(mib)]
    else:
        src, exe = os.path.join(workdir, "aligned.c"), os.path.join(workdir, "aligned")
        with open(src, "w") as f:
            f.write(ALIGNED_C)
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        cmd = [exe, str(mib)]
    procs = {m: start(cmd, m) for m in MODES}
    res = {m: {"fork_ms": [], "cycle_ms": []} for m in MODES}
    try:
        for m, p in procs.items():
            res[m]["rss_mib"], res[m]["arena_mib"] = (v / 1024 for v in smaps_kib(p.pid))
        for r in range(forks):
            for m in MODES if r % 2 == 0 else MODES[::-1]:
                p = procs[m]
                p.stdin.write("fork\n")
                p.stdin.flush()
                f, c = map(float, p.stdout.readline().split())
                res[m]["fork_ms"].append(f)
                res[m]["cycle_ms"].append(c)
    finally:
        for p in procs.values():
            p.stdin.write("quit\n")
            p.stdin.close()
            p.wait()
    out = {"command": cmd, "mib": mib, "forks": forks}
    for m in MODES:
        out[m] = {
            "rss_mib": round(res[m]["rss_mib"], 1),
            "arena_mib": round(res[m]["arena_mib"], 1),
            "fork_ms_median": round(statistics.median(res[m]["fork_ms"]), 3),
            "cycle_ms_median": round(statistics.median(res[m]["cycle_ms"]), 3),
            "fork_ms": [round(x, 3) for x in res[m]["fork_ms"]],
        }
    for k in ("fork_ms_median", "cycle_ms_median"):
        out["speedup_" + k.split("_")[0]] = round(out["plain"][k] / out["exec"][k], 1)
        out["speedup_" + k.split("_")[0] + "_mmap"] = round(out["plain"][k] / out["exec-mmap"][k], 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=("ruby", "aligned", "both"), default="both")
    ap.add_argument("--mib", type=int, default=500)
    ap.add_argument("--forks", type=int, default=11)
    ap.add_argument("--json")
    a = ap.parse_args()
    names = ("ruby", "aligned") if a.runtime == "both" else (a.runtime,)
    need = {"ruby": "ruby", "aligned": "gcc"}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for n in names:
            if not shutil.which(need[n]):
                results[n] = {"skipped": f"{need[n]} is not installed"}
                continue
            results[n] = run_runtime(n, a.mib, a.forks, d)
    text = json.dumps(results, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
