/* sys_mman.h - included first into every file of the preload library
 * (setup.py: -include): the core's and the heap's own mmap, munmap, mremap,
 * mprotect and madvise go straight to the kernel.  The library exports those
 * names (odfork_preload.c), and a call by name from inside it would otherwise
 * bind to its own exported symbol, which must only ever see the program's
 * calls (the arena's chunks are not the program's mappings).  Raw system
 * calls: async-signal-safe, as the core's handlers need. */
#ifndef ODF_SYS_MMAN_H
#define ODF_SYS_MMAN_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static inline void *odf_sys_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}
static inline int odf_sys_munmap(void *addr, size_t len) { return (int)syscall(SYS_munmap, addr, len); }
static inline int odf_sys_mprotect(void *addr, size_t len, int prot)
{
    return (int)syscall(SYS_mprotect, addr, len, prot);
}
static inline int odf_sys_madvise(void *addr, size_t len, int advice)
{
    return (int)syscall(SYS_madvise, addr, len, advice);
}
static inline void *odf_sys_mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
    void *new_addr = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        new_addr = va_arg(ap, void *);
        va_end(ap);
    }
    return (void *)syscall(SYS_mremap, old, old_len, new_len, flags, new_addr);
}

#define mmap     odf_sys_mmap
#define munmap   odf_sys_munmap
#define mprotect odf_sys_mprotect
#define madvise  odf_sys_madvise
#define mremap   odf_sys_mremap
#endif
