"""odfork_user.install(): the interpreter's objects in an arena.

install() changes the allocators of the whole interpreter, so every test runs
its script in a fresh interpreter; the script asserts, and the test checks
that it ran to the end.  The heap allocator itself is also driven directly
(no install) against a model.
"""

import errno
import random
import textwrap

import pytest

import odfork_user as ou
from odfork_user._core import ffi, lib
from testlib import CH, run_py

PRELUDE = """
import gc, os, sys, threading, weakref, pickle
import odfork_user as ou
from odfork_user import odfork

def in_child(fn, fork=odfork):
    from odfork_user import _child
    pid, r = _child.fork_call(fn, fork=fork)
    pidfd = os.pidfd_open(pid)
    msg = _child.receive(r, pidfd)
    os.close(pidfd)
    os.close(r)
    _, st = os.waitpid(pid, 0)
    assert st == 0 and msg is not None and msg[0] == "ok", (st, msg)
    return msg[1]

def in_arena(obj, arena):
    # the object's own memory (its header) lies in the arena
    return arena.address <= id(obj) < arena.address + arena.size
"""


def run(code, timeout=120, **env):
    p = run_py(PRELUDE + textwrap.dedent(code) + "\nprint('SCRIPT-DONE')\n", timeout=timeout, env=env)
    assert p.returncode == 0 and "SCRIPT-DONE" in p.stdout, f"rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_objects_live_in_the_arena_and_stay_isolated():
    run("""
        a = ou.Arena(1 << 30)
        before = {"old": [1, 2, 3]}            # made before install: stays where it is
        ou.install(a)
        assert ou.installed()
        class Point:
            def __init__(self, x, y): self.x, self.y = x, y
        d = {f"k{i}": i for i in range(20000)}
        lst = list(range(50000))
        pts = [Point(i, -i) for i in range(1000)]
        big = "s" * 300000
        blob = bytearray(b"b" * 100000)
        # (dict and list headers may come from CPython's free lists of objects
        # made before install; their tables and item arrays are counted below)
        n600 = 600
        # Small objects (pymalloc's) come from the interpreter's own pymalloc arenas while
        # those made before install still have free pools; on 3.12+ they still do here.
        small = (pts[0], blob) if sys.version_info < (3, 12) else ()
        for o in small + (big, "x" * n600):
            assert in_arena(o, a), type(o)
        assert not in_arena(before, a)
        st = ou.heap_stats()
        assert st["live_bytes"] >= 300000 + 50000 * 8 and st["raw_bytes"] > 0

        def child():
            d["k5"] = -5; d["new"] = 1; lst[7] = "seven"; lst.append(0)
            pts[3].x = 99; blob[0] = ord("X"); before["old"].append(4)
            s = big + "t"
            gc.collect()
            return d["k5"], len(d), lst[7], len(lst), pts[3].x, blob[:1], before["old"], len(s)

        got = in_child(child)
        assert got == (-5, 20001, "seven", 50001, 99, b"X", [1, 2, 3, 4], 300001), got
        assert d["k5"] == 5 and "new" not in d and lst[7] == 7 and len(lst) == 50000
        assert pts[3].x == 3 and blob[:1] == b"b" and before["old"] == [1, 2, 3] and len(big) == 300000
        a.check()
        ou.pyheap.heap_check()
    """)


def test_nested_forks_and_os_fork():
    run("""
        a = ou.Arena(1 << 30)
        ou.install(a)
        d = {i: str(i) * 3 for i in range(30000)}

        def grandchild():
            d[1] = "grand"
            return d[1], d[2]

        def child():
            d[2] = "child"
            g = in_child(grandchild, fork=os.fork)
            return g, d[1], d[2]

        assert in_child(child) == (("grand", "child"), "111", "child")
        assert d[1] == "111" and d[2] == "222"
        a.check()
    """)


def test_threads_allocating_while_another_thread_forks():
    run("""
        a = ou.Arena(1 << 30)
        ou.install(a)
        stop = threading.Event()
        made = [0]
        def alloc_loop():
            keep = []
            while not stop.is_set():
                keep.append({"n": made[0], "s": "z" * (made[0] % 2000)})
                if len(keep) > 5000:
                    del keep[:2500]
                made[0] += 1
        ts = [threading.Thread(target=alloc_loop) for _ in range(3)]
        for t in ts: t.start()
        shared = [str(i) for i in range(10000)]
        try:
            for i in range(15):
                def child():
                    # allocate a lot in the child too; the parent's threads do not exist here
                    tmp = [[j] * 10 for j in range(2000)]
                    shared[0] = "c"
                    gc.collect()
                    return len(tmp), shared[0], shared[1]
                assert in_child(child) == (2000, "c", "1")
                assert shared[0] == "0"
        finally:
            stop.set()
            for t in ts: t.join()
        assert made[0] > 0
        a.check()
        ou.pyheap.heap_check()
    """)


def test_ordinary_python_after_install():
    # weakrefs, gc in the child, exceptions with tracebacks, del of objects made
    # before install, uninstall and reinstall, the context manager.
    run("""
        import traceback
        pre = [{"i": i, "s": "p" * 700} for i in range(3000)]   # big blocks from the old allocator
        pre_str = "q" * 100000
        a = ou.Arena(1 << 30)
        with ou.installing(a):
            class Node:
                pass
            n = Node()
            r = weakref.ref(n)
            cb_hits = []
            n2 = Node()
            r2 = weakref.ref(n2, lambda ref: cb_hits.append(1))
            cyc = [Node() for _ in range(100)]
            for x, y in zip(cyc, cyc[1:] + cyc[:1]):
                x.other = y
            del x, y
            def child():
                global cyc
                del cyc
                freed = gc.collect()
                try:
                    {}["missing"]
                except KeyError:
                    tb = traceback.format_exc()
                return freed, "KeyError" in tb and "missing" in tb, r() is n
            freed, tb_ok, alive = in_child(child)
            assert freed >= 100 and tb_ok and alive
            assert r() is n
            del n2
            assert r2() is None and cb_hits == [1]
            del pre[::2]                      # free blocks of the previous allocator
            pre.extend({"j": j} for j in range(5000))
            s2 = pre_str + "r"               # a new big str from an old one
            assert in_arena(s2, a) and not in_arena(pre_str, a)
            del pre_str
            gc.collect()
        assert not ou.installed()
        after = "u" * 100000
        assert not in_arena(after, a)         # new objects no longer go to the arena
        ou.install(a)                         # resume with the same heap
        again = "v" * 100000
        assert in_arena(again, a)
        try:
            ou.install(ou.Arena(1 << 24))
            raise AssertionError("a second arena was accepted")
        except ValueError:
            pass
        try:
            a.close()
            raise AssertionError("closed the arena holding the heap")
        except BufferError:
            pass
        a.check()
        ou.pyheap.heap_check()
    """)


def test_freed_space_is_reused_and_chunks_given_back():
    run("""
        a = ou.Arena(1 << 30)
        ou.install(a)
        base = ou.heap_stats()
        for rnd in range(5):
            data = [bytes(100000) for _ in range(200)]      # ~20 MB of big blocks
            top = ou.heap_stats()["top_bytes"]
            del data
            gc.collect()
            if rnd == 0:
                first_top = top
            assert top <= first_top + (4 << 20), (rnd, top, first_top)   # reused, not grown
        st = ou.heap_stats()
        assert st["mapped_bytes"] <= base["mapped_bytes"] + (8 << 20), (base, st)
        assert a.stats()["chunks_resident"] * a.chunk_size <= st["mapped_bytes"] + (64 << 20)
        ou.pyheap.heap_check()
    """)


# ---- the block allocator alone, against a model ----------------------------


@pytest.fixture
def heap():
    a = ou.Arena(64 * CH)
    out = ffi.new("odf_heap_t **")
    assert lib.odf_heap_create(a._h, a.address, 32 * CH, out) == 0
    a._alloc.alloc_aligned(32 * CH, CH)
    yield a, out[0]
    a.check()
    a.close()


def _free_one(h, live, rng):
    """Free a block of the model `live` (addr -> (size, byte)), checking its bytes first."""
    addr = rng.choice(list(live))
    n, b = live.pop(addr)
    p = ffi.cast("void *", addr)
    assert _read(p, n) == bytes([b]) * n
    lib.odf_heap_free(h, p)


def _realloc_one(h, live, rng, sizes):
    """Resize a block of the model to a size drawn from `sizes`; the caller checks the result."""
    addr = rng.choice(list(live))
    n, b = live.pop(addr)
    m = rng.choice(sizes) + rng.randrange(64)
    return addr, n, b, m, lib.odf_heap_realloc(h, ffi.cast("void *", addr), m)


def _fill(p, n, byte):
    ffi.memmove(p, bytes([byte]) * n, n)


def _read(p, n):
    return ffi.buffer(ffi.cast("char *", p), n)[:]


def test_heap_blocks_keep_their_bytes_under_random_churn(heap):
    a, h = heap
    rng = random.Random(7)
    live = {}  # address -> (size, byte)
    sizes = [1, 64, 513, 1000, 4000, 33000, 70000, 300000]
    for step in range(4000):
        op = rng.random()
        if op < 0.5 or not live:
            n = rng.choice(sizes) + rng.randrange(64)
            p = lib.odf_heap_alloc(h, n)
            assert p != ffi.NULL
            addr = int(ffi.cast("uintptr_t", p))
            assert addr % 16 == 0 and addr not in live and lib.odf_heap_owns(h, p)
            assert lib.odf_heap_usable(h, p) >= n
            if n <= 48:  # small blocks (a malloc's dict entries, keys) take their 16-byte class
                assert lib.odf_heap_usable(h, p) == (n + 15) // 16 * 16
            b = step % 251
            _fill(p, n, b)
            live[addr] = (n, b)
        elif op < 0.8:
            _free_one(h, live, rng)
        else:
            addr, n, b, m, q = _realloc_one(h, live, rng, sizes)
            assert q != ffi.NULL
            assert _read(q, min(n, m)) == bytes([b]) * min(n, m)
            _fill(q, m, b)
            live[int(ffi.cast("uintptr_t", q))] = (m, b)
        if step % 500 == 0:
            assert lib.odf_heap_check(h) == 0
    # no two live blocks overlap
    spans = sorted((addr, addr + n) for addr, (n, _) in live.items())
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))
    for addr, (n, b) in live.items():
        assert _read(ffi.cast("void *", addr), n) == bytes([b]) * n
        lib.odf_heap_free(h, ffi.cast("void *", addr))
    st = ffi.new("odf_heap_stats_t *")
    lib.odf_heap_stats(h, st)
    assert st.live_blocks == 0 and st.live_bytes == 0
    assert lib.odf_heap_check(h) == 0


def test_heap_large_block_grows_in_place_and_top_comes_down(heap):
    a, h = heap
    p = lib.odf_heap_alloc(h, 100000)
    q = lib.odf_heap_realloc(h, p, 1000000)  # at the top: grows in place
    assert q == p
    st = ffi.new("odf_heap_stats_t *")
    lib.odf_heap_free(h, q)
    lib.odf_heap_stats(h, st)
    assert st.top_bytes == 0 and st.free_extents == 0
    big = lib.odf_heap_alloc(h, 8 * CH)  # crosses chunks: they are mapped
    _fill(big, 8 * CH, 3)
    resident = a.stats()["chunks_resident"]
    lib.odf_heap_free(h, big)
    assert a.stats()["chunks_resident"] < resident  # whole chunks above the top were given back
    assert lib.odf_heap_alloc(h, 40 * CH) == ffi.NULL  # bigger than the heap: NULL, heap intact
    assert lib.odf_heap_check(h) == 0


ALIGNS = [32, 64, 128, 256, 1024, 4096, 16384, 65536, 1 << 20, CH]


def test_heap_aligned_blocks_under_random_churn_with_ordinary_ones(heap):
    # aligned blocks (every power of two from 32 bytes to a chunk, small and
    # large sizes) interleaved with ordinary ones: each at a multiple of its
    # alignment, its bytes its own, freed and resized as any block
    a, h = heap
    rng = random.Random(11)
    live = {}  # address -> (size, byte)
    out = ffi.new("void **")
    sizes = [1, 100, 3000, 5000, 33000, 70000, 300000]
    for step in range(3000):
        op = rng.random()
        if (op < 0.55 and len(live) < 120) or not live:  # (at most ~20 chunk-aligned runs live: they fit)
            n = rng.choice(sizes) + rng.randrange(64)
            if rng.random() < 0.6:
                align = rng.choice(ALIGNS)
                assert lib.odf_heap_alloc_aligned(h, align, n, out) == 0
                p = out[0]
            else:
                align, p = 16, lib.odf_heap_alloc(h, n)
            assert p != ffi.NULL
            addr = int(ffi.cast("uintptr_t", p))
            assert addr % align == 0 and addr not in live and lib.odf_heap_owns(h, p), (hex(addr), align, n)
            assert lib.odf_heap_usable(h, p) >= n
            b = step % 251
            _fill(p, n, b)
            live[addr] = (n, b)
        elif op < 0.8:
            _free_one(h, live, rng)
        else:
            addr, n, b, m, q = _realloc_one(h, live, rng, sizes)
            assert q != ffi.NULL and lib.odf_heap_usable(h, q) >= m
            assert _read(q, min(n, m)) == bytes([b]) * min(n, m)
            _fill(q, m, b)
            live[int(ffi.cast("uintptr_t", q))] = (m, b)
        if step % 300 == 0:
            assert lib.odf_heap_check(h) == 0
    spans = sorted((addr, addr + lib.odf_heap_usable(h, ffi.cast("void *", addr))) for addr in live)
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))  # usable sizes do not overlap either
    for addr, (n, b) in live.items():
        assert _read(ffi.cast("void *", addr), n) == bytes([b]) * n
        lib.odf_heap_free(h, ffi.cast("void *", addr))
    st = ffi.new("odf_heap_stats_t *")
    lib.odf_heap_stats(h, st)
    assert st.live_blocks == 0 and st.live_bytes == 0  # (slabs stay: the top does not come down)
    assert lib.odf_heap_check(h) == 0


def test_heap_aligned_runs_pack_grow_and_give_their_chunks_back(heap):
    a, h = heap
    out = ffi.new("void **")
    st = ffi.new("odf_heap_stats_t *")
    # a runtime's object pages: 64 KiB at 64 KiB, one after another, with
    # small blocks between them: the pages skipped to align are reused
    pages, smalls = [], []
    for i in range(200):
        assert lib.odf_heap_alloc_aligned(h, 65536, 65536, out) == 0
        pages.append(out[0])
        smalls.append(lib.odf_heap_alloc(h, 200))
        assert lib.odf_heap_usable(h, out[0]) == 65536
    lib.odf_heap_stats(h, st)
    assert st.top_bytes <= 202 * 65536, st.top_bytes  # the runs and one slab, next to each other
    assert lib.odf_heap_check(h) == 0
    # a run at the top grows in place, shrinks in place
    assert lib.odf_heap_alloc_aligned(h, CH, 100000, out) == 0
    big = out[0]
    assert int(ffi.cast("uintptr_t", big)) % CH == 0
    assert lib.odf_heap_realloc(h, big, 3 * CH) == big and lib.odf_heap_usable(h, big) == 3 * CH
    assert lib.odf_heap_realloc(h, big, CH + 1) == big and lib.odf_heap_usable(h, big) == CH + 4096
    _fill(big, CH + 1, 9)
    resident = a.stats()["chunks_resident"]
    lib.odf_heap_free(h, big)
    assert a.stats()["chunks_resident"] < resident  # its whole chunks went back
    for p in pages + smalls:
        lib.odf_heap_free(h, p)
    lib.odf_heap_stats(h, st)
    assert st.live_blocks == 0 and st.top_bytes <= 3 * 65536  # (the small blocks' slab stays)
    # what the heap cannot serve: an error code, nothing changed
    assert lib.odf_heap_alloc_aligned(h, 2 * CH, 100, out) == errno.EINVAL  # above a chunk: the caller's
    assert lib.odf_heap_alloc_aligned(h, 3 * 4096, 100, out) == errno.EINVAL  # not a power of two
    assert lib.odf_heap_alloc_aligned(h, 0, 100, out) == errno.EINVAL
    assert lib.odf_heap_alloc_aligned(h, CH, 40 * CH, out) == errno.ENOMEM  # bigger than the heap
    assert lib.odf_heap_check(h) == 0
