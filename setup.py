"""Builds fastdl._C: csrc/cpu always, csrc/cuda when torch has CUDA (and FASTDL_NO_CUDA is unset).

Switches: DEBUG=1 (-O0 -g), FASTDL_NO_CUDA=1 (CPU only even when torch has CUDA),
FASTDL_NO_EXT=1 (no extension: the Makefile installs the package and its dependencies that
way, then builds the extension in place once with `setup.py build_ext --inplace`).
The CPU ISA is chosen at run time (csrc/common/isa.cpp): the default build never targets
the build machine's own ISA, because the machine that builds a wheel is not the one that runs it.
"""

import glob
import os
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEBUG = os.environ.get("DEBUG", "0") == "1"
WITH_CUDA = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("FASTDL_NO_CUDA", "0") != "1"
)


def sources(*patterns):
    return sorted(f for p in patterns for f in glob.glob(p, recursive=True))


def _gcc() -> bool:
    """Whether the C++ compiler of the build (CXX, else c++) is GCC."""
    try:
        cmd = [os.environ.get("CXX", "c++"), "--version"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return False
    return "Free Software Foundation" in out


def extension():
    opt = ["-O0", "-g"] if DEBUG else ["-O3", "-DNDEBUG"]
    # GCC splits functions into hot and cold parts from -O2 on; GCC 13 gives empty cold parts
    # zero-length unwind entries, which some linkers (mold, lld) index in .eh_frame_hdr over the
    # real entry at the same address, and an exception thrown there is then never caught.
    # Suspected (not yet confirmed there) cause of the crashes on the GPU machine, which builds
    # with its own /opt/gcc: a C++ input check that threw killed the process.
    no_split = ["-fno-reorder-blocks-and-partition"] if _gcc() else []
    # -fopenmp: at::parallel_for is an inline OpenMP region, serial without it. The extension
    # then resolves libgomp.so.1 to the copy torch has already loaded: one OpenMP runtime.
    # -g0: Python's build flags carry -g, whose debug info had been a fifth of the C++ compile
    # time and 90% of the library's size (perf's symbols stay in the symbol table). Kept where
    # asked for: DEBUG, or -g in CFLAGS (a sanitizer build's line numbers).
    no_debug = [] if DEBUG or "-g" in os.environ.get("CFLAGS", "").split() else ["-g0"]
    cxx = [*opt, *no_debug, "-std=c++20", "-Wall", "-fopenmp", "-fvisibility=hidden", *no_split]
    srcs = sources("csrc/*.cpp", "csrc/common/*.cpp", "csrc/cpu/*.cpp", "csrc/cpu/isa/*.cpp")
    kwargs = {
        "include_dirs": [os.path.abspath("csrc")],
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": ["-fopenmp"],
    }
    if not WITH_CUDA:
        return CppExtension("fastdl._C", srcs, **kwargs)
    nvcc = [*opt, "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    nvcc += [f"-Xcompiler={flag}" for flag in no_split]
    for arch in os.environ.get("FASTDL_CUDA_ARCHS", "80;90a").split(";"):
        nvcc += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    kwargs["extra_compile_args"] = {"cxx": [*cxx, "-DFASTDL_WITH_CUDA"], "nvcc": nvcc}
    srcs += sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    return CUDAExtension("fastdl._C", srcs, **kwargs)


setup(
    packages=["fastdl", "fastdl.ops", "fastdl.nn", "fastdl.models", "fastdl.kernels"],
    package_dir={"fastdl.kernels": "kernels"},
    ext_modules=[] if os.environ.get("FASTDL_NO_EXT", "0") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
