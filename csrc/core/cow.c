/* cow.c - what a write to a chunk costs: resolving a write fault (first
 * touch, whole-chunk copy on first write, reuse at count 1: _odf_fault and the
 * prepare_write/populate/release operations over it), and in page mode the
 * VIEW chunks: folding them back into segments, and counting the pages the
 * kernel copied for them.
 *
 * A VIEW (internal.h) is a MAP_PRIVATE mapping of its segment: its bytes are
 * the segment's except where a write made the kernel copy a page into private
 * anonymous memory.  Those pages cost at the next fork (the kernel copies the
 * page-table entries of a VMA that has private pages) and a snapshot cannot
 * share them, so a view is folded:
 *   in place, when the segment's count is back to 1, a batch of views at a
 *     time (fold_run: one lock hold, one hold of writers, up to FOLD_BATCH
 *     chunks or FOLD_BATCH_PAGES pages): the private pages of the whole
 *     range are found with one PAGEMAP_SCAN (the pagemap read chunk by chunk
 *     where the kernel lacks it), copied into the segments (memcpy through
 *     the parked mapping in the shadow, which is the segment mapped shared;
 *     pwrite for a view with none), then the segments are mapped in place of
 *     the views (the parked mappings moved back, one mremap per run where
 *     the kernel moves several VMAs at once);
 *   into a new segment, when it is still shared (snapshots need it): the
 *     whole 2 MiB read through the view into a new segment.
 * Writers are held off between the copy and the remap (uffd.c).  Where they
 * cannot be (no full userfaultfd and another thread running: EAGAIN), the
 * view stays a view: the next fork copies its entries, as os.fork would, and
 * a snapshot gets a copy of the chunk of its own (snapshot.c).
 *
 * Pre for the folds: a->local and the family lock held, signals blocked
 * (_odf_fault: a->local, see its comment).  Nothing here writes arena memory;
 * it is only read (memcpy or pwrite from the view, or from a chunk being
 * copied), which a write-protected range allows; a fold in place writes the
 * segment through the shadow's parked mapping (MAP_SHARED, populated,
 * writable: no SIGSEGV), and only while the segment's count is 1 under the
 * family lock, which a fork or a snapshot needs to raise it.  Everything _odf_fault
 * reaches is async-signal-safe: the SIGSEGV handler calls it.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define PAGE         4096UL
#define NPAGES       (ODF_CHUNK_SIZE / PAGE)
#define PM_PRESENT   (1ULL << 63)
#define PM_SWAPPED   (1ULL << 62)
#define PM_FILE      (1ULL << 61) /* file page or shared anonymous: not a private copy */
#define PM_EXCLUSIVE (1ULL << 56) /* mapped by this process only */
#define PM_UFFD_WP   (1ULL << 57) /* write-protected: a swap-like marker on a page never mapped */

static int open_pagemap(void) { return open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC); }

/* pagemap entries of chunk c into pm[NPAGES]; 0 or errno. */
static int read_pagemap(odf_arena_t *a, int pm_fd, uint32_t c, uint64_t *pm)
{
    uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    size_t want = NPAGES * sizeof(uint64_t), got = 0;
    off_t off = (off_t)(addr / PAGE * sizeof(uint64_t));
    while (got < want) {
        ssize_t n = pread(pm_fd, (char *)pm + got, want - got, off + (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EIO;
        got += (size_t)n;
    }
    return 0;
}

static int is_private(uint64_t e) { return ((e & PM_PRESENT) && !(e & PM_FILE)) || (e & PM_SWAPPED); }

static uint32_t count_private(const uint64_t *pm, uint32_t *copied)
{
    uint32_t n = 0, mine = 0;
    for (uint32_t i = 0; i < NPAGES; i++) {
        if (is_private(pm[i])) {
            n++;
            mine += (pm[i] & PM_EXCLUSIVE) || (pm[i] & PM_SWAPPED);
        }
    }
    if (copied)
        *copied = mine;
    return n;
}

int _odf_open_pagemap(void) { return open_pagemap(); }

uint32_t _odf_view_copied_pages(odf_arena_t *a, uint32_t c, int pm_fd)
{
    uint64_t pm[NPAGES];
    uint32_t copied = 0;
    if (pm_fd >= 0 && read_pagemap(a, pm_fd, c, pm) == 0)
        count_private(pm, &copied);
    return copied;
}

/* ---- Finding the private pages of a range of views ----
 *
 * PAGEMAP_SCAN (an ioctl on /proc/self/pagemap, Linux 6.7+) reports the
 * private pages of a whole range in one call, as runs; where the kernel lacks
 * it (ENOTTY, EINVAL) the pagemap is read chunk by chunk instead.  The types
 * are ours (older headers lack them); the layout is the kernel ABI's. */
struct odf_pm_region {
    uint64_t start, end, categories;
};
struct odf_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define ODF_PAGEMAP_SCAN _IOWR('f', 16, struct odf_pm_scan_arg)
#define PS_WRITTEN       (1ULL << 1) /* not write-protected (uffd-wp) */
#define PS_FILE          (1ULL << 2)
#define PS_PRESENT       (1ULL << 3)
#define PS_SWAPPED       (1ULL << 4) /* also a write-protect marker on a page never mapped */

static _Atomic int scan_missing; /* the kernel has no PAGEMAP_SCAN: read the pagemap */

#define BITW (NPAGES / 64) /* bitmap words per chunk */

static void set_bits(uint64_t *bits, size_t from, size_t to)
{
    for (size_t k = from; k < to; k++)
        bits[k / 64] |= 1ULL << (k % 64);
}

static uint32_t chunk_bits(const uint64_t *bits)
{
    uint32_t n = 0;
    for (uint32_t w = 0; w < BITW; w++)
        n += (uint32_t)__builtin_popcountll(bits[w]);
    return n;
}

/* Set in bits (BITW words per chunk, from chunk c0) the private pages of
 * chunks [c0, c0+n): present or swapped, and not file pages.  held: writers
 * are held off by userfaultfd write-protect, which leaves a marker on every
 * page never mapped that reads as swapped and write-protected: those are
 * skipped (a swapped page then counts only if it is not write-protected; the
 * caller unions this with a read made before the hold, as the pagemap path
 * always did).  Bits are only ever set.  0, or errno when the pages cannot
 * be found (the caller then copies every page). */
static int scan_private(odf_arena_t *a, int pm_fd, uint32_t c0, uint32_t n, uint64_t *bits, int held)
{
    uintptr_t start = a->base + ((uintptr_t)c0 << ODF_CHUNK_SHIFT);
    uintptr_t end = start + ((uintptr_t)n << ODF_CHUNK_SHIFT);
    if (pm_fd < 0)
        return EBADF;
    if (!atomic_load_explicit(&scan_missing, memory_order_relaxed)) {
        struct odf_pm_region vec[64];
        struct odf_pm_scan_arg arg = {
            .size = sizeof(arg),
            .start = start,
            .end = end,
            .vec = (uintptr_t)vec,
            .vec_len = sizeof(vec) / sizeof(vec[0]),
            .category_inverted = PS_FILE, /* FILE must be clear */
            .category_mask = PS_FILE,
            .category_anyof_mask = PS_PRESENT | PS_SWAPPED,
            .return_mask = PS_PRESENT | PS_SWAPPED | PS_WRITTEN,
        };
        for (;;) {
            long r = ioctl(pm_fd, ODF_PAGEMAP_SCAN, &arg);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != ENOTTY && errno != EINVAL)
                    return errno;
                atomic_store_explicit(&scan_missing, 1, memory_order_relaxed);
                break;
            }
            for (long i = 0; i < r; i++) {
                uint64_t cat = vec[i].categories;
                if (held && !(cat & PS_PRESENT) && !(cat & PS_WRITTEN))
                    continue; /* a write-protect marker (or a write-protected swapped page the first read saw) */
                set_bits(bits, (vec[i].start - start) / PAGE, (vec[i].end - start) / PAGE);
            }
            if (arg.walk_end >= end || arg.walk_end <= arg.start)
                return arg.walk_end >= end ? 0 : EIO;
            arg.start = arg.walk_end;
        }
    }
    uint64_t pm[NPAGES];
    for (uint32_t i = 0; i < n; i++) {
        int rc = read_pagemap(a, pm_fd, c0 + i, pm);
        if (rc)
            return rc;
        for (uint32_t k = 0; k < NPAGES; k++)
            if (is_private(pm[k]) && !(held && (pm[k] & PM_SWAPPED) && (pm[k] & PM_UFFD_WP)))
                bits[i * BITW + k / 64] |= 1ULL << (k % 64);
    }
    return 0;
}

/* Chunks per fold batch (one lock hold, one hold of writers), and the pages
 * a batch copies at most (it stops taking chunks beyond; one chunk's worth,
 * 0.3-0.9 ms of copying here): a fault or a fork waits for one batch at most. */
#define FOLD_BATCH       64u
#define FOLD_BATCH_PAGES 512u

/* The background step's rule for views with many private pages: see
 * odf_arena_fold_step. */
#define FOLD_HOT_PAGES 64u
#define FOLD_QUIET_NS  (2ULL * 1000000000ULL)

/* Copy the private pages (bits) of chunk c into its segment seg: through the
 * parked mapping in the shadow (MAP_SHARED of seg, populated, writable) when
 * the chunk has one, else with pwrite, one per run of pages.  wfd: a
 * read-write pool descriptor, or -1 (_odf_pool_write then).  0 or errno. */
static int copy_private(odf_arena_t *a, uint32_t c, uint32_t seg, const uint64_t *bits, int wfd)
{
    uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    uintptr_t sh = a->shadow + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    off_t base = (off_t)seg << ODF_CHUNK_SHIFT;
    int parked = (a->flags[c] & ODF_F_PARKED) != 0;
    for (uint32_t i = 0; i < NPAGES;) {
        if (!(bits[i / 64] >> (i % 64) & 1)) {
            i++;
            continue;
        }
        uint32_t j = i;
        while (j < NPAGES && (bits[j / 64] >> (j % 64) & 1))
            j++;
        size_t len = (size_t)(j - i) * PAGE;
        if (parked) {
            memcpy((void *)(sh + i * PAGE), (const void *)(addr + i * PAGE), len);
        } else {
            int rc = wfd >= 0 ? _odf_pwrite_all(wfd, (const void *)(addr + i * PAGE), len, base + (off_t)(i * PAGE))
                              : _odf_pool_write(a, (const void *)(addr + i * PAGE), len, base + (off_t)(i * PAGE));
            if (rc)
                return rc;
        }
        i = j;
    }
    return 0;
}

/* Can mremap move a range that spans several VMAs (Linux 6.17+)?  Before,
 * such a move fails with EFAULT, possibly after unmapping the destination;
 * it is then not tried at all. */
static int multi_move(void)
{
    static _Atomic int known; /* 0 unknown, 1 no, 2 yes */
    int v = atomic_load_explicit(&known, memory_order_relaxed);
    if (!v) {
        struct utsname u;
        unsigned maj = 0, min = 0;
        const char *p = u.release;
        if (uname(&u) == 0) {
            while (*p >= '0' && *p <= '9')
                maj = maj * 10 + (unsigned)(*p++ - '0');
            if (*p == '.')
                for (p++; *p >= '0' && *p <= '9'; p++)
                    min = min * 10 + (unsigned)(*p - '0');
        }
        v = (maj > 6 || (maj == 6 && min >= 17)) ? 2 : 1;
        atomic_store_explicit(&known, v, memory_order_relaxed);
    }
    return v == 2;
}

/* Move the parked mappings of chunks [c, c+n) back over the arena with one
 * mremap, then put the reservation back in the shadow.  0 or errno; on
 * failure (a move may have been partial) the caller moves chunk by chunk. */
static int unpark_run(odf_arena_t *a, uint32_t c, uint32_t n)
{
    uintptr_t off = (uintptr_t)c << ODF_CHUNK_SHIFT;
    size_t len = (size_t)n << ODF_CHUNK_SHIFT;
    if (mremap((void *)(a->shadow + off), len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(a->base + off)) ==
        MAP_FAILED)
        return errno;
    _odf_reserve(a->shadow + off, len);
    return 0;
}

static void folded_one(odf_arena_t *a, uint32_t c, uint32_t d, uint32_t *nfolded)
{
    ODF_SET_STATE(a, c, ODF_F_OWNED);
    a->n_cow += d > 0;
    a->n_bytes += (uint64_t)d * PAGE * 2; /* the kernel's copies, then ours */
    a->n_reuse++;
    a->n_folds++;
    (*nfolded)++;
}

/* Fold in place VIEW chunks of [c0, c0+n), each of a segment whose count is 1
 * (the caller checked, under the family lock): each chunk's private pages
 * are copied into its segment, then the segment is mapped in place of the
 * view (the parked entries moved back when the chunk has them).  A chunk with
 * fewer than min_dirty or more than max_dirty private pages stays a view, and
 * so does an unparked one with none (its segment holds its bytes already).  Chunks are taken in order
 * until FOLD_BATCH_PAGES pages are to be copied; *done says how many were
 * considered (the caller goes on from there), *nfolded how many were folded.
 *
 * hold: hold writers off the folded range (_odf_writers_hold) from before the
 * final look at the pages to after the remap.  0 only when no one else can
 * write: this thread, with every signal blocked, is the process's only one.
 * EAGAIN when writers cannot be held off: nothing done.  On another error the
 * chunks folded so far are folded and the rest stay views.
 * pre: a->local and the family lock held. */
static int fold_run(odf_arena_t *a, uint32_t c0, uint32_t n, uint32_t min_dirty, uint32_t max_dirty, int hold,
                    uint32_t *done, uint32_t *nfolded)
{
    uint64_t bits[FOLD_BATCH * BITW];
    uint8_t pick[FOLD_BATCH];
    *nfolded = 0;
    if (n > FOLD_BATCH)
        n = FOLD_BATCH;
    memset(bits, 0, (size_t)n * BITW * sizeof(uint64_t));
    int pm_fd = open_pagemap();
    int known = scan_private(a, pm_fd, c0, n, bits, 0) == 0;
    uint32_t first = n, last = 0, pages = 0, i;
    for (i = 0; i < n; i++) {
        uint32_t d = known ? chunk_bits(bits + i * BITW) : NPAGES;
        pick[i] = d >= min_dirty && d <= max_dirty && (d > 0 || (a->flags[c0 + i] & ODF_F_PARKED));
        if (d > max_dirty && d > FOLD_HOT_PAGES)
            a->flags[c0 + i] |= ODF_F_HOT; /* (not when a caller takes only clean views) */
        if (pick[i] && pages > 0 && pages + d > FOLD_BATCH_PAGES)
            break; /* the next batch's */
        if (pick[i]) {
            pages += d;
            if (first == n)
                first = i;
            last = i;
        }
    }
    *done = i;
    if (first == n) {
        if (pm_fd >= 0)
            close(pm_fd);
        return 0;
    }
    if (!known)
        memset(bits, 0xff, (size_t)n * BITW * sizeof(uint64_t));
    if (a->fold_delay_ms) { /* test hook (_odf_debug_break): widen the window before the hold */
        struct timespec ts = {a->fold_delay_ms / 1000, (long)(a->fold_delay_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    uintptr_t h0 = a->base + ((uintptr_t)(c0 + first) << ODF_CHUNK_SHIFT);
    size_t hlen = (size_t)(last - first + 1) << ODF_CHUNK_SHIFT;
    int token = ODF_HOLD_NONE, rc = 0;
    if (hold && (rc = _odf_writers_hold(h0, hlen, &token))) {
        if (pm_fd >= 0)
            close(pm_fd);
        return rc;
    }
    for (i = first; i <= last; i++)
        if (pick[i])
            a->flags[c0 + i] |= ODF_F_FOLDING;
    /* Look again now that no page can be added (pages written between the
     * first look and the hold); with no one else to write, the first holds. */
    if (token != ODF_HOLD_NONE && known && scan_private(a, pm_fd, c0 + first, last - first + 1, bits + first * BITW, 1))
        memset(bits, 0xff, (size_t)n * BITW * sizeof(uint64_t));
    if (pm_fd >= 0)
        close(pm_fd);
    int wfd = -1;
    for (i = first; i <= last && wfd < 0; i++)
        if (pick[i] && !(a->flags[c0 + i] & ODF_F_PARKED) && _odf_pool_rw(a, &wfd))
            break; /* no descriptor: _odf_pool_write finds another way */
    /* Copy every picked chunk's pages first, then remap them: parked runs
     * move back with one mremap each where the kernel moves several VMAs at
     * once (multi_move). */
    uint32_t at = first, copied_to = first;
    int crc = 0;
    for (; copied_to <= last; copied_to++)
        if (pick[copied_to] &&
            (crc = copy_private(a, c0 + copied_to, a->mypt[c0 + copied_to] - 1, bits + copied_to * BITW, wfd)))
            break;
    for (; at < copied_to; at++) {
        uint32_t c = c0 + at;
        if (!pick[at])
            continue;
        uint32_t seg = a->mypt[c] - 1, d = chunk_bits(bits + at * BITW);
        uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
        if (a->flags[c] & ODF_F_PARKED) {
            uint32_t e = at + 1;
            while (e < copied_to && pick[e] && (a->flags[c0 + e] & ODF_F_PARKED))
                e++;
            if (e - at > 1 && multi_move() && unpark_run(a, c, e - at) == 0) {
                for (uint32_t k = at; k < e; k++)
                    folded_one(a, c0 + k, chunk_bits(bits + k * BITW), nfolded);
                at = e - 1;
                continue;
            }
            if (_odf_unpark(a, c)) {
                /* the segment holds the chunk's bytes now: map it in place
                 * and drop the parked mapping (whatever a failed move left) */
                if ((rc = _odf_map_seg(a, addr, seg, PROT_READ | PROT_WRITE, 0)))
                    break;
                _odf_reserve(a->shadow + ((uintptr_t)c << ODF_CHUNK_SHIFT), ODF_CHUNK_SIZE);
            }
        } else if ((rc = _odf_map_seg(a, addr, seg, PROT_READ | PROT_WRITE, 0))) {
            break;
        }
        folded_one(a, c, d, nfolded);
    }
    if (!rc)
        rc = crc; /* a failed copy: the chunks from it on stay views */
    if (wfd >= 0)
        _odf_pool_rw_done(a, wfd);
    /* Chunks not folded stay views (after a failed copy or remap, their
     * segment may hold some of their pages: harmless, the view still shows
     * them and nobody else maps the segment); writable again under an
     * mprotect hold. */
    for (i = first; i <= last; i++) {
        if (!(a->flags[c0 + i] & ODF_F_VIEW))
            continue;
        a->flags[c0 + i] &= (uint8_t)~ODF_F_FOLDING;
        if (token == ODF_HOLD_PROT)
            mprotect((void *)(a->base + ((uintptr_t)(c0 + i) << ODF_CHUNK_SHIFT)), ODF_CHUNK_SIZE,
                     PROT_READ | PROT_WRITE);
    }
    if (hold)
        _odf_writers_resume(token);
    return rc;
}

/* Undo a hold that is being abandoned: the view is writable again. */
static void resume_view(uintptr_t addr, int token)
{
    if (token == ODF_HOLD_PROT)
        mprotect((void *)addr, ODF_CHUNK_SIZE, PROT_READ | PROT_WRITE);
    _odf_writers_resume(token);
}

static int fold_shared(odf_arena_t *a, uint32_t c, uint32_t seg, const uint64_t *pm)
{
    uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    uint32_t nseg, copied = 0;
    int token, rc = _odf_seg_alloc(a, &nseg, 1);
    if (rc)
        return rc;
    count_private(pm, &copied);
    if ((rc = _odf_writers_hold(addr, ODF_CHUNK_SIZE, &token))) {
        _odf_seg_decref(a, nseg);
        return rc;
    }
    a->flags[c] |= ODF_F_FOLDING;
    /* pwrite reads the view: private pages from memory, the rest from seg */
    if ((rc = _odf_pool_write(a, (const void *)addr, ODF_CHUNK_SIZE, (off_t)nseg << ODF_CHUNK_SHIFT)) ||
        (rc = _odf_map_seg(a, addr, nseg, PROT_READ | PROT_WRITE, 1))) {
        _odf_seg_decref(a, nseg);
        a->flags[c] &= (uint8_t)~ODF_F_FOLDING;
        resume_view(addr, token);
        return rc;
    }
    if (a->flags[c] & ODF_F_PARKED)
        _odf_reserve(a->shadow + ((uintptr_t)c << ODF_CHUNK_SHIFT), ODF_CHUNK_SIZE);
    a->mypt[c] = nseg + 1;
    _odf_seg_decref(a, seg);
    ODF_SET_STATE(a, c, ODF_F_OWNED);
    _odf_writers_resume(token);
    a->n_cow++;
    a->n_bytes += (uint64_t)copied * PAGE + ODF_CHUNK_SIZE;
    a->n_folds++;
    return 0;
}

int _odf_copy_view_locked(odf_arena_t *a, uint32_t c, uint32_t *nseg)
{
    uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    int rc = _odf_seg_alloc(a, nseg, 1);
    if (rc)
        return rc;
    /* pwrite reads the view (private pages from memory, the rest from its
     * segment); the view itself is left as it is, writers and all */
    if ((rc = _odf_pool_write(a, (const void *)addr, ODF_CHUNK_SIZE, (off_t)*nseg << ODF_CHUNK_SHIFT)))
        _odf_seg_decref(a, *nseg);
    else
        a->n_bytes += ODF_CHUNK_SIZE;
    return rc;
}

int _odf_fold_locked(odf_arena_t *a, uint32_t c, uint32_t max_dirty, int shared, int *folded)
{
    *folded = 0;
    if (!(a->flags[c] & ODF_F_VIEW) || !a->mypt[c] || (a->flags[c] & ODF_F_USERPROT))
        return 0; /* (a fold would remap the program's protections away, and may not read them) */
    uint32_t seg = a->mypt[c] - 1;
    if (a->refcnt[seg] > 1)
        _odf_reap_locked(a); /* a sharer may have died: then it is ours alone */
    if (a->refcnt[seg] == 1) {
        uint32_t done, nf;
        int rc = fold_run(a, c, 1, 0, max_dirty, 1, &done, &nf);
        *folded = rc == 0 && nf == 1;
        return rc;
    }
    if (!shared)
        return 0;
    uint64_t pm[NPAGES];
    int pm_fd = open_pagemap();
    if (pm_fd < 0 || read_pagemap(a, pm_fd, c, pm))
        for (uint32_t i = 0; i < NPAGES; i++)
            pm[i] = PM_PRESENT | PM_EXCLUSIVE;
    if (pm_fd >= 0)
        close(pm_fd);
    if (count_private(pm, NULL) == 0)
        return 0; /* the segment holds the chunk's bytes already */
    int rc = fold_shared(a, c, seg, pm);
    *folded = rc == 0;
    return rc;
}

/* Fold the views of count 1 from chunk *c on, one batch under one lock hold
 * (fold_run); *c is advanced past what was considered, to a->hi when nothing
 * is left.  pre: none (takes the locks).  EAGAIN: writers cannot be held off. */
#define FOLDABLE(a, c, skip_hot)                                                                                       \
    (((a)->flags[c] & (ODF_F_VIEW | ODF_F_USERPROT | ((skip_hot) ? ODF_F_HOT : 0))) == ODF_F_VIEW && (a)->mypt[c] &&   \
     (a)->refcnt[(a)->mypt[c] - 1] == 1)

/* One batch (fold_run) of the foldable views from chunk *c on, advancing *c
 * past what was considered (to a->hi when nothing is left).  pre: a->local
 * and the family lock. */
static int fold_batch_locked(odf_arena_t *a, uint32_t *c, uint32_t min_dirty, uint32_t max_dirty, int skip_hot,
                             int hold)
{
    uint32_t s = *c;
    while (s < a->hi && !FOLDABLE(a, s, skip_hot))
        s++;
    uint32_t e = s;
    while (e < a->hi && e - s < FOLD_BATCH && FOLDABLE(a, e, skip_hot))
        e++;
    uint32_t done = 0, nf;
    int rc = e > s ? fold_run(a, s, e - s, min_dirty, max_dirty, hold, &done, &nf) : 0;
    *c = e > s ? s + (done ? done : 1) : a->hi;
    return rc;
}

static int fold_next_batch(odf_arena_t *a, uint32_t *c, uint32_t max_dirty, int skip_hot)
{
    int rc;
    ODF_LOCKED(a, rc, rc = fold_batch_locked(a, c, 0, max_dirty, skip_hot, 1));
    return rc;
}

static int any_shared_view(odf_arena_t *a)
{
    for (uint32_t c = 0; c < a->hi; c++) {
        if (!(__atomic_load_n(&a->flags[c], __ATOMIC_RELAXED) & ODF_F_VIEW))
            continue;
        uint32_t e = __atomic_load_n(&a->mypt[c], __ATOMIC_RELAXED);
        if (e && __atomic_load_n(&a->refcnt[e - 1], __ATOMIC_RELAXED) > 1)
            return 1;
    }
    return 0;
}

/* The background step leaves a view with more than FOLD_HOT_PAGES private
 * pages to the kernel's copy-on-write while this process forked less than
 * FOLD_QUIET_NS ago.  Measured here (fork_after_writes.py, fold_bench.py):
 * folding costs ~5-10 us a view plus a memcpy (0.5-1.7 us) a page, and after
 * the next fork every page of a folded view faults again when written (2.5-4
 * us), while leaving a view to the kernel costs its page-table copy at each
 * fork (~2.6 us a view plus ~0.07 us a page) and no fault once the child is
 * gone.  A writer that rewrites a chunk every cycle therefore loses by folds
 * (fork after rewriting 64 MiB: 2.6-4 ms with them, 1.25 ms without, os.fork
 * 1.2 ms), and a process that forks often is such a writer or close to it.
 * Once it has not forked for FOLD_QUIET_NS, dense views are folded too (their
 * private pages double the chunk's memory).  arena.fold() and snapshots fold
 * every view. */

int odf_arena_fold_step(odf_arena_t *a, uint64_t budget_ns, uint32_t *left)
{
    /* Reap once, then fold views whose count is 1, one batch per lock hold,
     * until the budget is spent.  Which views those are is read first
     * without any lock (relaxed loads: a hint, checked again under the
     * locks), so that while a child shares every view (a save in progress)
     * a step costs a scan of memory, not syscalls. */
    uint64_t now = _odf_now_ns(), end = now + budget_ns;
    uint32_t pending = 0;
    int rc, hot = now - __atomic_load_n(&a->last_fork_ns, __ATOMIC_RELAXED) < FOLD_QUIET_NS;
    uint8_t skip = ODF_F_USERPROT | (hot ? ODF_F_HOT : 0); /* (a fold would remap the program's protections) */
    ODF_LOCKED(a, rc, _odf_reap_locked(a));
    for (uint32_t c = 0; c < a->hi && !rc;) {
        if ((__atomic_load_n(&a->flags[c], __ATOMIC_RELAXED) & (ODF_F_VIEW | skip)) != ODF_F_VIEW) {
            c++;
            continue;
        }
        uint32_t e = __atomic_load_n(&a->mypt[c], __ATOMIC_RELAXED);
        if (!e || __atomic_load_n(&a->refcnt[e - 1], __ATOMIC_RELAXED) != 1) {
            c++;
            continue; /* shared (or gone): not this step's */
        }
        if (_odf_now_ns() > end) {
            pending++;
            c++;
            continue;
        }
        rc = fold_next_batch(a, &c, hot ? FOLD_HOT_PAGES : ODF_FOLD_ANY, hot);
        if (rc == EAGAIN)
            return 0; /* writers cannot be held off now: no fold this step, none pending */
    }
    *left = pending;
    return rc;
}

int odf_arena_fold(odf_arena_t *a, uint32_t max_dirty)
{
    /* One batch per lock hold: a fault or a fork waits for one batch at most. */
    int rc = 0;
    if (any_shared_view(a))
        ODF_LOCKED(a, rc, _odf_reap_locked(a)); /* a sharer may have died: then they are ours alone */
    for (uint32_t c = 0; c < a->hi && !rc;)
        rc = fold_next_batch(a, &c, max_dirty, 0);
    return rc == EAGAIN ? 0 : rc; /* writers cannot be held off now: the views stay views */
}

/* Return the views of count 1 to OWNED when a child has gone (sigchld.c),
 * with writers needing no hold: this thread, with every signal blocked, is
 * the only one that may write the arena (the caller checked).
 * First every clean view: one whose segment only this process holds and
 * that has no private page shows exactly its segment's bytes, so its parked
 * mapping moves back over it (fold_run with no page to copy: one
 * PAGEMAP_SCAN and, where the kernel moves several VMAs at once, one mremap
 * per batch of FOLD_BATCH chunks).  The parent's next writes then go to its
 * segments, with no fault, and its next fork is O(runs) instead of copying
 * the page tables of every view written in between.  *n: how many.
 * Then, for at most budget_ns, views the process wrote while the child lived
 * are folded as the folder would (at most FOLD_HOT_PAGES private pages while
 * the process forks often): without a full userfaultfd there is no folder,
 * and this is where such views get folded at all. */
int _odf_views_return_locked(odf_arena_t *a, uint64_t budget_ns, uint32_t *n)
{
    int rc = 0;
    uint32_t done, nf;
    *n = 0;
    for (uint32_t c = 0; c < a->hi && !rc;) {
        if (!FOLDABLE(a, c, 0) || !(a->flags[c] & ODF_F_PARKED)) {
            c++;
            continue;
        }
        uint32_t e = c;
        while (e < a->hi && e - c < FOLD_BATCH && FOLDABLE(a, e, 0) && (a->flags[e] & ODF_F_PARKED))
            e++;
        rc = fold_run(a, c, e - c, 0, 0, 0, &done, &nf);
        *n += nf;
        c = e;
    }
    uint64_t now = _odf_now_ns(), end = now + budget_ns;
    int hot = now - a->last_fork_ns < FOLD_QUIET_NS;
    for (uint32_t c = 0; c < a->hi && !rc && _odf_now_ns() < end;)
        rc = fold_batch_locked(a, &c, 1, hot ? FOLD_HOT_PAGES : ODF_FOLD_ANY, hot, 0);
    return rc;
}

/* pwrite lets the kernel allocate the pool pages as it copies: no zeroing and
 * no 512 separate first-write faults. */
static int copy_chunk(odf_arena_t *a, uintptr_t src, uint32_t dst_seg)
{
    return _odf_pool_write(a, (const void *)src, ODF_CHUNK_SIZE, (off_t)dst_seg << ODF_CHUNK_SHIFT);
}

/* The three outcomes of a write fault on chunk c at addr.  pre: a->local and
 * the family lock held; each releases the family lock. */

/* First touch: a fresh (zero) segment, mapped writable. */
static int fault_fresh(odf_arena_t *a, uint32_t c, uintptr_t addr)
{
    odf_slot_t *me = &a->slots[a->self];
    uint32_t nseg;
    int rc = _odf_seg_alloc(a, &nseg, 0);
    if (rc) {
        _odf_family_unlock(a);
        return rc;
    }
    a->mypt[c] = nseg + 1;
    if (c >= me->hi)
        me->hi = a->hi = c + 1;
    _odf_family_unlock(a);
    if ((rc = _odf_map_seg(a, addr, nseg, PROT_READ | PROT_WRITE, 0))) {
        _odf_family_lock(a);
        a->mypt[c] = 0;
        _odf_seg_decref(a, nseg);
        _odf_family_unlock(a);
        return rc;
    }
    ODF_SET_STATE(a, c, ODF_F_OWNED);
    return 0;
}

/* The segment is ours alone: make the chunk writable where it is.  The count
 * cannot rise again without this process (fork and snapshot take a->local,
 * which we hold). */
static int fault_reuse(odf_arena_t *a, uint32_t c, uintptr_t addr)
{
    _odf_family_unlock(a);
    if (a->flags[c] & ODF_F_PARKED) {
        int rc = _odf_unpark(a, c);
        if (rc)
            return rc;
        a->flags[c] &= (uint8_t)~ODF_F_PARKED;
    } else if (mprotect((void *)addr, ODF_CHUNK_SIZE, PROT_READ | PROT_WRITE) < 0) {
        return errno;
    }
    ODF_SET_STATE(a, c, ODF_F_OWNED);
    a->n_reuse++;
    return 0;
}

/* Shared: copy segment seg into a new segment.  Our reference to the old one
 * moves to the pin so it stays alive (and counted) while we read it unlocked
 * (through the parked mapping when there is one, else the read-only chunk). */
static int fault_copy(odf_arena_t *a, uint32_t c, uint32_t seg, uintptr_t addr)
{
    odf_slot_t *me = &a->slots[a->self];
    uintptr_t sh = a->shadow + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    uint32_t nseg;
    int rc = _odf_seg_alloc(a, &nseg, 1);
    if (rc) {
        _odf_family_unlock(a);
        return rc;
    }
    a->mypt[c] = nseg + 1;
    me->pin = seg + 1;
    _odf_family_unlock(a);

    rc = copy_chunk(a, (a->flags[c] & ODF_F_PARKED) ? sh : addr, nseg);
    if (!rc)
        rc = _odf_map_seg(a, addr, nseg, PROT_READ | PROT_WRITE, 1);
    _odf_family_lock(a);
    if (rc) { /* undo: chunk c still maps seg, read-only */
        a->mypt[c] = seg + 1;
        me->pin = 0;
        _odf_seg_decref(a, nseg);
        _odf_family_unlock(a);
        return rc;
    }
    me->pin = 0;
    _odf_seg_decref(a, seg);
    _odf_family_unlock(a);
    if (a->flags[c] & ODF_F_PARKED)
        _odf_reserve(sh, ODF_CHUNK_SIZE); /* the parked mapping showed seg: drop it */
    ODF_SET_STATE(a, c, ODF_F_OWNED);
    a->n_cow++;
    a->n_bytes += ODF_CHUNK_SIZE;
    return 0;
}

/* pre: a->local held, signals blocked, chunk c is in the arena.
 * Makes chunk c writable in this process, preserving its bytes:
 *   NONE    -> OWNED, a fresh zero segment;
 *   LOCKED  -> OWNED: count 1, the parked entries move back (or mprotect);
 *              count > 1, a copy into a new segment;
 *   OWNED or VIEW: already writable (a fold that held this writer off has
 *              finished, or another thread resolved it): the chunk is made
 *              writable again, so that a retry cannot fault for ever. */
int _odf_fault(odf_arena_t *a, uint32_t c)
{
    uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    if (a->flags[c] & (ODF_F_OWNED | ODF_F_VIEW)) {
        if (a->flags[c] & ODF_F_USERPROT)
            return ODF_FAULT_PROGRAM; /* a protection of the program's own: its handler's business */
        return mprotect((void *)addr, ODF_CHUNK_SIZE, PROT_READ | PROT_WRITE) < 0 ? errno : 0;
    }
    int rc = _odf_family_lock(a);
    if (rc)
        return rc;
    a->n_faults++;
    _odf_trim_locked(a, ODF_TRIM_STEP);
    uint32_t e = a->mypt[c];
    if (e == 0)
        return fault_fresh(a, c, addr);
    if (a->refcnt[e - 1] > 1)
        _odf_reap_locked(a); /* a sharer may have died: then it is ours alone */
    if (a->refcnt[e - 1] == 1 || a->broken_cow)
        return fault_reuse(a, c, addr);
    return fault_copy(a, c, e - 1, addr);
}

/* Resolve a fault on every chunk of [addr, addr+len) (only_fresh: only on
 * chunks not yet resident), as a write there would. */
static int fault_range(odf_arena_t *a, uintptr_t addr, size_t len, int only_fresh)
{
    if (len == 0)
        return 0;
    if (addr < a->base || addr + len > a->base + a->size || addr + len < addr)
        return EINVAL;
    uint32_t c0 = (uint32_t)((addr - a->base) >> ODF_CHUNK_SHIFT);
    uint32_t c1 = (uint32_t)((addr + len - 1 - a->base) >> ODF_CHUNK_SHIFT);
    sigset_t old;
    int rc = 0;
    _odf_block_signals(&old);
    pthread_mutex_lock(&a->local);
    if (a->orphaned)
        rc = EOWNERDEAD;
    for (uint32_t c = c0; c <= c1 && !rc; c++)
        if (only_fresh ? !a->mypt[c] : !(a->flags[c] & (ODF_F_OWNED | ODF_F_VIEW)))
            rc = _odf_fault(a, c);
    pthread_mutex_unlock(&a->local);
    _odf_restore_signals(&old);
    return rc;
}

int odf_arena_prepare_write(odf_arena_t *a, uintptr_t addr, size_t len) { return fault_range(a, addr, len, 0); }

int odf_arena_populate(odf_arena_t *a, uintptr_t addr, size_t len) { return fault_range(a, addr, len, 1); }

int odf_arena_protect(odf_arena_t *a, uintptr_t addr, size_t len, int prot, int mark)
{
    if (addr < a->base || addr + len > a->base + a->size || addr + len < addr || (addr & 4095) || !len)
        return EINVAL;
    uint32_t c0 = (uint32_t)((addr - a->base) >> ODF_CHUNK_SHIFT);
    uint32_t c1 = (uint32_t)((addr + len - 1 - a->base) >> ODF_CHUNK_SHIFT);
    int rc = 0;
    sigset_t old;
    _odf_block_signals(&old);
    pthread_mutex_lock(&a->local);
    for (uint32_t c = c0; c <= c1 && !rc; c++)
        if (!a->mypt[c] || !(a->flags[c] & (ODF_F_OWNED | ODF_F_VIEW)))
            rc = ENOMEM; /* not mapped for the program (as the kernel says of a hole) */
    if (!rc && mprotect((void *)addr, len, prot) < 0)
        rc = errno;
    if (!rc)
        for (uint32_t c = c0; c <= c1; c++)
            a->flags[c] = (uint8_t)(mark ? a->flags[c] | ODF_F_USERPROT : a->flags[c] & ~ODF_F_USERPROT);
    pthread_mutex_unlock(&a->local);
    _odf_restore_signals(&old);
    return rc;
}

int odf_arena_release(odf_arena_t *a, uintptr_t addr, size_t len)
{
    if (addr < a->base || addr + len > a->base + a->size || addr + len < addr ||
        ((addr - a->base) & (ODF_CHUNK_SIZE - 1)) || (len & (ODF_CHUNK_SIZE - 1)))
        return EINVAL;
    uint32_t c0 = (uint32_t)((addr - a->base) >> ODF_CHUNK_SHIFT), n = (uint32_t)(len >> ODF_CHUNK_SHIFT);
    int rc;
    ODF_LOCKED(a, rc, {
        for (uint32_t c = c0; c < c0 + n && !rc; c++) {
            if (!a->mypt[c])
                continue;
            uintptr_t ca = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
            if ((rc = _odf_reserve(ca, ODF_CHUNK_SIZE)))
                break;
            if (a->flags[c] & ODF_F_PARKED)
                _odf_reserve(a->shadow + ((uintptr_t)c << ODF_CHUNK_SHIFT), ODF_CHUNK_SIZE);
            a->flags[c] = 0;
            _odf_seg_decref(a, a->mypt[c] - 1);
            a->mypt[c] = 0;
        }
    });
    return rc;
}
