import os

import pytest

from odfork_user._measure import free_bytes
from odfork_user.arena import parse_size


def sizes():
    return [parse_size(s) for s in os.environ.get("ODFORK_BENCH_SIZES", "64M,256M,1G").split(",")]


def require_memory(size):
    need = 2 * size + (256 << 20)
    if free_bytes() < need:
        pytest.skip(f"needs {need >> 20} MiB available, {free_bytes() >> 20} MiB free")
