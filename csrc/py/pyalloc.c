/* pyalloc.c - routes CPython's allocations into an odf heap (odfork_user.install).
 *
 * Compiled into the cffi extension only (it needs Python.h); the rest of
 * csrc/ does not depend on Python.
 *
 * What moves: pymalloc's arenas (PyObject_SetArenaAllocator: every object of
 * <= 512 bytes lives in one), and blocks of more than 512 bytes of the MEM and
 * OBJ domains (PyMem_SetAllocator: dict tables, list item arrays, big str and
 * bytes).  Smaller MEM/OBJ requests still go to the previous allocator
 * (pymalloc), which now carves them from arenas in the heap.
 *
 * Who frees what: a pointer inside the heap that the heap handed out goes back
 * to it; anything else (blocks made before install, pymalloc blocks, raw
 * malloc) goes to the previous allocator, which made it.  A block of
 * pymalloc's that grows past 512 bytes moves into the heap (pymalloc would
 * move it to malloc).  uninstall only stops new allocations from going to the
 * heap: the hooks stay, because heap blocks stay alive and must be freed by it.
 *
 * Every entry point runs with the GIL held (CPython's rule for these domains),
 * which is the heap's lock; odf_py_install takes the GIL itself.
 */
#include <Python.h>

#include "odfork.h"

static odf_heap_t *heap;
static int active;
static int hooked;
static PyMemAllocatorEx prev_mem, prev_obj;
static PyObjectArenaAllocator prev_arena;

#define SMALL 512 /* pymalloc's SMALL_REQUEST_THRESHOLD */

static void *h_malloc(void *ctx, size_t n)
{
    PyMemAllocatorEx *prev = ctx;
    if (active && n > SMALL) {
        void *p = odf_heap_alloc(heap, n);
        if (p)
            return p;
    }
    return prev->malloc(prev->ctx, n);
}

static void *h_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *prev = ctx;
    if (elsize && nelem > (size_t)-1 / elsize)
        return NULL;
    size_t n = nelem * elsize;
    if (active && n > SMALL) {
        void *p = odf_heap_alloc(heap, n);
        if (p) {
            memset(p, 0, n);
            return p;
        }
    }
    return prev->calloc(prev->ctx, nelem, elsize);
}

static void *h_realloc(void *ctx, void *ptr, size_t n)
{
    PyMemAllocatorEx *prev = ctx;
    if (ptr && odf_heap_owns(heap, ptr))
        return odf_heap_realloc(heap, ptr, n ? n : 1);
    if (!ptr)
        return h_malloc(ctx, n);
    if (active && n > SMALL && odf_heap_in_range(heap, ptr)) {
        /* A pymalloc block in one of the heap's arenas, growing past 512
         * bytes: its size is pymalloc's secret, so let pymalloc grow it
         * (into malloc), then move that copy into the heap. */
        void *tmp = prev->realloc(prev->ctx, ptr, n);
        if (!tmp)
            return NULL;
        void *p = odf_heap_alloc(heap, n);
        if (!p)
            return tmp;
        memcpy(p, tmp, n);
        prev->free(prev->ctx, tmp);
        return p;
    }
    return prev->realloc(prev->ctx, ptr, n);
}

static void h_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *prev = ctx;
    if (ptr && odf_heap_owns(heap, ptr)) {
        odf_heap_free(heap, ptr);
        return;
    }
    prev->free(prev->ctx, ptr);
}

static void *a_alloc(void *ctx, size_t n)
{
    if (active) {
        void *p = odf_heap_alloc_raw(heap, n);
        if (p)
            return p;
    }
    return prev_arena.alloc(prev_arena.ctx, n);
}

static void a_free(void *ctx, void *ptr, size_t n)
{
    if (ptr && odf_heap_in_range(heap, ptr)) {
        odf_heap_free_raw(heap, ptr, n);
        return;
    }
    prev_arena.free(prev_arena.ctx, ptr, n);
}

int odf_py_install(odf_heap_t *h)
{
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = 0;
    if (hooked && h != heap) {
        rc = EBUSY; /* one heap per process, for good: its blocks may still be alive */
    } else if (!hooked) {
        heap = h;
        PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &prev_mem);
        PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &prev_obj);
        PyObject_GetArenaAllocator(&prev_arena);
        PyMemAllocatorEx mem = {&prev_mem, h_malloc, h_calloc, h_realloc, h_free};
        PyMemAllocatorEx obj = {&prev_obj, h_malloc, h_calloc, h_realloc, h_free};
        PyObjectArenaAllocator ar = {NULL, a_alloc, a_free};
        PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &mem);
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &obj);
        PyObject_SetArenaAllocator(&ar);
        hooked = 1;
    }
    if (!rc)
        active = 1;
    PyGILState_Release(g);
    return rc;
}

void odf_py_uninstall(void)
{
    PyGILState_STATE g = PyGILState_Ensure();
    active = 0;
    PyGILState_Release(g);
}

int odf_py_installed(void) { return active; }
