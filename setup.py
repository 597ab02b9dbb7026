"""Build of torch_ext: the extension torch_ext._C from csrc/ (and cuda/).

Environment:
  FORCE_CUDA=1   a missing CUDA toolkit or a CPU-only torch is an error
  FORCE_CUDA=0   build the CPU kernels only
  (unset)        build the CUDA kernels when torch is a CUDA build and a CUDA toolkit is found
  CUDA_HOME      the CUDA toolkit (the folder of bin/nvcc and lib64/libcudart.so); when unset,
                 scripts/cuda_toolkit.py finds it (nvcc on PATH, wrappers resolved; /usr/local/cuda)
  DEBUG=1        -O0 -g
  TORCH_CUDA_ARCH_LIST  the GPU architectures; when unset and no GPU is
                 visible, DEFAULT_CUDA_ARCH_LIST below (it includes 9.0, the H200);
                 when unset with a GPU visible, torch builds for the visible GPUs
  CXX            the C++ compiler (torch's choice: $CXX, else c++); build_ext refuses one with no
                 shared libstdc++ (scripts/cxx_toolchain.py: `$CXX -print-file-name=libstdc++.so` names
                 no file), as the extension it links crashes on its first error message
  TORCH_EXT_ALLOW_STATIC_LIBSTDCXX=1  build with such a compiler anyway
"""

import glob
import importlib.util
import itertools
import os
import shlex
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pip's isolated build environment has no torch
    sys.exit(
        f"torch_ext: torch is not importable in this build environment ({exc}); install torch first, then "
        "build against it with: pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (8.0), Ada (8.9) and Hopper (9.0); +PTX lets newer GPUs JIT the 9.0 code.
# The one place the default is written: CMakeLists.txt reads this line. The
# Makefile sets TORCH_CUDA_ARCH_LIST itself (the visible GPUs', else 9.0), so a
# wheel built outside make (pip install .) is what takes this list.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.9;9.0+PTX"


def _script(name: str):
    """scripts/<name>.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_toolkit():
    return _script("cuda_toolkit")


def check_cxx(linker=None) -> None:
    """Stops the build when the C++ compiler (or the linker command, where given) has no shared libstdc++.

    A static libstdc++ linked into _C.so crashes it on its first error message
    that formats a number (scripts/cxx_toolchain.py). A compiler that cannot be
    run is left to the build to report.
    """
    toolchain = _script("cxx_toolchain")
    for cxx in dict.fromkeys([toolchain.compiler_in_use()] + ([linker] if linker else [])):
        try:
            if toolchain.links_shared_libstdcxx(cxx):
                continue
        except toolchain.CompilerError as exc:
            print(f"torch_ext: not checked whether the C++ compiler links libstdc++ shared: {exc}", file=sys.stderr)
            continue
        if os.environ.get("TORCH_EXT_ALLOW_STATIC_LIBSTDCXX") == "1":
            print(f"torch_ext: TORCH_EXT_ALLOW_STATIC_LIBSTDCXX=1: building with {toolchain.resolved(cxx)}, "
                  "which has no shared libstdc++", file=sys.stderr)
            continue
        sys.exit(toolchain.static_only_message(cxx, toolchain.find_shared_cxx()))


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, after check_cxx: before anything is compiled."""

    def build_extensions(self) -> None:
        # The linker of a C++ extension is distutils' compiler_cxx ($CXX, else Python's own CXX), its
        # words before the first option (CFLAGS follow).
        linker = list(itertools.takewhile(lambda w: not w.startswith("-"), getattr(self.compiler, "compiler_cxx", [])))
        check_cxx(shlex.join(linker) if linker else None)
        super().build_extensions()


def want_cuda() -> bool:
    """Whether to build the CUDA kernels; finds the toolkit (scripts/cuda_toolkit.py) and tells torch."""
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if torch.version.cuda is None:
        if force == "1":
            sys.exit(f"torch_ext: FORCE_CUDA=1 but torch {torch.__version__} is a CPU build")
        return False
    toolkit = _cuda_toolkit()
    try:
        folder, how = toolkit.find_cuda_home()
    except toolkit.ToolkitError as exc:
        # A CUDA_HOME that was set but is wrong, or FORCE_CUDA=1: stop. Else build for the CPU only.
        if force == "1" or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
            sys.exit(f"torch_ext: {exc}")
        print(f"torch_ext: building the CPU kernels only: {exc}", file=sys.stderr)
        return False
    # torch's own guess may be another folder (a wrapper nvcc's parent): use the one checked here.
    cpp_extension.CUDA_HOME = folder
    os.environ["CUDA_HOME"] = folder
    print(f"torch_ext: CUDA toolkit {folder} ({how})", file=sys.stderr)
    return True


def _requirements(name: str):
    with open(os.path.join(ROOT, "requirements", f"{name}.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


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
    # Every .cpp under csrc/ (a family's schema, checks and autograd in csrc/ops/, its
    # CPU kernel in csrc/cpu/) and every .cu under cuda/: a new file needs no edit here.
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("cuda", "**", "*.cu"), recursive=True))
        # -fmad=false and no --use_fast_math: correctly rounded steps, as on the CPU.
        # -Xcompiler: the host half of the .cu files (the fixed operator's
        # thresholds are found there, by the formula) gets the C++ files' flags:
        # with FMA in the host ISA (aarch64, -march=native) GCC would contract.
        nvcc = opt + ["-fmad=false", "-lineinfo", "-Xcompiler=-ffp-contract=off,-fno-fast-math"]
        return [
            cpp_extension.CUDAExtension(
                "torch_ext._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        cpp_extension.CppExtension(
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
    extras_require={
        "train": _requirements("train"),
        "onnx": _requirements("onnx"),
        "test": _requirements("test") + _requirements("train") + _requirements("onnx"),
    },
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["torch-ext-train=torch_ext.train:cli"]},
    zip_safe=False,
)
