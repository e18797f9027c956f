/* heap.c - a block allocator inside an arena range, for the interpreter's
 * heap (odfork_user.install) and anything else that wants malloc semantics
 * in memory that forks on demand.
 *
 * Layout of [start, start+len):
 *   pages (4 KiB) are handed out from low addresses up: first fit over the
 *   free extents, else the top moves up; the chunks under pages being handed
 *   out are mapped at once (odf_arena_populate: no fault needed, and kernel
 *   writes find a mapping).  Freed pages coalesce with their neighbours (a
 *   free extent that reaches the top lowers it), and every whole chunk inside
 *   freed space is given back to the family (odf_arena_release), so the arena
 *   holds no more chunks than the live data spans.
 *   blocks <= ODF_HEAP_MAX_SMALL bytes: size classes (16, 32, 48, then 64-byte steps to 1 KiB,
 *   then 4 per doubling), carved from 64 KiB slabs of pages; a freed block
 *   goes on its class's free list, linked through the block itself (so the
 *   links are arena memory and fork with it).
 *   larger blocks: whole pages with a 16-byte header {pages, magic}; realloc
 *   grows in place into a free neighbour or the top when it can.
 *   "raw" page runs (pymalloc's 1 MiB arenas): pages with no header; the
 *   caller passes the size back when freeing.
 *   "mapped" page runs (odf_heap_map: the anonymous mmaps the preload serves):
 *   pages with no header, KIND_MAP each, handed out zeroed, freed and resized
 *   any whole pages at a time (munmap of a head, a tail or a middle).  Pages
 *   at or above `clean` were never handed out since their chunk was fresh, so
 *   they read as zeros and are not written to zero them.
 *   aligned blocks (odf_heap_alloc_aligned; alignments up to ODF_CHUNK_SIZE,
 *   beyond which the caller must look elsewhere): up to a page, a size class
 *   that is a multiple of the alignment (its slab starts on a page, so all
 *   its blocks are aligned) when the size is a small one; else a run of
 *   whole pages with no header, its first page at an address that is a
 *   multiple of the alignment (first fit over the free extents, the pages
 *   before it staying a free extent, else above the top, the pages skipped
 *   becoming one).  Such a run's length is in `kind`: KIND_ALIGNED on its
 *   first page, KIND_ACONT on each later one; the page after it never holds
 *   KIND_ACONT (it starts something else, or is free), so its length is the
 *   count of KIND_ACONT pages that follow its first, read without a lock.
 * Per page, one byte in `kind` (private memory) says what it is: 0 free or
 * unused, 1..ODF_HEAP_NCLASS slab of that class, KIND_BIG first page of a
 * large block, KIND_CONT a later page of a large block or a raw run,
 * KIND_ALIGNED / KIND_ACONT first / later page of an aligned run, KIND_MAP a
 * page of a mapped run.
 *
 * Concurrency: none inside; the caller serialises (the Python allocator
 * hooks run with the GIL held), except odf_heap_usable, odf_heap_block_class
 * and the class functions, which need no lock for a block the caller owns.
 * A fork copies the private part (this struct, `kind`, the extent list) with
 * the process and the arena part on demand, so parent and child each go on
 * with a consistent heap.
 */
#include "odfork_heap.h" /* and through it odfork.h, the public API only: the arena's state is not this file's to read */

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* The heap's own private bookkeeping (this struct, the extent list) comes from
 * the system allocator.  Where heap.c is the program's malloc (the preload
 * library, built with ODF_HEAP_SYS_LIBC), that is glibc's __libc_* functions,
 * never the heap itself (which would recurse under its caller's lock). */
#ifdef ODF_HEAP_SYS_LIBC
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
#define sys_calloc  __libc_calloc
#define sys_realloc __libc_realloc
#define sys_free    __libc_free
#else
#define sys_calloc  calloc
#define sys_realloc realloc
#define sys_free    free
#endif

#define PAGE_SHIFT   12
#define PAGE         ((size_t)1 << PAGE_SHIFT)
#define SLAB_PAGES   16 /* 64 KiB */
#define KIND_BIG     0xFF
#define KIND_CONT    0xFE
#define KIND_ALIGNED 0xFD
#define KIND_ACONT   0xFC
#define KIND_MAP     0xFB
#define BIG_MAGIC    0x6f6462696762ULL /* "odbigb" */
#define HDR          16

typedef struct {
    uint32_t page, npages;
} extent_t;

struct odf_heap_s {
    odf_arena_t *arena;
    uintptr_t start;
    size_t npages; /* capacity of the range */
    size_t top;    /* pages [0, top) have been handed out at least once */
    size_t clean;  /* pages >= clean were never handed out (read as zeros); >= top */
    uint8_t *kind; /* [npages], private, lazily touched */
    extent_t *ext; /* free extents below top, sorted by page, coalesced */
    size_t next, ext_cap;
    void *free_list[ODF_HEAP_NCLASS];
    uintptr_t bump[ODF_HEAP_NCLASS], bump_end[ODF_HEAP_NCLASS];
    size_t live_bytes, live_blocks; /* blocks (not raw runs) handed out */
    size_t raw_bytes;
};

static uint32_t class_size[ODF_HEAP_NCLASS];

static void classes_init(void)
{
    if (class_size[0])
        return;
    int i = 0;
    for (uint32_t s = 16; s < 64; s += 16) /* small blocks of a malloc (the preload) */
        class_size[i++] = s;
    for (uint32_t s = 64; s <= 1024; s += 64)
        class_size[i++] = s;
    for (uint32_t base = 1024; i < ODF_HEAP_NCLASS; base *= 2)
        for (int q = 1; q <= 4 && i < ODF_HEAP_NCLASS; q++)
            class_size[i++] = base + base / 4 * (uint32_t)q;
}

#define N_TINY 3 /* classes 16, 32, 48 */

static int class_of(size_t n)
{
    if (n <= 48)
        return n ? (int)((n + 15) / 16) - 1 : 0;
    if (n <= 1024)
        return N_TINY + (int)((n + 63) / 64) - 1;
    int lo = N_TINY + 16, hi = ODF_HEAP_NCLASS - 1; /* first class >= n */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (class_size[mid] >= n)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

int odf_heap_create(odf_arena_t *a, uintptr_t start, size_t len, odf_heap_t **out)
{
    classes_init();
    uintptr_t base = odf_arena_base(a);
    if (start < base || start + len > base + odf_arena_size(a) || (start & (PAGE - 1)) || len < PAGE ||
        len >> PAGE_SHIFT > UINT32_MAX)
        return EINVAL;
    odf_heap_t *h = sys_calloc(1, sizeof(*h));
    if (!h)
        return ENOMEM;
    h->arena = a;
    h->start = start;
    h->npages = len >> PAGE_SHIFT;
    h->kind = mmap(NULL, h->npages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (h->kind == MAP_FAILED) {
        sys_free(h);
        return ENOMEM;
    }
    *out = h;
    return 0;
}

/* ---- pages ---- */

/* Room for k more free extents, so that what follows cannot fail on it. */
static int ext_reserve(odf_heap_t *h, size_t k)
{
    if (h->next + k <= h->ext_cap)
        return 0;
    size_t cap = h->ext_cap ? h->ext_cap * 2 : 64;
    while (cap < h->next + k)
        cap *= 2;
    extent_t *e = sys_realloc(h->ext, cap * sizeof(*e));
    if (!e)
        return ENOMEM;
    h->ext = e;
    h->ext_cap = cap;
    return 0;
}

static int ext_insert(odf_heap_t *h, size_t at, uint32_t page, uint32_t n)
{
    if (ext_reserve(h, 1))
        return ENOMEM;
    memmove(h->ext + at + 1, h->ext + at, (h->next - at) * sizeof(*h->ext));
    h->ext[at] = (extent_t){page, n};
    h->next++;
    return 0;
}

/* Index of the first free extent starting at or after page p. */
static size_t ext_find(const odf_heap_t *h, size_t p)
{
    size_t lo = 0, hi = h->next;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (h->ext[mid].page < p)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static void ext_remove(odf_heap_t *h, size_t at)
{
    memmove(h->ext + at, h->ext + at + 1, (h->next - at - 1) * sizeof(*h->ext));
    h->next--;
}

/* Pages [p, p+n) are about to be used: map the chunks among them that are
 * not resident (cheap when they all are). */
static int map_pages(odf_heap_t *h, size_t p, size_t n)
{
    return odf_arena_populate(h->arena, h->start + (p << PAGE_SHIFT), n << PAGE_SHIFT);
}

/* Pages [p, p+n) are free: give the whole chunks among them back to the
 * family, so the arena holds no more chunks than the live data spans. */
static void unmap_pages(odf_heap_t *h, size_t p, size_t n)
{
    uintptr_t lo = h->start + (p << PAGE_SHIFT), hi = lo + (n << PAGE_SHIFT);
    uintptr_t base = odf_arena_base(h->arena);
    lo = base + ((lo - base + ODF_CHUNK_SIZE - 1) & ~(uintptr_t)(ODF_CHUNK_SIZE - 1));
    hi = base + ((hi - base) & ~(uintptr_t)(ODF_CHUNK_SIZE - 1));
    if (hi > lo)
        odf_arena_release(h->arena, lo, hi - lo);
}

/* The first page at or after p whose address is a multiple of ap pages (a power of two). */
static inline size_t page_align_up(const odf_heap_t *h, size_t p, size_t ap)
{
    size_t s = h->start >> PAGE_SHIFT;
    return ((s + p + ap - 1) & ~(ap - 1)) - s;
}

/* n pages, first fit, the first of them at an address that is a multiple of
 * ap pages (a power of two; 1: any page); returns the page index or SIZE_MAX.
 * The pages skipped to reach the alignment stay free (an extent). */
static size_t pages_alloc_aligned(odf_heap_t *h, size_t n, size_t ap)
{
    for (size_t i = 0; i < h->next; i++) {
        extent_t *e = &h->ext[i];
        size_t q = page_align_up(h, e->page, ap), end = (size_t)e->page + e->npages;
        if (q + n > end)
            continue;
        size_t head = q - e->page, tail = end - (q + n);
        if ((head && tail && ext_reserve(h, 1)) || map_pages(h, q, n))
            return SIZE_MAX;
        if (q + n > h->clean)
            h->clean = q + n;
        e = &h->ext[i]; /* (ext_reserve may have moved the list) */
        if (!head && !tail) {
            ext_remove(h, i);
        } else if (!head) {
            e->page = (uint32_t)(q + n);
            e->npages = (uint32_t)tail;
        } else {
            e->npages = (uint32_t)head;
            if (tail)
                ext_insert(h, i + 1, (uint32_t)(q + n), (uint32_t)tail); /* (reserved: cannot fail) */
        }
        return q;
    }
    size_t p = h->top, q = page_align_up(h, p, ap);
    /* a free extent that ends at the top is merged into it on free, so none is here;
     * the skipped pages [p, q) become one (no chunk wholly above the top is mapped) */
    if (q + n > h->npages || (q > p && ext_reserve(h, 1)) || map_pages(h, q, n))
        return SIZE_MAX;
    if (q > p)
        ext_insert(h, h->next, (uint32_t)p, (uint32_t)(q - p));
    h->top = q + n;
    if (h->top > h->clean)
        h->clean = h->top;
    return q;
}

/* n pages, first fit; returns the page index or SIZE_MAX. */
static size_t pages_alloc(odf_heap_t *h, size_t n) { return pages_alloc_aligned(h, n, 1); }

static void pages_free(odf_heap_t *h, size_t p, size_t n)
{
    memset(h->kind + p, 0, n);
    size_t i = ext_find(h, p);
    if (i > 0 && h->ext[i - 1].page + h->ext[i - 1].npages == p) { /* merge with the one before */
        i--;
        p = h->ext[i].page;
        n += h->ext[i].npages;
        ext_remove(h, i);
    }
    if (i < h->next && p + n == h->ext[i].page) { /* and the one after */
        n += h->ext[i].npages;
        ext_remove(h, i);
    }
    if (p + n == h->top) {
        h->top = p;
    } else if (ext_insert(h, i, (uint32_t)p, (uint32_t)n)) {
        return; /* out of memory for the extent list: the pages leak, the heap stays sound */
    }
    unmap_pages(h, p, n);
}

/* Can the large block or aligned run at page p (n pages) grow to m pages in
 * place?  Its new pages are marked `cont`. */
static int grow_in_place(odf_heap_t *h, size_t p, size_t n, size_t m, uint8_t cont)
{
    size_t end = p + n, need = m - n;
    if (end == h->top) {
        if (end + need > h->npages || map_pages(h, end, need))
            return 0;
        h->top = end + need;
        if (h->top > h->clean)
            h->clean = h->top;
        memset(h->kind + end, cont, need);
        return 1;
    }
    size_t lo = ext_find(h, end);
    if (lo < h->next && h->ext[lo].page == end && h->ext[lo].npages >= need) {
        if (map_pages(h, end, need))
            return 0;
        h->ext[lo].page += (uint32_t)need;
        h->ext[lo].npages -= (uint32_t)need;
        if (!h->ext[lo].npages)
            ext_remove(h, lo);
        memset(h->kind + end, cont, need);
        return 1;
    }
    return 0;
}

/* ---- blocks ---- */

static inline size_t page_of(odf_heap_t *h, const void *ptr) { return ((uintptr_t)ptr - h->start) >> PAGE_SHIFT; }

int odf_heap_owns(odf_heap_t *h, const void *ptr)
{
    uintptr_t p = (uintptr_t)ptr;
    if (p < h->start || p >= h->start + (h->top << PAGE_SHIFT))
        return 0;
    uint8_t k = h->kind[page_of(h, ptr)];
    return k == KIND_BIG || k == KIND_ALIGNED || (k >= 1 && k <= ODF_HEAP_NCLASS);
}

int odf_heap_in_range(odf_heap_t *h, const void *ptr)
{
    return (uintptr_t)ptr >= h->start && (uintptr_t)ptr < h->start + (h->npages << PAGE_SHIFT);
}

void *odf_heap_alloc(odf_heap_t *h, size_t n)
{
    if (n <= ODF_HEAP_MAX_SMALL) {
        int c = class_of(n);
        void *b = h->free_list[c];
        if (b) {
            h->free_list[c] = *(void **)b;
        } else {
            if (h->bump[c] + class_size[c] > h->bump_end[c]) {
                size_t p = pages_alloc(h, SLAB_PAGES);
                if (p == SIZE_MAX)
                    return NULL;
                memset(h->kind + p, c + 1, SLAB_PAGES);
                h->bump[c] = h->start + (p << PAGE_SHIFT);
                h->bump_end[c] = h->bump[c] + (SLAB_PAGES << PAGE_SHIFT);
            }
            b = (void *)h->bump[c];
            h->bump[c] += class_size[c];
        }
        h->live_bytes += class_size[c];
        h->live_blocks++;
        return b;
    }
    if (n > ((size_t)UINT32_MAX << PAGE_SHIFT))
        return NULL;
    size_t np = (n + HDR + PAGE - 1) >> PAGE_SHIFT;
    size_t p = pages_alloc(h, np);
    if (p == SIZE_MAX)
        return NULL;
    h->kind[p] = KIND_BIG;
    memset(h->kind + p + 1, KIND_CONT, np - 1);
    uint64_t *hdr = (uint64_t *)(h->start + (p << PAGE_SHIFT));
    hdr[0] = np;
    hdr[1] = BIG_MAGIC;
    h->live_bytes += np << PAGE_SHIFT;
    h->live_blocks++;
    return hdr + 2;
}

/* Pages of the aligned run whose first page is p: its first and the KIND_ACONT
 * pages after it.  The page after a run is never KIND_ACONT (another run's
 * later pages follow that run's first page), whatever other threads make or
 * free there meanwhile; so no lock is needed for a run the caller owns, whose
 * own kinds change only through its owner's realloc or free. */
static size_t aligned_pages(const odf_heap_t *h, size_t p)
{
    const uint8_t *k = h->kind + p + 1, *end = h->kind + h->npages;
    while (k < end && *k == KIND_ACONT)
        k++;
    return (size_t)(k - (h->kind + p));
}

/* The smallest size class >= n that is a multiple of align (<= a page), or -1. */
static int aligned_class(size_t n, size_t align)
{
    for (int c = class_of(n); c < ODF_HEAP_NCLASS; c++)
        if (!(class_size[c] & (align - 1)))
            return c;
    return -1;
}

int odf_heap_alloc_aligned(odf_heap_t *h, size_t align, size_t n, void **out)
{
    if (!align || (align & (align - 1)) || align > ODF_CHUNK_SIZE)
        return EINVAL;
    if (!n)
        n = 1;
    void *b;
    if (align <= 16) { /* every block is */
        b = odf_heap_alloc(h, n);
    } else if (align <= PAGE && n <= ODF_HEAP_MAX_SMALL && aligned_class(n, align) >= 0) {
        /* a slab starts on a page, so its blocks of a class that is a multiple of align are aligned */
        b = odf_heap_alloc(h, class_size[aligned_class(n, align)]);
    } else {
        if (n > ((size_t)UINT32_MAX << PAGE_SHIFT))
            return ENOMEM;
        size_t np = (n + PAGE - 1) >> PAGE_SHIFT, ap = align > PAGE ? align >> PAGE_SHIFT : 1;
        size_t p = pages_alloc_aligned(h, np, ap);
        if (p == SIZE_MAX)
            return ENOMEM;
        h->kind[p] = KIND_ALIGNED;
        memset(h->kind + p + 1, KIND_ACONT, np - 1);
        h->live_bytes += np << PAGE_SHIFT;
        h->live_blocks++;
        b = (void *)(h->start + (p << PAGE_SHIFT));
    }
    if (!b)
        return ENOMEM;
    *out = b;
    return 0;
}

int odf_heap_class(size_t n) { return n <= ODF_HEAP_MAX_SMALL ? class_of(n) : -1; }

size_t odf_heap_class_size(int c) { return class_size[c]; }

/* Needs no lock when the caller owns the block: a page's kind is written when
 * its slab, large block or aligned run is made and cleared only when the
 * large block or run is freed (slabs are never given back), and a large
 * block's header or a run's length changes only through its owner's realloc. */
int odf_heap_block_class(odf_heap_t *h, const void *ptr)
{
    uint8_t k = h->kind[page_of(h, ptr)];
    return k >= 1 && k <= ODF_HEAP_NCLASS ? k - 1 : -1;
}

size_t odf_heap_usable(odf_heap_t *h, const void *ptr)
{
    size_t pg = page_of(h, ptr);
    uint8_t k = h->kind[pg];
    if (k == KIND_ALIGNED)
        return aligned_pages(h, pg) << PAGE_SHIFT;
    return k == KIND_BIG ? (((const uint64_t *)ptr)[-2] << PAGE_SHIFT) - HDR : class_size[k - 1];
}

void odf_heap_free(odf_heap_t *h, void *ptr)
{
    size_t pg = page_of(h, ptr);
    uint8_t k = h->kind[pg];
    if (k == KIND_BIG) {
        size_t np = ((uint64_t *)ptr)[-2];
        ((uint64_t *)ptr)[-1] = 0; /* a second free of this block then finds no magic */
        h->live_bytes -= np << PAGE_SHIFT;
        h->live_blocks--;
        pages_free(h, pg, np);
        return;
    }
    if (k == KIND_ALIGNED) {
        size_t np = aligned_pages(h, pg);
        h->live_bytes -= np << PAGE_SHIFT;
        h->live_blocks--;
        pages_free(h, pg, np);
        return;
    }
    int c = k - 1;
    *(void **)ptr = h->free_list[c];
    h->free_list[c] = ptr;
    h->live_bytes -= class_size[c];
    h->live_blocks--;
}

void *odf_heap_realloc(odf_heap_t *h, void *ptr, size_t n)
{
    if (!ptr)
        return odf_heap_alloc(h, n);
    size_t pg = page_of(h, ptr);
    uint8_t k = h->kind[pg];
    size_t have = odf_heap_usable(h, ptr);
    if (k != KIND_BIG && k != KIND_ALIGNED) {
        if (n <= have && (n > ODF_HEAP_MAX_SMALL || class_of(n) == k - 1))
            return ptr;
    } else if (n > ODF_HEAP_MAX_SMALL && n <= ((size_t)UINT32_MAX << PAGE_SHIFT)) {
        /* a large block (its header counts) or an aligned run (none): in place when it can */
        int big = k == KIND_BIG;
        size_t np = big ? ((uint64_t *)ptr)[-2] : have >> PAGE_SHIFT;
        size_t want = (n + (big ? HDR : 0) + PAGE - 1) >> PAGE_SHIFT;
        if (want <= np) {
            if (want < np) { /* give the tail back */
                if (big)
                    ((uint64_t *)ptr)[-2] = want;
                h->live_bytes -= (np - want) << PAGE_SHIFT;
                pages_free(h, pg + want, np - want);
            }
            return ptr;
        }
        if (grow_in_place(h, pg, np, want, big ? KIND_CONT : KIND_ACONT)) {
            if (big)
                ((uint64_t *)ptr)[-2] = want;
            h->live_bytes += (want - np) << PAGE_SHIFT;
            return ptr;
        }
    }
    void *q = odf_heap_alloc(h, n);
    if (!q)
        return NULL;
    memcpy(q, ptr, have < n ? have : n);
    odf_heap_free(h, ptr);
    return q;
}

void *odf_heap_alloc_raw(odf_heap_t *h, size_t n)
{
    size_t np = (n + PAGE - 1) >> PAGE_SHIFT;
    size_t p = pages_alloc(h, np);
    if (p == SIZE_MAX)
        return NULL;
    memset(h->kind + p, KIND_CONT, np);
    h->raw_bytes += np << PAGE_SHIFT;
    return (void *)(h->start + (p << PAGE_SHIFT));
}

void odf_heap_free_raw(odf_heap_t *h, void *ptr, size_t n)
{
    size_t np = (n + PAGE - 1) >> PAGE_SHIFT;
    h->raw_bytes -= np << PAGE_SHIFT;
    pages_free(h, page_of(h, ptr), np);
}

/* ---- mapped runs ---- */

/* Zero pages [p, p+n) that may hold old bytes (those below `clean`), as of
 * `clean` before they were handed out. */
static void zero_pages(odf_heap_t *h, size_t p, size_t n, size_t clean)
{
    size_t end = p + n < clean ? p + n : clean;
    if (end > p)
        memset((void *)(h->start + (p << PAGE_SHIFT)), 0, (end - p) << PAGE_SHIFT);
}

void *odf_heap_map(odf_heap_t *h, size_t n)
{
    if (!n || n > ((size_t)UINT32_MAX << PAGE_SHIFT))
        return NULL;
    size_t np = (n + PAGE - 1) >> PAGE_SHIFT, clean = h->clean;
    size_t p = pages_alloc(h, np);
    if (p == SIZE_MAX)
        return NULL;
    memset(h->kind + p, KIND_MAP, np);
    zero_pages(h, p, np, clean);
    h->raw_bytes += np << PAGE_SHIFT;
    return (void *)(h->start + (p << PAGE_SHIFT));
}

/* Clip [*p, *p + *n pages) of addr/len to the heap's pages; 0 when nothing is left. */
static int clip(odf_heap_t *h, const void *addr, size_t len, size_t *p, size_t *n)
{
    uintptr_t a = (uintptr_t)addr, e = a + len, end = h->start + (h->top << PAGE_SHIFT);
    if (e < a)
        e = UINTPTR_MAX;
    if (a < h->start)
        a = h->start;
    if (e > end)
        e = end;
    if (e <= a)
        return 0;
    *p = (a - h->start) >> PAGE_SHIFT;
    *n = ((e - h->start + PAGE - 1) >> PAGE_SHIFT) - *p;
    return 1;
}

size_t odf_heap_mapped(odf_heap_t *h, const void *addr, size_t len)
{
    size_t p, n, k = 0;
    if (clip(h, addr, len, &p, &n))
        for (size_t i = p; i < p + n; i++)
            k += h->kind[i] == KIND_MAP;
    return k << PAGE_SHIFT;
}

size_t odf_heap_unmap(odf_heap_t *h, void *addr, size_t len)
{
    size_t p, n, freed = 0;
    if (!clip(h, addr, len, &p, &n))
        return 0;
    for (size_t i = p; i < p + n;) {
        if (h->kind[i] != KIND_MAP) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < p + n && h->kind[j] == KIND_MAP)
            j++;
        pages_free(h, i, j - i);
        freed += (j - i) << PAGE_SHIFT;
        i = j;
    }
    h->raw_bytes -= freed;
    return freed;
}

int odf_heap_map_grow(odf_heap_t *h, void *addr, size_t len, size_t new_len)
{
    size_t p = page_of(h, addr), np = (len + PAGE - 1) >> PAGE_SHIFT, want = (new_len + PAGE - 1) >> PAGE_SHIFT;
    if (want <= np)
        return 0;
    if (want > ((size_t)UINT32_MAX) || h->kind[p + np - 1] != KIND_MAP)
        return ENOMEM;
    size_t clean = h->clean;
    if (!grow_in_place(h, p, np, want, KIND_MAP))
        return ENOMEM;
    zero_pages(h, p + np, want - np, clean);
    h->raw_bytes += (want - np) << PAGE_SHIFT;
    return 0;
}

void odf_heap_stats(odf_heap_t *h, odf_heap_stats_t *out)
{
    out->live_bytes = h->live_bytes;
    out->live_blocks = h->live_blocks;
    out->raw_bytes = h->raw_bytes;
    out->top_bytes = h->top << PAGE_SHIFT;
    size_t resident = 0;
    odf_arena_resident(h->arena, h->start, h->npages << PAGE_SHIFT, &resident);
    out->mapped_bytes = resident;
    size_t f = 0;
    for (size_t i = 0; i < h->next; i++)
        f += h->ext[i].npages;
    out->free_page_bytes = f << PAGE_SHIFT;
    out->free_extents = h->next;
}

/* Structural check: extents sorted, disjoint, below the top, not touching;
 * pages in extents are marked free; large-block headers are intact; an
 * aligned run's later pages follow its first. */
int odf_heap_check(odf_heap_t *h)
{
    size_t prev_end = 0;
    for (size_t i = 0; i < h->next; i++) {
        extent_t e = h->ext[i];
        if (!e.npages || e.page < prev_end || (i && e.page == prev_end) || e.page + e.npages > h->top)
            return EUCLEAN;
        if (e.page + e.npages == h->top)
            return EUCLEAN; /* should have lowered the top */
        for (size_t p = e.page; p < e.page + e.npages; p++)
            if (h->kind[p])
                return EUCLEAN;
        prev_end = e.page + e.npages;
    }
    for (size_t p = 0; p < h->top; p++) {
        if (h->kind[p] == KIND_BIG) {
            const uint64_t *hdr = (const uint64_t *)(h->start + (p << PAGE_SHIFT));
            if (hdr[1] != BIG_MAGIC || !hdr[0] || p + hdr[0] > h->top)
                return EUCLEAN;
            for (size_t q = p + 1; q < p + hdr[0]; q++)
                if (h->kind[q] != KIND_CONT)
                    return EUCLEAN;
        } else if (h->kind[p] == KIND_ACONT) { /* only inside an aligned run */
            if (!p || (h->kind[p - 1] != KIND_ALIGNED && h->kind[p - 1] != KIND_ACONT))
                return EUCLEAN;
        }
    }
    return 0;
}
