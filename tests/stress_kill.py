"""Kill family members at random moments, then check that nothing leaked or broke.

Each trial forks a child (odfork) that works at full speed on a shared arena:
first writes to shared chunks (COW copies), writes to its own chunks (reuse),
nested odforks of grandchildren that write and exit, snapshots, restores and
alloc/free.  After a random delay (0-5 ms) the parent SIGKILLs the child and
then its whole process group, so a death can land inside a COW fault, inside
odfork's prepare (family lock held), while freeing, or anywhere else.

At the end: the parent's bytes are intact (sha256), arena.check() passes, and
segments_live and slots_used are back to their baseline.

Usage: python stress_kill.py TRIALS [SEED]   (prints one JSON line)
"""

import hashlib
import json
import os
import random
import signal
import sys
import time

import odfork_user as ou

CH = ou.CHUNK_SIZE


def child_work(arena, buf, rng):
    os.setpgid(0, 0)  # own process group: the parent kills grandchildren with it
    extra = []
    while True:
        op = rng.randrange(7)
        if op <= 1:  # first or repeated write anywhere
            off = rng.randrange(len(buf) - 8)
            buf[off : off + 8] = rng.randbytes(8)
        elif op == 2:  # nested fork: a grandchild writes and exits
            pid = ou.odfork()
            if pid == 0:
                buf[rng.randrange(len(buf))] = 1
                os._exit(0)
            os.waitpid(pid, 0)
        elif op == 3:
            with arena.snapshot() as s:
                buf[rng.randrange(len(buf))] = 2
                arena.restore(s)
        elif op == 4 and len(extra) < 4:
            b = arena.alloc(rng.randrange(1, 3 * CH))
            b[0] = 3
            extra.append(b)
        elif op == 5 and extra:
            arena.free(extra.pop())
        else:
            buf[rng.randrange(len(buf))] ^= 0xFF


def main(trials, seed):
    rng = random.Random(seed)
    arena = ou.Arena(64 * CH)
    buf = arena.alloc(16 * CH)
    buf[:] = random.Random(seed + 1).randbytes(len(buf))
    want = hashlib.sha256(buf).hexdigest()
    base = arena.stats()
    killed = died_early = 0
    for t in range(trials):
        child_seed = rng.randrange(1 << 30)
        pid = ou.odfork()
        if pid == 0:
            try:
                child_work(arena, buf, random.Random(child_seed))
            finally:
                os._exit(1)
        time.sleep(rng.random() * 0.005)
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            died_early += 1
        _, status = os.waitpid(pid, 0)
        if not os.WIFSIGNALED(status):
            died_early += 1
        try:
            os.killpg(pid, signal.SIGKILL)  # grandchildren
        except (ProcessLookupError, PermissionError):
            pass
        if t % 10 == 9:
            buf[rng.randrange(len(buf))] ^= 0  # the parent keeps faulting too (same bytes)
    # grandchildren are reparented to us (child subreaper): reap them all
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.01)
        except ChildProcessError:
            break
    # A member killed inside odfork leaves a reserved slot that is reclaimed
    # once its creator is known dead for ODF_PENDING_GRACE_NS (1 s): wait for it.
    t_clean = time.time()
    while True:
        arena.check()
        end = arena.stats()
        if end["segments_live"] == base["segments_live"] and end["slots_used"] == base["slots_used"]:
            break
        if time.time() - t_clean > 15:
            break
        time.sleep(0.1)
    ok = (
        hashlib.sha256(buf).hexdigest() == want
        and end["segments_live"] == base["segments_live"]
        and end["slots_used"] == base["slots_used"]
    )
    print(
        json.dumps(
            {
                "trials": trials,
                "killed": killed,
                "died_early": died_early,
                "bytes_checked": len(buf),
                "segments_base": base["segments_live"],
                "segments_end": end["segments_live"],
                "slots_end": end["slots_used"],
                "seconds_to_clean": round(time.time() - t_clean, 2),
                "ok": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1))
