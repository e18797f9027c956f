"""Fork semantics: after a fork, no byte written by one process is seen by another."""

import hashlib
import os
import random

import pytest

import odfork_user as ou
from testlib import CH, finish_child, in_child, start_child


def digest(buf):
    return hashlib.sha256(buf).hexdigest()


def fill_random(buf, seed):
    buf[:] = random.Random(seed).randbytes(len(buf))


def test_child_sees_exact_prefork_bytes(arena):
    buf = arena.alloc(9 * CH + 12345)
    fill_random(buf, 1)
    before = digest(buf)
    assert in_child(lambda: digest(buf)) == before
    assert digest(buf) == before


@pytest.mark.parametrize("pattern", ["dense", "sparse", "boundary"])
def test_child_writes_are_invisible_to_parent(arena, pattern):
    buf = arena.alloc(8 * CH)
    fill_random(buf, 2)
    before = digest(buf)

    def child():
        if pattern == "dense":
            buf[:] = b"\xaa" * len(buf)
        elif pattern == "sparse":
            for off in range(0, len(buf), CH):
                buf[off + 17] ^= 0xFF
        else:  # one write straddling every chunk boundary
            for off in range(CH, len(buf), CH):
                buf[off - 3 : off + 3] = b"XXXXXX"
        # and a second (repeated) write to the same places
        buf[5] ^= 0x55
        return digest(buf)

    child_digest = in_child(child)
    assert child_digest != before
    assert digest(buf) == before


@pytest.mark.parametrize("pattern", ["dense", "sparse", "boundary"])
def test_parent_writes_are_invisible_to_child(arena, pattern):
    buf = arena.alloc(8 * CH)
    fill_random(buf, 3)
    before = digest(buf)
    rd, wr = os.pipe()
    go_r, go_w = os.pipe()

    def child():
        os.read(go_r, 1)  # wait until the parent has written
        first = digest(buf)
        os.read(go_r, 1)  # and written again
        return first, digest(buf)

    pid, r = start_child(child)
    if pattern == "dense":
        buf[:] = b"\x11" * len(buf)
    elif pattern == "sparse":
        for off in range(0, len(buf), CH):
            buf[off] = (buf[off] + 1) & 0xFF
    else:
        for off in range(CH, len(buf), CH):
            buf[off - 2 : off + 2] = b"\x00\x01\x02\x03"
    os.write(go_w, b"x")
    buf[100] ^= 0xFF  # repeated write, now to a private chunk
    os.write(go_w, b"x")
    first, second = finish_child(pid, r)
    assert first == before and second == before
    assert digest(buf) != before
    for fd in (rd, wr, go_r, go_w):
        os.close(fd)


def test_both_write_same_bytes_each_keeps_its_own(arena):
    buf = arena.alloc(3 * CH)
    buf[:] = b"p" * len(buf)
    go_r, go_w = os.pipe()

    def child():
        buf[CH : CH + 4] = b"kid!"
        os.read(go_r, 1)
        return bytes(buf[CH : CH + 4]), buf.tobytes().count(b"p")

    pid, r = start_child(child)
    buf[CH : CH + 4] = b"dad!"
    os.write(go_w, b"x")
    got, count = finish_child(pid, r)
    assert got == b"kid!" and count == len(buf) - 4
    assert bytes(buf[CH : CH + 4]) == b"dad!"


def test_unwritten_fresh_memory_is_isolated(arena):
    # chunks never touched before the fork: first touch after it is private
    buf = arena.alloc(4 * CH)

    def child():
        buf[3 * CH + 1] = 42
        return buf[3 * CH + 1]

    assert in_child(child) == 42
    assert buf[3 * CH + 1] == 0
    buf[3 * CH + 2] = 7
    assert in_child(lambda: (buf[3 * CH + 1], buf[3 * CH + 2])) == (0, 7)


def test_nested_forks_three_deep(arena):
    buf = arena.alloc(4 * CH)
    buf[:] = b"\x00" * len(buf)

    def level(depth):
        # every level writes its own mark at its own offset and in a shared spot
        buf[depth * 1000] = depth
        buf[7] = depth
        seen = bytes(buf[0:4001:1000])
        expect = bytes([min(d, depth) if d <= depth else 0 for d in range(5)])
        assert seen == expect, (depth, seen, expect)
        if depth < 3:
            below = in_child(level, depth + 1)
            # the deeper levels' writes never reach us
            assert buf[7] == depth and bytes(buf[0:4001:1000]) == expect
            return [depth] + below
        return [depth]

    assert level(0) == [0, 1, 2, 3]
    assert buf[7] == 0 and buf[1000] == 0


def test_thirty_concurrent_children(arena):
    buf = arena.alloc(6 * CH)
    fill_random(buf, 4)
    before = digest(buf)
    go_r, go_w = os.pipe()

    def child(i):
        os.read(go_r, 1)
        for off in range(i * 4096, len(buf), 5 * 4096 + 64):
            buf[off] = i
        mine = digest(buf)
        os.read(go_r, 1)
        return mine == digest(buf), i, buf[i * 4096]

    kids = [start_child(child, i) for i in range(30)]
    os.write(go_w, b"x" * 30)
    buf[0:CH] = b"\x01" * CH  # the parent writes while the children write
    os.write(go_w, b"y" * 30)
    results = [finish_child(pid, r) for pid, r in kids]
    assert all(stable for stable, _, _ in results)
    assert [v for _, _, v in results] == list(range(30))
    assert digest(buf[CH:]) == hashlib.sha256(random.Random(4).randbytes(6 * CH)[CH:]).hexdigest()
    assert digest(buf) != before


def test_parent_view_stays_after_child_exits(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"a" * len(buf)
    for i in range(5):
        in_child(lambda: buf.__setitem__(slice(0, 10), b"b" * 10))
        assert bytes(buf[:10]) == b"a" * 10
        buf[20 + i] = ord("c")
    assert bytes(buf[20:25]) == b"ccccc"


def test_numpy_arrays_are_isolated(arena):
    np = pytest.importorskip("numpy")
    a = arena.ndarray((3, CH // 8), "int64")
    assert a.shape == (3, CH // 8) and a.dtype == np.int64 and not a.any()
    a[:] = 7

    def child():
        a[:, :10] = -1
        return int(a.sum())

    total = 7 * a.size
    assert in_child(child) == total - 3 * 10 * 8
    assert int(a.sum()) == total


def test_os_fork_keeps_isolation(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"o" * len(buf)

    def child():
        buf[0] = ord("X")
        return bytes(buf[:2])

    assert in_child(child, fork=os.fork) == b"Xo"
    assert bytes(buf[:2]) == b"oo"
    buf[1] = ord("Y")
    assert in_child(lambda: bytes(buf[:2]), fork=os.fork) == b"oY"


def _mp_worker(args):
    # runs in a multiprocessing (fork) child; the arena view is inherited
    buf, i = _SHARED["buf"], args
    seen = buf[0]
    buf[0] = 100 + i
    buf[CH + i] = i
    return seen, buf[0]


_SHARED = {}


def test_multiprocessing_fork_context_keeps_isolation(arena):
    import multiprocessing as mp

    buf = arena.alloc(3 * CH)
    buf[0] = 1
    _SHARED["buf"] = buf
    try:
        with mp.get_context("fork").Pool(3) as pool:
            out = pool.map(_mp_worker, range(6))
    finally:
        _SHARED.clear()
    assert all(seen == 1 or seen >= 100 for seen, _ in out)  # a worker sees its own earlier writes only
    assert buf[0] == 1 and bytes(buf[CH : CH + 6]) == b"\x00" * 6


def test_process_pool_executor_keeps_isolation(arena):
    import concurrent.futures as cf
    import multiprocessing as mp

    buf = arena.alloc(2 * CH)
    buf[:4] = b"keep"
    _SHARED["buf"] = buf
    try:
        with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
            out = list(ex.map(_mp_worker, range(4)))
    finally:
        _SHARED.clear()
    assert len(out) == 4
    assert bytes(buf[:4]) == b"keep"


def test_two_arenas_fork_together():
    with ou.Arena(4 * CH) as a1, ou.Arena(4 * CH) as a2:
        b1, b2 = a1.alloc(CH), a2.alloc(CH)
        b1[0], b2[0] = 1, 2

        def child():
            b1[0], b2[0] = 10, 20
            return b1[0] + b2[0]

        assert in_child(child) == 30
        assert (b1[0], b2[0]) == (1, 2)
        a1.check()
        a2.check()
        del b1, b2
