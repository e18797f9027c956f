/* prim.c - primitives every other file uses: the clock, formatting and
 * output that a signal handler may call, signal masks, a full pwrite.
 *
 * Depends on nothing else in the core.  Every function here is
 * async-signal-safe (plain syscalls, no allocation, no locks).
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

uint64_t _odf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* async-signal-safe */
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Async-signal-safe unsigned formatting (no snprintf in a handler). */
char *_odf_fmt_u(char *p, unsigned long long v, int base)
{
    char tmp[32];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % (unsigned)base];
        v /= (unsigned)base;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    *p = 0;
    return p;
}

/* pwrite all of [src, src+len) to fd at off (EINTR retried): 0 or errno. */
int _odf_pwrite_all(int fd, const void *src, size_t len, off_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)src + done, len - done, off + (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? errno : EIO;
        done += (size_t)n;
    }
    return 0;
}

void _odf_fd_path(char *buf, int fd)
{
    memcpy(buf, "/proc/self/fd/", 14);
    _odf_fmt_u(buf + 14, (unsigned)fd, 10);
}

/* Threads of this process (num_threads, field 20 of /proc/self/stat), or 0
 * when it cannot be read.  open/read only: async-signal-safe. */
unsigned _odf_thread_count(void)
{
    char buf[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p || p[1] != ' ')
        return 0;
    p += 2; /* at field 3 */
    for (int field = 3; field < 20; field++) {
        p = strchr(p, ' ');
        if (!p)
            return 0;
        p++;
    }
    unsigned v = 0;
    while (*p >= '0' && *p <= '9')
        v = v * 10 + (unsigned)(*p++ - '0');
    return v;
}

void _odf_block_signals(sigset_t *old)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, old);
}

void _odf_restore_signals(const sigset_t *old) { pthread_sigmask(SIG_SETMASK, old, NULL); }

void _odf_write_stderr(const char *msg)
{
    size_t n = strlen(msg);
    while (n) {
        ssize_t w = write(2, msg, n);
        if (w <= 0)
            return;
        msg += w;
        n -= (size_t)w;
    }
}

/* Threads that write arena memory only under a->local (the folder), counted
 * by whoever starts and stops them (odf_thread_quiet), and the tid of the
 * one that runs (_odf_quiet_tid, set by itself). */
static _Atomic unsigned quiet;
static _Atomic pid_t quiet_tid;

void odf_thread_quiet(int on)
{
    if (on)
        atomic_fetch_add(&quiet, 1);
    else
        atomic_fetch_sub(&quiet, 1);
}

void _odf_quiet_tid(pid_t tid) { atomic_store(&quiet_tid, tid); }

void _odf_quiet_forget(void)
{
    atomic_store(&quiet, 0);
    atomic_store(&quiet_tid, 0);
}

int _odf_only_writer(void)
{
    unsigned n = _odf_thread_count(), q = atomic_load(&quiet);
    pid_t qt = atomic_load(&quiet_tid);
    if (q && qt && qt == (pid_t)syscall(SYS_gettid))
        q--; /* the quiet thread asks: the other threads must all be quiet */
    return n > 0 && n - 1 == q;
}
