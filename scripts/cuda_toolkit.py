"""Find the CUDA toolkit to build torch_ext's CUDA kernels with: the one home of this rule.

A folder is a toolkit when its ``bin/nvcc`` runs and it holds the CUDA
runtime (``libcudart.so*`` in ``lib64/``, ``lib/`` or ``targets/*/lib/``)
and ``cuda_runtime.h``. torch's own guess (``CUDA_HOME``, else two folders
above whichever ``nvcc`` is on ``PATH``) goes wrong where that ``nvcc`` is a
wrapper script, as ``/usr/local/bin/nvcc`` is on some machines: it becomes
``/usr/local``, which has no CUDA runtime, and the link fails with
``cannot find -lcudart``.

Candidates, in order: ``$CUDA_HOME`` (or ``$CUDA_PATH``); the folder the
``nvcc`` on ``PATH`` reports for itself (``nvcc --dryrun`` prints
``_HERE_``); the folder of the ``nvcc`` a wrapper script execs; the folder
above the real path of the ``nvcc`` on ``PATH``; then the defaults
(``$TORCH_EXT_DEFAULT_CUDA``, a ``:``-separated list, else
``/usr/local/cuda``, the newest ``/usr/local/cuda-*``, ``/opt/cuda``).

A ``CUDA_HOME`` that is set but is no toolkit is an error for a build
(``setup.py``: never silently build against something else); the GPU check
passes ``--lenient`` and goes on to the next candidate.

``setup.py``, ``scripts/cmake_cuda_args.py`` and ``scripts/gpu_check.sh`` all use
this file. ``python scripts/cuda_toolkit.py [--how] [--lenient]`` prints the
folder (with ``--how``: the folder, a tab, and how it was found), or what it
tried on stderr with exit status 1.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

__all__ = ["ToolkitError", "find_cuda_home", "problem"]


class ToolkitError(RuntimeError):
    """No usable CUDA toolkit; the message says what was tried and how to set ``CUDA_HOME``."""


def problem(folder: str) -> Optional[str]:
    """Why ``folder`` is not a usable CUDA toolkit, or None when it is."""
    if not folder or not os.path.isdir(folder):
        return "no such folder"
    nvcc = os.path.join(folder, "bin", "nvcc")
    if not os.path.isfile(nvcc) or not os.access(nvcc, os.X_OK):
        return "no executable bin/nvcc"
    try:
        subprocess.run([nvcc, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "bin/nvcc --version fails"
    if not any(glob.glob(os.path.join(folder, p, "libcudart.so*")) for p in ("lib64", "lib", "targets/*/lib")):
        return "no libcudart.so* in lib64/, lib/ or targets/*/lib/"
    if not any(glob.glob(os.path.join(folder, p, "cuda_runtime.h")) for p in ("include", "targets/*/include")):
        return "no cuda_runtime.h in include/ or targets/*/include/"
    return None


def _reported_by(nvcc: str) -> Optional[str]:
    """The folder ``nvcc --dryrun`` names as its own (``#$ _HERE_=<toolkit>/bin``)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    here = re.search(r"^#\$ _HERE_=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.dirname(here.group(1).strip()) if here else None


def _wrapper_target(nvcc: str) -> Optional[str]:
    """The toolkit folder of the nvcc a small wrapper script execs (``exec /x/bin/nvcc "$@"``)."""
    try:
        if os.path.getsize(nvcc) > 16384:
            return None
        with open(nvcc, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    match = re.search(r"exec\s+\"?(/\S*?)/bin/nvcc\b", text) if text.startswith("#!") else None
    return match.group(1) if match else None


def _newest_versioned() -> List[str]:
    return sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(v) for v in re.findall(r"\d+", p)],
                  reverse=True)[:1]


def _candidates(env: Dict[str, str]) -> List[Tuple[str, str]]:
    """``(folder, how it was suggested)`` after the environment's: from the nvcc on PATH, then the defaults."""
    out: List[Tuple[str, str]] = []
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        here = _reported_by(nvcc)
        if here:
            out.append((here, f"reported by {nvcc} --dryrun (_HERE_={here}/bin)"))
        target = _wrapper_target(nvcc)
        if target:
            out.append((target, f"exec'd by the wrapper {nvcc}"))
        out.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"above the real path of {nvcc}"))
    defaults = env.get("TORCH_EXT_DEFAULT_CUDA")
    folders = defaults.split(":") if defaults else ["/usr/local/cuda", *_newest_versioned(), "/opt/cuda"]
    out += [(folder, "the default") for folder in folders if folder]
    return out


def find_cuda_home(env: Optional[Dict[str, str]] = None, *, lenient: bool = False) -> Tuple[str, str]:
    """``(folder, how it was found)`` of a usable CUDA toolkit; raises :class:`ToolkitError` if there is none.

    A ``CUDA_HOME``/``CUDA_PATH`` that is set but is no toolkit raises, unless ``lenient``.
    """
    env = dict(os.environ) if env is None else env
    tried: List[str] = []
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            why = problem(env[name])
            if why is None:
                return os.path.abspath(env[name]), f"${name}"
            if not lenient:
                raise ToolkitError(f"{name}={env[name]} is not a usable CUDA toolkit ({why}); set {name} to the "
                                   "folder that holds bin/nvcc, lib64/libcudart.so and include/cuda_runtime.h, "
                                   "or unset it")
            tried.append(f"{env[name]} (${name}): {why}")
            break
    for folder, how in _candidates(env):
        why = problem(folder)
        if why is None:
            return os.path.abspath(folder), how
        tried.append(f"{folder} ({how}): {why}")
    if shutil.which("nvcc", path=env.get("PATH")) is None:
        tried.append("(no nvcc on PATH)")
    raise ToolkitError("no CUDA toolkit found; tried:\n  " + "\n  ".join(tried)
                       + "\nset CUDA_HOME to the toolkit's folder, or FORCE_CUDA=0 to build the CPU kernels only")


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        folder, how = find_cuda_home(lenient="--lenient" in args)
    except ToolkitError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{folder}\t{how}" if "--how" in args else folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
