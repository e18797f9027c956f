"""A child's exit returns the views it shared to their segments at once
(csrc/core/sigchld.c): views nobody wrote, and only while no other thread
can write the arena; the program's own SIGCHLD disposition keeps working."""

import textwrap

import pytest

from testlib import run_py

# Each test runs in a fresh interpreter: the handler is installed at a
# process's first fork, and the test runner's own state must not matter.
# ODFORK_FOLD=0: no folder, so every fold counted is a return.
NOFOLD = {"ODFORK_FOLD": "0"}

SETUP = """
import os, signal, sys, threading, time
import odfork_user as ou
a = ou.Arena(64 << 20)
buf = a.alloc(32 << 20)          # 16 chunks
CH = a.chunk_size
def write_all(v):
    for off in range(0, len(buf), CH):
        buf[off:off + CH] = bytes([v]) * CH
def fork_and_reap(body=None):
    pid = ou.odfork()
    if pid == 0:
        if body: body()
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
"""


def _run(code, env=NOFOLD):
    proc = run_py(SETUP + textwrap.dedent(code), env=env, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_a_childs_exit_returns_every_clean_view():
    _run("""
    write_all(1)
    for i in range(3):
        fork_and_reap()
        st = a.stats()
        assert st["views"] == 0 and st["returns"] == 16 * (i + 1), st
        write_all(i + 2)             # to the segments: no view, no fault
        assert a.stats()["views"] == 0
    a.check()
    print("ok")
    """)


def test_a_child_that_exits_while_the_parent_runs_is_returned_before_any_wait():
    """The handler runs as soon as the child exits, even while the parent is
    busy, not in a wait (the kernel signals before it marks the child a
    zombie: the child's slot must still be found dead)."""
    _run("""
    write_all(1)
    for i in range(20):
        before = a.stats()["returns"]
        pid = ou.odfork()
        if pid == 0:
            os._exit(0)
        t0 = time.monotonic()
        while a.stats()["returns"] == before and time.monotonic() - t0 < 2:
            pass                     # busy: the signal interrupts this loop
        assert a.stats()["returns"] == before + 16, (i, a.stats())
        os.waitpid(pid, 0)
    print("ok")
    """)


def test_off_with_odfork_sigchld_0():
    _run(
        """
    write_all(1)
    fork_and_reap()
    st = a.stats()
    assert st["views"] == 16 and st["returns"] == 0, st
    print("ok")
    """,
        env={**NOFOLD, "ODFORK_SIGCHLD": "0"},
    )


def test_views_the_parent_wrote_while_the_child_lived_keep_their_bytes():
    """A view with a private page is not returned as it is (its bytes would
    be lost): the clean ones are, the written ones are folded (their pages
    copied into their segments first), and every byte reads as the parent
    wrote it, in the parent and in the next child."""
    _run("""
    write_all(1)
    r, w = os.pipe()
    pid = ou.odfork()
    if pid == 0:
        os.read(r, 1)
        ok = all(buf[off] == 1 for off in range(0, len(buf), 4096))
        os._exit(0 if ok else 3)
    for c in range(0, 16, 2):        # half the chunks: one page each
        buf[c * CH + 4096 * c] = 7
    os.write(w, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    st = a.stats()
    assert st["returns"] == 8 and st["folds"] == 16 and st["views"] == 0, st
    for c in range(16):
        for off in range(c * CH, (c + 1) * CH, 4096):
            want = 7 if (c % 2 == 0 and off == c * CH + 4096 * c) else 1
            assert buf[off] == want, (c, off, buf[off])
    fork_and_reap(lambda: os._exit(0 if buf[0] == 7 and buf[CH] == 1 else 3))
    a.check()
    print("ok")
    """)


def test_no_return_while_another_thread_writes():
    """Another thread could write a view between the look and the remap: the
    handler does nothing then, and no write is lost."""
    _run("""
    write_all(0)
    stop = False
    count = [0]
    def writer():
        n = 0
        while not stop:
            n = (n + 1) & 0xff
            for off in range(0, len(buf), 4096):
                buf[off] = n
            count[0] = n
    t = threading.Thread(target=writer)
    t.start()
    for i in range(20):
        fork_and_reap()
    stop = True
    t.join()
    n = count[0]
    assert all(buf[off] == n for off in range(0, len(buf), 4096)), n
    st = a.stats()
    assert st["returns"] == 0, st
    a.fold()                         # alone again: folded, then returned after the next child
    fork_and_reap()
    assert a.stats()["returns"] == 16, a.stats()
    print("ok")
    """)


def test_the_programs_handler_is_still_called():
    _run("""
    got = []
    signal.signal(signal.SIGCHLD, lambda s, f: got.append(s))
    write_all(1)
    for i in range(3):
        fork_and_reap()
    assert len(got) >= 1, got
    assert a.stats()["returns"] == 48, a.stats()
    print("ok")
    """)


def test_sig_ign_keeps_reaping_children():
    """SIGCHLD ignored: the kernel reaps children; the library leaves it so."""
    _run("""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    write_all(1)
    pid = ou.odfork()
    if pid == 0:
        os._exit(0)
    time.sleep(0.2)
    try:
        os.waitpid(pid, 0)
        raise SystemExit("a zombie: the child was not reaped by the kernel")
    except ChildProcessError:
        pass
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_IGN
    print("ok")
    """)


def test_a_handler_set_after_the_first_fork_replaces_ours():
    _run("""
    write_all(1)
    fork_and_reap()
    got = []
    signal.signal(signal.SIGCHLD, lambda s, f: got.append(s))
    fork_and_reap()
    assert got and a.stats()["returns"] == 16, (got, a.stats())
    print("ok")
    """)


@pytest.mark.parametrize("env", [{}, NOFOLD], ids=["folder", "nofolder"])
def test_sleep_is_not_cut_short_by_a_childs_exit(env):
    """Python retries a sleep a handler interrupted (PEP 475)."""
    _run(
        """
    write_all(1)
    pid = ou.odfork()
    if pid == 0:
        time.sleep(0.05)
        os._exit(0)
    t0 = time.monotonic()
    time.sleep(0.3)
    assert time.monotonic() - t0 >= 0.29
    os.waitpid(pid, 0)
    print("ok")
    """,
        env=env,
    )
