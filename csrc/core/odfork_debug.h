/* odfork_debug.h - test hooks of the odfork_user core (check.c): not part of
 * the public API.  The Python tests reach them through the cffi module. */
#ifndef ODFORK_DEBUG_H
#define ODFORK_DEBUG_H

#include "odfork.h"

/* Test hooks: break the family state on purpose (tests prove that check()
 * and the isolation tests can fail).  `what` is one of: */
enum odf_debug_hook {
    ODF_DEBUG_EXTRA_REF = 1,        /* one count too many on the chunk's segment */
    ODF_DEBUG_BROKEN_COW = 2,       /* resolve shared faults without a copy (a broken COW) */
    ODF_DEBUG_DROP_EXTRA_REF = 3,   /* undo ODF_DEBUG_EXTRA_REF */
    ODF_DEBUG_DIE_LOCKED = 4,       /* die of SIGKILL holding the family lock, a count half updated */
    ODF_DEBUG_CRASH_IN_HANDLER = 5, /* fault inside the SIGSEGV handler on the next arena fault */
    ODF_DEBUG_FOLD_DELAY = 6        /* folds wait `chunk` ms between their first look at the pages
                                      and holding writers off (a window for racing writers) */
};
int _odf_debug_break(odf_arena_t *a, int what, uint32_t chunk);

#endif
