"""spawn() and snapshots: the Processes and Snapshots rows of the API contract."""

import gc
import os
import signal
import threading
import time

import pytest

import odfork_user as ou
from testlib import CH, forks_with_own_threads


def _square(x, *, add=0):
    return x * x + add


def _raise():
    raise KeyError("boom in child")


def _unpicklable():
    return lambda: 1


def _sleep(s):
    time.sleep(s)
    return "slept"


# ---- spawn ------------------------------------------------------------------


def test_spawn_result_and_exitcode():
    c = ou.spawn(_square, 7, add=1)
    assert c.result(timeout=30) == 50
    c.join()
    assert c.exitcode == 0 and not c.is_alive() and c.pid > 0


def test_spawn_reraises_the_childs_exception_with_its_traceback_as_cause():
    c = ou.spawn(_raise)
    with pytest.raises(KeyError) as ei:  # `except KeyError:` works, as with concurrent.futures
        c.result(timeout=30)
    assert type(ei.value) is KeyError and ei.value.args == ("boom in child",)
    cause = ei.value.__cause__
    assert isinstance(cause, ou.RemoteTraceback)
    assert "Traceback" in cause.tb and "_raise" in cause.tb and "_raise" in str(cause)
    assert c.exitcode == 1
    assert c.exception() is ei.value and c.done()


class AppError(Exception):
    def __init__(self, message, code):
        super().__init__(message, code)
        self.code = code


class NoArgsBack(Exception):
    def __init__(self, code, where):  # unpickling calls NoArgsBack("code 3 at x"): TypeError
        super().__init__(f"code {code} at {where}")


def _raise_app():
    raise AppError("bad", 3)


def _raise_local():
    class Local(Exception):
        pass

    raise Local("defined inside a function")


def _raise_no_args_back():
    raise NoArgsBack(3, "x")


def _exit():
    raise SystemExit(5)


def test_spawn_reraises_a_custom_exception_with_its_attributes():
    with pytest.raises(AppError) as ei:
        ou.spawn(_raise_app).result(timeout=30)
    assert ei.value.args == ("bad", 3) and ei.value.code == 3


@pytest.mark.parametrize(
    "fn,text",
    [
        (_raise_local, "Local: defined inside a function"),
        (_raise_no_args_back, "NoArgsBack: code 3 at x"),
        (_exit, "SystemExit: 5"),
    ],
)
def test_spawn_exception_that_cannot_travel_is_child_error(fn, text):
    c = ou.spawn(fn)
    with pytest.raises(ou.ChildError) as ei:
        c.result(timeout=30)
    assert text in str(ei.value) and fn.__name__ in ei.value.remote_traceback
    assert isinstance(ei.value.__cause__, ou.RemoteTraceback) and ei.value.exitcode == 1
    assert c.exception() is ei.value


def test_spawn_exception_done_and_terminate():
    ok = ou.spawn(_square, 3)
    assert ok.exception(timeout=30) is None and ok.done() and ok.result() == 9
    c = ou.spawn(_sleep, 60)
    assert not c.done()
    with pytest.raises(TimeoutError):
        c.exception(timeout=0.01)
    c.terminate()
    err = c.exception(timeout=30)
    assert isinstance(err, ou.ChildError) and err.exitcode == -signal.SIGTERM == c.exitcode and c.done()
    c.terminate()  # after the end: nothing to signal, no error
    c.kill()


def test_spawn_unpicklable_result_names_the_problem():
    c = ou.spawn(_unpicklable)
    with pytest.raises(ou.ChildError, match="pickl"):
        c.result(timeout=30)


def test_spawn_killed_child():
    c = ou.spawn(_sleep, 60)
    assert c.is_alive() and c.exitcode is None
    c.kill()
    with pytest.raises(ou.ChildError) as ei:
        c.result(timeout=30)
    assert ei.value.exitcode == -signal.SIGKILL == c.exitcode


def test_spawn_timeout_then_later_call_works():
    c = ou.spawn(_sleep, 0.5)
    with pytest.raises(TimeoutError):
        c.result(timeout=0.01)
    assert c.join(timeout=0.01) is None and c.is_alive()
    assert c.result(timeout=30) == "slept"


def test_spawn_large_result_does_not_deadlock():
    c = ou.spawn(lambda: b"x" * (32 << 20))
    c.join(timeout=60)  # join before result: the child never waits for a reader
    assert c.exitcode == 0
    assert len(c.result()) == 32 << 20


def test_spawn_not_callable():
    with pytest.raises(TypeError):
        ou.spawn(42)


@forks_with_own_threads
def test_spawn_from_threads_and_dropped_children_are_reaped(arena):
    buf = arena.alloc(CH)
    buf[0] = 5
    results, dropped = [], []

    def go():
        results.append(ou.spawn(lambda: buf[0] + 1).result(timeout=30))
        dropped.append(ou.spawn(_square, 3).pid)  # the Child object is dropped at once

    ts = [threading.Thread(target=go) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [6] * 4
    gc.collect()

    def zombie_or_running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return False  # reaped (possibly between the open and the read)
        return int(fields[1]) == os.getpid()  # still our child (running or a zombie)

    deadline = time.time() + 10
    while any(zombie_or_running(p) for p in dropped):
        ou.spawn(int).join()  # a dropped child is reaped by a later spawn()
        assert time.time() < deadline, "a dropped child was never reaped"
        time.sleep(0.05)


def test_spawn_isolation(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"p" * len(buf)

    def child():
        buf[:] = b"c" * len(buf)
        return bytes(buf[:3])

    assert ou.spawn(child).result(timeout=30) == b"ccc"
    assert bytes(buf[:3]) == b"ppp"


# ---- snapshots --------------------------------------------------------------


def test_snapshot_freezes_bytes_and_copies_nothing(arena):
    buf = arena.alloc(4 * CH)
    buf[:] = b"a" * len(buf)
    s0 = arena.stats()
    with arena.snapshot() as snap:
        assert arena.stats()["bytes_copied"] == s0["bytes_copied"]
        buf[0:3] = b"xyz"
        buf[3 * CH] = ord("q")
        view = snap.buffer()
        assert bytes(view[0:3]) == b"aaa" and view[3 * CH] == ord("a")
        assert view.readonly and len(view) == arena.size
        with pytest.raises(TypeError):
            view[0] = 1
        assert arena.stats()["cow_copies"] - s0["cow_copies"] == 2
        del view
    arena.check()


def test_write_after_snapshot_closed_reuses(chunk_arena):
    arena = chunk_arena
    buf = arena.alloc(CH)
    buf[0] = 1
    snap = arena.snapshot()
    snap.close()
    s0 = arena.stats()
    buf[0] = 2
    s1 = arena.stats()
    assert (s1["reuses"] - s0["reuses"], s1["cow_copies"] - s0["cow_copies"]) == (1, 0)


def test_view_after_snapshot_closed_folds_in_place():
    arena = ou.Arena(4 * CH, background_fold=False)  # this test counts the folds
    buf = arena.alloc(CH)
    buf[0] = 1
    snap = arena.snapshot()
    snap.close()
    s0 = arena.stats()
    buf[0] = 2  # the kernel copies one page of the view
    arena.fold()  # ... which goes back into the same segment
    s1 = arena.stats()
    assert (s1["reuses"] - s0["reuses"], s1["views"], s1["segments_live"]) == (1, 0, s0["segments_live"])
    assert buf[0] == 2
    del buf
    arena.check()
    arena.close()


def test_restore_twice_and_live_views_see_it(arena):
    pytest.importorskip("numpy")
    arr = arena.ndarray((3, CH // 8), "int64")
    arr[:] = 1
    snap = arena.snapshot()
    for _ in range(2):
        arr[:] = 9
        arr[1, 5] = 77
        arena.restore(snap)
        assert int(arr.sum()) == arr.size  # the same array object sees the restored bytes
        arena.check()
    arr[0, 0] = 3  # writable after restore
    assert arr[0, 0] == 3
    snap.close()
    arena.check()


def test_restore_unwritten_chunks_back_to_zero(arena):
    buf = arena.alloc(4 * CH)
    buf[0] = 1
    snap = arena.snapshot()
    buf[3 * CH] = 5  # a chunk that did not exist at the snapshot
    arena.restore(snap)
    assert buf[3 * CH] == 0 and buf[0] == 1
    snap.close()


def test_closed_snapshot_raises_value_error(arena):
    snap = arena.snapshot()
    snap.close()
    for call in (snap.buffer, lambda: snap.save("/dev/null"), lambda: arena.restore(snap)):
        with pytest.raises(ValueError):
            call()
    snap.close()  # idempotent
    with pytest.raises(ValueError):
        arena.restore("not a snapshot")


def test_save_while_writing(arena, tmp_path):
    buf = arena.alloc(8 * CH)
    buf[:] = b"s" * len(buf)
    snap = arena.snapshot()
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            buf[(i * 4099) % len(buf)] = ord("w")
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        snap.save(tmp_path / "snap.bin")
    finally:
        stop.set()
        t.join()
    data = (tmp_path / "snap.bin").read_bytes()
    assert len(data) == arena.size
    assert data[: len(buf)] == b"s" * len(buf) and data[len(buf) :].count(0) == arena.size - len(buf)
    assert bytes(buf).count(b"w") > 0
    snap.close()
    arena.check()


def test_child_reads_and_restores_parents_snapshot_independently(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"0" * len(buf)
    snap = arena.snapshot()
    buf[:4] = b"1111"

    def child():
        seen = bytes(snap.buffer()[:4])
        buf[:4] = b"2222"
        arena.restore(snap)
        after = bytes(buf[:4])
        arena.check()
        snap.close()
        arena.check()
        return seen, after

    assert ou.spawn(child).result(timeout=30) == (b"0000", b"0000")
    assert bytes(buf[:4]) == b"1111"  # the child's restore did not touch us
    assert bytes(snap.buffer()[:4]) == b"0000"  # nor did its close
    arena.restore(snap)
    assert bytes(buf[:4]) == b"0000"
    snap.close()
    arena.check()


def test_snapshot_and_odfork_combined_counts_return(arena):
    buf = arena.alloc(3 * CH)
    buf[:] = b"z" * len(buf)
    base = arena.stats()["segments_live"]
    snap = arena.snapshot()
    for _ in range(3):
        assert ou.spawn(lambda: (buf.__setitem__(0, 1), arena.snapshot().buffer()[0])[1]).result(30) == 1
    buf[CH] = 2
    arena.restore(snap)
    snap.close()
    arena.check()
    assert arena.stats()["segments_live"] == base


def test_arena_close_with_live_snapshot_view_is_buffer_error():
    a = ou.Arena(2 * CH)
    b = a.alloc(16)
    b[0] = 1
    snap = a.snapshot()
    v = snap.buffer()
    del b
    with pytest.raises(BufferError):
        a.close()
    assert v[0] == 1
    del v
    a.close()
    assert snap.closed
    with pytest.raises(ValueError):
        snap.buffer()
