/* folder.c - the folder: one thread per process that folds views nobody
 * else shares back into their segments (cow.c odf_arena_fold_step), at the
 * pace odfork.h sets (ODF_FOLD_*).  Started and stopped by the core's
 * clients: the Python package (src/odfork_user/_folder.py decides when) and
 * the preload library of `exec`.
 *
 * Why a thread of the core's own rather than one of the client's: it runs
 * no code of the program (no Python, no allocator, every signal blocked),
 * so it writes arena memory only under a->local, inside the core; it says so
 * (odf_thread_quiet), and a child's exit can then return views while it runs
 * (sigchld.c).
 *
 * Every step visits each arena of the registry with _odf_registry_lock held
 * for one slice (ODF_FOLD_SLICE_NS) at a time: odf_arena_close (which takes
 * it to unregister) and a fork (prepare takes it first) wait for one slice
 * at most, and an arena is never used after it was closed.
 *
 * Lock order: folder_lock, then _odf_registry_lock (never both: the thread
 * takes only the registry lock, start/stop only folder_lock).
 */
#include "internal.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t folder_lock = PTHREAD_MUTEX_INITIALIZER; /* start/stop */
static pthread_t folder;
static int running;          /* under folder_lock */
static _Atomic int stopping; /* the thread ends at its next look */
static _Atomic pid_t folder_tid;
/* The thread sleeps on wake_cond (CLOCK_MONOTONIC) between steps; a stop
 * signals it, so that a stop (before every fork on Python 3.12+) waits for
 * the current slice at most, not for the sleep. */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond;
static pthread_once_t cond_once = PTHREAD_ONCE_INIT;

static void cond_init(void)
{
    pthread_condattr_t at;
    pthread_condattr_init(&at);
    pthread_condattr_setclock(&at, CLOCK_MONOTONIC);
    pthread_cond_init(&wake_cond, &at);
    pthread_condattr_destroy(&at);
}

/* One step: each arena for at most ODF_FOLD_BUDGET_NS, a slice per hold of
 * the registry lock.  1 when the budget left foldable views behind. */
static int step(void)
{
    int behind = 0;
    for (int i = 0; i < ODF_MAX_ARENAS && !atomic_load(&stopping); i++) {
        uint64_t end = _odf_now_ns() + ODF_FOLD_BUDGET_NS;
        for (;;) {
            uint32_t left = 0;
            pthread_mutex_lock(&_odf_registry_lock);
            odf_arena_t *a = atomic_load(&_odf_registry[i]);
            if (a && !a->orphaned && !atomic_load(&a->no_folder))
                odf_arena_fold_step(a, ODF_FOLD_SLICE_NS, &left);
            pthread_mutex_unlock(&_odf_registry_lock);
            if (!left || atomic_load(&stopping))
                break;
            if (_odf_now_ns() >= end) {
                behind = 1;
                break;
            }
            sched_yield(); /* a fork or a close waiting for the lock gets it now */
        }
    }
    return behind;
}

static void *loop(void *unused)
{
    (void)unused; /* every signal blocked from birth (odf_folder_start) */
    atomic_store(&folder_tid, (pid_t)syscall(SYS_gettid));
    _odf_quiet_tid(atomic_load(&folder_tid));
    int behind = 0;
    while (!atomic_load(&stopping)) {
        /* views left by the budget: catch up at half a CPU, else a tenth */
        uint64_t wake = _odf_now_ns() + (behind ? ODF_FOLD_BUDGET_NS : ODF_FOLD_PERIOD_NS);
        struct timespec ts = {(time_t)(wake / 1000000000ULL), (long)(wake % 1000000000ULL)};
        pthread_mutex_lock(&wake_lock);
        while (!atomic_load(&stopping) && _odf_now_ns() < wake)
            pthread_cond_timedwait(&wake_cond, &wake_lock, &ts);
        pthread_mutex_unlock(&wake_lock);
        if (!atomic_load(&stopping))
            behind = step();
    }
    _odf_quiet_tid(0);
    return NULL;
}

int odf_folder_start(void)
{
    int rc = 0;
    pthread_once(&cond_once, cond_init);
    pthread_mutex_lock(&folder_lock);
    if (!running) {
        sigset_t old;
        atomic_store(&stopping, 0);
        /* born with every signal blocked: no handler (SIGCHLD's in
         * particular, which must run in a thread of the program) ever runs
         * on it */
        _odf_block_signals(&old);
        rc = pthread_create(&folder, NULL, loop, NULL);
        _odf_restore_signals(&old);
        if (rc == 0) {
            /* counted quiet from here, not from when it first runs: a child
             * that exits before then must find it counted (sigchld.c) */
            odf_thread_quiet(1);
            running = 1;
            pthread_setname_np(folder, "odfork-fold"); /* as top -H and /proc/PID/task/TID/comm show it */
        }
    }
    pthread_mutex_unlock(&folder_lock);
    return rc;
}

void odf_folder_stop(void)
{
    pthread_mutex_lock(&folder_lock);
    if (running) {
        pthread_mutex_lock(&wake_lock);
        atomic_store(&stopping, 1);
        pthread_cond_signal(&wake_cond);
        pthread_mutex_unlock(&wake_lock);
        pthread_join(folder, NULL);
        running = 0;
        /* join returns once the thread cleared its id, a little before the
         * kernel stops counting it (/proc/self/stat's num_threads, which
         * Python 3.12+ reads before warning about a fork): wait for that */
        pid_t tid = atomic_exchange(&folder_tid, 0);
        char path[64] = "/proc/self/task/";
        if (tid > 0) {
            struct stat st;
            _odf_fmt_u(path + strlen(path), (unsigned)tid, 10);
            for (int i = 0; i < 20000 && stat(path, &st) == 0; i++) {
                if (i < 100) {
                    sched_yield();
                } else {
                    struct timespec ts = {0, 100000L};
                    nanosleep(&ts, NULL);
                }
            }
        }
        odf_thread_quiet(0); /* gone: (counted until here, the handler did nothing meanwhile) */
    }
    pthread_mutex_unlock(&folder_lock);
}

void odf_arena_background(odf_arena_t *a, int on) { atomic_store(&a->no_folder, !on); }

int odf_folder_running(void)
{
    pthread_mutex_lock(&folder_lock);
    int r = running;
    pthread_mutex_unlock(&folder_lock);
    return r;
}

void _odf_folder_forget(void)
{
    /* in the child of a fork: the thread did not come along */
    pthread_mutex_init(&folder_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    if (atomic_load(&folder_tid))
        cond_init(); /* the parent's thread may have been waiting on it */
    running = 0;
    atomic_store(&folder_tid, 0);
    atomic_store(&stopping, 0);
}
