"""Print the cmake -D options that let torch's CMake config find CUDA here.

torch's Caffe2 config uses the legacy FindCUDA, which looks for the toolkit
by nvcc's path and for nvrtc in the toolkit. On a machine with a minimal
toolkit and a pip-installed CUDA torch, nvrtc lives in site-packages
(nvidia/cu*/lib); point cmake at it. Prints nothing for a CPU build of torch
(the C++ library is then built without CUDA).
"""

import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_toolkit import ToolkitError, find_cuda_home  # noqa: E402  (this folder's module)


def main() -> None:
    if torch.version.cuda is None:
        print("-DTORCH_EXT_CUDA=OFF")
        return
    args = []
    try:
        cuda_home, _ = find_cuda_home()
    except ToolkitError as exc:
        print(f"cmake_cuda_args: building the C++ library without CUDA: {exc}", file=sys.stderr)
        print("-DTORCH_EXT_CUDA=OFF")
        return
    args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
    if not glob.glob(os.path.join(cuda_home, "lib64", "libnvrtc.so*")):
        site = os.path.dirname(os.path.dirname(torch.__file__))
        found = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "lib", "libnvrtc.so.*")))
        found = [f for f in found if "builtins" not in f and ".alt." not in f]
        if found:
            args.append(f"-DCUDA_nvrtc_LIBRARY={found[0]}")
    print(" ".join(args))


if __name__ == "__main__":
    main()
