"""Unmodified native programs: `python -m odfork_user exec -- CMD ARGS...` runs
CMD with the preload library (csrc/preload/odfork_preload.c), whose malloc
family is served from an arena heap, so that every fork() CMD makes is on
demand.

    python -m odfork_user exec [--heap-size 16G] -- redis-server redis.conf
    odfork-user exec -- CMD ARGS...                 (the console script)
    LD_PRELOAD=$(python -m odfork_user exec --print-library) CMD ARGS...

The library reads ODFORK_HEAP_SIZE (default 64G, virtual until used),
ODFORK_FOLD (0: no background folding), ODFORK_MMAP (1, or --mmap: small
anonymous private read-write mmaps come from the arena heap too) and
ODFORK_MMAP_MAX (the largest such mmap served, default 1M).  Children and exec'd programs inherit
LD_PRELOAD as they inherit any environment variable.
"""

import argparse
import glob
import os
import sys

from odfork_user.arena import parse_size


def library_path():
    """The installed preload library."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package, beside _ffi
    found = sorted(glob.glob(os.path.join(here, "_preload*.so")))
    if not found:
        import errno

        from odfork_user._errors import OdforkOSError

        raise OdforkOSError(
            errno.ENOENT,
            "the preload library is not built: install the package with "
            "`pip install .` (it is built beside the extension)",
        )
    return found[0]


def add_parser(sub):
    e = sub.add_parser(
        "exec",
        help="run a native program with its malloc heap in an arena (LD_PRELOAD)",
        description="Run CMD with odfork_user's preload library: malloc, free, calloc, "
        "realloc and the aligned variants come from an arena heap, so every "
        "fork CMD makes is on demand.",
    )
    e.add_argument(
        "--heap-size",
        type=parse_size,
        default=None,
        help="size of the arena heap (default: ODFORK_HEAP_SIZE or 64G; virtual until used)",
    )
    e.add_argument(
        "--mmap",
        action="store_true",
        help="serve small anonymous private mmaps (up to ODFORK_MMAP_MAX, default 1M) from the arena "
        "heap too (ODFORK_MMAP=1): for runtimes that take their object pages from mmap (Ruby)",
    )
    e.add_argument("--print-library", action="store_true", help="print the library's path and exit")
    e.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...: the command and its arguments")
    return e


def run(args, parser):
    lib = library_path()
    if args.print_library:
        print(lib)
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("exec: give a command: exec -- CMD ARGS...")
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in [lib, env.get("LD_PRELOAD", "")] if p)
    if args.heap_size:
        env["ODFORK_HEAP_SIZE"] = str(args.heap_size)
    if args.mmap:
        env["ODFORK_MMAP"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        print(f"odfork_user exec: cannot run {cmd[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
