"""Fixtures shared by the tests; the helpers they use are in testlib.py."""

import os

import pytest

import odfork_user as ou
from odfork_user._core import lib
from testlib import CH, checked_arena, reap_all

# ODFORK_TEST_BREAK=cow runs the suite against a broken core (shared chunks made
# writable without a copy) to show which tests catch it.
if os.environ.get("ODFORK_TEST_BREAK") == "cow":
    _orig_init = ou.Arena.__init__

    def _broken_init(self, *a, **kw):
        _orig_init(self, *a, **kw)
        lib._odf_debug_break(self._h, lib.ODF_DEBUG_BROKEN_COW, 0)

    ou.Arena.__init__ = _broken_init


@pytest.fixture(autouse=True)
def reap_children():
    """No forked child outlives its test, whatever the test did."""
    yield
    reap_all()


@pytest.fixture
def arena():
    yield from checked_arena(ou.Arena(32 * CH))


@pytest.fixture
def chunk_arena():
    """An arena in whole-chunk copy mode (the default where userfaultfd is
    missing), for tests that count chunk copies and segments."""
    yield from checked_arena(ou.Arena(32 * CH, cow="chunk"))
