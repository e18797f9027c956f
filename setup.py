import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "odfork_user-run.pth"  # ODFORK_RUN=1: the arena heap from interpreter start-up (odfork_user/launcher.py)


class build_py_with_pth(build_py):
    """Puts the .pth file at the top of the wheel, that is, in site-packages."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


setup(
    cffi_modules=["odfork_user/_ffi_build.py:ffi"],
    cmdclass={"build_py": build_py_with_pth},
)
