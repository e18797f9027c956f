typedef int... pid_t;

#define ODF_CHUNK_SIZE ...
#define ODF_DEFAULT_MAX_SLOTS ...
#define ODF_CHECK_MSG_LEN ...
#define ODF_FOLD_PERIOD_NS ...
#define ODF_FOLD_BUDGET_NS ...
#define ODF_FOLD_SLICE_NS ...

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
    uint64_t views;
    uint64_t folds;
    uint64_t returns;
} odf_stats_t;

typedef struct {
    uint32_t max_slots;
    uint32_t max_segs;
    int chunk_cow;
} odf_arena_opts_t;
int odf_arena_create(size_t size, const odf_arena_opts_t *opts, odf_arena_t **out);
int odf_arena_close(odf_arena_t *a);
int odf_uffd_probe(void);
int odf_uffd_enable(int on);
int odf_arena_fold(odf_arena_t *a, uint32_t max_dirty);
int odf_arena_fold_step(odf_arena_t *a, uint64_t budget_ns, uint32_t *left);
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
void odf_thread_quiet(int on);
int odf_folder_start(void);
void odf_folder_stop(void);
int odf_folder_running(void);
void odf_arena_background(odf_arena_t *a, int on);
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
void *memset(void *s, int c, size_t n);
int odf_snapshot_take(odf_arena_t *a, uint64_t *id);
int odf_snapshot_release(odf_arena_t *a, uint64_t id);
int odf_snapshot_map(odf_arena_t *a, uint64_t id, uintptr_t *addr);
int odf_snapshot_unmap(uintptr_t addr, size_t size);
int odf_snapshot_restore(odf_arena_t *a, uint64_t id);
#define ODF_HEAP_NCLASS ...
#define ODF_HEAP_MAX_SMALL ...
typedef struct odf_heap_s odf_heap_t;
typedef struct odf_heap_stats_s {
    uint64_t live_bytes;
    uint64_t live_blocks;
    uint64_t raw_bytes;
    uint64_t top_bytes;
    uint64_t mapped_bytes;
    uint64_t free_page_bytes;
    uint64_t free_extents;
} odf_heap_stats_t;
int odf_heap_create(odf_arena_t *a, uintptr_t start, size_t len, odf_heap_t **out);
void *odf_heap_alloc(odf_heap_t *h, size_t n);
void *odf_heap_realloc(odf_heap_t *h, void *p, size_t n);
void odf_heap_free(odf_heap_t *h, void *p);
size_t odf_heap_usable(odf_heap_t *h, const void *p);
int odf_heap_alloc_aligned(odf_heap_t *h, size_t align, size_t n, void **out);
void *odf_heap_alloc_raw(odf_heap_t *h, size_t n);
void odf_heap_free_raw(odf_heap_t *h, void *p, size_t n);
int odf_heap_owns(odf_heap_t *h, const void *p);
int odf_heap_in_range(odf_heap_t *h, const void *p);
void odf_heap_stats(odf_heap_t *h, odf_heap_stats_t *out);
int odf_heap_check(odf_heap_t *h);
int odf_arena_release(odf_arena_t *a, uintptr_t addr, size_t len);
int odf_py_install(odf_heap_t *h);
void odf_py_uninstall(void);
int odf_py_installed(void);
int odf_py_numpy_hook(void);
void odf_py_numpy_stats(size_t *in_heap, size_t *outside);
