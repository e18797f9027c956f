"""Crash safety, leaks, limits and signals (opt-in long runs: ODFORK_STRESS=1)."""

import glob
import json
import os
import shutil
import signal
import subprocess

import pytest

import odfork_user as ou
from odfork_user import odfork
from testlib import CH, python, run_py

HERE = os.path.dirname(os.path.abspath(__file__))
STRESS = os.environ.get("ODFORK_STRESS") == "1"


def test_kill_anywhere():
    trials = 1000 if STRESS else 100
    p = python(os.path.join(HERE, "stress_kill.py"), str(trials), "3", timeout=600)
    assert p.returncode == 0, p
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"] and out["killed"] + out["died_early"] >= trials, out
    print(out)


def _pool_bytes():
    """Bytes of memory the pool memfds of this process hold."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "odfork-pool" in os.readlink(f"/proc/self/fd/{fd}"):
                total += os.fstat(int(fd)).st_blocks * 512
        except OSError:
            pass
    return total


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not STRESS, reason="opt-in: ODFORK_STRESS=1 (10,000 cycles; CI runs 1,000 in test_core)")
def test_no_leak_10000_cycles():
    with ou.Arena(8 * CH) as arena:
        buf = arena.alloc(4 * CH)
        buf[:] = b"x" * len(buf)
        arena.check()
        base, pool0 = arena.stats()["segments_live"], _pool_bytes()
        rss = []
        for i in range(10_000):
            pid = odfork()
            if pid == 0:
                buf[(i % 4) * CH] = 1
                os._exit(0)
            os.waitpid(pid, 0)
            buf[(i % 4) * CH + 1] = 2
            if i % 1000 == 999:
                rss.append(_rss())
        arena.check()
        assert arena.stats()["segments_live"] == base
        # the pool may keep up to ODF_DIRTY_MAX (32) freed segments' pages for reuse
        assert _pool_bytes() <= pool0 + 32 * CH
        assert max(rss) - min(rss) < 8 << 20, rss
        del buf


def test_fault_inside_the_handler_kills_instead_of_recursing():
    p = run_py(
        """
        import ctypes, odfork_user as ou
        from odfork_user._core import lib
        a = ou.Arena(1 << 23)
        lib._odf_debug_break(a._h, lib.ODF_DEBUG_CRASH_IN_HANDLER, 0)
        ctypes.memset(a.address + (1 << 22), 1, 1)   # first touch: the SIGSEGV handler
        print("survived")
    """,
        timeout=30,
    )
    assert p.returncode == -signal.SIGSEGV and "survived" not in p.stdout, p


def test_user_handler_installed_after_the_arena_keeps_both_working():
    p = run_py("""
        import signal, os, ctypes, odfork_user as ou
        a = ou.Arena(1 << 23)
        libc = ctypes.CDLL(None)
        HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
        def h(sig):
            os.write(1, b"user handler called\\n"); os._exit(7)
        cb = HANDLER(h)
        libc.signal(signal.SIGSEGV, cb)        # installed after the arena
        b = a.alloc(3 << 21)                   # the core takes the top again, chaining to it
        b[0] = 1; b[2 << 21] = 2
        pid = ou.odfork()
        if pid == 0:
            b[0] = 9; os._exit(0 if b[0] == 9 else 1)
        assert os.waitpid(pid, 0)[1] == 0 and b[0] == 1
        print("arena ok", flush=True)
        ctypes.string_at(16)
    """)
    assert "arena ok" in p.stdout and "user handler called" in p.stdout and p.returncode == 7, p


def test_pool_exhausted_in_a_child_crashes_with_a_message_and_parent_is_intact():
    p = run_py("""
        import os, odfork_user as ou
        a = ou.Arena(4 << 21, _max_segments=4, cow="chunk")   # room for the parent's 4 chunks only
        b = a.alloc(4 << 21); b[:] = b"p" * len(b)
        pid = ou.odfork()
        if pid == 0:
            b[0] = 1                             # needs a 5th segment
            os._exit(0)
        _, st = os.waitpid(pid, 0)
        print("child", os.WIFSIGNALED(st) and os.WTERMSIG(st), "parent", bytes(b[:2]))
        a.check()
        print("check ok")
    """)
    assert "child 11 parent b'pp'" in p.stdout and "check ok" in p.stdout, p
    assert "cannot resolve a write fault" in p.stderr and "errno 12" in p.stderr, p


def test_failed_fork_leaves_counts_as_they_were():
    # RLIMIT_NPROC makes fork(2) fail with EAGAIN inside odfork (run as a normal
    # user in a subprocess: root ignores the limit)
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    p = run_py("""
        import os, resource, odfork_user as ou
        a = ou.Arena(4 << 21, cow="chunk"); b = a.alloc(2 << 21); b[:] = b"z" * len(b)
        before = a.stats()
        os.setgid(65534); os.setuid(65534)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        try:
            ou.odfork()
        except OSError as e:
            print("fork failed", e.errno)
        after = a.stats()
        a.check()
        print("same", before["segments_live"] == after["segments_live"], after["slots_used"])
        b[0] = 1
        print("reuse", a.stats()["reuses"] - after["reuses"], a.stats()["cow_copies"] - after["cow_copies"])
    """)
    assert "fork failed 11" in p.stdout and "same True 1" in p.stdout and "reuse 1 0" in p.stdout, p


def test_exec_inherits_no_fds(tmp_path):
    p = run_py("""
        import os, subprocess, odfork_user as ou
        a = ou.Arena(1 << 22); b = a.alloc(10); b[0] = 1
        out = subprocess.run(["ls", "-l", "/proc/self/fd"], capture_output=True, text=True, close_fds=False)
        print("memfd" in out.stdout)
    """)
    assert p.stdout.strip() == "False", p


@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("gcc") is None, reason="valgrind and gcc are needed"
)
def test_c_core_is_clean_under_valgrind(tmp_path):
    root = os.path.dirname(HERE)
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        pytest.skip("the C sources are not next to the tests")
    exe = tmp_path / "test_core"
    dirs = [os.path.join(csrc, d) for d in ("core", "heap")]
    srcs = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.c")))
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-g",
            "-O1",
            "-Wall",
            "-Werror",
            *(f"-I{d}" for d in dirs),
            *srcs,
            os.path.join(HERE, "c", "test_core.c"),
            "-lpthread",
            "-o",
            str(exe),
        ],
        check=True,
    )
    p = subprocess.run(
        ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full", "--trace-children=yes", str(exe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "c core test: ok" in p.stdout, p


def test_faulthandler_enabled_after_the_arena_neither_breaks_cow_nor_loops_on_a_crash():
    p = run_py(
        """
        import os, faulthandler, ctypes, odfork_user as ou
        a = ou.Arena(1 << 22); b = a.alloc(10); b[0] = 1
        faulthandler.enable()                  # after the arena: must not see copy-on-write faults
        pid = ou.odfork()
        if pid == 0:
            b[0] = 2
            os._exit(0 if b[0] == 2 else 1)
        print("child status", os.waitpid(pid, 0)[1], flush=True)
        def crash_here(): ctypes.string_at(16)
        crash_here()                           # a real crash: one traceback, then death (no loop)
    """,
        timeout=30,
    )
    assert "child status 0" in p.stdout, p
    assert p.returncode == -signal.SIGSEGV and "crash_here" in p.stderr, p


def test_import_patches_and_probes_nothing_until_the_first_arena():
    p = run_py("""
        import faulthandler, signal, sys, threading, os
        before = (faulthandler.enable, signal.signal, sys.excepthook, threading.excepthook)
        import odfork_user as ou
        after_import = (faulthandler.enable, signal.signal, sys.excepthook, threading.excepthook)
        print("import", after_import == before)
        a = ou.Arena(1 << 22)
        print("arena", faulthandler.enable is not before[0] and signal.signal is not before[1])
        print("mode", ou.FOLD_PROTECT in ("userfaultfd", "mprotect"))
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["import", "True", "arena", "True", "mode", "True"], p.stdout
