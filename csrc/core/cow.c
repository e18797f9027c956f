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
 *   in place, when the segment's count is back to 1: the private pages
 *     (found in /proc/self/pagemap) are written into the segment, then the
 *     segment is mapped MAP_SHARED in place of the view (the parked entries
 *     moved back when the chunk has them): 18-40 us for a few pages;
 *   into a new segment, when it is still shared (snapshots need it): the
 *     whole 2 MiB read through the view into a new segment.
 * Writers are held off between the copy and the remap (uffd.c).  Where they
 * cannot be (no full userfaultfd and another thread running: EAGAIN), the
 * view stays a view: the next fork copies its entries, as os.fork would, and
 * a snapshot gets a copy of the chunk of its own (snapshot.c).
 *
 * Pre for the folds: a->local and the family lock held, signals blocked
 * (_odf_fault: a->local, see its comment).  Nothing here writes arena memory;
 * it is only read, by the kernel (pwrite from the view, or from a chunk being
 * copied), which a write-protected range allows.  Everything _odf_fault
 * reaches is async-signal-safe: the SIGSEGV handler calls it.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define NPAGES (ODF_CHUNK_SIZE / PAGE)
#define PM_PRESENT (1ULL << 63)
#define PM_SWAPPED (1ULL << 62)
#define PM_FILE (1ULL << 61)      /* file page or shared anonymous: not a private copy */
#define PM_EXCLUSIVE (1ULL << 56) /* mapped by this process only */
#define PM_UFFD_WP (1ULL << 57)   /* write-protected: a swap-like marker on a page never mapped */

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

/* Undo a hold that is being abandoned: the view is writable again. */
static void resume_view(uintptr_t addr, int token)
{
    if (token < 0)
        mprotect((void *)addr, ODF_CHUNK_SIZE, PROT_READ | PROT_WRITE);
    _odf_writers_resume(token);
}

static int fold_in_place(odf_arena_t *a, uint32_t c, uint32_t seg, uint64_t *pm, int pm_fd)
{
    uintptr_t addr = a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT);
    off_t base = (off_t)seg << ODF_CHUNK_SHIFT;
    int token, rc;
    if ((rc = _odf_writers_hold(addr, ODF_CHUNK_SIZE, &token)))
        return rc;
    a->flags[c] |= ODF_F_FOLDING;
    /* Read again now that no page can be added, and keep what the first
     * read saw: write-protect markers on pages never mapped read as swapped
     * (PM_SWAPPED | PM_UFFD_WP) and are not private pages. */
    uint32_t copied = 0, n = 0;
    uint64_t now[NPAGES];
    if (pm_fd < 0 || read_pagemap(a, pm_fd, c, now)) {
        for (uint32_t i = 0; i < NPAGES; i++) /* cannot tell: copy every page */
            pm[i] = PM_PRESENT;
    } else {
        for (uint32_t i = 0; i < NPAGES; i++)
            if (!is_private(pm[i]) && !((now[i] & PM_SWAPPED) && (now[i] & PM_UFFD_WP)))
                pm[i] = now[i];
    }
    int wfd, wrc = _odf_pool_rw(a, &wfd); /* one read-write descriptor for every run of pages */
    for (uint32_t i = 0; i < NPAGES && !rc;) {
        if (!is_private(pm[i])) {
            i++;
            continue;
        }
        uint32_t j = i;
        while (j < NPAGES && is_private(pm[j])) {
            copied += (pm[j] & PM_EXCLUSIVE) || (pm[j] & PM_SWAPPED);
            j++;
        }
        const void *src = (const void *)(addr + i * PAGE);
        off_t at = base + (off_t)(i * PAGE);
        rc = wrc ? _odf_pool_write(a, src, (j - i) * PAGE, at) : _odf_pwrite_all(wfd, src, (j - i) * PAGE, at);
        n += j - i;
        i = j;
    }
    if (!wrc)
        _odf_pool_rw_done(a, wfd);
    if (!rc) {
        if (a->flags[c] & ODF_F_PARKED) {
            rc = _odf_unpark(a, c);
        } else {
            rc = _odf_map_seg(a, addr, seg, PROT_READ | PROT_WRITE, 0);
        }
    }
    if (rc) {
        /* The segment may hold some of the pages now: harmless, the view
         * still shows them and nobody else maps the segment. */
        a->flags[c] &= (uint8_t)~ODF_F_FOLDING;
        resume_view(addr, token);
        return rc;
    }
    ODF_SET_STATE(a, c, ODF_F_WRITABLE);
    _odf_writers_resume(token);
    a->n_cow += copied > 0;
    a->n_bytes += (uint64_t)copied * PAGE + (uint64_t)n * PAGE; /* the kernel's copies, then ours */
    a->n_reuse++;
    a->n_folds++;
    return 0;
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
    ODF_SET_STATE(a, c, ODF_F_WRITABLE);
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
    uint64_t pm[NPAGES];
    *folded = 0;
    if (!(a->flags[c] & ODF_F_PRIVATE) || !a->mypt[c] || (a->flags[c] & ODF_F_USERPROT))
        return 0; /* (a fold would remap the program's protections away, and may not read them) */
    uint32_t seg = a->mypt[c] - 1;
    if (a->refcnt[seg] > 1)
        _odf_reap_locked(a); /* a sharer may have died: then it is ours alone */
    int alone = a->refcnt[seg] == 1;
    if (!alone && !shared)
        return 0;
    int pm_fd = open_pagemap();
    uint32_t dirty = NPAGES;
    if (pm_fd >= 0 && read_pagemap(a, pm_fd, c, pm) == 0)
        dirty = count_private(pm, NULL);
    else
        for (uint32_t i = 0; i < NPAGES; i++)
            pm[i] = PM_PRESENT | PM_EXCLUSIVE;
    int rc = 0;
    if (dirty == 0 && (!alone || !(a->flags[c] & ODF_F_PARKED)))
        goto out; /* the segment holds the chunk's bytes already (an unparked clean view stays a view) */
    if (alone && dirty <= max_dirty)
        rc = fold_in_place(a, c, seg, pm, pm_fd);
    else if (!alone)
        rc = fold_shared(a, c, seg, pm);
    else
        goto out; /* too many pages to fold here */
    *folded = rc == 0;
out:
    if (pm_fd >= 0)
        close(pm_fd);
    return rc;
}

int odf_arena_fold_step(odf_arena_t *a, uint64_t budget_ns, uint32_t *left)
{
    /* Reap once, then fold views whose count is 1, one per lock hold, until
     * the budget is spent.  Which views those are is read first without any
     * lock (relaxed loads: a hint, checked again under the locks), so that
     * while a child shares every view (a save in progress) a step costs a
     * scan of memory, not four syscalls a view. */
    uint64_t end = _odf_now_ns() + budget_ns;
    uint32_t pending = 0;
    int rc;
    ODF_LOCKED(a, rc, _odf_reap_locked(a));
    for (uint32_t c = 0; c < a->hi && !rc; c++) {
        if (!(__atomic_load_n(&a->flags[c], __ATOMIC_RELAXED) & ODF_F_PRIVATE))
            continue;
        uint32_t e = __atomic_load_n(&a->mypt[c], __ATOMIC_RELAXED);
        if (!e || __atomic_load_n(&a->refcnt[e - 1], __ATOMIC_RELAXED) != 1)
            continue; /* shared (or gone): not this step's */
        if (_odf_now_ns() > end) {
            pending++;
            continue;
        }
        ODF_LOCKED(a, rc, {
            int folded = 0;
            e = a->mypt[c];
            if ((a->flags[c] & ODF_F_PRIVATE) && e && a->refcnt[e - 1] == 1)
                rc = _odf_fold_locked(a, c, ODF_FOLD_ANY, 0, &folded);
        });
        if (rc == EAGAIN)
            return 0; /* writers cannot be held off now: no fold this step, none pending */
    }
    *left = pending;
    return rc;
}

int odf_arena_fold(odf_arena_t *a, uint32_t max_dirty)
{
    /* One chunk per lock hold: a fault or a fork waits for one fold at most. */
    int rc = 0;
    for (uint32_t c = 0; c < a->hi && !rc; c++) {
        if (!(a->flags[c] & ODF_F_PRIVATE))
            continue;
        ODF_LOCKED(a, rc, {
            int folded;
            rc = _odf_fold_locked(a, c, max_dirty, 0, &folded);
        });
        if (rc == EAGAIN)
            return 0; /* writers cannot be held off now: the views stay views */
    }
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
    ODF_SET_STATE(a, c, ODF_F_WRITABLE);
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
    ODF_SET_STATE(a, c, ODF_F_WRITABLE);
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
    ODF_SET_STATE(a, c, ODF_F_WRITABLE);
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
    if (a->flags[c] & (ODF_F_WRITABLE | ODF_F_PRIVATE)) {
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
        if (only_fresh ? !a->mypt[c] : !(a->flags[c] & (ODF_F_WRITABLE | ODF_F_PRIVATE)))
            rc = _odf_fault(a, c);
    pthread_mutex_unlock(&a->local);
    _odf_restore_signals(&old);
    return rc;
}

int odf_arena_prepare_write(odf_arena_t *a, uintptr_t addr, size_t len)
{
    return fault_range(a, addr, len, 0);
}

int odf_arena_populate(odf_arena_t *a, uintptr_t addr, size_t len)
{
    return fault_range(a, addr, len, 1);
}

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
        if (!a->mypt[c] || !(a->flags[c] & (ODF_F_WRITABLE | ODF_F_PRIVATE)))
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
