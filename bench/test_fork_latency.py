"""os.fork vs odfork: fork latency and fork + exit + wait round trip, side by side.

Run:  pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,min,max,rounds
Sizes: ODFORK_BENCH_SIZES=64M,256M,1G (default).

Kinds of memory (see odfork_user/_measure.py):
  bytearray    os.fork, ordinary heap memory in 4 KiB pages (the baseline marked baseline=True)
  numpy-thp    os.fork, a numpy array in transparent huge pages
  odfork       odfork, the same bytes in an arena
  odfork-empty odfork, an arena of the same size with nothing written
Before every round the parent writes one byte per 2 MiB (untimed): the state of a
process that keeps working between forks.
"""
import os

import pytest

from conftest import require_memory, sizes
from odfork_user._measure import KINDS, Holder, thp_state

np = pytest.importorskip("numpy")  # the THP baseline needs numpy


@pytest.fixture(scope="module", params=sizes(), ids=lambda s: f"{s >> 20}M")
def size(request):
    return request.param


@pytest.fixture(params=KINDS)
def holder(request, size):
    require_memory(size)
    h = Holder(request.param, size)
    yield h
    h.close()


def _extra(benchmark, h):
    benchmark.extra_info.update(kind=h.kind, size=h.size, thp=thp_state(),
                                kernel=os.uname().release, chunk_size=1 << 21)


def test_fork_latency(benchmark, holder):
    """Until fork returns in the parent; the child is reaped in the next setup."""
    benchmark.group = f"fork-latency-{holder.size >> 20}M"
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


def test_fork_roundtrip(benchmark, holder):
    """fork, child _exit(0), waitpid."""
    benchmark.group = f"fork-roundtrip-{holder.size >> 20}M"
    _extra(benchmark, holder)

    def target():
        pid = holder.fork()
        if pid == 0:
            os._exit(0)
        _, st = os.waitpid(pid, 0)
        return st

    assert benchmark.pedantic(target, setup=holder.touch, rounds=15, warmup_rounds=1) == 0
