"""No fork the library makes or hooks warns that the process is multi-threaded
(Python 3.12+: DeprecationWarning from os.fork when more than one OS thread
runs), while the background folder still folds between forks.  On 3.11 there is
no such warning and these tests only check that forks and folds go on."""

import os
import textwrap

import odfork_user as ou
from testlib import python

SCRIPT = r'''
import os, sys, threading, time, multiprocessing, concurrent.futures
import odfork_user as ou
from odfork_user import _folder
import logging                        # registers its own after-fork hooks after the library's
os.register_at_fork(after_in_parent=lambda: [i for i in range(3)])   # Python code after ours

a = ou.Arena(64 << 20)
buf = a.alloc(16 << 20)

def folded():
    """The folder is back after a fork and folds the views the fork left
    (without a full userfaultfd there is no folder: only the views a child's
    exit returned are folded)."""
    if ou.FOLD_PROTECT != "userfaultfd":
        st = a.stats()
        assert not _folder.running() and st["folds"] == st["returns"], st
        return
    deadline = time.time() + 20
    while a.stats()["views"]:
        assert time.time() < deadline, a.stats()
        time.sleep(0.01)
    assert _folder.running()

def one(i):
    buf[:] = bytes([i]) * len(buf)
    return i

for i in range(3):
    buf[:] = bytes([i]) * len(buf)
    pid = ou.odfork()
    if pid == 0:
        os._exit(0 if buf[0] == i else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    folded()
    buf[:] = b"o" * len(buf)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    folded()
    first = ou.spawn(time.sleep, 0.3)           # a spawn while another child runs
    second = ou.spawn(one, i)
    assert second.result(timeout=30) == i and first.result(timeout=30) is None
    folded()
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=one, args=(i,))
    p.start()
    p.join()
    assert p.exitcode == 0
    folded()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        assert ex.submit(one, i).result() == i
print("done", file=sys.stderr)
'''


def _run(*flags, code=SCRIPT):
    return python(*flags, "-c", textwrap.dedent(code), env={"PYTHONWARNINGS": None}, timeout=180)


def test_forks_do_not_warn_multi_threaded():
    proc = _run("-W", "always::DeprecationWarning")
    assert proc.returncode == 0 and "done" in proc.stderr, proc.stderr[-3000:]
    assert "multi-threaded" not in proc.stderr, proc.stderr[-3000:]


def test_forks_under_warnings_as_errors():
    proc = _run("-W", "error::DeprecationWarning")
    assert proc.returncode == 0 and "done" in proc.stderr, proc.stderr[-3000:]
    assert "multi-threaded" not in proc.stderr, proc.stderr[-3000:]


def test_forks_in_this_process_do_not_warn(arena):
    """The same in the interpreter that runs the tests, recording every warning."""
    import warnings

    buf = arena.alloc(4 << 20)
    ou.spawn(int).join()  # the folder runs from here on
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(3):
            buf[:] = bytes([i]) * len(buf)
            assert ou.spawn(lambda: buf[0]).result(timeout=30) == i
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    assert not [w for w in seen if "multi-threaded" in str(w.message)], [str(w.message) for w in seen]
