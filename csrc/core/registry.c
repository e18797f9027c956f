/* registry.c - the process-wide table of arenas, for the code that has only
 * an address (the SIGSEGV handler) or must visit every arena (the fork
 * handlers).
 *
 * Concurrency: _odf_registry[] is read without locks (the signal handler);
 * it is written only under _odf_registry_lock, with a release store after the
 * arena is fully built and before it is torn down.
 */
#include "internal.h"

#include <errno.h>

odf_arena_t *_Atomic _odf_registry[ODF_MAX_ARENAS];

pthread_mutex_t _odf_registry_lock = PTHREAD_MUTEX_INITIALIZER;

int _odf_registry_add(odf_arena_t *a)
{
    int rc = ENOMEM;
    pthread_mutex_lock(&_odf_registry_lock);
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        if (atomic_load(&_odf_registry[i]) == NULL) {
            a->registry_index = i;
            atomic_store_explicit(&_odf_registry[i], a, memory_order_release);
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&_odf_registry_lock);
    return rc;
}

void _odf_registry_remove(odf_arena_t *a)
{
    pthread_mutex_lock(&_odf_registry_lock);
    if (a->registry_index >= 0)
        atomic_store_explicit(&_odf_registry[a->registry_index], NULL, memory_order_release);
    a->registry_index = -1;
    pthread_mutex_unlock(&_odf_registry_lock);
}

/* Async-signal-safe: lock-free scan of a fixed array. */
odf_arena_t *_odf_registry_find(uintptr_t addr)
{
    for (int i = 0; i < ODF_MAX_ARENAS; i++) {
        odf_arena_t *a = atomic_load_explicit(&_odf_registry[i], memory_order_acquire);
        if (a && addr >= a->base && addr < a->base + a->size)
            return a;
    }
    return NULL;
}
