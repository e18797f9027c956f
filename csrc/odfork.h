/* odfork.h - public C API of the odfork_user core.
 *
 * An arena is a 2 MiB-aligned virtual range whose 2 MiB chunks are backed by
 * segments of a memfd pool shared by a family of forked processes.  Each
 * process has a software page table (chunk -> segment) in a shared control
 * block; segments carry family-wide reference counts.  A fork shares every
 * resident chunk (O(chunks) bookkeeping, nothing per page); the first write to
 * a shared chunk copies it, a write to a chunk whose count is back to 1 reuses
 * it in place.
 *
 * Errors: every function that can fail returns 0 or a positive errno value
 * and never prints.  ENOMEM: out of pool segments, process slots or VMAs.
 *
 * Signals: the core installs one SIGSEGV handler (SA_SIGINFO|SA_ONSTACK, all
 * signals masked while it runs).  Faults outside every arena, and faults it
 * cannot resolve, are passed to the handler that was installed before it
 * (the faulthandler model: sigaction(..., &previous)); with no previous
 * handler the default action runs, so a real crash still crashes.  A fault
 * inside the handler itself kills the process (SIGSEGV stays blocked there).
 *
 * Fork: handlers registered with pthread_atfork make every glibc fork()
 * (os.fork, multiprocessing, odf_fork_*) an on-demand fork of every open
 * arena.  vfork()/posix_spawn children share memory until exec and are not
 * affected.
 */
#ifndef ODFORK_H
#define ODFORK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define ODF_CHUNK_SHIFT 21
#define ODF_CHUNK_SIZE (1UL << ODF_CHUNK_SHIFT) /* 2 MiB: the unit shared, counted and copied */
#define ODF_DEFAULT_MAX_SLOTS 1024             /* processes + snapshots per family */
#define ODF_CHECK_MSG_LEN 512

typedef struct odf_arena_s odf_arena_t;

typedef struct odf_stats_s {
    uint64_t chunks;          /* chunks in the arena */
    uint64_t chunks_resident; /* chunks backed by a segment in this process */
    uint64_t chunks_shared;   /* resident chunks whose segment's count > 1 */
    uint64_t faults;          /* write faults handled for this process */
    uint64_t cow_copies;      /* chunk copies (first write to a shared chunk) */
    uint64_t reuses;          /* faults resolved without a copy (count was 1) */
    uint64_t bytes_copied;
    uint64_t forks;           /* forks of this process while the arena was open */
    uint64_t segments_live;   /* family-wide allocated segments */
    uint64_t segments_max;    /* pool capacity in segments */
    uint64_t slots_used;      /* family-wide process + snapshot slots in use */
    uint64_t views;           /* chunks mapped as private views of their segment now (page mode) */
    uint64_t folds;           /* page mode: views folded back into segments */
} odf_stats_t;

/* Options of one arena; all zero = the defaults (odf_arena_opts_default). */
typedef struct {
    uint32_t max_slots; /* processes and snapshots a family holds at once; 0: ODF_DEFAULT_MAX_SLOTS */
    uint32_t max_segs;  /* pool segments; 0: max_slots per chunk (the most a family can hold) */
    /* Copy mode of this arena (children inherit it).
     * 0 = page mode (the default): at a fork or snapshot every writable chunk
     * becomes a MAP_PRIVATE view of its segment, so each later write, by user
     * code or by the kernel (read(2) and friends), is an ordinary kernel
     * copy-on-write of one 4 KiB page; views are folded back into segments by
     * odf_arena_fold and by snapshots.
     * 1 = chunk mode: shared chunks are read-only and the first write (SIGSEGV)
     * copies the whole 2 MiB chunk; a kernel write into a shared chunk fails
     * with EFAULT unless odf_arena_prepare_write made it writable first. */
    int chunk_cow;
} odf_arena_opts_t;

/* Reserve an arena of `size` bytes (rounded up to whole chunks) with `opts`
 * (NULL: the defaults).  pre: size > 0.  Installs the SIGSEGV handler and the
 * fork handlers on first use. */
int odf_arena_create(size_t size, const odf_arena_opts_t *opts, odf_arena_t **out);

/* Give this process's references back and unmap.  The caller guarantees no
 * live pointers into the arena remain.  Other processes are unaffected. */
int odf_arena_close(odf_arena_t *a);

/* Writers of a view being folded are held off by userfaultfd write-protect
 * where the process can have a full userfaultfd (then kernel writes wait
 * too), else by PROT_READ (a kernel write from another thread during a fold
 * fails with EFAULT).  odf_uffd_probe: 0 if this process can have one, else
 * the errno that says why not (EPERM: no privilege; EOPNOTSUPP/ENOSYS:
 * kernel).  odf_uffd_enable(1): folds use it from now on (default off). */
int odf_uffd_probe(void);
int odf_uffd_enable(int on);

/* Fold this process's views back into segments: in place where the
 * segment's count is 1 and the view holds at most max_dirty private pages
 * (UINT32_MAX: any).  Later forks then have no private pages to copy.
 * Without a full userfaultfd, folds happen only while the calling thread is
 * the process's only one (else the views stay views; 0 is returned). */
int odf_arena_fold(odf_arena_t *a, uint32_t max_dirty);
/* One step of background folding: fold views whose count is 1 for about
 * budget_ns (plus one batch); while this process forked in the last 2 s,
 * views with more than 64 private pages are left to the kernel's
 * copy-on-write (cow.c FOLD_HOT_PAGES).  *left: foldable views the budget
 * left for the next step (shared views are not counted). */
int odf_arena_fold_step(odf_arena_t *a, uint64_t budget_ns, uint32_t *left);

/* Make every chunk of [addr, addr+len) resident (fresh chunks get a zero
 * segment, mapped but not populated), so that a kernel write into newly
 * allocated memory finds a mapping.  Shared chunks are left shared. */
int odf_arena_populate(odf_arena_t *a, uintptr_t addr, size_t len);

/* The arena's own descriptors (its pool and control memfds), for a library
 * that keeps them open under a program that closes every descriptor
 * (odfork_preload.c); -1 for one it lost. */
void odf_arena_fds(const odf_arena_t *a, int *pool_fd, int *ctl_fd);
/* Move the arena's descriptor fd to another number, so that the program can
 * have fd (dup2 onto it): 0 (also when fd is not the arena's) or errno. */
int odf_arena_move_fd(odf_arena_t *a, int fd);
uintptr_t odf_arena_base(const odf_arena_t *a);
size_t odf_arena_size(const odf_arena_t *a);

/* Statistics as seen by this process (releases dead processes' references first). */
int odf_arena_stats(odf_arena_t *a, odf_stats_t *out);
/* Bytes of the chunks of [addr, addr+len) backed by a segment in this process. */
int odf_arena_resident(odf_arena_t *a, uintptr_t addr, size_t len, size_t *out);

/* Verify the family-wide invariants: every segment's count equals the number
 * of page tables (and pins) that hold it, the free list is exact, this
 * process's mappings agree with its page table.  Returns 0, or EUCLEAN with a
 * description in msg. */
int odf_arena_check(odf_arena_t *a, char *msg, size_t msglen);

/* Release references of family members that have died.  Returns 0 or errno. */
int odf_arena_reap(odf_arena_t *a);

/* Make [addr, addr+len) of the arena writable in this process now (copying
 * shared chunks), as a first write would.  Used before the kernel writes into
 * arena memory on the process's behalf (read(2) and friends). */
int odf_arena_prepare_write(odf_arena_t *a, uintptr_t addr, size_t len);

/* Fork protocol around a plain fork() (os.fork):
 *   odf_fork_check()        before: reaps dead members and makes sure a slot
 *                           is free in every arena; ENOMEM/EAGAIN otherwise.
 *   fork()                  the atfork handlers do the work.
 *   odf_fork_note_child(p)  parent, success: records the child's pid so an
 *                           early death of the child is detected at once.
 *   odf_fork_abort()        parent, fork failed: gives the reserved child
 *                           slots and their references back. */
int odf_fork_check(void);
void odf_fork_note_child(pid_t pid);
void odf_fork_abort(void);

/* 0 if the last fork handled every arena, else the errno that made the child
 * lose its arenas (it then crashes with a message on first access). */
int odf_fork_last_error(void);

/* Reinstall the SIGSEGV handler on top if another one replaced it; chains to
 * whatever is installed now. */
int odf_handler_ensure(void);

/* Snapshots (snapshot.c): frozen copies of the whole arena inside this
 * process, O(chunks), no data copied.  Identified by a family-unique id; a
 * fork gives the child its own copies under the same ids.  ENOENT: no such
 * snapshot in this process. */
int odf_snapshot_take(odf_arena_t *a, uint64_t *id);
int odf_snapshot_release(odf_arena_t *a, uint64_t id);
int odf_snapshot_map(odf_arena_t *a, uint64_t id, uintptr_t *addr); /* read-only, size bytes */
int odf_snapshot_unmap(uintptr_t addr, size_t size);
int odf_snapshot_restore(odf_arena_t *a, uint64_t id);

/* Test hooks: break the family state on purpose (tests prove that check()
 * and the isolation tests can fail).  `what` is one of: */
enum odf_debug_hook {
    ODF_DEBUG_EXTRA_REF = 1,       /* one count too many on the chunk's segment */
    ODF_DEBUG_BROKEN_COW = 2,      /* resolve shared faults without a copy (a broken COW) */
    ODF_DEBUG_DROP_EXTRA_REF = 3,  /* undo ODF_DEBUG_EXTRA_REF */
    ODF_DEBUG_DIE_LOCKED = 4,      /* die of SIGKILL holding the family lock, a count half updated */
    ODF_DEBUG_CRASH_IN_HANDLER = 5, /* fault inside the SIGSEGV handler on the next arena fault */
    ODF_DEBUG_FOLD_DELAY = 6       /* folds wait `chunk` ms between their first look at the pages
                                      and holding writers off (a window for racing writers) */
};
int _odf_debug_break(odf_arena_t *a, int what, uint32_t chunk);

/* ---- heap.c: a block allocator in an arena range (see heap.c) ----
 * Not thread-safe: the caller serialises every call (but for the three marked
 * "no lock needed"). */
#define ODF_HEAP_NCLASS 39
#define ODF_HEAP_MAX_SMALL 32768
typedef struct odf_heap_s odf_heap_t;
typedef struct odf_heap_stats_s {
    uint64_t live_bytes;      /* in blocks handed out (rounded to their class or pages) */
    uint64_t live_blocks;
    uint64_t raw_bytes;       /* in raw page runs (pymalloc arenas) */
    uint64_t top_bytes;       /* extent of the heap ever handed out and not given back */
    uint64_t mapped_bytes;    /* resident chunks of the heap range */
    uint64_t free_page_bytes; /* free pages below the top */
    uint64_t free_extents;
} odf_heap_stats_t;
/* [start, start+len) must lie in the arena, page aligned, and not be used by anything else. */
int odf_heap_create(odf_arena_t *a, uintptr_t start, size_t len, odf_heap_t **out);
void *odf_heap_alloc(odf_heap_t *h, size_t n);          /* NULL when full; 16-byte aligned */
void *odf_heap_realloc(odf_heap_t *h, void *p, size_t n);
void odf_heap_free(odf_heap_t *h, void *p);              /* p from alloc/realloc */
size_t odf_heap_usable(odf_heap_t *h, const void *p);    /* no lock needed for a block the caller owns */
int odf_heap_class(size_t n);                             /* size class of n, -1 above ODF_HEAP_MAX_SMALL;
                                                             valid once a heap has been created */
size_t odf_heap_class_size(int c);
int odf_heap_block_class(odf_heap_t *h, const void *p);  /* class of a block, -1 large; no lock needed */
void *odf_heap_alloc_raw(odf_heap_t *h, size_t n);       /* page aligned, no header */
void odf_heap_free_raw(odf_heap_t *h, void *p, size_t n);
int odf_heap_owns(odf_heap_t *h, const void *p);         /* p is a block of alloc/realloc */
int odf_heap_in_range(odf_heap_t *h, const void *p);
void odf_heap_stats(odf_heap_t *h, odf_heap_stats_t *out);
int odf_heap_check(odf_heap_t *h);                       /* 0, or EUCLEAN */

/* Give the whole chunks of [addr, addr+len) back to the family: they become
 * non-resident (reading them again maps fresh zeros). */
int odf_arena_release(odf_arena_t *a, uintptr_t addr, size_t len);

/* csrc/py/pyalloc.c (in the Python extension only): CPython's MEM and OBJ
 * domains and pymalloc's arenas allocate from h (EBUSY if another heap was
 * installed before); uninstall stops new allocations going there. */
int odf_py_install(odf_heap_t *h);
void odf_py_uninstall(void);
int odf_py_installed(void);
int odf_py_numpy_hook(void);
void odf_py_numpy_stats(size_t *in_heap, size_t *outside);

#endif
