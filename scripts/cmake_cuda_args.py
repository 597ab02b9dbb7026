"""Print the cmake -D options that let torch's CMake config find CUDA here.

torch's Caffe2 config uses the legacy FindCUDA, which looks for the toolkit
by nvcc's path and for nvrtc in the toolkit. On a machine with a minimal
toolkit and a pip-installed CUDA torch, nvrtc lives in site-packages
(nvidia/cu*/lib); point cmake at it. Prints -DTORCH_EXT_CUDA=OFF for a CPU build
of torch or where no CUDA toolkit is found (the C++ library is then built
without CUDA).
"""

import glob
import os
import re
import shutil
import subprocess
from typing import Optional

import torch


def is_toolkit(folder: Optional[str]) -> bool:
    """bin/nvcc and libcudart: a CUDA toolkit (not, say, /usr/local above an nvcc wrapper script)."""
    if not folder or not os.access(os.path.join(folder, "bin", "nvcc"), os.X_OK):
        return False
    return any(
        glob.glob(os.path.join(folder, pattern))
        for pattern in ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")
    )


def find_cuda_home() -> Optional[str]:
    """$CUDA_HOME if it is a toolkit; else the folder the nvcc on PATH reports
    for itself (it may be a wrapper script in /usr/local/bin); else the folder
    above its real path; else /usr/local/cuda. (scripts/gpu_check.sh finds it
    the same way.)"""
    candidates = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=30,
            )
            here = re.search(r"^#\$ _HERE_=(.*)$", out.stdout + out.stderr, re.MULTILINE)
            if here:
                candidates.append(os.path.dirname(here.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((c for c in candidates if is_toolkit(c)), None)


def main() -> None:
    if torch.version.cuda is None:
        print("-DTORCH_EXT_CUDA=OFF")
        return
    args = []
    cuda_home = find_cuda_home()
    if cuda_home is None:
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
