"""The functional API: typed, documented wrappers over ``torch.ops.torch_ext``."""

from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import torch

from ._transforms import quantize as quantize_with_python_autograd
from ._transforms import transforms_active

__all__ = [
    "BackwardFn",
    "linear_mid_tread_half_quantize",
    "linear_mid_tread_half_quantize_",
    "linear_mid_tread_half_quantize_learnable",
    "LEARN_MAX_VALUE_MODES",
    "effective_max_value",
    "validate_bit",
    "validate_max_value",
]

#: ``backward(grad_y, x, bit, max_value) -> grad_x``: replaces the straight-through gradient.
BackwardFn = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def validate_bit(bit) -> int:
    """``bit`` as an int in 1..16 or 32; ``TypeError`` for a non-integer, ``ValueError`` out of range."""
    if isinstance(bit, bool):
        raise TypeError(f"bit must be an int, got bit={bit!r}")
    try:
        value = operator.index(bit)
    except TypeError:
        raise TypeError(f"bit must be an int, got bit={bit!r} of type {type(bit).__name__}") from None
    if not (1 <= value <= 16 or value == 32):
        raise ValueError(f"linear_mid_tread_half_quantize: bit must be in 1..16 or 32, got bit={value}")
    return value


def validate_max_value(max_value, *, dtype: Optional[torch.dtype] = None) -> float:
    """``max_value`` as a float, finite and > 0; ``TypeError`` for a non-number, ``ValueError`` otherwise.

    With ``dtype`` (that of the input ``x``), also ``ValueError`` where
    ``max_value`` rounds to 0 or to infinity in the compute type of ``x``
    (float32 unless ``x`` is float64), by the C++ check the kernels make.
    The operators make that check themselves in any case.
    """
    if isinstance(max_value, bool) or not isinstance(max_value, (int, float)) and not hasattr(max_value, "__float__"):
        raise TypeError(f"max_value must be a float, got max_value={max_value!r} of type {type(max_value).__name__}")
    if isinstance(max_value, torch.Tensor):
        raise TypeError("max_value must be a Python float, got a tensor; use float(max_value)")
    value = float(max_value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"linear_mid_tread_half_quantize: max_value must be finite and > 0, got max_value={value!r}"
        )
    if dtype is not None:
        from . import _C

        _C.check_max_value(value, dtype)
    return value


def _validate_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got x of type {type(x).__name__}")


def _refuse_inplace_on_leaf(x: torch.Tensor) -> None:
    # Autograd only notices after forward has run, when x is already
    # overwritten; refuse first with ATen's own check, as csrc/autograd.cpp
    # does for the default backward.
    from . import _C

    _C.check_inplace_allowed(x)


class _QuantizeInPlaceWithCustomBackward(torch.autograd.Function):
    """The in-place forward with a user-supplied backward (Blueoil's ``backward=``).

    (Out of place, :mod:`torch_ext._transforms` does this, in the form torch.func can transform.)
    """

    @staticmethod
    def forward(ctx, x, bit, max_value, backward):
        # The user's backward reads the original x, which the kernel overwrites.
        ctx.save_for_backward(x.clone())
        torch.ops.torch_ext.linear_mid_tread_half_quantize_(x, bit, max_value)
        ctx.mark_dirty(x)
        ctx.bit, ctx.max_value, ctx.backward = bit, max_value, backward
        return x

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return ctx.backward(grad_y, x, ctx.bit, ctx.max_value), None, None, None


def linear_mid_tread_half_quantize(
    x: torch.Tensor, bit: int = 2, max_value: float = 2.0, *, backward: Optional[BackwardFn] = None
) -> torch.Tensor:
    """Blueoil's linear mid-tread half quantizer (docs/quantizer.md).

    ``y = (floor((clip(x, 0, m) / m) * n + 0.5) / n) * m`` with ``n = 2**bit - 1``
    and ``m = max_value``, each step rounded in float32 (float64 for float64
    inputs); ``bit=32`` clips only. Ties round up. The gradient is
    straight-through where ``0 < x < m`` and exactly 0 elsewhere, unless
    ``backward(grad_y, x, bit, max_value) -> grad_x`` is given.

    Raises ``ValueError`` for a bad ``bit`` or ``max_value`` and ``TypeError``
    for a non-floating ``x``.
    """
    bit = validate_bit(bit)
    if isinstance(x, torch.fx.Proxy):
        # FX symbolic tracing: record the registered operator, a leaf call of the graph.
        if backward is not None:
            raise TypeError("linear_mid_tread_half_quantize: a Python backward= cannot be recorded by FX tracing")
        return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, validate_max_value(max_value))
    _validate_x(x)
    max_value = validate_max_value(max_value)  # the dtype-dependent rule: the operator checks it
    if backward is not None or transforms_active(x):
        # A Python backward, or torch.func (grad, vmap, ...), which cannot transform the C++ autograd.
        return quantize_with_python_autograd(x, bit, max_value, backward)
    return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, max_value)


def linear_mid_tread_half_quantize_(
    x: torch.Tensor, bit: int = 2, max_value: float = 2.0, *, backward: Optional[BackwardFn] = None
) -> torch.Tensor:
    """In-place :func:`linear_mid_tread_half_quantize`: overwrites and returns ``x``.

    The gradient is still that of the original ``x`` (only its 1-bit mask is kept).
    """
    bit = validate_bit(bit)
    if isinstance(x, torch.fx.Proxy):  # FX symbolic tracing: record the registered operator
        if backward is not None:
            raise TypeError("linear_mid_tread_half_quantize_: a Python backward= cannot be recorded by FX tracing")
        torch.ops.torch_ext.linear_mid_tread_half_quantize_(x, bit, validate_max_value(max_value))
        return x
    _validate_x(x)
    max_value = validate_max_value(max_value)  # the dtype-dependent rule: the operator checks it
    if transforms_active(x):
        # torch.func: the out-of-place quantizer that transforms can differentiate, written back.
        return x.copy_(quantize_with_python_autograd(x.clone(), bit, max_value, backward))
    if backward is not None:
        # Checked here too: autograd.Function.forward runs with grad mode off.
        _refuse_inplace_on_leaf(x)
        return _QuantizeInPlaceWithCustomBackward.apply(x, bit, max_value, backward)
    torch.ops.torch_ext.linear_mid_tread_half_quantize_(x, bit, max_value)
    return x


# --------------------------------------------------------------------------
# Learnable max_value (docs/quantizer.md, "Learnable max_value").

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
