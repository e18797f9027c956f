"""cow="page" (the default): at a fork every chunk becomes a private view of its
segment and the kernel copies only the pages written; views are folded back into
segments by fold(), by cheap folds at the next fork, and by snapshots.  Same
isolation promises as chunk mode."""

import hashlib
import os
import random
import threading
import time

import pytest

import odfork_user as ou
from odfork_user import odfork
from testlib import CH, checked_arena, finish_child, forks_with_own_threads, in_child, start_child


@pytest.fixture
def parena():
    # no background folds: these tests count what happened
    yield from checked_arena(ou.Arena(16 * CH, cow="page", background_fold=False), strict=True)


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
        os.read(go_r, 1)  # the parent writes meanwhile
        return mine == hashlib.sha256(buf).hexdigest(), parena.stats()

    pid, r = start_child(child)
    for off in range(0, len(buf), CH):
        buf[off + 100] ^= 0x55
    os.write(go_w, b"x")
    stable, st = finish_child(pid, r)
    assert stable
    # 6 chunks diverged; the kernel copied the pages written, nothing more
    assert st["cow_copies"] == 6 and st["faults"] == 0
    assert st["bytes_copied"] == (6 * CH if pattern == "dense" else 6 * 4096), st
    for off in range(0, len(buf), CH):
        buf[off + 100] ^= 0x55
    assert hashlib.sha256(buf).hexdigest() == before


def test_fork_of_a_process_with_private_chunks(parena):
    buf = parena.alloc(2 * CH)
    buf[:] = b"a" * len(buf)

    def child():
        buf[10] = ord("b")  # private chunk in the child

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
        buf[5] = ord("1")  # private chunk
        with parena.snapshot() as snap:  # folds it: the snapshot must hold "1"
            buf[5] = ord("2")
            buf[CH + 5] = ord("3")
            assert bytes(snap.buffer()[4:7]) == b"010"
            parena.restore(snap)
            parena.check()
            return bytes(buf[4:7]), bytes(buf[CH + 4 : CH + 7])

    # the chunks are shared with the child while it runs: its first writes go private
    assert in_child(child) == (b"010", b"000")
    assert bytes(buf[4:7]) == b"000"


def test_restore_remaps_a_chunk_made_private_after_the_snapshot(parena):
    buf = parena.alloc(CH)
    buf[:4] = b"base"
    snap = parena.snapshot()  # now shared with the snapshot
    buf[:4] = b"priv"  # first write: the chunk goes private (same segment)
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
        buf[0] = ord("x")  # private now: the kernel can write it too
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


# ---- folding ---------------------------------------------------------------


def test_fold_after_the_child_exits_turns_views_back_into_segments(parena):
    buf = parena.alloc(4 * CH)
    buf[:] = b"a" * len(buf)
    go_r, go_w = os.pipe()
    pid, r = start_child(lambda: (os.read(go_r, 1), bytes(buf[3:4]) + bytes(buf[CH + 4 : CH + 5]))[1])
    for c in range(4):
        buf[c * CH + 3] = ord("p")  # one private page per view
    parena.fold()  # still shared: nothing to fold in place
    assert parena.stats()["folds"] == 0 and parena.stats()["views"] == 4
    os.write(go_w, b"x")
    assert finish_child(pid, r) == b"aa"  # the child never saw the parent's pages
    s0 = parena.stats()
    assert s0["chunks_shared"] == 0 and s0["cow_copies"] == 4 and s0["bytes_copied"] == 4 * 4096
    parena.fold()
    s1 = parena.stats()
    assert (s1["folds"], s1["reuses"], s1["views"]) == (4, 4, 0), s1
    assert s1["bytes_copied"] == 2 * 4 * 4096  # the kernel's copies, then the fold's
    assert bytes(buf[3:4]) == b"p" and bytes(buf[CH + 3 : CH + 5]) == b"pa"
    # the segments hold the bytes now: a new child sees them
    assert in_child(lambda: bytes(buf[2 * CH + 2 : 2 * CH + 5])) == b"apa"


def test_fold_max_dirty_skips_dense_views_and_forks_fold_nothing(parena):
    buf = parena.alloc(4 * CH)
    buf[:] = b"a" * len(buf)
    go_r, go_w = os.pipe()
    pid, r = start_child(lambda: os.read(go_r, 1))
    for c in range(4):
        buf[c * CH + 5] = ord("q")  # views, one page each (written while shared: a child's exit keeps them)
    buf[3 * CH : 4 * CH] = b"d" * CH  # ... but this one is dense
    os.write(go_w, b"x")
    finish_child(pid, r)  # count back to 1
    s0 = parena.stats()
    assert s0["views"] == 4
    assert in_child(lambda: (bytes(buf[4:6]), bytes(buf[3 * CH + 4 : 3 * CH + 6]))) == (b"aq", b"dd")
    assert parena.stats()["folds"] == s0["folds"]  # a fork leaves views as they are
    parena.fold(max_dirty=64)
    s1 = parena.stats()
    assert s1["folds"] - s0["folds"] == 3 and s1["views"] == 1, s1
    assert bytes(buf[4:6]) == b"aq" and bytes(buf[3 * CH + 4 : 3 * CH + 6]) == b"dd"
    parena.fold()
    assert parena.stats()["views"] == 0


def test_prepare_write_keeps_the_bytes_of_a_view(parena):
    # prepare_write on a chunk a first write already made private must keep
    # every byte written, shared or not, and a later fork or snapshot sees them
    buf = parena.alloc(2 * CH)
    buf[:] = b"0" * len(buf)
    go_r, go_w = os.pipe()
    pid, r = start_child(lambda: (os.read(go_r, 1), bytes(buf[:2]))[1])
    buf[0] = ord("1")  # private page, segment still shared
    parena.prepare_write(buf[:CH])
    assert bytes(buf[:2]) == b"10"
    os.write(go_w, b"x")
    assert finish_child(pid, r) == b"00"
    buf[1] = ord("2")  # count back to 1
    parena.prepare_write(buf)
    assert bytes(buf[:3]) == b"120"
    assert in_child(lambda: bytes(buf[:3])) == b"120"
    with parena.snapshot() as snap:
        assert bytes(snap.buffer()[:3]) == b"120"


@forks_with_own_threads
@pytest.mark.parametrize("kernel", [False, True])
def test_writers_during_folds_lose_nothing(parena, kernel):
    # Threads keep writing (user stores, and kernel writes through os.readv)
    # into views that the main thread folds under them, again and again,
    # forking children between folds (in this process: it must hold the
    # segments alone for folds in place).  Every write goes to a new place,
    # so a write lost by a fold shows.  Without a full userfaultfd the core
    # refuses to fold while other threads run (a kernel write cannot wait on
    # a read-only view): the views stay views and nothing may fail.
    buf = parena.alloc(4 * CH)
    buf[:] = b"\x00" * len(buf)
    SLOTS = CH // 8 - 16

    def run():
        stop = threading.Event()
        counts = [0, 0, 0]
        kdone = [0]
        errors = []

        def user(i):
            base = i * CH
            while not stop.is_set() and counts[i] < SLOTS:
                counts[i] += 1
                n = counts[i]
                buf[base + 8 * n : base + 8 * n + 8] = n.to_bytes(8, "little")
                if n % 64 == 0:
                    time.sleep(0.0005)  # last the whole second

        def kern():
            r, w = os.pipe()
            base = 3 * CH
            try:
                while not stop.is_set() and kdone[0] < CH // 512 - 1:
                    k = kdone[0] + 1
                    os.write(w, k.to_bytes(4, "little") * 128)
                    if os.readv(r, [buf[base + 512 * k : base + 512 * (k + 1)]]) != 512:
                        break
                    kdone[0] = k
                    time.sleep(0.0005)
            except OSError as e:
                errors.append(repr(e))
            finally:
                os.close(r)
                os.close(w)

        ts = [threading.Thread(target=user, args=(i,)) for i in range(3)]
        if kernel:
            ts.append(threading.Thread(target=kern))
        for t in ts:
            t.start()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pid = odfork()  # views again
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            parena.fold()  # count back to 1: fold them under the writers
        stop.set()
        for t in ts:
            t.join()
        lost_user = sum(
            int.from_bytes(buf[i * CH + 8 * n : i * CH + 8 * n + 8], "little") != n
            for i in range(3)
            for n in range(1, counts[i] + 1)
        )
        lost_kernel = sum(
            bytes(buf[3 * CH + 512 * k : 3 * CH + 512 * (k + 1)]) != k.to_bytes(4, "little") * 128
            for k in range(1, kdone[0] + 1)
        )
        parena.check()
        return errors, lost_user, lost_kernel, min(counts), kdone[0], parena.stats()["folds"]

    errors, lost_user, lost_kernel, writes, kwrites, folds = run()
    assert errors == [] and (lost_user, lost_kernel) == (0, 0)
    assert writes > 1000 and (kwrites > 100 or not kernel)
    assert folds > 3 if ou.FOLD_PROTECT == "userfaultfd" else folds == 0, (ou.FOLD_PROTECT, folds)
    del buf


def _os_threads():
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("Threads:")).split()[1])


def _wait_views(arena, want, timeout=5.0):
    end = time.monotonic() + timeout
    while arena.stats()["views"] > want and time.monotonic() < end:
        time.sleep(0.01)
    return arena.stats()["views"]


@pytest.mark.skipif(os.environ.get("ODFORK_FOLD", "1") == "0", reason="background folding turned off")
def test_background_folder_folds_views_once_the_child_is_gone(arena):
    parena = arena  # the default configuration
    buf = parena.alloc(4 * CH)
    buf[:] = b"a" * len(buf)
    go_r, go_w = os.pipe()
    pid, r = start_child(lambda: (os.read(go_r, 1), bytes(buf[7:8]), ou._folder.running())[1:])
    for c in range(4):
        buf[c * CH + 7] = ord("b")
    time.sleep(0.2)
    assert parena.stats()["views"] == 4  # shared with the child: never folded
    os.write(go_w, b"x")
    assert finish_child(pid, r) == (b"a", False)  # a child that never forked runs no folder
    if ou.FOLD_PROTECT != "userfaultfd":
        # no folder without a full userfaultfd (a fold is refused while another
        # thread runs); the child's exit folded the views if this process has
        # no other thread (csrc/core/sigchld.c), else they stay views, isolated
        # as ever
        threads = _os_threads()
        assert not ou._folder.running()
        st = parena.stats()
        assert (st["views"], st["folds"]) == ((0, 4) if threads == 1 else (4, 0)), (threads, st)
        assert bytes(buf[7:8]) == b"b" and in_child(lambda: bytes(buf[3 * CH + 6 : 3 * CH + 9])) == b"aba"
        parena.fold()  # folds when this is the only thread
        assert parena.stats()["views"] == (0 if threads == 1 else 4), threads
        del buf
        return
    assert _wait_views(parena, 0) == 0  # in place, by the folder thread
    st = parena.stats()
    assert st["folds"] >= 4 and st["chunks_shared"] == 0
    assert bytes(buf[7:8]) == b"b" and in_child(lambda: bytes(buf[3 * CH + 6 : 3 * CH + 9])) == b"aba"
    del buf
