"""The preload library (`python -m odfork_user exec`): an unmodified native
program's malloc family in an arena heap, every fork on demand.  The C program
tests/c/preload_check.c runs with and without it and must behave the same,
with its blocks in the arena under the preload."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from testlib import python

HERE = os.path.dirname(os.path.abspath(__file__))


def _exec(*cmd, env=None, timeout=120):
    return python("-m", "odfork_user", "exec", "--", *cmd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def check_program(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("gcc is needed to build tests/c/preload_check.c")
    exe = tmp_path_factory.mktemp("preload") / "preload_check"
    subprocess.run(
        ["gcc", "-O1", "-Wall", "-o", str(exe), os.path.join(HERE, "c", "preload_check.c"), "-lpthread"], check=True
    )
    return str(exe)


def test_library_is_installed():
    p = python("-m", "odfork_user", "exec", "--print-library")
    assert p.returncode == 0 and os.path.exists(p.stdout.strip()), p.stderr


def test_a_c_program_behaves_the_same_with_its_heap_in_the_arena(check_program):
    plain = subprocess.run([check_program], capture_output=True, text=True, timeout=120)
    pre = _exec(check_program)
    assert plain.returncode == 0 and pre.returncode == 0, (plain.stderr, pre.stderr)
    assert "in-arena 0" in plain.stdout and "in-arena 101" in pre.stdout, pre.stdout
    # aligned blocks (16 bytes to 2 MiB) are the arena heap's too; above a chunk, glibc's
    assert "aligned in-arena 0 of 360" in plain.stdout.splitlines(), plain.stdout
    assert "aligned in-arena 360 of 360" in pre.stdout.splitlines(), pre.stdout
    assert "above-chunk aligned in-arena 0" in pre.stdout.splitlines(), pre.stdout
    fds = [ln for ln in plain.stdout.splitlines() if ln.startswith("fds")]
    assert fds and fds == [ln for ln in pre.stdout.splitlines() if ln.startswith("fds")]  # nothing leaks into exec
    assert "ok" in pre.stdout.splitlines()


def _wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.05)
    return None


def test_a_daemon_that_closes_every_descriptor_keeps_forking_on_demand(check_program, tmp_path):
    # fork + exit, setsid, fork + exit, close every descriptor (the preload's
    # memfds too), allocate, fork a child that writes everything
    plain, pre = tmp_path / "plain", tmp_path / "pre"
    assert subprocess.run([check_program, "daemon", str(plain)], timeout=60).returncode == 0
    assert _exec(check_program, "daemon", str(pre)).returncode == 0
    assert _wait_for(plain) == "daemon ok in-arena 0 kept 0\n"
    # the preload's two memfds outlived the close loop and a dup2 onto one of them
    assert _wait_for(pre) == "daemon ok in-arena 2 kept 2\n"


def test_the_programs_own_sigsegv_handler_still_gets_real_crashes(check_program):
    plain = subprocess.run([check_program, "crash"], capture_output=True, text=True, timeout=60)
    pre = _exec(check_program, "crash")
    assert plain.returncode == pre.returncode == 3
    assert plain.stdout == pre.stdout == "program's handler ran\n"


def test_an_unmodified_python_forks_its_heap_isolated():
    code = textwrap.dedent("""
        import os
        data = bytearray(b"p" * (32 << 20))
        objs = {i: str(i) for i in range(100000)}
        pid = os.fork()
        if pid == 0:
            data[:] = b"c" * len(data)
            objs[5] = "child"
            os._exit(0 if data[12345] == ord("c") else 1)
        _, st = os.waitpid(pid, 0)
        print(st, bytes(data[:4]), objs[5], data.count(b"c"))
        maps = open("/proc/self/maps").read()
        print("odfork-pool" in maps)
    """)
    p = _exec(sys.executable, "-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["0 b'pppp' 5 0", "True"], p.stdout


def test_a_full_heap_falls_back_to_glibc(check_program):
    # a 4 MiB heap: most of the program's blocks come from glibc, and it still works
    p = _exec(check_program, env={"ODFORK_HEAP_SIZE": "4M"})
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


RUBY_FORK = r"""
# a few tens of MiB of objects: strings long enough to have their own
# (malloc'd) buffers, arrays and hashes
$data = Array.new(40_000) { |i| ["x#{i}" * 40, [i, i.to_s, [i] * 8], {k: i, v: "v#{i}" * 20}] }
GC.start
def arena_rss_kib
  File.read("/proc/self/smaps").split(/^(?=\h+-\h+ )/).sum { |m| m.lines[0].include?("odfork-pool") ? m[/^Rss:\s+(\d+)/, 1].to_i : 0 }
end
def intact?(data)
  data.each_with_index.all? { |(s, a, h), i| s == "x#{i}" * 40 && a[1] == i.to_s && a[2].sum == 8 * i && h[:v] == "v#{i}" * 20 }
end
r, w = IO.pipe
pid = Process.fork do
  r.close
  ok = intact?($data)
  $data.each { |s, a, h| s.upcase!; a[1] << "c"; h[:v] = "child" }   # the child's writes, in place
  $data.concat(Array.new(20_000) { |i| "new#{i}" * 30 })           # and new objects
  GC.start
  w.write(ok && $data[7][0] == "X7" * 40 && $data[7][2][:v] == "child" ? "child-ok" : "child-bad")
  w.close
  exit!(0)
end
w.close
got = r.read
Process.wait(pid)
puts got, $?.exitstatus, intact?($data) ? "parent-intact" : "parent-changed", $data.size
puts "arena-kib #{arena_rss_kib}"
"""


@pytest.mark.skipif(not shutil.which("ruby"), reason="ruby is not installed (apt-get install ruby)")
def test_an_unmodified_ruby_forks_its_objects_isolated(tmp_path):
    # Debian's ruby, unmodified: its child reads the parent's objects and
    # rewrites them, the parent's stay as they were.  Its malloc heap (the
    # strings' buffers, the arrays' and hashes' tables) is in the arena; the
    # object slots are not: Ruby 3.1 maps its heap pages with mmap, not malloc.
    script = tmp_path / "fork.rb"
    script.write_text(RUBY_FORK)
    plain = subprocess.run(["ruby", str(script)], capture_output=True, text=True, timeout=60)
    pre = _exec("ruby", str(script), timeout=60)
    for p in (plain, pre):
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines()[:4] == ["child-ok", "0", "parent-intact", "40000"], p.stdout
    arena = {name: int(p.stdout.split("arena-kib ")[1]) for name, p in (("plain", plain), ("pre", pre))}
    assert arena["plain"] == 0 and arena["pre"] > 16 << 10, arena  # > 16 MiB of ruby's heap in the arena


needs_redis = pytest.mark.skipif(
    not all(shutil.which(x) for x in ("redis-server", "redis-cli", "redis-benchmark")),
    reason="redis-server, redis-cli and redis-benchmark are not installed",
)


def _redis_program(name, *args, tmp_path, timeout):
    """Run bench/programs/NAME with ARGS --json FILE: (the process, FILE's path)."""
    out = tmp_path / "out.json"
    p = python(
        os.path.join(os.path.dirname(HERE), "bench", "programs", name), *args, "--json", str(out), timeout=timeout
    )
    return p, out


@needs_redis
def test_redis_bgsave_under_the_preload_writes_the_same_data(tmp_path):
    p, out = _redis_program(
        "redis_bgsave.py",
        "--keys",
        "20000",
        "--value",
        "100",
        "--saves",
        "2",
        "--rounds",
        "0",
        tmp_path=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    res = json.loads(out.read_text())
    assert res["digests_equal"] is True
    assert all(r["latest_fork_usec_median"] > 0 for r in res["results"].values())


def test_an_arena_that_cannot_be_made_is_said_and_the_program_runs_on_glibc(check_program):
    p = _exec(check_program, env={"ODFORK_HEAP_SIZE": "100T"})  # above the core's 64 TiB limit
    assert p.returncode == 0 and "ok" in p.stdout and "in-arena 0" in p.stdout, p.stderr
    assert "odfork_preload: cannot make an arena heap" in p.stderr and "glibc" in p.stderr


@needs_redis
def test_redis_own_suite_passes_under_the_preload_as_stock(tmp_path):
    # Redis's own tests (the installed version's source release) against a
    # stock server and one under the preload: the same outcome for every test.
    # Two units here (BGSAVE + DEBUG RELOAD round trips, every hash encoding);
    # bench/programs/redis_testsuite.py without --units runs all of it.
    p, out = _redis_program(
        "redis_testsuite.py", "--units", "unit/other,unit/type/hash", tmp_path=tmp_path, timeout=1200
    )
    if p.returncode == 77:
        pytest.skip(p.stderr.strip())
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    res = json.loads(out.read_text())
    assert not res["differences"]
    for mode, r in res["runs"].items():
        assert r["outcomes"].get("ok", 0) > 50 and not r["outcomes"].get("err"), (mode, r)
        assert r["forks"] > 0, (mode, r)  # the units' BGSAVEs forked
    assert res["runs"]["odfork"]["arena_mapped"] and not res["runs"]["stock"]["arena_mapped"]


def test_anonymous_mappings_are_the_arena_heaps_with_odfork_mmap(check_program):
    # fresh ones zeroed, munmap of a head/tail/middle, MADV_DONTNEED, mremap, a read
    # barrier by mprotect across a fork, fork isolation, MAP_FIXED: the same with and without
    plain = subprocess.run([check_program, "mmap"], capture_output=True, text=True, timeout=120)
    off = _exec(check_program, "mmap", env={"ODFORK_MMAP": "0"})
    on = _exec(check_program, "mmap", env={"ODFORK_MMAP": "1"})
    for p in (plain, off, on):
        assert p.returncode == 0 and "mmap ok" in p.stdout.splitlines(), p.stdout + p.stderr
    assert "mmap in-arena 0 of 300" in plain.stdout.splitlines() + off.stdout.splitlines()
    assert "mmap in-arena 0 of 300" in off.stdout.splitlines()
    assert "mmap in-arena 300 of 300" in on.stdout.splitlines(), on.stdout
    # larger, other flags or protections: the kernel's
    assert "mmap other in-arena 0" in on.stdout.splitlines(), on.stdout


RUBY_MMAP = r"""
in_arena = lambda do
  File.read("/proc/self/maps").lines.grep(/odfork-pool/).map { |l| l.split(" ")[0].split("-").map { |x| x.to_i(16) } }
end
data = Array.new(400_000) { |i| "s#{i}" * 4 }
h = {}
100_000.times { |i| h[i] = [i, i.to_s] }
GC.compact
pid = Process.fork do
  ok = data.each_with_index.all? { |s, i| s == "s#{i}" * 4 } && h.size == 100_000 && h[99_999] == [99_999, "99999"]
  data.map!(&:upcase)
  h.clear
  GC.compact
  exit!(ok && data[10] == "S10S10S10S10" ? 0 : 1)
end
Process.wait(pid)
raise "child saw other data" unless $?.exitstatus == 0
GC.compact
raise "the parent's data changed" unless data[10] == "s10s10s10s10" && h[5] == [5, "5"] && data.size == 400_000
raise "the parent's data changed" unless data.each_with_index.all? { |s, i| s == "s#{i}" * 4 }
pid = Process.fork { GC.compact; exit!(data[7] == "s7s7s7s7" ? 0 : 1) }
Process.wait(pid)
raise "second child" unless $?.exitstatus == 0
# the object pages are in the arena: an object's address (ObjectSpace is not needed: its id is not an address)
require "fiddle"
addr = Fiddle::Pointer[data[123]].to_i
puts "ruby ok in-arena #{in_arena.call.any? { |lo, hi| addr >= lo && addr < hi }}"
"""


def test_ruby_forks_its_mmap_object_pages_on_demand_with_gc_compact_around(tmp_path):
    if not shutil.which("ruby"):
        pytest.skip("ruby is not installed")
    src = tmp_path / "t.rb"
    src.write_text(RUBY_MMAP)
    plain = subprocess.run(["ruby", str(src)], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and plain.stdout.strip() == "ruby ok in-arena false", plain.stdout + plain.stderr
    p = _exec("ruby", str(src), env={"ODFORK_MMAP": "1"}, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ruby ok in-arena true", p.stdout + p.stderr
