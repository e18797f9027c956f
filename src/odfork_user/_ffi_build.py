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
CORE = [
    "core/prim.c",
    "core/park.c",
    "core/registry.c",
    "core/uffd.c",
    "core/family.c",
    "core/cow.c",
    "core/fault_sigsegv.c",
    "core/sigchld.c",
    "core/folder.c",
    "core/fork.c",
    "core/snapshot.c",
    "core/check.c",
    "core/arena.c",
]
# its clients: the heap (used by both products), CPython's hooks (this extension only)
HEAP = ["heap/heap.c"]
SOURCES = CORE + HEAP + ["py/pyalloc.c"]
INCLUDE_DIRS = ["csrc/core", "csrc/heap", "csrc/py"]

extra_compile = ["-std=gnu11", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link = []
sanitize = os.environ.get("ODFORK_SANITIZE")
if sanitize:
    extra_compile += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link += [f"-fsanitize={sanitize}"]


def make_ffi(root=""):
    """The cffi builder.  root: prefix of the C paths; setuptools wants them
    relative to the project root (the default), an in-place build absolute."""
    builder = FFI()
    builder.cdef((CSRC / "py" / "odfork_cdef.h").read_text())
    builder.set_source(
        "odfork_user._ffi",
        '#include "odfork.h"\n#include "odfork_heap.h"\n#include "odfork_py.h"\n#include "odfork_debug.h"\n'
        "#include <string.h>\n",
        sources=[f"{root}csrc/{name}" for name in SOURCES],
        include_dirs=[f"{root}{d}" for d in INCLUDE_DIRS],
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        libraries=["pthread"],
    )
    return builder


ffi = make_ffi()  # named by setup.py's cffi_modules

if __name__ == "__main__":  # in place: src/odfork_user/_ffi*.so, for PYTHONPATH=src
    make_ffi(f"{ROOT}/").compile(tmpdir=str(ROOT / "src"), verbose=True)
