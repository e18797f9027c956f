"""Where Redis's time goes under the preload: the main process's minor page
faults during one redis-benchmark round (SET then GET, 200,000 requests each,
random keys over 1,000,000 x 1000 B), without and with a BGSAVE inside it,
stock vs `python -m odfork_user exec`.

    python bench/programs/redis_faults.py
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import redis_bgsave as rb


def minflt(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[7]), int(parts[9])  # minflt, majflt


for mode in ("stock", "odfork"):
    d = tempfile.mkdtemp()
    s = rb.Server(mode, d)
    try:
        s.cli("DEBUG", "POPULATE", "1000000", "key", "1000")
        pid = int(s.info("server")["process_id"])
        res = {}
        for label, save in (("no save", False), ("with BGSAVE", True)):
            f0 = minflt(pid)[0]
            bench = subprocess.Popen(
                [
                    "redis-benchmark",
                    "-p",
                    str(s.port),
                    "-t",
                    "set,get",
                    "-r",
                    "1000000",
                    "-n",
                    "200000",
                    "-c",
                    "20",
                    "-d",
                    "100",
                    "-q",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)
            if save:
                s.cli("BGSAVE")
            out, _ = bench.communicate()
            while s.info("persistence")["rdb_bgsave_in_progress"] != "0":
                time.sleep(0.05)
            res[label] = (
                minflt(pid)[0] - f0,
                " | ".join(ln.strip() for ln in out.replace("\r", "\n").splitlines() if "requests per second" in ln),
            )
        print(mode, res)
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)
