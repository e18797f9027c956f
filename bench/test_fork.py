"""os.fork vs odfork, side by side, one pytest-benchmark group per metric and size.

Run (one command regenerates bench/RESULTS.md and the plots):  bash bench/run.sh
By hand:  pytest bench/ --benchmark-only --benchmark-group-by=group
Sizes:    ODFORK_BENCH_SIZES=64M,256M,1G,4G,16G (a size is skipped, with the reason,
          when the memory it needs is not available: 1.3x the size for the latency
          groups, 2.3x for the write and read groups).

Kinds of memory (src/odfork_user/cli/measure.py):
  bytearray    os.fork, ordinary heap memory in 4 KiB pages (the baseline)
  numpy-thp    os.fork, a numpy array in transparent huge pages
  odfork       odfork, the same bytes in an arena (default configuration: page mode,
               private views at fork time, the kernel copies the pages written)
  odfork-chunk odfork, Arena(cow="chunk"): read-only shared chunks, whole-chunk copies
               (write, read and kernel-write groups)
  odfork-empty odfork, an arena of the same size with nothing written (latency groups only)
Before every round the parent writes one byte per 2 MiB (untimed): the state of a
process that keeps working between forks.  Timings are never asserted; results are.
"""

import os

import pytest

from benchlib import make_holder, sizes
from odfork_user.cli.measure import KINDS, WaitingChild, child_pattern, thp_state

np = pytest.importorskip("numpy")  # the THP baseline needs numpy
CH = 1 << 21
WRITE_KINDS = ("bytearray", "numpy-thp", "odfork", "odfork-chunk")
MECH_KINDS = WRITE_KINDS


def _extra(benchmark, h, **kw):
    benchmark.extra_info.update(
        kind=h.kind, size=h.size, thp=thp_state(), kernel=os.uname().release, chunk_size=CH, mode=h.mechanism, **kw
    )


@pytest.fixture(params=sizes(), ids=lambda s: f"{s >> 20}M")
def size(request):
    return request.param


@pytest.fixture(params=KINDS)
def holder(request, size):
    h = make_holder(request.param, size, 1.3)
    yield h
    h.close()


@pytest.fixture(params=WRITE_KINDS)
def writer(request, size):
    h = make_holder(request.param, size, 2.3)  # a dense rewrite doubles the data
    yield h
    h.close()


@pytest.fixture(params=MECH_KINDS)
def mech_writer(request, size):
    h = make_holder(request.param, size, 2.3)
    yield h
    h.close()


class LiveChild:
    """A fresh WaitingChild per round (untimed setup): the old one exits, the
    parent writes one byte per chunk, a new child is forked and answers once,
    so the round times only what comes after the fork."""

    def __init__(self, holder):
        self.holder, self.child, self.rounds = holder, None, 0

    def renew(self):
        self.close()
        self.holder.touch()
        self.child = WaitingChild(self.holder)
        self.child.ask(b"d")  # the child is up and waiting
        self.rounds += 1

    def close(self):
        if self.child:
            self.child.close()
            self.child = None


# 1. fork latency ---------------------------------------------------------------
def test_fork_latency(benchmark, holder):
    benchmark.group = f"1-fork-latency-{holder.size >> 20}M"
    _extra(benchmark, holder)
    pending = []

    def setup():
        while pending:
            os.waitpid(pending.pop(), 0)
        holder.touch()

    def target():
        pid = holder.fork()
        if pid == 0:
            os._exit(0)
        pending.append(pid)

    benchmark.pedantic(target, setup=setup, rounds=15, warmup_rounds=1)
    setup()
    if holder.arena is not None:
        holder.arena.check()


# 2. round trip ------------------------------------------------------------------
def test_fork_roundtrip(benchmark, holder):
    benchmark.group = f"2-roundtrip-{holder.size >> 20}M"
    _extra(benchmark, holder)

    def target():
        pid = holder.fork()
        if pid == 0:
            os._exit(0)
        return os.waitpid(pid, 0)[1]

    assert benchmark.pedantic(target, setup=holder.touch, rounds=15, warmup_rounds=1) == 0


# 3. fault handling: the first write after the fork ------------------------------
@pytest.mark.parametrize("who", ["parent", "child"])
def test_first_write(benchmark, mech_writer, who):
    """parent: one write to a chunk it shares with a live child.  child: the
    child's first write, asked over a pipe (the round trip, ~20 us, is included
    for every kind alike)."""
    w = mech_writer
    benchmark.group = f"3-first-write-{who}-{w.size >> 20}M"
    _extra(benchmark, w, who=who)
    live = LiveChild(w)
    nch = max(w.size // CH, 1)

    def target():
        off = (live.rounds * 5 % nch) * CH + 77
        if who == "parent":
            w.view[off] ^= 1
        else:
            live.child.ask(b"w", off)

    try:
        benchmark.pedantic(target, setup=live.renew, rounds=10, warmup_rounds=1)
    finally:
        live.close()


# 4 and 5. write patterns: dense rewrite, sparse writes (7. memory in extra_info) ----
@pytest.mark.parametrize("pattern", ["dense", "sparse"])
def test_child_writes(benchmark, writer, pattern):
    """fork + the child rewrites every byte (dense) or one byte per 2 MiB (sparse) + exit + wait.
    extra_info['copied'] is the child's Private_Dirty growth: the extra memory the pattern cost."""
    benchmark.group = f"{4 if pattern == 'dense' else 5}-{pattern}-writes-{writer.size >> 20}M"
    _extra(benchmark, writer, pattern=pattern)
    copied = []

    def target():
        t, c = child_pattern(writer, pattern)
        copied.append(c)

    benchmark.pedantic(target, setup=writer.touch, rounds=3 if writer.size > (256 << 20) else 5, warmup_rounds=0)
    benchmark.extra_info["copied"] = sorted(copied)[len(copied) // 2]
    if pattern == "dense":  # every page was written: all of it is private now
        assert benchmark.extra_info["copied"] >= writer.size * 0.9


# 6. read after fork ---------------------------------------------------------------
@pytest.mark.parametrize("who", ["parent", "child"])
def test_read_after_fork(benchmark, mech_writer, who):
    w = mech_writer
    benchmark.group = f"6-read-{who}-{w.size >> 20}M"
    _extra(benchmark, w, who=who)
    live = LiveChild(w)

    def target():
        if who == "parent":
            w.read_all()
        else:
            live.child.ask(b"r")

    try:
        benchmark.pedantic(target, setup=live.renew, rounds=3 if w.size > (256 << 20) else 5, warmup_rounds=0)
    finally:
        live.close()


# 8. a kernel write (os.preadv of 4 KiB) into memory shared with a live child ------
def test_kernel_write_parent(benchmark, mech_writer, tmp_path):
    """The parent's preadv into a chunk (page, for os.fork) it shares with a live
    child.  os.fork: the kernel copies one page.  odfork: userfaultfd copies the
    chunk; the fallback needs prepare_write() first (timed: it is the price)."""
    w = mech_writer
    benchmark.group = f"8-kernel-write-parent-{w.size >> 20}M"
    _extra(benchmark, w)
    src = tmp_path / "src.bin"
    src.write_bytes(b"k" * 4096)
    fd = os.open(src, os.O_RDONLY)
    live = LiveChild(w)
    nch = max(w.size // CH, 1)

    def target():
        return w.kernel_write((live.rounds * 5 % nch) * CH + 4096, fd)

    try:
        assert benchmark.pedantic(target, setup=live.renew, rounds=10, warmup_rounds=1) == 4096
    finally:
        live.close()
        os.close(fd)
