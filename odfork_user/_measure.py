"""Workloads shared by `python -m odfork_user compare` and bench/.

A holder owns `size` bytes of written memory of one kind:
  bytearray   ordinary heap memory, 4 KiB pages, forked with os.fork
  numpy-thp   a numpy array (transparent huge pages where the kernel gives
              them: THP 'madvise' mode + numpy's madvise), forked with os.fork
  odfork      an arena block, forked with odfork
  odfork-empty an arena of the same size with nothing written, forked with odfork
"""
import json
import os
import statistics
import sys
import time

from odfork_user import Arena, odfork
from odfork_user._core import CHUNK_SIZE

KINDS = ("bytearray", "numpy-thp", "odfork", "odfork-empty")
PAGE = 4096


def free_bytes():
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def thp_state():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class Holder:
    def __init__(self, kind, size):
        self.kind, self.size = kind, size
        self.arena = None
        self.fork = os.fork
        if kind == "bytearray":
            self.data = bytearray(size)
            mv = memoryview(self.data)
            for off in range(0, size, 1 << 26):  # write every page
                n = min(1 << 26, size - off)
                mv[off:off + n] = b"\x01" * n
        elif kind == "numpy-thp":
            import numpy as np
            self.data = np.ones(size, dtype=np.uint8)
        elif kind in ("odfork", "odfork-empty"):
            self.arena = Arena(size)
            self.fork = odfork
            if kind == "odfork":
                self.data = self.arena.alloc(size)
                for off in range(0, size, 1 << 26):
                    n = min(1 << 26, size - off)
                    self.data[off:off + n] = b"\x01" * n
            else:
                self.data = None
        else:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")

    def touch(self, step=CHUNK_SIZE):
        """Write one byte per `step` (the parent keeps working between forks)."""
        d = self.data
        if d is None:
            return
        for off in range(0, self.size, step):
            d[off] = (d[off] + 1) & 0xFF

    def close(self):
        self.data = None
        if self.arena is not None:
            self.arena.close()


def fork_once(fork):
    """Fork; the child leaves at once.  Returns (pid, seconds until fork returned)."""
    t0 = time.perf_counter()
    pid = fork()
    if pid == 0:
        os._exit(0)
    return pid, time.perf_counter() - t0


def measure(kind, size, rounds):
    h = Holder(kind, size)
    lat, rt = [], []
    try:
        for _ in range(rounds):
            h.touch()
            pid, t = fork_once(h.fork)
            os.waitpid(pid, 0)
            lat.append(t)
            h.touch()
            t0 = time.perf_counter()
            pid = h.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            rt.append(time.perf_counter() - t0)
    finally:
        h.close()
    return {"kind": kind, "size": size, "rounds": rounds,
            "fork_ms": statistics.median(lat) * 1e3, "roundtrip_ms": statistics.median(rt) * 1e3,
            "fork_all_ms": [x * 1e3 for x in lat], "roundtrip_all_ms": [x * 1e3 for x in rt]}


if __name__ == "__main__":  # python -m odfork_user._measure KIND SIZE ROUNDS -> JSON on stdout
    kind, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    json.dump(measure(kind, size, rounds), sys.stdout)
