"""Block allocator for the bytes of one arena (process-private state).

First fit over a sorted list of free extents, coalescing on free.  Blocks are
64-byte aligned and packed from the bottom of the arena, so live data touches
as few chunks as possible.  The allocator lives in ordinary Python memory, so
after a fork each process has its own copy, exactly like the arena's bytes.
"""

import bisect

ALIGN = 64


class BlockAllocator:
    def __init__(self, size):
        self.size = size
        self._starts = [0]  # free extents, sorted by start
        self._lens = [size]
        self.fresh = 0  # offsets >= fresh were never handed out (still zero)

    def alloc(self, n):
        """Returns (offset, needs_zeroing_upto) or None when no extent fits."""
        n = (n + ALIGN - 1) // ALIGN * ALIGN
        for i, length in enumerate(self._lens):
            if length >= n:
                off = self._starts[i]
                if length == n:
                    del self._starts[i]
                    del self._lens[i]
                else:
                    self._starts[i] = off + n
                    self._lens[i] = length - n
                dirty_end = min(off + n, self.fresh)
                self.fresh = max(self.fresh, off + n)
                return off, n, dirty_end
        return None

    def alloc_aligned(self, n, align):
        """First fit of n bytes starting on a multiple of align (both multiples
        of ALIGN), for a region something else manages; its offset or None."""
        for i, (start, length) in enumerate(zip(self._starts, self._lens)):
            off = (start + align - 1) // align * align
            if off + n > start + length:
                continue
            del self._starts[i]
            del self._lens[i]
            if off + n < start + length:
                self._starts.insert(i, off + n)
                self._lens.insert(i, start + length - off - n)
            if off > start:
                self._starts.insert(i, start)
                self._lens.insert(i, off - start)
            self.fresh = max(self.fresh, off + n)
            return off
        return None

    def free(self, off, n):
        i = bisect.bisect_left(self._starts, off)
        # merge with the next extent
        if i < len(self._starts) and off + n == self._starts[i]:
            n += self._lens[i]
            del self._starts[i]
            del self._lens[i]
        # merge with the previous extent
        if i > 0 and self._starts[i - 1] + self._lens[i - 1] == off:
            self._lens[i - 1] += n
        else:
            self._starts.insert(i, off)
            self._lens.insert(i, n)

    def free_bytes(self):
        return sum(self._lens)
