"""Stats, threads, errors, lifetime and signals of the core."""

import errno
import gc
import os
import signal
import threading

import pytest

import odfork_user as ou
from odfork_user import odfork
from odfork_user._core import lib
from testlib import CH, MiB, finish_child, forks_with_own_threads, in_child, raises_odfork, run_py, start_child


def delta(before, after, *keys):
    return {k: after[k] - before[k] for k in keys}


# ---- stats move as specified ------------------------------------------------


def test_one_copy_per_first_write_to_a_shared_chunk(chunk_arena):
    arena = chunk_arena
    buf = arena.alloc(6 * CH)
    buf[:] = b"s" * len(buf)
    assert arena.stats()["chunks_resident"] == 6

    def child():
        s0 = arena.stats()
        assert s0["chunks_shared"] == 6, s0
        for c in (0, 2, 5):
            buf[c * CH + 10] = 1  # first write: one copy
            buf[c * CH + 99] = 2  # second write to the same chunk: nothing
        s1 = arena.stats()
        return delta(s0, s1, "cow_copies", "bytes_copied", "faults", "reuses"), s1["chunks_shared"]

    d, shared = in_child(child)
    assert d == {"cow_copies": 3, "bytes_copied": 3 * CH, "faults": 3, "reuses": 0}
    assert shared == 3


def test_fork_copies_nothing_and_reads_copy_nothing(arena):
    buf = arena.alloc(4 * CH)
    buf[:] = b"r" * len(buf)
    s0 = arena.stats()
    total = in_child(lambda: (bytes(buf).count(b"r"), arena.stats()["bytes_copied"]))
    assert total == (4 * CH, 0)
    s1 = arena.stats()
    assert s1["bytes_copied"] == s0["bytes_copied"] and s1["forks"] == s0["forks"] + 1


def test_reuse_when_count_is_back_to_one(chunk_arena):
    arena = chunk_arena
    buf = arena.alloc(3 * CH)
    buf[:] = b"u" * len(buf)
    in_child(lambda: None)  # child exits: counts drop back to 1
    s0 = arena.stats()
    assert s0["chunks_shared"] == 0
    for c in range(3):
        buf[c * CH] = 1
    s1 = arena.stats()
    assert delta(s0, s1, "reuses", "cow_copies", "faults") == {"reuses": 3, "cow_copies": 0, "faults": 3}


def test_parent_copies_while_child_alive(chunk_arena):
    arena = chunk_arena
    buf = arena.alloc(2 * CH)
    buf[:] = b"v" * len(buf)
    go_r, go_w = os.pipe()
    pid, r = start_child(lambda: (os.read(go_r, 1), bytes(buf[:3]))[1])
    s0 = arena.stats()
    buf[0:3] = b"abc"
    s1 = arena.stats()
    assert delta(s0, s1, "cow_copies", "reuses") == {"cow_copies": 1, "reuses": 0}
    os.write(go_w, b"x")
    assert finish_child(pid, r) == b"vvv"
    buf[CH] = 1  # the child is gone: its reference was given back, so no copy
    s2 = arena.stats()
    assert delta(s1, s2, "cow_copies", "reuses") == {"cow_copies": 0, "reuses": 1}


# ---- threads ----------------------------------------------------------------


def test_threads_faulting_on_one_chunk_make_one_copy(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"\x00" * len(buf)

    def child():
        n = 8
        barrier = threading.Barrier(n)
        s0 = arena.stats()

        def writer(i):
            barrier.wait()
            for k in range(200):
                buf[i * 4096 + k] = i + 1

        ts = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        lost = sum(1 for i in range(n) for k in range(200) if buf[i * 4096 + k] != i + 1)
        return arena.stats()["cow_copies"] - s0["cow_copies"], lost

    assert in_child(child) == (1, 0)
    assert bytes(buf[: 8 * 4096]) == b"\x00" * 8 * 4096


@forks_with_own_threads
def test_odfork_while_other_threads_write(arena):
    buf = arena.alloc(8 * CH)
    stop = threading.Event()
    counters = [0, 0]

    def writer(i):
        v = 0
        while not stop.is_set():
            v = (v + 1) & 0xFF
            for c in range(i, 8, 2):
                buf[c * CH + 64 * i] = v
            counters[i] += 1

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    try:
        for _ in range(20):

            def child():
                first = bytes(buf)
                # the parent's threads keep writing: nothing of it may show up here
                for _ in range(3):
                    if bytes(buf) != first:
                        return False
                return True

            assert in_child(child)
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert min(counters) > 0
    arena.check()


# ---- errors: bad input raises and leaves the arena intact -------------------


@pytest.mark.parametrize(
    "bad, exc",
    [("1G", TypeError), (1.5, TypeError), (None, TypeError), (True, TypeError), (0, ValueError), (-5, ValueError)],
)
def test_arena_size_errors(bad, exc):
    with raises_odfork(exc):
        ou.Arena(bad)


def test_arena_too_big_is_memory_error():
    with raises_odfork((MemoryError, OSError)):
        ou.Arena(1 << 60)


@pytest.mark.parametrize("bad, exc", [("x", TypeError), (2.0, TypeError), (0, ValueError), (-1, ValueError)])
def test_alloc_errors_leave_arena_usable(arena, bad, exc):
    keep = arena.alloc(100)
    keep[:] = b"k" * 100
    with raises_odfork(exc):
        arena.alloc(bad)
    assert bytes(keep) == b"k" * 100
    more = arena.alloc(100)
    assert bytes(more) == b"\x00" * 100


def test_alloc_no_room_is_memory_error_and_arena_usable(arena):
    big = arena.alloc(arena.size - 4096)
    with raises_odfork(MemoryError):
        arena.alloc(8192)
    arena.free(big)
    again = arena.alloc(arena.size)
    assert len(again) == arena.size


def test_free_errors(arena):
    a = arena.alloc(1000)
    with raises_odfork(ValueError):
        arena.free(bytearray(10))
    with raises_odfork(ValueError):
        arena.free(a[10:20])  # not a block start
    with raises_odfork(ValueError):
        arena.free(12345)
    arena.free(a)
    with raises_odfork(ValueError):
        arena.free(a)  # double free
    with ou.Arena(CH) as other:
        b = other.alloc(10)
        with raises_odfork(ValueError):
            arena.free(b)  # another arena's block
        del b


def test_alloc_reuses_freed_space_zeroed(arena):
    a = arena.alloc(5000)
    a[:] = b"\xff" * 5000
    arena.free(a)
    b = arena.alloc(5000)
    assert bytes(b) == b"\x00" * 5000
    assert int(ou._core.ffi.cast("uintptr_t", ou._core.ffi.from_buffer(b))) % 64 == 0


def test_close_with_live_views_is_buffer_error():
    a = ou.Arena(2 * CH)
    v = a.alloc(64)
    s = v[3:9]
    with raises_odfork(BufferError):
        a.close()
    v[0] = 1  # still usable
    del v, s
    gc.collect()
    a.close()
    assert a.closed
    for call in (lambda: a.alloc(8), a.stats, a.check):
        with raises_odfork(ValueError):
            call()
    a.close()  # idempotent


def test_close_with_live_numpy_array_is_buffer_error():
    pytest.importorskip("numpy")
    a = ou.Arena(2 * CH)
    arr = a.ndarray(10, "int32")
    with raises_odfork(BufferError):
        a.close()
    del arr
    a.close()


def test_size_rounding_and_chunk_size():
    with ou.Arena(1) as a:
        assert a.chunk_size == 2 * MiB == ou.CHUNK_SIZE == lib.ODF_CHUNK_SIZE
        assert a.size == CH
        assert a.stats()["chunks"] == 1
    with ou.Arena(3 * CH + 1) as a:
        assert a.size == 4 * CH


def test_reserving_is_virtual():
    with ou.Arena(64 << 30) as a:
        s = a.stats()
        assert s["chunks"] == 32768 and s["chunks_resident"] == 0 and s["segments_live"] == 0


def test_default_arena(monkeypatch):
    import odfork_user.arena as am

    monkeypatch.setenv("ODFORK_ARENA_SIZE", "16M")
    monkeypatch.setattr(am, "_default", None)
    d = ou.default_arena()
    assert d is ou.default_arena() and d.size == 16 * MiB
    d.close()
    monkeypatch.setattr(am, "_default", None)


# ---- check() can fail -------------------------------------------------------


def test_check_detects_a_wrong_count(arena):
    buf = arena.alloc(CH)
    buf[0] = 1
    arena.check()
    assert lib._odf_debug_break(arena._h, lib.ODF_DEBUG_EXTRA_REF, 0) == 0
    with pytest.raises(ou.CorruptionError, match="count 2 but 1 holders"):
        arena.check()
    assert lib._odf_debug_break(arena._h, lib.ODF_DEBUG_DROP_EXTRA_REF, 0) == 0
    arena.check()


def test_lock_holder_killed_mid_update_is_recovered(arena):
    buf = arena.alloc(3 * CH)
    buf[:] = b"h" * len(buf)
    base = arena.stats()["segments_live"]

    def child():
        buf[CH] = 1  # a private copy, then die inside the lock
        lib._odf_debug_break(arena._h, lib.ODF_DEBUG_DIE_LOCKED, 1)

    pid, r = start_child(child)
    _, st = os.waitpid(pid, 0)
    os.close(r)
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL
    arena.check()  # takes the lock: EOWNERDEAD, recount, go on
    assert arena.stats()["segments_live"] == base
    assert bytes(buf[CH : CH + 2]) == b"hh"
    buf[CH] = 2  # and the family keeps working
    assert in_child(lambda: buf[CH]) == 2


# ---- lifetime: dead processes give references back, nothing leaks ----------


def test_killed_child_gives_references_back(chunk_arena):
    arena = chunk_arena
    buf = arena.alloc(4 * CH)
    buf[:] = b"k" * len(buf)
    base = arena.stats()["segments_live"]
    ready_r, ready_w = os.pipe()

    def child():
        buf[:] = b"c" * len(buf)  # 4 private copies
        os.write(ready_w, b"x")
        signal.pause()

    pid, r = start_child(child)
    os.read(ready_r, 1)
    assert arena.stats()["segments_live"] == base + 4
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(r)
    assert arena.stats()["segments_live"] == base
    assert bytes(buf[:2]) == b"kk"
    arena.check()


def test_no_leak_across_1000_fork_exit_cycles(arena):
    buf = arena.alloc(4 * CH)
    buf[:] = b"L" * len(buf)
    arena.check()
    base = arena.stats()
    fds = len(os.listdir("/proc/self/fd"))

    for i in range(1000):
        pid = odfork()
        if pid == 0:
            buf[(i % 4) * CH] = 1  # one copy per child
            os._exit(0 if buf[0] in (1, ord("L")) else 1)
        _, st = os.waitpid(pid, 0)
        assert st == 0
        if i % 100 == 0:
            buf[(i // 100 % 4) * CH + 1] = i & 0xFF  # parent writes too
    s = arena.stats()
    assert s["segments_live"] == base["segments_live"]
    assert s["slots_used"] == 1
    assert s["forks"] - base["forks"] == 1000
    assert len(os.listdir("/proc/self/fd")) == fds
    arena.check()


def test_child_pending_slot_of_failed_fork_is_given_back(arena, monkeypatch):
    buf = arena.alloc(CH)
    buf[0] = 1
    before = arena.stats()

    def failing_fork():
        raise OSError(errno.EAGAIN, "simulated")

    # odfork's abort path: a fork that fails leaves every count as it was
    real = os.fork
    monkeypatch.setattr(os, "fork", lambda: real() if False else failing_fork())
    with pytest.raises(OSError):
        odfork()
    after = arena.stats()
    assert after["segments_live"] == before["segments_live"] and after["slots_used"] == 1


def test_fds_are_close_on_exec(arena):
    import fcntl

    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "odfork" in target:
            n += 1
            assert fcntl.fcntl(int(fd), fcntl.F_GETFD) & fcntl.FD_CLOEXEC, target
    assert n >= 2


# ---- signals ----------------------------------------------------------------


def test_real_crash_outside_arena_still_crashes_with_faulthandler_traceback():
    p = run_py("""
        import faulthandler, ctypes, odfork_user as ou
        faulthandler.enable()
        a = ou.Arena(1 << 22); b = a.alloc(10); b[0] = 1
        def crash_here(): ctypes.string_at(16)
        crash_here()
    """)
    assert p.returncode == -signal.SIGSEGV, p
    assert "Segmentation fault" in p.stderr and "crash_here" in p.stderr


def test_real_crash_without_previous_handler_dies_of_sigsegv():
    p = run_py("""
        import ctypes, odfork_user as ou
        a = ou.Arena(1 << 22); b = a.alloc(10); b[0] = 1
        ctypes.string_at(16)
    """)
    assert p.returncode == -signal.SIGSEGV, p


def test_previous_c_handler_still_gets_outside_faults():
    # a SIGSEGV handler installed before the arena is chained to for non-arena faults
    p = run_py("""
        import signal, os, ctypes, odfork_user as ou
        libc = ctypes.CDLL(None)
        HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
        def h(sig):
            os.write(1, b"user handler called\\n"); os._exit(7)
        cb = HANDLER(h)
        libc.signal(signal.SIGSEGV, cb)
        a = ou.Arena(1 << 22); b = a.alloc(10); b[0] = 1
        pid = ou.odfork()
        if pid == 0:
            b[0] = 2; os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0 and b[0] == 1
        ctypes.string_at(16)
    """)
    assert p.returncode == 7 and "user handler called" in p.stdout, p


def test_orphaned_access_message_not_silent_corruption(arena):
    # a child whose arena could not be shared crashes on access, with a message
    p = run_py("""
        import os, odfork_user as ou
        a = ou.Arena(1 << 22, max_procs=2); b = a.alloc(10); b[0] = 1
        pid = os.fork()              # takes the only free slot
        if pid == 0:
            import time; time.sleep(2); os._exit(0)
        pid2 = os.fork()             # no slot left: this child loses the arena
        if pid2 == 0:
            b[0] = 5
            os._exit(0)
        _, st = os.waitpid(pid2, 0)
        print("status", os.WIFSIGNALED(st) and os.WTERMSIG(st))
        print("parent", b[0])
        try:
            ou.odfork()
        except OSError as e:
            print("odfork refused", e.errno)
        os.waitpid(pid, 0)
    """)
    assert "status 11" in p.stdout and "parent 1" in p.stdout, p
    assert "odfork refused 11" in p.stdout, p
    assert "not available in this process" in p.stderr, p


@forks_with_own_threads
def test_arena_created_by_a_thread_that_exits_stays_alive_for_the_family():
    # liveness must be per process: a thread that created the arena and then
    # exited must not make the process look dead to its children
    holder = {}

    def make():
        a = ou.Arena(4 * CH)
        b = a.alloc(2 * CH)
        b[:] = b"t" * len(b)
        holder["a"], holder["b"] = a, b

    t = threading.Thread(target=make)
    t.start()
    t.join()
    a, b = holder["a"], holder["b"]
    try:

        def child():
            a.stats()  # reaps: the parent's slot must survive it
            a.check()
            b[0] = ord("c")
            return bytes(b[:2])

        assert in_child(child) == b"ct"
        assert bytes(b[:2]) == b"tt"
        assert a.stats()["slots_used"] == 1
        a.check()
        b[1] = ord("p")  # the parent still owns its chunks: reuse, no copy
        assert bytes(b[:2]) == b"tp"
    finally:
        del b, holder["b"]
        a.close()
