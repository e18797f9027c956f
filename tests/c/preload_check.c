/* A plain C program (nothing of odfork_user in it) that tests/test_preload.py
 * runs with and without the preload library.  It checks the malloc family's
 * contract, fork isolation of heap memory (fork from the main thread and from
 * a thread while others allocate), blocks freed by another thread, threads
 * that exit giving their blocks back, a child killed mid-write, exec after
 * fork, daemonizing, and that a SIGSEGV
 * handler the program installs still gets real crashes, and aligned allocations
 * (16 bytes to 2 MiB) as blocks like any other.  Prints "in-arena N"
 * (how many of its blocks lie in an odfork arena, from /proc/self/maps) and
 * "ok"; exits non-zero with a message on the first failure.
 *
 *   preload_check            the checks
 *   preload_check crash      installs a SIGSEGV handler, then dereferences NULL
 *   preload_check fds        prints its open descriptors (the exec'd child)
 *   preload_check daemon F   daemonizes, closes every descriptor, forks a writer;
 *                            writes "daemon ok in-arena N" to F when its heap stayed its own
 *   preload_check mmap       anonymous mappings (ODFORK_MMAP=1 serves them from the arena):
 *                            fresh ones read as zeros, munmap of a head, a tail, a middle,
 *                            madvise(MADV_DONTNEED), mremap, mprotect with a handler that
 *                            lifts it (a read barrier, across a fork), fork isolation, MAP_FIXED;
 *                            prints "mmap in-arena N of M", "mmap other in-arena K", "mmap ok"
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FAIL(...)                                                                                                      \
    do {                                                                                                               \
        fprintf(stderr, __VA_ARGS__);                                                                                  \
        fputc('\n', stderr);                                                                                           \
        exit(2);                                                                                                       \
    } while (0)
#define CHECK(c)                                                                                                       \
    do {                                                                                                               \
        if (!(c))                                                                                                      \
            FAIL("check failed: %s (line %d)", #c, __LINE__);                                                          \
    } while (0)

static uintptr_t pool_lo[64], pool_hi[64];
static int npool;

static void read_maps(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    npool = 0;
    while (f && fgets(line, sizeof(line), f) && npool < 64) {
        unsigned long lo, hi;
        if (strstr(line, "odfork-pool") && sscanf(line, "%lx-%lx", &lo, &hi) == 2) {
            pool_lo[npool] = lo;
            pool_hi[npool++] = hi;
        }
    }
    if (f)
        fclose(f);
}

static int in_arena(const void *p)
{
    for (int i = 0; i < npool; i++)
        if ((uintptr_t)p >= pool_lo[i] && (uintptr_t)p < pool_hi[i])
            return 1;
    return 0;
}

static void on_segv(int sig)
{
    (void)sig;
    static const char msg[] = "program's handler ran\n";
    write(1, msg, sizeof(msg) - 1);
    _exit(3);
}

static volatile int stop;

/* Every byte of a block holds its tag until it is freed: two live blocks that
 * overlap (a block handed out twice) show as a changed tag. */
static void check_tag(const unsigned char *p, size_t n, unsigned char tag)
{
    for (size_t j = 0; j < n; j++)
        if (p[j] != tag)
            FAIL("a live block changed under its owner (byte %zu: %d, not %d)", j, p[j], tag);
}

static void *churn(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *keep[64] = {0};
    size_t len[64] = {0};
    while (!stop) {
        int i = rand_r(&seed) % 64;
        unsigned char tag = (unsigned char)((uintptr_t)arg * 64 + (unsigned)i);
        if (keep[i])
            check_tag(keep[i], len[i], tag);
        free(keep[i]);
        len[i] = (size_t)(rand_r(&seed) % 5000) + 1;
        keep[i] = malloc(len[i]);
        CHECK(keep[i]);
        memset(keep[i], tag, len[i]);
    }
    for (int i = 0; i < 64; i++)
        free(keep[i]);
    return NULL;
}

/* Blocks made by one thread and freed by another (a queue of them). */
#define HANDOFF 20000
static void *handoff_q[HANDOFF];
static size_t handoff_len[HANDOFF];
static volatile int handoff_made;

static void *handoff_free(void *unused)
{
    (void)unused;
    for (int i = 0; i < HANDOFF; i++) {
        while (__atomic_load_n(&handoff_made, __ATOMIC_ACQUIRE) <= i)
            ;
        check_tag(handoff_q[i], handoff_len[i], (unsigned char)(i | 1));
        free(handoff_q[i]);
    }
    return NULL;
}

/* Threads that each make and free 64 blocks of one size, then exit, one
 * after another: the distinct addresses they got (a thread's cached blocks
 * must go back to the heap when it exits, not leak). */
#define SERIAL_THREADS 100
static void *serial_seen[SERIAL_THREADS * 64];

static void *serial_thread(void *arg)
{
    void **seen = serial_seen + (uintptr_t)arg * 64;
    for (int i = 0; i < 64; i++)
        CHECK((seen[i] = malloc(64)));
    for (int i = 0; i < 64; i++)
        free(seen[i]);
    return NULL;
}

static int cmp_ptr(const void *a, const void *b)
{
    uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
    return x < y ? -1 : x > y;
}

static void fork_isolated(char *big, size_t n, const char *who)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (big[0] != 'P' || big[n - 1] != 'P')
            _exit(10);
        memset(big, 'C', n);          /* the child's writes */
        char *more = malloc(1 << 20); /* the child allocates on its own copy of the heap */
        if (!more)
            _exit(11);
        memset(more, 'c', 1 << 20);
        free(more);
        _exit(big[n / 2] == 'C' ? 0 : 12);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        FAIL("%s: child failed (status %#x)", who, st);
    for (size_t i = 0; i < n; i += 4096)
        if (big[i] != 'P')
            FAIL("%s: the child's write reached the parent at %zu", who, i);
}

/* Aligned allocations, every power of two from 16 bytes to the chunk size
 * (2 MiB), small and large, from each of the aligned calls, interleaved with
 * ordinary mallocs: aligned, usable size >= the request, resized and freed as
 * any block, and their bytes their own across a fork (the child checks and
 * rewrites them, the parent's stay).  Prints "aligned in-arena N of M" (how
 * many of the aligned blocks lie in an arena) and the same for alignments
 * above the chunk size (glibc's under the preload too). */
#define NALIGNED 360
static void *al_blk[NALIGNED], *al_plain[NALIGNED];
static size_t al_len[NALIGNED], al_plen[NALIGNED];

static void *aligned_one(int i, size_t align, size_t n)
{
    void *p = NULL;
    switch (i % 4) {
    case 0: CHECK(posix_memalign(&p, align, n) == 0); break;
    case 1: p = aligned_alloc(align, n); break;
    case 2: p = memalign(align, n); break;
    default: p = align == 4096 ? (i & 8 ? valloc(n) : pvalloc(n)) : memalign(align, n); break;
    }
    CHECK(p && ((uintptr_t)p & (align - 1)) == 0 && malloc_usable_size(p) >= n);
    return p;
}

static size_t aligned_size(int i, size_t align)
{
    size_t span = align < 65536 ? 3 * align : 200000; /* within a page, a few pages, past a chunk */
    return 1 + ((size_t)i * 7919u) % span + (i % 5 == 0 ? (size_t)i * 3000u : 0);
}

static void aligned_tags_are(unsigned char base, const char *who)
{
    for (int i = 0; i < NALIGNED; i++) {
        const unsigned char *b = al_blk[i], *q = al_plain[i];
        unsigned char t = (unsigned char)(base + i);
        for (size_t j = 0; j < al_len[i]; j += 97)
            if (b[j] != t)
                FAIL("%s: aligned block %d changed at %zu", who, i, j);
        if (b[al_len[i] - 1] != t || q[0] != (unsigned char)~t || q[al_plen[i] - 1] != (unsigned char)~t)
            FAIL("%s: block %d changed at an end", who, i);
    }
}

static void aligned_tag(unsigned char base)
{
    for (int i = 0; i < NALIGNED; i++) {
        memset(al_blk[i], base + i, al_len[i]);
        memset(al_plain[i], ~(unsigned char)(base + i), al_plen[i]);
    }
}

static void aligned_check(void)
{
    for (int i = 0; i < NALIGNED; i++) {
        size_t align = (size_t)16 << (i % 18); /* 16 .. 2 MiB */
        al_len[i] = aligned_size(i, align);
        al_blk[i] = aligned_one(i, align, al_len[i]);
        al_plen[i] = (size_t)(i * 37 % 5000) + 1;
        CHECK((al_plain[i] = malloc(al_plen[i])));
    }
    aligned_tag(1);
    /* resize a third (realloc keeps the bytes, not the alignment), free and
     * remake another third (the holes between runs are reused) */
    for (int i = 0; i < NALIGNED; i += 3) {
        size_t m = i % 2 ? al_len[i] / 2 + 1 : al_len[i] * 3 + 100;
        unsigned char *q = realloc(al_blk[i], m);
        CHECK(q && malloc_usable_size(q) >= m);
        size_t keep = m < al_len[i] ? m : al_len[i];
        for (size_t j = 0; j < keep; j += 97)
            CHECK(q[j] == (unsigned char)(1 + i));
        CHECK(q[keep - 1] == (unsigned char)(1 + i));
        al_blk[i] = q;
        al_len[i] = m;
    }
    for (int i = 1; i < NALIGNED; i += 3) {
        free(al_blk[i]);
        size_t align = (size_t)16 << ((i + 7) % 18);
        al_len[i] = aligned_size(i + 1, align);
        al_blk[i] = aligned_one(i + 1, align, al_len[i]);
    }
    aligned_tag(1);
    read_maps();
    int inside = 0;
    for (int i = 0; i < NALIGNED; i++)
        inside += in_arena(al_blk[i]);
    /* across a fork: the child sees the parent's bytes, and its writes stay its own */
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        aligned_tags_are(1, "aligned, in the child");
        aligned_tag(101);
        void *own;
        if (posix_memalign(&own, 65536, 65536))
            _exit(11);
        memset(own, 7, 65536);
        aligned_tags_are(101, "aligned, the child's writes");
        free(own);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        FAIL("aligned: child failed (status %#x)", st);
    aligned_tags_are(1, "aligned, the parent after its child");
    for (int i = 0; i < NALIGNED; i++) {
        free(al_blk[i]);
        free(al_plain[i]);
    }
    printf("aligned in-arena %d of %d\n", inside, NALIGNED);
    /* above the chunk size: glibc's, and still a block like any other */
    void *huge_al = NULL;
    CHECK(posix_memalign(&huge_al, (size_t)4 << 20, 100) == 0 && ((uintptr_t)huge_al & ((4 << 20) - 1)) == 0);
    memset(huge_al, 1, 100);
    void *grown = realloc(huge_al, 10000);
    CHECK(grown && ((unsigned char *)grown)[99] == 1);
    read_maps();
    printf("above-chunk aligned in-arena %d\n", in_arena(grown));
    free(grown);
}

static char *g_big;
static size_t g_n;

static void *fork_from_thread(void *unused)
{
    (void)unused;
    fork_isolated(g_big, g_n, "fork from a thread");
    return NULL;
}

/* Daemonize as servers do (fork, the parent exits, setsid, fork again,
 * close every descriptor), allocate, then fork a child that writes the heap:
 * the daemon's bytes must stay its own.  Writes "daemon ok in-arena N" to
 * path (N: how many of its two blocks lie in an arena). */
/* Descriptors open on the preload's memfds (odfork-pool, odfork-ctl), at
 * most 2 of them into fds: how many. */
static int odfork_fds(int fds[2])
{
    int n = 0;
    for (int fd = 0; fd < 1024; fd++) {
        char link[64], got[128];
        snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        ssize_t len = readlink(link, got, sizeof(got) - 1);
        if (len > 0 && (got[len] = 0, strstr(got, "memfd:odfork-"))) {
            if (n < 2)
                fds[n] = fd;
            n++;
        }
    }
    return n;
}

static int daemon_check(const char *path)
{
    size_t n = 8 << 20;
    char *buf = malloc(n);
    CHECK(buf);
    memset(buf, 'D', n);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid > 0)
        _exit(0);
    CHECK(setsid() >= 0);
    pid = fork();
    CHECK(pid >= 0);
    if (pid > 0)
        _exit(0);
    for (int fd = 0; fd < 1024; fd++) /* the preload's own descriptors too */
        close(fd);
    /* what survived: the preload keeps its memfds (close of them is a no-op) */
    int kept[2], nkept = odfork_fds(kept);
    if (nkept > 0) {
        /* dup2 onto one of them: the number becomes the program's, the
         * preload's descriptor moves elsewhere */
        int devnull = open("/dev/null", O_RDWR);
        if (devnull < 0 || dup2(devnull, kept[0]) != kept[0])
            _exit(26);
        char link[64], got[128];
        snprintf(link, sizeof(link), "/proc/self/fd/%d", kept[0]);
        ssize_t len = readlink(link, got, sizeof(got) - 1);
        if (len <= 0 || (got[len] = 0, strcmp(got, "/dev/null")) || odfork_fds(kept) != nkept)
            _exit(27);
        close(devnull);
    }
    char *more = malloc(n); /* the heap after its descriptors are gone */
    if (!more)
        _exit(20);
    memset(more, 'M', n);
    pid = fork();
    if (pid < 0)
        _exit(21);
    if (pid == 0) {
        memset(buf, 'x', n);
        memset(more, 'x', n);
        _exit(0);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        _exit(22);
    for (size_t i = 0; i < n; i += 4096)
        if (buf[i] != 'D' || more[i] != 'M')
            _exit(23);
    read_maps();
    FILE *out = fopen(path, "w");
    if (!out)
        _exit(24);
    fprintf(out, "daemon ok in-arena %d kept %d\n", in_arena(buf) + in_arena(more), nkept);
    _exit(fclose(out) ? 25 : 0);
}

/* ---- anonymous mappings ---- */
#define PG 4096
static volatile int nfaults;
static char *barrier_lo;
static size_t barrier_len;

/* A read barrier as Ruby's GC.compact has: a fault in the protected range lifts the protection. */
static void on_barrier(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    char *a = si->si_addr;
    if (a < barrier_lo || a >= barrier_lo + barrier_len) {
        signal(sig, SIG_DFL);
        return;
    }
    nfaults++;
    if (mprotect((void *)((uintptr_t)a & ~(uintptr_t)(PG - 1)), PG, PROT_READ | PROT_WRITE))
        _exit(40);
}

static char *anon(size_t n)
{
    char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED && ((uintptr_t)p & (PG - 1)) == 0);
    return p;
}

static int all(const char *p, size_t n, char v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return 0;
    return 1;
}

static int mmap_check(void)
{
    int served = 0, total = 0, other = 0;
    /* fresh mappings read as zeros, also where freed ones were */
    for (int i = 0; i < 300; i++) {
        size_t n = (size_t)(1 + i % 37) * PG - (i % 3) * 100;
        char *p = anon(n);
        read_maps();
        served += in_arena(p);
        total++;
        CHECK(all(p, n, 0));
        memset(p, 0xAA, n);
        CHECK(munmap(p, n) == 0);
    }
    /* munmap of a head, a tail, a middle: the rest keeps its bytes; then fresh ones are zeros */
    char *p = anon(12 * PG);
    memset(p, 'h', 12 * PG);
    CHECK(munmap(p, PG) == 0 && munmap(p + 11 * PG, PG) == 0 && munmap(p + 5 * PG, 2 * PG) == 0);
    CHECK(all(p + PG, 4 * PG, 'h') && all(p + 7 * PG, 4 * PG, 'h'));
    for (int i = 0; i < 8; i++) {
        char *q = anon(PG);
        CHECK(all(q, PG, 0));
        memset(q, 'q', PG);
    }
    CHECK(all(p + PG, 4 * PG, 'h') && all(p + 7 * PG, 4 * PG, 'h'));
    CHECK(munmap(p + PG, 4 * PG) == 0 && munmap(p + 7 * PG, 4 * PG) == 0);
    CHECK(munmap(anon(PG) + 1, PG) == -1 && errno == EINVAL);
    /* madvise(MADV_DONTNEED): those pages read as zeros, the others keep their bytes */
    p = anon(8 * PG);
    memset(p, 'd', 8 * PG);
    CHECK(madvise(p + 2 * PG, 3 * PG, MADV_DONTNEED) == 0);
    CHECK(all(p, 2 * PG, 'd') && all(p + 2 * PG, 3 * PG, 0) && all(p + 5 * PG, 3 * PG, 'd'));
    CHECK(madvise(p, 8 * PG, MADV_WILLNEED) == 0 && all(p, 2 * PG, 'd'));
    CHECK(munmap(p, 8 * PG) == 0);
    /* mremap: grow (in place or moved), shrink, grow without MREMAP_MAYMOVE (in place or ENOMEM), move out */
    p = anon(4 * PG);
    memset(p, 'r', 4 * PG);
    char *blocker = anon(PG); /* likely right after p: growing in place is not possible */
    p = mremap(p, 4 * PG, 8 * PG, MREMAP_MAYMOVE);
    CHECK(p != MAP_FAILED && all(p, 4 * PG, 'r') && all(p + 4 * PG, 4 * PG, 0));
    memset(p + 4 * PG, 's', 4 * PG);
    CHECK(mremap(p, 8 * PG, 3 * PG, 0) == p && all(p, 3 * PG, 'r'));
    char *g = mremap(p, 3 * PG, 6 * PG, 0);
    CHECK(g == p || (g == MAP_FAILED && errno == ENOMEM));
    size_t have = g == p ? 6 * PG : 3 * PG;
    if (g == p)
        CHECK(all(p + 3 * PG, 3 * PG, 0));
    p = mremap(p, have, 4 << 20, MREMAP_MAYMOVE); /* above the size served: a kernel mapping */
    CHECK(p != MAP_FAILED && all(p, 3 * PG, 'r') && all(p + have, (4 << 20) - have, 0));
    CHECK(munmap(p, 4 << 20) == 0 && munmap(blocker, PG) == 0);
    /* mprotect: a read barrier (PROT_NONE, lifted by the program's handler), before and after a fork */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_barrier;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGSEGV, &sa, NULL) == 0);
    p = anon(8 * PG);
    memset(p, 'b', 8 * PG);
    barrier_lo = p;
    barrier_len = 8 * PG;
    CHECK(mprotect(p + PG, 2 * PG, PROT_NONE) == 0 && mprotect(p + 4 * PG, PG, PROT_READ) == 0);
    CHECK(p[0] == 'b' && p[PG] == 'b' && nfaults == 1); /* read of a PROT_NONE page */
    p[4 * PG] = 'w';                                    /* write of a PROT_READ page */
    CHECK(nfaults == 2 && p[4 * PG] == 'w');
    CHECK(mprotect(p + 2 * PG, PG, PROT_NONE) == 0 && mprotect(p + 6 * PG, PG, PROT_NONE) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) { /* the protections hold in the child as in the parent */
        int before = nfaults;
        if (p[2 * PG] != 'b' || nfaults != before + 1)
            _exit(41);
        if (p[6 * PG] != 'b' || nfaults != before + 2)
            _exit(44);
        memset(p, 'c', 8 * PG);
        _exit(0);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    if (!WIFEXITED(st) || WEXITSTATUS(st))
        FAIL("protected child: status %d", st);
    int before = nfaults;
    CHECK(p[2 * PG] == 'b' && nfaults == before + 1 && p[6 * PG] == 'b' && nfaults == before + 2);
    CHECK(p[0] == 'b' && p[4 * PG] == 'w' && all(p + 5 * PG, PG, 'b'));
    CHECK(mprotect(p + 3 * PG, PG, PROT_NONE) == 0 && munmap(p, 8 * PG) == 0); /* freed while protected */
    for (int i = 0; i < 16; i++) {
        char *q = anon(PG);
        CHECK(all(q, PG, 0));
        memset(q, 'f', PG);
    }
    barrier_len = 0;
    signal(SIGSEGV, SIG_DFL);
    /* fork isolation: the child sees the parent's bytes and writes its own */
    p = anon(64 * PG);
    memset(p, 'p', 64 * PG);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        if (!all(p, 64 * PG, 'p'))
            _exit(42);
        memset(p, 'c', 64 * PG);
        _exit(all(p, 64 * PG, 'c') ? 0 : 43);
    }
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(all(p, 64 * PG, 'p'));
    /* MAP_FIXED of a fresh anonymous mapping over one: zeros there */
    CHECK(mmap(p + 8 * PG, 2 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) ==
          p + 8 * PG);
    CHECK(all(p + 7 * PG, PG, 'p') && all(p + 8 * PG, 2 * PG, 0) && all(p + 10 * PG, PG, 'p'));
    CHECK(mmap(p, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) == MAP_FAILED &&
          errno == EEXIST);
    CHECK(munmap(p, 64 * PG) == 0);
    /* other mappings stay the kernel's: larger, other flags or protections, an address hint */
    char *o[4];
    o[0] = anon(4 << 20);
    o[1] = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    o[2] = mmap(NULL, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    o[3] = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    read_maps();
    for (int i = 0; i < 4; i++) {
        CHECK(o[i] != MAP_FAILED);
        other += in_arena(o[i]);
    }
    CHECK(all(o[0], 4 << 20, 0) && munmap(o[0], 4 << 20) == 0);
    printf("mmap in-arena %d of %d\nmmap other in-arena %d\nmmap ok\n", served, total, other);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "mmap"))
        return mmap_check();
    if (argc > 2 && !strcmp(argv[1], "daemon"))
        return daemon_check(argv[2]);
    if (argc > 1 && !strcmp(argv[1], "fds")) {
        /* counted before anything allocates (the preload makes its own arena,
         * with its own descriptors, at the first malloc): raw getdents64 */
        char buf[4096];
        int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY), n = 0;
        long got;
        while (dfd >= 0 && (got = syscall(SYS_getdents64, dfd, buf, sizeof(buf))) > 0)
            for (long off = 0; off < got;) {
                struct dirent64 *e = (struct dirent64 *)(buf + off);
                n += e->d_name[0] != '.';
                off += e->d_reclen;
            }
        printf("fds %d\n", n - 1); /* less the directory's own */
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "crash")) {
        signal(SIGSEGV, on_segv); /* installed after start-up, as Redis does */
        char *p = malloc(100);
        memset(p, 1, 100);
        volatile int *null = NULL;
        return *null;
    }

    /* the malloc family's contract */
    char *a = malloc(0);
    CHECK(a);
    free(a);
    a = malloc(100);
    CHECK(a && ((uintptr_t)a & 15) == 0 && malloc_usable_size(a) >= 100);
    int *z = calloc(1000, sizeof(int));
    CHECK(z);
    for (int i = 0; i < 1000; i++)
        CHECK(z[i] == 0);
    volatile size_t huge = (size_t)-1; /* (volatile: the compiler would warn about the constant) */
    CHECK(calloc(huge, 16) == NULL);
    memset(a, 'x', 100);
    a = realloc(a, 100000);
    CHECK(a && a[0] == 'x' && a[99] == 'x');
    a = realloc(a, 10);
    CHECK(a && a[9] == 'x');
    a = reallocarray(a, 100, 100);
    CHECK(a && a[0] == 'x');
    CHECK(reallocarray(NULL, huge, 16) == NULL);
    free(a);
    size_t aligns[] = {8, 16, 32, 64, 128, 4096, 65536};
    for (size_t i = 0; i < sizeof(aligns) / sizeof(*aligns); i++) {
        void *p = NULL;
        CHECK(posix_memalign(&p, aligns[i], 3000) == 0 && ((uintptr_t)p % aligns[i]) == 0);
        memset(p, 1, 3000);
        free(p);
        p = aligned_alloc(aligns[i], 4 * aligns[i]);
        CHECK(p && ((uintptr_t)p % aligns[i]) == 0);
        free(p);
        p = memalign(aligns[i], 50);
        CHECK(p && ((uintptr_t)p % aligns[i]) == 0);
        free(p);
    }
    void *v = valloc(100), *pv = pvalloc(100);
    CHECK(v && pv && ((uintptr_t)v & 4095) == 0 && ((uintptr_t)pv & 4095) == 0);
    free(v);
    free(pv);
    CHECK(posix_memalign((void **)&a, 3, 10) != 0);
    aligned_check();

    /* the heap's blocks, and fork isolation of them */
    g_n = 64 << 20;
    g_big = malloc(g_n);
    CHECK(g_big);
    memset(g_big, 'P', g_n);
    char *small[100];
    for (int i = 0; i < 100; i++) {
        small[i] = malloc((size_t)i * 37 + 1);
        CHECK(small[i]);
    }
    read_maps();
    int inside = in_arena(g_big);
    for (int i = 0; i < 100; i++)
        inside += in_arena(small[i]);
    fork_isolated(g_big, g_n, "fork");

    /* a child killed while it writes the heap: the parent's bytes are its own, and forks go on */
    pid_t victim = fork();
    CHECK(victim >= 0);
    if (victim == 0)
        for (;;)
            memset(g_big, 'K', g_n);
    usleep(20000);
    CHECK(kill(victim, SIGKILL) == 0);
    int vst;
    CHECK(waitpid(victim, &vst, 0) == victim && WIFSIGNALED(vst));
    for (size_t i = 0; i < g_n; i += 4096)
        if (g_big[i] != 'P')
            FAIL("a killed child's write reached the parent at %zu", i);
    fork_isolated(g_big, g_n, "fork after a killed child");

    /* threads allocating while one of them forks */
    pthread_t t[3], f;
    for (int i = 0; i < 3; i++)
        CHECK(pthread_create(&t[i], NULL, churn, (void *)(uintptr_t)(i + 1)) == 0);
    for (int i = 0; i < 5; i++) {
        CHECK(pthread_create(&f, NULL, fork_from_thread, NULL) == 0);
        CHECK(pthread_join(f, NULL) == 0);
    }
    /* and blocks freed by another thread than the one that made them */
    pthread_t freer;
    CHECK(pthread_create(&freer, NULL, handoff_free, NULL) == 0);
    unsigned hseed = 7;
    for (int i = 0; i < HANDOFF; i++) {
        handoff_len[i] = (size_t)(rand_r(&hseed) % 3000) + 1;
        CHECK((handoff_q[i] = malloc(handoff_len[i])));
        memset(handoff_q[i], i | 1, handoff_len[i]);
        __atomic_store_n(&handoff_made, i + 1, __ATOMIC_RELEASE);
    }
    CHECK(pthread_join(freer, NULL) == 0);
    stop = 1;
    for (int i = 0; i < 3; i++)
        CHECK(pthread_join(t[i], NULL) == 0);

    /* threads that exit give their blocks back */
    for (uintptr_t i = 0; i < SERIAL_THREADS; i++) {
        CHECK(pthread_create(&f, NULL, serial_thread, (void *)i) == 0);
        CHECK(pthread_join(f, NULL) == 0);
    }
    qsort(serial_seen, SERIAL_THREADS * 64, sizeof(void *), cmp_ptr);
    int distinct = 0;
    for (int i = 0; i < SERIAL_THREADS * 64; i++)
        distinct += !i || serial_seen[i] != serial_seen[i - 1];
    printf("exited threads' blocks: %d distinct of %d\n", distinct, SERIAL_THREADS * 64);
    CHECK(distinct <= 1000);

    /* exec after fork: no descriptor of the library leaks into the new program */
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        execl("/proc/self/exe", argv[0], "fds", (char *)NULL);
        _exit(127);
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    fflush(stdout);
    for (int i = 0; i < 100; i++)
        free(small[i]);
    free(g_big);
    printf("in-arena %d\nok\n", inside);
    return 0;
}
