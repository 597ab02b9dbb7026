"""Side-by-side timing: ``python -m torch_ext.deploy --speed-against`` and the benchmarks use it.

:func:`interleaved_medians` warms each function up, calibrates how many calls
make one sample (a millisecond or two), then samples them round-robin with
the order rotated every round, so that the noise of a shared machine hits
them all alike, and returns each one's median. CUDA samples are timed with
CUDA events.

It stays in the package for the deploy command; the benchmarks themselves
live in ``benchmarks/`` at the repository root, are not installed, and
import this module (nothing in ``torch_ext`` imports them).
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# A sample lasts at least this long (the call is repeated within it).
_SAMPLE_SECONDS = {"cpu": 2e-3, "cuda": 1e-3}

_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds a call, averaged over ``inner`` back-to-back calls."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _calibrate(fn: Callable[[], object], device: torch.device, warmup: int) -> int:
    """Warm ``fn`` up and return how many calls make one sample."""
    for _ in range(warmup):
        fn()
    _sync(device)
    per_call = _time_once(fn, 1, device)
    if per_call < 0.05:
        per_call = min(per_call, _time_once(fn, 1, device))
    target = _SAMPLE_SECONDS[device.type]
    return max(1, min(10000, math.ceil(target / max(per_call, 1e-9))))


def interleaved_medians(
    fns: Dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
    failed: Optional[Dict[str, str]] = None,
) -> Dict[str, Tuple[float, List[float]]]:
    """Median seconds a call of each function, sampled round-robin with a rotating order.

    A function that raises while warming up is left out, its reason put in ``failed``.
    """
    if failed is None:
        failed = {}
    inner: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            inner[name] = _calibrate(fn, device, warmup)
        except Exception as exc:  # noqa: BLE001 - reported as n/a
            failed[name] = _short_reason(exc)
            _log(f"  n/a: {name}: {failed[name]}")
    names = list(inner)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_time_once(fns[name], inner[name], device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: (statistics.median(s), s) for name, s in samples.items()}


def _short_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
