"""Redis's BGSAVE, stock vs under `python -m odfork_user exec` (the preload heap),
side by side on one machine.  Needs redis-server, redis-cli and redis-benchmark
(Debian: apt-get install redis-server).

    python bench/programs/redis_bgsave.py [--keys 3000000] [--value 1000] [--saves 3]
                                          [--rounds 6] [--one-at-a-time] [--json FILE]

For each mode: start redis-server (no persistence config, debug commands on),
DEBUG POPULATE KEYS key VALUE, then BGSAVE --saves times, reading Redis's own
INFO: latest_fork_usec (how long the main thread was frozen in fork),
rdb_last_cow_size (what the child's copy-on-write cost), the save's time.  Then
--rounds rounds of redis-benchmark (SET then GET, 200,000 each, random keys)
per mode, a BGSAVE started inside each round: throughput and latency
percentiles (p99.9, max) from redis-benchmark's own report.  Both servers stay
up and their rounds alternate (stock, odfork, odfork, stock, ...), unless
--one-at-a-time (for sizes where two servers do not fit in memory).
Correctness: keys of every data type are added by ordinary commands; DEBUG
DIGEST of all of it is the same in both modes, the
same after DEBUG RELOAD (save + load the RDB), and the RDB file one mode wrote
loads into a stock server with the same digest.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MODES = ("stock", "odfork")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, mode, workdir, rdb=None, extra=(), env=None):
        self.port = free_port()
        self.dir = workdir
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--dbfilename",
            "dump.rdb",
            "--enable-debug-command",
            "yes",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(workdir, "redis.log"),
            *extra,
        ]
        if rdb:
            shutil.copy(rdb, os.path.join(workdir, "dump.rdb"))
        if mode == "odfork":
            args = [sys.executable, "-P", "-m", "odfork_user", "exec", "--"] + args
        self.p = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **env) if env else None
        )
        for _ in range(600):
            if self.p.poll() is not None:
                raise RuntimeError(
                    f"redis-server ({mode}) exited with {self.p.returncode}: "
                    + open(os.path.join(workdir, "redis.log")).read()[-2000:]
                )
            try:
                if self.cli("PING") == "PONG" and self.info("persistence").get("loading") == "0":
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def cli(self, *cmd):
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *cmd], capture_output=True, text=True, check=True, timeout=600
        ).stdout.strip()

    def info(self, section):
        out = {}
        for line in self.cli("INFO", section).splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                out[k] = v.strip()
        return out

    def bgsave(self):
        """One BGSAVE, waited for; Redis's own numbers about it."""
        before = int(self.info("persistence")["rdb_changes_since_last_save"] or 0)
        t0 = time.perf_counter()
        self.cli("BGSAVE")
        while True:
            p = self.info("persistence")
            if (
                p["rdb_bgsave_in_progress"] == "0"
                and p["rdb_last_bgsave_status"] == "ok"
                and int(p["rdb_last_save_time"]) >= int(t0 - 1)
                and p.get("rdb_last_bgsave_time_sec") != "-1"
            ):
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        st = self.info("stats")
        return {
            "latest_fork_usec": int(st["latest_fork_usec"]),
            "rdb_last_cow_size": int(p["rdb_last_cow_size"]),
            "rdb_last_bgsave_time_sec": int(p["rdb_last_bgsave_time_sec"]),
            "wall_s": wall,
            "changes_before": before,
        }

    def stop(self):
        try:
            self.cli("SHUTDOWN", "NOSAVE")
        except subprocess.CalledProcessError:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def load_round(server, keys, requests=200000):
    """One round of redis-benchmark (SET then GET, random keys, 20 clients)
    with a BGSAVE started 0.5 s in (during the SETs), so the fork and the
    copy-on-write period after it fall inside what the clients measure.
    redis-benchmark's own report gives throughput and the latency percentiles."""
    bench = subprocess.Popen(
        [
            "redis-benchmark",
            "-p",
            str(server.port),
            "-t",
            "set,get",
            "-r",
            str(keys),
            "-n",
            str(requests),
            "-c",
            "20",
            "-d",
            "100",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(0.5)
    if server.info("persistence")["rdb_bgsave_in_progress"] == "0":
        server.cli("BGSAVE")
    out, _ = bench.communicate(timeout=600)
    fork_usec = int(server.info("stats")["latest_fork_usec"])
    while server.info("persistence")["rdb_bgsave_in_progress"] != "0":
        time.sleep(0.05)
    cow = int(server.info("persistence")["rdb_last_cow_size"])
    return dict(parse_report(out), fork_usec=fork_usec, rdb_last_cow_size=cow)


def parse_report(text):
    """redis-benchmark's report per test: requests per second, and p50, p99,
    p99.9 and max from its "Latency by percentile distribution"."""
    out, test, dist = {}, None, []
    for line in text.replace("\r", "\n").splitlines():
        line = line.strip()
        if line.startswith("====== ") and line.endswith(" ======"):
            test, dist = line.strip("= ").strip(), []
            out[test] = {}
        elif test and "% <= " in line and "milliseconds" in line:
            pct, rest = line.split("% <= ")
            dist.append((float(pct), float(rest.split()[0])))
        elif test and line.startswith("throughput summary:") and dist:

            def at(p):
                return next(ms for q, ms in dist if q >= p)

            out[test].update(
                rps=float(line.split(":")[1].split()[0]),
                p50_ms=at(50),
                p99_ms=at(99),
                p999_ms=at(99.9),
                max_ms=dist[-1][1],
            )
    return {k: v for k, v in out.items() if "rps" in v}


def add_every_type(server, n=2000):
    """Keys of every data type (list, hash, set, sorted set, stream, bitmap,
    HyperLogLog, geo, strings with and without expiry), made by ordinary
    commands, so that the digests cover every encoding an RDB holds."""
    cmds = []
    for i in range(n):
        cmds += [
            f"RPUSH list:{i % 50} item{i}",
            f"HSET hash:{i % 50} field{i} {i * 7}",
            f"SADD set:{i % 50} member{i}",
            f"ZADD zset:{i % 50} {i * 1.5} m{i}",
            f"XADD stream:{i % 10} {i + 1}-1 f v{i}",
            f"SETBIT bits:{i % 5} {i * 13} 1",
            f"PFADD hll:{i % 5} e{i}",
            f"GEOADD geo:{i % 5} {(i % 360) - 180 + 0.5} {(i % 170) - 85 + 0.5} p{i}",
            f"SET str:{i} v{i}",
            f"SET ttl:{i} v{i} PXAT 4102444800000",
            f"INCRBY counter:{i % 20} {i}",
        ]
    subprocess.run(
        ["redis-cli", "-p", str(server.port)],
        input="\n".join(cmds) + "\n",
        text=True,
        capture_output=True,
        check=True,
        timeout=600,
    )


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def summarize_load(rounds):
    out = {"rounds": rounds}
    for op in ("SET", "GET"):
        rs = [r[op] for r in rounds if op in r]
        if rs:
            out[op] = {
                "rps_median": median([r["rps"] for r in rs]),
                "p99_ms_median": median([r["p99_ms"] for r in rs]),
                "p999_ms_median": median([r["p999_ms"] for r in rs]),
                "p999_ms_worst": max(r["p999_ms"] for r in rs),
                "max_ms_median": median([r["max_ms"] for r in rs]),
                "max_ms_worst": max(r["max_ms"] for r in rs),
            }
    if rounds:
        out["fork_usec_median"] = median([r["fork_usec"] for r in rounds])
        out["rdb_last_cow_size_median"] = median([r["rdb_last_cow_size"] for r in rounds])
    return out


def run(a):
    results, digests, rdbs, servers = {}, {}, {}, {}
    tmp = tempfile.mkdtemp(prefix="odfork-redis-")
    try:
        for mode in MODES:
            d = os.path.join(tmp, mode)
            os.makedirs(d)
            s = servers[mode] = Server(mode, d)
            t0 = time.perf_counter()
            s.cli("DEBUG", "POPULATE", str(a.keys), "key", str(a.value))
            add_every_type(s)
            populate_s = time.perf_counter() - t0
            mem = s.info("memory")
            saves = [s.bgsave() for _ in range(a.saves)]
            digests[mode] = s.cli("DEBUG", "DIGEST")
            shutil.copy(os.path.join(d, "dump.rdb"), os.path.join(tmp, f"{mode}.rdb"))
            rdbs[mode] = os.path.join(tmp, f"{mode}.rdb")
            s.cli("DEBUG", "RELOAD")
            results[mode] = {
                "used_memory": int(mem["used_memory"]),
                "populate_s": populate_s,
                "saves": saves,
                "latest_fork_usec_median": median([x["latest_fork_usec"] for x in saves]),
                "rdb_last_cow_size_median": median([x["rdb_last_cow_size"] for x in saves]),
                "digest": digests[mode],
                "digest_after_reload": s.cli("DEBUG", "DIGEST"),
            }
            if not a.side_by_side:  # one server at a time (memory): its load rounds now
                results[mode]["load"] = summarize_load([load_round(s, a.keys) for _ in range(a.rounds)])
                s.stop()
                del servers[mode]
        if a.side_by_side:
            # both servers up; the rounds alternate between them, the order
            # flipped every round, so that the machine's drift falls on both
            rounds = {m: [] for m in MODES}
            for i in range(a.rounds):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    rounds[mode].append(load_round(servers[mode], a.keys))
            for mode in MODES:
                results[mode]["load"] = summarize_load(rounds[mode])
        for s in servers.values():
            s.stop()
        servers.clear()
        # the RDB each mode wrote loads into a stock server with the same digest
        for mode in MODES:
            d = os.path.join(tmp, f"load-{mode}")
            os.makedirs(d)
            s = Server("stock", d, rdb=rdbs[mode])
            try:
                results[mode]["digest_of_its_rdb_in_stock"] = s.cli("DEBUG", "DIGEST")
            finally:
                s.stop()
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    same = (
        len(
            {r["digest"] for r in results.values()}
            | {r["digest_after_reload"] for r in results.values()}
            | {r["digest_of_its_rdb_in_stock"] for r in results.values()}
        )
        == 1
    )
    return {
        "keys": a.keys,
        "value": a.value,
        "rounds": a.rounds,
        "side_by_side": a.side_by_side,
        "results": results,
        "digests_equal": same,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=3_000_000)
    p.add_argument("--value", type=int, default=1000)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6, help="load rounds per mode (0: none)")
    p.add_argument(
        "--one-at-a-time",
        dest="side_by_side",
        action="store_false",
        help="run the two servers one after the other (half the memory) instead of both up, "
        "their load rounds alternating",
    )
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not all(shutil.which(x) for x in ("redis-server", "redis-cli", "redis-benchmark")):
        print("redis-server, redis-cli and redis-benchmark are needed (apt-get install redis-server)", file=sys.stderr)
        return 2
    out = run(a)
    for mode, r in out["results"].items():
        print(
            f"{mode:8} used_memory {r['used_memory'] / 2**30:.2f} GiB  fork {r['latest_fork_usec_median']} us "
            f"(each: {[x['latest_fork_usec'] for x in r['saves']]})  cow {r['rdb_last_cow_size_median'] / 2**20:.1f} MiB"
            f"  save {median([x['wall_s'] for x in r['saves']]):.1f} s"
        )
        for op in ("SET", "GET"):
            if op in r["load"]:
                L = r["load"][op]
                print(
                    f"         under load {op}: {L['rps_median']:.0f} rps, p99 {L['p99_ms_median']:.3f} ms, "
                    f"p99.9 {L['p999_ms_median']:.3f} ms (worst {L['p999_ms_worst']:.3f}), "
                    f"max {L['max_ms_median']:.2f} ms (worst {L['max_ms_worst']:.2f})"
                )
        if r["load"].get("rounds"):
            print(
                f"         under load: fork {r['load']['fork_usec_median']} us, "
                f"cow {r['load']['rdb_last_cow_size_median'] / 2**20:.1f} MiB (medians)"
            )
    print("digests equal (both modes, after DEBUG RELOAD, each RDB in a stock server):", out["digests_equal"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if out["digests_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
