/* odfork.h - public C API of the odfork_user core: arenas, forks, folds,
 * snapshots, statistics.  The clients built on it have headers of their own:
 * odfork_heap.h (csrc/heap/heap.c, a block allocator in an arena) and
 * odfork_py.h (csrc/py/pyalloc.c, CPython's allocator hooks); the test hooks
 * are in odfork_debug.h.
 *
 * An arena is a 1 GiB-aligned virtual range whose 2 MiB chunks are backed by
 * segments of a memfd pool shared by a family of forked processes.  Each
 * process has a software page table (chunk -> segment) in a shared control
 * block; segments carry family-wide reference counts.  A fork shares every
 * resident chunk (O(chunks) bookkeeping, nothing per page).  What a write
 * after it costs depends on the arena's copy mode (odf_arena_opts_t):
 * page mode (the default) makes every writable chunk a MAP_PRIVATE view of
 * its segment, so a write copies one 4 KiB page in the kernel; chunk mode
 * leaves shared chunks read-only and the first write copies the whole chunk,
 * or reuses it in place when its count is back to 1.  A segment whose count
 * is above 1 is never written.  The chunk states and the rules behind them
 * are in internal.h.
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

#define ODF_CHUNK_SHIFT       21
#define ODF_CHUNK_SIZE        (1UL << ODF_CHUNK_SHIFT) /* 2 MiB: the unit shared, counted and copied */
#define ODF_DEFAULT_MAX_SLOTS 1024                     /* processes + snapshots per family */
#define ODF_CHECK_MSG_LEN     512

typedef struct odf_arena_s odf_arena_t;

typedef struct odf_stats_s {
    uint64_t chunks;          /* chunks in the arena */
    uint64_t chunks_resident; /* chunks backed by a segment in this process */
    uint64_t chunks_shared;   /* resident chunks whose segment's count > 1 */
    uint64_t faults;          /* write faults handled for this process */
    uint64_t cow_copies;      /* chunk copies (first write to a shared chunk) */
    uint64_t reuses;          /* faults resolved without a copy (count was 1) */
    uint64_t bytes_copied;
    uint64_t forks;         /* forks of this process while the arena was open */
    uint64_t segments_live; /* family-wide allocated segments */
    uint64_t segments_max;  /* pool capacity in segments */
    uint64_t slots_used;    /* family-wide process + snapshot slots in use */
    uint64_t views;         /* chunks mapped as private views of their segment now (page mode) */
    uint64_t folds;         /* page mode: views folded back into segments */
    uint64_t returns;       /* of those, views returned when a child had gone (sigchld.c) */
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
/* The pace of the folder (folder.c): a step every ODF_FOLD_PERIOD_NS spending at most
 * ODF_FOLD_BUDGET_NS (10% of a CPU), the next step ODF_FOLD_BUDGET_NS later
 * while the budget left foldable views behind (50%); a caller that releases
 * the arena between calls spends the budget in slices of ODF_FOLD_SLICE_NS. */
#define ODF_FOLD_PERIOD_NS 20000000ULL
#define ODF_FOLD_BUDGET_NS 2000000ULL
#define ODF_FOLD_SLICE_NS  500000ULL

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

/* A thread that writes arena memory only through the core's calls (a fold
 * loop written in C) is declared quiet (1) as soon as it exists and undeclared
 * (0) once it is gone: a child's exit may then return views while it runs
 * (sigchld.c), which is done only while no other thread can write arena
 * memory. */
void odf_thread_quiet(int on);

/* The folder (folder.c): a thread that folds, in every arena of the
 * process, the views nobody else shares, at the ODF_FOLD_* pace.  start: 0,
 * or pthread_create's error (running already: 0).  stop: returns once the
 * thread is gone, from /proc too.  A fork's child has none running. */
int odf_folder_start(void);
void odf_folder_stop(void);
int odf_folder_running(void);
/* Whether the folder folds arena a (default 1). */
void odf_arena_background(odf_arena_t *a, int on);

/* Snapshots (snapshot.c): frozen copies of the whole arena inside this
 * process, O(chunks), no data copied.  Identified by a family-unique id; a
 * fork gives the child its own copies under the same ids.  ENOENT: no such
 * snapshot in this process. */
int odf_snapshot_take(odf_arena_t *a, uint64_t *id);
int odf_snapshot_release(odf_arena_t *a, uint64_t id);
int odf_snapshot_map(odf_arena_t *a, uint64_t id, uintptr_t *addr); /* read-only, size bytes */
int odf_snapshot_unmap(uintptr_t addr, size_t size);
int odf_snapshot_restore(odf_arena_t *a, uint64_t id);

/* The program's own protection of [addr, addr+len) (page aligned; every chunk
 * of it mapped for the program, else ENOMEM), applied under the arena's lock so
 * that no fold remaps it meanwhile.  mark 1: these chunks keep pages the
 * program protected: a fault there goes to the program's handler (no report)
 * and no fold remaps them; 0: they no longer do.  A fork remaps writable
 * chunks, dropping such protections: their owner puts them back after it. */
int odf_arena_protect(odf_arena_t *a, uintptr_t addr, size_t len, int prot, int mark);

/* Give the whole chunks of [addr, addr+len) back to the family: they become
 * non-resident (reading them again maps fresh zeros). */
int odf_arena_release(odf_arena_t *a, uintptr_t addr, size_t len);

#endif
