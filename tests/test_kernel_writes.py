"""Writes the kernel makes into arena memory (readinto, os.readv, recv_into)
right after a fork, in each copy mode:

- page (the default): shared chunks are private views of their segments;
  the write is an ordinary kernel copy-on-write and succeeds, no trap;
- chunk: shared chunks are read-only; the write fails with EFAULT until
  prepare_write() makes the range writable.

Isolation is checked in every case, both ways.
"""

import errno
import os
import socket
import threading

import pytest

import odfork_user as ou
from odfork_user._core import lib
from testlib import CH, checked_arena, finish_child, in_child, run_py, start_child

HAVE_UFFD = lib.odf_uffd_probe() == 0
MODES = ["page", "chunk"]
KINDS = ["readinto", "readv", "recv_into"]
PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(10000))


@pytest.fixture(params=MODES)
def kw_arena(request):
    """An arena in the given copy mode."""
    a = ou.Arena(16 * CH, cow=request.param)
    assert a.kernel_writes == ("direct" if request.param == "page" else "prepare_write")
    yield from checked_arena(a)


@pytest.fixture
def view_arena():
    """A default (page-mode) arena."""
    yield from checked_arena(ou.Arena(16 * CH))


class Source:
    """Delivers PAYLOAD into a view through one kind of system call.  After a
    failed call (EFAULT) the data is still there for the next one."""

    def __init__(self, kind, tmp_path):
        self.kind = kind
        if kind == "readinto":
            path = tmp_path / f"src-{os.getpid()}-{id(self)}.bin"
            path.write_bytes(PAYLOAD)
            self.f = open(path, "rb", buffering=0)
        elif kind == "readv":
            self.r, w = os.pipe()
            os.write(w, PAYLOAD)
            os.close(w)
        else:
            self.s1, self.s2 = socket.socketpair()
            self.s1.sendall(PAYLOAD)

    def write_into(self, view):
        """Fill view (len(PAYLOAD) bytes) from the source; OSError on failure."""
        got = 0
        while got < len(view):
            if self.kind == "readinto":
                n = self.f.readinto(view[got:])
            elif self.kind == "readv":
                n = os.readv(self.r, [view[got:]])
            else:
                n = self.s2.recv_into(view[got:])
            assert n > 0, "source ran dry"
            got += n
        return got


def deliver(arena, src, view):
    """Kernel write of PAYLOAD into view, the way each mode is used: plainly in
    page mode; in chunk mode, EFAULT first, then prepare_write."""
    if arena.kernel_writes == "prepare_write":
        with pytest.raises(OSError) as ei:
            src.write_into(view)
        assert ei.value.errno == errno.EFAULT
        arena.prepare_write(view)
    src.write_into(view)


def fill(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"p" * len(buf)
    return buf, buf[CH - 5000 : CH + 5000]  # straddles a chunk boundary


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_write_in_child_after_fork(kw_arena, kind, tmp_path):
    buf, view = fill(kw_arena)

    def child():
        src = Source(kind, tmp_path)
        deliver(kw_arena, src, view)
        st = kw_arena.stats()
        return bytes(view), bytes(buf[:3]), st["faults"], st["bytes_copied"]

    got, elsewhere, faults, copied = in_child(child)
    assert got == PAYLOAD and elsewhere == b"ppp"
    if kw_arena.cow == "page":  # no trap; the kernel copied the 4 pages written
        assert faults == 0 and copied == 4 * 4096, (faults, copied)
    else:  # one whole-chunk copy per chunk of the view
        assert faults == 2 and copied == 2 * CH, (faults, copied)
    assert bytes(view) == b"p" * len(view)  # the parent never sees the child's write
    del view


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_write_in_parent_after_fork(kw_arena, kind, tmp_path):
    buf, view = fill(kw_arena)
    go_r, go_w = os.pipe()

    def child():
        os.read(go_r, 1)  # the parent has written by now
        return bytes(view)

    pid, r = start_child(child)
    src = Source(kind, tmp_path)
    deliver(kw_arena, src, view)
    assert bytes(view) == PAYLOAD
    os.write(go_w, b"x")
    assert finish_child(pid, r) == b"p" * len(view)  # the child never sees the parent's write
    os.close(go_r)
    os.close(go_w)
    del view


def test_kernel_write_into_fresh_memory_without_fork(kw_arena, tmp_path):
    # alloc() maps a block's new chunks, so no fork or prepare_write is needed
    buf = kw_arena.alloc(3 * CH)
    Source("readinto", tmp_path).write_into(buf[2 * CH - 10 : 2 * CH - 10 + len(PAYLOAD)])
    assert bytes(buf[2 * CH - 10 : 2 * CH - 10 + len(PAYLOAD)]) == PAYLOAD
    del buf


def test_views_read_then_written_stay_isolated_nested(view_arena, tmp_path):
    # Parent reads every chunk after the fork, then writes with user code and
    # with the kernel; a grandchild does the same.
    a = view_arena
    buf = a.alloc(8 * CH)
    for c in range(8):
        buf[c * CH : (c + 1) * CH] = bytes([c + 1]) * CH

    def grandchild():
        sums = [buf[c * CH + 17] for c in range(8)]  # read faults first
        buf[3 * CH] = 99
        Source("readv", tmp_path).write_into(buf[5 * CH : 5 * CH + len(PAYLOAD)])
        return sums, buf[3 * CH], bytes(buf[5 * CH : 5 * CH + 4])

    def child():
        before = [buf[c * CH + 1] for c in range(8)]
        Source("recv_into", tmp_path).write_into(buf[6 * CH - 10 : 6 * CH - 10 + len(PAYLOAD)])
        mid = [buf[c * CH + 17] for c in range(8)]  # what the grandchild inherits
        g = in_child(grandchild)
        return before, mid, g, bytes(buf[5 * CH : 5 * CH + 4]), buf[3 * CH]

    pid, r = start_child(child)
    reads = [buf[c * CH + 2] for c in range(8)]
    buf[2 * CH + 5] = 77
    Source("readinto", tmp_path).write_into(buf[4 * CH : 4 * CH + len(PAYLOAD)])
    before, mid, (gsums, g3, g5), c5, c3 = finish_child(pid, r)
    assert reads == before == [c + 1 for c in range(8)]
    assert gsums == mid == [c + 1 for c in range(6)] + [PAYLOAD[27], 8]
    assert (g3, g5) == (99, PAYLOAD[:4])  # the grandchild's own writes
    assert (c3, c5) == (4, bytes([6]) * 4)  # the child sees none of them
    assert bytes(buf[6 * CH - 10 : 6 * CH]) == bytes([6]) * 10  # nor the parent the child's
    assert buf[2 * CH + 5] == 77 and bytes(buf[4 * CH : 4 * CH + len(PAYLOAD)]) == PAYLOAD
    assert a.stats()["faults"] == 8  # the first touches of alloc(); no trap after the fork
    a.check()
    del buf


def test_threads_write_shared_chunks_at_once(kw_arena, tmp_path):
    # Eight threads of a child fault on the same shared chunks at once, half
    # with kernel writes, half with user writes; every write lands, none leaks.
    a = kw_arena
    buf = a.alloc(4 * CH)
    buf[:] = b"s" * len(buf)

    def child():
        errors = []
        start = threading.Barrier(8)

        def worker(i):
            try:
                off = (i % 4) * CH + (i // 4) * (CH // 2) + 100
                start.wait()
                if i % 2:
                    if a.kernel_writes == "prepare_write":
                        a.prepare_write(buf[off : off + len(PAYLOAD)])
                    Source("readv", tmp_path).write_into(buf[off : off + len(PAYLOAD)])
                else:
                    buf[off : off + len(PAYLOAD)] = PAYLOAD
            except BaseException as e:  # reported below
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        offs = [(i % 4) * CH + (i // 4) * (CH // 2) + 100 for i in range(8)]
        return errors, [bytes(buf[o : o + len(PAYLOAD)]) == PAYLOAD for o in offs]

    errors, landed = in_child(child)
    assert errors == [] and all(landed)
    assert bytes(buf) == b"s" * len(buf)
    a.check()
    del buf


def test_kernel_write_after_restore_and_in_os_fork_child(view_arena, tmp_path):
    a = view_arena
    buf = a.alloc(2 * CH)
    buf[:] = b"a" * len(buf)
    snap = a.snapshot()
    buf[:] = b"b" * len(buf)
    a.restore(snap)  # chunks shared with the snapshot again
    Source("readinto", tmp_path).write_into(buf[: len(PAYLOAD)])
    assert bytes(buf[: len(PAYLOAD)]) == PAYLOAD
    assert bytes(snap.buffer()[:4]) == b"aaaa"

    def child():
        Source("recv_into", tmp_path).write_into(buf[CH : CH + len(PAYLOAD)])
        return bytes(buf[CH : CH + 4])

    assert in_child(child, fork=os.fork) == PAYLOAD[:4]
    assert bytes(buf[CH : CH + 4]) == b"aaaa"
    snap.close()
    a.check()
    del buf


def test_chunk_mode_explains_efault(tmp_path):
    # In chunk mode an uncaught EFAULT from a kernel write into a shared chunk
    # carries a note naming cause and remedy.
    src = tmp_path / "src.bin"
    src.write_bytes(b"K" * 100)
    p = run_py(f"""
        import os, odfork_user as ou
        a = ou.Arena(4 * ou.CHUNK_SIZE, cow="chunk")
        assert a.kernel_writes == "prepare_write"
        buf = a.alloc(100)
        pid = ou.odfork()
        if pid:
            os.waitpid(pid, 0)
            raise SystemExit(0)
        with open({str(src)!r}, "rb", buffering=0) as f:
            f.readinto(buf)
    """)
    assert "Bad address" in p.stderr
    assert "arena.prepare_write(view)" in p.stderr and "cow='chunk'" in p.stderr, p.stderr


def test_environment_variable_picks_the_fold_protection():
    code = "import odfork_user as ou; print(ou.FOLD_PROTECT)"
    p = run_py(code, env=dict(ODFORK_USERFAULTFD="0"))
    assert p.stdout.split() == ["mprotect"], p.stderr
    p = run_py(code, env=dict(ODFORK_USERFAULTFD="bogus"))
    assert p.returncode != 0 and "expected auto, 1 or 0" in p.stderr
    p = run_py(code, env=dict(ODFORK_USERFAULTFD="1"))
    if HAVE_UFFD:
        assert p.stdout.split() == ["userfaultfd"], p.stderr
    else:
        assert p.returncode != 0 and "cannot be used" in p.stderr
