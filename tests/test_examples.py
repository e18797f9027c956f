"""The examples run, with small sizes, and report what they promise."""

import importlib.util
import pathlib

EX = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EX / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bgsave_example():
    res = load("bgsave").main(["--size", "16M", "--seconds", "0.3"])
    assert set(res) == {"os.fork", "odfork", "snapshot"}
    assert all(n > 0 and stall >= 0 for stall, n in res.values())


def test_restore_loop_example():
    res = load("restore_loop").main(["--size", "16M", "--trials", "20"])
    assert set(res) == {"restore", "odfork", "os.fork"} and all(r > 0 for r in res.values())
