"""Benchmarks of the linear mid-tread half quantizer against its peers.

Run ``python -m torch_ext.bench`` (``make bench``). Two parts:

* **Operator benchmark.** Forward, backward and forward+backward of
  ``torch_ext`` next to the memory-limit yardsticks (``torch.relu`` out of
  place and a plain copy), ``torch.fake_quantize_per_tensor_affine``, the
  composite a user writes by hand (a straight-through ``autograd.Function``
  over the formula's eager tensor ops: :mod:`torch_ext.reference`) and that composite
  under ``torch.compile``; float32 and bfloat16, a small and a large size, on
  the CPU and, where one is visible, on CUDA.
* **Training-step benchmark.** One SGD step of ``LmnetV1Quantize`` against
  its float/ReLU twin ``LmnetV1`` at 32x32 (``--train-models lm_resnet``:
  also Blueoil's ResNet-18 with QuantActivation against the same with ReLU).

How it measures:

* Every candidate is warmed up first (``torch.compile`` compiles there,
  outside the timing; a failure is reported as n/a with its reason). The
  candidates of one case are then timed round-robin, one sample each per
  round, with the order rotated every round, so that the noise of a shared
  machine hits them all alike; the figure is the median over the rounds. A
  sample repeats the call enough times to last a millisecond or two (small
  sizes) and divides. CUDA samples are timed with CUDA events.
* The forward is the training forward: the input requires grad, so each
  candidate also saves what its backward needs. The backward is timed alone,
  given one forward graph (``torch.autograd.grad(..., retain_graph=True)``;
  the copy yardstick's backward is a copy). Forward+backward runs both.
* Bytes are counted honestly, per element: a forward reads ``x`` and writes
  ``y`` plus whatever it saves for backward that is neither ``x`` nor ``y``
  (torch_ext's 1-bit mask: 1/8 byte; fake_quantize's bool mask: 1 byte); a
  backward reads ``grad_y`` and what was saved (relu: ``y``; the composite:
  ``x``), and writes ``grad_x``. What is saved is measured with
  ``torch.autograd.graph.saved_tensors_hooks``, not assumed.
* ``ext/peer`` is torch_ext's median time divided by the peer's (below 1:
  torch_ext is faster). ``%copy`` is a figure's GB/s as a fraction of the
  device's copy bandwidth (``dst.copy_(src)`` into a preallocated tensor of
  the large size), measured in the same run.
* The compiled composite is compiled with ``donated_buffer=False``: a donated
  buffer forbids ``retain_graph=True``, and nothing could be donated here
  anyway (its saved bool mask is smaller than ``grad_x``).

Reading CPU figures: with glibc's default allocator every float32 output of
16M elements (64 MiB) is a fresh ``mmap``, so each out-of-place call pays a
page fault per 4 KiB of output, the same for every candidate; that cost can
exceed the kernel's. ``--reuse-freed-memory`` keeps freed blocks for reuse (as
jemalloc or tcmalloc do) and shows the kernels themselves. On a shared,
oversubscribed machine each ATen OpenMP region also waits for its second
thread to be scheduled; the ``min`` column shows what the quietest round got.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import torch_ext
from torch_ext._timing import _log, _parse_size, _short_reason, _size_name, _sync, interleaved_medians
from torch_ext.reference import (
    linear_mid_tread_half_quantize_backward_reference,
    linear_mid_tread_half_quantize_reference,
)

__all__ = ["CANDIDATES", "OPS", "TRAIN_MODELS", "interleaved_medians", "main"]

BIT = 2
MAX_VALUE = 2.0

#: The candidates, in table order; torch_ext first.
CANDIDATES = ("torch_ext", "relu", "copy", "fake_quantize", "composite", "composite_compiled")
#: The timed operations.
OPS = ("forward", "backward", "forward+backward")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_DEFAULT_SIZES = {"cpu": (1 << 16, 1 << 24), "cuda": (1 << 16, 1 << 28)}
_QUICK_SIZES = (1 << 16,)
_LAYOUTS = ("contiguous", "channels_last")
# channels_last cases are images [N, 64, 32, 32]: sizes must be multiples of 64K.
_IMAGE_SHAPE = (64, 32, 32)




def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


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
# Timing.


def _copy_bandwidth(device: torch.device, numel: int, repeats: int, warmup: int) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write) for ``numel`` float32 elements, preallocated."""
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    t = interleaved_medians({"copy_": lambda: dst.copy_(src)}, device, repeats, warmup)["copy_"][0]
    return 2 * src.nbytes / t / 1e9


def _reuse_if_asked(args: argparse.Namespace) -> Optional[bool]:
    """``--reuse-freed-memory``: None when not asked, else whether it took effect (a failure is logged)."""
    if not args.reuse_freed_memory:
        return None
    failure = _reuse_freed_memory()
    if failure:
        _log(f"--reuse-freed-memory: {failure}; continuing without")
    return failure is None


def _reuse_freed_memory() -> Optional[str]:
    """Make glibc keep freed memory for reuse (no mmap for large blocks, no trimming); None if done.

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


def _no_donated_buffers():
    """A context where torch.compile's backward does not donate buffers (allows retain_graph=True)."""
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
        # Compiled per case (fixed shape and dtype), in _bench_case.
        _Candidate("composite_compiled", _composite),
    ]
    return [c for c in candidates if compile_composite or c.name != "composite_compiled"]


def _saved_for_backward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
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
# The operator benchmark.


def _forward_backward(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    return torch.autograd.grad(forward(x), x, grad)


def _copy_both_ways(c: "_Candidate", x: torch.Tensor, grad: torch.Tensor):
    return c.forward(x), c.backward(grad)


def _timed_call(c: "_Candidate", op: str, x: torch.Tensor, grad: torch.Tensor):
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
    return t.view(-1, *_IMAGE_SHAPE).contiguous(memory_format=torch.channels_last)


def _bench_case(
    device: torch.device, dtype: torch.dtype, numel: int, repeats: int, warmup: int, copy_gbps: Optional[float],
    layout: str = "contiguous", compile_composite: bool = True,
) -> List[Result]:
    dtype_name = str(dtype).replace("torch.", "")
    element = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Inputs over [-1, 3): some below 0, some above max_value = 2, most inside.
    x = _layout((torch.rand(numel, generator=gen, dtype=torch.float32) * 4 - 1).to(device=device, dtype=dtype), layout)
    x.requires_grad_(True)
    grad = _layout(torch.rand(numel, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype), layout)

    candidates = _make_candidates(compile_composite)
    saved_info: Dict[str, Tuple[float, float]] = {}
    for c in candidates:
        if c.name == "composite_compiled":
            _log(f"{device.type} {dtype_name} {_size_name(numel)}: compiling the composite")
            try:
                compiled = torch.compile(_composite, dynamic=False, fullgraph=True)
                y = compiled(x)  # compiles the forward and the backward
                torch.autograd.grad(y, x, grad)
                _sync(device)
                c.forward = compiled
            except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
                c.error = "torch.compile failed: " + _short_reason(exc)
                _log(f"  n/a: {c.error}")
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
    ok = [c for c in candidates if c.error is None]

    results: List[Result] = []
    for op in OPS:
        _log(f"{device.type} {dtype_name} {_size_name(numel)} {op}: {', '.join(c.name for c in ok)}")
        fns: Dict[str, Callable[[], object]] = {}
        graphs = []  # keeps the forward graphs of the backward timing alive
        for c in ok:
            fns[c.name], graph = _timed_call(c, op, x, grad)
            if graph is not None:
                graphs.append(graph)
        with torch.enable_grad():
            failed: Dict[str, str] = {}
            medians = interleaved_medians(fns, device, repeats, warmup, failed) if fns else {}
        del graphs

        for c in candidates:
            r = Result(device.type, dtype_name, numel, op, c.name, layout=layout)
            if c.error is not None or c.name in failed:
                r.status, r.reason = "n/a", c.error or failed[c.name]
                results.append(r)
                continue
            total, new = saved_info[c.name]
            if c.backward is not None:  # the copy: no saved tensors, a copy each way
                fwd_bytes = bwd_bytes = 2 * element
            else:
                fwd_bytes = 2 * element + new
                bwd_bytes = 2 * element + total
            r.bytes_per_element = {"forward": fwd_bytes, "backward": bwd_bytes}.get(op, fwd_bytes + bwd_bytes)
            r.median_s, r.samples_s = medians[c.name]
            r.min_s = min(r.samples_s)
            r.gbps = r.bytes_per_element * numel / r.median_s / 1e9
            if copy_gbps:
                r.fraction_of_copy = r.gbps / copy_gbps
            r.saved_bytes_per_element = total
            results.append(r)
        ext = next((r for r in results[-len(candidates):] if r.candidate == "torch_ext"), None)
        for r in results[-len(candidates):]:
            if ext is not None and ext.median_s and r.median_s:
                r.torch_ext_ratio = ext.median_s / r.median_s
    del x, grad
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------
# The training-step benchmark.


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                amp: Optional[torch.dtype]):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    opt.step()


#: The training-step pairs: a network with QuantActivation and its float
#: twin with ReLU. ``lmnet_v1``: Blueoil's W1A2 LmnetV1Quantize (binary
#: weights too) against LmnetV1. ``lm_resnet``: Blueoil's ResNet-18 for small
#: images with QuantActivation in every basic block and float weights, against
#: the same network with ReLU: what the activations alone cost.
TRAIN_MODELS = ("lmnet_v1", "lm_resnet")


def _train_pair(name: str) -> Dict[str, Callable[[], torch.nn.Module]]:
    """{quantized network's name: builder, float twin's name: builder}, in that order."""
    from torch_ext.models import LmnetV1, LmnetV1Quantize, LmResnet, LmResnetQuantize  # imported when needed

    if name == "lmnet_v1":
        return {"LmnetV1Quantize": functools.partial(LmnetV1Quantize, num_classes=10),
                "LmnetV1": functools.partial(LmnetV1, num_classes=10)}
    return {"LmResnet+QuantActivation": functools.partial(LmResnetQuantize, num_classes=10, weight_quantizer=None),
            "LmResnet": functools.partial(LmResnet, num_classes=10)}


def _bench_train_step(device: torch.device, batch: int, repeats: int, warmup: int, *,
                      amp: Optional[str] = None, channels_last: bool = False,
                      model: str = "lmnet_v1") -> Dict[str, object]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    steps: Dict[str, Callable[[], object]] = {}
    pair = _train_pair(model)
    quantized, float_name = pair
    for name, build in pair.items():
        torch.manual_seed(0)
        net = build().to(device, memory_format=memory_format).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        steps[name] = functools.partial(_train_step, net, opt, images, labels, _DTYPES.get(amp))
    _log(f"{device.type} training step, batch {batch}, amp {amp}, channels_last {channels_last}: "
         f"{quantized} vs {float_name} ({repeats} rounds)")
    timed = interleaved_medians(steps, device, repeats, warmup)
    samples = {n: s for n, (_, s) in timed.items()}
    med = {n: statistics.median(s) for n, s in samples.items()}
    return {
        "device": device.type,
        "model": model,
        "quantized": quantized,
        "float": float_name,
        "batch": batch,
        "image_size": [32, 32],
        "amp": amp,
        "channels_last": channels_last,
        "optimizer": "SGD(lr=0.01, momentum=0.9)",
        "median_s": med,
        "samples_s": samples,
        "ratio_quantized_over_float": med[quantized] / med[float_name],
    }


# --------------------------------------------------------------------------
# Targets: the figures this project promises.


def _find(results: Sequence[Result], **kw) -> Optional[Result]:
    for r in results:
        if all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def _targets(results: Sequence[Result], train: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The promised figures (README), where this run measured them at the target size."""
    out: List[Dict[str, object]] = []

    def ratio_target(device, dtype, size, op, peer, limit, text):
        r = _find(results, device=device, dtype=dtype, size=size, op=op, candidate=peer)
        value = r.torch_ext_ratio if r is not None else None
        out.append({
            "target": text, "device": device, "dtype": dtype, "size": size, "op": op, "peer": peer,
            "value": value, "limit": limit, "kind": "time ratio torch_ext/peer <=",
            "met": None if value is None else value <= limit,
        })

    def fraction_target(device, dtype, size, op, limit, text):
        r = _find(results, device=device, dtype=dtype, size=size, op=op, candidate="torch_ext")
        value = r.fraction_of_copy if r is not None else None
        out.append({
            "target": text, "device": device, "dtype": dtype, "size": size, "op": op, "peer": "copy bandwidth",
            "value": value, "limit": limit, "kind": "fraction of copy GB/s >=",
            "met": None if value is None else value >= limit,
        })

    cpu, big = "cpu", _DEFAULT_SIZES["cpu"][1]
    if _find(results, device=cpu, dtype="float32", size=big):
        ratio_target(cpu, "float32", big, "forward", "relu", 1.2, "CPU fp32 16M forward within 1.2x of relu")
        ratio_target(cpu, "float32", big, "backward", "relu", 1.2, "CPU fp32 16M backward within 1.2x of relu")
        ratio_target(cpu, "float32", big, "forward+backward", "fake_quantize", 1.0,
                     "CPU fp32 16M fwd+bwd at least as fast as fake_quantize")
        ratio_target(cpu, "float32", big, "forward+backward", "composite", 0.25,
                     "CPU fp32 16M fwd+bwd at least 4x faster than the composite")
        ratio_target(cpu, "float32", big, "forward+backward", "composite_compiled", 1.0,
                     "CPU fp32 16M fwd+bwd at least as fast as the compiled composite")
    big = _DEFAULT_SIZES["cuda"][1]
    for dtype in ("float32", "bfloat16"):
        if not _find(results, device="cuda", dtype=dtype, size=big):
            continue
        for op in ("forward", "backward"):
            fraction_target("cuda", dtype, big, op, 0.85, f"GPU {dtype} 256M {op} at >= 85% of copy bandwidth")
            for peer in ("fake_quantize", "composite_compiled"):
                ratio_target("cuda", dtype, big, op, peer, 1.0, f"GPU {dtype} 256M {op} at least as fast as {peer}")
    for t in train:
        if t["device"] == "cuda":
            value = t["ratio_quantized_over_float"]
            out.append({
                "target": f"GPU training step (batch {t['batch']}) within 1.15x of the float twin",
                "device": "cuda", "value": value, "limit": 1.15, "kind": "time ratio quantized/float <=",
                "met": value <= 1.15,
            })
    return out


# --------------------------------------------------------------------------
# Output.


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def _print_table(results: Sequence[Result], copy_gbps: Dict[str, float], out=sys.stdout) -> None:
    header = (f"{'device':<6} {'op':<16} {'dtype':<8} {'layout':<13} {'size':>5}  {'candidate':<18} {'median':>10} {'min':>10} "
              f"{'GB/s':>7} {'%copy':>6} {'ext/peer':>8} {'saved B/el':>10}")
    print(header, file=out)
    print("-" * len(header), file=out)
    last_group = None
    for r in results:
        group = (r.device, r.op, r.dtype, r.size, r.layout)
        if last_group is not None and group != last_group:
            print("", file=out)
        last_group = group
        if r.status != "ok":
            print(f"{r.device:<6} {r.op:<16} {r.dtype:<8} {r.layout:<13} {_size_name(r.size):>5}  {r.candidate:<18} "
                  f"{'n/a':>10}  ({r.reason})", file=out)
            continue
        ratio = "" if r.candidate == "torch_ext" or r.torch_ext_ratio is None else f"{r.torch_ext_ratio:.2f}x"
        frac = "" if r.fraction_of_copy is None else f"{100 * r.fraction_of_copy:.0f}%"
        print(f"{r.device:<6} {r.op:<16} {r.dtype:<8} {r.layout:<13} {_size_name(r.size):>5}  {r.candidate:<18} "
              f"{_fmt_time(r.median_s):>10} {_fmt_time(r.min_s):>10} {r.gbps:7.1f} {frac:>6} {ratio:>8} "
              f"{r.saved_bytes_per_element:10.3f}", file=out)
    for dev, bw in copy_gbps.items():
        print(f"\n{dev} copy bandwidth (dst.copy_(src), float32, preallocated): {bw:.1f} GB/s", file=out)
    print("median/min: over the interleaved rounds; GB/s, %copy and ext/peer are of the medians.", file=out)
    print("ext/peer: torch_ext's median time / the candidate's (below 1: torch_ext is faster).", file=out)


def _print_train(train: Sequence[Dict[str, object]], out=sys.stdout) -> None:
    for t in train:
        med = t["median_s"]
        setting = (f", autocast {t['amp']}" if t.get("amp") else "") + (", channels_last" if t.get("channels_last") else "")
        q, f = t["quantized"], t["float"]
        print(f"\nTraining step on {t['device']} (batch {t['batch']}, 32x32, SGD{setting}; median of "
              f"{len(t['samples_s'][f])} interleaved rounds): {q} "
              f"{_fmt_time(med[q])}, {f} {_fmt_time(med[f])}, "
              f"ratio {t['ratio_quantized_over_float']:.2f}x", file=out)


def _print_targets(targets: Sequence[Dict[str, object]], out=sys.stdout) -> None:
    if not targets:
        return
    print("\nTargets:", file=out)
    for t in targets:
        value = t["value"]
        if value is None:
            status, shown = "n/a", "n/a"
        else:
            status = "met" if t["met"] else "MISSED"
            shown = f"{100 * value:.0f}%" if "fraction" in t["kind"] else f"{value:.2f}x"
        print(f"  [{status:>6}] {t['target']}: {shown} (limit {t['limit']})", file=out)


# --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torch_ext.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=_csv, default=None,
                   help="comma-separated: cpu,cuda (default: cpu, and cuda when one is visible; --deploy: cpu only)")
    p.add_argument("--dtypes", type=_csv, default=["float32", "bfloat16"],
                   help="default: float32,bfloat16 (--learnable: float32; it times float32 and bfloat16)")
    p.add_argument("--sizes", type=lambda s: [_parse_size(t) for t in _csv(s)], default=None,
                   help="element counts, K/M/G suffixes allowed (default: 64K,16M on CPU; 64K,256M on CUDA; "
                        "--learnable: 16M)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per case (default 9 CPU, 30 CUDA; --learnable 15; --deploy 30)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls per candidate (default 2 CPU, 5 CUDA; --learnable 1)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="CPU: make glibc reuse freed blocks (as jemalloc/tcmalloc do) instead of mapping each "
                        "large output afresh, so that page faults do not hide the kernels' cost")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; --learnable and --deploy: 2)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: small size, few rounds, tiny batch")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--train-step", dest="train_step", action="store_true", default=None,
                   help="run the training-step benchmark (the default)")
    p.add_argument("--no-train-step", dest="train_step", action="store_false", help="skip it")
    p.add_argument("--only-train-step", action="store_true", help="skip the operator benchmark")
    p.add_argument("--train-batch", type=int, default=None,
                   help="batch of the training step (default 256 on CUDA, 32 on CPU; 2 with --quick)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed rounds of the training step")
    p.add_argument("--train-amp", default=None, metavar="DTYPE",
                   help="autocast the training step to bfloat16 or float16 (default: no autocast)")
    p.add_argument("--train-channels-last", action="store_true",
                   help="the training step's images and models in channels_last memory format")
    p.add_argument("--train-models", type=_csv, default=["lmnet_v1"],
                   help="the training-step pairs, of " + ", ".join(TRAIN_MODELS) + " (default lmnet_v1): "
                        "LmnetV1Quantize vs LmnetV1; LmResnet with QuantActivation (float weights) vs LmResnet")
    p.add_argument("--layouts", type=_csv, default=["contiguous"],
                   help="memory layouts of the operator cases: contiguous (a vector) and/or channels_last "
                        "(images [N, 64, 32, 32]; sizes must be multiples of 64K)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile'd composite (its compilation takes tens of seconds a case)")
    p.add_argument("--learnable", action="store_true",
                   help="benchmark the learnable max_value (PACT, LSQ) against the fixed operator, torch's "
                        "learnable fake-quantize, relu and copy instead (torch_ext.bench_learnable); honours "
                        "--devices, --sizes, --dtypes, --repeats, --warmup, --threads, --quick, --json, "
                        "--reuse-freed-memory and refuses the options it cannot honour")
    p.add_argument("--deploy", action="store_true",
                   help="benchmark the deployed (bit-packed) LMNet against the float and fake-quantized models "
                        "instead (torch_ext.deploy.bench); honours --threads, --repeats, --json, --devices cpu, "
                        "--reuse-freed-memory and refuses the options it cannot honour")
    return p


def _devices(requested: Optional[List[str]]) -> List[str]:
    if requested is None:  # what there is
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in requested:
        if d not in ("cpu", "cuda"):
            raise SystemExit(f"--devices: unknown device {d!r} (cpu, cuda)")
    if "cuda" in requested and not torch.cuda.is_available():
        raise SystemExit("--devices cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    return requested


class _Report:
    """The JSON document, rewritten after every case, so a run killed at a time limit keeps what it measured."""

    def __init__(self, path: Optional[str], meta: Dict[str, object], copy_gbps: Dict[str, float]) -> None:
        self.path, self.meta, self.copy_gbps = path, meta, copy_gbps
        self.results: List[Result] = []
        self.train: List[Dict[str, object]] = []

    def save(self, results: Optional[List[Result]] = None, **extra: object) -> None:
        if not self.path:
            return
        done = self.results + (results or [])
        doc = {"meta": self.meta, "copy_bandwidth_gbps": self.copy_gbps, "results": [asdict(r) for r in done],
               "train_step": self.train, **extra}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.path)


def _check_args(args: argparse.Namespace) -> None:
    for option, values, known in (("--dtypes", args.dtypes, _DTYPES), ("--layouts", args.layouts, _LAYOUTS),
                                  ("--train-models", args.train_models, TRAIN_MODELS)):
        for v in values:
            if v not in known:
                raise SystemExit(f"{option}: unknown value {v!r} ({', '.join(known)})")
    if args.train_amp is not None and args.train_amp not in ("bfloat16", "float16"):
        raise SystemExit(f"--train-amp: must be bfloat16 or float16, got {args.train_amp!r}")
    if "channels_last" in args.layouts and args.sizes:
        bad = [n for n in args.sizes if n % math.prod(_IMAGE_SHAPE)]
        if bad:
            raise SystemExit(f"--sizes: channels_last cases need multiples of {math.prod(_IMAGE_SHAPE)} elements, "
                             f"got {', '.join(map(str, bad))}")


def _defaults(args: argparse.Namespace, dev_name: str) -> Dict[str, object]:
    """Sizes, rounds and warm-up calls for ``dev_name``: the options where given, else the device's defaults."""
    if args.quick:
        sizes, repeats, warmup, train = _QUICK_SIZES, 3, 1, (2, 1, 0)
    elif dev_name == "cpu":
        sizes, repeats, warmup, train = _DEFAULT_SIZES[dev_name], 9, 2, (32, 5, 1)
    else:
        sizes, repeats, warmup, train = _DEFAULT_SIZES[dev_name], 30, 5, (256, 20, 3)
    return {
        "sizes": args.sizes or list(sizes),
        "repeats": args.repeats or repeats,
        "warmup": args.warmup if args.warmup is not None else warmup,
        "train_batch": args.train_batch or train[0],
        "train_repeats": args.train_repeats or train[1],
        "train_warmup": train[2],
    }


def _bench_device(args: argparse.Namespace, dev_name: str, copy_gbps: Dict[str, float], report: "_Report"):
    """Every operator case and the training step on one device: (results, training-step records)."""
    device = torch.device(dev_name)
    d = _defaults(args, dev_name)
    results: List[Result] = []
    if not args.only_train_step:
        _log(f"{dev_name}: copy bandwidth at {_size_name(max(d['sizes']))} float32")
        copy_gbps[dev_name] = _copy_bandwidth(device, max(d["sizes"]), d["repeats"], d["warmup"])
        # Donated buffers (a compiled backward reusing a saved tensor's memory
        # for its output) forbid retain_graph=True, which the backward timing
        # needs; the check is made at each backward call. Nothing could be
        # donated here anyway: the saved bool mask is smaller than grad_x.
        with _no_donated_buffers():
            for layout in args.layouts:
                for dtype_name in args.dtypes:
                    for numel in d["sizes"]:
                        results += _bench_case(device, _DTYPES[dtype_name], numel, d["repeats"], d["warmup"],
                                               copy_gbps[dev_name], layout, not args.no_compile)
                        report.save(results)
    train = []
    if args.train_step is not False:
        for model in args.train_models:
            train.append(_bench_train_step(device, d["train_batch"], d["train_repeats"], d["train_warmup"],
                                           amp=args.train_amp, channels_last=args.train_channels_last,
                                           model=model))
    return results, train


def _meta(args: argparse.Namespace, argv: Optional[Sequence[str]], devices: List[str],
          reuse: Optional[bool]) -> Dict[str, object]:
    return {
        "torch": torch.__version__,
        "torch_ext": torch_ext.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "bit": BIT,
        "max_value": MAX_VALUE,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
        "cuda": torch.version.cuda if "cuda" in devices else None,
        "reuse_freed_memory": reuse,
    }


# --------------------------------------------------------------------------
# The other modes (--learnable, --deploy): each honours the options it can
# and refuses the others, naming them, rather than ignoring them.

_UNSET = object()

# What each mode cannot honour, whatever the value: option dest -> (the option, why).
_TRAIN_ONLY = "it times no training step"
_TRAIN_OPTIONS = {
    "train_step": ("--train-step/--no-train-step", _TRAIN_ONLY),
    "only_train_step": ("--only-train-step", _TRAIN_ONLY),
    "train_batch": ("--train-batch", _TRAIN_ONLY),
    "train_repeats": ("--train-repeats", _TRAIN_ONLY),
    "train_amp": ("--train-amp", _TRAIN_ONLY),
    "train_channels_last": ("--train-channels-last", _TRAIN_ONLY),
    "train_models": ("--train-models", _TRAIN_ONLY),
}
_LEARNABLE_REFUSES = {
    "deploy": ("--deploy", "choose one of --learnable and --deploy"),
    **_TRAIN_OPTIONS,
}
_DEPLOY_REFUSES = {
    "sizes": ("--sizes", "it times LMNet at batch sizes 1 and 64 (python -m torch_ext.deploy.bench --batch-sizes)"),
    "dtypes": ("--dtypes", "it times its float32 models only"),
    "layouts": ("--layouts", "it times images in the models' own layout"),
    "warmup": ("--warmup", "its warm-up is fixed at 2 calls a candidate"),
    "quick": ("--quick", "it has no quick mode (python -m torch_ext.deploy.bench --batch-sizes 1 --repeats 3 "
                         "--no-onnx)"),
    **_TRAIN_OPTIONS,
}


def _given(argv: Optional[Sequence[str]]) -> Dict[str, object]:
    """The options given on the command line (dest -> value), defaults left out."""
    parser = _parser()
    dests = vars(parser.parse_args(argv))
    ns = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    return {dest: value for dest, value in vars(ns).items() if value is not _UNSET}


def _refuse(mode: str, given: Dict[str, object], refused: Dict[str, Tuple[str, str]]) -> None:
    for dest in given:
        if dest in refused:
            option, why = refused[dest]
            raise SystemExit(f"{mode}: cannot honour {option}: {why}")


def _run_learnable(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    from torch_ext import bench_learnable  # only this mode needs it

    given = _given(argv)
    _refuse("--learnable", given, _LEARNABLE_REFUSES)
    other = [layout for layout in args.layouts if layout != "contiguous"]
    if other:
        raise SystemExit(f"--learnable: cannot honour --layouts {','.join(other)}: it times contiguous vectors only")
    dtypes = args.dtypes if "dtypes" in given else ["float32"]
    other = [d for d in dtypes if d not in bench_learnable.DTYPES]
    if other:
        raise SystemExit(f"--learnable: cannot honour --dtypes {','.join(other)}: it times "
                         f"{', '.join(bench_learnable.DTYPES)}")
    devices = _devices(args.devices)
    quick = {"sizes": list(_QUICK_SIZES), "repeats": 3, "warmup": 1} if args.quick else {}
    sizes = args.sizes or quick.get("sizes") or [bench_learnable.DEFAULT_NUMEL]
    repeats = args.repeats if args.repeats is not None else quick.get("repeats", bench_learnable.DEFAULT_REPEATS)
    warmup = args.warmup if args.warmup is not None else quick.get("warmup", bench_learnable.DEFAULT_WARMUP)
    threads = args.threads if args.threads is not None else bench_learnable.DEFAULT_THREADS
    reuse = _reuse_if_asked(args)
    bench_learnable.benchmark(devices, sizes, dtypes, repeats, warmup, threads, BIT, args.json,
                              meta={"argv": list(argv) if argv is not None else sys.argv[1:],
                                    "reuse_freed_memory": reuse})
    if args.json:
        _log(f"wrote {args.json}")
    return 0


def _run_deploy(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    from torch_ext.deploy import bench as deploy_bench  # only this mode needs it

    given = _given(argv)
    _refuse("--deploy", given, _DEPLOY_REFUSES)
    other = [d for d in (args.devices or []) if d != "cpu"]
    if other:
        raise SystemExit(f"--deploy: cannot honour --devices {','.join(other)}: the deployed model runs on the CPU "
                         "only")
    if args.reuse_freed_memory:
        failure = _reuse_freed_memory()
        if failure:
            _log(f"--reuse-freed-memory: {failure}; continuing without")
    forwarded: List[str] = []
    for option, value in (("--threads", args.threads), ("--repeats", args.repeats), ("--json", args.json)):
        if value is not None:
            forwarded += [option, str(value)]
    deploy_bench.main(forwarded)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m torch_ext.bench``: print the tables (and write ``--json``); returns the exit status."""
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.learnable:
        return _run_learnable(args, argv)
    if args.deploy:
        return _run_deploy(args, argv)
    devices = _devices(args.devices)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reuse = _reuse_if_asked(args)
    started = time.perf_counter()
    meta = _meta(args, argv, devices, reuse)
    copy_gbps: Dict[str, float] = {}
    report = _Report(args.json, meta, copy_gbps)
    for dev_name in devices:
        dev_results, dev_train = _bench_device(args, dev_name, copy_gbps, report)
        report.results += dev_results
        report.train += dev_train
        report.save()
    results, train = report.results, report.train
    targets = _targets(results, train)
    if results:
        _print_table(results, copy_gbps)
    _print_train(train)
    _print_targets(targets)
    elapsed = time.perf_counter() - started
    print(f"\n(torch {meta['torch']}, {meta['threads']} threads, CPU capability {meta['cpu_capability']}"
          + (f", {meta['cuda_device']}, CUDA {meta['cuda']}" if meta["cuda_device"] else "")
          + (", freed memory reused (glibc mallopt)" if reuse else "")
          + f"; {elapsed:.0f} s)")
    if args.json:
        report.save(targets=targets, elapsed_s=elapsed)
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
