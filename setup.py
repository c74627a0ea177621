"""Builds canfast._C, the pointer-based C++ kernels.

The extension never includes a torch header: Python hands it raw pointers, shapes and dtype
codes. One binary therefore serves every torch version, and the build needs neither torch nor
CUDA.
"""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# No -march: the AVX2 and AVX-512 kernels carry their own target attributes and are picked at
# run time from cpuid, so one binary runs on any x86-64 CPU.
compile_args = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
link_args = ["-fopenmp"]
if sys.platform == "darwin":
    compile_args = ["-O3", "-Xpreprocessor", "-fopenmp"]
    link_args = ["-lomp"]

ext = Pybind11Extension(
    "canfast._C",
    sorted(
        [
            "csrc/module.cpp",
            "csrc/isa_scalar.cpp",
            "csrc/isa_avx2.cpp",
            "csrc/isa_avx512.cpp",
        ]
    ),
    include_dirs=["csrc"],
    depends=["csrc/canfast.h", "csrc/simd.h", "csrc/kernels.inc.h"],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
