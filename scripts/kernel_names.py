"""The names of CUDA kernels in nvcc's machine code, for scripts/kernel_report.py.

cuobjdump lists kernels by their mangled names; the report shows them short
(``cuda::forward_kernel<BFloat16, Steps<3> >``) and reads the dtype of each
from its first template argument, demangled by ``c++filt`` where binutils is
installed and from the mangled name where it is not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Dict, Iterable, List, Optional

#: Sizes of the dtypes a kernel's first template argument may name.
DTYPE_BYTES = {
    "double": 8,
    "float": 4,
    "c10::BFloat16": 2,
    "c10::Half": 2,
    "__nv_bfloat16": 2,
    "__half": 2,
}


def demangle(names: Iterable[str]) -> Dict[str, str]:
    """``{mangled: demangled}`` by ``c++filt`` (binutils); names stay mangled without it."""
    names = list(names)
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        try:
            out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True,
                                 check=True, timeout=60).stdout.splitlines()
            if len(out) == len(names):
                return dict(zip(names, out))
        except (OSError, subprocess.SubprocessError):
            pass
    return {n: n for n in names}


def _matching_open(text: str, end: int, open_: str, close: str) -> int:
    """Index of the bracket that opens the one closing at ``end``; -1 if unbalanced."""
    depth = 0
    for i in range(end, -1, -1):
        depth += text[i] == close
        depth -= text[i] == open_
        if depth == 0:
            return i
    return -1


def function_of(demangled: str) -> str:
    """The demangled name without the return type and the parameter list.

    ``void torch_ext::cuda::(anonymous namespace)::forward_kernel<float, true>(float const*, ...)``
    -> ``torch_ext::cuda::(anonymous namespace)::forward_kernel<float, true>``.
    """
    text = demangled.strip()
    if text.endswith(")"):
        start = _matching_open(text, len(text) - 1, "(", ")")
        if start > 0:
            text = text[:start]
    return re.sub(r"^void\s+", "", text)


def template_args(function: str) -> List[str]:
    """The top-level template arguments of a function's name (without parameters)."""
    if not function.endswith(">"):
        return []
    start = _matching_open(function, len(function) - 1, "<", ">")
    args, depth, current = [], 0, ""
    for ch in function[start + 1:-1]:
        depth += ch in "<("
        depth -= ch in ">)"
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    return args + ([current.strip()] if current.strip() else [])


def short_name(function: str) -> str:
    """``cuda::forward_kernel<BFloat16, true>``: the kernel's own namespace kept, every other dropped."""
    text = function.replace("(anonymous namespace)::", "")
    lt = text.find("<")
    base, args = (text, "") if lt < 0 else (text[:lt], text[lt:])
    base = "::".join(base.split("::")[-2:])
    return base + re.sub(r"\b[A-Za-z_]\w*::", "", args)


#: First template arguments as the Itanium ABI mangles them (for names c++filt did not demangle).
_MANGLED_DTYPES = {"d": "double", "f": "float", "N3c108BFloat16E": "c10::BFloat16", "N3c104HalfE": "c10::Half"}


def dtype_of(mangled: str, function: str) -> Optional[str]:
    """The kernel's dtype: its first template argument, when that is a known floating type."""
    args = template_args(function) if function != mangled else []
    if args:
        return args[0] if args[0] in DTYPE_BYTES else None
    # Mangled: walk the nested name's <length><identifier> parts to the first "I" (template arguments).
    i = 3 if mangled.startswith("_ZN") else 2 if mangled.startswith("_Z") else len(mangled)
    while i < len(mangled):
        number = re.match(r"\d+", mangled[i:])
        if not number:
            return None
        i += len(number.group()) + int(number.group())
        if mangled[i:i + 1] == "I":
            return next((t for code, t in _MANGLED_DTYPES.items() if mangled.startswith(code, i + 1)), None)
    return None
