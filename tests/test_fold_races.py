"""Folds racing writers the kernel serves: a thread doing readv into arena
buffers, and signal frames pushed onto an alternate stack that lies in an
arena, in each fold protection (a full userfaultfd where this process can
have one, and PROT_READ, the protection of an ordinary user on a default
kernel, forced with ODFORK_USERFAULTFD=0).

Without a full userfaultfd a fold is refused while another thread runs
(csrc/core/uffd.c), so no kernel write can ever meet a read-only view.
"""

import pytest
from test_kernel_writes import HAVE_UFFD

from testlib import run_py

PROTECTIONS = ["mprotect"] + (["userfaultfd"] if HAVE_UFFD else [])


def _env(protection):
    return dict(ODFORK_USERFAULTFD="0" if protection == "mprotect" else "1")


@pytest.mark.parametrize("protection", PROTECTIONS)
def test_readv_from_a_thread_while_the_main_thread_folds_and_forks(protection):
    # The reader fills 16 buffers of 64 KiB (one per chunk) from a pipe, over
    # and over, checking every byte; the main thread dirties the chunks, forks
    # and reaps a child, folds, and takes a snapshot, for 3 s.
    p = run_py(
        """
        import os, threading, time, errno
        import odfork_user as ou
        CH = ou.CHUNK_SIZE
        a = ou.Arena(64 * CH)
        bufs = [a.alloc(CH) for _ in range(16)]
        for i, b in enumerate(bufs):
            b[:] = bytes([i]) * CH
        r, w = os.pipe()
        stop, done = threading.Event(), threading.Event()
        stats = dict(reads=0, efault=0, wrong=0)
        pattern = bytes(range(256)) * 256            # 64 KiB

        def writer():  # until the reader is done: it may be inside a read when stop is set
            while not done.is_set():
                os.write(w, pattern)

        def reader():
            k = 0
            while not stop.is_set():
                view = bufs[k % 16][4096:4096 + len(pattern)]
                got = 0
                while got < len(pattern):
                    try:
                        got += os.readv(r, [view[got:]])
                    except OSError as e:
                        if e.errno != errno.EFAULT:
                            raise
                        stats["efault"] += 1
                stats["reads"] += 1
                stats["wrong"] += bytes(view) != pattern
                k += 1

        ts = [threading.Thread(target=writer, daemon=True), threading.Thread(target=reader)]
        for t in ts:
            t.start()
        end, forks = time.monotonic() + 3, 0
        while time.monotonic() < end:
            for i, b in enumerate(bufs):
                b[CH - 1 - forks % 4096] = i            # a page the reader does not fill
            pid = ou.odfork()
            if pid == 0:
                os._exit(0 if all(b[0] == i for i, b in enumerate(bufs)) else 3)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            a.fold()
            with a.snapshot() as snap:
                assert snap.buffer()[CH * 0] == 0
            forks += 1
            time.sleep(0.01)
        stop.set()
        ts[1].join()
        done.set()
        a.check()
        print("reads", stats["reads"], "efault", stats["efault"], "wrong", stats["wrong"],
              "forks", forks, "protect", ou.FOLD_PROTECT)
    """,
        env=_env(protection),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    got = dict(zip(words[::2], words[1::2]))
    assert got["protect"] == protection
    assert int(got["reads"]) > 50 and int(got["forks"]) > 10, p.stdout
    assert got["efault"] == "0" and got["wrong"] == "0", p.stdout


@pytest.mark.parametrize("protection", PROTECTIONS)
def test_a_signal_stack_in_a_chunk_that_a_thread_folds(protection):
    # The main thread's alternate signal stack lies in an arena chunk (as
    # faulthandler's does once install() moved the interpreter's heap: it
    # comes from PyMem_Malloc); the core's SIGSEGV handler runs on it.  The
    # main thread writes that chunk and forks while a thread folds: a write
    # that met a read-only fold would take a signal whose frame the kernel
    # cannot push, and the process would die of SIGSEGV.
    p = run_py(
        """
        import ctypes, os, threading, time
        import odfork_user as ou
        CH = ou.CHUNK_SIZE
        a = ou.Arena(4 * CH)
        chunk = a.alloc(CH)
        chunk[:] = b"c" * CH
        libc = ctypes.CDLL(None, use_errno=True)

        class stack_t(ctypes.Structure):
            _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

        st = stack_t(ctypes.addressof(ctypes.c_char.from_buffer(chunk)), 0, 256 * 1024)
        assert libc.sigaltstack(ctypes.byref(st), None) == 0, ctypes.get_errno()
        stop = threading.Event()
        folds = [0]

        def folder():
            while not stop.is_set():
                a.fold()
                folds[0] += 1

        t = threading.Thread(target=folder)
        t.start()
        end, n = time.monotonic() + 2, 0
        while time.monotonic() < end:
            for k in range(64):
                chunk[256 * 1024 + (n * 64 + k) * 4096 % (CH - 256 * 1024)] = k
            pid = ou.odfork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            n += 1
        stop.set()
        t.join()
        a.check()
        print("forks", n > 20, "folds", folds[0] > 20, "protect", ou.FOLD_PROTECT)
    """,
        env=_env(protection),
        timeout=120,
    )
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stdout.split() == ["forks", "True", "folds", "True", "protect", protection], p.stdout


@pytest.mark.skipif(not HAVE_UFFD, reason="needs a full userfaultfd: without one a fold is refused while a thread runs")
def test_pages_written_between_a_folds_first_look_and_its_hold_are_kept():
    # A fold finds a batch's private pages, then holds writers off, then
    # looks again: a page first written between the two looks must be copied
    # too, or the remap would drop it.  The test hook widens that window to
    # 150 ms while a thread writes fresh pages of every view, one every 0.2 ms.
    p = run_py(
        """
        import os, threading, time
        import odfork_user as ou
        from odfork_user._core import lib
        CH, PG, N = ou.CHUNK_SIZE, 4096, 8
        a = ou.Arena((N + 1) * CH, background_fold=False)
        buf = a.alloc(N * CH)
        buf[:] = b"\\x01" * (N * CH)
        pid = ou.odfork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)                      # every chunk a view of count 1
        assert lib._odf_debug_break(a._h, lib.ODF_DEBUG_FOLD_DELAY, 150) == 0
        written, stop = [], threading.Event()

        def writer():
            k = 0
            while not stop.is_set() and k < (N * CH) // PG:
                off = (k * 37 % ((N * CH) // PG)) * PG + 11   # spread over the chunks, each page once
                buf[off] = 0x5A
                written.append(off)
                k += 1
                time.sleep(0.0002)

        t = threading.Thread(target=writer)
        t.start()
        folds = 0
        for _ in range(4):
            a.fold()
            folds += a.stats()["folds"]
            pid = ou.odfork()               # views again, for the next fold
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        stop.set()
        t.join()
        lost = [off for off in written if buf[off] != 0x5A]
        a.check()
        print("written", len(written), "lost", len(lost), "folds", folds)
    """,
        env=dict(ODFORK_USERFAULTFD="1"),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    got = dict(zip(words[::2], words[1::2]))
    assert int(got["written"]) > 100 and int(got["folds"]) > 0, p.stdout
    assert got["lost"] == "0", p.stdout
