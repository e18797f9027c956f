"""Workloads shared by `python -m odfork_user compare` and bench/.

A holder owns `size` bytes of written memory of one kind:
  bytearray    ordinary heap memory, 4 KiB pages, forked with os.fork
  numpy-thp    a numpy array (transparent huge pages where the kernel gives
               them: THP 'madvise' mode + numpy's madvise), forked with os.fork
  odfork       an arena block, forked with odfork, the default configuration
               (page mode: private views at fork time, the kernel copies the
               pages written; views folded in the background once nobody shares them)
  odfork-chunk the same, Arena(cow="chunk"): read-only shared chunks, a
               SIGSEGV and a whole 2 MiB copy on the first write of each
  odfork-empty an arena of the same size with nothing written, forked with odfork

Metrics (all medians; one fork per round):
  fork_ms             until fork returns in the parent
  roundtrip_ms        fork, child _exit(0), waitpid
  first_write_parent_us  the parent's first write to a chunk after the fork (child alive)
  first_write_child_us   the child's first write, timed in the child
  dense_ms            fork + the child rewrites every byte + exit + wait
  sparse_ms           fork + the child writes one byte per 2 MiB + exit + wait
  read_parent_ms      the parent reads everything after the fork (child alive)
  read_child_ms       the child reads everything, timed in the child
  dense_copied / sparse_copied   bytes the child's writes made private
                      (its Private_Dirty growth in /proc/self/smaps_rollup)
"""

import json
import os
import statistics
import sys
import time
import zlib

from odfork_user import Arena, odfork
from odfork_user._core import CHUNK_SIZE

KINDS = ("bytearray", "numpy-thp", "odfork", "odfork-empty")
EXTRA_KINDS = ("odfork-chunk",)  # measured on request / in some groups
_BLOCK = b"\x02" * CHUNK_SIZE


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


def plot_latency(panels, path, title=None):
    """Log-log plot of median milliseconds against data size, one panel per
    metric: panels = [(panel title, {kind: [(size bytes, ms), ...]}), ...]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels):
        for kind, pts in series.items():
            pts = sorted(pts)
            if pts:
                ax.plot([p[0] / (1 << 30) for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("data size (GiB)")
        ax.set_ylabel("median (ms)")
        ax.set_title(panel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def private_dirty():
    """Bytes of this process's memory that only it maps and has written."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


class Holder:
    def __init__(self, kind, size):
        self.kind, self.size = kind, size
        self.arena = None
        self.fork = os.fork
        self.data = None
        if kind == "bytearray":
            self.data = bytearray(size)
        elif kind == "numpy-thp":
            import numpy as np

            self.data = np.zeros(size, dtype=np.uint8)
        elif kind in ("odfork", "odfork-empty", "odfork-chunk"):
            self.arena = Arena(size, cow="chunk" if kind == "odfork-chunk" else None)
            self.fork = odfork
            if kind != "odfork-empty":
                self.data = self.arena.alloc(size)
            else:
                self._scratch = bytearray(max(size // CHUNK_SIZE, 1))
        else:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS + EXTRA_KINDS)})")
        if self.data is not None:
            self.view = memoryview(self.data).cast("B")
            self.write_all(b"\x01")

    def write_all(self, byte=None):
        """Write every byte (2 MiB at a time)."""
        block = _BLOCK if byte is None else byte * CHUNK_SIZE
        v = self.view
        for off in range(0, self.size, CHUNK_SIZE):
            n = min(CHUNK_SIZE, self.size - off)
            v[off : off + n] = block[:n]

    def touch(self, step=CHUNK_SIZE):
        """Write one byte per `step` (the parent keeps working between forks).

        With nothing to write (odfork-empty) the same Python loop runs over a
        scratch buffer: the loop itself dirties interpreter heap pages that the
        next fork must write-protect again (perf: copy_page_range), and the
        empty baseline must pay that as the others do."""
        if self.data is None:
            scratch = self._scratch
            for off in range(0, self.size, step):
                j = (off // step) % len(scratch)
                scratch[j] = (scratch[j] + 1) & 0xFF
            return
        v = self.view
        for off in range(0, self.size, step):
            v[off] = (v[off] + 1) & 0xFF

    @property
    def mechanism(self):
        """The copy mode (and how kernel writes fare in it)."""
        return f"{self.arena.cow}/{self.arena.kernel_writes}" if self.arena is not None else "kernel"

    def kernel_write(self, off, src_fd, n=4096):
        """Let the kernel write n bytes at off (os.preadv from src_fd); on the
        chunk mode prepare_write() must come first, and is timed too."""
        view = self.view[off : off + n]
        if self.arena is not None and self.arena.kernel_writes == "prepare_write":
            self.arena.prepare_write(view)
        return os.preadv(src_fd, [view], 0)

    def read_all(self):
        return zlib.crc32(self.view) if self.data is not None else 0

    def close(self):
        self.view = None
        self.data = None
        if self.arena is not None:
            self.arena.close()


class WaitingChild:
    """A forked child that runs commands from the parent: ('w', offset) writes one
    byte and answers how long it took, ('r',) reads everything, ('q',) exits."""

    def __init__(self, holder):
        self.cmd_r, self.cmd_w = os.pipe()
        self.ans_r, self.ans_w = os.pipe()
        self.pid = holder.fork()
        if self.pid == 0:
            try:
                self._serve(holder)
            finally:
                os._exit(0)
        os.close(self.cmd_r)
        os.close(self.ans_w)

    def _serve(self, h):
        while True:
            cmd = os.read(self.cmd_r, 9)
            if not cmd or cmd[:1] == b"q":
                return
            t0 = time.perf_counter()
            if cmd[:1] == b"w":
                off = int.from_bytes(cmd[1:9], "little")
                h.view[off] = (h.view[off] + 1) & 0xFF
            elif cmd[:1] == b"r":
                h.read_all()
            elif cmd[:1] == b"d":  # report Private_Dirty
                os.write(self.ans_w, private_dirty().to_bytes(8, "little"))
                continue
            dt = time.perf_counter() - t0
            os.write(self.ans_w, int(dt * 1e9).to_bytes(8, "little"))

    def ask(self, cmd, arg=0):
        os.write(self.cmd_w, cmd + arg.to_bytes(8, "little"))
        return int.from_bytes(os.read(self.ans_r, 8), "little")

    def close(self):
        try:
            os.write(self.cmd_w, b"q" + bytes(8))
        except OSError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.cmd_w)
        os.close(self.ans_r)


def child_pattern(h, pattern):
    """Fork; the child writes `pattern` ('dense' or 'sparse') and exits.
    Returns (seconds for fork+writes+exit+wait, bytes the writes made private)."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = h.fork()
    if pid == 0:
        before = private_dirty()
        if pattern == "dense":
            h.write_all()
        else:
            h.touch(CHUNK_SIZE)
        os.write(w, max(private_dirty() - before, 0).to_bytes(8, "little"))
        os._exit(0)
    copied = int.from_bytes(os.read(r, 8), "little")
    os.waitpid(pid, 0)
    dt = time.perf_counter() - t0
    os.close(r)
    os.close(w)
    return dt, copied


def measure(kind, size, rounds, heavy_rounds=3, progress=None):
    def say(what):
        if progress:
            print(f"  {kind} {size >> 20}M: {what}", file=progress, flush=True)

    h = Holder(kind, size)
    out = {"kind": kind, "size": size}
    try:
        say("fork latency and round trip")
        lat, rt = [], []
        for _ in range(rounds):
            h.touch()
            t0 = time.perf_counter()
            pid = h.fork()
            if pid == 0:
                os._exit(0)
            lat.append(time.perf_counter() - t0)
            os.waitpid(pid, 0)
            h.touch()
            t0 = time.perf_counter()
            pid = h.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            rt.append(time.perf_counter() - t0)
        out["fork_ms"] = statistics.median(lat) * 1e3
        out["roundtrip_ms"] = statistics.median(rt) * 1e3
        if h.data is None:
            return out
        say("first writes and reads after the fork")
        fwp, fwc, rp, rc = [], [], [], []
        for i in range(heavy_rounds):
            h.touch()
            c = WaitingChild(h)
            try:
                nch = max(h.size // CHUNK_SIZE, 1)
                off = (i * 7 % nch) * CHUNK_SIZE + 123  # the child's chunk
                poff = ((i * 7 + 1) % nch) * CHUNK_SIZE + 321  # another one for the parent
                fwc.append(c.ask(b"w", off) / 1e9)
                t0 = time.perf_counter()
                h.view[poff] ^= 1
                fwp.append(time.perf_counter() - t0)
                rc.append(c.ask(b"r") / 1e9)
                t0 = time.perf_counter()
                h.read_all()
                rp.append(time.perf_counter() - t0)
            finally:
                c.close()
        out["first_write_parent_us"] = statistics.median(fwp) * 1e6
        out["first_write_child_us"] = statistics.median(fwc) * 1e6
        out["read_parent_ms"] = statistics.median(rp) * 1e3
        out["read_child_ms"] = statistics.median(rc) * 1e3
        for pattern in ("dense", "sparse"):
            say(f"{pattern} writes in the child")
            ts, cp = [], []
            for _ in range(heavy_rounds):
                h.touch()
                t, copied = child_pattern(h, pattern)
                ts.append(t)
                cp.append(copied)
            out[f"{pattern}_ms"] = statistics.median(ts) * 1e3
            out[f"{pattern}_copied"] = statistics.median(cp)
    finally:
        h.close()
    return out


if __name__ == "__main__":  # python -m odfork_user.cli.measure KIND SIZE ROUNDS [HEAVY] -> JSON on stdout
    kind, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    heavy = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    json.dump(measure(kind, size, rounds, heavy, progress=sys.stderr), sys.stdout)
