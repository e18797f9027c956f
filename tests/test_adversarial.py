"""Defects an adversarial run found: each test here failed before its fix.

Daemon-style children that close or replace every descriptor, freed views,
threads inside Arena methods at fork time, snapshots at the slot limit, Python
SIGSEGV handlers, the arena limit, numpy integer shapes."""

import errno
import os
import pickle
import signal
import threading
import time

import pytest

import odfork_user as ou
from odfork_user import odfork
from testlib import CH, _children, forks_with_own_threads, in_child, run_py


def _daemon_child(arena, buf, how, go_r):
    """Fork a child that drops every descriptor but its result pipe ('close':
    os.closerange; 'dup2': /dev/null over each), then writes the arena with user
    code and with the kernel, waits for the parent to write and fold, and
    reports what it sees."""
    r, w = os.pipe()
    pid = odfork()
    if pid == 0:
        try:
            keep = {w, go_r}
            if how == "close":
                for lo, hi in ((3, min(keep)), (min(keep) + 1, max(keep)), (max(keep) + 1, 4096)):
                    os.closerange(lo, hi)
            else:
                null = os.open("/dev/null", os.O_RDWR)
                for fd in range(3, 512):
                    if fd not in keep and fd != null:
                        try:
                            os.fstat(fd)
                        except OSError:
                            continue
                        os.dup2(null, fd)
            buf[0:4] = b"kid!"  # user write
            pr, pw = os.pipe()
            os.write(pw, b"KERN")
            os.readv(pr, [buf[CH + 8 : CH + 12]])  # kernel write
            os.read(go_r, 1)  # the parent has written and folded
            buf[2 * CH] = ord("Z")  # a fresh chunk: needs the pool
            msg = ("ok", (bytes(buf[0:4]), bytes(buf[CH + 8 : CH + 12]), bytes(buf[2 * CH : 2 * CH + 1])))
        except BaseException as e:
            msg = ("err", repr(e))
        os.write(w, pickle.dumps(msg))
        os._exit(0)
    os.close(w)
    _children.add(pid)
    return pid, r


@pytest.mark.parametrize("how", ["close", "dup2"])
def test_child_that_drops_its_descriptors_stays_isolated_and_alive(arena, how):
    buf = arena.alloc(3 * CH)
    buf[0 : 2 * CH] = b"p" * (2 * CH)
    go_r, go_w = os.pipe()
    pid, r = _daemon_child(arena, buf, how, go_r)
    time.sleep(0.3)  # the child has dropped everything and written
    st = arena.stats()
    assert st["slots_used"] == 2, st  # not reaped: it is alive
    assert bytes(buf[0:4]) == b"pppp" and bytes(buf[CH + 8 : CH + 12]) == b"pppp"
    buf[0:4] = b"mom!"
    buf[CH + 8 : CH + 12] = b"MOM!"
    arena.fold()  # shared: must not write the segments
    os.write(go_w, b"x")
    kind, value = pickle.loads(os.fdopen(r, "rb").read())
    os.waitpid(pid, 0)
    _children.discard(pid)
    assert kind == "ok", value
    assert value == (b"kid!", b"KERN", b"Z")
    assert bytes(buf[0:4]) == b"mom!" and bytes(buf[CH + 8 : CH + 12]) == b"MOM!"
    assert buf[2 * CH] == 0
    arena.check()


def test_freed_view_is_released_and_close_waits_for_slices(arena):
    v = arena.alloc(100)
    v[0] = 1
    arena.free(v)
    with pytest.raises(ValueError):
        v[0] = 2
    with pytest.raises(ValueError):
        bytes(v)
    w = arena.alloc(4096)
    part = w[100:200]  # a slice outlives the block
    arena.free(w)
    x = arena.alloc(4096)  # must not be the freed, still-viewed space
    x[:] = b"\x00" * 4096
    part[:] = b"s" * 100
    assert bytes(x) == b"\x00" * 4096
    with pytest.raises(BufferError):
        arena.close()
    del part
    arena.free(x)
    y = arena.alloc(4096)  # now the space comes back
    del y
    arena.check()


@forks_with_own_threads
def test_fork_while_other_threads_are_inside_arena_methods(arena):
    buf = arena.alloc(CH)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            v = arena.alloc(64)
            arena.stats()
            arena.free(v)
            with arena.snapshot() as s:
                s.buffer().release()

    ts = [threading.Thread(target=busy) for _ in range(2)]
    for t in ts:
        t.start()
    try:
        for _ in range(30):

            def child():
                signal.alarm(10)  # a hang fails the test instead of blocking it
                v = arena.alloc(64)
                arena.free(v)
                return arena.stats()["slots_used"] >= 2

            assert in_child(child) is True
    finally:
        stop.set()
        for t in ts:
            t.join()
    del buf


def test_fork_check_counts_the_slots_of_inherited_snapshots():
    a = ou.Arena(4 * CH, max_procs=4)  # this process's slot + 3
    try:
        buf = a.alloc(CH)
        buf[0] = 1
        s1, s2 = a.snapshot(), a.snapshot()  # 3 slots used; a child needs 1 + 2
        with pytest.raises(OSError) as ei:
            ou.spawn(int)
        assert ei.value.errno == errno.EAGAIN
        s2.close()  # 2 used; a child needs 1 + 1: fits
        assert ou.spawn(lambda: bytes(buf[:1])).result(timeout=30) == b"\x01"
        s1.close()
        del buf
        a.check()
    finally:
        import gc

        gc.collect()
        a.close()


def test_python_sigsegv_handler_in_a_child_does_not_loop_on_copy_on_write():
    p = run_py("""
        import os, signal, odfork_user as ou
        a = ou.Arena(4 << 21, cow="chunk")           # chunk mode: the first write traps
        b = a.alloc(2 << 21); b[:] = b"p" * len(b)
        pid = ou.odfork()
        if pid == 0:
            signal.alarm(10)
            signal.signal(signal.SIGSEGV, lambda *args: None)
            b[0] = ord("c")
            os._exit(0 if b[0] == ord("c") else 1)
        _, st = os.waitpid(pid, 0)
        print("child", st, bytes(b[:1]))
    """)
    assert "child 0 b'p'" in p.stdout, p


def test_the_arena_limit_is_named():
    p = run_py("""
        import odfork_user as ou
        arenas = []
        try:
            for i in range(70):
                arenas.append(ou.Arena(ou.CHUNK_SIZE))
        except MemoryError as e:
            print(len(arenas), e)
    """)
    assert "64 cannot create an arena: a process can have at most 64 arenas open" in p.stdout, p


def test_ndarray_takes_numpy_integer_shapes(arena):
    np = pytest.importorskip("numpy")
    a = arena.ndarray((np.int64(3), np.int32(2)), "int16")
    assert a.shape == (3, 2) and a.dtype == np.int16
    b = arena.ndarray(np.int64(5))
    assert b.shape == (5,)
    with pytest.raises(ValueError):
        arena.ndarray((2.5,))
    del a, b


def test_out_of_vmas_every_path_ends():
    # vm.max_map_count lowered to just above what the test process maps: a
    # chunk-mode child that needs a new VMA per copy dies with a message, a
    # page-mode child writes everything (kernel copies need no VMA), a fold
    # either works or fails with an exception; nothing spins.
    if os.geteuid() != 0 or not os.access("/proc/sys/vm/max_map_count", os.W_OK):
        pytest.skip("needs root to lower vm.max_map_count")
    p = run_py(
        """
        import os, signal, odfork_user as ou
        CH = ou.CHUNK_SIZE
        pa = ou.Arena(400 * CH); pb = pa.alloc(400 * CH); pb[:] = b"p" * len(pb)
        ca = ou.Arena(400 * CH, cow="chunk"); cb = ca.alloc(400 * CH); cb[:] = b"c" * len(cb)
        def run(fn):
            pid = ou.odfork()
            if pid == 0:
                signal.alarm(20)                   # a spin would end as SIGALRM, not 11
                fn(); os._exit(0)
            return os.waitpid(pid, 0)[1]
        def alternate(b):
            def fn():
                for c in range(0, 400, 2):
                    b[c * CH] = 1
            return fn
        with open("/proc/sys/vm/max_map_count") as f:
            old = f.read().strip()
        maps = sum(1 for _ in open("/proc/self/maps"))
        with open("/proc/sys/vm/max_map_count", "w") as f:
            f.write(str(maps + 60))
        try:
            st_chunk = run(alternate(cb))
            st_page = run(alternate(pb))
            for c in range(0, 400, 2):
                pb[c * CH] = 2                     # views, count 1 again
            try:
                pa.fold()
                fold = "ok"
            except (MemoryError, OSError) as e:
                fold = type(e).__name__
        finally:
            with open("/proc/sys/vm/max_map_count", "w") as f:
                f.write(old)
        print("chunk", st_chunk & 0x7f, "page", st_page, "fold", fold, bytes(cb[:1]), bytes(pb[1:2]))
        pa.check(); ca.check(); print("check ok")
    """,
        timeout=120,
    )
    # a fold either finds the mappings it needs (folded neighbours merge back into one VMA) or
    # raises MemoryError and leaves the views as they were; it never spins
    assert (
        "chunk 11 page 0 fold ok b'c' b'p'" in p.stdout or "chunk 11 page 0 fold MemoryError b'c' b'p'" in p.stdout
    ) and "check ok" in p.stdout, p
    assert "cannot resolve a write fault" in p.stderr and "errno 12" in p.stderr, p.stderr


def _memfd_fds(name):
    """This process's descriptors open on the memfd `name` (odfork-pool, ...)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name}"):
                out.append(int(fd))
        except OSError:
            pass
    return out


def test_a_child_writing_to_the_pool_descriptor_cannot_change_its_parent(arena):
    # A child's ordinary bug: write(2) to a descriptor number it got wrong,
    # which is the pool's.  16 bytes at each 4 KiB of the first 64 MiB of the
    # pool: every write fails (the descriptor is read-only in every process),
    # and the parent's bytes, shared with the child, stay as they were.
    buf = arena.alloc(8 << 20)
    buf[:] = b"P" * len(buf)

    def child():
        fds = _memfd_fds("odfork-pool")
        done = failed = 0
        for fd in fds:
            for off in range(0, 64 << 20, 4096):
                try:
                    done += os.pwrite(fd, b"\xee" * 16, off) == 16
                except OSError as e:
                    failed += e.errno == errno.EBADF
        return len(fds), done, failed

    nfds, done, failed = in_child(child)
    assert nfds >= 1 and done == 0 and failed == nfds * (64 << 20) // 4096, (nfds, done, failed)
    changed = sum(buf[i : i + 16] != b"P" * 16 for i in range(0, len(buf), 4096))
    assert changed == 0, f"{changed} of {len(buf) // 4096} pages of the parent changed"
    in_child(lambda: None)  # forks go on
    arena.check()
    del buf


def _mapping_of(name):
    """(start, end) of this process's mapping of the memfd `name`."""
    with open("/proc/self/maps") as f:
        for line in f:
            if f"/memfd:{name}" in line:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                return lo, hi
    raise AssertionError(f"no mapping of {name}")


@pytest.mark.parametrize("what", ["memset", "pwrite"])
def test_a_childs_stray_write_into_the_control_block_cannot_hurt_its_parent(arena, what):
    # A child's ordinary bug: a memset of 1 MiB from the start of the family's
    # control block (a wild pointer), or write(2) to its descriptor (a wrong
    # number).  The memset kills the child (the block is read-only outside the
    # family lock) or the write fails (the memfd is sealed against writes);
    # the parent's data, its later forks and the family's bookkeeping are
    # intact.
    buf = arena.alloc(4 << 20)
    buf[:] = b"Q" * len(buf)
    lo, hi = _mapping_of("odfork-ctl")
    n = min(1 << 20, hi - lo)

    def child():
        if what == "memset":
            import ctypes
            import faulthandler

            faulthandler.disable()  # the crash is expected: no traceback
            ctypes.memset(lo, 0xFF, n)
            return "survived"
        fds = _memfd_fds("odfork-ctl")
        failed = 0
        for fd in fds:
            try:
                os.pwrite(fd, b"\xff" * n, 0)
            except OSError as e:
                failed += e.errno == errno.EPERM  # sealed against writes
        return len(fds), failed

    pid = odfork()
    if pid == 0:
        try:
            res = child()
            os.write(2, f"child result {res}\n".encode())
            os._exit(0 if res == "survived" or res[1] == res[0] else 3)
        finally:
            os._exit(4)
    status = os.waitpid(pid, 0)[1]
    if what == "memset":
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    arena.check()
    assert bytes(buf[:8]) == b"Q" * 8 and buf[len(buf) - 1] == ord("Q")
    for _ in range(3):  # forks go on, isolated
        assert in_child(lambda: (buf.__setitem__(0, 1), bytes(buf[:2]))[1]) == b"\x01Q"
        assert bytes(buf[:2]) == b"QQ"
    arena.check()
    del buf
