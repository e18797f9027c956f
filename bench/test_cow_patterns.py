"""Write patterns after a fork: what a whole-chunk copy costs against os.fork's page copies.

dense:  the child rewrites all the data (one write per 4 KiB page)
sparse: the child writes one byte per 2 MiB
Each round is fork + the child's writes + exit + wait, timed in the parent.
extra_info records the bytes the child copied (odfork: its cow_copies * 2 MiB).
"""
import os

import pytest

from conftest import require_memory, sizes
from odfork_user._measure import Holder

PAGE = 4096
CH = 1 << 21


@pytest.fixture(scope="module", params=[s for s in sizes() if s <= (256 << 20)], ids=lambda s: f"{s >> 20}M")
def size(request):
    return request.param


@pytest.fixture(params=["bytearray", "odfork"])
def holder(request, size):
    require_memory(size)
    h = Holder(request.param, size)
    yield h
    h.close()


@pytest.mark.parametrize("pattern", ["dense", "sparse"])
def test_child_writes(benchmark, holder, pattern):
    benchmark.group = f"child-{pattern}-write-{holder.size >> 20}M"
    step = PAGE if pattern == "dense" else CH
    benchmark.extra_info.update(kind=holder.kind, size=holder.size, pattern=pattern)
    r, w = os.pipe()

    def target():
        pid = holder.fork()
        if pid == 0:
            d = holder.data
            for off in range(0, holder.size, step):
                d[off] = 3
            copied = holder.arena.stats()["bytes_copied"] if holder.arena else -1
            os.write(w, copied.to_bytes(8, "little", signed=True))
            os._exit(0)
        copied = int.from_bytes(os.read(r, 8), "little", signed=True)
        os.waitpid(pid, 0)
        return copied

    copied = benchmark.pedantic(target, setup=holder.touch, rounds=5, warmup_rounds=1)
    if holder.arena is not None:
        expect = holder.size if pattern == "dense" else holder.size  # every chunk written once
        assert copied == expect
        benchmark.extra_info["bytes_copied"] = copied
    os.close(r)
    os.close(w)
