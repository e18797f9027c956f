/* odfork_heap.h - a block allocator in an arena range (csrc/heap/heap.c), a
 * client of the core's public API: install() (csrc/py/pyalloc.c) and the
 * preload library of `exec` (csrc/preload/odfork_preload.c) serve their
 * allocations from it. */
#ifndef ODFORK_HEAP_H
#define ODFORK_HEAP_H

#include "odfork.h"

/* Not thread-safe: the caller serialises every call (but for the three marked
 * "no lock needed"). */
#define ODF_HEAP_NCLASS    39
#define ODF_HEAP_MAX_SMALL 32768
typedef struct odf_heap_s odf_heap_t;
typedef struct odf_heap_stats_s {
    uint64_t live_bytes; /* in blocks handed out (rounded to their class or pages) */
    uint64_t live_blocks;
    uint64_t raw_bytes;       /* in raw page runs (pymalloc arenas) */
    uint64_t top_bytes;       /* extent of the heap ever handed out and not given back */
    uint64_t mapped_bytes;    /* resident chunks of the heap range */
    uint64_t free_page_bytes; /* free pages below the top */
    uint64_t free_extents;
} odf_heap_stats_t;
/* [start, start+len) must lie in the arena, page aligned, and not be used by anything else. */
int odf_heap_create(odf_arena_t *a, uintptr_t start, size_t len, odf_heap_t **out);
void *odf_heap_alloc(odf_heap_t *h, size_t n); /* NULL when full; 16-byte aligned */
void *odf_heap_realloc(odf_heap_t *h, void *p, size_t n);
void odf_heap_free(odf_heap_t *h, void *p);           /* p from alloc/realloc */
size_t odf_heap_usable(odf_heap_t *h, const void *p); /* no lock needed for a block the caller owns */
int odf_heap_class(size_t n);                         /* size class of n, -1 above ODF_HEAP_MAX_SMALL;
                                                             valid once a heap has been created */
size_t odf_heap_class_size(int c);
int odf_heap_block_class(odf_heap_t *h, const void *p); /* class of a block, -1 large; no lock needed */
/* A block at a multiple of align (a power of two <= ODF_CHUNK_SIZE, else
 * EINVAL), freed, resized and measured as any block: 0, EINVAL or ENOMEM. */
int odf_heap_alloc_aligned(odf_heap_t *h, size_t align, size_t n, void **out);
void *odf_heap_alloc_raw(odf_heap_t *h, size_t n); /* page aligned, no header */
void odf_heap_free_raw(odf_heap_t *h, void *p, size_t n);
/* Mapped runs (the anonymous mmaps the preload library serves): n bytes of
 * whole pages, zeroed, page aligned, no header; NULL when full. */
void *odf_heap_map(odf_heap_t *h, size_t n);
/* Bytes of mapped-run pages in [p, p+len) (any range; pages outside the heap count 0). */
size_t odf_heap_mapped(odf_heap_t *h, const void *p, size_t len);
/* Free the mapped-run pages in [p, p+len) (page aligned; any range: a head,
 * a tail, a middle, several runs; other pages are left alone); the bytes freed. */
size_t odf_heap_unmap(odf_heap_t *h, void *p, size_t len);
/* Grow the mapped run whose pages [p, p+len) are, in place, to new_len
 * (the new pages zeroed): 0, or ENOMEM when it cannot. */
int odf_heap_map_grow(odf_heap_t *h, void *p, size_t len, size_t new_len);
int odf_heap_owns(odf_heap_t *h, const void *p); /* p is a block of alloc/realloc */
int odf_heap_in_range(odf_heap_t *h, const void *p);
void odf_heap_stats(odf_heap_t *h, odf_heap_stats_t *out);
int odf_heap_check(odf_heap_t *h); /* 0, or EUCLEAN */

#endif
