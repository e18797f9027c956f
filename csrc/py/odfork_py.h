/* odfork_py.h - CPython's allocators in an arena heap (csrc/py/pyalloc.c, in
 * the Python extension only). */
#ifndef ODFORK_PY_H
#define ODFORK_PY_H

#include "odfork_heap.h"

/* CPython's MEM and OBJ
 * domains and pymalloc's arenas allocate from h (EBUSY if another heap was
 * installed before); uninstall stops new allocations going there. */
int odf_py_install(odf_heap_t *h);
void odf_py_uninstall(void);
int odf_py_installed(void);
int odf_py_numpy_hook(void);
void odf_py_numpy_stats(size_t *in_heap, size_t *outside);

#endif
