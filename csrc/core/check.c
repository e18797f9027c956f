/* check.c - what the core reports about itself: stats, the invariant check,
 * and the test hooks that break an invariant on purpose (_odf_debug_break).
 *
 * Above family.c and cow.c (it reads their state); nothing calls into it
 * but the public API.
 */
#include "internal.h"
#include "odfork_debug.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int odf_arena_resident(odf_arena_t *a, uintptr_t addr, size_t len, size_t *out)
{
    *out = 0;
    if (addr < a->base || addr + len > a->base + a->size || addr + len < addr)
        return EINVAL;
    if (len == 0)
        return 0;
    uint32_t c0 = (uint32_t)((addr - a->base) >> ODF_CHUNK_SHIFT);
    uint32_t c1 = (uint32_t)((addr + len - 1 - a->base) >> ODF_CHUNK_SHIFT);
    size_t n = 0;
    int rc;
    ODF_LOCKED(a, rc, {
        for (uint32_t c = c0; c <= c1; c++)
            n += a->mypt[c] != 0;
    });
    *out = n << ODF_CHUNK_SHIFT;
    return rc;
}

int odf_arena_stats(odf_arena_t *a, odf_stats_t *out)
{
    int rc;
    memset(out, 0, sizeof(*out));
    ODF_LOCKED(a, rc, {
        _odf_reap_locked(a);
        _odf_trim_locked(a, UINT32_MAX);
        out->chunks = a->nchunks;
        out->cow_copies = a->n_cow;
        out->bytes_copied = a->n_bytes;
        int pm_fd = -1;
        for (uint32_t c = 0; c < a->hi; c++) {
            if (a->mypt[c]) {
                out->chunks_resident++;
                if (a->refcnt[a->mypt[c] - 1] > 1)
                    out->chunks_shared++;
            }
            if (a->flags[c] & ODF_F_VIEW) {
                /* the kernel's page copies: counted where they live now */
                out->views++;
                if (pm_fd < 0)
                    pm_fd = _odf_open_pagemap();
                uint32_t n = _odf_view_copied_pages(a, c, pm_fd);
                out->cow_copies += n > 0;
                out->bytes_copied += (uint64_t)n * 4096;
            }
        }
        if (pm_fd >= 0)
            close(pm_fd);
        out->faults = a->n_faults;
        out->reuses = a->n_reuse;
        out->forks = a->n_forks;
        out->folds = a->n_folds;
        out->returns = a->n_returns;
        out->segments_live = a->ctl->segments_live;
        out->segments_max = a->ctl->max_segs;
        for (uint32_t i = 0; i < a->ctl->slot_hwm; i++)
            if (ODF_SG_STATE(atomic_load(&a->slots[i].sg)) != ODF_SLOT_FREE)
                out->slots_used++;
    });
    return rc;
}

/* The invariant check (internal.h, "Invariants"), in four parts, each
 * returning 0 or EUCLEAN with what broke written into msg. */
__attribute__((format(printf, 3, 4))) static int broken(char *msg, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
    return EUCLEAN;
}

/* cnt[s] = the slots whose page table holds s, plus the pins on s. */
static int count_holders(odf_arena_t *a, uint32_t nseg, uint32_t *cnt, char *msg, size_t len)
{
    odf_ctl_t *ctl = a->ctl;
    for (uint32_t i = 0; i < ctl->slot_hwm; i++) {
        odf_slot_t *s = &a->slots[i];
        uint32_t st = ODF_SG_STATE(atomic_load(&s->sg));
        uint32_t *pt = ODF_PT(a, i);
        if (st == ODF_SLOT_FREE || st == ODF_SLOT_DYING) {
            for (uint32_t c = 0; c < ctl->nchunks; c++)
                if (pt[c])
                    return broken(msg, len, "free slot %u holds chunk %u -> segment %u", i, c, pt[c] - 1);
            continue;
        }
        for (uint32_t c = 0; c < ctl->nchunks; c++) {
            if (!pt[c])
                continue;
            if (c >= s->hi || pt[c] - 1 >= nseg)
                return broken(msg, len, "slot %u chunk %u: entry %u out of range (hi %u, segments %u)", i, c, pt[c],
                              s->hi, nseg);
            cnt[pt[c] - 1]++;
        }
        if (s->pin)
            cnt[s->pin - 1]++;
    }
    return 0;
}

/* isfree[s] = s is on the free stack or the kept (dirty) stack, each once. */
static int mark_stack(const uint32_t *stack, uint32_t n, const char *what, uint32_t nseg, uint8_t *isfree, char *msg,
                      size_t len)
{
    for (uint32_t k = 0; k < n; k++) {
        uint32_t s = stack[k];
        if (s >= nseg || isfree[s])
            return broken(msg, len, "%s entry %u (segment %u) is out of range or repeated", what, k, s);
        isfree[s] = 1;
    }
    return 0;
}

/* Every segment's count is its holders; a segment is free iff nobody holds it. */
static int check_counts(odf_arena_t *a, uint32_t nseg, const uint32_t *cnt, const uint8_t *isfree, char *msg,
                        size_t len)
{
    odf_ctl_t *ctl = a->ctl;
    for (uint32_t s = 0; s < nseg; s++) {
        if (cnt[s] != a->refcnt[s])
            return broken(msg, len, "segment %u: count %u but %u holders", s, a->refcnt[s], cnt[s]);
        if ((cnt[s] == 0) != isfree[s])
            return broken(msg, len, "segment %u: %u holders but %s the free stack", s, cnt[s],
                          isfree[s] ? "on" : "not on");
    }
    if (ctl->segments_live != (uint64_t)nseg - ctl->nfree - ctl->ndirty)
        return broken(msg, len, "segments_live %llu != %u allocated", (unsigned long long)ctl->segments_live,
                      nseg - ctl->nfree - ctl->ndirty);
    return 0;
}

/* This process's chunks: mapped only what its page table says, OWNED only
 * where the segment is its alone, and no fold left half done. */
static int check_chunks(odf_arena_t *a, char *msg, size_t len)
{
    static const char *const names[] = {"NONE", "OWNED", "VIEW", "LOCKED", "FOLDING"};
    for (uint32_t c = 0; c < a->nchunks; c++) {
        uint8_t f = a->flags[c];
        uint32_t e = a->mypt[c];
        odf_chunk_state_t st = _odf_chunk_state(a, c);
        if (!e && (f & (ODF_F_OWNED | ODF_F_PARKED | ODF_F_VIEW | ODF_F_FOLDING)))
            return broken(msg, len, "chunk %u: mapped (flags %u) but not in the page table", c, f);
        if (st == ODF_CHUNK_FOLDING)
            return broken(msg, len, "chunk %u: left %s", c, names[st]);
        if (st == ODF_CHUNK_OWNED && a->refcnt[e - 1] != 1)
            return broken(msg, len, "chunk %u: %s while segment %u is shared (count %u)", c, names[st], e - 1,
                          a->refcnt[e - 1]);
        if (st == ODF_CHUNK_OWNED && (f & (ODF_F_PARKED | ODF_F_VIEW)))
            return broken(msg, len, "chunk %u: OWNED and parked or a VIEW (flags %u)", c, f);
    }
    return 0;
}

static int check_locked(odf_arena_t *a, char *msg, size_t len)
{
    odf_ctl_t *ctl = a->ctl;
    uint32_t nseg = ctl->seg_hwm;
    if (ctl->magic != ODF_CTL_MAGIC)
        return broken(msg, len, "control block magic is wrong");
    uint32_t *cnt = calloc(nseg ? nseg : 1, sizeof(uint32_t));
    uint8_t *isfree = calloc(nseg ? nseg : 1, 1);
    int rc = ENOMEM;
    if (cnt && isfree && !(rc = count_holders(a, nseg, cnt, msg, len)) &&
        !(rc = mark_stack(a->freestack, ctl->nfree, "free stack", nseg, isfree, msg, len)) &&
        !(rc = mark_stack(a->dirty, ctl->ndirty, "kept-segment", nseg, isfree, msg, len)) &&
        !(rc = check_counts(a, nseg, cnt, isfree, msg, len)))
        rc = check_chunks(a, msg, len);
    free(cnt);
    free(isfree);
    return rc;
}

int odf_arena_check(odf_arena_t *a, char *msg, size_t msglen)
{
    int rc;
    msg[0] = 0;
    ODF_LOCKED(a, rc, {
        _odf_reap_locked(a);
        _odf_trim_locked(a, UINT32_MAX);
        rc = check_locked(a, msg, msglen);
    });
    return rc;
}

int _odf_debug_break(odf_arena_t *a, int what, uint32_t chunk)
{
    if (what == ODF_DEBUG_FOLD_DELAY) {
        a->fold_delay_ms = chunk;
        return 0;
    }
    if (chunk >= a->nchunks)
        return EINVAL;
    int rc;
    if (what == ODF_DEBUG_EXTRA_REF) {
        ODF_LOCKED(a, rc, {
            if (a->mypt[chunk])
                a->refcnt[a->mypt[chunk] - 1]++;
        });
        return rc;
    }
    if (what == ODF_DEBUG_DROP_EXTRA_REF) {
        ODF_LOCKED(a, rc, {
            if (a->mypt[chunk] && a->refcnt[a->mypt[chunk] - 1] > 1)
                a->refcnt[a->mypt[chunk] - 1]--;
        });
        return rc;
    }
    if (what == ODF_DEBUG_DIE_LOCKED) {
        sigset_t old;
        _odf_block_signals(&old);
        pthread_mutex_lock(&a->local);
        _odf_family_lock(a);
        if (a->mypt[chunk])
            a->refcnt[a->mypt[chunk] - 1] += 5;
        kill(getpid(), SIGKILL);
        for (;;)
            pause();
    }
    if (what == ODF_DEBUG_CRASH_IN_HANDLER) {
        a->crash_in_handler = 1;
        return 0;
    }
    if (what == ODF_DEBUG_BROKEN_COW) {
        a->broken_cow = 1;
        return 0;
    }
    return EINVAL;
}
