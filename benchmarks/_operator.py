"""The operator benchmark: one case (device, dtype, size, layout) timed for every candidate and op.

See :mod:`benchmarks.bench` for what is compared and how bytes are counted.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import torch_ext
from torch_ext._timing import _log, _short_reason, _sync, interleaved_medians
from torch_ext.reference import (
    linear_mid_tread_half_quantize_backward_reference,
    linear_mid_tread_half_quantize_reference,
)

from ._common import BIT, IMAGE_SHAPE, MAX_VALUE, size_name

#: The candidates, in table order; torch_ext first.
CANDIDATES = ("torch_ext", "relu", "copy", "fake_quantize", "composite", "composite_compiled")
#: The timed operations.
OPS = ("forward", "backward", "forward+backward")


# --------------------------------------------------------------------------
# The hand-written composite.


class _CompositeSTE(torch.autograd.Function):
    """What a user writes by hand: the formula in eager torch ops, a straight-through gradient, saving ``x``."""

    @staticmethod
    def forward(ctx, x, bit, max_value):
        ctx.save_for_backward(x)
        ctx.max_value = max_value
        return linear_mid_tread_half_quantize_reference(x, bit, max_value)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return linear_mid_tread_half_quantize_backward_reference(grad_y, x, ctx.max_value), None, None


def _composite(x: torch.Tensor) -> torch.Tensor:
    return _CompositeSTE.apply(x, BIT, MAX_VALUE)


# --------------------------------------------------------------------------
# Device-wide figures and settings.


def copy_bandwidth(device: torch.device, numel: int, repeats: int, warmup: int) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write) for ``numel`` float32 elements, preallocated."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy_": lambda: dst.copy_(src)}, device, repeats, warmup)["copy_"][0]
    return 2 * src.nbytes / t / 1e9


def no_donated_buffers():
    """A context where torch.compile's backward does not donate buffers (allows ``retain_graph=True``).

    A donated buffer (a compiled backward reusing a saved tensor's memory for
    its output) forbids ``retain_graph=True``, which the backward timing
    needs; the check is made at each backward call. Nothing could be donated
    here anyway: the saved bool mask is smaller than ``grad_x``.
    """
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            return functorch_config.patch(donated_buffer=False)
    except ImportError:
        pass
    return contextlib.nullcontext()


# --------------------------------------------------------------------------
# Candidates.


@dataclass
class _Candidate:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    #: A backward that is not autograd's (the copy yardstick): grad_y -> grad_x.
    backward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    error: Optional[str] = None  # why it is n/a


def _torch_ext(x: torch.Tensor) -> torch.Tensor:
    return torch_ext.linear_mid_tread_half_quantize(x, BIT, MAX_VALUE)


def _clone(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def _copy_backward(grad_y: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad_y).copy_(grad_y)


def _fake_quantize(x: torch.Tensor) -> torch.Tensor:
    n = 2**BIT - 1
    return torch.fake_quantize_per_tensor_affine(x, MAX_VALUE / n, 0, 0, n)


def _make_candidates(compile_composite: bool = True) -> List[_Candidate]:
    candidates = [
        _Candidate("torch_ext", _torch_ext),
        _Candidate("relu", torch.relu),
        _Candidate("copy", _clone, backward=_copy_backward),
        _Candidate("fake_quantize", _fake_quantize),
        _Candidate("composite", _composite),
        # Compiled per case (fixed shape and dtype), in _prepare.
        _Candidate("composite_compiled", _composite),
    ]
    return [c for c in candidates if compile_composite or c.name != "composite_compiled"]


def _saved_for_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Tuple[float, float]:
    """(bytes saved per element, bytes saved per element that are new tensors, i.e. neither x nor y)."""
    saved: List[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    total = 0
    new = 0
    shared = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    seen = set()
    for t in saved:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
        if key in seen:  # one tensor saved twice is still read once
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if t.untyped_storage().data_ptr() not in shared:
            new += nbytes
    return total / x.numel(), new / x.numel()


# --------------------------------------------------------------------------
# One case.


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    return torch.autograd.grad(forward(x), x, grad)


def _copy_both_ways(c: _Candidate, x: torch.Tensor, grad: torch.Tensor):
    return c.forward(x), c.backward(grad)


def _timed_call(c: _Candidate, op: str, x: torch.Tensor, grad: torch.Tensor):
    """The call that times ``op`` of candidate ``c``, and the forward graph it needs kept alive (or None)."""
    if op == "forward":
        return functools.partial(c.forward, x), None
    if op == "backward":
        if c.backward is not None:
            return functools.partial(c.backward, grad), None
        with torch.enable_grad():
            y = c.forward(x)
        return functools.partial(torch.autograd.grad, y, x, grad, retain_graph=True), y
    if c.backward is not None:
        return functools.partial(_copy_both_ways, c, x, grad), None
    return functools.partial(_forward_backward, c.forward, x, grad), None


@dataclass
class Result:
    """One row of the operator table (and one record of the JSON's ``results``)."""

    device: str
    dtype: str
    size: int
    op: str
    candidate: str
    layout: str = "contiguous"
    median_s: Optional[float] = None
    min_s: Optional[float] = None
    samples_s: List[float] = field(default_factory=list)
    bytes_per_element: Optional[float] = None
    gbps: Optional[float] = None
    fraction_of_copy: Optional[float] = None
    saved_bytes_per_element: Optional[float] = None
    #: torch_ext's median time / this candidate's.
    torch_ext_ratio: Optional[float] = None
    status: str = "ok"
    reason: Optional[str] = None


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (flat) as a contiguous vector, or as ``[N, 64, 32, 32]`` in channels_last memory order."""
    if layout == "contiguous":
        return t
    return t.view(-1, *IMAGE_SHAPE).contiguous(memory_format=torch.channels_last)


def _inputs(device: torch.device, dtype: torch.dtype, numel: int, layout: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` (requiring grad) and ``grad``, the same for every candidate, from a fixed seed."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Inputs over [-1, 3): some below 0, some above max_value = 2, most inside.
    x = _layout((torch.rand(numel, generator=gen, dtype=torch.float32) * 4 - 1).to(device=device, dtype=dtype), layout)
    x.requires_grad_(True)
    grad = _layout(torch.rand(numel, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype), layout)
    return x, grad


def _compile_composite(c: _Candidate, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> None:
    """Make ``c`` the composite compiled for this case (or mark it n/a with torch.compile's failure)."""
    try:
        compiled = torch.compile(_composite, dynamic=False, fullgraph=True)
        y = compiled(x)  # compiles the forward and the backward
        torch.autograd.grad(y, x, grad)
        _sync(device)
        c.forward = compiled
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
        c.error = "torch.compile failed: " + _short_reason(exc)
        _log(f"  n/a: {c.error}")


def _prepare(candidates: List[_Candidate], x: torch.Tensor, grad: torch.Tensor, device: torch.device,
             case: str) -> Dict[str, Tuple[float, float]]:
    """Run each candidate once both ways (compiling the composite), marking failures; what each saves."""
    saved_info: Dict[str, Tuple[float, float]] = {}
    for c in candidates:
        if c.name == "composite_compiled":
            _log(f"{case}: compiling the composite")
            _compile_composite(c, x, grad, device)
            if c.error is not None:
                continue
        try:
            y = c.forward(x)
            if c.backward is None:
                torch.autograd.grad(y, x, grad)
            else:
                c.backward(grad)
            saved_info[c.name] = _saved_for_backward(c.forward, x)
        except Exception as exc:  # noqa: BLE001 - e.g. a dtype a peer does not support
            c.error = _short_reason(exc)
            _log(f"  n/a: {c.name}: {c.error}")
    return saved_info


def _time_op(op: str, ok: List[_Candidate], x: torch.Tensor, grad: torch.Tensor, device: torch.device,
             repeats: int, warmup: int) -> Tuple[Dict[str, Tuple[float, List[float]]], Dict[str, str]]:
    """``op`` of the working candidates, interleaved: (name -> (median, samples), name -> why it failed)."""
    fns: Dict[str, Callable[[], object]] = {}
    graphs = []  # keeps the forward graphs of the backward timing alive
    for c in ok:
        fns[c.name], graph = _timed_call(c, op, x, grad)
        if graph is not None:
            graphs.append(graph)
    failed: Dict[str, str] = {}
    with torch.enable_grad():
        medians = interleaved_medians(fns, device, repeats, warmup, failed) if fns else {}
    del graphs
    return medians, failed


def _row(r: Result, c: _Candidate, element: int, saved: Tuple[float, float], timed: Tuple[float, List[float]],
         copy_gbps: Optional[float]) -> Result:
    """Fill ``r`` with candidate ``c``'s figures: time, bytes moved per element, GB/s, fraction of copy."""
    total, new = saved
    if c.backward is not None:  # the copy: no saved tensors, a copy each way
        fwd_bytes = bwd_bytes = 2 * element
    else:
        fwd_bytes = 2 * element + new
        bwd_bytes = 2 * element + total
    r.bytes_per_element = {"forward": fwd_bytes, "backward": bwd_bytes}.get(r.op, fwd_bytes + bwd_bytes)
    r.median_s, r.samples_s = timed
    r.min_s = min(r.samples_s)
    r.gbps = r.bytes_per_element * r.size / r.median_s / 1e9
    if copy_gbps:
        r.fraction_of_copy = r.gbps / copy_gbps
    r.saved_bytes_per_element = total
    return r


def _set_ratios(rows: List[Result]) -> None:
    """Each row's ``torch_ext_ratio``: torch_ext's median over the row's, where both ran."""
    ext = next((r for r in rows if r.candidate == "torch_ext"), None)
    for r in rows:
        if ext is not None and ext.median_s and r.median_s:
            r.torch_ext_ratio = ext.median_s / r.median_s


def bench_case(
    device: torch.device, dtype: torch.dtype, numel: int, repeats: int, warmup: int, copy_gbps: Optional[float],
    layout: str = "contiguous", compile_composite: bool = True,
) -> List[Result]:
    """Every candidate's forward, backward and forward+backward on one case: one :class:`Result` each."""
    dtype_name = str(dtype).replace("torch.", "")
    element = torch.empty((), dtype=dtype).element_size()
    case = f"{device.type} {dtype_name} {size_name(numel)}"
    x, grad = _inputs(device, dtype, numel, layout)
    candidates = _make_candidates(compile_composite)
    saved_info = _prepare(candidates, x, grad, device, case)
    ok = [c for c in candidates if c.error is None]

    results: List[Result] = []
    for op in OPS:
        _log(f"{case} {op}: {', '.join(c.name for c in ok)}")
        medians, failed = _time_op(op, ok, x, grad, device, repeats, warmup)
        rows = []
        for c in candidates:
            r = Result(device.type, dtype_name, numel, op, c.name, layout=layout)
            if c.error is not None or c.name in failed:
                r.status, r.reason = "n/a", c.error or failed[c.name]
            else:
                _row(r, c, element, saved_info[c.name], medians[c.name], copy_gbps)
            rows.append(r)
        _set_ratios(rows)
        results += rows
    del x, grad
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results
