/* park.c - the mappings a chunk can have: a segment mapped shared, a private
 * view of consecutive segments, the inaccessible reservation, and the move of
 * a parked mapping from the shadow back over the arena.
 *
 * All are plain syscalls and async-signal-safe; none takes a lock (callers
 * hold a->local, see internal.h).
 */
#include "internal.h"

#include <errno.h>
#include <sys/mman.h>

/* Map segment `seg` of the pool at `addr` (one chunk), replacing what was there.
 * populate: fill the page tables now (one pass instead of 512 faults). */
int _odf_map_seg(odf_arena_t *a, uintptr_t addr, uint32_t seg, int prot, int populate)
{
    int flags = MAP_SHARED | MAP_FIXED | (populate ? MAP_POPULATE : 0);
    void *p = mmap((void *)addr, ODF_CHUNK_SIZE, prot, flags, a->pool_fd,
                   (off_t)seg << ODF_CHUNK_SHIFT);
    return p == MAP_FAILED ? errno : 0;
}

/* A VIEW: a private, writable mapping of `len` bytes of the pool from
 * segment `seg` on (consecutive segments: one mmap, one VMA). */
int _odf_map_view(odf_arena_t *a, uintptr_t addr, uint32_t seg, size_t len)
{
    void *p = mmap((void *)addr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, a->pool_fd,
                   (off_t)seg << ODF_CHUNK_SHIFT);
    return p == MAP_FAILED ? errno : 0;
}

/* Move chunk c's parked mapping (populated, MAP_SHARED of its segment) from
 * the shadow back over the arena chunk, replacing what is there, and put the
 * reservation back in the shadow.  O(1): the page tables move.  0 or errno. */
int _odf_unpark(odf_arena_t *a, uint32_t c)
{
    uintptr_t off = (uintptr_t)c << ODF_CHUNK_SHIFT;
    void *p = mremap((void *)(a->shadow + off), ODF_CHUNK_SIZE, ODF_CHUNK_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED,
                     (void *)(a->base + off));
    if (p == MAP_FAILED)
        return errno;
    _odf_reserve(a->shadow + off, ODF_CHUNK_SIZE);
    return 0;
}

/* Put an inaccessible reservation over [addr, addr+len): drops whatever was
 * mapped there (and its page tables) without leaving a hole another thread's
 * mmap could take. */
int _odf_reserve(uintptr_t addr, size_t len)
{
    void *p = mmap((void *)addr, len, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? errno : 0;
}
