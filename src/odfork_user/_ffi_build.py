"""cffi build script (out-of-line API mode) for the odfork_user C core.

setup.py names ``src/odfork_user/_ffi_build.py:ffi``; ``python src/odfork_user/_ffi_build.py``
builds the extension in place for development.  ``ODFORK_SANITIZE=address,undefined``
adds sanitizer flags.
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent  # the project root: src/odfork_user/ -> .
CSRC = ROOT / "csrc"
# the core, in layers, each file using only those before it (see csrc/core/internal.h)
CORE = ["core/prim.c", "core/park.c", "core/registry.c", "core/uffd.c", "core/family.c", "core/cow.c",
        "core/fault_sigsegv.c", "core/fork.c", "core/snapshot.c", "core/check.c", "core/arena.c"]
# its clients: the heap (used by both products), CPython's hooks (this extension only)
HEAP = ["heap/heap.c"]
SOURCES = CORE + HEAP + ["py/pyalloc.c"]
INCLUDE_DIRS = ["csrc/core", "csrc/heap", "csrc/py"]

ffi = FFI()
ffi.cdef((CSRC / "py" / "odfork_cdef.h").read_text())

extra_compile = ["-std=gnu11", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link = []
sanitize = os.environ.get("ODFORK_SANITIZE")
if sanitize:
    extra_compile += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link += [f"-fsanitize={sanitize}"]

ffi.set_source(
    "odfork_user._ffi",
    '#include "odfork.h"\n#include "odfork_heap.h"\n#include "odfork_py.h"\n#include "odfork_debug.h"\n'
    '#include <string.h>\n',
    # relative paths: setuptools builds from the project root (in-place builds chdir there)
    sources=[f"csrc/{name}" for name in SOURCES],
    include_dirs=INCLUDE_DIRS,
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
    libraries=["pthread"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffi.compile(tmpdir=str(ROOT / "src"), verbose=True)
