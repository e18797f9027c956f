/* sigchld.c - when a child of this process has gone, return the views it
 * shared to their segments at once.
 *
 * After a fork every writable chunk of the parent is a view (fork.c).  When
 * the child exits, the views' counts drop back to 1, but they stay views
 * until something folds them: writes the parent makes in between copy
 * private pages (kernel copy-on-write, one fault per page), and its next
 * fork copies the page tables of every view so written, entry by entry, as
 * os.fork would.  A process that forks, reaps and writes a little before
 * forking again (a test runner, a fork server, a snapshotting server) paid
 * that at every fork.  Here, on SIGCHLD (before waitpid returns: the kernel
 * runs the handler on the way back from the wait), the views that hold no
 * private page move back over their parked mappings (cow.c
 * _odf_views_return_locked: one scan and one mremap per batch of chunks,
 * nothing copied), so that the parent's next writes go to its segments with
 * no fault and its next fork is O(runs) again; then views the parent wrote
 * while the child lived are folded for at most ODF_FOLD_SLICE_NS, in arenas
 * that want background folds (odf_arena_background; with no
 * hold of writers: none can write; without a full userfaultfd there is no
 * folder thread, and this is where they are folded).
 *
 * When: only for a child that exited or was killed, in an arena that it
 * shared or that has parked views of count 1 (stops and continues, and
 * signals sent with kill(), are only passed on), and only while no thread but this one can
 * write arena memory: the process has this thread plus the threads that
 * declared themselves quiet (odf_thread_quiet: the C folder loop, which
 * writes arena memory only under a->local), counted in /proc/self/stat.
 * Another thread could write a view between the scan and the remap, and
 * that write would be lost; a hold (userfaultfd write-protect) costs more
 * than the fork it saves (~9 us a chunk: it fills page tables with markers).
 * a->local is then held by no thread or by the folder, for one batch of a
 * fold (which waits for nothing this thread holds: this thread never holds
 * a->local with signals open, and the folder takes a->local only under the
 * registry lock, so it cannot be waiting for that lock either).
 *
 * The handler is installed at the first fork of a process with an arena
 * (fork.c prepare), when SIGCHLD's disposition is the default or a handler
 * of the program's (which it then calls after its own work, as the kernel
 * would have, with that handler's flags and mask, but on the thread's own
 * stack); never over SIG_IGN or a
 * one-shot handler, and not at all with ODFORK_SIGCHLD=0.  A program that
 * sets its own disposition later replaces it (nothing is then returned
 * early; folds still happen).  What changes for the program: a system call
 * that is never restarted after a handler (nanosleep, poll, epoll_wait,
 * select, pause, sigsuspend...) returns EINTR when a child exits, as it would
 * with any SIGCHLD handler; the handler itself is SA_RESTART.
 *
 * Async-signal-safe: syscalls, atomics, a->local and the robust family
 * lock, as the SIGSEGV handler.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static struct sigaction prev; /* the disposition before ours */
static _Atomic int state;     /* 0 not tried, 1 installed, 2 declined */
/* Anything to do in arena a: is pid one of the processes it shares chunks
 * with (a slot's owner), or is a parked view's count 1 already (another
 * path, a fold step or stats, may have reaped the child first)?  Lock-free
 * reads: a hint, checked again under the locks. */
static int concerned(odf_arena_t *a, pid_t pid)
{
    uint32_t hwm = __atomic_load_n(&a->ctl->slot_hwm, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < hwm; i++)
        if (i != a->self && atomic_load(&a->slots[i].pid) == pid)
            return 1;
    for (uint32_t c = 0; c < a->hi; c++) {
        uint8_t f = __atomic_load_n(&a->flags[c], __ATOMIC_RELAXED);
        uint32_t e = __atomic_load_n(&a->mypt[c], __ATOMIC_RELAXED);
        if ((f & (ODF_F_VIEW | ODF_F_PARKED)) == (ODF_F_VIEW | ODF_F_PARKED) && e &&
            __atomic_load_n(&a->refcnt[e - 1], __ATOMIC_RELAXED) == 1)
            return 1;
    }
    return 0;
}

static void children_gone(pid_t pid)
{
    sigset_t old;
    int alone = -1;
    _odf_block_signals(&old); /* a->local is held with every signal blocked */
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load_explicit(&_odf_registry[i], memory_order_acquire);
        if (!a || a->orphaned || !a->page_cow || !concerned(a, pid))
            continue;
        if (alone < 0)
            alone = _odf_only_writer();
        if (!alone)
            break;
        pthread_mutex_lock(&a->local); /* held by another thread only if it is the folder's, for one batch */
        if (!a->orphaned && _odf_family_lock(a) == 0) {
            uint32_t n;
            _odf_reap_child_locked(a, pid);
            _odf_views_return_locked(a, atomic_load(&a->no_folder) ? 0 : ODF_FOLD_SLICE_NS, &n);
            a->n_returns += n;
            _odf_family_unlock(a);
        }
        pthread_mutex_unlock(&a->local);
    }
    _odf_restore_signals(&old);
}

static void odf_sigchld(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    if (si->si_code == CLD_EXITED || si->si_code == CLD_KILLED || si->si_code == CLD_DUMPED)
        children_gone(si->si_pid);
    errno = saved;
    if (prev.sa_flags & SA_SIGINFO)
        prev.sa_sigaction(sig, si, uc);
    else if (prev.sa_handler != SIG_DFL)
        prev.sa_handler(sig);
    errno = saved;
}

void _odf_sigchld_install(void)
{
    int expect = 0;
    if (atomic_load(&state) || !atomic_compare_exchange_strong(&state, &expect, 2))
        return;
    const char *env = getenv("ODFORK_SIGCHLD");
    struct sigaction cur, sa;
    if ((env && env[0] == '0') || sigaction(SIGCHLD, NULL, &cur) < 0)
        return;
    int handler = (cur.sa_flags & SA_SIGINFO) || (cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN);
    if ((!handler && cur.sa_handler == SIG_IGN) || (cur.sa_flags & SA_RESETHAND))
        return; /* children reaped by the kernel, or a one-shot handler: left as they are */
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = odf_sigchld;
    if (handler) {
        /* the program's restart and stop choices; never an alternate stack,
         * which may be too small for a fold batch (~12 KiB of frames) */
        sa.sa_flags = (cur.sa_flags | SA_SIGINFO) & ~SA_ONSTACK;
        sa.sa_mask = cur.sa_mask;
    } else {
        sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NOCLDSTOP | (cur.sa_flags & SA_NOCLDWAIT);
        sigemptyset(&sa.sa_mask);
    }
    prev = cur;
    if (sigaction(SIGCHLD, &sa, NULL) == 0)
        atomic_store(&state, 1);
}
