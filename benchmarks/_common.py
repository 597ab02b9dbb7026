"""What the benchmarks share: the quantizer's settings, sizes, option parsers and the CPU allocator switch.

The timing loop itself, :func:`torch_ext._timing.interleaved_medians`, lives
in the package, because ``python -m torch_ext.deploy --speed-against`` uses it
too; everything here serves the benchmarks only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
from typing import Dict, List, Optional, Sequence

import torch

from torch_ext._timing import _log

#: The operator's settings in every benchmark: 2 bits, max_value 2.
BIT = 2
MAX_VALUE = 2.0

#: The dtypes an option may name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: The operator benchmark's sizes (elements) by device, and those of ``--quick``.
DEFAULT_SIZES = {"cpu": (1 << 16, 1 << 24), "cuda": (1 << 16, 1 << 28)}
QUICK_SIZES = (1 << 16,)
#: The memory layouts of the operator cases.
LAYOUTS = ("contiguous", "channels_last")
#: channels_last cases are images [N, 64, 32, 32]: their sizes must be multiples of 64K.
IMAGE_SHAPE = (64, 32, 32)


def csv_list(text: str) -> List[str]:
    """The comma-separated items of ``text``, stripped, empty ones left out."""
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_size(text: str) -> int:
    """An element count, with an optional K, M or G suffix (powers of 1024): ``"16M"`` is 16777216."""
    digits = text.strip().upper()
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if digits.endswith(suffix):
            digits, scale = digits[:-1], factor
            break
    try:
        value = int(float(digits) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be a number with an optional K/M/G suffix, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def size_name(n: int) -> str:
    """``n`` elements, short: 65536 -> ``"64K"``, 16777216 -> ``"16M"``, 1000 -> ``"1000"``."""
    for suffix, factor in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def check_devices(requested: Optional[Sequence[str]]) -> List[str]:
    """``--devices``: the devices asked for, checked; when not given, the CPU and CUDA where one is visible."""
    if requested is None:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in requested:
        if d not in ("cpu", "cuda"):
            raise SystemExit(f"--devices: unknown device {d!r} (cpu, cuda)")
    if "cuda" in requested and not torch.cuda.is_available():
        raise SystemExit("--devices cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    return list(requested)


def write_json(path: str, doc: Dict[str, object]) -> None:
    """Write ``doc`` to ``path`` through a temporary file, so a run killed mid-write leaves the last whole one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def reuse_if_asked(args: argparse.Namespace) -> Optional[bool]:
    """``--reuse-freed-memory``: None when not asked, else whether it took effect (a failure is logged)."""
    if not args.reuse_freed_memory:
        return None
    failure = reuse_freed_memory()
    if failure:
        _log(f"--reuse-freed-memory: {failure}; continuing without")
    return failure is None


def reuse_freed_memory() -> Optional[str]:
    """Make glibc keep freed memory for reuse (no mmap for large blocks, no trimming); None if done, else why not.

    By default glibc maps each block over 32 MiB afresh and unmaps it on free,
    so every out-of-place call at 16M float32 elements pays a page fault per
    4 KiB of its output, for every candidate alike. jemalloc and tcmalloc, the
    allocators recommended for PyTorch on CPU, keep such blocks instead.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "no glibc mallopt in this process"
    m_trim_threshold, m_mmap_max = -1, -4
    if mallopt(m_mmap_max, 0) != 1 or mallopt(m_trim_threshold, 2**31 - 1) != 1:
        return "mallopt refused"
    return None
