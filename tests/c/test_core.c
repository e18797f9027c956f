/* C-level unit test of the page-table and refcount code, through the public
 * API: first touch, fork + copy on write in the child, reuse in the parent,
 * snapshot/restore, the invariant check, and close.  Run under valgrind by
 * tests/test_reliability.py; exits non-zero on the first failed check.
 *
 * Writes go through odf_arena_prepare_write (the same _odf_fault the SIGSEGV
 * handler calls): valgrind turns a fault on a PROT_NONE page into a "general
 * protection fault" with no address, so the signal path cannot run under it.
 * The Python tests cover that path. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <errno.h>

#include "odfork.h"

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                                   \
            exit(1);                                                                                                   \
        }                                                                                                              \
    } while (0)

static void wr(odf_arena_t *a, unsigned char *p, size_t off, int byte, size_t len)
{
    CHECK(odf_arena_prepare_write(a, (uintptr_t)(p + off), len) == 0);
    memset(p + off, byte, len);
}

static void invariants(odf_arena_t *a)
{
    char msg[ODF_CHECK_MSG_LEN];
    int rc = odf_arena_check(a, msg, sizeof msg);
    if (rc)
        fprintf(stderr, "check: %s\n", msg);
    CHECK(rc == 0);
}

int main(void)
{
    odf_arena_t *a;
    odf_stats_t st;
    odf_arena_opts_t opts = {.max_slots = 16};
    CHECK(odf_arena_create(8 * ODF_CHUNK_SIZE, &opts, &a) == 0);
    unsigned char *p = (unsigned char *)odf_arena_base(a);
    wr(a, p, 0, 'p', 4 * ODF_CHUNK_SIZE); /* first touch of 4 chunks */
    CHECK(odf_arena_stats(a, &st) == 0 && st.chunks_resident == 4 && st.segments_live == 4);
    invariants(a);

    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        odf_stats_t cs;
        if (p[0] != 'p' || p[3 * ODF_CHUNK_SIZE] != 'p')
            _exit(10);
        wr(a, p, ODF_CHUNK_SIZE + 5, 'c', 2);
        if (odf_arena_stats(a, &cs) || cs.cow_copies != 1 || cs.chunks_shared != 3)
            _exit(11);
        char msg[ODF_CHECK_MSG_LEN];
        _exit(odf_arena_check(a, msg, sizeof msg) ? 12 : 0);
    }
    int status;
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(p[ODF_CHUNK_SIZE + 5] == 'p');
    wr(a, p, ODF_CHUNK_SIZE + 5, 'q', 1); /* child gone: reuse, no copy */
    CHECK(odf_arena_stats(a, &st) == 0 && st.reuses == 1 && st.cow_copies == 0 && st.segments_live == 4);
    invariants(a);

    uint64_t id;
    CHECK(odf_snapshot_take(a, &id) == 0);
    wr(a, p, 0, 'x', 1);
    wr(a, p, 7 * ODF_CHUNK_SIZE, 'n', 1); /* a chunk the snapshot does not have */
    CHECK(odf_arena_stats(a, &st) == 0 && st.cow_copies == 1);
    invariants(a);
    CHECK(odf_snapshot_restore(a, id) == 0);
    CHECK(p[0] == 'p' && p[ODF_CHUNK_SIZE + 5] == 'q');
    invariants(a);
    CHECK(odf_snapshot_release(a, id) == 0);
    CHECK(odf_snapshot_release(a, id) == ENOENT);
    invariants(a);
    /* chunks 0-3; the restore emptied chunk 7 again */
    CHECK(odf_arena_stats(a, &st) == 0 && st.segments_live == 4 && st.chunks_resident == 4 && st.slots_used == 1);
    CHECK(odf_arena_close(a) == 0);
    printf("c core test: ok\n");
    return 0;
}
