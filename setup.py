"""Builds the C++/CUDA extension ``fastseg._C``.

CPU sources (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are always compiled. CUDA sources
(``csrc/cuda/*.cu`` and their torch bindings ``csrc/cuda/*_binding.cpp``) are compiled when a
CUDA device is visible, with a CUDA toolkit and a CUDA build of torch: on a machine without a GPU
they would only cost build time (minutes), so a newcomer's first build skips them.
``FASTSEG_CUDA=1`` forces them (CI does, to check that they compile and link; the build fails
loudly if it cannot), ``FASTSEG_CUDA=0`` skips them. Without a working compiler the package still
installs (``FASTSEG_BUILD_EXT=0`` skips the extension) and runs on the reference backend.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _packages():
    return find_packages(include=["fastseg", "fastseg.*"]) + ["fastseg.kernels"]


def _want_cuda():
    flag = os.environ.get("FASTSEG_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1", "FASTSEG_CUDA=" + flag
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible; FASTSEG_CUDA=1 compiles them anyway"
    return True, f"CUDA toolkit at {CUDA_HOME}, torch built for CUDA {torch.version.cuda}"


def _extensions():
    if os.environ.get("FASTSEG_BUILD_EXT", "1") == "0":
        print("fastseg: FASTSEG_BUILD_EXT=0, skipping the C++ extension", file=sys.stderr)
        return [], {}
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        # Without it torch's linker flags point at /usr/local/lib for libcudart.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Built from the checkout on the machine that runs it, so the CPU kernels target that machine's
    # vector units; FASTSEG_CPU_ARCH (e.g. x86-64-v3) overrides it for a portable build.
    arch = os.environ.get("FASTSEG_CPU_ARCH", "native")
    # -Wno-psabi: GCC notes on AVX2 builds that 64-byte vector arguments (csrc/cpu/simd.h, inlined)
    # are passed differently with AVX-512
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", f"-march={arch}", "-Wno-psabi"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    with_cuda, why = _want_cuda()
    print(f"fastseg: CUDA sources {'ON' if with_cuda else 'OFF'} ({why})", file=sys.stderr)
    kwargs = dict(extra_compile_args={"cxx": cxx}, include_dirs=include_dirs, libraries=["gomp"])
    if with_cuda:
        if torch.version.cuda is None:
            raise RuntimeError("FASTSEG_CUDA=1 but the installed torch is a CPU build")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros.append(("FASTSEG_WITH_CUDA", None))
        # torch's pip wheels ship the CUDA headers (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers
        # include but a bare toolkit may lack.
        import nvidia

        for base in nvidia.__path__:
            include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        archs = os.environ.get("FASTSEG_CUDA_ARCHS", "80;90")
        nvcc = ["-O3", "-std=c++20", "-lineinfo"]
        for a in archs.split(";"):
            nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}"]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls("fastseg._C", sources, define_macros=define_macros, **kwargs)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=_packages(),
    package_dir={"fastseg": "fastseg", "fastseg.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
