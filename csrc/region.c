/* region.c - arena reservation, chunk mappings, and the arena registry.
 *
 * Owns: the arena's virtual range (arena + shadow), the pool and control
 * memfds of a newly created family, and the process-wide table that the
 * SIGSEGV handler and the fork handlers use to find arenas.
 *
 * Concurrency: _odf_registry[] is read without locks (the signal handler);
 * it is written only under _odf_registry_lock, with a release store after the
 * arena is fully built and before it is torn down.  The mapping helpers are
 * plain syscalls and async-signal-safe.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>

odf_arena_t *_Atomic _odf_registry[ODF_MAX_ARENAS];
pthread_mutex_t _odf_registry_lock = PTHREAD_MUTEX_INITIALIZER;

uint64_t _odf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* async-signal-safe */
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Async-signal-safe unsigned formatting (no snprintf in a handler). */
char *_odf_fmt_u(char *p, unsigned long long v, int base)
{
    char tmp[32];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % (unsigned)base];
        v /= (unsigned)base;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    *p = 0;
    return p;
}

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

/* pwrite all of [src, src+len) to fd at off (EINTR retried): 0 or errno. */
int _odf_pwrite_all(int fd, const void *src, size_t len, off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)src + done, len - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EIO;
        done += (size_t)n;
    }
    return 0;
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

int _odf_registry_add(odf_arena_t *a)
{
    int rc = ENOMEM;
    pthread_mutex_lock(&_odf_registry_lock);
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        if (atomic_load(&_odf_registry[i]) == NULL) {
            a->registry_index = i;
            atomic_store_explicit(&_odf_registry[i], a, memory_order_release);
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&_odf_registry_lock);
    return rc;
}

void _odf_registry_remove(odf_arena_t *a)
{
    pthread_mutex_lock(&_odf_registry_lock);
    if (a->registry_index >= 0)
        atomic_store_explicit(&_odf_registry[a->registry_index], NULL, memory_order_release);
    a->registry_index = -1;
    pthread_mutex_unlock(&_odf_registry_lock);
}

/* Async-signal-safe: lock-free scan of a fixed array. */
odf_arena_t *_odf_registry_find(uintptr_t addr)
{
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load_explicit(&_odf_registry[i], memory_order_acquire);
        if (a && addr >= a->base && addr < a->base + a->size)
            return a;
    }
    return NULL;
}

static void arena_unmap(odf_arena_t *a)
{
    if (a->base)
        munmap((void *)a->base, a->shadow - a->base + a->size);
    if (a->flags)
        munmap(a->flags, a->nchunks);
    if (a->anchor)
        munmap((void *)a->anchor, 4096);
    if (a->ctl)
        munmap(a->ctl, a->ctl->total);
    if (a->pool_fd >= 0)
        close(a->pool_fd);
    if (a->ctl_fd >= 0)
        close(a->ctl_fd);
}

int odf_arena_create(size_t size, uint32_t max_slots, uint32_t max_segs, odf_arena_t **out)
{
    int rc;
    if (size == 0)
        return EINVAL;
    if (size > ((size_t)1 << 46)) /* 64 TiB: keeps chunk indices and 2*size sane */
        return ENOMEM;
    size_t nchunks = (size + ODF_CHUNK_SIZE - 1) >> ODF_CHUNK_SHIFT;
    size = nchunks << ODF_CHUNK_SHIFT;
    if (max_slots == 0)
        max_slots = ODF_DEFAULT_MAX_SLOTS;
    /* Default pool: one segment per chunk per slot, the most the family can
     * ever hold at once, so a copy never finds the pool full.  It costs
     * nothing until used: the pool memfd is sparse and the count and free
     * arrays are only touched up to the high-water mark. */
    if (max_segs == 0) {
        uint64_t want = (uint64_t)nchunks * max_slots;
        max_segs = want > UINT32_MAX - 1 ? UINT32_MAX - 1 : (uint32_t)want;
    }
    if (max_segs < nchunks)
        return EINVAL;

    if ((rc = _odf_handler_install()) || (rc = _odf_fork_handlers_install()))
        return rc;

    odf_arena_t *a = calloc(1, sizeof(*a));
    if (!a)
        return ENOMEM;
    a->pool_fd = a->ctl_fd = -1;
    a->registry_index = -1;
    a->child_slot = a->last_child_slot = ODF_NONE;
    a->size = size;
    a->nchunks = (uint32_t)nchunks;
    pthread_mutex_init(&a->local, NULL);
    a->page_cow = 1;

    /* Arena and shadow both start on a 1 GiB boundary: mremap then moves
     * whole page-table pages (a PUD entry per GiB, else a PMD entry per
     * chunk).  Measured here: parking 1 GiB of populated chunks costs ~10 us
     * with 1 GiB alignment and ~150 us with 2 MiB alignment. */
    size_t shadow_off = (size + ODF_ALIGN - 1) & ~(ODF_ALIGN - 1);
    size_t span = shadow_off + size + ODF_ALIGN;
    void *r = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) {
        rc = errno;
        goto fail;
    }
    uintptr_t lo = (uintptr_t)r, base = (lo + ODF_ALIGN - 1) & ~(ODF_ALIGN - 1);
    if (base > lo)
        munmap(r, base - lo);
    if (lo + span > base + shadow_off + size)
        munmap((void *)(base + shadow_off + size), lo + span - (base + shadow_off + size));
    a->base = base;
    a->shadow = base + shadow_off;

    a->flags = mmap(NULL, nchunks, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a->flags == MAP_FAILED) {
        a->flags = NULL;
        rc = errno;
        goto fail;
    }
    a->pool_fd = memfd_create("odfork-pool", MFD_CLOEXEC);
    if (a->pool_fd < 0 || ftruncate(a->pool_fd, (off_t)max_segs << ODF_CHUNK_SHIFT) < 0) {
        rc = errno;
        goto fail;
    }
    /* The anchor lets a process that lost pool_fd (closed by the program)
     * reopen the pool from /proc/self/map_files (_odf_fds_check). */
    void *anc = mmap(NULL, 4096, PROT_NONE, MAP_SHARED, a->pool_fd, 0);
    if (anc == MAP_FAILED) {
        rc = errno;
        goto fail;
    }
    a->anchor = (uintptr_t)anc;
    if ((rc = _odf_ctl_init(a, max_slots, max_segs)))
        goto fail;
    if ((rc = _odf_registry_add(a)))
        goto fail;
    *out = a;
    return 0;
fail:
    arena_unmap(a);
    free(a);
    return rc;
}

int odf_arena_close(odf_arena_t *a)
{
    sigset_t old;
    _odf_registry_remove(a);
    _odf_block_signals(&old);
    pthread_mutex_lock(&a->local);
    if (!a->orphaned && _odf_family_lock(a) == 0) {
        _odf_slot_release(a, a->self);
        _odf_trim_locked(a, UINT32_MAX);
        _odf_slot_hold_alive(a, a->self, 0);
        _odf_family_unlock(a);
    }
    pthread_mutex_unlock(&a->local);
    _odf_restore_signals(&old);
    arena_unmap(a);
    free(a);
    return 0;
}

uintptr_t odf_arena_base(const odf_arena_t *a) { return a->base; }
size_t odf_arena_size(const odf_arena_t *a) { return a->size; }
