"""Redis's own test suite against an external server, stock vs under
`python -m odfork_user exec`, side by side: the same outcome for every test is
the check.

    python bench/programs/redis_testsuite.py [--src DIR] [--units unit/type/hash,...]
                                             [--json FILE]

The suite is the one of the installed redis-server's source release: on Debian
the source package of the installed version (orig tarball + Debian's patches,
from deb.debian.org, unpacked by dpkg-source into ~/.cache/odfork_user/redis-src),
or a tree given with --src.  It is run the way Redis's own CI runs its
"external server" job (.github/workflows/external.yml of the release): a server
started with --save "" --enable-protected-configs yes --enable-debug-command yes
--enable-module-command yes, then `./runtest --host 127.0.0.1 --port P --tags -slow`.
Every test's outcome ([ok], [err], [exception], [skip], [ignore]) is read from
runtest's output and the two modes compared test by test.  Exit status 0 when
both modes ran and every test had the same outcome in both, 77 when the suite
could not be had here.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import redis_bgsave as rb  # noqa: E402

POOLS = (
    "http://deb.debian.org/debian/pool/main/r/redis/",
    "http://deb.debian.org/debian-security/pool/updates/main/r/redis/",
)
CACHE = os.path.expanduser("~/.cache/odfork_user/redis-src")
SERVER_FLAGS = ["--enable-protected-configs", "yes", "--enable-module-command", "yes"]
LINE = re.compile(r"^\[(ok|err|exception|skip|ignore)\]: (.*?)(?: \(\d+ ms\))?$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SKIP = 77  # exit status: the suite could not be had here (no network, no tclsh, no dpkg-source)


def debian_source():
    """The source tree of the installed redis-server's Debian package (cached)."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "redis-server"], capture_output=True, text=True, check=True
    ).stdout.strip()
    version = version.split(":", 1)[-1]
    upstream = version.split("-", 1)[0]
    tree = os.path.join(CACHE, version, f"redis-{upstream}")
    if os.path.exists(os.path.join(tree, "runtest")):
        return tree
    work = os.path.join(CACHE, version)
    os.makedirs(work, exist_ok=True)
    files = [f"redis_{version}.dsc", f"redis_{upstream}.orig.tar.gz", f"redis_{version}.debian.tar.xz"]
    for name in files:
        for pool in POOLS:
            try:
                with urllib.request.urlopen(pool + name.replace("~", "%7e"), timeout=60) as r:
                    data = r.read()
                break
            except OSError:
                data = None
        if data is None:
            raise RuntimeError(f"{name} is on none of {POOLS}")
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
    # dpkg-source checks every file against the checksums in the .dsc
    subprocess.run(
        ["dpkg-source", "--no-check", "-x", files[0], os.path.basename(tree)], cwd=work, check=True, capture_output=True
    )
    return tree


def link_binaries(src):
    """The suite runs src/redis-cli, src/redis-benchmark, ...: the installed ones."""
    for name in ("redis-server", "redis-cli", "redis-benchmark", "redis-check-aof", "redis-check-rdb"):
        path, link = shutil.which(name), os.path.join(src, "src", name)
        if path and not os.path.exists(link):
            os.symlink(path, link)


def run_suite(mode, src, units, timeout):
    d = tempfile.mkdtemp(prefix=f"redis-suite-{mode}-")
    server = rb.Server(mode, d, extra=SERVER_FLAGS)
    pid = int(server.info("server")["process_id"])
    args = [
        "./runtest",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--tags",
        "-slow",
        "--timeout",
        str(timeout),
    ]
    for u in units:
        args += ["--single", u]
    # a private copy of the tree: runtest deletes every tests/tmp/server.* of
    # its tree when it starts, so two runs in one tree break each other
    tree = os.path.join(d, "tree")
    shutil.copytree(src, tree, symlinks=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(args, cwd=tree, capture_output=True, text=True, timeout=timeout * 4)
        out = ANSI.sub("", p.stdout + p.stderr)
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        out = ANSI.sub("", (e.stdout or b"").decode(errors="replace"))
        rc = "timeout"
    wall = time.perf_counter() - t0
    alive = server.p.poll() is None
    maps = open(f"/proc/{pid}/maps").read() if alive else ""
    server.stop()
    # the forks it made (INFO's total_forks is reset by the suite's CONFIG RESETSTAT): its log's lines
    with open(os.path.join(d, "redis.log"), errors="replace") as f:
        log = f.read()
    forks = sum(
        log.count(x)
        for x in ("Background saving started by pid", "Background append only file rewriting started by pid")
    )
    shutil.rmtree(d, ignore_errors=True)
    results = collections.Counter()
    for line in out.splitlines():
        m = LINE.match(line.strip())
        if m:
            results[(m.group(2), m.group(1))] += 1
    return {
        "mode": mode,
        "rc": rc,
        "wall_s": round(wall, 1),
        "server_alive_after": alive,
        "arena_mapped": "odfork-pool" in maps,
        "forks": forks,
        "outcomes": dict(collections.Counter(k[1] for k in results.elements())),
        "tests": results,
        "tail": "\n".join(out.splitlines()[-15:]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--src", help="a Redis source tree matching the installed server (default: Debian's source package)"
    )
    ap.add_argument(
        "--units", default="", help="comma-separated units (e.g. unit/type/hash) instead of the whole suite"
    )
    ap.add_argument("--timeout", type=int, default=600, help="runtest's --timeout: seconds without progress")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    if not a.src and not (shutil.which("dpkg-query") and shutil.which("dpkg-source")):
        print("no --src and no dpkg-source to unpack Debian's source package", file=sys.stderr)
        return SKIP
    if not shutil.which("tclsh8.6") and not shutil.which("tclsh8.5"):
        print("Redis's suite needs tclsh 8.5 or 8.6 (Debian: apt-get install tcl)", file=sys.stderr)
        return SKIP
    try:
        src = a.src or debian_source()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"the suite's source could not be had: {e}", file=sys.stderr)
        return SKIP
    link_binaries(src)
    units = [u for u in a.units.split(",") if u]
    runs = {m: run_suite(m, src, units, a.timeout) for m in rb.MODES}
    s, o = runs["stock"]["tests"], runs["odfork"]["tests"]
    differ = sorted(
        f"{name}: stock {s.get((name, oc), 0)}x {oc}, odfork {o.get((name, oc), 0)}x"
        for (name, oc) in set(s) | set(o)
        if s.get((name, oc), 0) != o.get((name, oc), 0)
    )
    report = {
        "src": src,
        "units": units or "all (--tags -slow)",
        "runs": {m: {k: v for k, v in r.items() if k != "tests"} for m, r in runs.items()},
        "differences": differ,
    }
    for m, r in report["runs"].items():
        print(
            f"{m:7s} rc={r['rc']} {r['wall_s']} s outcomes={r['outcomes']} forks={r['forks']} "
            f"arena={r['arena_mapped']} alive={r['server_alive_after']}"
        )
    print(f"{len(differ)} tests differ" + "".join("\n  " + x for x in differ[:50]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    ok = not differ and all(r["tests"] and r["server_alive_after"] for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
