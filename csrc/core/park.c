/* park.c - the mappings a chunk can have: a segment mapped shared, a private
 * view of consecutive segments, the inaccessible reservation, and the move of
 * a parked mapping from the shadow back over the arena.
 *
 * All are plain syscalls and async-signal-safe; none takes a lock (callers
 * hold a->local, see internal.h).
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The pool's descriptor is read-only in every process, so that a write(2)
 * to a wrong descriptor number (a child's ordinary bug) fails with EBADF
 * instead of changing a segment its parent reads.  A pwrite or a hole punch
 * reopens it read-write from /proc/self/fd for that one call, checked to be
 * the pool (never another file).  *fd is then given to _odf_pool_rw_done.
 * Shared mappings of segments come from the pieces (below), not from such a
 * descriptor: each open is a file of its own to the kernel, and mappings of
 * different files never merge into one VMA. */
int _odf_pool_rw(odf_arena_t *a, int *fd)
{
    *fd = a->pool_fd;
    if (!a->pool_ro)
        return 0;
    char path[48];
    _odf_fd_path(path, a->pool_fd);
    int f = open(path, O_RDWR | O_CLOEXEC);
    if (f < 0)
        return errno == ENOENT ? EBADF : errno;
    struct stat st;
    if (fstat(f, &st) < 0 || (uint64_t)st.st_ino != a->pool_ino || (uint64_t)st.st_dev != a->pool_dev) {
        close(f);
        return EBADF;
    }
    *fd = f;
    return 0;
}

void _odf_pool_rw_done(odf_arena_t *a, int fd)
{
    if (fd != a->pool_fd)
        close(fd);
}

/* Pieces: ODF_PIECE_SEGS consecutive segments of the pool mapped shared,
 * PROT_NONE, from a read-write descriptor (so that the kernel lets them be
 * made writable), one mapping per piece, made on first use and inherited by
 * children.  Nothing ever accesses a piece: a shared mapping of a segment is
 * a duplicate of its part of the piece (mremap with old_size 0), which keeps
 * the piece's file, so that neighbouring chunks of consecutive segments
 * merge into one VMA as they did when mapped from one descriptor. */
static int piece_of(odf_arena_t *a, uint32_t seg, uintptr_t *out)
{
    uint32_t k = seg / ODF_PIECE_SEGS;
    uintptr_t p = a->pieces[k];
    if (!p) {
        int fd, rc = _odf_pool_rw(a, &fd);
        if (rc)
            return rc;
        void *m = mmap(NULL, (size_t)ODF_PIECE_SEGS << ODF_CHUNK_SHIFT, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd,
                       (off_t)k * ODF_PIECE_SEGS << ODF_CHUNK_SHIFT);
        rc = m == MAP_FAILED ? errno : 0;
        _odf_pool_rw_done(a, fd);
        if (rc)
            return rc;
        a->pieces[k] = p = (uintptr_t)m;
    }
    *out = p + ((uintptr_t)(seg % ODF_PIECE_SEGS) << ODF_CHUNK_SHIFT);
    return 0;
}

/* A writable mapping of segment seg, duplicated from its piece, at an
 * address the kernel picks (munmap it after): 0 or errno. */
static int window(odf_arena_t *a, uint32_t seg, void **out)
{
    uintptr_t src;
    int rc = piece_of(a, seg, &src);
    if (rc)
        return rc;
    void *w = mremap((void *)src, 0, ODF_CHUNK_SIZE, MREMAP_MAYMOVE);
    if (w == MAP_FAILED)
        return errno;
    if (mprotect(w, ODF_CHUNK_SIZE, PROT_READ | PROT_WRITE) < 0) {
        rc = errno;
        munmap(w, ODF_CHUNK_SIZE);
        return rc;
    }
    *out = w;
    return 0;
}

int _odf_pool_write(odf_arena_t *a, const void *src, size_t len, off_t off)
{
    int fd, rc = _odf_pool_rw(a, &fd);
    if (rc == 0) {
        rc = _odf_pwrite_all(fd, src, len, off);
        _odf_pool_rw_done(a, fd);
        return rc;
    }
    /* No descriptor to be had (the program closed the pool's and /proc/self/
     * map_files is not ours, or the descriptor limit): through the piece,
     * which this process maps already where it holds the segment. */
    void *w;
    size_t in = (size_t)off & (ODF_CHUNK_SIZE - 1);
    if (in + len > ODF_CHUNK_SIZE || window(a, (uint32_t)(off >> ODF_CHUNK_SHIFT), &w))
        return rc;
    memcpy((char *)w + in, src, len);
    munmap(w, ODF_CHUNK_SIZE);
    return 0;
}

int _odf_pool_punch(odf_arena_t *a, uint32_t seg)
{
    off_t off = (off_t)seg << ODF_CHUNK_SHIFT;
    int fd, rc = _odf_pool_rw(a, &fd);
    if (rc == 0) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ODF_CHUNK_SIZE) < 0)
            rc = errno;
        _odf_pool_rw_done(a, fd);
        return rc;
    }
    void *w;
    if (window(a, seg, &w))
        return rc;
    rc = madvise(w, ODF_CHUNK_SIZE, MADV_REMOVE) < 0 ? errno : 0; /* a hole punch through the mapping */
    munmap(w, ODF_CHUNK_SIZE);
    return rc;
}

/* Map segment `seg` of the pool at `addr` (one chunk), replacing what was there.
 * populate: fill the page tables now (one pass instead of 512 faults).  On
 * failure the chunk holds the reservation or what it held before. */
int _odf_map_seg(odf_arena_t *a, uintptr_t addr, uint32_t seg, int prot, int populate)
{
    uintptr_t src;
    int rc = piece_of(a, seg, &src);
    if (rc)
        return rc;
    if (mremap((void *)src, 0, ODF_CHUNK_SIZE, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)addr) == MAP_FAILED) {
        /* a duplicate refused (valgrind does not emulate it): a mapping of its
         * own, which does not merge with its neighbours */
        int fd;
        if (errno != EINVAL || (rc = _odf_pool_rw(a, &fd)))
            return rc ? rc : errno;
        void *p =
            mmap((void *)addr, ODF_CHUNK_SIZE, PROT_NONE, MAP_SHARED | MAP_FIXED, fd, (off_t)seg << ODF_CHUNK_SHIFT);
        rc = p == MAP_FAILED ? errno : 0;
        _odf_pool_rw_done(a, fd);
        if (rc)
            return rc;
    }
    if (prot != PROT_NONE && mprotect((void *)addr, ODF_CHUNK_SIZE, prot) < 0) {
        rc = errno;
        _odf_reserve(addr, ODF_CHUNK_SIZE);
        return rc;
    }
    if (populate)
        madvise((void *)addr, ODF_CHUNK_SIZE, MADV_POPULATE_READ); /* as MAP_POPULATE did; best effort */
    return 0;
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
    void *p = mmap((void *)addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? errno : 0;
}
