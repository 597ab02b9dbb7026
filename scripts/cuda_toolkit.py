"""Find the CUDA toolkit to build torch_ext's CUDA kernels with.

A usable toolkit is a folder whose ``bin/nvcc`` runs and whose
``lib64/libcudart.so`` (or ``lib/libcudart.so``) is there, since the link
step asks for ``-lcudart`` in it. torch's own guess (``CUDA_HOME``, else two
folders above whichever ``nvcc`` is on ``PATH``) goes wrong where that
``nvcc`` is a wrapper script, as ``/usr/local/bin/nvcc`` is on some
machines: the guess becomes ``/usr/local``, which has no CUDA runtime, and
the build fails at the link with ``cannot find -lcudart``.

The candidates, in order: ``$CUDA_HOME`` or ``$CUDA_PATH`` when set (a bad
one is an error, never silently replaced); the folder of the real ``nvcc``
on ``PATH`` (symbolic links resolved, and a wrapper script's ``exec``
target read); ``/usr/local/cuda``; the newest ``/usr/local/cuda-*``;
``/opt/cuda``.

``setup.py``, ``scripts/cmake_cuda_args.py`` and ``scripts/gpu_check.sh`` all
ask this file (``python scripts/cuda_toolkit.py`` prints the folder, or one
line on stderr and exit status 1).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

__all__ = ["ToolkitError", "find_cuda_home", "problem"]


class ToolkitError(RuntimeError):
    """No usable CUDA toolkit; the message says what was found and how to set ``CUDA_HOME``."""


def problem(folder: str) -> Optional[str]:
    """Why ``folder`` is not a usable CUDA toolkit, or None when it is."""
    nvcc = os.path.join(folder, "bin", "nvcc")
    if not os.path.isfile(nvcc) or not os.access(nvcc, os.X_OK):
        return f"no {nvcc}"
    try:
        subprocess.run([nvcc, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} does not run ({type(exc).__name__})"
    if not any(os.path.exists(os.path.join(folder, lib, "libcudart.so")) for lib in ("lib64", "lib")):
        return f"no CUDA runtime {os.path.join(folder, 'lib64', 'libcudart.so')}"
    return None


def _wrapper_target(path: str) -> Optional[str]:
    """The nvcc that a small wrapper script runs (``exec /opt/x/bin/nvcc "$@"``), if it is one."""
    try:
        if os.path.getsize(path) > 16384:
            return None
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    if not text.startswith("#!"):
        return None
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    return match.group(1) + "/bin/nvcc" if match else None


def _from_path() -> List[str]:
    """Toolkit folders suggested by the ``nvcc`` on ``PATH``: its own and, for a wrapper, its target's."""
    found = shutil.which("nvcc")
    if found is None:
        return []
    out = []
    for nvcc in (found, os.path.realpath(found), _wrapper_target(os.path.realpath(found))):
        if nvcc:
            folder = os.path.dirname(os.path.dirname(nvcc))
            if folder not in out:
                out.append(folder)
    return out


def _candidates() -> List[str]:
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(v) for v in re.findall(r"\d+", p)],
                       reverse=True)
    out = []
    for folder in _from_path() + ["/usr/local/cuda"] + versioned + ["/opt/cuda"]:
        if folder not in out:
            out.append(folder)
    return out


def find_cuda_home(env: Optional[dict] = None) -> Tuple[str, str]:
    """``(folder, how it was found)`` of a usable CUDA toolkit; raises :class:`ToolkitError` if there is none."""
    env = os.environ if env is None else env
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            why = problem(env[name])
            if why is not None:
                raise ToolkitError(f"{name}={env[name]} is not a usable CUDA toolkit ({why}); set {name} to the "
                                   f"folder that holds bin/nvcc and lib64/libcudart.so, or unset it")
            return env[name], f"${name}"
    tried = []
    for folder in _candidates():
        why = problem(folder)
        if why is None:
            return folder, "found" if not tried else f"found (not {', '.join(f for f, _ in tried)})"
        tried.append((folder, why))
    details = "; ".join(f"{f}: {w}" for f, w in tried) or "no nvcc on PATH and no /usr/local/cuda"
    raise ToolkitError(f"no usable CUDA toolkit ({details}); set CUDA_HOME to the folder that holds bin/nvcc "
                       "and lib64/libcudart.so, or FORCE_CUDA=0 to build the CPU kernels only")


def main() -> int:
    try:
        folder, _ = find_cuda_home()
    except ToolkitError as exc:
        print(f"cuda_toolkit: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
