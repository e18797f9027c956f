from setuptools import setup

setup(
    cffi_modules=["odfork_user/_ffi_build.py:ffi"],
)
