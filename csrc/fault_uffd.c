/* fault_uffd.c - faults taken by the kernel on a process's behalf (read(2),
 * recv_into, readv into arena memory), delivered through userfaultfd.
 *
 * Why: a shared chunk mapped PROT_READ traps user-space writes with SIGSEGV,
 * but a write the kernel makes (copy_to_user) into a read-only VMA fails with
 * EFAULT before any handler runs.  With userfaultfd a shared chunk stays
 * PROT_READ|PROT_WRITE and is *registered* instead (MISSING | MINOR | WP):
 *   - it has no page-table entries after a fork (parking moved them away, a
 *     child inherits none), so the first access of any kind, by user code or
 *     by the kernel, is a userfault;
 *   - a read is resolved by UFFDIO_CONTINUE of the whole chunk in
 *     write-protect mode (its 512 entries installed read-only in one call,
 *     measured ~150 us per chunk, the same as 512 read faults);
 *   - a write (or a write-protect fault on those entries) is resolved by
 *     _odf_fault, the same copy-on-write or reuse as the SIGSEGV path, which
 *     leaves a plain writable mapping (a new VMA, not registered);
 *   - then UFFDIO_WAKE: the faulting thread retries, in user or kernel mode.
 * A userfault is served by one handler thread per process (every signal
 * blocked), which takes a->local and the family lock like the SIGSEGV
 * handler does.  Code that holds a->local never touches arena memory, not
 * even through the kernel (copies go pool fd to pool fd), so the handler
 * thread never waits for a thread that waits for it.
 *
 * Fork: registrations are per address space and are dropped in a child (we
 * do not ask for UFFD_FEATURE_EVENT_FORK: its descriptor would go to the
 * parent's handler, which cannot map anything in the child).  The child's
 * at-fork handler opens its own descriptor, starts its own thread and
 * registers every resident chunk before fork() returns; until then only the
 * forking thread exists and it runs nothing but the at-fork handlers.  If
 * any of that fails the child's chunks are made PROT_READ instead (the
 * SIGSEGV path; kernel writes then fail with EFAULT, never leak).
 *
 * Needs a full userfaultfd: a UFFD_USER_MODE_ONLY one never sees faults
 * taken inside system calls.  odf_uffd_probe() says whether this process can
 * have one (root, CAP_SYS_PTRACE, /dev/userfaultfd access, or
 * vm.unprivileged_userfaultfd=1) with the features used here.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Newer than some installed kernel headers; values from the kernel ABI. */
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#define NEEDED_FEATURES                                                                            \
    (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |      \
     UFFD_FEATURE_PAGEFAULT_FLAG_WP)
#define REG_MODES (UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP)
#define PAGE 4096UL

static int uffd = -1;     /* this process's descriptor, or -1 */
/* Held by the handler thread while it uses an arena it found in the registry,
 * and by odf_arena_close around taking the arena out of it: once that is done
 * the thread holds no pointer to the arena, which may then be freed. */
static pthread_mutex_t use_lock = PTHREAD_MUTEX_INITIALIZER;
static int uffd_wanted;   /* arenas created from now on use it (odf_uffd_enable) */
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;

/* A full (kernel-fault) userfaultfd, handshaken for NEEDED_FEATURES; -errno. */
static int open_full(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int err = errno;
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0)
            return -(err == ENOSYS ? ENOSYS : EPERM);
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        err = errno;
        close(dev);
        if (fd < 0)
            return -err;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = NEEDED_FEATURES};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int err = errno;
        close(fd);
        return -(err == EINVAL ? EOPNOTSUPP : err);
    }
    return fd;
}

int odf_uffd_probe(void)
{
    int fd = open_full();
    if (fd < 0)
        return -fd;
    /* Register one page of shmem the way arenas do; the kernel answers with
     * the operations the range supports. */
    int rc = 0, mfd = memfd_create("odfork-probe", MFD_CLOEXEC);
    void *p = MAP_FAILED;
    if (mfd < 0 || ftruncate(mfd, PAGE) < 0 ||
        (p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0)) == MAP_FAILED) {
        rc = errno;
    } else {
        struct uffdio_register r = {.range = {(uintptr_t)p, PAGE}, .mode = REG_MODES};
        if (ioctl(fd, UFFDIO_REGISTER, &r) < 0)
            rc = errno == EINVAL ? EOPNOTSUPP : errno;
        else if (!(r.ioctls & ((__u64)1 << _UFFDIO_CONTINUE)) ||
                 !(r.ioctls & ((__u64)1 << _UFFDIO_WRITEPROTECT)))
            rc = EOPNOTSUPP;
    }
    if (p != MAP_FAILED)
        munmap(p, PAGE);
    if (mfd >= 0)
        close(mfd);
    close(fd);
    return rc;
}

int odf_uffd_enable(int on)
{
    if (on) {
        int rc = odf_uffd_probe();
        if (rc)
            return rc;
    }
    uffd_wanted = on ? 1 : 0;
    return 0;
}

int _odf_uffd_wanted(void) { return uffd_wanted; }

void _odf_uffd_use_lock(int lock)
{
    if (lock)
        pthread_mutex_lock(&use_lock);
    else
        pthread_mutex_unlock(&use_lock);
}

int odf_arena_uffd(const odf_arena_t *a) { return a->uffd; }

/* ---- the handler thread ---- */

/* Background folding (page mode): a chunk made private by a first write is
 * copied back into an exclusive segment once the process has been quiet for
 * FOLD_QUIET_MS (no userfault), or at the latest FOLD_EVERY_MS after the last
 * fold, FOLD_BATCH chunks at a time with the locks released in between.
 * Only processes that have forked fold: a fold pays a 2 MiB copy so that the
 * *next* fork parks the chunk in O(1) instead of copying its page tables page
 * by page, which a process that never forks does not need (a child reading
 * its whole heap would otherwise copy every chunk again; measured with
 * bench/heap_worker.py).  A child that forks later pays for its unfolded
 * chunks once, at that first fork.  Short-lived writers (a test, a fuzz
 * input) exit before any fold. */
#define FOLD_QUIET_MS 20
#define FOLD_EVERY_MS 200
#define FOLD_BATCH 8
#define SPIN_NS (50 * 1000ULL)
static _Atomic int fold_quiet_ms = FOLD_QUIET_MS;

int odf_set_fold_quiet_ms(int ms)
{
    int old = atomic_exchange(&fold_quiet_ms, ms);
    return old;
}

static int fold_pending(void)
{
    if (atomic_load(&fold_quiet_ms) < 0)
        return 0;
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (a && a->uffd && a->has_private && !a->orphaned)
            return 1; /* (look again every quiet period: a fork may make it eligible) */
    }
    return 0;
}

static void fold_batch(void)
{
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (a && a->uffd && a->has_private && !a->orphaned && a->n_forks)
            _odf_fold_some(a, FOLD_BATCH);
    }
}

static void *serve(void *arg)
{
    int fd = (int)(intptr_t)arg;
    struct uffd_msg msgs[16];
    uint64_t last_fold = _odf_now_ns(), spin_until = 0;
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        pthread_mutex_lock(&use_lock);
        int pending = fold_pending();
        pthread_mutex_unlock(&use_lock);
        int quiet = atomic_load(&fold_quiet_ms);
        int n_ready;
        if (spin_until) { /* spinning: look without sleeping, yield the CPU between looks */
            n_ready = poll(&pfd, 1, 0);
            if (n_ready == 0) {
                if (_odf_now_ns() < spin_until) {
                    sched_yield();
                    continue;
                }
                spin_until = 0;
            }
        }
        if (!spin_until)
            n_ready = poll(&pfd, 1, pending ? (quiet > 0 ? quiet : 1) : -1);
        if (n_ready < 0 && errno != EINTR)
            return NULL;
        if (pending && (n_ready == 0 || _odf_now_ns() - last_fold > FOLD_EVERY_MS * 1000000ULL)) {
            pthread_mutex_lock(&use_lock);
            fold_batch();
            pthread_mutex_unlock(&use_lock);
            last_fold = _odf_now_ns();
            if (n_ready <= 0)
                continue;
        }
        if (n_ready <= 0)
            continue;
        if (pfd.revents & (POLLERR | POLLNVAL))
            return NULL; /* descriptor closed: a newer one has its own thread */
        ssize_t n = read(fd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return NULL;
        }
        /* after this batch, stay awake 50 us: faults come in bursts (a writer
         * touching chunk after chunk), and waking a sleeping thread costs
         * ~0.1-0.5 ms on this VM */
        spin_until = _odf_now_ns() + SPIN_NS;
        for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t fl = msgs[i].arg.pagefault.flags;
            pthread_mutex_lock(&use_lock);
            _odf_uffd_fault(fd, (uintptr_t)msgs[i].arg.pagefault.address,
                            (fl & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP)) != 0);
            pthread_mutex_unlock(&use_lock);
        }
    }
}

/* Open this process's descriptor and start its thread, once.  pre: none. */
int _odf_uffd_start(void)
{
    int rc = 0;
    pthread_mutex_lock(&start_lock);
    if (uffd < 0) {
        int fd = open_full();
        if (fd < 0) {
            rc = -fd;
        } else {
            pthread_t t;
            pthread_attr_t at;
            sigset_t all, old;
            pthread_attr_init(&at);
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&at, 256 * 1024);
            sigfillset(&all);
            pthread_sigmask(SIG_BLOCK, &all, &old); /* the thread starts with every signal blocked */
            rc = pthread_create(&t, &at, serve, (void *)(intptr_t)fd);
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            pthread_attr_destroy(&at);
            if (rc)
                close(fd);
            else
                uffd = fd;
        }
    }
    pthread_mutex_unlock(&start_lock);
    return rc;
}

/* ---- operations used by the fault and fork code (async-signal-safe) ---- */

int _odf_uffd_register(uintptr_t addr, size_t len)
{
    struct uffdio_register r = {.range = {addr, len}, .mode = REG_MODES};
    return ioctl(uffd, UFFDIO_REGISTER, &r) < 0 ? errno : 0;
}

int _odf_uffd_register_wp(uintptr_t addr, size_t len)
{
    struct uffdio_register r = {.range = {addr, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    return ioctl(uffd, UFFDIO_REGISTER, &r) < 0 ? errno : 0;
}

void _odf_uffd_wake_self(uintptr_t addr, size_t len) { _odf_uffd_wake(uffd, addr, len); }

int _odf_uffd_unregister(uintptr_t addr, size_t len)
{
    struct uffdio_range r = {addr, len};
    return ioctl(uffd, UFFDIO_UNREGISTER, &r) < 0 ? errno : 0;
}

/* Write-protect the entries present in a registered range (a fallback; the
 * normal path has none present). */
int _odf_uffd_wp(uintptr_t addr, size_t len)
{
    struct uffdio_writeprotect w = {.range = {addr, len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    return ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0 ? errno : 0;
}

void _odf_uffd_wake(int fd, uintptr_t addr, size_t len)
{
    struct uffdio_range r = {addr, len};
    ioctl(fd, UFFDIO_WAKE, &r);
}

/* Install the entries of chunk `addr` (segment `seg`) write-protected.
 * Pages some entry already maps are skipped; holes of the segment are
 * allocated first (as zeros: a MINOR continue needs a page to map). */
int _odf_uffd_map_wp(odf_arena_t *a, uintptr_t addr, uint32_t seg)
{
    size_t pos = 0;
    int filled = 0;
    while (pos < ODF_CHUNK_SIZE) {
        struct uffdio_continue cc = {.range = {addr + pos, ODF_CHUNK_SIZE - pos},
                                     .mode = UFFDIO_CONTINUE_MODE_WP};
        if (ioctl(uffd, UFFDIO_CONTINUE, &cc) == 0)
            return 0;
        int err = errno;
        if (cc.mapped > 0)
            pos += (size_t)cc.mapped;
        if (err == EAGAIN)
            continue;
        if (err == EEXIST) {
            pos += PAGE;
            continue;
        }
        if ((err == EFAULT || err == ENOENT) && !filled) {
            filled = 1;
            if (fallocate(a->pool_fd, 0, ((off_t)seg << ODF_CHUNK_SHIFT) + (off_t)pos,
                          (off_t)(ODF_CHUNK_SIZE - pos)) < 0)
                return errno;
            continue;
        }
        return err;
    }
    return 0;
}

/* In a fork child, before fork() returns: a descriptor and thread of our own,
 * and every resident shared chunk of every userfaultfd arena registered. */
void _odf_uffd_child(void)
{
    int any = 0;
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        any |= a && !a->orphaned && a->uffd;
    }
    if (uffd >= 0)
        close(uffd); /* the parent's: its registrations are not ours */
    uffd = -1;
    pthread_mutex_init(&start_lock, NULL);
    pthread_mutex_init(&use_lock, NULL); /* the parent's thread may have held it */
    if (!any)
        return;
    int rc = _odf_uffd_start();
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a || a->orphaned || !a->uffd)
            continue;
        uint32_t c = 0;
        while (c < a->hi) {
            if (!a->mypt[c] || (a->flags[c] & ODF_F_PRIVATE)) {
                c++;
                continue;
            }
            uint32_t start = c;
            while (c < a->hi && a->mypt[c] && !(a->flags[c] & ODF_F_PRIVATE))
                c++;
            uintptr_t addr = a->base + ((uintptr_t)start << ODF_CHUNK_SHIFT);
            size_t len = (size_t)(c - start) << ODF_CHUNK_SHIFT;
            /* Without a registration: read-only chunks (the SIGSEGV path). */
            if ((rc || _odf_uffd_register(addr, len)) && mprotect((void *)addr, len, PROT_READ) < 0) {
                a->orphaned = 1;
                _odf_reserve(a->base, a->shadow - a->base + a->size);
                break;
            }
        }
        if (rc)
            a->uffd = 0;
    }
}
