import importlib.util
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH = "odfork_user-run.pth"  # ODFORK_RUN=1: the arena heap from interpreter start-up (src/odfork_user/cli/run.py)


class build_py_with_pth(build_py):
    """Puts the .pth file at the top of the wheel, that is, in site-packages,
    and leaves the cffi build script out of it (exclude-package-data only
    covers data files, not modules)."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] != ("odfork_user", "_ffi_build")]

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


def _preload_sources():
    """The core and the heap (csrc/), as the cffi build script lists them."""
    spec = importlib.util.spec_from_file_location("_ffi_build_sources", "src/odfork_user/_ffi_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [f"csrc/{name}" for name in mod.CORE + mod.HEAP]


# The LD_PRELOAD library (python -m odfork_user exec): the core plus
# csrc/preload/odfork_preload.c, no Python in it.  Built as an extension module
# only so that it lands beside the package; nothing imports it.
preload = Extension(
    "odfork_user._preload",
    sources=["csrc/preload/odfork_preload.c"] + _preload_sources(),
    include_dirs=["csrc/core", "csrc/heap"],
    define_macros=[("ODF_HEAP_SYS_LIBC", "1")],  # heap.c's own bookkeeping from glibc, not from itself
    # every file's own mmap &c. go to the kernel, never to the library's exported ones (sys_mman.h)
    extra_compile_args=[
        "-std=gnu11",
        "-O2",
        "-fvisibility=hidden",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-include",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc/preload/sys_mman.h"),
    ],
    libraries=["pthread", "dl"],
)

setup(
    cffi_modules=["src/odfork_user/_ffi_build.py:ffi"],
    ext_modules=[preload],
    cmdclass={"build_py": build_py_with_pth},
)
