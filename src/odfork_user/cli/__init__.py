"""Command line:
python -m odfork_user compare [--sizes 256M,1G] [--rounds N] [--json FILE] [--plot FILE.png]
python -m odfork_user run [--heap-size N] [--gc-freeze] [--heap-stats] script.py args... | -m module args...
python -m odfork_user exec [--heap-size N] -- CMD ARGS...     (native programs, LD_PRELOAD)
"""

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m odfork_user", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="odfork vs os.fork at a few sizes, every metric")
    c.add_argument("--sizes", default="64M,256M,1G", help="comma-separated sizes (default 64M,256M,1G)")
    c.add_argument("--rounds", type=int, default=11, help="forks per latency measurement (default 11)")
    c.add_argument("--heavy-rounds", type=int, default=3, help="rounds of the write and read metrics (default 3)")
    c.add_argument("--json", help="write the raw results to this file")
    c.add_argument("--plot", help="write a log-log plot of latency vs size (PNG, needs matplotlib)")
    c.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines on stderr")
    from odfork_user.cli import compare, preload, run

    r = run.add_parser(sub)
    e = preload.add_parser(sub)
    args = p.parse_args(argv)
    if args.cmd == "run":
        return run.run(args, r)
    if args.cmd == "exec":
        return preload.run(args, e)
    if args.rounds < 1 or args.heavy_rounds < 1:
        p.error("--rounds and --heavy-rounds must be >= 1")
    return compare.compare(args)
