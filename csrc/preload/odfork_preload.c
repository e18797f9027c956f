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
 * afterwards, in parent and child, as after any fork.  The core's folder
 * thread (folder.c; one per process, started after the process's first
 * fork, with a full userfaultfd only) folds views nobody
 * shares back into their segments (<= 2 ms every 20 ms; every 2 ms while
 * the budget leaves such views behind), so that the next fork is O(chunks)
 * again.
 *
 * Interposition: LD_PRELOAD puts these symbols before every library's,
 * jemalloc's included (a program linked with libjemalloc.so calls malloc &c.
 * by name, and the dynamic linker resolves the name here first); jemalloc's
 * own extensions (mallctl, nallocx, ...) stay jemalloc's and describe only
 * what jemalloc still serves.
 *
 * What stays with glibc's allocator (__libc_*): the few allocations made
 * while the arena is being created (the core's own calloc), alignments above
 * the chunk size (2 MiB; memalign, posix_memalign, aligned_alloc, valloc and
 * pvalloc up to it are the heap's), and everything after the heap is full (malloc returns glibc's memory until it
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
#include "odfork_heap.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* sys_mman.h (included first into every file, setup.py) renames mmap &c. to
 * their kernel calls for the core and the heap; this file defines the names
 * the program calls, and calls the kernel by the odf_sys_* names. */
#undef mmap
#undef munmap
#undef mremap
#undef mprotect
#undef madvise

#define EXPORT __attribute__((visibility("default")))

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

#define TLS __thread __attribute__((tls_model("initial-exec"))) /* no __tls_get_addr per call */

static pthread_mutex_t heap_lock = PTHREAD_MUTEX_INITIALIZER;
static odf_arena_t *arena;
static odf_heap_t *heap;
static uintptr_t lo, hi;  /* the arena's range, fixed once set */
static _Atomic int state; /* 0 not yet, 1 being made, 2 ready, 3 failed */
static TLS int in_init;
static int can_fold; /* a full userfaultfd: folds can hold every writer off (uffd.c) */
static pthread_mutex_t prot_lock = PTHREAD_MUTEX_INITIALIZER; /* the program's protections (after heap_lock) */
static void prot_reapply(void);

/* ---- thread caches ----
 * Each thread keeps, per size class up to TC_MAX_SIZE bytes, a stack of free
 * blocks (an array in its own glibc-allocated cache, never in the blocks: a
 * free writes nothing into the block, so after a fork it copies no page):
 * malloc and free of a small block take no lock and no atomic when the stack
 * has a block / has room.  An empty stack is refilled with half its capacity
 * under one hold of heap_lock; a full one gives its older half back the same
 * way; a thread's stacks go back to the heap when it exits (a pthread key's
 * destructor).
 * Blocks in a cache are counted live by heap.c.  A child of fork() keeps the
 * forking thread's cache and loses the others' (at most TC_BYTES a class a
 * thread), as with any allocator's thread caches.  ODFORK_TCACHE=0: none. */
#define TC_MAX_SIZE 4096
#define TC_DEPTH    64         /* blocks a stack holds at most */
#define TC_BYTES    (64 << 10) /* and no more bytes than this (and >= 4 blocks) */
typedef struct {
    uint8_t n[ODF_HEAP_NCLASS];
    void *slot[ODF_HEAP_NCLASS][TC_DEPTH];
} tcache_t;
enum { TC_NONE, TC_ON, TC_OFF }; /* TC_OFF: being made, exiting, disabled, or no memory */
static TLS int tc_state;
static TLS tcache_t *tc;
static int tc_classes; /* classes 0..tc_classes-1 are cached; 0: none */
static uint8_t tc_cap[ODF_HEAP_NCLASS];
static pthread_key_t tc_key;

void _odf_write_stderr(const char *msg); /* prim.c (the core is linked into this library) */

static size_t parse_size(const char *s, size_t dflt)
{
    if (!s || !*s)
        return dflt;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    switch (*end) {
    case 'k':
    case 'K': v <<= 10; break;
    case 'm':
    case 'M': v <<= 20; break;
    case 'g':
    case 'G': v <<= 30; break;
    case 't':
    case 'T': v <<= 40; break;
    default: break;
    }
    return v ? (size_t)v : dflt;
}

static void prepare(void)
{
    pthread_mutex_lock(&heap_lock);
    pthread_mutex_lock(&prot_lock);
}

static void parent(void)
{
    prot_reapply(); /* the core's fork remapped writable chunks, and their protections with them */
    pthread_mutex_unlock(&prot_lock);
    pthread_mutex_unlock(&heap_lock); /* first: pthread_create allocates */
    /* views exist from the first fork on: fold them when nobody shares them
     * (ODFORK_FOLD=0: never) */
    const char *env = getenv("ODFORK_FOLD");
    if (state == 2 && can_fold && !(env && env[0] == '0'))
        odf_folder_start(); /* (running already: nothing) */
}

static void child(void)
{
    prot_reapply();
    pthread_mutex_unlock(&prot_lock);
    pthread_mutex_unlock(&heap_lock);
}

static void tc_destroy(void *t);

/* Which classes are cached and how deep; pre: heap_lock held, heap made. */
static void tc_setup(void)
{
    const char *env = getenv("ODFORK_TCACHE");
    if ((env && env[0] == '0') || pthread_key_create(&tc_key, tc_destroy))
        return;
    int c = 0;
    for (; c < ODF_HEAP_NCLASS && odf_heap_class_size(c) <= TC_MAX_SIZE; c++) {
        size_t cap = TC_BYTES / odf_heap_class_size(c);
        tc_cap[c] = (uint8_t)(cap > TC_DEPTH ? TC_DEPTH : cap < 4 ? 4 : cap);
    }
    tc_classes = c;
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
        /* folds hold writers off in the kernel; without a full userfaultfd a
         * fold is refused while other threads run (uffd.c), so no folder then */
        can_fold = odf_uffd_enable(1) == 0;
        lo = odf_arena_base(arena);
        hi = lo + size;
        tc_setup();
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
        snprintf(msg, sizeof(msg),
                 "odfork_preload: cannot make an arena heap of %zu bytes (%s): "
                 "the program runs on glibc's allocator\n",
                 size, strerror(rc));
        _odf_write_stderr(msg);
        state = 3;
        return -1;
    }
    state = 2;
    return 0;
}

static inline int ours(const void *p) { return (uintptr_t)p >= lo && (uintptr_t)p < hi; }

/* Make this thread's cache and register it for the thread's exit: 1 when made. */
static __attribute__((noinline)) int tc_make(void)
{
    if (tc_state == TC_OFF || !tc_classes)
        return 0;
    tc_state = TC_OFF; /* what follows may malloc: those calls take the locked path */
    tcache_t *t = __libc_calloc(1, sizeof(*t));
    if (!t)
        return 0;
    if (pthread_setspecific(tc_key, t)) {
        __libc_free(t);
        return 0;
    }
    tc = t;
    tc_state = TC_ON;
    return 1;
}

/* This thread's cache is usable (made on first use). */
static inline int tc_ready(void) { return tc_state == TC_ON || tc_make(); }

/* Give class c's oldest blocks back until `keep` are left; pre: heap_lock held. */
static void tc_trim_locked(tcache_t *t, int c, unsigned keep)
{
    unsigned n = t->n[c];
    if (n <= keep)
        return;
    for (unsigned i = 0; i < n - keep; i++)
        odf_heap_free(heap, t->slot[c][i]);
    memmove(t->slot[c], t->slot[c] + (n - keep), keep * sizeof(void *));
    t->n[c] = (uint8_t)keep;
}

/* A thread exits: its blocks go back to the heap. */
static void tc_destroy(void *t)
{
    tc_state = TC_OFF; /* later calls of this thread (other destructors) take the locked path */
    tc = NULL;
    pthread_mutex_lock(&heap_lock);
    for (int c = 0; c < tc_classes; c++)
        tc_trim_locked(t, c, 0);
    pthread_mutex_unlock(&heap_lock);
    __libc_free(t);
}

/* Class c's stack is empty: take half its capacity from the heap, return one. */
static void *tc_refill(int c)
{
    size_t size = odf_heap_class_size(c);
    unsigned want = tc_cap[c] / 2u;
    pthread_mutex_lock(&heap_lock);
    void *first = odf_heap_alloc(heap, size);
    while (first && tc->n[c] < want - 1) {
        void *b = odf_heap_alloc(heap, size);
        if (!b)
            break;
        tc->slot[c][tc->n[c]++] = b;
    }
    pthread_mutex_unlock(&heap_lock);
    return first;
}

static void *heap_alloc(size_t n)
{
    if (in_init || state == 3) /* (failed: glibc serves everything, no lock) */
        return NULL;
    if (n <= TC_MAX_SIZE && state == 2 && tc_ready()) {
        int c = odf_heap_class(n ? n : 1);
        if (c < tc_classes) {
            tcache_t *t = tc;
            return t->n[c] ? t->slot[c][--t->n[c]] : tc_refill(c);
        }
    }
    void *p = NULL;
    pthread_mutex_lock(&heap_lock);
    if (state == 2 || init_locked() == 0) /* (made: no call on the hot path) */
        p = odf_heap_alloc(heap, n ? n : 1);
    pthread_mutex_unlock(&heap_lock);
    return p;
}

static void heap_free(void *p)
{
    int c = odf_heap_block_class(heap, p);
    if (c >= 0 && c < tc_classes && tc_ready()) {
        tcache_t *t = tc;
        if (t->n[c] == tc_cap[c]) {
            pthread_mutex_lock(&heap_lock);
            tc_trim_locked(t, c, tc_cap[c] / 2u);
            pthread_mutex_unlock(&heap_lock);
        }
        t->slot[c][t->n[c]++] = p;
        return;
    }
    pthread_mutex_lock(&heap_lock);
    odf_heap_free(heap, p);
    pthread_mutex_unlock(&heap_lock);
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
        heap_free(p);
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
    if (ours(p))
        return odf_heap_usable(heap, p); /* (no lock: the caller owns the block) */
    /* glibc's block (the __libc_* fallbacks): glibc's answer, not the next
     * library's (jemalloc would misread a glibc pointer) */
    static size_t (*glibc_usable)(void *);
    if (!glibc_usable) {
        void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
        glibc_usable = libc ? (size_t(*)(void *))dlsym(libc, "malloc_usable_size") : NULL;
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

/* Any power-of-two alignment up to the chunk size (2 MiB) is the heap's
 * (odf_heap_alloc_aligned: a size class that is a multiple of it, or a run of
 * pages that starts on a multiple of it), so a language runtime that
 * allocates its object pages aligned (Ruby's 64 KiB heap pages) keeps them in
 * the arena.  Above the chunk size, glibc's memalign serves (the heap's page
 * runs are aligned to at most a chunk), as it does once the heap is full. */
static void *aligned(size_t align, size_t n)
{
    if (align <= 16)
        return malloc(n);
    void *p = NULL;
    if (align <= ODF_CHUNK_SIZE && !in_init && state != 3) {
        pthread_mutex_lock(&heap_lock);
        if ((state == 2 || init_locked() == 0) && odf_heap_alloc_aligned(heap, align, n, &p))
            p = NULL;
        pthread_mutex_unlock(&heap_lock);
    }
    return p ? p : __libc_memalign(align, n);
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

EXPORT void *valloc(size_t n) { return aligned((size_t)sysconf(_SC_PAGESIZE), n); }

EXPORT void *pvalloc(size_t n)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    if (n > SIZE_MAX - pg) {
        errno = ENOMEM;
        return NULL;
    }
    return aligned(pg, n ? (n + pg - 1) & ~(pg - 1) : pg);
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
            real = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
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

/* ---- descriptors: the arena's stay open ----
 * A daemon closes every descriptor after it forks; without the pool and
 * control memfds its arena could not map a view at its next fork (reopening
 * them from /proc/self/map_files needs CAP_CHECKPOINT_RESTORE).  close(),
 * close_range() and closefrom() of the arena's descriptors succeed without
 * closing them (the numbers stay taken, so nothing else is given them), and
 * dup2()/dup3() onto one move the arena's descriptor to another number first.
 * A program that closes them by a raw system call loses them, as before:
 * forks then fall back to read-only chunks that copy on first write (or fail
 * with EBADF where a segment must be mapped). */

/* The arena's two descriptors, lower first, in k[2] (-1 when none). */
static void kept_fds(int k[2])
{
    k[0] = k[1] = -1;
    if (state == 2)
        odf_arena_fds(arena, &k[0], &k[1]);
    if (k[0] > k[1]) {
        int t = k[0];
        k[0] = k[1];
        k[1] = t;
    }
}

static int kept_fd(int fd)
{
    int k[2];
    kept_fds(k);
    return fd >= 0 && (fd == k[0] || fd == k[1]);
}

EXPORT int close(int fd)
{
    if (kept_fd(fd))
        return 0;
    return (int)syscall(SYS_close, fd);
}

/* close_range(2) over [first, last] less the arena's descriptors: at most
 * three calls. */
static int close_range_kept(unsigned first, unsigned last, int flags)
{
    int k[2];
    kept_fds(k);
    if (flags & CLOSE_RANGE_CLOEXEC) /* close-on-exec: the arena's are already */
        return (int)syscall(SYS_close_range, first, last, flags);
    unsigned lo = first;
    for (int i = 0; i < 2 && lo <= last; i++) {
        if (k[i] < 0 || (unsigned)k[i] < lo || (unsigned)k[i] > last)
            continue;
        if ((unsigned)k[i] > lo && syscall(SYS_close_range, lo, (unsigned)k[i] - 1, flags) < 0)
            return -1;
        if ((unsigned)k[i] == last)
            return 0;
        lo = (unsigned)k[i] + 1;
    }
    return lo <= last ? (int)syscall(SYS_close_range, lo, last, flags) : 0;
}

EXPORT int close_range(unsigned first, unsigned last, int flags) { return close_range_kept(first, last, flags); }

EXPORT void closefrom(int lowfd)
{
    if (lowfd < 0)
        lowfd = 0;
    close_range_kept((unsigned)lowfd, ~0U, 0);
}

static int free_fd_for(int newfd)
{
    if (!kept_fd(newfd))
        return 0;
    int rc = odf_arena_move_fd(arena, newfd);
    if (rc) {
        errno = rc;
        return -1;
    }
    return 0;
}

EXPORT int dup2(int oldfd, int newfd)
{
    if (oldfd == newfd)
        return fcntl(oldfd, F_GETFD) < 0 ? -1 : newfd;
    if (free_fd_for(newfd))
        return -1;
    return (int)syscall(SYS_dup3, oldfd, newfd, 0);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
    if (oldfd != newfd && free_fd_for(newfd))
        return -1;
    return (int)syscall(SYS_dup3, oldfd, newfd, flags);
}

/* ---- anonymous mappings (ODFORK_MMAP=1, `exec --mmap`) ----
 * A language runtime that takes its object pages from mmap (Ruby: 32 KiB,
 * trimmed to 16 KiB alignment by munmap) keeps them outside the arena, and
 * each fork copies their page tables.  With ODFORK_MMAP=1, mmap(NULL, len,
 * PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) with len up to
 * ODFORK_MMAP_MAX (default 1M) is a mapped run of the heap (odf_heap_map):
 * zeroed, page aligned, in the arena.  Any other mmap (an address hint, other
 * flags or protections, a file, larger) is the kernel's, as is every call
 * before the arena exists or after the heap is full.  On arena addresses:
 *   munmap   frees the served pages of the range (any whole pages: a head, a
 *            tail, a middle); other arena pages in it are left alone (they
 *            are malloc's: the program has no mapping of its own there);
 *   mremap   of served pages only: shrinks in place, grows in place when the
 *            pages after are free, else moves (MREMAP_MAYMOVE: new run or
 *            kernel mapping, copy, free) or fails with ENOMEM; EFAULT for a
 *            range that is not all served or has protections of the
 *            program's, EINVAL for MREMAP_FIXED/MREMAP_DONTUNMAP;
 *   madvise  MADV_DONTNEED/MADV_FREE/MADV_REMOVE zero served pages (as for
 *            private anonymous memory), other advice on them is ignored;
 *            pages not served go to the kernel as before;
 *   mprotect applied by the core under its lock (odf_arena_protect) and
 *            remembered per page (`uprot`): faults on such pages go to the
 *            program's handler (Ruby's GC.compact read barrier), no fold
 *            remaps their chunks, and after each fork they are put back in
 *            parent and child (the fork remapped the chunks); freed pages
 *            get PROT_READ|PROT_WRITE back;
 *   mmap MAP_FIXED over served pages: anonymous private read-write is
 *            served in place (zeroed); anything else there is refused with
 *            ENOMEM (it would replace the arena's mappings).
 * Parts of a range outside the arena always go to the kernel. */
#define PG 4096UL
static int mmap_on;
static size_t mmap_max = 1UL << 20;
static uint8_t *uprot;    /* [arena pages]: 0, or the program's protection + 1 (under prot_lock) */
static uint32_t *uprot_n; /* [chunks]: pages with one */
static size_t uprot_total;

__attribute__((constructor)) static void mmap_env(void)
{
    const char *env = getenv("ODFORK_MMAP");
    mmap_on = env && env[0] == '1';
    mmap_max = parse_size(getenv("ODFORK_MMAP_MAX"), mmap_max);
}

static inline int arena_overlaps(uintptr_t a, size_t len) { return state == 2 && a < hi && a + len > lo; }

/* The parts of [a, a+len) below and above the arena go to `kernel`; *ma, *ml: the part inside. */
static int split(uintptr_t a, size_t len, uintptr_t *ma, size_t *ml, int (*kernel)(uintptr_t, size_t, int), int arg)
{
    uintptr_t e = a + len;
    if (a < lo && kernel(a, lo - a, arg) < 0)
        return -1;
    if (e > hi && kernel(hi, e - hi, arg) < 0)
        return -1;
    *ma = a < lo ? lo : a;
    *ml = (e > hi ? hi : e) - *ma;
    return 0;
}

static int k_munmap(uintptr_t a, size_t l, int unused) { return odf_sys_munmap((void *)a, l); }
static int k_mprotect(uintptr_t a, size_t l, int prot) { return odf_sys_mprotect((void *)a, l, prot); }
static int k_madvise(uintptr_t a, size_t l, int adv) { return odf_sys_madvise((void *)a, l, adv); }

/* Record prot for the arena pages [a, a+len) and apply it, chunk by chunk;
 * pre: prot_lock held.  0 or errno. */
static int protect_locked(uintptr_t a, size_t len, int prot)
{
    size_t npages = (hi - lo) / PG;
    if (!uprot && prot != (PROT_READ | PROT_WRITE)) {
        uprot = odf_sys_mmap(NULL, npages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        uprot_n = odf_sys_mmap(NULL, (npages / 512) * 4, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (uprot == MAP_FAILED || uprot_n == MAP_FAILED) {
            uprot = NULL;
            return ENOMEM;
        }
    }
    uint8_t v = prot == (PROT_READ | PROT_WRITE) ? 0 : (uint8_t)(prot + 1);
    for (uintptr_t c = a & ~(ODF_CHUNK_SIZE - 1); c < a + len; c += ODF_CHUNK_SIZE) {
        uintptr_t s = c > a ? c : a, e = c + ODF_CHUNK_SIZE < a + len ? c + ODF_CHUNK_SIZE : a + len;
        size_t ci = (c - lo) / ODF_CHUNK_SIZE;
        uint32_t n = uprot ? uprot_n[ci] : 0;
        if (uprot)
            for (uintptr_t p = s; p < e; p += PG) {
                uint8_t *u = &uprot[(p - lo) / PG];
                n += (v != 0) - (*u != 0);
                *u = v;
            }
        int rc = odf_arena_protect(arena, s, e - s, prot, n > 0);
        if (rc)
            return rc; /* (the map may then say more than the kernel: a later mprotect fixes both) */
        if (uprot) {
            uprot_total += (size_t)n - uprot_n[ci];
            uprot_n[ci] = n;
        }
    }
    return 0;
}

/* After a fork (both sides): put the program's protections back.  pre: prot_lock held. */
static void prot_reapply(void)
{
    if (!uprot_total)
        return;
    size_t nchunks = (hi - lo) / ODF_CHUNK_SIZE;
    for (size_t ci = 0; ci < nchunks; ci++) {
        if (!uprot_n[ci])
            continue;
        size_t p0 = ci * 512;
        for (size_t p = p0; p < p0 + 512;) {
            uint8_t v = uprot[p];
            size_t q = p + 1;
            while (q < p0 + 512 && uprot[q] == v)
                q++;
            if (v)
                odf_sys_mprotect((void *)(lo + p * PG), (q - p) * PG, v - 1);
            p = q;
        }
    }
}

/* Does any page of [a, a+len) in the arena hold a protection of the program's?  pre: prot_lock held. */
static int protected_locked(uintptr_t a, size_t len)
{
    if (!uprot_total)
        return 0;
    for (uintptr_t p = a; p < a + len; p += PG)
        if (uprot[(p - lo) / PG])
            return 1;
    return 0;
}

/* Served pages of [a, a+len) that the program protected get PROT_READ|PROT_WRITE
 * back (they are about to be freed or zeroed).  pre: heap_lock held. */
static void unprotect_served(uintptr_t a, size_t len)
{
    pthread_mutex_lock(&prot_lock);
    if (protected_locked(a, len))
        for (uintptr_t p = a; p < a + len; p += PG)
            if (uprot[(p - lo) / PG] && odf_heap_mapped(heap, (void *)p, PG))
                protect_locked(p, PG, PROT_READ | PROT_WRITE);
    pthread_mutex_unlock(&prot_lock);
}

static int fail(int e)
{
    errno = e;
    return -1;
}

static void *serve(size_t len)
{
    void *p = NULL;
    pthread_mutex_lock(&heap_lock);
    if (state == 2 || init_locked() == 0)
        p = odf_heap_map(heap, len);
    pthread_mutex_unlock(&heap_lock);
    return p;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (mmap_on && !in_init && state != 3) {
        if (!addr && prot == (PROT_READ | PROT_WRITE) && flags == (MAP_PRIVATE | MAP_ANONYMOUS) && fd == -1 && !off &&
            len && len <= mmap_max) {
            void *p = serve(len);
            if (p)
                return p;
        } else if ((flags & MAP_FIXED) && arena_overlaps((uintptr_t)addr, len)) {
            /* over arena pages: only a fresh anonymous mapping of served pages can be had there */
            uintptr_t a = (uintptr_t)addr;
            size_t l = (len + PG - 1) & ~(PG - 1);
            if (prot != (PROT_READ | PROT_WRITE) || (flags & ~MAP_FIXED) != (MAP_PRIVATE | MAP_ANONYMOUS) ||
                (a & (PG - 1)) || a < lo || a + l > hi) {
                errno = ENOMEM;
                return MAP_FAILED;
            }
            pthread_mutex_lock(&heap_lock);
            int all = odf_heap_mapped(heap, addr, l) == l;
            if (all) {
                unprotect_served(a, l);
                memset(addr, 0, l);
            }
            pthread_mutex_unlock(&heap_lock);
            if (all)
                return addr;
            errno = ENOMEM;
            return MAP_FAILED;
        }
    }
    return odf_sys_mmap(addr, len, prot, flags, fd, off);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return mmap(addr, len, prot, flags, fd, off);
}

EXPORT int munmap(void *addr, size_t len)
{
    uintptr_t a = (uintptr_t)addr, ma;
    size_t ml;
    if (!mmap_on || !arena_overlaps(a, len))
        return odf_sys_munmap(addr, len);
    if ((a & (PG - 1)) || !len)
        return fail(EINVAL);
    len = (len + PG - 1) & ~(PG - 1);
    if (split(a, len, &ma, &ml, k_munmap, 0) < 0)
        return -1;
    pthread_mutex_lock(&heap_lock);
    unprotect_served(ma, ml);
    odf_heap_unmap(heap, (void *)ma, ml);
    pthread_mutex_unlock(&heap_lock);
    return 0;
}

EXPORT int mprotect(void *addr, size_t len, int prot)
{
    uintptr_t a = (uintptr_t)addr, ma;
    size_t ml;
    if (!mmap_on || !arena_overlaps(a, len))
        return odf_sys_mprotect(addr, len, prot);
    if (a & (PG - 1))
        return fail(EINVAL);
    len = (len + PG - 1) & ~(PG - 1);
    if (split(a, len, &ma, &ml, k_mprotect, prot) < 0)
        return -1;
    pthread_mutex_lock(&prot_lock);
    int rc = protect_locked(ma, ml, prot);
    pthread_mutex_unlock(&prot_lock);
    return rc ? fail(rc) : 0;
}

/* Zero served pages [a, a+len) (all served; pre: heap_lock held). */
static void zero_served(uintptr_t a, size_t len)
{
    pthread_mutex_lock(&prot_lock);
    int prot = protected_locked(a, len);
    pthread_mutex_unlock(&prot_lock);
    if (!prot) {
        memset((void *)a, 0, len);
        return;
    }
    for (uintptr_t p = a; p < a + len; p += PG) { /* a protected page: opened, zeroed, closed again */
        pthread_mutex_lock(&prot_lock);
        uint8_t v = uprot[(p - lo) / PG];
        if (v)
            protect_locked(p, PG, PROT_READ | PROT_WRITE);
        memset((void *)p, 0, PG);
        if (v)
            protect_locked(p, PG, v - 1);
        pthread_mutex_unlock(&prot_lock);
    }
}

EXPORT int madvise(void *addr, size_t len, int advice)
{
    uintptr_t a = (uintptr_t)addr, ma;
    size_t ml;
    if (!mmap_on || !arena_overlaps(a, len))
        return odf_sys_madvise(addr, len, advice);
    if (a & (PG - 1))
        return fail(EINVAL);
    len = (len + PG - 1) & ~(PG - 1);
    if (split(a, len, &ma, &ml, k_madvise, advice) < 0)
        return -1;
    int zero = advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE;
    pthread_mutex_lock(&heap_lock);
    for (uintptr_t p = ma; p < ma + ml;) { /* runs of served / other pages */
        int served = odf_heap_mapped(heap, (void *)p, PG) != 0;
        uintptr_t q = p + PG;
        while (q < ma + ml && (odf_heap_mapped(heap, (void *)q, PG) != 0) == served)
            q += PG;
        if (served && zero)
            zero_served(p, q - p);
        else if (!served && odf_sys_madvise((void *)p, q - p, advice) < 0) {
            int e = errno;
            pthread_mutex_unlock(&heap_lock);
            return fail(e);
        }
        p = q;
    }
    pthread_mutex_unlock(&heap_lock);
    return 0;
}

EXPORT void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
    void *fixed = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        fixed = va_arg(ap, void *);
        va_end(ap);
    }
    uintptr_t a = (uintptr_t)old;
    if (!mmap_on || !arena_overlaps(a, old_len ? old_len : 1))
        return odf_sys_mremap(old, old_len, new_len, flags, fixed);
    size_t ol = (old_len + PG - 1) & ~(PG - 1), nl = (new_len + PG - 1) & ~(PG - 1);
    if ((a & (PG - 1)) || !new_len || !old_len || (flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP))) {
        errno = EINVAL;
        return MAP_FAILED;
    }
    pthread_mutex_lock(&heap_lock);
    pthread_mutex_lock(&prot_lock);
    int prot = protected_locked(a, ol);
    pthread_mutex_unlock(&prot_lock);
    int rc = 0;
    void *res = old;
    if (a < lo || a + ol > hi || odf_heap_mapped(heap, old, ol) != ol || prot)
        rc = EFAULT; /* not one mapping of the program's, as the kernel would say */
    else if (flags & (MREMAP_FIXED | MREMAP_DONTUNMAP))
        rc = EINVAL;
    else if (nl < ol)
        odf_heap_unmap(heap, (void *)(a + nl), ol - nl);
    else if (nl > ol && odf_heap_map_grow(heap, old, ol, nl)) {
        if (!(flags & MREMAP_MAYMOVE))
            rc = ENOMEM;
        else if (!(res = nl <= mmap_max ? odf_heap_map(heap, nl) : NULL)) {
            res = odf_sys_mmap(NULL, nl, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (res == MAP_FAILED)
                rc = errno;
        }
        if (!rc) {
            memcpy(res, old, ol);
            odf_heap_unmap(heap, old, ol);
        }
    }
    pthread_mutex_unlock(&heap_lock);
    if (rc) {
        errno = rc;
        return MAP_FAILED;
    }
    return res;
}
