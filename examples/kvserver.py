"""An in-memory key-value server whose table lives in an arena, snapshotting to
disk every few seconds while a load generator keeps sending GET and SET, three ways:

  os.fork    table in a bytearray (4 KiB pages); a forked child writes the snapshot
  odfork     table in an arena; an odfork child writes the snapshot
  snapshot   table in an arena; arena.snapshot() saved by a background thread

The load generator is a separate process on loopback TCP (127.0.0.1), one request
at a time, bounded by --seconds.  Prints request latency p50 / p99 / max overall
and the max during snapshots.

Run:  python examples/kvserver.py [--size 2G] [--seconds 12] [--interval 3]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import odfork_user as ou
from odfork_user.arena import parse_size

VAL = 56
REC = 8 + VAL  # key (8) + value
REQ = 1 + 8 + VAL

CLIENT = r"""
import gc, os, random, socket, struct, sys, time, json
gc.disable()  # a collector pause here would be measured as server latency
port, seconds, nkeys = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rng = random.Random(7)
val = b"v" * 56
out = []
end = time.monotonic() + seconds
def recv(n):
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b: raise EOFError
        buf += b
    return buf
while True:
    t0 = time.monotonic()
    if t0 > end: break
    key = rng.randrange(nkeys)
    if rng.random() < 0.5:
        s.sendall(b"S" + key.to_bytes(8, "little") + val); recv(1)
    else:
        s.sendall(b"G" + key.to_bytes(8, "little") + bytes(56)); recv(56)
    out.append((t0, time.monotonic() - t0))
s.sendall(b"Q" + bytes(64))
with open(sys.argv[4], "w") as f: json.dump(out, f)
"""


def fill(table, nkeys):
    rec = bytearray(REC * 32768)
    for base in range(0, nkeys, 32768):
        n = min(32768, nkeys - base)
        for i in range(n):
            rec[i * REC : i * REC + 8] = (base + i).to_bytes(8, "little")
        table[base * REC : (base + n) * REC] = rec[: n * REC]


def serve(mode, table, arena, nkeys, seconds, interval, path):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as lat:
        lat_path = lat.name
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(seconds), str(nkeys), lat_path])
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    fork = os.fork if mode == "os.fork" else ou.odfork
    windows, current = [], None  # snapshot windows (start, end), monotonic
    saver = None
    next_snap = time.monotonic() + interval
    buf = bytearray(REQ)
    view = memoryview(buf)
    import gc

    gc.disable()  # the loop allocates little; a collection pause is not what is measured here
    try:
        while True:
            now = time.monotonic()
            if current is None and now >= next_snap:
                current = [now, None]
                if mode == "snapshot":
                    snap = arena.snapshot()

                    def save(snap=snap):
                        with snap:
                            snap.save(path)

                    saver = threading.Thread(target=save)
                    saver.start()
                else:
                    pid = fork()
                    if pid == 0:
                        try:
                            with open(path, "wb", buffering=0) as f:
                                f.write(table)
                        finally:
                            os._exit(0)
                    saver = pid
            if current is not None:
                done = (not saver.is_alive()) if mode == "snapshot" else os.waitpid(saver, os.WNOHANG)[0] != 0
                if done:
                    current[1] = time.monotonic()
                    windows.append(tuple(current))
                    current = None
                    next_snap = time.monotonic() + interval
            got = 0
            while got < REQ:
                n = conn.recv_into(view[got:], REQ - got)
                if not n:
                    raise EOFError
                got += n
            op, key = buf[0], int.from_bytes(buf[1:9], "little")
            off = key * REC + 8
            if op == ord("S"):
                table[off : off + VAL] = buf[9 : 9 + VAL]
                conn.sendall(b"k")
            elif op == ord("G"):
                conn.sendall(table[off : off + VAL])
            else:
                break
    except EOFError:
        pass
    finally:
        if current is not None:
            if mode == "snapshot":
                saver.join()
            else:
                os.waitpid(saver, 0)
            windows.append((current[0], time.monotonic()))
        gc.enable()
        conn.close()
        lsock.close()
        client.wait()
    with open(lat_path) as f:
        samples = json.load(f)
    os.unlink(lat_path)
    return samples, windows


def summarize(samples, windows):
    lat = sorted(x[1] for x in samples)
    during = [x[1] for x in samples if any(a <= x[0] <= b or a <= x[0] + x[1] <= b for a, b in windows)]
    q = statistics.quantiles(lat, n=100)
    return {
        "requests": len(lat),
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
        "max_ms": lat[-1] * 1e3,
        "max_during_ms": max(during) * 1e3 if during else 0.0,
        "snapshots": len(windows),
        "snapshot_s": statistics.median([b - a for a, b in windows]) if windows else 0.0,
    }


def run(size, seconds, interval, cow="page"):
    nkeys = size // REC
    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dump.bin")
        table = bytearray(nkeys * REC)
        fill(table, nkeys)
        out["os.fork"] = summarize(*serve("os.fork", table, None, nkeys, seconds, interval, path))
        del table
        for mode in ("odfork", "snapshot"):
            with ou.Arena(nkeys * REC, cow=cow) as arena:
                table = arena.alloc(nkeys * REC)
                fill(table, nkeys)
                out[mode] = summarize(*serve(mode, table, arena, nkeys, seconds, interval, path))
                arena.check()
                del table
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2G")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--interval", type=float, default=None, help="seconds between snapshots (default seconds/4)")
    p.add_argument(
        "--cow",
        choices=("chunk", "page"),
        default="page",
        help="the arena copy mode (default: page, the library default)",
    )
    p.add_argument("--json")
    a = p.parse_args(argv)
    size = parse_size(a.size)
    res = run(size, a.seconds, a.interval or a.seconds / 4, a.cow)
    print(f"kv server, {size >> 20} MiB of data, {a.seconds:g} s of load per mode")
    for name, r in res.items():
        print(
            f"  {name:<9} {r['requests']:7d} requests  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
            f"max {r['max_ms']:.2f} ms  max during snapshots {r['max_during_ms']:.2f} ms  "
            f"({r['snapshots']} snapshots, {r['snapshot_s']:.2f} s each)"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": size, "seconds": a.seconds, "results": res}, f)
    return res


if __name__ == "__main__":
    main()
