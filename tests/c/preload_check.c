/* A plain C program (nothing of odfork_user in it) that tests/test_preload.py
 * runs with and without the preload library.  It checks the malloc family's
 * contract, fork isolation of heap memory (fork from the main thread and from
 * a thread while others allocate), blocks freed by another thread, threads
 * that exit giving their blocks back, a child killed mid-write, exec after
 * fork, daemonizing, and that a SIGSEGV
 * handler the program installs still gets real crashes.  Prints "in-arena N"
 * (how many of its blocks lie in an odfork arena, from /proc/self/maps) and
 * "ok"; exits non-zero with a message on the first failure.
 *
 *   preload_check            the checks
 *   preload_check crash      installs a SIGSEGV handler, then dereferences NULL
 *   preload_check fds        prints its open descriptors (the exec'd child)
 *   preload_check daemon F   daemonizes, closes every descriptor, forks a writer;
 *                            writes "daemon ok in-arena N" to F when its heap stayed its own
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); exit(2); } while (0)
#define CHECK(c) do { if (!(c)) FAIL("check failed: %s (line %d)", #c, __LINE__); } while (0)

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
        memset(big, 'C', n);      /* the child's writes */
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

int main(int argc, char **argv)
{
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
