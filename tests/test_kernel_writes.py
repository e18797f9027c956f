"""Writes the kernel makes into arena memory (readinto, os.readv, recv_into)
right after a fork, with each mechanism:

- userfaultfd: shared chunks are registered; the write traps and succeeds;
- signal (the fallback): shared chunks are read-only; the write fails with
  EFAULT until prepare_write() makes the range private.

Isolation is checked in every case, both ways.  The mechanism is chosen per
arena (lib.odf_uffd_enable sets it for arenas created afterwards), so both run
in one process; the environment variable that forces the fallback is tested in
subprocesses.
"""
import errno
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import odfork_user as ou
from odfork_user import odfork
from odfork_user._core import lib

from conftest import CH, checked_arena, finish_child, in_child, start_child

HAVE_UFFD = lib.odf_uffd_probe() == 0
MECHANISMS = [
    pytest.param("userfaultfd", marks=pytest.mark.skipif(not HAVE_UFFD, reason="no full userfaultfd here")),
    "signal",
]
KINDS = ["readinto", "readv", "recv_into"]
PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(10000))


@pytest.fixture(params=MECHANISMS)
def kw_arena(request):
    """An arena using the given mechanism (the process default is restored)."""
    default = ou.KERNEL_WRITES == "userfaultfd"
    assert lib.odf_uffd_enable(request.param == "userfaultfd") == 0
    try:
        a = ou.Arena(16 * CH)
    finally:
        lib.odf_uffd_enable(default)
    assert a.kernel_writes == request.param
    yield from checked_arena(a)


@pytest.fixture
def uffd_arena():
    """An arena on userfaultfd whatever the process default (restored after)."""
    if not HAVE_UFFD:
        pytest.skip("no full userfaultfd here")
    lib.odf_uffd_enable(1)
    try:
        a = ou.Arena(16 * CH)
    finally:
        lib.odf_uffd_enable(ou.KERNEL_WRITES == "userfaultfd")
    yield from checked_arena(a)


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
    """Kernel write of PAYLOAD into view, the way each mechanism is used:
    plainly with userfaultfd; with the fallback, EFAULT first, then prepare_write."""
    if arena.kernel_writes == "signal":
        with pytest.raises(OSError) as ei:
            src.write_into(view)
        assert ei.value.errno == errno.EFAULT
        arena.prepare_write(view)
    src.write_into(view)


def fill(arena):
    buf = arena.alloc(2 * CH)
    buf[:] = b"p" * len(buf)
    return buf, buf[CH - 5000:CH + 5000]  # straddles a chunk boundary


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_write_in_child_after_fork(kw_arena, kind, tmp_path):
    buf, view = fill(kw_arena)

    def child():
        src = Source(kind, tmp_path)
        deliver(kw_arena, src, view)
        return bytes(view), bytes(buf[:3]), kw_arena.stats()["uffd_faults"]

    got, elsewhere, ufaults = in_child(child)
    assert got == PAYLOAD and elsewhere == b"ppp"
    assert (ufaults > 0) == (kw_arena.kernel_writes == "userfaultfd")
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
    Source("readinto", tmp_path).write_into(buf[2 * CH - 10:2 * CH - 10 + len(PAYLOAD)])
    assert bytes(buf[2 * CH - 10:2 * CH - 10 + len(PAYLOAD)]) == PAYLOAD
    del buf


def test_uffd_reads_then_writes_stay_isolated_nested(uffd_arena, tmp_path):
    # Parent reads every chunk after the fork (write-protected mappings), then
    # writes with user code and with the kernel; a grandchild does the same.
    a = uffd_arena
    buf = a.alloc(8 * CH)
    for c in range(8):
        buf[c * CH:(c + 1) * CH] = bytes([c + 1]) * CH

    def grandchild():
        sums = [buf[c * CH + 17] for c in range(8)]  # read faults first
        buf[3 * CH] = 99
        Source("readv", tmp_path).write_into(buf[5 * CH:5 * CH + len(PAYLOAD)])
        return sums, buf[3 * CH], bytes(buf[5 * CH:5 * CH + 4])

    def child():
        before = [buf[c * CH + 1] for c in range(8)]
        Source("recv_into", tmp_path).write_into(buf[6 * CH - 10:6 * CH - 10 + len(PAYLOAD)])
        mid = [buf[c * CH + 17] for c in range(8)]  # what the grandchild inherits
        g = in_child(grandchild)
        return before, mid, g, bytes(buf[5 * CH:5 * CH + 4]), buf[3 * CH]

    pid, r = start_child(child)
    reads = [buf[c * CH + 2] for c in range(8)]
    buf[2 * CH + 5] = 77
    Source("readinto", tmp_path).write_into(buf[4 * CH:4 * CH + len(PAYLOAD)])
    before, mid, (gsums, g3, g5), c5, c3 = finish_child(pid, r)
    assert reads == before == [c + 1 for c in range(8)]
    assert gsums == mid == [c + 1 for c in range(6)] + [PAYLOAD[27], 8]
    assert (g3, g5) == (99, PAYLOAD[:4])              # the grandchild's own writes
    assert (c3, c5) == (4, bytes([6]) * 4)            # the child sees none of them
    assert bytes(buf[6 * CH - 10:6 * CH]) == bytes([6]) * 10  # nor the parent the child's
    assert buf[2 * CH + 5] == 77 and bytes(buf[4 * CH:4 * CH + len(PAYLOAD)]) == PAYLOAD
    assert a.stats()["uffd_faults"] >= 8
    a.check()
    del buf


def test_uffd_threads_write_shared_chunks_at_once(uffd_arena, tmp_path):
    # Eight threads of a child fault on the same shared chunks at once, half
    # with kernel writes, half with user writes; every write lands, none leaks.
    a = uffd_arena
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
                    Source("readv", tmp_path).write_into(buf[off:off + len(PAYLOAD)])
                else:
                    buf[off:off + len(PAYLOAD)] = PAYLOAD
            except BaseException as e:  # reported below
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        offs = [(i % 4) * CH + (i // 4) * (CH // 2) + 100 for i in range(8)]
        return errors, [bytes(buf[o:o + len(PAYLOAD)]) == PAYLOAD for o in offs]

    errors, landed = in_child(child)
    assert errors == [] and all(landed)
    assert bytes(buf) == b"s" * len(buf)
    a.check()
    del buf


def test_uffd_kernel_write_after_restore_and_in_os_fork_child(uffd_arena, tmp_path):
    a = uffd_arena
    buf = a.alloc(2 * CH)
    buf[:] = b"a" * len(buf)
    snap = a.snapshot()
    buf[:] = b"b" * len(buf)
    a.restore(snap)  # chunks shared with the snapshot again
    Source("readinto", tmp_path).write_into(buf[:len(PAYLOAD)])
    assert bytes(buf[:len(PAYLOAD)]) == PAYLOAD
    assert bytes(snap.buffer()[:4]) == b"aaaa"

    def child():
        Source("recv_into", tmp_path).write_into(buf[CH:CH + len(PAYLOAD)])
        return bytes(buf[CH:CH + 4])

    assert in_child(child, fork=os.fork) == PAYLOAD[:4]
    assert bytes(buf[CH:CH + 4]) == b"aaaa"
    snap.close()
    a.check()
    del buf


def _run(code, **env):
    e = dict(os.environ, **env)
    e["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(ou.__file__)),
                                                  e.get("PYTHONPATH", "")] if p)
    return subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(code)], env=e,
                          capture_output=True, text=True, timeout=60)


def test_forced_fallback_explains_efault(tmp_path):
    # ODFORK_KERNEL_WRITES=signal forces the fallback; an uncaught EFAULT from a
    # kernel write into a shared chunk carries a note naming cause and remedy.
    src = tmp_path / "src.bin"
    src.write_bytes(b"K" * 100)
    p = _run(f"""
        import os, odfork_user as ou
        assert ou.KERNEL_WRITES == "signal", ou.KERNEL_WRITES
        a = ou.Arena(4 * ou.CHUNK_SIZE)
        assert a.kernel_writes == "signal"
        buf = a.alloc(100)
        pid = ou.odfork()
        if pid:
            os.waitpid(pid, 0)
            raise SystemExit(0)
        with open({str(src)!r}, "rb", buffering=0) as f:
            f.readinto(buf)
    """, ODFORK_KERNEL_WRITES="signal")
    assert "Bad address" in p.stderr
    assert "arena.prepare_write(view)" in p.stderr and "userfaultfd" in p.stderr, p.stderr


def test_environment_variable_picks_the_mechanism():
    code = "import odfork_user as ou; print(ou.KERNEL_WRITES, ou.Arena(ou.CHUNK_SIZE).kernel_writes)"
    p = _run(code, ODFORK_KERNEL_WRITES="signal")
    assert p.stdout.split() == ["signal", "signal"], p.stderr
    p = _run(code, ODFORK_KERNEL_WRITES="bogus")
    assert p.returncode != 0 and "expected auto, userfaultfd or signal" in p.stderr
    p = _run(code, ODFORK_KERNEL_WRITES="userfaultfd")
    if HAVE_UFFD:
        assert p.stdout.split() == ["userfaultfd", "userfaultfd"], p.stderr
    else:
        assert p.returncode != 0 and "cannot be used" in p.stderr
