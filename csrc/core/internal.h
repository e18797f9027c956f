/* internal.h - structures and internal functions of the odfork_user core.
 *
 * Names: odf_* public (odfork.h), _odf_* shared between files, static helpers
 * file-local.
 *
 * Memory of one arena, per process:
 *   [base, base+size)        the arena.  Chunk c is one of (a->flags[c]):
 *     NONE      pt[c] == 0: PROT_NONE anonymous reservation; the first
 *               touch (SIGSEGV) maps a fresh zero segment writable.
 *     OWNED     ODF_F_OWNED: MAP_SHARED of segment pt[c], PROT_READ|
 *               PROT_WRITE, only while the segment's count is 1.
 *     VIEW      ODF_F_VIEW (page mode): MAP_PRIVATE of segment pt[c],
 *               PROT_READ|PROT_WRITE.  The chunk's bytes are the segment's
 *               plus the anonymous pages the kernel copied on write.  No one
 *               writes a segment while its count is above 1, so every write
 *               (user or kernel) is an ordinary copy-on-write page fault.
 *     LOCKED    chunk mode (and page mode's fallback): MAP_SHARED of pt[c],
 *               PROT_READ; the first write traps (SIGSEGV) and copies the
 *               chunk (count > 1) or makes it writable (count 1).
 *     FOLDING   ODF_F_FOLDING, a VIEW being folded back into a segment
 *               (cow.c): writers are held off by userfaultfd write-protect or
 *               PROT_READ for as long as a->local is held.
 *   [shadow, shadow+size)    the parking area (shadow = base + size rounded up to 1 GiB).  shadow chunk c is either the
 *                            PROT_NONE reservation or, when PARKED, the
 *                            populated writable mapping of segment pt[c] that
 *                            a fork moved out of the arena (mremap moves the
 *                            page tables, O(1) per run).  Nothing writes
 *                            through the shadow but a fold in place (cow.c,
 *                            while the count is 1); a reuse or an in-place
 *                            fold moves it back.
 *
 * Family-wide, in the control memfd (odf_ctl_t): the family lock, each
 * segment's count, the free-segment stack, and the slots.  A slot is a
 * process (or a snapshot) with a page table of nchunks entries, seg+1 or 0.
 *
 * Invariant (checked by odf_arena_check):
 *   refcnt[s] == #{slots in use whose pt holds s} + #{slots whose pin is s}
 *   a process maps segment s (arena or shadow chunk c) only if its pt[c] == s
 *   a process maps chunk c MAP_SHARED writable only if refcnt[pt[c]] == 1
 *   a segment whose count is above 1 is never written (VIEWs read through it)
 *
 * Locking, outermost first (a thread takes them only in this order):
 *   install_lock  fault_sigsegv.c: installing the handler; nothing is taken under it.
 *   folder_lock   folder.c: starting and stopping the folder; nothing is taken under it.
 *   _odf_registry_lock  registry.c: the arena table; the fork handlers hold it
 *              from prepare to the parent/child handler and take every
 *              arena's a->local under it, in table order; the folder holds
 *              it for one fold slice at a time (so no arena it folds is
 *              closed under it).  The SIGCHLD handler never takes it: it
 *              reads the table without locks.
 *   a->local   process-private; serialises fault resolution, fork prepare and
 *              every arena operation of this process.  Held with every signal
 *              blocked (the SIGSEGV handler runs with a full mask; other
 *              callers block signals first), so a handler can never find it
 *              held by its own thread.
 *   ctl->lock  family lock, robust + process-shared.  Guards refcnt, the free
 *              stack, seg_hwm, slot states and every page table.  A holder
 *              that dies leaves EOWNERDEAD: the next locker recomputes the
 *              counts from the page tables (recover) before going on.
 *              Held across fork() by the parent (prepare -> parent handler).
 *              The control block is mapped PROT_READ in every process and
 *              made writable only around this lock (from before taking it to
 *              after releasing it) and in a child claiming its slot, so that
 *              a stray write of a child's (a wild pointer, a memset) faults
 *              in that child instead of corrupting the family; the memfd is
 *              sealed against write(2).  It needs no descriptor.
 *   liveness   not a lock that orders anything.  A LIVE slot's owner is
 *              alive while (1) it holds a POSIX record lock on byte
 *              total + slot of the control memfd (fast path: F_GETLK), or,
 *              when that lock is gone (the owner may have closed or dup2'd
 *              over the descriptor, which drops it), (2) /proc/<pid>/stat
 *              shows the recorded pid with the recorded start time, not a
 *              zombie, and /proc/<pid>/map_files still has the control
 *              block's mapping (gone after exec).  When /proc cannot tell
 *              (EACCES), the owner counts as alive: a leak, never a release
 *              of a live process's references.  See _odf_slot_is_alive.
 *   descriptors the program may close them (daemons close every fd after
 *              fork): pool_fd and ctl_fd are checked (fstat inode) under the
 *              family lock and reopened from /proc/self/map_files when they
 *              changed; where that is not permitted, operations that need
 *              them fail with EBADF (a clear crash on a fault, never a write
 *              into another file).
 * Code holding either lock never writes arena memory, so it cannot fault.
 */
#ifndef ODF_INTERNAL_H
#define ODF_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/types.h>

#include "odfork.h"

#define ODF_MAX_ARENAS 64
/* Freed segments go to the "kept" stack with their pages (no hole punch):
 * freeing stays O(1) (a punch costs ~0.23 ms per chunk here, and a dead
 * child can free a thousand segments at once), and a copy into kept pages is
 * a memcpy (~0.25 ms per chunk) instead of allocating and zeroing (~1 ms or
 * more).  _odf_trim_locked punches kept segments beyond ODF_KEEP back to the
 * system in bounded steps: ODF_TRIM_STEP per fault or fork, all of them on
 * stats, check, reap and close. */
#define ODF_PIECE_SEGS 512u /* segments per piece of the pool (park.c): 1 GiB */
#define ODF_KEEP       32
#define ODF_TRIM_STEP  4
#define ODF_ALIGN      ((size_t)1 << 30)     /* arena and shadow alignment, see odf_arena_create */
#define ODF_CTL_MAGIC  0x6f64666b63746c31ULL /* "odfkctl1" */
#define ODF_NONE       UINT32_MAX
/* A slot reserved for a child that has not registered itself, and whose pid
 * nobody recorded, is reclaimed after this long: the child ran no handler in
 * that time, so it died between fork() and its first instruction, or it is
 * stopped; in the latter case it finds its slot gone and loses its arenas
 * (a clear crash on access), never someone else's data. */
#define ODF_PENDING_TIMEOUT_NS (10ULL * 1000000000ULL)
/* A PENDING slot whose creator (the forking process) has died is reclaimed
 * after this grace period: the fork either never happened (the creator died
 * inside prepare) or its child had this long to run its first instructions. */
#define ODF_PENDING_GRACE_NS (1ULL * 1000000000ULL)

/* Slot states.  The state word is (gen << 32 | state) so that a late child
 * cannot claim a slot that was reclaimed and handed out again. */
enum {
    ODF_SLOT_FREE = 0,
    ODF_SLOT_PENDING = 1, /* filled by a parent in fork prepare; child not yet in */
    ODF_SLOT_CLAIMED = 2, /* child won the CAS, is taking its liveness lock */
    ODF_SLOT_LIVE = 3,    /* child (or creator) holds its liveness lock */
    ODF_SLOT_SNAP = 4,    /* snapshot owned by process slot `owner` */
    ODF_SLOT_DYING = 5,   /* being released; never claimed or trylocked */
};

/* Per-chunk process-private flags (a->flags).  The state bits name the
 * chunk states above (OWNED, VIEW, FOLDING); LOCKED has no bit of its own
 * (in the page table, neither OWNED nor VIEW) and NONE is pt[c] == 0:
 * _odf_chunk_state() tells a chunk's state by those names.  The other bits
 * are orthogonal to the state. */
#define ODF_F_OWNED    1u  /* OWNED: arena chunk MAP_SHARED of pt[c], PROT_READ|PROT_WRITE */
#define ODF_F_PARKED   2u  /* shadow chunk holds the populated mapping of pt[c] */
#define ODF_F_VIEW     4u  /* VIEW: arena chunk is a MAP_PRIVATE mapping of pt[c] (below) */
#define ODF_F_FOLDING  8u  /* FOLDING: a VIEW whose writers are held off while it is folded */
#define ODF_F_UNFOLDED 16u /* snapshot.c, within one take: a view its fold could not hold writers off */
#define ODF_F_USERPROT 32u /* the program set its own protection on pages of the chunk (below) */
#define ODF_F_HOT      64u /* a VIEW a fold left alone for its many private pages (below) */
/* ODF_F_VIEW: the kernel copies the pages written.  pt[c] is never written by
 * anyone while shared, so the unwritten pages stay the chunk's bytes.
 * ODF_F_USERPROT, on an OWNED or VIEW chunk (odf_arena_protect): a fault there
 * is the program's (_odf_fault returns ODF_FAULT_PROGRAM: passed to its
 * handler, no report), and no fold remaps the chunk.  Kept across state
 * changes (ODF_SET_STATE); a fork's remap drops the protections themselves,
 * which their owner puts back.
 * ODF_F_HOT: the background step skips the view while this process forks
 * often (cow.c FOLD_HOT_PAGES). */
/* Set chunk c's state bits to f (0, ODF_F_OWNED, ODF_F_VIEW, with or without
 * ODF_F_PARKED), keeping ODF_F_USERPROT. */
#define ODF_SET_STATE(a, c, f) ((a)->flags[c] = (uint8_t)(((a)->flags[c] & ODF_F_USERPROT) | (f)))
#define ODF_FAULT_PROGRAM      (-1) /* _odf_fault: not the core's fault; chain it without a report */

typedef enum {
    ODF_CHUNK_NONE,    /* pt[c] == 0 */
    ODF_CHUNK_OWNED,   /* ODF_F_OWNED */
    ODF_CHUNK_VIEW,    /* ODF_F_VIEW */
    ODF_CHUNK_LOCKED,  /* in the page table, neither: MAP_SHARED read-only */
    ODF_CHUNK_FOLDING, /* ODF_F_FOLDING (a VIEW being folded) */
} odf_chunk_state_t;

typedef struct odf_slot_s {
    _Atomic uint64_t sg; /* gen << 32 | state; CAS by the child (PENDING->CLAIMED->LIVE),
                                  otherwise written under the family lock */
    _Atomic int32_t pid; /* 0 until known; written by the child or by the parent's note */
    uint32_t owner;      /* SNAP: owning process slot; PENDING: the forking process's slot */
    uint32_t owner_gen;  /* its generation */
    uint32_t hi;         /* pt[c] == 0 for every c >= hi; under the family lock */
    uint32_t pin;        /* seg+1 kept alive while this process copies from it, or 0 */
    uint32_t pad;
    uint64_t born_ns;     /* CLOCK_MONOTONIC when handed out */
    uint64_t snap_id;     /* SNAP: family-unique id, kept by the copies a fork makes */
    uint64_t start_ticks; /* LIVE: the owner's start time (/proc/<pid>/stat field 22) */
} odf_slot_t;

typedef struct odf_ctl_s {
    uint64_t magic;
    pthread_mutex_t lock; /* family lock */
    uint32_t nchunks, max_slots, max_segs;
    uint32_t seg_hwm;       /* segments >= seg_hwm were never handed out */
    uint32_t nfree;         /* entries in the free stack (hole-punched: read as zeros) */
    uint32_t slot_hwm;      /* slots >= slot_hwm were never handed out */
    uint64_t segments_live; /* seg_hwm - nfree */
    uint64_t recoveries;    /* times a dead lock holder's state was rebuilt */
    uint64_t next_snap_id;  /* under the family lock */
    uint32_t ndirty;        /* entries in the kept stack: free segments whose pages were kept */
    size_t off_refcnt, off_free, off_dirty, off_slots, off_pt, total;
} odf_ctl_t;

struct odf_arena_s {
    uintptr_t base, shadow; /* 1 GiB aligned; shadow == base + size rounded up to 1 GiB */
    size_t size;
    uint32_t nchunks;
    int pool_fd, ctl_fd; /* see "descriptors" above: checked by _odf_fds_check */
    int pool_ro;         /* pool_fd is read-only (park.c _odf_pool_rw) */
    size_t ctl_total;    /* private copy of ctl->total: the mapping's length */
    uintptr_t *pieces;   /* private [max_segs / ODF_PIECE_SEGS + 1]: park.c, 0 = not mapped */
    uint32_t npieces;
    uint64_t pool_ino, ctl_ino, pool_dev, ctl_dev;
    uintptr_t anchor; /* a PROT_NONE 4 KiB mapping of the pool: /proc/self/map_files finds it */
    odf_ctl_t *ctl;
    uint32_t *refcnt;    /* [max_segs] */
    uint32_t *freestack; /* [max_segs] */
    uint32_t *dirty;     /* [max_segs]: the kept stack */
    odf_slot_t *slots;   /* [max_slots] */
    uint32_t *pts;       /* [max_slots][nchunks] */
    uint32_t self;       /* this process's slot */
    uint32_t *mypt;      /* pts + self * nchunks */
    uint8_t *flags;      /* private [nchunks] */
    uint32_t hi;         /* private mirror of slots[self].hi */
    pthread_mutex_t local;
    int orphaned; /* this process lost its slot (see ODF_PENDING_TIMEOUT_NS) */
    int registry_index;
    /* fork in flight (set in prepare, consumed by the parent/child handlers) */
    uint32_t child_slot, child_gen;
    int fork_err;
    int fork_locked; /* prepare holds the family lock for this fork */
    /* last fork, for odf_fork_note_child / odf_fork_abort in the parent */
    uint32_t last_child_slot, last_child_gen;
    /* stats, under a->local */
    uint64_t n_faults, n_cow, n_reuse, n_bytes, n_forks, n_folds, n_returns;
    uint64_t last_fork_ns;  /* CLOCK_MONOTONIC of this process's last fork (parent handler), under a->local */
    int broken_cow;         /* test hook (_odf_debug_break): resolve shared faults without a copy */
    int page_cow;           /* copy mode: !odf_arena_opts_t.chunk_cow */
    _Atomic int no_folder;  /* odf_arena_background(a, 0): the folder leaves this arena alone */
    int crash_in_handler;   /* test hook: fault inside the SIGSEGV handler */
    uint32_t fold_delay_ms; /* test hook: a fold's wait between its first look and the hold */
};

/* Chunk c's state in this process, by the names of the comment at the top. */
static inline odf_chunk_state_t _odf_chunk_state(const odf_arena_t *a, uint32_t c)
{
    uint8_t f = a->flags[c];
    if (f & ODF_F_FOLDING)
        return ODF_CHUNK_FOLDING;
    if (f & ODF_F_OWNED)
        return ODF_CHUNK_OWNED;
    if (f & ODF_F_VIEW)
        return ODF_CHUNK_VIEW;
    return a->mypt[c] ? ODF_CHUNK_LOCKED : ODF_CHUNK_NONE;
}

/* ---- The files, in layers: each uses only the files listed before it. ----
 *
 *   prim.c         clock, formatting, stderr, signal masks, pwrite (async-signal-safe)
 *   park.c         a chunk's mappings: segment, view, reservation, unpark (async-signal-safe)
 *   registry.c     the process's table of arenas
 *   uffd.c         holding writers off a range during a fold; the userfaultfd probe
 *   family.c       control block, family lock + recovery, segments, slots, liveness, reaping
 *   cow.c          write faults (_odf_fault), prepare_write/populate/release, views and folds
 *   fault_sigsegv.c  the SIGSEGV handler: finds the arena and chunk, calls _odf_fault
 *   sigchld.c      the SIGCHLD handler: returns clean views when a child has gone
 *   folder.c       the folder thread (background folds)
 *   fork.c         the pthread_atfork protocol
 *   snapshot.c     snapshots (slots of state SNAP)
 *   check.c        stats, the invariant check, test hooks
 *   arena.c        create / close (installs the handlers, builds the family)
 *
 * Above the core, through its public API only (odfork.h), never this file:
 *   ../heap/heap.c               the block allocator over an arena range
 *   ../py/pyalloc.c              CPython's and numpy's allocator hooks over heap.c
 *   ../preload/odfork_preload.c  the malloc family of `exec` over heap.c
 */

/* prim.c */
uint64_t _odf_now_ns(void);
char *_odf_fmt_u(char *p, unsigned long long v, int base);
void _odf_write_stderr(const char *msg);
void _odf_block_signals(sigset_t *old); /* every signal; *old for _odf_restore_signals */
void _odf_restore_signals(const sigset_t *old);
int _odf_pwrite_all(int fd, const void *src, size_t len, off_t off); /* EINTR retried; 0 or errno */
unsigned _odf_thread_count(void);                                    /* threads of this process, 0 if unknown */
/* Is the calling thread (holding a->local with every signal blocked) the
 * only one that can write arena memory: every other thread of the process
 * is quiet (odf_thread_quiet: the folder, which writes only under
 * a->local)?  Reads /proc/self/stat; async-signal-safe. */
int _odf_only_writer(void);
void _odf_quiet_tid(pid_t tid);       /* the quiet thread's own tid (0: none), set by itself */
void _odf_quiet_forget(void);         /* in a fork's child: no quiet thread came along */
void _odf_fd_path(char *buf, int fd); /* "/proc/self/fd/<fd>" into buf (>= 32 bytes) */

/* park.c: a chunk's mappings.  Plain syscalls; the caller holds a->local. */
int _odf_map_seg(odf_arena_t *a, uintptr_t addr, uint32_t seg, int prot, int populate);
int _odf_map_view(odf_arena_t *a, uintptr_t addr, uint32_t seg, size_t len); /* MAP_PRIVATE, RW */
int _odf_reserve(uintptr_t addr, size_t len);
int _odf_unpark(odf_arena_t *a, uint32_t c); /* parked entries back over the arena chunk */
int _odf_pool_rw(odf_arena_t *a, int *fd);   /* a read-write descriptor of the pool for one call */
void _odf_pool_rw_done(odf_arena_t *a, int fd);
int _odf_pool_write(odf_arena_t *a, const void *src, size_t len, off_t off); /* into one segment */
int _odf_pool_punch(odf_arena_t *a, uint32_t seg);                           /* seg reads as zeros after: 0 or errno */

/* registry.c: lock-free reads (the handler), writes under _odf_registry_lock */
extern odf_arena_t *_Atomic _odf_registry[ODF_MAX_ARENAS];
extern pthread_mutex_t _odf_registry_lock;
int _odf_registry_add(odf_arena_t *a);
void _odf_registry_remove(odf_arena_t *a);
odf_arena_t *_odf_registry_find(uintptr_t addr); /* async-signal-safe */

/* uffd.c: holding writers off a range while it is folded. */
/* Make [addr, addr+len) trap writes: userfaultfd write-protect (writers,
 * user or kernel, wait in the kernel) where a full userfaultfd can be had,
 * else PROT_READ, and that only while this thread is the process's only one
 * (a kernel write from another thread would fail with EFAULT, and a signal
 * frame pushed onto an alternate stack there would kill the process):
 * EAGAIN otherwise, and nothing is held.  *token is passed to
 * _odf_writers_resume after the range was remapped.  pre: a->local. */
#define ODF_HOLD_NONE (-2) /* *token: nothing held (no one else can write) */
#define ODF_HOLD_PROT (-1) /* *token: the range is PROT_READ; writable again after the remap */
int _odf_writers_hold(uintptr_t addr, size_t len, int *token);
void _odf_writers_resume(int token);

/* family.c: family state.  pre: a->local held (signals blocked) unless noted. */
int _odf_ctl_init(odf_arena_t *a, uint32_t max_slots, uint32_t max_segs); /* a new family */
int _odf_family_lock(odf_arena_t *a);
void _odf_family_unlock(odf_arena_t *a);
int _odf_fds_check(odf_arena_t *a);                                 /* pre: family lock */
int _odf_ctl_writable(odf_arena_t *a, int on);                      /* the control block's protection in this process */
int _odf_seg_alloc(odf_arena_t *a, uint32_t *seg, int overwrite);   /* pre: family lock */
void _odf_seg_decref(odf_arena_t *a, uint32_t seg);                 /* pre: family lock */
void _odf_trim_locked(odf_arena_t *a, uint32_t budget);             /* pre: family lock */
int _odf_slot_alloc(odf_arena_t *a, uint32_t state, uint32_t *idx); /* pre: family lock */
void _odf_slot_release(odf_arena_t *a, uint32_t idx);               /* pre: family lock */
void _odf_slot_share(odf_arena_t *a, uint32_t dst, const uint32_t *pt, uint32_t hi); /* pre: family lock */
int _odf_slot_hold_alive(odf_arena_t *a, uint32_t idx, int hold);                    /* take (1) or drop (0) */
int _odf_slot_is_alive(odf_arena_t *a, uint32_t idx);                                /* owner alive (see above) */
uint64_t _odf_proc_start_ticks(pid_t pid);                                           /* 0 if unknown */
void _odf_reap_locked(odf_arena_t *a);                                               /* pre: family lock */
void _odf_reap_child_locked(odf_arena_t *a, pid_t pid); /* pid exited (SIGCHLD); pre: family lock */

/* cow.c */
/* Resolve a SIGSEGV or prepare_write on chunk c (async-signal-safe).  0 = resolved. */
int _odf_fault(odf_arena_t *a, uint32_t c);
#define ODF_FOLD_ANY UINT32_MAX
/* Fold VIEW chunk c back into a segment: in place when its count is 1 and
 * it holds at most max_dirty private pages (else nothing is done and 0 is
 * returned), into a new segment when shared and `shared` is set.  EAGAIN,
 * with nothing done, when writers cannot be held off (_odf_writers_hold).
 * pre: a->local and the family lock. */
int _odf_fold_locked(odf_arena_t *a, uint32_t c, uint32_t max_dirty, int shared, int *folded);
/* A new segment (*nseg, count 1, the caller's reference) holding VIEW chunk
 * c's bytes as they are; the view is left alone.  pre: as _odf_fold_locked. */
int _odf_copy_view_locked(odf_arena_t *a, uint32_t c, uint32_t *nseg);
/* Pages of VIEW chunk c the kernel copied for this process (private and
 * exclusive in /proc/self/pagemap, read through pm_fd; 0 if it is < 0). */
int _odf_open_pagemap(void);
uint32_t _odf_view_copied_pages(odf_arena_t *a, uint32_t c, int pm_fd);
/* Return the views of count 1 that hold no private page to OWNED (*n of
 * them), then fold written ones for at most budget_ns.  pre: a->local and
 * the family lock, and no other thread can write the arena. */
int _odf_views_return_locked(odf_arena_t *a, uint64_t budget_ns, uint32_t *n);

/* fault_sigsegv.c */
int _odf_handler_install(void);

/* sigchld.c: the SIGCHLD handler, installed by the first fork (fork.c) */
void _odf_sigchld_install(void);

/* folder.c */
void _odf_folder_forget(void); /* in a fork's child: the folder thread did not come along */

/* fork.c */
int _odf_fork_handlers_install(void);
int _odf_write_protect(odf_arena_t *a); /* pre: a->local held; parks every writable chunk */
void _odf_child_setup(odf_arena_t *a);  /* in the child of a fork */

/* Run the statements after `rc` with signals blocked, a->local and the family
 * lock held; rc is set to the locking error (EOWNERDEAD for a process that
 * lost its arena), else left to the statements. */
#define ODF_LOCKED(a, rc, ...)                                                                                         \
    do {                                                                                                               \
        sigset_t old_;                                                                                                 \
        _odf_block_signals(&old_);                                                                                     \
        pthread_mutex_lock(&(a)->local);                                                                               \
        rc = (a)->orphaned ? EOWNERDEAD : _odf_family_lock(a);                                                         \
        if (rc == 0) {                                                                                                 \
            __VA_ARGS__;                                                                                               \
            _odf_family_unlock(a);                                                                                     \
        }                                                                                                              \
        pthread_mutex_unlock(&(a)->local);                                                                             \
        _odf_restore_signals(&old_);                                                                                   \
    } while (0)

#define ODF_PT(a, slot) ((a)->pts + (size_t)(slot) * (a)->nchunks)
#define ODF_SG(gen, st) (((uint64_t)(gen) << 32) | (uint32_t)(st))
#define ODF_SG_STATE(v) ((uint32_t)((v)&0xffffffffu))
#define ODF_SG_GEN(v)   ((uint32_t)((v) >> 32))

#endif
