/* fork.c - the fork protocol: pthread_atfork handlers that make every fork()
 * an on-demand fork of every open arena.
 *
 * prepare (parent, before the fork syscall), for each arena:
 *   take a->local and the family lock (both held across fork());
 *   hand out a PENDING slot for the child, copy our page table into it and
 *   raise the count of every resident chunk (O(chunks));
 *   move the page tables of our writable runs to the shadow (mremap with
 *   MREMAP_DONTUNMAP, O(1) per run: page tables move a PMD at a time) and
 *   map a MAP_PRIVATE view of the same segments over the emptied range (page
 *   mode, O(1) per run) or make it read-only (chunk mode).  Nothing is done
 *   per page.  Chunks that are views already stay as they are: the kernel
 *   copies the page-table entries of views that hold private pages, as
 *   os.fork would (1.2 ms per GiB with one written page per chunk, measured).
 *   Forks do not fold: folding a view in place costs more than copying its
 *   entries once (measured: fork 3.0 ms with 32 folds per fork vs 2.2 ms
 *   without, 1 GiB, one written page per chunk; again with batched folds,
 *   no hold of writers in a one-thread process: 2.1 ms vs 1.7 ms, and +22
 *   ms after dense writes, the scan of 1 GiB of private pages alone);
 *   odf_arena_fold and the background folder do it off the fork path.
 * parent: release the locks; on a failed prepare give the child slot back.
 * child: claim the slot (CAS PENDING -> CLAIMED, pid and start time,
 *   liveness lock, LIVE), drop the inherited shadow (no page table entries:
 *   cheap), keep the view flags.  The child starts no thread and opens
 *   nothing but /proc/self/stat.  If prepare failed or the slot was
 *   reclaimed, the child loses the arena: all of it becomes PROT_NONE and
 *   any access crashes with a message, so no process ever writes memory
 *   another one can see.
 *
 * Error values of prepare cannot stop a fork; odfork() therefore calls
 * odf_fork_check() first, which reserves nothing but makes sure a slot is
 * free.
 */
#include "internal.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static int fork_install_rc;
static sigset_t fork_saved_mask;
static int fork_last_err;

/* Move the page tables of a writable run (consecutive segments) out of the
 * arena, then put a private view of the same segments in its place (page
 * mode) or leave it read-only (chunk mode, or when the view cannot be made).
 * Both are O(1) per run: the emptied range has no page-table entries. */
static int park_run(odf_arena_t *a, uint32_t start, uint32_t n)
{
    uintptr_t off = (uintptr_t)start << ODF_CHUNK_SHIFT;
    size_t len = (size_t)n << ODF_CHUNK_SHIFT;
    void *p = mremap((void *)(a->base + off), len, len, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP,
                     (void *)(a->shadow + off));
    if (p == MAP_FAILED)
        return errno;
    uint8_t f = ODF_F_PARKED;
    if (a->page_cow && _odf_map_view(a, a->base + off, a->mypt[start] - 1, len) == 0) {
        f |= ODF_F_VIEW;
    } else if (mprotect((void *)(a->base + off), len, PROT_READ) < 0) {
        int rc = errno;
        /* Never leave a writable mapping of a shared segment behind. */
        for (uint32_t c = start; c < start + n; c++)
            if (_odf_map_seg(a, a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT), a->mypt[c] - 1, PROT_READ, 0) &&
                _odf_reserve(a->base + ((uintptr_t)c << ODF_CHUNK_SHIFT), ODF_CHUNK_SIZE))
                return rc;
    }
    for (uint32_t c = start; c < start + n; c++)
        ODF_SET_STATE(a, c, f);
    return 0;
}

int _odf_write_protect(odf_arena_t *a)
{
    if (a->broken_cow)
        return 0; /* test hook: shared chunks stay writable (a broken COW) */
    uint32_t c = 0;
    while (c < a->hi) {
        if (!(a->flags[c] & ODF_F_OWNED)) {
            c++;
            continue;
        }
        uint32_t start = c, e0 = a->mypt[c];
        while (c < a->hi && (a->flags[c] & ODF_F_OWNED) && a->mypt[c] == e0 + (c - start))
            c++;
        if (park_run(a, start, c - start) == 0)
            continue;
        /* The run spans several VMAs (the kernel did not merge them): chunk by
         * chunk, and as a last resort a plain mprotect (per-page cost). */
        for (uint32_t k = start; k < c; k++) {
            if (park_run(a, k, 1) == 0)
                continue;
            if (mprotect((void *)(a->base + ((uintptr_t)k << ODF_CHUNK_SHIFT)), ODF_CHUNK_SIZE, PROT_READ))
                return errno;
            ODF_SET_STATE(a, k, 0);
        }
    }
    return 0;
}

static int share_with_child(odf_arena_t *a)
{
    uint32_t cs;
    int rc = _odf_slot_alloc(a, ODF_SLOT_PENDING, &cs);
    if (rc)
        return rc;
    odf_slot_t *s = &a->slots[cs];
    _odf_slot_share(a, cs, a->mypt, a->hi);
    s->owner = a->self;
    s->owner_gen = ODF_SG_GEN(atomic_load(&a->slots[a->self].sg));
    a->child_slot = cs;
    a->child_gen = ODF_SG_GEN(atomic_load(&s->sg));
    if ((rc = _odf_write_protect(a)))
        return rc;
    /* The child inherits copies of this process's snapshots (same ids). */
    uint64_t pv = atomic_load(&a->slots[a->self].sg);
    for (uint32_t j = 0; j < a->ctl->slot_hwm; j++) {
        odf_slot_t *t = &a->slots[j];
        if (ODF_SG_STATE(atomic_load(&t->sg)) != ODF_SLOT_SNAP || t->owner != a->self || t->owner_gen != ODF_SG_GEN(pv))
            continue;
        uint32_t k;
        if ((rc = _odf_slot_alloc(a, ODF_SLOT_SNAP, &k)))
            return rc; /* the parent handler releases the child slot and its snapshots */
        odf_slot_t *u = &a->slots[k];
        _odf_slot_share(a, k, ODF_PT(a, j), t->hi);
        u->snap_id = t->snap_id;
        u->owner = cs;
        u->owner_gen = a->child_gen;
    }
    return 0;
}

static void prepare(void)
{
    _odf_sigchld_install(); /* once per process: see sigchld.c */
    _odf_block_signals(&fork_saved_mask);
    pthread_mutex_lock(&_odf_registry_lock);
    fork_last_err = 0;
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a)
            continue;
        pthread_mutex_lock(&a->local);
        a->child_slot = ODF_NONE;
        a->fork_err = 0;
        a->fork_locked = 0;
        if (a->orphaned)
            continue;
        if ((a->fork_err = _odf_family_lock(a))) {
            fork_last_err = a->fork_err;
            continue;
        }
        a->fork_locked = 1;
        a->fork_err = share_with_child(a);
        if (a->fork_err)
            fork_last_err = a->fork_err;
    }
}

static void parent(void)
{
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a)
            continue;
        a->last_child_slot = ODF_NONE;
        if (!a->orphaned) {
            if (a->child_slot != ODF_NONE) {
                if (a->fork_err) {
                    _odf_slot_release(a, a->child_slot);
                } else {
                    a->last_child_slot = a->child_slot;
                    a->last_child_gen = a->child_gen;
                }
            }
            a->n_forks++;
            a->last_fork_ns = _odf_now_ns();
            if (a->fork_locked)
                _odf_family_unlock(a);
            a->fork_locked = 0;
        }
        a->child_slot = ODF_NONE;
        pthread_mutex_unlock(&a->local);
    }
    pthread_mutex_unlock(&_odf_registry_lock);
    _odf_restore_signals(&fork_saved_mask);
}

static void orphan(odf_arena_t *a)
{
    a->orphaned = 1;
    _odf_reserve(a->base, a->shadow - a->base + a->size);
    _odf_ctl_writable(a, 0); /* it may have been inherited writable */
}

void _odf_child_setup(odf_arena_t *a)
{
    /* The control block is writable here (the parent held the family lock
     * across the fork; the lock itself stays the parent's) until the slot is
     * claimed. */
    odf_slot_t *s = &a->slots[a->child_slot];
    uint64_t expect = ODF_SG(a->child_gen, ODF_SLOT_PENDING);
    if (!atomic_compare_exchange_strong(&s->sg, &expect, ODF_SG(a->child_gen, ODF_SLOT_CLAIMED))) {
        a->fork_err = ESRCH;
        orphan(a);
        return;
    }
    atomic_store(&s->pid, getpid());
    s->start_ticks = _odf_proc_start_ticks(getpid());
    s->owner = ODF_NONE;
    if (_odf_slot_hold_alive(a, a->child_slot, 1)) {
        /* Cannot prove we are alive: stay CLAIMED (reclaimed by pid once we
         * exit) and lose the arena rather than risk a premature release. */
        a->fork_err = ENOLCK;
        orphan(a);
        return;
    }
    atomic_store(&s->sg, ODF_SG(a->child_gen, ODF_SLOT_LIVE));
    a->self = a->child_slot;
    a->mypt = ODF_PT(a, a->self);
    for (uint32_t c = 0; c < a->nchunks; c++) /* private mappings are inherited as they are */
        a->flags[c] &= ODF_F_VIEW | ODF_F_USERPROT;
    _odf_reserve(a->shadow, a->size); /* inherited parked mappings: no PTEs here */
    a->n_faults = a->n_cow = a->n_reuse = a->n_bytes = a->n_forks = a->n_folds = a->n_returns = 0;
    _odf_ctl_writable(a, 0);
}

static void child(void)
{
    pthread_mutex_init(&_odf_registry_lock, NULL);
    _odf_quiet_forget();
    _odf_folder_forget();
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a)
            continue;
        pthread_mutex_init(&a->local, NULL);
        if (!a->orphaned) {
            if (a->fork_err || a->child_slot == ODF_NONE)
                orphan(a);
            else
                _odf_child_setup(a);
        }
        a->child_slot = a->last_child_slot = ODF_NONE;
    }
    _odf_restore_signals(&fork_saved_mask);
}

static void install_once(void) { fork_install_rc = pthread_atfork(prepare, parent, child); }

int _odf_fork_handlers_install(void)
{
    pthread_once(&fork_once, install_once);
    return fork_install_rc;
}

int odf_fork_check(void)
{
    int rc = 0;
    sigset_t old;
    _odf_block_signals(&old);
    pthread_mutex_lock(&_odf_registry_lock);
    for (int i = 0; i < ODF_MAX_ARENAS && !rc; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a || a->orphaned)
            continue;
        pthread_mutex_lock(&a->local);
        if ((rc = _odf_family_lock(a)) == 0) {
            _odf_reap_locked(a);
            _odf_trim_locked(a, ODF_TRIM_STEP);
            /* the child needs a slot, and one more per snapshot it inherits */
            odf_ctl_t *ctl = a->ctl;
            uint32_t mygen = ODF_SG_GEN(atomic_load(&a->slots[a->self].sg));
            uint32_t need = 1, have = ctl->max_slots - ctl->slot_hwm;
            for (uint32_t k = 0; k < ctl->slot_hwm; k++) {
                odf_slot_t *t = &a->slots[k];
                uint32_t st = ODF_SG_STATE(atomic_load(&t->sg));
                have += st == ODF_SLOT_FREE;
                need += st == ODF_SLOT_SNAP && t->owner == a->self && t->owner_gen == mygen;
            }
            if (have < need)
                rc = EAGAIN;
            _odf_family_unlock(a);
        }
        pthread_mutex_unlock(&a->local);
    }
    pthread_mutex_unlock(&_odf_registry_lock);
    _odf_restore_signals(&old);
    return rc;
}

void odf_fork_note_child(pid_t pid)
{
    sigset_t old;
    _odf_block_signals(&old);
    pthread_mutex_lock(&_odf_registry_lock); /* an arena closed meanwhile is gone from it */
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a || a->last_child_slot == ODF_NONE)
            continue;
        pthread_mutex_lock(&a->local);
        if (_odf_family_lock(a) == 0) { /* the control block is written only under it */
            odf_slot_t *s = &a->slots[a->last_child_slot];
            uint64_t v = atomic_load(&s->sg);
            int32_t zero = 0;
            /* A PENDING slot is only reclaimed after the timeout, so gen matching
             * here means it is still this child's. */
            if (ODF_SG_GEN(v) == a->last_child_gen && ODF_SG_STATE(v) != ODF_SLOT_FREE)
                atomic_compare_exchange_strong(&s->pid, &zero, pid);
            _odf_family_unlock(a);
        }
        pthread_mutex_unlock(&a->local);
    }
    pthread_mutex_unlock(&_odf_registry_lock);
    _odf_restore_signals(&old);
}

void odf_fork_abort(void)
{
    sigset_t old;
    _odf_block_signals(&old);
    pthread_mutex_lock(&_odf_registry_lock);
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load(&_odf_registry[i]);
        if (!a || a->last_child_slot == ODF_NONE)
            continue;
        pthread_mutex_lock(&a->local);
        if (_odf_family_lock(a) == 0) {
            odf_slot_t *s = &a->slots[a->last_child_slot];
            uint64_t v = ODF_SG(a->last_child_gen, ODF_SLOT_PENDING);
            if (atomic_compare_exchange_strong(&s->sg, &v, ODF_SG(a->last_child_gen, ODF_SLOT_DYING)))
                _odf_slot_release(a, a->last_child_slot);
            _odf_family_unlock(a);
        }
        a->last_child_slot = ODF_NONE;
        pthread_mutex_unlock(&a->local);
    }
    pthread_mutex_unlock(&_odf_registry_lock);
    _odf_restore_signals(&old);
}

int odf_fork_last_error(void) { return fork_last_err; }
