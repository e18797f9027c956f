/* snapshot.c - in-process snapshots: a slot that holds chunk references like
 * a process does, owned by the process that took it.
 *
 * Taking one copies this process's page table into a SNAP slot, raises every
 * resident chunk's count and parks the writable chunks (as a fork does), so
 * the next write to any chunk copies it, or reuses it once the snapshot is
 * closed.  A snapshot is found by its family-unique id and its owner, so that
 * the copies a fork hands the child (fork.c) answer to the same id there.
 * A dead owner's snapshots are released with it (_odf_slot_release).
 *
 * Locking: a->local, then the family lock, as everywhere (internal.h).
 */
#include "internal.h"

#include <errno.h>
#include <sys/mman.h>

/* pre: family lock.  The SNAP slot of this process with that id, or ODF_NONE. */
static uint32_t find_snap(odf_arena_t *a, uint64_t id)
{
    uint32_t mygen = ODF_SG_GEN(atomic_load(&a->slots[a->self].sg));
    for (uint32_t j = 0; j < a->ctl->slot_hwm; j++) {
        odf_slot_t *t = &a->slots[j];
        if (ODF_SG_STATE(atomic_load(&t->sg)) == ODF_SLOT_SNAP && t->owner == a->self && t->owner_gen == mygen &&
            t->snap_id == id)
            return j;
    }
    return ODF_NONE;
}

/* pre: family lock; slot k shares this process's page table.  Every chunk
 * marked UNFOLDED (a view whose fold could not hold writers off) gets a segment of the
 * snapshot's own holding the view's bytes in place of the shared one.  On
 * error slot k is released. */
static int copy_views(odf_arena_t *a, uint32_t k)
{
    uint32_t *pt = ODF_PT(a, k);
    for (uint32_t c = 0; c < a->hi; c++) {
        uint32_t nseg;
        if (!(a->flags[c] & ODF_F_UNFOLDED))
            continue;
        a->flags[c] &= (uint8_t)~ODF_F_UNFOLDED;
        int rc = _odf_copy_view_locked(a, c, &nseg);
        if (rc) {
            for (uint32_t d = c + 1; d < a->hi; d++)
                a->flags[d] &= (uint8_t)~ODF_F_UNFOLDED;
            _odf_slot_release(a, k);
            return rc;
        }
        _odf_seg_decref(a, pt[c] - 1);
        pt[c] = nseg + 1;
    }
    return 0;
}

int odf_snapshot_take(odf_arena_t *a, uint64_t *id)
{
    int rc;
    ODF_LOCKED(a, rc, {
        uint32_t k, unfolded = 0;
        /* a view's private pages are not in its segment: fold them in first
         * (where writers cannot be held off, the snapshot copies the chunk) */
        for (uint32_t c = 0; c < a->hi && !rc; c++) {
            int folded;
            if (a->flags[c] & ODF_F_VIEW) {
                rc = _odf_fold_locked(a, c, ODF_FOLD_ANY, 1, &folded);
                if (rc == EAGAIN) {
                    rc = 0;
                    a->flags[c] |= ODF_F_UNFOLDED;
                    unfolded++;
                }
            }
        }
        if (rc == 0)
            rc = _odf_slot_alloc(a, ODF_SLOT_SNAP, &k);
        if (rc == 0) {
            _odf_slot_share(a, k, a->mypt, a->hi);
            rc = unfolded ? copy_views(a, k) : 0;
        } else {
            for (uint32_t c = 0; c < a->hi; c++)
                a->flags[c] &= (uint8_t)~ODF_F_UNFOLDED;
        }
        if (rc == 0) {
            odf_slot_t *s = &a->slots[k];
            s->owner = a->self;
            s->owner_gen = ODF_SG_GEN(atomic_load(&a->slots[a->self].sg));
            s->snap_id = *id = ++a->ctl->next_snap_id;
            rc = _odf_write_protect(a);
            if (rc)
                _odf_slot_release(a, k);
        }
    });
    return rc;
}

int odf_snapshot_release(odf_arena_t *a, uint64_t id)
{
    int rc;
    ODF_LOCKED(a, rc, {
        uint32_t k = find_snap(a, id);
        if (k == ODF_NONE)
            rc = ENOENT;
        else
            _odf_slot_release(a, k);
    });
    return rc;
}

/* Map the snapshot read-only at its own reserved range [*addr, *addr+size):
 * its segments are immutable while it holds them (no process maps a segment
 * writable unless it holds the only reference). */
int odf_snapshot_map(odf_arena_t *a, uint64_t id, uintptr_t *addr)
{
    void *r = mmap(NULL, a->size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED)
        return errno;
    int rc;
    ODF_LOCKED(a, rc, {
        uint32_t k = find_snap(a, id);
        if (k == ODF_NONE) {
            rc = ENOENT;
        } else {
            uint32_t *pt = ODF_PT(a, k), hi = a->slots[k].hi;
            for (uint32_t c = 0; c < hi && !rc; c++) {
                if (!pt[c])
                    continue;   /* never written: the anonymous zero pages stay */
                uint32_t n = 1; /* runs of consecutive segments: one mmap, one VMA */
                while (c + n < hi && pt[c + n] == pt[c] + n)
                    n++;
                void *p = mmap((char *)r + ((size_t)c << ODF_CHUNK_SHIFT), (size_t)n << ODF_CHUNK_SHIFT, PROT_READ,
                               MAP_SHARED | MAP_FIXED, a->pool_fd, (off_t)(pt[c] - 1) << ODF_CHUNK_SHIFT);
                if (p == MAP_FAILED)
                    rc = errno;
                c += n - 1;
            }
        }
    });
    if (rc)
        munmap(r, a->size);
    else
        *addr = (uintptr_t)r;
    return rc;
}

int odf_snapshot_unmap(uintptr_t addr, size_t size) { return munmap((void *)addr, size) ? errno : 0; }

/* Roll the arena back: every chunk whose segment differs from the
 * snapshot's is remapped to the snapshot's (a view in page mode, read-only in
 * chunk mode, shared with the snapshot either way) or to nothing; a view of
 * the snapshot's own segment just drops its private pages (MADV_DONTNEED on
 * a private file mapping: the segment shows through again, and only chunks
 * with page tables cost anything).  O(chunks); no data is copied. */
int odf_snapshot_restore(odf_arena_t *a, uint64_t id)
{
    int rc;
    ODF_LOCKED(a, rc, {
        uint32_t k = find_snap(a, id);
        if (k == ODF_NONE) {
            rc = ENOENT;
        } else {
            odf_slot_t *s = &a->slots[k], *me = &a->slots[a->self];
            uint32_t *spt = ODF_PT(a, k);
            uint32_t hi = a->hi > s->hi ? a->hi : s->hi;
            for (uint32_t c = 0; c < hi && !rc; c++) {
                uint32_t want = c < s->hi ? spt[c] : 0, have = a->mypt[c];
                uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
                if (want == have) {
                    if (a->flags[c] & ODF_F_VIEW) {
                        uint32_t n = 1; /* a run of such views: one call */
                        while (c + n < hi && (a->flags[c + n] & ODF_F_VIEW) &&
                               a->mypt[c + n] == (c + n < s->hi ? spt[c + n] : 0))
                            n++;
                        if (madvise((void *)addr, (size_t)n << ODF_CHUNK_SHIFT, MADV_DONTNEED))
                            rc = errno;
                        c += n - 1;
                    }
                    continue;
                }
                if (!want)
                    rc = _odf_reserve(addr, ODF_CHUNK_SIZE);
                else if (a->page_cow)
                    rc = _odf_map_view(a, addr, want - 1, ODF_CHUNK_SIZE);
                else
                    rc = _odf_map_seg(a, addr, want - 1, PROT_READ, 0);
                if (rc)
                    break;
                if (a->flags[c] & ODF_F_PARKED)
                    _odf_reserve(a->shadow + ((uintptr_t)c << ODF_CHUNK_SHIFT), ODF_CHUNK_SIZE);
                ODF_SET_STATE(a, c, want && a->page_cow ? ODF_F_VIEW : 0);
                if (want)
                    a->refcnt[want - 1]++;
                a->mypt[c] = want;
                if (have)
                    _odf_seg_decref(a, have - 1);
            }
            if (s->hi > me->hi)
                me->hi = a->hi = s->hi;
        }
    });
    return rc;
}
