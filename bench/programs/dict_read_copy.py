"""What a child that only reads a large dict of Python objects copies.

odfork_user.install() first, then N small objects in a dict (each value a
list of an int and a str: containers the collector tracks), optionally
gc.freeze(), then children that (a) read every value, (b) read and run
gc.collect(), (c) only run gc.collect().  Each reports the arena's
bytes_copied (the pages the child's writes made its own) and its
Private_Dirty from /proc/self/smaps_rollup.

    python -P bench/programs/dict_read_copy.py [N] [--freeze]
"""

import gc
import sys

import odfork_user as ou

n = int(next((a for a in sys.argv[1:] if a.isdigit()), 1_000_000))
freeze = "--freeze" in sys.argv
arena = ou.install()
data = {i: [i * 7, f"value {i}"] for i in range(n)}
if freeze:
    gc.freeze()
MiB = 1 << 20


def private_dirty():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) << 10
    return 0


def child(read, collect):
    before = arena.stats()["bytes_copied"]
    total = 0
    for k, v in data.items() if read else ():
        total += v[0] + len(v[1])
    if collect:
        gc.collect()
    return arena.stats()["bytes_copied"] - before, private_dirty(), total


for read, collect, what in (
    (True, False, "reads only          "),
    (True, True, "reads + gc.collect()"),
    (False, True, "gc.collect() only   "),
):
    copied, private, _ = ou.spawn(child, read, collect).result(timeout=600)
    print(
        f"python {sys.version.split()[0]}  {n} objects  gc.freeze {'yes' if freeze else 'no ':3}  child {what}: "
        f"bytes_copied {copied / MiB:7.1f} MiB, Private_Dirty {private / MiB:7.1f} MiB"
    )
