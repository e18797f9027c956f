/* fault_sigsegv.c - delivers write faults on arena memory to _odf_fault.
 *
 * This file only finds the arena and chunk of a faulting address; what a
 * fault means lives in cow.c (_odf_fault).
 *
 * Contract of the handler (it runs at a moment when nothing about the
 * program's state is known): no malloc, no stdio, no locks other than the
 * arena's own (see internal.h), errno saved and restored.  It runs with every
 * signal blocked (sa_mask full), SIGSEGV included, so a fault inside it kills
 * the process instead of recursing.
 *
 * Chaining: faults outside every arena, faults on an arena this process lost,
 * and faults _odf_fault cannot resolve go to the handler that was installed
 * before ours (faulthandler, say), called directly as faulthandler itself
 * chains; with none, the default action runs and the process dies of SIGSEGV.
 */
#include "internal.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static struct sigaction odf_prev;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int installed;
/* When the core chained a fault and the previous handler re-raises the
 * signal "to its own previous handler" (faulthandler does: it restores its
 * previous handler, which is the core when it was enabled after the core, and
 * calls raise()), the core must not chain again: the two would call each other
 * for ever.  A self-sent SIGSEGV within this long of a chain takes the default
 * action instead. */
#define CHAIN_LOOP_NS (1000ULL * 1000000ULL)
static _Atomic uint64_t last_chain_ns;

static void die_by_default(int sig, siginfo_t *si)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(sig, &dfl, NULL);
    if (si->si_code <= 0)
        raise(sig); /* pending until we return, then fatal */
    /* a kernel fault: the instruction faults again, now with no handler */
}

static void report(const char *what, uintptr_t addr, int err)
{
    char buf[160], *p = buf;
    const char *pre = "odfork_user: ";
    strcpy(p, pre);
    p += strlen(pre);
    strcpy(p, what);
    p += strlen(what);
    strcpy(p, " at 0x");
    p = _odf_fmt_u(p + 6, addr, 16);
    strcpy(p, " (errno ");
    p = _odf_fmt_u(p + 8, (unsigned)err, 10);
    strcpy(p, ")\n");
    _odf_write_stderr(buf);
}

static void chain(int sig, siginfo_t *si, void *uc)
{
    struct sigaction prev = odf_prev;
    if (si->si_code <= 0 && si->si_pid == getpid() && _odf_now_ns() - atomic_load(&last_chain_ns) < CHAIN_LOOP_NS) {
        die_by_default(sig, si); /* the previous handler re-raised to us: see CHAIN_LOOP_NS */
        return;
    }
    if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction) {
        atomic_store(&last_chain_ns, _odf_now_ns());
        prev.sa_sigaction(sig, si, uc);
        return;
    }
    if (!(prev.sa_flags & SA_SIGINFO) && prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
        atomic_store(&last_chain_ns, _odf_now_ns());
        prev.sa_handler(sig);
        return;
    }
    /* Default action: the process dies of SIGSEGV as it would have without us. */
    die_by_default(sig, si);
}

static void odf_sigsegv(int sig, siginfo_t *si, void *uc)
{
    int saved = errno;
    uintptr_t addr = (uintptr_t)si->si_addr;
    odf_arena_t *a = si->si_code > 0 ? _odf_registry_find(addr) : NULL;
    if (a) {
        if (a->orphaned) {
            report("arena memory is not available in this process (a fork could not share it)", addr,
                   a->fork_err ? a->fork_err : EOWNERDEAD);
        } else {
            uint32_t c = (uint32_t)((addr - a->base) >> ODF_CHUNK_SHIFT);
            if (a->crash_in_handler) { /* test hook: a bug inside the handler */
                int *volatile bad = (int *)16;
                *bad = 0;
            }
            pthread_mutex_lock(&a->local);
            int rc = _odf_fault(a, c);
            pthread_mutex_unlock(&a->local);
            if (rc == 0) {
                errno = saved;
                return;
            }
            if (rc != ODF_FAULT_PROGRAM)
                report("cannot resolve a write fault on arena memory", addr, rc);
        }
    }
    chain(sig, si, uc);
    errno = saved;
}

static int install_locked(void)
{
    struct sigaction sa, cur;
    if (sigaction(SIGSEGV, NULL, &cur) < 0)
        return errno;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == odf_sigsegv)
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = odf_sigsegv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigfillset(&sa.sa_mask);
    odf_prev = cur;
    if (sigaction(SIGSEGV, &sa, NULL) < 0)
        return errno;
    atomic_store(&installed, 1);
    return 0;
}

int _odf_handler_install(void)
{
    pthread_mutex_lock(&install_lock);
    int rc = install_locked();
    pthread_mutex_unlock(&install_lock);
    return rc;
}

int odf_handler_ensure(void)
{
    if (!atomic_load(&installed))
        return 0;
    return _odf_handler_install();
}
