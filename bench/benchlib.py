"""Helpers shared by the benchmarks: the sizes to run (ODFORK_BENCH_SIZES) and memory checks."""

import os

import pytest

from odfork_user.arena import parse_size
from odfork_user.cli.measure import Holder, free_bytes


def sizes(cap=None):
    out = [parse_size(s) for s in os.environ.get("ODFORK_BENCH_SIZES", "64M,256M,1G").split(",")]
    return [s for s in out if cap is None or s <= cap]


def require_memory(size, factor):
    need = int(factor * size) + (512 << 20)
    if free_bytes() < need:
        pytest.skip(f"{size >> 20} MiB needs {need >> 20} MiB available, {free_bytes() >> 20} MiB free")


def make_holder(kind, size, factor):
    require_memory(size, factor)
    return Holder(kind, size)
