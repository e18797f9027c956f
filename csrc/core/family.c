/* family.c - the state a family shares, in its control memfd: the control
 * block, the family lock and its recovery, segment counts and the free and
 * kept stacks, slots (software page tables), liveness of their owners, and
 * reaping of dead members.
 *
 * Above prim.c and park.c only.  Everything the SIGSEGV handler reaches
 * (through cow.c's _odf_fault) is async-signal-safe: no malloc, no stdio, only
 * syscalls and atomics (the family lock is a record lock and mprotect(2);
 * never re-entered, see the locking rules in internal.h).
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define ALIGN_UP(x, a) (((x) + (a)-1) & ~((size_t)(a)-1))

/* Liveness (see internal.h).  The record lock is byte `total + idx` of the
 * control memfd, past its end (record locks need no data there).  Everything
 * here is async-signal-safe: plain syscalls and hand-made formatting. */
int _odf_slot_hold_alive(odf_arena_t *a, uint32_t idx, int hold)
{
    struct flock fl = {.l_type = (short)(hold ? F_WRLCK : F_UNLCK),
                       .l_whence = SEEK_SET,
                       .l_start = (off_t)(a->ctl_total + idx),
                       .l_len = 1};
    return fcntl(a->ctl_fd, F_SETLK, &fl) < 0 ? errno : 0;
}

/* "/proc/<pid>/<leaf>" into buf (>= 64 bytes). */
static void proc_path(char *buf, pid_t pid, const char *leaf)
{
    char *p = buf;
    memcpy(p, "/proc/", 6);
    p = _odf_fmt_u(p + 6, (unsigned long long)pid, 10);
    *p++ = '/';
    size_t n = strlen(leaf);
    memcpy(p, leaf, n + 1);
}

/* State letter and start time (field 22) of pid from /proc/<pid>/stat:
 * 0, ENOENT (no such process), or another errno (cannot tell). */
static int proc_stat(pid_t pid, char *state, uint64_t *start)
{
    char path[64], buf[1024];
    proc_path(path, pid, "stat");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? ENOENT : errno;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    int err = errno;
    close(fd);
    if (n <= 0)
        return n < 0 && err == ESRCH ? ENOENT : (n < 0 ? err : EIO);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p || p[1] != ' ')
        return EIO;
    p += 2;
    *state = *p;
    for (int field = 3; field < 22; field++) { /* p is at the start of `field` */
        p = strchr(p, ' ');
        if (!p)
            return EIO;
        p++;
    }
    uint64_t v = 0;
    while (*p >= '0' && *p <= '9')
        v = v * 10 + (uint64_t)(*p++ - '0');
    *start = v;
    return 0;
}

uint64_t _odf_proc_start_ticks(pid_t pid)
{
    char st;
    uint64_t start = 0;
    return proc_stat(pid, &st, &start) ? 0 : start;
}

int _odf_slot_is_alive(odf_arena_t *a, uint32_t idx)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (off_t)(a->ctl_total + idx), .l_len = 1};
    if (fcntl(a->ctl_fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK)
        return 1; /* held: alive and not exec'd (the descriptor is close-on-exec) */
    /* The lock is gone: the owner died or exec'd, or it closed the descriptor. */
    odf_slot_t *s = &a->slots[idx];
    pid_t pid = atomic_load(&s->pid);
    if (pid <= 0)
        return 1;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 0;
    char state = 0;
    uint64_t start = 0;
    int rc = proc_stat(pid, &state, &start);
    if (rc == ENOENT)
        return 0;
    if (rc)
        return 1; /* cannot tell */
    if (state == 'Z' || state == 'X' || (s->start_ticks && start != s->start_ticks))
        return 0; /* exited (its memory is gone), or the pid was reused */
    /* Still the same process: does it still map the control block (not after exec)? */
    char leaf[64], path[96], *p = leaf;
    memcpy(p, "map_files/", 10);
    p = _odf_fmt_u(p + 10, (uintptr_t)a->ctl, 16);
    *p++ = '-';
    _odf_fmt_u(p, (uintptr_t)a->ctl + a->ctl_total, 16);
    proc_path(path, pid, leaf);
    struct stat stt;
    if (lstat(path, &stt) == 0)
        return 1;
    return errno == ENOENT ? 0 : 1;
}

/* Reopen fd's file from /proc/self/map_files/<start>-<end> of a mapping of it
 * into *out (-1 when it cannot be): 0 or errno. */
static int reopen_mapped(uintptr_t start, size_t len, uint64_t ino, uint64_t dev, int mode, int *out)
{
    char path[96], *p = path;
    *out = -1;
    memcpy(p, "/proc/self/map_files/", 21);
    p = _odf_fmt_u(p + 21, start, 16);
    *p++ = '-';
    _odf_fmt_u(p, start + len, 16);
    int fd = open(path, mode | O_CLOEXEC);
    if (fd < 0)
        return errno;
    struct stat st;
    if (fstat(fd, &st) < 0 || (uint64_t)st.st_ino != ino || (uint64_t)st.st_dev != dev) {
        close(fd);
        return EBADF;
    }
    *out = fd;
    return 0;
}

static int fd_is(int fd, uint64_t ino, uint64_t dev)
{
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_ino == ino && (uint64_t)st.st_dev == dev;
}

int _odf_fds_check(odf_arena_t *a)
{
    int rc = 0, err;
    if (!fd_is(a->pool_fd, a->pool_ino, a->pool_dev)) {
        /* the number is the program's now (or nothing): never close it.  -1 when
         * it cannot be reopened: views and copies then fail with EBADF, or go
         * through the pieces (park.c) */
        rc = reopen_mapped(a->anchor, 4096, a->pool_ino, a->pool_dev, a->pool_ro ? O_RDONLY : O_RDWR, &a->pool_fd);
    }
    if (!fd_is(a->ctl_fd, a->ctl_ino, a->ctl_dev)) {
        err = reopen_mapped((uintptr_t)a->ctl, a->ctl_total, a->ctl_ino, a->ctl_dev, O_RDWR, &a->ctl_fd);
        if (!err)
            _odf_slot_hold_alive(a, a->self, 1); /* the record lock went with the old descriptor */
        else if (!rc)
            rc = err;
    }
    return rc;
}

int _odf_ctl_writable(odf_arena_t *a, int on)
{
    return mprotect(a->ctl, a->ctl_total, on ? PROT_READ | PROT_WRITE : PROT_READ) < 0 ? errno : 0;
}

int _odf_ctl_init(odf_arena_t *a, uint32_t max_slots, uint32_t max_segs)
{
    size_t off_refcnt = ALIGN_UP(sizeof(odf_ctl_t), 4096);
    size_t off_free = off_refcnt + ALIGN_UP((size_t)max_segs * 4, 4096);
    size_t off_dirty = off_free + ALIGN_UP((size_t)max_segs * 4, 4096);
    size_t off_slots = off_dirty + ALIGN_UP((size_t)max_segs * 4, 4096);
    size_t off_pt = off_slots + ALIGN_UP((size_t)max_slots * sizeof(odf_slot_t), 4096);
    size_t total = off_pt + ALIGN_UP((size_t)max_slots * a->nchunks * 4, 4096);

    a->ctl_fd = memfd_create("odfork-ctl", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    struct stat st;
    if (a->ctl_fd < 0 || ftruncate(a->ctl_fd, (off_t)total) < 0 || fstat(a->ctl_fd, &st) < 0)
        return errno;
    a->ctl_ino = (uint64_t)st.st_ino;
    a->ctl_dev = (uint64_t)st.st_dev;
    if (fstat(a->pool_fd, &st) < 0)
        return errno;
    a->pool_ino = (uint64_t)st.st_ino;
    a->pool_dev = (uint64_t)st.st_dev;
    /* Mapped writable once (it can be made writable again under the family
     * lock, here and in the children, who inherit the mapping), then sealed:
     * no write(2) through any descriptor and no new writable mapping, so a
     * write to a wrong descriptor number cannot reach the block (EPERM). */
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, a->ctl_fd, 0);
    if (p == MAP_FAILED)
        return errno;
    odf_ctl_t *ctl = a->ctl = p;
    a->ctl_total = total;
    if (fcntl(a->ctl_fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) < 0)
        return errno;
    ctl->nchunks = a->nchunks;
    ctl->max_slots = max_slots;
    ctl->max_segs = max_segs;
    ctl->off_refcnt = off_refcnt;
    ctl->off_free = off_free;
    ctl->off_dirty = off_dirty;
    ctl->off_slots = off_slots;
    ctl->off_pt = off_pt;
    ctl->total = total;
    a->refcnt = (uint32_t *)((char *)p + off_refcnt);
    a->freestack = (uint32_t *)((char *)p + off_free);
    a->dirty = (uint32_t *)((char *)p + off_dirty);
    a->slots = (odf_slot_t *)((char *)p + off_slots);
    a->pts = (uint32_t *)((char *)p + off_pt);

    pthread_mutexattr_t at;
    pthread_mutexattr_init(&at);
    pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&at, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&ctl->lock, &at);
    pthread_mutexattr_destroy(&at);
    ctl->magic = ODF_CTL_MAGIC;
    int rc = _odf_ctl_writable(a, 0); /* from now on written only under the family lock */
    if (rc)
        return rc;

    /* The creator's own slot. */
    uint32_t idx;
    rc = _odf_family_lock(a);
    if (rc)
        return rc;
    rc = _odf_slot_alloc(a, ODF_SLOT_LIVE, &idx);
    if (rc == 0)
        rc = _odf_slot_hold_alive(a, idx, 1);
    if (rc == 0) {
        a->slots[idx].pid = getpid();
        a->slots[idx].start_ticks = _odf_proc_start_ticks(getpid());
        a->self = idx;
        a->mypt = ODF_PT(a, idx);
    }
    _odf_family_unlock(a);
    return rc;
}

/* ---- segments (pre: family lock) ---- */

/* Give segment s's pages back: it reads as zeros after.  0 or errno (then
 * it keeps its bytes, and must not be handed out as a fresh segment). */
static int punch(odf_arena_t *a, uint32_t s) { return _odf_pool_punch(a, s); }

/* overwrite: the caller fills all 2 MiB (a copy), so a kept (dirty) segment
 * will do; otherwise the segment must read as zeros. */
int _odf_seg_alloc(odf_arena_t *a, uint32_t *seg, int overwrite)
{
    odf_ctl_t *ctl = a->ctl;
    uint32_t s;
    if (overwrite && ctl->ndirty)
        s = a->dirty[--ctl->ndirty];
    else if (ctl->nfree)
        s = a->freestack[--ctl->nfree];
    else if (ctl->seg_hwm < ctl->max_segs)
        s = ctl->seg_hwm++;
    else if (ctl->ndirty) {
        s = a->dirty[ctl->ndirty - 1];
        int rc = overwrite ? 0 : punch(a, s);
        if (rc)
            return rc;
        ctl->ndirty--;
    } else
        return ENOMEM;
    a->refcnt[s] = 1;
    ctl->segments_live++;
    *seg = s;
    return 0;
}

static void seg_free(odf_arena_t *a, uint32_t s) { a->dirty[a->ctl->ndirty++] = s; /* O(1); see ODF_KEEP */ }

/* Punch up to `budget` kept segments beyond ODF_KEEP, oldest first, back to
 * the system; a punched segment reads as zeros, as a fresh chunk must. */
void _odf_trim_locked(odf_arena_t *a, uint32_t budget)
{
    odf_ctl_t *ctl = a->ctl;
    while (ctl->ndirty > ODF_KEEP && budget--) {
        uint32_t s = a->dirty[0];
        if (punch(a, s))
            return; /* kept, as it was; tried again at the next trim */
        a->dirty[0] = a->dirty[--ctl->ndirty];
        a->freestack[ctl->nfree++] = s;
    }
}

void _odf_seg_decref(odf_arena_t *a, uint32_t s)
{
    if (s >= a->ctl->seg_hwm || a->refcnt[s] == 0)
        return; /* corrupt entry: left for odf_arena_check to report */
    if (--a->refcnt[s] == 0) {
        seg_free(a, s);
        a->ctl->segments_live--;
    }
}

/* ---- family lock and recovery ---- */

/* Rebuild every count from the page tables after a lock holder died midway.
 * The page tables and pins are the source of truth: every update writes them
 * before (alloc) or after (release) the counts, so recounting is exact. */
static void recover(odf_arena_t *a)
{
    odf_ctl_t *ctl = a->ctl;
    memset(a->refcnt, 0, (size_t)ctl->seg_hwm * 4);
    for (uint32_t i = 0; i < ctl->slot_hwm; i++) {
        odf_slot_t *s = &a->slots[i];
        if (ODF_SG_STATE(atomic_load(&s->sg)) == ODF_SLOT_FREE)
            continue;
        uint32_t *pt = ODF_PT(a, i);
        for (uint32_t c = 0; c < s->hi && c < ctl->nchunks; c++)
            if (pt[c] && pt[c] - 1 < ctl->seg_hwm)
                a->refcnt[pt[c] - 1]++;
        if (s->pin && s->pin - 1 < ctl->seg_hwm)
            a->refcnt[s->pin - 1]++;
    }
    ctl->nfree = 0;
    ctl->ndirty = 0;
    for (uint32_t s = 0; s < ctl->seg_hwm; s++) {
        if (a->refcnt[s] == 0) {
            if (punch(a, s))
                a->dirty[ctl->ndirty++] = s; /* kept with its bytes: only for copies */
            else
                a->freestack[ctl->nfree++] = s;
        }
    }
    ctl->segments_live = ctl->seg_hwm - ctl->nfree - ctl->ndirty;
    ctl->recoveries++;
    /* A release that its dead holder left half done is finished now. */
    for (uint32_t i = 0; i < ctl->slot_hwm; i++)
        if (ODF_SG_STATE(atomic_load(&a->slots[i].sg)) == ODF_SLOT_DYING)
            _odf_slot_release(a, i);
}

/* The control block is writable in this process from before the mutex is
 * taken (taking it writes it; a holder that dies has its word marked by the
 * kernel) until after it is released. */
int _odf_family_lock(odf_arena_t *a)
{
    int rc = _odf_ctl_writable(a, 1);
    if (rc)
        return rc;
    rc = pthread_mutex_lock(&a->ctl->lock);
    if (rc == EOWNERDEAD) {
        recover(a);
        pthread_mutex_consistent(&a->ctl->lock);
        rc = 0;
    }
    if (rc == 0)
        _odf_fds_check(a); /* a failure shows as EBADF where a descriptor is used */
    else
        _odf_ctl_writable(a, 0);
    return rc;
}

void _odf_family_unlock(odf_arena_t *a)
{
    pthread_mutex_unlock(&a->ctl->lock);
    _odf_ctl_writable(a, 0);
}

/* ---- slots (pre: family lock) ---- */

int _odf_slot_alloc(odf_arena_t *a, uint32_t state, uint32_t *idx)
{
    odf_ctl_t *ctl = a->ctl;
    uint32_t i;
    for (int pass = 0; pass < 2; pass++) {
        for (i = 0; i < ctl->slot_hwm; i++)
            if (ODF_SG_STATE(atomic_load(&a->slots[i].sg)) == ODF_SLOT_FREE)
                goto found;
        if (ctl->slot_hwm < ctl->max_slots) {
            i = ctl->slot_hwm++;
            goto found;
        }
        _odf_reap_locked(a);
    }
    return EAGAIN;
found:;
    odf_slot_t *s = &a->slots[i];
    uint32_t gen = ODF_SG_GEN(atomic_load(&s->sg)) + 1;
    s->pid = 0;
    s->hi = 0;
    s->pin = 0;
    s->owner = ODF_NONE;
    s->owner_gen = 0;
    s->born_ns = _odf_now_ns();
    s->start_ticks = 0;
    atomic_store(&s->sg, ODF_SG(gen, state));
    *idx = i;
    return 0;
}

/* Give slot `dst` (freshly handed out) the references in pt[0, hi):
 * copy the entries and raise each segment's count.  O(hi). */
void _odf_slot_share(odf_arena_t *a, uint32_t dst, const uint32_t *pt, uint32_t hi)
{
    uint32_t *out = ODF_PT(a, dst);
    for (uint32_t c = 0; c < hi; c++) {
        out[c] = pt[c];
        if (pt[c])
            a->refcnt[pt[c] - 1]++;
    }
    a->slots[dst].hi = hi;
}

/* Drop every reference the slot holds (and its snapshots'), then free it. */
void _odf_slot_release(odf_arena_t *a, uint32_t idx)
{
    odf_slot_t *s = &a->slots[idx];
    uint64_t v = atomic_load(&s->sg);
    uint32_t gen = ODF_SG_GEN(v);
    atomic_store(&s->sg, ODF_SG(gen, ODF_SLOT_DYING));
    uint32_t *pt = ODF_PT(a, idx);
    for (uint32_t c = 0; c < s->hi && c < a->nchunks; c++) {
        if (pt[c]) {
            uint32_t seg = pt[c] - 1;
            pt[c] = 0;
            _odf_seg_decref(a, seg);
        }
    }
    if (s->pin) {
        uint32_t seg = s->pin - 1;
        s->pin = 0;
        _odf_seg_decref(a, seg);
    }
    s->hi = 0;
    s->pid = 0;
    for (uint32_t j = 0; j < a->ctl->slot_hwm; j++) {
        odf_slot_t *t = &a->slots[j];
        if (ODF_SG_STATE(atomic_load(&t->sg)) == ODF_SLOT_SNAP && t->owner == idx && t->owner_gen == gen)
            _odf_slot_release(a, j);
    }
    atomic_store(&s->sg, ODF_SG(gen, ODF_SLOT_FREE));
}

static int pid_is_dead(pid_t pid) { return kill(pid, 0) < 0 && errno == ESRCH; }

static int slot_is_live(odf_arena_t *a, uint32_t idx, uint32_t gen)
{
    if (idx >= a->ctl->slot_hwm)
        return 0;
    uint64_t v = atomic_load(&a->slots[idx].sg);
    return ODF_SG_GEN(v) == gen && ODF_SG_STATE(v) == ODF_SLOT_LIVE;
}

/* Two passes: dead processes (and their snapshots) first, so that a PENDING
 * slot can then tell whether its creator is gone. */
void _odf_reap_locked(odf_arena_t *a)
{
    odf_ctl_t *ctl = a->ctl;
    uint64_t now = 0;
    int saved = errno;
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < ctl->slot_hwm; i++) {
            if (i == a->self && !a->orphaned)
                continue;
            odf_slot_t *s = &a->slots[i];
            uint64_t v = atomic_load(&s->sg);
            uint32_t st = ODF_SG_STATE(v);
            if (pass == 0 && st == ODF_SLOT_LIVE) {
                if (!_odf_slot_is_alive(a, i))
                    _odf_slot_release(a, i);
            } else if (pass == 0 && st == ODF_SLOT_SNAP) {
                if (!slot_is_live(a, s->owner, s->owner_gen))
                    _odf_slot_release(a, i);
            } else if (pass == 1 && (st == ODF_SLOT_PENDING || st == ODF_SLOT_CLAIMED)) {
                pid_t pid = atomic_load(&s->pid);
                int dead;
                if (pid) {
                    dead = pid_is_dead(pid);
                } else {
                    if (!now)
                        now = _odf_now_ns();
                    uint64_t age = now - s->born_ns;
                    dead = age > ODF_PENDING_TIMEOUT_NS ||
                           (age > ODF_PENDING_GRACE_NS && !slot_is_live(a, s->owner, s->owner_gen));
                }
                /* The CAS takes the slot away from a child that might still claim it. */
                if (dead && atomic_compare_exchange_strong(&s->sg, &v, ODF_SG(ODF_SG_GEN(v), ODF_SLOT_DYING)))
                    _odf_slot_release(a, i);
            }
        }
    }
    errno = saved;
}

/* pid, a child of this process, has exited (SIGCHLD): release the slots it
 * held now, without visiting the others.  When the handler runs, the child
 * is either a zombie or already reaped by the wait the signal interrupted
 * (the kernel delivers the signal on that wait's way out).  A zombie may not
 * look dead yet to _odf_slot_is_alive (the kernel sends SIGCHLD before it
 * marks the child a zombie, so /proc/<pid>/stat may still say it runs), so
 * waitid(WNOWAIT) asks: it waits for that mark and reaps nothing (the
 * program's waitpid still gets the status), and a zombie keeps its pid from
 * being reused, so slots carrying it are a dead process's.  A child reaped
 * already is judged as the reaper judges (start time against pid reuse). */
void _odf_reap_child_locked(odf_arena_t *a, pid_t pid)
{
    siginfo_t si;
    int saved = errno;
    memset(&si, 0, sizeof(si));
    int zombie = pid > 0 && waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid;
    for (uint32_t i = 0; pid > 0 && i < a->ctl->slot_hwm; i++) {
        odf_slot_t *s = &a->slots[i];
        uint64_t v = atomic_load(&s->sg);
        uint32_t st = ODF_SG_STATE(v);
        if (i == a->self || atomic_load(&s->pid) != pid)
            continue;
        if (st == ODF_SLOT_LIVE && (zombie || !_odf_slot_is_alive(a, i)))
            _odf_slot_release(a, i);
        else if ((st == ODF_SLOT_PENDING || st == ODF_SLOT_CLAIMED) && (zombie || pid_is_dead(pid)) &&
                 atomic_compare_exchange_strong(&s->sg, &v, ODF_SG(ODF_SG_GEN(v), ODF_SLOT_DYING)))
            _odf_slot_release(a, i);
    }
    errno = saved;
}

/* ---- public operations ---- */

int odf_arena_reap(odf_arena_t *a)
{
    int rc;
    ODF_LOCKED(a, rc, _odf_reap_locked(a); _odf_trim_locked(a, UINT32_MAX));
    return rc;
}
