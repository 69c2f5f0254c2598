"""Build script: the Python package, `kernels/` installed as `fastbert.kernels`, and the C++
extension `csrc/` built into `fastbert._C` with torch's cpp_extension (ninja).

Install (torch first): pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("FASTBERT_SKIP_EXTENSION") != "1":
    # Without torch there is nothing to build against; the package still installs and
    # `fastbert._C` raises a clear error on first use.
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastbert: torch not found, skipping the C++ extension fastbert._C")
    else:
        # ATen's OpenMP backend is header-inline: at::parallel_for runs serially unless the extension
        # itself is compiled with OpenMP (libgomp is the one torch already loaded). Apple clang has none.
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
        ext_modules.append(
            CppExtension(
                name="fastbert._C",
                sources=sorted(glob.glob("csrc/*.cpp")),
                extra_compile_args={"cxx": ["-O3", "-std=c++17", *openmp]},
                extra_link_args=openmp,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=find_packages(include=["fastbert", "fastbert.*"]) + ["fastbert.kernels", "fastbert.kernels.static", "fastbert.benchmarks"],
    # Top-level folders installed inside the package: the kernels, and the benchmark suite so that
    # `fastbert bench` works from an install (from a checkout `python -m benchmarks` runs it too).
    package_dir={"fastbert.kernels": "kernels", "fastbert.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
