"""Redis's request rate with no save at all: stock, under `python -m odfork_user
exec`, and under exec with ODFORK_TCACHE=0 (no per-thread caches), all three
servers up at once and their rounds interleaved, so the machine's drift falls
on all of them.

    python -P bench/programs/redis_rate.py [--keys 1000000] [--rounds 8] [--test set]

Each server: DEBUG POPULATE KEYS key 1000; then per round, per server, one
redis-benchmark run (-t TEST, 200,000 requests, 20 clients, 100 B values,
random keys over KEYS).  Prints the median requests/s and the median server
CPU time (utime + stime of the whole process) per request.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import redis_bgsave as rb  # noqa: E402

MODES = {"stock": ("stock", {}), "odfork": ("odfork", {}), "odfork-no-tcache": ("odfork", {"ODFORK_TCACHE": "0"})}


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--test", default="set")
    a = ap.parse_args(argv)
    servers = {}
    try:
        for name, (mode, env) in MODES.items():
            s = rb.Server(mode, tempfile.mkdtemp(prefix=f"redis-rate-{name}-"), env=env)
            s.cli("DEBUG", "POPULATE", str(a.keys), "key", "1000")
            servers[name] = (s, int(s.info("server")["process_id"]))
        res = {name: [] for name in MODES}
        for r in range(a.rounds):
            for name in list(MODES) if r % 2 == 0 else list(MODES)[::-1]:
                s, pid = servers[name]
                c0 = cpu_s(pid)
                out = subprocess.run(
                    [
                        "redis-benchmark",
                        "-p",
                        str(s.port),
                        "-t",
                        a.test,
                        "-r",
                        str(a.keys),
                        "-n",
                        "200000",
                        "-c",
                        "20",
                        "-d",
                        "100",
                        "-q",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                rps = float(out.replace("\r", "\n").split("requests per second")[0].split()[-1])
                res[name].append((rps, (cpu_s(pid) - c0) / 200000 * 1e6))
        for name, xs in res.items():
            print(
                f"{name:17s} {a.test.upper()} {statistics.median(x[0] for x in xs):9.0f} requests/s  "
                f"{statistics.median(x[1] for x in xs):.2f} us server CPU a request  "
                f"(rounds: {', '.join(f'{x[0] / 1000:.0f}k' for x in xs)})"
            )
    finally:
        for s, _ in servers.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
