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
 *
 * numpy (odf_py_numpy_hook): array data goes to the same heap through numpy's
 * allocator hook (NEP 49: a PyDataMem_Handler set with PyDataMem_SetHandler,
 * numpy >= 1.22).  numpy keeps the handler that allocated an array with the
 * array and frees it through that one, so arrays made before the hook are
 * unaffected.  numpy does not promise to hold the GIL when it calls the handler,
 * so each call takes it (PyGILState_Ensure: a counter bump when already held).
 * The handler lives in a context variable of numpy's: it applies to the thread
 * (context) that set it and to contexts copied from it; threads started later
 * begin with numpy's default.  No numpy header is needed: the two functions are
 * entries 211 and 304 of numpy's C-API table, which numpy only ever appends to.
 *
 * The raw domain (PyMem_RawMalloc) is not served: its callers hold no GIL (some
 * have no thread state at all, so PyGILState_Ensure could recurse into it), and
 * the heap has no lock of its own; every MEM/OBJ allocation would pay for one.
 */
#include <Python.h>

#include <malloc.h>

#include "odfork_py.h"

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

/* numpy's PyDataMem_Handler, version 1 (numpy/ndarraytypes.h) */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator_t;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator_t allocator;
} np_handler_t;

#define NP_API_FEATURE_VERSION 211 /* unsigned int PyArray_GetNDArrayCFeatureVersion(void) */
#define NP_API_SET_HANDLER     304 /* PyObject *PyDataMem_SetHandler(PyObject *) */
#define NP_1_22_API_VERSION    0x0f

static size_t np_in_heap, np_outside; /* live bytes of arrays made through the hook */

static void *n_malloc(void *ctx, size_t n)
{
    (void)ctx;
    PyGILState_STATE g = PyGILState_Ensure();
    void *p = active ? odf_heap_alloc(heap, n ? n : 1) : NULL;
    if (p) {
        np_in_heap += odf_heap_usable(heap, p);
    } else if ((p = malloc(n ? n : 1)) != NULL) {
        np_outside += malloc_usable_size(p);
    }
    PyGILState_Release(g);
    return p;
}

static void *n_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize && nelem > (size_t)-1 / elsize)
        return NULL;
    size_t n = nelem * elsize;
    void *p = n_malloc(ctx, n);
    if (p)
        memset(p, 0, n); /* heap pages may be reused; malloc's too */
    return p;
}

static void n_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    (void)size;
    if (!ptr)
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    if (odf_heap_owns(heap, ptr)) {
        np_in_heap -= odf_heap_usable(heap, ptr);
        odf_heap_free(heap, ptr);
    } else {
        np_outside -= malloc_usable_size(ptr);
        free(ptr);
    }
    PyGILState_Release(g);
}

static void *n_realloc(void *ctx, void *ptr, size_t n)
{
    if (!ptr)
        return n_malloc(ctx, n);
    PyGILState_STATE g = PyGILState_Ensure();
    void *p;
    if (odf_heap_owns(heap, ptr)) {
        size_t before = odf_heap_usable(heap, ptr);
        p = odf_heap_realloc(heap, ptr, n ? n : 1);
        if (p)
            np_in_heap += odf_heap_usable(heap, p) - before;
    } else {
        size_t before = malloc_usable_size(ptr);
        p = realloc(ptr, n ? n : 1);
        if (p)
            np_outside += malloc_usable_size(p) - before;
    }
    PyGILState_Release(g);
    return p;
}

static np_handler_t np_handler = {"odfork_user", 1, {NULL, n_malloc, n_calloc, n_realloc, n_free}};

int odf_py_numpy_hook(void)
{
    if (!hooked)
        return EINVAL; /* the heap first */
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = 0;
    PyObject *mod = PyImport_ImportModule("numpy._core._multiarray_umath");
    if (!mod) {
        PyErr_Clear();
        mod = PyImport_ImportModule("numpy.core._multiarray_umath");
    }
    PyObject *api = mod ? PyObject_GetAttrString(mod, "_ARRAY_API") : NULL;
    void **table = api && PyCapsule_CheckExact(api) ? PyCapsule_GetPointer(api, NULL) : NULL;
    if (!table) {
        rc = ENOENT;
    } else if (((unsigned int (*)(void))table[NP_API_FEATURE_VERSION])() < NP_1_22_API_VERSION) {
        rc = ENOTSUP;
    } else {
        PyObject *cap = PyCapsule_New(&np_handler, "mem_handler", NULL);
        PyObject *old = cap ? ((PyObject * (*)(PyObject *)) table[NP_API_SET_HANDLER])(cap) : NULL;
        if (!old)
            rc = EIO;
        Py_XDECREF(old);
        Py_XDECREF(cap);
    }
    if (rc)
        PyErr_Clear();
    Py_XDECREF(api);
    Py_XDECREF(mod);
    PyGILState_Release(g);
    return rc;
}

void odf_py_numpy_stats(size_t *in_heap, size_t *outside)
{
    PyGILState_STATE g = PyGILState_Ensure();
    *in_heap = np_in_heap;
    *outside = np_outside;
    PyGILState_Release(g);
}
