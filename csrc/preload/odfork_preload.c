/* odfork_preload.c - an LD_PRELOAD library: the malloc family of an
 * unmodified program served from an arena heap, so that every fork() the
 * program makes (glibc's, children included) is an on-demand fork of its heap.
 *
 *   python -m odfork_user exec [--heap-size 16G] -- CMD ARGS...
 *   LD_PRELOAD=.../odfork_user/_preload...so ODFORK_HEAP_SIZE=16G CMD ARGS...
 *
 * The arena (ODFORK_HEAP_SIZE bytes, default 64G; virtual until used) is made
 * at the first malloc, page mode: at a fork every written chunk becomes a
 * private view of its segment and the kernel copies the 4 KiB pages written
 * afterwards, in parent and child, as after any fork.  A folder thread (one
 * per process, started after the process's first fork) folds views nobody
 * shares back into their segments (<= 2 ms every 20 ms), so that the next
 * fork is O(chunks) again.
 *
 * Interposition: LD_PRELOAD puts these symbols before every library's,
 * jemalloc's included (a program linked with libjemalloc.so calls malloc &c.
 * by name, and the dynamic linker resolves the name here first); jemalloc's
 * own extensions (mallctl, nallocx, ...) stay jemalloc's and describe only
 * what jemalloc still serves.
 *
 * What stays with glibc's allocator (__libc_*): the few allocations made
 * while the arena is being created (the core's own calloc), alignments above
 * 64 bytes (and 32/64-byte alignments above ODF_HEAP_MAX_SMALL), and
 * everything after the heap is full (malloc returns glibc's memory until it
 * too is exhausted; ENOMEM, never corruption).  free() and realloc() tell the
 * two apart by address (the arena's range).
 *
 * Locking: one mutex serialises the heap (heap.c has no lock of its own).  It
 * is held across fork (pthread_atfork, registered after the core's, so its
 * prepare runs first): the child starts with a consistent heap and the mutex
 * free.  The folder takes only the core's locks (a->local, the family lock),
 * never this one, and touches no heap metadata.
 *
 * Signals: the core's SIGSEGV handler must stay in front of the program's
 * (Redis installs a crash reporter): sigaction() and signal() for SIGSEGV are
 * interposed; the program's handler becomes the one the core chains to.
 */
#define _GNU_SOURCE
#include "odfork.h"

#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define FOLD_PERIOD_NS (20ULL * 1000000ULL)
#define FOLD_BUDGET_NS (2ULL * 1000000ULL)

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

static pthread_mutex_t heap_lock = PTHREAD_MUTEX_INITIALIZER;
static odf_arena_t *arena;
static odf_heap_t *heap;
static uintptr_t lo, hi; /* the arena's range, fixed once set */
static _Atomic int state; /* 0 not yet, 1 being made, 2 ready, 3 failed */
static __thread int in_init;
static pthread_t folder;
static int folder_started;

void _odf_write_stderr(const char *msg); /* prim.c (the core is linked into this library) */

static size_t parse_size(const char *s, size_t dflt)
{
    if (!s || !*s)
        return dflt;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    case 't': case 'T': v <<= 40; break;
    default: break;
    }
    return v ? (size_t)v : dflt;
}

static void *fold_loop(void *unused)
{
    (void)unused;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* the program's signals are not this thread's */
    for (;;) {
        struct timespec ts = {0, (long)FOLD_PERIOD_NS};
        nanosleep(&ts, NULL);
        uint32_t left = 0;
        odf_arena_fold_step(arena, FOLD_BUDGET_NS, &left);
    }
    return NULL;
}

static void prepare(void) { pthread_mutex_lock(&heap_lock); }

static void parent(void)
{
    pthread_mutex_unlock(&heap_lock); /* first: pthread_create allocates */
    /* views exist from the first fork on: fold them when nobody shares them
     * (ODFORK_FOLD=0: never) */
    const char *env = getenv("ODFORK_FOLD");
    if (state == 2 && !folder_started && !(env && env[0] == '0'))
        folder_started = pthread_create(&folder, NULL, fold_loop, NULL) == 0;
}

static void child(void)
{
    folder_started = 0; /* threads do not survive a fork; the child starts its own after its first fork */
    pthread_mutex_unlock(&heap_lock);
}

/* Make the arena and the heap; pre: heap_lock held.  0 on success. */
static int init_locked(void)
{
    int s = state;
    if (s == 2 || s == 3)
        return s == 2 ? 0 : -1;
    state = 1;
    in_init = 1;
    size_t size = parse_size(getenv("ODFORK_HEAP_SIZE"), (size_t)64 << 30);
    size = (size + ODF_CHUNK_SIZE - 1) & ~(size_t)(ODF_CHUNK_SIZE - 1);
    int rc = odf_arena_create(size, NULL, &arena);
    if (!rc)
        rc = odf_heap_create(arena, odf_arena_base(arena), size, &heap);
    if (!rc) {
        odf_uffd_enable(1); /* folds hold writers off in the kernel where they can (else PROT_READ) */
        lo = odf_arena_base(arena);
        hi = lo + size;
    }
    /* After the core's handlers (registered by odf_arena_create), so that this
     * prepare runs first; registered even when the arena failed, since a
     * thread may still hold heap_lock for a moment at a fork. */
    int frc = pthread_atfork(prepare, parent, child);
    if (!rc)
        rc = frc;
    in_init = 0;
    if (rc) {
        char msg[160];
        snprintf(msg, sizeof(msg), "odfork_preload: cannot make an arena heap of %zu bytes (%s): "
                 "the program runs on glibc's allocator\n", size, strerror(rc));
        _odf_write_stderr(msg);
        state = 3;
        return -1;
    }
    state = 2;
    return 0;
}

static inline int ours(const void *p) { return (uintptr_t)p >= lo && (uintptr_t)p < hi; }

static void *heap_alloc(size_t n)
{
    if (in_init || state == 3) /* (failed: glibc serves everything, no lock) */
        return NULL;
    void *p = NULL;
    pthread_mutex_lock(&heap_lock);
    if (state == 2 || init_locked() == 0) /* (made: no call on the hot path) */
        p = odf_heap_alloc(heap, n ? n : 1);
    pthread_mutex_unlock(&heap_lock);
    return p;
}

EXPORT void *malloc(size_t n)
{
    void *p = heap_alloc(n);
    return p ? p : __libc_malloc(n);
}

EXPORT void free(void *p)
{
    if (!p)
        return;
    if (ours(p)) {
        pthread_mutex_lock(&heap_lock);
        odf_heap_free(heap, p);
        pthread_mutex_unlock(&heap_lock);
        return;
    }
    __libc_free(p);
}

EXPORT void *calloc(size_t nmemb, size_t size)
{
    if (size && nmemb > SIZE_MAX / size) {
        errno = ENOMEM;
        return NULL;
    }
    size_t n = nmemb * size;
    void *p = heap_alloc(n);
    if (!p)
        return __libc_calloc(nmemb, size);
    memset(p, 0, n); /* freed blocks are reused as they were left */
    return p;
}

static size_t usable(void *p)
{
    if (ours(p)) {
        pthread_mutex_lock(&heap_lock);
        size_t n = odf_heap_usable(heap, p);
        pthread_mutex_unlock(&heap_lock);
        return n;
    }
    /* glibc's block (the __libc_* fallbacks): glibc's answer, not the next
     * library's (jemalloc would misread a glibc pointer) */
    static size_t (*glibc_usable)(void *);
    if (!glibc_usable) {
        void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
        glibc_usable = libc ? (size_t (*)(void *))dlsym(libc, "malloc_usable_size") : NULL;
    }
    return glibc_usable ? glibc_usable(p) : 0;
}

EXPORT void *realloc(void *p, size_t n)
{
    if (!p)
        return malloc(n);
    if (n == 0) {
        free(p);
        return NULL;
    }
    if (!ours(p))
        return __libc_realloc(p, n); /* stays with glibc */
    pthread_mutex_lock(&heap_lock);
    void *q = odf_heap_realloc(heap, p, n);
    size_t old = q ? 0 : odf_heap_usable(heap, p);
    pthread_mutex_unlock(&heap_lock);
    if (q)
        return q;
    /* the heap is full: move the block to glibc */
    q = __libc_malloc(n);
    if (!q)
        return NULL;
    memcpy(q, p, old < n ? old : n);
    free(p);
    return q;
}

EXPORT void *reallocarray(void *p, size_t nmemb, size_t size)
{
    if (size && nmemb > SIZE_MAX / size) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc(p, nmemb * size);
}

EXPORT size_t malloc_usable_size(void *p) { return p ? usable(p) : 0; }

/* The heap's blocks are 16-byte aligned; size classes up to ODF_HEAP_MAX_SMALL
 * are multiples of 64 from slabs that start on a page, so a block of such a
 * class is 64-byte aligned.  Larger alignments come from glibc. */
static void *aligned(size_t align, size_t n)
{
    if (align <= 16)
        return malloc(n);
    if (align <= 64) {
        size_t m = n < 64 ? 64 : (n + 63) & ~(size_t)63;
        if (m <= ODF_HEAP_MAX_SMALL) {
            void *p = heap_alloc(m);
            if (p && ((uintptr_t)p & (align - 1)) == 0)
                return p;
            if (p)
                free(p);
        }
    }
    return __libc_memalign(align, n);
}

EXPORT int posix_memalign(void **out, size_t align, size_t n)
{
    if (align < sizeof(void *) || (align & (align - 1)))
        return EINVAL;
    void *p = aligned(align, n);
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

EXPORT void *aligned_alloc(size_t align, size_t n)
{
    if (!align || (align & (align - 1))) {
        errno = EINVAL;
        return NULL;
    }
    return aligned(align, n);
}

EXPORT void *memalign(size_t align, size_t n)
{
    if (align & (align - 1)) {
        errno = EINVAL;
        return NULL;
    }
    return aligned(align ? align : 1, n);
}

EXPORT void *valloc(size_t n) { return __libc_memalign((size_t)sysconf(_SC_PAGESIZE), n); }

EXPORT void *pvalloc(size_t n)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return __libc_memalign(pg, (n + pg - 1) & ~(pg - 1));
}

/* ---- SIGSEGV: the core's handler stays in front ---- */

EXPORT int sigaction(int sig, const struct sigaction *act, struct sigaction *old)
{
    static int (*real)(int, const struct sigaction *, struct sigaction *);
    static __thread int ensuring; /* the core installs its own handler through here too */
    if (!real)
        real = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    int rc = real(sig, act, old);
    if (rc == 0 && act && sig == SIGSEGV && state == 2 && !ensuring) {
        ensuring = 1;
        odf_handler_ensure(); /* the program's handler becomes the one the core chains to */
        ensuring = 0;
    }
    return rc;
}

EXPORT sighandler_t signal(int sig, sighandler_t handler)
{
    static sighandler_t (*real)(int, sighandler_t);
    if (sig != SIGSEGV) {
        if (!real)
            real = (sighandler_t (*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
        return real(sig, handler);
    }
    struct sigaction sa, old;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, &old) < 0)
        return SIG_ERR;
    return old.sa_handler;
}
