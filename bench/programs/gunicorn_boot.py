"""gunicorn --preload with an app holding 2 GiB of Python objects: time to boot
4 workers, and to replace a worker (--max-requests), under python vs
python -m odfork_user run.  Needs gunicorn (pip install gunicorn).

    python bench/programs/gunicorn_boot.py [--bytes 2G] [--json FILE]

Times come from gunicorn's own server hooks (gunicorn_app/gconf.py):
boot = from when_ready (the app is loaded, the arbiter about to fork) to the
4th worker's post_worker_init; replacement = from a child_exit to the next
post_worker_init.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "gunicorn_app")


def size(text):
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text)


def events(path):
    out = []
    if os.path.exists(path):
        for line in open(path):
            t, what, pid = line.split()
            out.append((float(t), what, int(pid)))
    return out


def one(mode, nbytes, port, requests=40):
    with tempfile.TemporaryDirectory() as d:
        ev = os.path.join(d, "events")
        env = dict(os.environ, GUNICORN_APP_BYTES=str(nbytes), GUNICORN_EVENTS=ev, PYTHONPATH=APP)
        launcher = ["-m", "odfork_user", "run"] if mode == "run" else []
        cmd = [
            sys.executable,
            "-P",
            *launcher,
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            "4",
            "-c",
            os.path.join(APP, "gconf.py"),
            "-b",
            f"127.0.0.1:{port}",
            "--max-requests",
            "5",
            "--log-level",
            "warning",
            "app:app",
        ]
        p = subprocess.Popen(cmd, env=env, cwd=APP, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 600
            while sum(1 for e in events(ev) if e[1] == "worker_ready") < 4:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn ({mode}) did not boot: {p.stderr.read()[-2000:]}")
                time.sleep(0.05)
            for i in range(requests):  # each worker leaves after 5 requests and is replaced
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/{i}", timeout=60) as r:
                    assert r.read().startswith(b"x" * 100)
            time.sleep(1)
        finally:
            p.terminate()
            p.wait(timeout=120)
        e = events(ev)
    ready = next(t for t, w, _ in e if w == "ready")
    boots = [t for t, w, _ in e if w == "worker_ready"]
    boot = boots[3] - ready
    replace = []
    for t, w, _ in e:
        if w == "child_exit":
            nxt = [u for u in boots[4:] if u > t]
            if nxt:
                replace.append(nxt[0] - t)
    return {
        "boot_4_workers_s": boot,
        "replacements": len(replace),
        "replace_median_s": statistics.median(replace) if replace else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=size, default=2 << 30)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    out = {"bytes": a.bytes, "results": {}}
    for i, mode in enumerate(("python", "run")):
        out["results"][mode] = r = one(mode, a.bytes, 18000 + i)
        print(
            f"{mode:7} boot of 4 workers {r['boot_4_workers_s'] * 1e3:.1f} ms, worker replacement "
            f"{(r['replace_median_s'] or 0) * 1e3:.1f} ms (median of {r['replacements']})"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
