typedef int... pid_t;

#define ODF_CHUNK_SIZE ...
#define ODF_DEFAULT_MAX_SLOTS ...
#define ODF_CHECK_MSG_LEN ...

typedef struct odf_arena_s odf_arena_t;

typedef struct odf_stats_s {
    uint64_t chunks;
    uint64_t chunks_resident;
    uint64_t chunks_shared;
    uint64_t faults;
    uint64_t cow_copies;
    uint64_t reuses;
    uint64_t bytes_copied;
    uint64_t forks;
    uint64_t segments_live;
    uint64_t segments_max;
    uint64_t slots_used;
    uint64_t uffd_faults;
} odf_stats_t;

int odf_arena_create(size_t size, uint32_t max_slots, uint32_t max_segs, odf_arena_t **out);
int odf_arena_close(odf_arena_t *a);
int odf_uffd_probe(void);
int odf_uffd_enable(int on);
int odf_arena_uffd(const odf_arena_t *a);
int odf_arena_populate(odf_arena_t *a, uintptr_t addr, size_t len);
uintptr_t odf_arena_base(const odf_arena_t *a);
size_t odf_arena_size(const odf_arena_t *a);
int odf_arena_stats(odf_arena_t *a, odf_stats_t *out);
int odf_arena_check(odf_arena_t *a, char *msg, size_t msglen);
int odf_arena_reap(odf_arena_t *a);
int odf_arena_prepare_write(odf_arena_t *a, uintptr_t addr, size_t len);
int odf_fork_check(void);
void odf_fork_note_child(pid_t pid);
void odf_fork_abort(void);
int odf_fork_last_error(void);
int odf_handler_ensure(void);
int _odf_debug_break(odf_arena_t *a, int what, uint32_t chunk);
void *memset(void *s, int c, size_t n);
int odf_snapshot_take(odf_arena_t *a, uint64_t *id);
int odf_snapshot_release(odf_arena_t *a, uint64_t id);
int odf_snapshot_map(odf_arena_t *a, uint64_t id, uintptr_t *addr);
int odf_snapshot_unmap(uintptr_t addr, size_t size);
int odf_snapshot_restore(odf_arena_t *a, uint64_t id);
int odf_arena_set_page_cow(odf_arena_t *a, int on);
