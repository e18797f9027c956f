/* uffd.c - userfaultfd, used for one thing: holding writers off a VIEW chunk
 * while it is folded back into a segment (cow.c).
 *
 * Why not for faults: after a fork every shared chunk is a MAP_PRIVATE view
 * of its segment (fork.c), so writes by user code and by the kernel
 * (read(2), recv_into) are ordinary kernel copy-on-write faults.  Nothing
 * traps on the fault path, and isolation does not depend on a descriptor the
 * program could close.
 *
 * A fold copies a view's private pages into a segment and then maps the
 * segment in place of the view; a write between the copy and the remap would
 * be lost.  _odf_writers_hold holds nothing when no other thread can write
 * (the process's other threads are all quiet, _odf_only_writer: a fold from
 * a one-thread program, or from it while only the folder runs).  Else it
 * write-protects the range first: with a full
 * userfaultfd (root, CAP_SYS_PTRACE, /dev/userfaultfd access or
 * vm.unprivileged_userfaultfd=1; a UFFD_USER_MODE_ONLY one does not see
 * kernel-mode faults) a writer, user or kernel, waits in the kernel; the
 * remap replaces the registered VMA and closing the descriptor wakes every
 * waiter, who retries on the new mapping.  Nobody reads the descriptor: no
 * thread is needed.  Without one, PROT_READ, and only while the folding
 * thread is the process's only thread: with another thread, a write the
 * kernel makes for it (read(2) into the chunk, a signal frame on an
 * alternate stack that lies there) cannot wait and would fail (EFAULT, or
 * the process killed by SIGSEGV), so the hold is refused (EAGAIN) and the
 * view is not folded.
 *
 * A descriptor is opened per fold batch and closed after it, so a program
 * that closes every descriptor cannot break anything.  All functions here are
 * plain syscalls (async-signal-safe).
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Newer than some installed kernel headers; values from the kernel ABI. */
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#define NEEDED_FEATURES (UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_PAGEFAULT_FLAG_WP)
#define PAGE            4096UL

static _Atomic int uffd_wanted; /* odf_uffd_enable */

/* A full (kernel-fault) userfaultfd, handshaken for NEEDED_FEATURES, in *out: 0 or errno. */
static int open_full(int *out)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int err = errno;
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0)
            return err == ENOSYS ? ENOSYS : EPERM;
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        err = errno;
        close(dev);
        if (fd < 0)
            return err;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = NEEDED_FEATURES};
    if (ioctl(fd, UFFDIO_API, &api) < 0) {
        int err = errno;
        close(fd);
        return err == EINVAL ? EOPNOTSUPP : err;
    }
    *out = fd;
    return 0;
}

/* Register and write-protect [addr, addr+len) on fd: 0 or errno. */
static int wp_range(int fd, uintptr_t addr, size_t len)
{
    struct uffdio_register r = {.range = {addr, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(fd, UFFDIO_REGISTER, &r) < 0)
        return errno == EINVAL ? EOPNOTSUPP : errno;
    if (!(r.ioctls & ((__u64)1 << _UFFDIO_WRITEPROTECT)))
        return EOPNOTSUPP;
    struct uffdio_writeprotect w = {.range = {addr, len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) < 0 ? errno : 0;
}

int odf_uffd_probe(void)
{
    int fd, rc = open_full(&fd);
    if (rc)
        return rc;
    /* Write-protect one page of a private memfd view, as a fold does. */
    int mfd = memfd_create("odfork-probe", MFD_CLOEXEC);
    void *p = MAP_FAILED;
    if (mfd < 0 || ftruncate(mfd, PAGE) < 0 ||
        (p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0)) == MAP_FAILED)
        rc = errno;
    else
        rc = wp_range(fd, (uintptr_t)p, PAGE);
    if (p != MAP_FAILED)
        munmap(p, PAGE);
    if (mfd >= 0)
        close(mfd);
    close(fd);
    return rc;
}

int odf_uffd_enable(int on)
{
    int rc = on ? odf_uffd_probe() : 0;
    if (rc == 0)
        atomic_store(&uffd_wanted, on ? 1 : 0);
    return rc;
}

int _odf_writers_hold(uintptr_t addr, size_t len, int *token)
{
    *token = ODF_HOLD_NONE;
    if (_odf_only_writer())
        return 0; /* no one else can write: nothing to hold (no markers, no mprotect) */
    if (atomic_load(&uffd_wanted)) {
        int fd;
        if (open_full(&fd) == 0) {
            if (wp_range(fd, addr, len) == 0) {
                *token = fd;
                return 0;
            }
            close(fd); /* unregisters whatever was registered */
        }
    }
    /* One thread (this one, which holds a->local with signals blocked): no
     * one else can write while the range is read-only. */
    if (_odf_thread_count() != 1)
        return EAGAIN;
    *token = ODF_HOLD_PROT;
    return mprotect((void *)addr, len, PROT_READ) < 0 ? errno : 0;
}

void _odf_writers_resume(int token)
{
    if (token >= 0)
        close(token); /* wakes every writer waiting on the range (they retry) */
}
