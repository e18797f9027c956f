/* arena.c - creating and closing an arena (the top of the core: it installs
 * the fault and fork handlers, builds the family, and registers the arena).
 *
 * Owns: the arena's virtual range (arena + shadow), and the pool and control
 * memfds of a newly created family.
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
#include <sys/syscall.h>

static void arena_unmap(odf_arena_t *a)
{
    if (a->base)
        munmap((void *)a->base, a->shadow - a->base + a->size);
    if (a->flags)
        munmap(a->flags, a->nchunks);
    if (a->anchor)
        munmap((void *)a->anchor, 4096);
    if (a->pieces) {
        for (uint32_t k = 0; k < a->npieces; k++)
            if (a->pieces[k])
                munmap((void *)a->pieces[k], (size_t)ODF_PIECE_SEGS << ODF_CHUNK_SHIFT);
        munmap(a->pieces, (size_t)a->npieces * sizeof(uintptr_t));
    }
    if (a->ctl)
        munmap(a->ctl, a->ctl_total);
    if (a->pool_fd >= 0)
        close(a->pool_fd);
    if (a->ctl_fd >= 0)
        close(a->ctl_fd);
}

int odf_arena_create(size_t size, const odf_arena_opts_t *opts, odf_arena_t **out)
{
    static const odf_arena_opts_t defaults;
    if (!opts)
        opts = &defaults;
    uint32_t max_slots = opts->max_slots, max_segs = opts->max_segs;
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
    a->page_cow = !opts->chunk_cow;

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
    a->npieces = max_segs / ODF_PIECE_SEGS + 1;
    void *pt = mmap(NULL, (size_t)a->npieces * sizeof(uintptr_t), PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (pt == MAP_FAILED) {
        rc = errno;
        goto fail;
    }
    a->pieces = pt;
    /* From here on the pool's descriptor is read-only (park.c _odf_pool_rw);
     * where /proc cannot reopen it, it stays read-write. */
    {
        char path[48];
        _odf_fd_path(path, a->pool_fd);
        int ro = open(path, O_RDONLY | O_CLOEXEC);
        if (ro >= 0) {
            close(a->pool_fd);
            a->pool_fd = ro;
            a->pool_ro = 1;
        }
    }
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

void odf_arena_fds(const odf_arena_t *a, int *pool_fd, int *ctl_fd)
{
    *pool_fd = __atomic_load_n(&a->pool_fd, __ATOMIC_RELAXED);
    *ctl_fd = __atomic_load_n(&a->ctl_fd, __ATOMIC_RELAXED);
}

int odf_arena_move_fd(odf_arena_t *a, int fd)
{
    /* Under a->local: the descriptors are this process's, the family has no
     * part in them. */
    int rc = 0;
    sigset_t old;
    _odf_block_signals(&old);
    pthread_mutex_lock(&a->local);
    int *slot = fd == a->pool_fd ? &a->pool_fd : fd == a->ctl_fd ? &a->ctl_fd : NULL;
    if (slot) {
        int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (nfd < 0) {
            rc = errno;
        } else {
            __atomic_store_n(slot, nfd, __ATOMIC_RELAXED);
            syscall(SYS_close, fd); /* not close(): a program may have interposed it */
            if (slot == &a->ctl_fd) /* closing any descriptor of the file dropped the liveness lock */
                rc = _odf_slot_hold_alive(a, a->self, 1);
        }
    }
    pthread_mutex_unlock(&a->local);
    _odf_restore_signals(&old);
    return rc;
}

uintptr_t odf_arena_base(const odf_arena_t *a) { return a->base; }
size_t odf_arena_size(const odf_arena_t *a) { return a->size; }
