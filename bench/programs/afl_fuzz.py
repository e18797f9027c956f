"""A python-afl fuzz target with 1 GiB of state built in plain Python
(bench/programs/afl_target.py) under AFL++, plain python vs
python -m odfork_user run.  Needs afl++ (apt-get install afl++) and python-afl.

    python bench/programs/afl_fuzz.py [--bytes 1G] [--seconds 20] [--json FILE]

Executions per second from AFL++'s own fuzzer_stats: each mode runs twice, for
S and 2S seconds, and the rate is the difference of execs_done over S (the
state is built once per run, before the fork server starts, and would otherwise
count against the rate).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def size(text):
    return int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text)


def execs(mode, nbytes, seconds):
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "in"))
        with open(os.path.join(d, "in", "seed"), "w") as f:
            f.write("hello")
        launcher = ["-P", "-m", "odfork_user", "run"] if mode == "run" else []
        env = dict(
            os.environ,
            FUZZ_STATE_BYTES=str(nbytes),
            AFL_SKIP_CPUFREQ="1",
            AFL_NO_UI="1",
            AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1",
            AFL_NO_AFFINITY="1",
        )
        subprocess.run(
            [
                "py-afl-fuzz",
                "-i",
                os.path.join(d, "in"),
                "-o",
                os.path.join(d, "out"),
                "-V",
                str(seconds),
                "-m",
                "none",
                "-t",
                "20000",
                "--",
                sys.executable,
                *launcher,
                os.path.join(HERE, "afl_target.py"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=seconds * 10 + 600,
        )
        stats = {}
        with open(os.path.join(d, "out", "default", "fuzzer_stats")) as f:
            for line in f:
                k, _, v = line.partition(":")
                stats[k.strip()] = v.strip()
        return int(stats["execs_done"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=size, default=1 << 30)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if not (shutil.which("py-afl-fuzz") and shutil.which("afl-fuzz")):
        print("needs afl++ (apt-get install afl++) and python-afl (pip install python-afl)", file=sys.stderr)
        return 2
    out = {"bytes": a.bytes, "seconds": a.seconds, "results": {}}
    for mode in ("python", "run"):
        short, long_ = execs(mode, a.bytes, a.seconds), execs(mode, a.bytes, 2 * a.seconds)
        out["results"][mode] = {"execs_short": short, "execs_long": long_, "execs_per_s": (long_ - short) / a.seconds}
        print(f"{mode:7} {(long_ - short) / a.seconds:8.1f} execs/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
