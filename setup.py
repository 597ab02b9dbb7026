"""Build of torch_ext: the extension torch_ext._C from csrc/ (and cuda/).

Environment:
  FORCE_CUDA=1   a missing CUDA toolkit or a CPU-only torch is an error
  FORCE_CUDA=0   build the CPU kernels only
  (unset)        build the CUDA kernels when torch is a CUDA build and nvcc is found
  DEBUG=1        -O0 -g
  TORCH_CUDA_ARCH_LIST  the GPU architectures; when unset and no GPU is
                 visible, DEFAULT_CUDA_ARCH_LIST below (it includes 9.0, the H200);
                 when unset with a GPU visible, torch builds for the visible GPUs
"""

import glob
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (8.0), Ada (8.9) and Hopper (9.0); +PTX lets newer GPUs JIT the 9.0 code.
# The one place the default is written: CMakeLists.txt reads this line, and
# the Makefile leaves TORCH_CUDA_ARCH_LIST to the environment.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.9;9.0+PTX"


def want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if force == "1":
        if not have:
            raise RuntimeError(
                f"FORCE_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda!r}, "
                f"CUDA_HOME={CUDA_HOME!r}"
            )
        return True
    if force == "0":
        return False
    return have


def extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is left to torch.utils.cpp_extension (C++20 for torch 2.14).
    # -ffp-contract=off: never fuse a*b+c into an FMA (it changes results at
    # rounding ties); docs/quantizer.md rounds every step. -fno-trapping-math lets GCC
    # vectorize floor and selects (no result changes; nothing reads FP flags).
    # -fopenmp: at::parallel_for is header code, serial without it.
    cxx = opt + ["-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fopenmp"]
    link = ["-fopenmp"] + (["-g"] if debug else [])
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("cuda", "*.cu")))
        # -fmad=false and no --use_fast_math: correctly rounded steps, as on the CPU.
        nvcc = opt + ["-fmad=false", "-lineinfo"]
        return [
            CUDAExtension(
                "torch_ext._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "torch_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    ]


setup(
    name="torch_ext",
    version="0.1.0",
    description="Blueoil's quantization-aware training (LinearMidTreadHalfQuantizer, LMNet) for PyTorch",
    packages=find_packages(include=["torch_ext", "torch_ext.*"]),
    python_requires=">=3.10",
    # The extension is compiled against this torch's C++ ABI: the same minor release is required.
    install_requires=[f"torch=={'.'.join(torch.__version__.split('+')[0].split('.')[:2])}.*"],
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["torch-ext-train=torch_ext.train:cli", "torch-ext-bench=torch_ext.bench:main"]},
    zip_safe=False,
)
