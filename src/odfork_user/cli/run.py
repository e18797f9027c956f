"""Run an unmodified Python program with its heap in an arena.

    python -m odfork_user run [options] script.py args...
    python -m odfork_user run [options] -m module args...
    odfork-user run ...                         (the console script)
    ODFORK_RUN=1 python script.py               (a program something else starts)

The arena heap (odfork_user.install) and numpy's data hook are installed before
the program's first import, then the program runs as `python` would run it:
sys.argv, sys.path[0], `__main__`, `-m` semantics (runpy), the exit status of
SystemExit, and a traceback for an uncaught exception that shows the program's
frames only.  Every fork the program makes afterwards, through any path
(os.fork, multiprocessing, subprocess's fork_exec is a fork too), copies no
page-table entry of the heap.

ODFORK_RUN is read by a .pth file the package installs (site-packages'
odfork_user-run.pth): Python runs it at start-up, before the program; it does
nothing unless the variable is set.
"""

import argparse
import gc
import os
import sys

from odfork_user.arena import parse_size

ENV = "ODFORK_RUN"


def _install(heap_size=None, gc_freeze=False, arena_size=None):
    """The start-up work of `run` and of ODFORK_RUN, in this process."""
    import odfork_user as ou
    from odfork_user import pyheap

    arena = ou.Arena(arena_size) if arena_size else ou.default_arena()
    ou.install(arena, heap_size)
    pyheap.hook_numpy_on_import()
    if gc_freeze:
        # before every fork: the objects that exist then are left out of every
        # later collection, in the parent and in the child, so no collection
        # writes their headers (which would make the kernel copy their pages)
        os.register_at_fork(before=gc.freeze)
    return arena


def install_from_env():
    """Called by the .pth file at interpreter start-up."""
    if os.environ.get(ENV, "") in ("", "0"):
        return
    try:
        _install(
            parse_size(os.environ["ODFORK_HEAP_SIZE"]) if os.environ.get("ODFORK_HEAP_SIZE") else None,
            os.environ.get("ODFORK_GC_FREEZE", "") not in ("", "0"),
        )
    except Exception as exc:  # the program runs anyway, on the ordinary heap, and says so
        print(f"odfork_user: {ENV} is set but the arena heap could not be installed: {exc}", file=sys.stderr)


def add_parser(sub):
    r = sub.add_parser(
        "run",
        help="run a Python program with its heap in an arena (every fork on demand)",
        description="Run script.py (or -m module) with the interpreter's heap and numpy's "
        "data in an arena, so that every fork it makes is on demand.",
    )
    r.add_argument(
        "--heap-size",
        type=parse_size,
        default=None,
        help="bytes of the arena the heap may use (default: half of the arena)",
    )
    r.add_argument(
        "--arena-size",
        type=parse_size,
        default=None,
        help="size of the arena to reserve (default: ODFORK_ARENA_SIZE or 64G; virtual until used)",
    )
    r.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() before every fork, so no collection writes the headers of the objects "
        "that existed at the fork",
    )
    r.add_argument(
        "--heap-stats",
        action="store_true",
        help="print where the process's memory is (in the arena or outside) when it exits",
    )
    r.add_argument(
        "-m",
        dest="module",
        nargs=argparse.REMAINDER,
        metavar="MODULE ARGS",
        help="run a library module as a script, like python -m (everything after it is the module's)",
    )
    r.add_argument("args", nargs=argparse.REMAINDER, help="script.py and its arguments (or the module's)")
    return r


def _run_script(path, run_name):
    """What python does with `python path`: a fresh __main__ module whose
    __file__ (and code's file name) is the absolute path, argv[0] as given.
    (runpy.run_path would put its own path in argv[0]; it runs directories
    and zip files, which this leaves to it.)"""
    import builtins
    import importlib.machinery
    import io
    import types

    full = os.path.abspath(path)
    with io.open_code(full) as f:
        code = compile(f.read(), full, "exec", dont_inherit=True)
    main = types.ModuleType(run_name)
    main.__dict__.update(
        __file__=full,
        __cached__=None,
        __spec__=None,
        __builtins__=builtins,
        __loader__=importlib.machinery.SourceFileLoader(run_name, full),
    )
    sys.modules[run_name] = main
    exec(code, main.__dict__)
    return main.__dict__


def _run_module(name, run_name):
    """What python does with `python -m name`: runpy's own entry point for -m
    (which fills argv[0] and runs the module in __main__), in a fresh __main__."""
    import runpy
    import types

    sys.modules[run_name] = types.ModuleType(run_name)
    as_main = getattr(runpy, "_run_module_as_main", None)
    if as_main is None:  # not in this Python: the public function, argv[0] and tracebacks differ slightly
        return runpy.run_module(name, run_name=run_name, alter_sys=True)
    return as_main(name, alter_argv=True)


def _set_path0(entry):
    """sys.path[0] as python gives it to the program.  What python put there for
    the launcher (the working directory for -m odfork_user, the console script's
    folder) is replaced; under -P (sys.flags.safe_path) python put nothing there."""
    if sys.flags.safe_path:
        sys.path.insert(0, entry)
    else:
        sys.path[0] = entry


def _check_program(args, parser):
    """args.module and args.args as python would take them; a usage error
    when no program is named."""
    if args.module is not None:
        if not args.module:
            parser.error("run: -m needs a module name")
        args.module, args.args = args.module[0], args.module[1:] + args.args
    if args.module is None and not args.args:
        parser.error("run: give a script (run script.py ...) or a module (run -m module ...)")


def _target(args):
    """(fn, what): how to run the program, with sys.argv and sys.path[0] set
    as python sets them for it."""
    import runpy

    if args.module is not None:
        sys.argv = [args.module] + args.args  # runpy puts the module's path in argv[0]
        _set_path0(os.getcwd())  # -m: the working directory comes first
        return _run_module, args.module
    script = args.args[0]
    sys.argv = list(args.args)
    _set_path0(os.path.dirname(os.path.abspath(script)))
    return (_run_script if os.path.isfile(script) else runpy.run_path), script


def _end_as_python_does(exc):
    """The program raised exc: print its traceback from the program's own
    frames, and end an interrupted program by SIGINT; else exit status 1."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    exc.__traceback__ = tb or exc.__traceback__  # (what the hook prints)
    sys.excepthook(type(exc), exc, exc.__traceback__)
    if isinstance(exc, KeyboardInterrupt):
        # python ends a program interrupted by ^C with the default SIGINT action
        import signal

        sys.stdout.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return 1


def run(args, parser):
    _check_program(args, parser)
    _install(args.heap_size, args.gc_freeze, args.arena_size)
    fn, what = _target(args)
    program_globals = None
    try:
        program_globals = fn(what, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        return _end_as_python_does(exc)
    finally:
        if args.heap_stats:
            # while the program's objects are alive (its globals, or the frames of
            # the exception that ends it)
            from odfork_user import pyheap

            print(pyheap.format_memory_report(), file=sys.stderr)
        del program_globals
    return 0
