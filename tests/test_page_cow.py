"""cow="page" (experimental): first writes to shared chunks map them MAP_PRIVATE and the
kernel copies only the pages written.  Same isolation promises as the default mode."""
import hashlib
import os
import random
import threading
import time

import pytest

import odfork_user as ou
from odfork_user import odfork
from odfork_user._core import lib
from conftest import CH, checked_arena, finish_child, in_child, start_child


def page_arena(fold_quiet_ms):
    """A page-mode arena with the given folding delay (restored after)."""
    quiet = lib.odf_set_fold_quiet_ms(fold_quiet_ms)
    try:
        yield from checked_arena(ou.Arena(16 * CH, cow="page"), strict=True)
    finally:
        lib.odf_set_fold_quiet_ms(quiet)


@pytest.fixture
def parena():
    # background folding off: these tests count what the first writes did
    yield from page_arena(-1)


def test_bad_mode():
    with pytest.raises(ValueError):
        ou.Arena(CH, cow="pages")


@pytest.mark.parametrize("pattern", ["dense", "sparse"])
def test_isolation_both_ways(parena, pattern):
    buf = parena.alloc(6 * CH)
    buf[:] = random.Random(1).randbytes(len(buf))
    before = hashlib.sha256(buf).hexdigest()
    go_r, go_w = os.pipe()

    def child():
        if pattern == "dense":
            buf[:] = b"c" * len(buf)
        else:
            for off in range(0, len(buf), CH):
                buf[off + 9] ^= 0xFF
        mine = hashlib.sha256(buf).hexdigest()
        os.read(go_r, 1)                     # the parent writes meanwhile
        return mine == hashlib.sha256(buf).hexdigest(), parena.stats()

    pid, r = start_child(child)
    for off in range(0, len(buf), CH):
        buf[off + 100] ^= 0x55
    os.write(go_w, b"x")
    stable, st = finish_child(pid, r)
    assert stable
    assert st["cow_copies"] == 6 and st["bytes_copied"] == 0   # 6 chunks made private, no chunk copied
    for off in range(0, len(buf), CH):
        buf[off + 100] ^= 0x55
    assert hashlib.sha256(buf).hexdigest() == before


def test_fork_of_a_process_with_private_chunks(parena):
    buf = parena.alloc(2 * CH)
    buf[:] = b"a" * len(buf)

    def child():
        buf[10] = ord("b")                   # private chunk in the child
        def grandchild():
            seen = bytes(buf[9:12])
            buf[10] = ord("g")
            return seen, bytes(buf[9:12])
        out = in_child(grandchild)
        parena.check()
        return out, bytes(buf[9:12])

    (seen, gc_view), child_view = in_child(child)
    assert seen == b"aba" and gc_view == b"aga" and child_view == b"aba"
    assert bytes(buf[9:12]) == b"aaa"


def test_snapshot_folds_private_chunks_and_restore_drops_private_pages(parena):
    buf = parena.alloc(3 * CH)
    buf[:] = b"0" * len(buf)

    def child():
        buf[5] = ord("1")                    # private chunk
        with parena.snapshot() as snap:      # folds it: the snapshot must hold "1"
            buf[5] = ord("2")
            buf[CH + 5] = ord("3")
            assert bytes(snap.buffer()[4:7]) == b"010"
            parena.restore(snap)
            parena.check()
            return bytes(buf[4:7]), bytes(buf[CH + 4:CH + 7])

    # the chunks are shared with the child while it runs: its first writes go private
    assert in_child(child) == (b"010", b"000")
    assert bytes(buf[4:7]) == b"000"


def test_restore_remaps_a_chunk_made_private_after_the_snapshot(parena):
    buf = parena.alloc(CH)
    buf[:4] = b"base"
    snap = parena.snapshot()                 # now shared with the snapshot
    buf[:4] = b"priv"                        # first write: the chunk goes private (same segment)
    parena.restore(snap)
    assert bytes(buf[:4]) == b"base"
    parena.check()
    snap.close()


def test_kernel_writes_work_after_the_chunk_went_private(parena, tmp_path):
    src = tmp_path / "s"
    src.write_bytes(b"K" * 100)
    buf = parena.alloc(CH)
    buf[:] = b"p" * CH

    def child():
        buf[0] = ord("x")                    # private now: the kernel can write it too
        with open(src, "rb", buffering=0) as f:
            n = f.readinto(buf[200:300])
        return n, bytes(buf[199:202])

    assert in_child(child) == (100, b"pKK")
    assert bytes(buf[199:202]) == b"ppp"


def test_threads_make_one_private_mapping(parena):
    buf = parena.alloc(CH)
    buf[:] = b"\x00" * CH

    def child():
        barrier = threading.Barrier(6)
        s0 = parena.stats()["cow_copies"]

        def w(i):
            barrier.wait()
            for k in range(100):
                buf[i * 4096 + k] = i + 1
        ts = [threading.Thread(target=w, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        lost = sum(buf[i * 4096 + k] != i + 1 for i in range(6) for k in range(100))
        return parena.stats()["cow_copies"] - s0, lost

    assert in_child(child) == (1, 0)


# ---- background folding (userfaultfd mechanism) ------------------------------

needs_uffd = pytest.mark.skipif(ou.KERNEL_WRITES != "userfaultfd", reason="folding runs on the userfaultfd thread")


@pytest.fixture
def farena():
    """Page mode with background folding after 5 quiet ms."""
    yield from page_arena(5)


def _wait_folds(arena, want, timeout=5.0):
    import time
    end = time.monotonic() + timeout
    while arena.stats()["folds"] < want and time.monotonic() < end:
        time.sleep(0.01)
    return arena.stats()["folds"]


@needs_uffd
def test_quiet_private_chunks_are_folded_back(farena):
    buf = farena.alloc(4 * CH)
    buf[:] = b"a" * len(buf)

    def child():
        for c in range(4):
            buf[c * CH + 3] = ord("c")       # four private chunks, one page each
        time.sleep(0.1)
        unforked = farena.stats()["folds"]   # a process that never forked does not fold
        pid = odfork()                       # now it has: its private chunks get folded
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        folds = _wait_folds(farena, 4)
        st = farena.stats()
        return unforked, folds, st["bytes_copied"], st["chunks_shared"], bytes(buf[3:4]), bytes(buf[CH + 4:CH + 5])

    unforked, folds, copied, shared, b3, b4 = in_child(child)
    assert unforked == 0
    assert folds == 4 and copied == 4 * CH and shared == 0     # exclusive segments again
    assert (b3, b4) == (b"c", b"a")
    assert bytes(buf[3:4]) == b"a"                             # the parent never saw it


@needs_uffd
def test_writers_during_folds_lose_nothing(farena):
    # Threads keep writing (user stores, and kernel writes through os.readv)
    # into chunks that turn private and get folded under them.  Every write
    # goes to a new place, so a write lost by a fold shows.
    buf = farena.alloc(4 * CH)
    buf[:] = b"\x00" * len(buf)
    SLOTS = CH // 8 - 16

    def child():
        import time
        pid = odfork()                       # a process that has forked folds
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        stop = threading.Event()
        counts = [0, 0, 0]
        kdone = [0]

        def user(i):
            base = i * CH
            while not stop.is_set() and counts[i] < SLOTS:
                counts[i] += 1
                n = counts[i]
                buf[base + 8 * n:base + 8 * n + 8] = n.to_bytes(8, "little")
                if n % 200 == 0:
                    time.sleep(0.007)            # quiet gaps: folds start

        def kernel():
            r, w = os.pipe()
            base = 3 * CH
            try:
                while not stop.is_set() and kdone[0] < CH // 512 - 1:
                    k = kdone[0] + 1
                    os.write(w, k.to_bytes(4, "little") * 128)
                    if os.readv(r, [buf[base + 512 * k:base + 512 * (k + 1)]]) != 512:
                        break
                    kdone[0] = k
                    if k % 100 == 0:
                        time.sleep(0.007)
            finally:
                os.close(r)
                os.close(w)

        ts = [threading.Thread(target=user, args=(i,)) for i in range(3)] + [threading.Thread(target=kernel)]
        for t in ts:
            t.start()
        time.sleep(1.0)
        stop.set()
        for t in ts:
            t.join()
        lost_user = sum(int.from_bytes(buf[i * CH + 8 * n:i * CH + 8 * n + 8], "little") != n
                        for i in range(3) for n in range(1, counts[i] + 1))
        lost_kernel = sum(bytes(buf[3 * CH + 512 * k:3 * CH + 512 * (k + 1)]) != k.to_bytes(4, "little") * 128
                          for k in range(1, kdone[0] + 1))
        return lost_user, lost_kernel, min(counts), kdone[0], farena.stats()["folds"]

    lost_user, lost_kernel, writes, kwrites, folds = in_child(child)
    assert (lost_user, lost_kernel) == (0, 0)
    assert writes > 1000 and kwrites > 100 and folds > 3
    assert bytes(buf[:]) == b"\x00" * len(buf)
