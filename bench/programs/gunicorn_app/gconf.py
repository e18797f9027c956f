"""gunicorn configuration for bench/programs/gunicorn_boot.py: hooks that write
timestamps (CLOCK_MONOTONIC) to GUNICORN_EVENTS, one line each."""

import os
import time


def _event(what, pid):
    with open(os.environ["GUNICORN_EVENTS"], "a") as f:
        f.write(f"{time.monotonic():.6f} {what} {pid}\n")


def when_ready(server):
    _event("ready", os.getpid())


def pre_fork(server, worker):
    _event("pre_fork", os.getpid())


def post_worker_init(worker):
    _event("worker_ready", os.getpid())


def child_exit(server, worker):
    _event("child_exit", worker.pid)
