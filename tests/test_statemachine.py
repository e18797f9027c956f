"""A stateful property test: random sequences of alloc, free, write, kernel
write (os.readv), prepare_write, fold, odfork, child write (user and kernel),
a child dropping every descriptor, child exit, kill, snapshot and restore,
checked against a model of the bytes every process should see; in page mode
(the default) and in chunk mode.

Children are small servers forked with odfork: they answer commands over a
pipe pair (write, read, exit), so a step can act inside any live child.
"""

import hashlib
import os
import pickle
import signal
import struct

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

import odfork_user as ou

CH = ou.CHUNK_SIZE
ARENA = 24 * CH
MAX_CHILDREN = 3


def _send(fd, obj):
    data = pickle.dumps(obj)
    os.write(fd, struct.pack("<I", len(data)) + data)


def _recv(fd):
    def exact(n):
        buf = b""
        while len(buf) < n:
            b = os.read(fd, n - len(buf))
            if not b:
                raise EOFError
            buf += b
        return buf

    (n,) = struct.unpack("<I", exact(4))
    return pickle.loads(exact(n))


def kernel_write(arena, view, data):
    """Let the kernel write data into view (os.readv from a pipe)."""
    if arena.kernel_writes == "prepare_write":
        arena.prepare_write(view)
    r, w = os.pipe()
    try:
        os.write(w, data)
        assert os.readv(r, [view]) == len(data)
    finally:
        os.close(r)
        os.close(w)


def _serve(arena, views, cmd_r, ans_w):
    while True:
        op, *args = _recv(cmd_r)
        if op in ("write", "kwrite"):
            key, off, data = args
            if op == "write":
                views[key][off : off + len(data)] = data
            else:
                kernel_write(arena, views[key][off : off + len(data)], data)
            _send(ans_w, "ok")
        elif op == "drop_fds":  # what a daemon does after fork
            keep = sorted({cmd_r, ans_w})
            os.closerange(3, keep[0])
            os.closerange(keep[0] + 1, keep[-1])
            os.closerange(keep[-1] + 1, 4096)
            _send(ans_w, "ok")
        elif op == "read":
            _send(ans_w, {k: hashlib.sha1(v).digest() for k, v in views.items()})
        elif op == "check":
            arena.check()
            _send(ans_w, "ok")
        else:
            os._exit(0)


class ArenaMachine(RuleBasedStateMachine):
    blocks = Bundle("blocks")
    cow = "page"

    def __init__(self):
        super().__init__()
        self.arena = ou.Arena(ARENA, cow=self.cow)
        self.views = {}  # key -> memoryview (parent)
        self.model = {}  # key -> bytearray: what the parent should see
        self.children = []  # [pid, cmd_w, ans_r, {key: bytearray}]
        self.snaps = []  # [(Snapshot, {key: bytes})]
        self.next_key = 0
        self.base = self.arena.stats()["segments_live"]

    # -- parent memory ---------------------------------------------------------
    @rule(target=blocks, size=st.sampled_from([1, 100, 4096, CH - 7, CH + 3, 3 * CH]))
    def alloc(self, size):
        try:
            v = self.arena.alloc(size)
        except MemoryError:
            return None
        key = self.next_key
        self.next_key += 1
        self.views[key] = v
        self.model[key] = bytearray(size)
        return key

    @rule(key=blocks)
    def free(self, key):
        if key not in self.views:
            return
        self.arena.free(self.views.pop(key))
        del self.model[key]
        # children keep the block (their arena is theirs); the parent forgets it

    @rule(key=blocks, frac=st.floats(0, 1), data=st.binary(min_size=1, max_size=64))
    def write(self, key, frac, data):
        if key not in self.views:
            return
        v = self.views[key]
        off = int(frac * max(len(v) - len(data), 0))
        data = data[: len(v) - off]
        v[off : off + len(data)] = data
        self.model[key][off : off + len(data)] = data

    @rule(key=blocks, frac=st.floats(0, 1), data=st.binary(min_size=1, max_size=64))
    def kwrite(self, key, frac, data):
        if key not in self.views:
            return
        v = self.views[key]
        off = int(frac * max(len(v) - len(data), 0))
        data = data[: len(v) - off]
        kernel_write(self.arena, v[off : off + len(data)], data)
        self.model[key][off : off + len(data)] = data

    @rule(key=blocks)
    def prepare_write(self, key):
        if key in self.views:
            self.arena.prepare_write(self.views[key])

    @rule(max_dirty=st.sampled_from([None, 4]))
    def fold(self, max_dirty):
        self.arena.fold(max_dirty)

    # -- children ----------------------------------------------------------------
    @precondition(lambda self: len(self.children) < MAX_CHILDREN)
    @rule()
    def fork(self):
        cmd_r, cmd_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = ou.odfork()
        if pid == 0:
            try:
                os.close(cmd_w)
                os.close(ans_r)
                _serve(self.arena, self.views, cmd_r, ans_w)
            finally:
                os._exit(1)
        os.close(cmd_r)
        os.close(ans_w)
        self.children.append([pid, cmd_w, ans_r, {k: bytearray(m) for k, m in self.model.items()}])

    @precondition(lambda self: self.children)
    @rule(
        i=st.integers(0, MAX_CHILDREN - 1),
        frac=st.floats(0, 1),
        data=st.binary(min_size=1, max_size=64),
        pick=st.integers(0, 1000),
    )
    def child_write(self, i, frac, data, pick):
        pid, cmd_w, ans_r, cmodel = self.children[i % len(self.children)]
        if not cmodel:
            return
        key = sorted(cmodel)[pick % len(cmodel)]
        off = int(frac * max(len(cmodel[key]) - len(data), 0))
        data = data[: len(cmodel[key]) - off]
        _send(cmd_w, ("kwrite" if pick % 3 == 0 else "write", key, off, data))
        assert _recv(ans_r) == "ok"
        cmodel[key][off : off + len(data)] = data

    @precondition(lambda self: self.children)
    @rule(i=st.integers(0, MAX_CHILDREN - 1))
    def child_drops_descriptors(self, i):
        pid, cmd_w, ans_r, _ = self.children[i % len(self.children)]
        _send(cmd_w, ("drop_fds",))
        assert _recv(ans_r) == "ok"

    def _end_child(self, i, kill):
        pid, cmd_w, ans_r, _ = self.children.pop(i % len(self.children))
        if kill:
            os.kill(pid, signal.SIGKILL)
        else:
            _send(cmd_w, ("exit",))
        os.waitpid(pid, 0)
        os.close(cmd_w)
        os.close(ans_r)

    @precondition(lambda self: self.children)
    @rule(i=st.integers(0, MAX_CHILDREN - 1))
    def child_exit(self, i):
        self._end_child(i, kill=False)

    @precondition(lambda self: self.children)
    @rule(i=st.integers(0, MAX_CHILDREN - 1))
    def kill(self, i):
        self._end_child(i, kill=True)

    # -- snapshots -----------------------------------------------------------------
    @precondition(lambda self: len(self.snaps) < 3)
    @rule()
    def snapshot(self):
        self.snaps.append((self.arena.snapshot(), {k: bytes(m) for k, m in self.model.items()}))

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 2))
    def restore(self, i):
        snap, content = self.snaps[i % len(self.snaps)]
        self.arena.restore(snap)
        # blocks that exist now keep their place; their bytes are the snapshot's
        # (zeros where the snapshot had no block there yet or a freed block's bytes)
        buf = snap.buffer()
        for k, v in self.views.items():
            off = int(ou._core.ffi.cast("uintptr_t", ou._core.ffi.from_buffer(v))) - self.arena.address
            self.model[k][:] = buf[off : off + len(v)]
            if k in content:
                assert bytes(self.model[k]) == content[k]
        del buf

    @precondition(lambda self: self.snaps)
    @rule(i=st.integers(0, 2))
    def drop_snapshot(self, i):
        snap, _ = self.snaps.pop(i % len(self.snaps))
        snap.close()

    # -- what must hold after every step ------------------------------------------
    @invariant()
    def everyone_sees_their_own_bytes(self):
        for k, v in self.views.items():
            assert bytes(v) == bytes(self.model[k]), f"parent block {k}"
        for pid, cmd_w, ans_r, cmodel in self.children:
            _send(cmd_w, ("read",))
            seen = _recv(ans_r)
            for k, m in cmodel.items():
                assert seen[k] == hashlib.sha1(m).digest(), f"child {pid} block {k}"
        for snap, content in self.snaps:
            buf = snap.buffer()
            for k, m in content.items():
                if k in self.views:
                    off = (
                        int(ou._core.ffi.cast("uintptr_t", ou._core.ffi.from_buffer(self.views[k])))
                        - self.arena.address
                    )
                    assert bytes(buf[off : off + len(m)]) == m, f"snapshot block {k}"
            del buf
        self.arena.check()

    def teardown(self):
        try:
            while self.children:
                self._end_child(0, kill=False)
            for snap, _ in self.snaps:
                snap.close()
            self.snaps.clear()
            self.views.clear()
            self.arena.check()
            # with every child and snapshot gone, the parent holds the only
            # reference to every segment still allocated
            st_ = self.arena.stats()
            assert st_["segments_live"] == st_["chunks_resident"] and st_["chunks_shared"] == 0, st_
        finally:  # a failed example must not leak processes or arenas into the next one
            for pid, cmd_w, ans_r, _ in self.children:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            self.children.clear()
            self.snaps.clear()
            self.views.clear()
            import gc

            gc.collect()
            try:
                self.arena.close()
            except BufferError:
                # a failing example's traceback still holds views: unmap anyway
                # (nothing reads them again), or 64 leaked arenas would end the run
                ou._core.lib.odf_arena_close(self.arena._h)
                self.arena._closed = True


class ChunkArenaMachine(ArenaMachine):
    cow = "chunk"


_EXAMPLES = int(os.environ.get("ODFORK_STATEFUL_EXAMPLES", "200"))
TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(
    max_examples=_EXAMPLES, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
)
TestChunkArenaMachine = ChunkArenaMachine.TestCase
TestChunkArenaMachine.settings = settings(
    max_examples=max(_EXAMPLES // 2, 1), stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
)
