"""The quantizer with a learnable max_value (docs/quantizer.md, "Learnable max_value"): API and fake kernels.

Operators (csrc/ops/learnable.cpp, csrc/torch_ext/learnable.h):
``linear_mid_tread_half_quantize_learnable``, differentiable through a C++
autograd, and its ``_forward`` and ``_backward`` pieces. The fake kernels
make the checks of csrc/ops/learnable.cpp's ``check_learnable_arguments`` in Python
(same exception types and messages), so that tracing refuses what eager refuses.
"""

from __future__ import annotations

from typing import Optional

import torch

from .quantize import _validate_x, validate_bit

__all__ = [
    "LEARN_MAX_VALUE_MODES",
    "effective_max_value",
    "linear_mid_tread_half_quantize_learnable",
    "validate_learn_mode",
]

#: The gradients of ``y`` with respect to ``max_value`` that the learnable operator offers.
LEARN_MAX_VALUE_MODES = ("pact", "lsq")

# The range m is clamped to inside the kernels, per compute type
# (csrc/torch_ext/learnable.h): the smallest positive and the largest finite value.
_M_RANGE = {
    torch.float32: (2.0**-149, float(torch.finfo(torch.float32).max)),
    torch.float64: (2.0**-1074, float(torch.finfo(torch.float64).max)),
}


def validate_learn_mode(mode) -> str:
    """``mode`` as one of :data:`LEARN_MAX_VALUE_MODES`; ``ValueError`` naming the value otherwise."""
    if not isinstance(mode, str) or mode not in LEARN_MAX_VALUE_MODES:
        raise ValueError(f'learn_max_value: mode must be "pact" or "lsq", got mode={mode!r}')
    return mode


def effective_max_value(max_value, dtype: torch.dtype = torch.float32) -> float:
    """The ``m`` the learnable kernels use for ``max_value`` (a float or 0-dim tensor) and inputs of ``dtype``.

    ``max_value`` rounded to the compute type (float64 for float64 inputs,
    float32 otherwise), then clamped: NaN, 0 and negative values become the
    smallest positive value of that type, values above its largest finite
    value (+inf) become that value. Reads the tensor on the host: for export
    and reporting, never inside the training step.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(max_value, torch.Tensor):
        value = float(max_value.detach().to("cpu", compute))
    else:
        value = float(torch.tensor(float(max_value), dtype=torch.float64).to(compute))
    lo, hi = _M_RANGE[compute]
    if value > hi:
        return hi
    if value >= lo:
        return value
    return lo  # NaN, 0, negative


def linear_mid_tread_half_quantize_learnable(
    x: torch.Tensor,
    max_value: torch.Tensor,
    bit: int = 2,
    mode: str = "pact",
    *,
    scale_grad: Optional[bool] = None,
) -> torch.Tensor:
    """The quantizer with a learnable clip ``m``: a 0-dim floating tensor on ``x``'s device.

    The forward is :func:`linear_mid_tread_half_quantize` with ``m`` read on
    the device (bit-identical to it for the same ``m``; no host-device
    synchronisation). ``m`` is clamped inside the kernel: NaN, 0 and negative
    values act as the smallest positive value of the compute type, +inf as
    its largest finite value (:func:`effective_max_value`).

    Gradients: ``grad_x`` is straight-through where ``0 < x < m`` (as the fixed
    operator), and ``grad_max_value`` is the sum of ``grad_y * dy/dm`` with

    * ``mode="pact"``: ``dy/dm = 1`` where ``x >= m``, else 0 (saves 2 bits an element);
    * ``mode="lsq"``: ``dy/dm = (y - x) / m`` where ``0 < x < m``, 1 where
      ``x >= m``, 0 where ``x <= 0`` (saves ``x``: its element size an element).

    ``scale_grad`` multiplies ``grad_max_value`` by ``1 / sqrt(x.numel() * (2**bit - 1))``
    (LSQ's gradient scale); the default is on for ``"lsq"`` and off for ``"pact"``.
    The sum is deterministic (the same bits run to run, for every thread count).
    """
    _validate_x(x)
    if not isinstance(max_value, torch.Tensor):
        raise TypeError(
            f"max_value must be a 0-dim floating tensor on x's device, got max_value={max_value!r} "
            f"of type {type(max_value).__name__} (use linear_mid_tread_half_quantize for a fixed float max_value)"
        )
    bit = validate_bit(bit)
    mode = validate_learn_mode(mode)
    if scale_grad is None:
        scale_grad = mode == "lsq"
    return torch.ops.torch_ext.linear_mid_tread_half_quantize_learnable(x, max_value, bit, mode, bool(scale_grad))


# --------------------------------------------------------------------------
# Fake kernels.

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_learnable(x, max_value, bit, mode, op="linear_mid_tread_half_quantize_learnable", like="x"):
    if not (1 <= bit <= 16 or bit == 32):
        raise ValueError(f"{op}: bit must be in 1..16 or 32, got bit={bit}")
    if mode not in LEARN_MAX_VALUE_MODES:
        raise ValueError(f'{op}: mode must be "pact" or "lsq", got mode="{mode}"')
    if x.dtype not in _FLOATING:
        raise TypeError(
            f"{op}: {like} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {like} of dtype {x.dtype}"
        )
    if max_value.dim() != 0:
        raise ValueError(f"{op}: max_value must be a 0-dim tensor, got max_value of shape {list(max_value.shape)}")
    if max_value.dtype not in _FLOATING:
        raise TypeError(
            f"{op}: max_value must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got max_value of dtype {max_value.dtype}"
        )
    if max_value.device != x.device:
        raise ValueError(
            f"{op}: max_value must be on the device of {like} (no host-device copy is made), "
            f"got max_value on {max_value.device} and {like} on {x.device}"
        )


def _check_saved(op: str, grad_y, saved, mode: str) -> None:
    """What the backward was given to read: the two 1-bit masks (pact) or ``x`` itself (lsq)."""
    if saved.device != grad_y.device:
        raise ValueError(
            f"{op}: saved and grad_y must be on the same device, got saved on {saved.device} and grad_y on {grad_y.device}"
        )
    if mode == "pact":
        if saved.dtype != torch.uint8:
            raise TypeError(f"{op}: saved must be the uint8 masks in pact mode, got saved of dtype {saved.dtype}")
        torch._check(
            saved.dim() == 2 and saved.shape[0] == 2 and saved.shape[1] == (grad_y.numel() + 7) // 8,
            lambda: f"{op}: saved must have shape [2, mask bytes] in pact mode, got saved of shape {list(saved.shape)}",
        )
    else:
        if saved.dtype != grad_y.dtype:
            raise TypeError(f"{op}: saved must be x (of grad_y's dtype {grad_y.dtype}) in lsq mode, got saved of dtype {saved.dtype}")
        torch._check(
            saved.shape == grad_y.shape,
            lambda: f"{op}: saved must be x (of grad_y's shape) in lsq mode, got saved of shape {list(saved.shape)}",
        )


def _contiguous_like(x):
    return x.new_empty(x.shape)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_learnable")
def _learnable_fake(x, max_value, bit=2, mode="pact", scale_grad=False):
    _check_learnable(x, max_value, bit, mode)
    return _contiguous_like(x)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_learnable_forward")
def _learnable_forward_fake(x, max_value, bit):
    _check_learnable(x, max_value, bit, "pact")
    return _contiguous_like(x), x.new_empty((2, (x.numel() + 7) // 8), dtype=torch.uint8)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_learnable_backward")
def _learnable_backward_fake(grad_y, saved, max_value, bit, mode, scale_grad):
    op = "linear_mid_tread_half_quantize_learnable_backward"
    _check_learnable(grad_y, max_value, bit, mode, op=op, like="grad_y")
    _check_saved(op, grad_y, saved, mode)
    return _contiguous_like(grad_y), max_value.new_empty(())
