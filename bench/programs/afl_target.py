"""A python-afl fuzz target whose state is a dict built in plain Python
(FUZZ_STATE_BYTES, default 1 GiB), nothing of odfork_user in it."""

import os
import sys

import afl

N = int(os.environ.get("FUZZ_STATE_BYTES", str(1 << 30))) // 200
STATE = {f"k{i}": "x" * 100 + str(i) for i in range(N)}


def check(data):
    key = "k" + str(len(data) * 7919 % N)
    if data[:4] == b"FUZZ" and STATE.get(key):
        raise ValueError("found it")
    return len(STATE.get(key, ""))


afl.init()  # the fork server starts here: every input runs in a child forked from this state
check(sys.stdin.buffer.read())
os._exit(0)
