"""The linear mid-tread half quantizer (docs/quantizer.md): its Python API, fake kernels and torch.func route.

Operators (csrc/ops/quantize.cpp): ``linear_mid_tread_half_quantize`` and the in-place
``linear_mid_tread_half_quantize_``, differentiable through a C++ autograd
that saves a 1-bit mask, and the ``_forward``, ``_forward_`` and
``_backward`` pieces that autograd calls.

* The functional API checks its arguments, naming them, and calls the operators.
* The fake kernels let FakeTensor tracing (torch.compile, torch.export,
  opcheck) know output shapes, dtypes and strides without running a kernel.
  Outputs are laid out exactly as the C++ kernels lay them out (``empty_like``
  keeps dense layouts such as channels_last), and the arguments are checked by
  the same C++ function the kernels call, so tracing refuses what eager refuses.
* torch.func (grad, vjp, jacrev, jvp, vmap) cannot transform the C++ autograd.
  Under a transform the API takes a Python ``autograd.Function`` with
  ``setup_context`` instead, whose forward is the same kernel and whose
  backward is the straight-through rule of :mod:`torch_ext.reference`: values
  and gradients are bit-identical to eager autograd, only what is saved
  differs (``x`` instead of the mask). vmap's batching rule is the plain call
  on the batched tensor (the quantizer is elementwise).
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Optional

import torch

from .. import _C
from ..reference import linear_mid_tread_half_quantize_backward_reference

__all__ = [
    "BackwardFn",
    "linear_mid_tread_half_quantize",
    "linear_mid_tread_half_quantize_",
    "validate_bit",
    "validate_max_value",
]

#: ``backward(grad_y, x, bit, max_value) -> grad_x``: replaces the straight-through gradient.
BackwardFn = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


# --------------------------------------------------------------------------
# Arguments.


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
        _C.check_max_value(value, dtype)
    return value


def _validate_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got x of type {type(x).__name__}")


# --------------------------------------------------------------------------
# The Python autograd: a user's backward=, and torch.func.


def transforms_active(x: torch.Tensor) -> bool:
    """Whether ``x`` is being transformed by torch.func (a grad, jvp or vmap level wraps it).

    Under torch.compile the answer is no: Dynamo traces the registered operator
    (and cannot call this check, a C++ builtin).
    """
    if torch.compiler.is_compiling():
        return False
    return _is_wrapped(x)


def _grad_x(backward: Optional[BackwardFn], grad_y: torch.Tensor, x: torch.Tensor, bit: int, max_value: float):
    """The user's ``backward`` if given, else the fixed straight-through gradient (:mod:`torch_ext.reference`)."""
    if backward is None:
        return linear_mid_tread_half_quantize_backward_reference(grad_y, x, max_value)
    return backward(grad_y, x, bit, max_value)


class _Quantize(torch.autograd.Function):
    """The quantizer in the form torch.func transforms; with a user's ``backward``, that one.

    ``backward(grad_y, x, bit, max_value) -> grad_x`` replaces the
    straight-through rule (Blueoil's ``backward=``); under vmap it must use
    tensor operations only, as any function vmap transforms.
    """

    generate_vmap_rule = True  # forward and backward use only operations with batching rules

    @staticmethod
    def forward(x: torch.Tensor, bit: int, max_value: float, user_backward) -> torch.Tensor:  # type: ignore[override]
        return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, max_value)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, bit, max_value, user_backward = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.bit, ctx.max_value, ctx.user_backward = bit, max_value, user_backward

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _grad_x(ctx.user_backward, grad_y, x, ctx.bit, ctx.max_value), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, *_) -> torch.Tensor:
        # The forward-mode derivative of the straight-through estimator: the same mask.
        (x,) = ctx.saved_tensors
        return _grad_x(ctx.user_backward, x_tangent, x, ctx.bit, ctx.max_value)


class _QuantizeInPlaceWithCustomBackward(torch.autograd.Function):
    """The in-place forward with a user-supplied backward (Blueoil's ``backward=``), outside torch.func."""

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
        return _grad_x(ctx.backward, grad_y, x, ctx.bit, ctx.max_value), None, None, None


def _elementwise_vmap(info, in_dims, x, bit, max_value):
    return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, max_value), in_dims[0]


torch.library.register_vmap("torch_ext::linear_mid_tread_half_quantize", _elementwise_vmap)


# --------------------------------------------------------------------------
# The functional API.


def _fx_traced(name: str, x: torch.fx.Proxy, bit: int, max_value, backward: Optional[BackwardFn]):
    """FX symbolic tracing: the registered operator ``name`` recorded as a leaf call of the graph."""
    if backward is not None:
        raise TypeError(f"{name}: a Python backward= cannot be recorded by FX tracing")
    return getattr(torch.ops.torch_ext, name)(x, bit, validate_max_value(max_value))


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
        return _fx_traced("linear_mid_tread_half_quantize", x, bit, max_value, backward)
    _validate_x(x)
    max_value = validate_max_value(max_value)  # the dtype-dependent rule: the operator checks it
    if backward is not None or transforms_active(x):
        # A Python backward, or torch.func (grad, vmap, ...), which cannot transform the C++ autograd.
        return _Quantize.apply(x, bit, max_value, backward)
    return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, max_value)


def linear_mid_tread_half_quantize_(
    x: torch.Tensor, bit: int = 2, max_value: float = 2.0, *, backward: Optional[BackwardFn] = None
) -> torch.Tensor:
    """In-place :func:`linear_mid_tread_half_quantize`: overwrites and returns ``x``.

    The gradient is still that of the original ``x`` (only its 1-bit mask is kept).
    """
    bit = validate_bit(bit)
    if isinstance(x, torch.fx.Proxy):
        _fx_traced("linear_mid_tread_half_quantize_", x, bit, max_value, backward)
        return x
    _validate_x(x)
    max_value = validate_max_value(max_value)  # the dtype-dependent rule: the operator checks it
    if transforms_active(x):
        # torch.func: the out-of-place quantizer that transforms can differentiate, written back.
        return x.copy_(_Quantize.apply(x.clone(), bit, max_value, backward))
    if backward is not None:
        # Checked here too: autograd.Function.forward runs with grad mode off. Autograd only
        # notices after forward has run, when x is already overwritten; refuse first with
        # ATen's own check, as csrc/ops/quantize.cpp does for the default backward.
        _C.check_inplace_allowed(x)
        return _QuantizeInPlaceWithCustomBackward.apply(x, bit, max_value, backward)
    torch.ops.torch_ext.linear_mid_tread_half_quantize_(x, bit, max_value)
    return x


# --------------------------------------------------------------------------
# Fake kernels.


def _mask_like(x: torch.Tensor) -> torch.Tensor:
    # 8 elements a byte, in the memory order of the dense tensor the kernel
    # runs on (csrc/torch_ext/layouts.h); its shape does not depend on it.
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize")
def _quantize_fake(x, bit, max_value):
    _C.check_quantize_arguments(x.dtype, bit, max_value)
    return torch.empty_like(x)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_")
def _quantize_inplace_fake(x, bit, max_value):
    _C.check_quantize_arguments(x.dtype, bit, max_value)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_forward")
def _forward_fake(x, bit, max_value):
    _C.check_quantize_arguments(x.dtype, bit, max_value)
    return torch.empty_like(x), _mask_like(x)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_forward_")
def _forward_inplace_fake(x, bit, max_value):
    _C.check_quantize_arguments(x.dtype, bit, max_value)
    return _mask_like(x)


@torch.library.register_fake("torch_ext::linear_mid_tread_half_quantize_backward")
def _backward_fake(grad_y, mask, x_strides=None):
    # The real kernels' check (grad_y's dtype, mask's dtype, shape and device),
    # with sizes read as SymInts so that dynamic shapes trace.
    _C.check_backward_arguments(grad_y, mask)
    if x_strides is None:
        # The mask is row-major; grad_x is laid out like grad_y.
        return torch.empty_like(grad_y)
    if len(x_strides) != grad_y.dim():
        raise ValueError(
            "linear_mid_tread_half_quantize_backward: x_strides must have one stride a dim of grad_y "
            f"({grad_y.dim()}), got x_strides={list(x_strides)}"
        )
    if all(isinstance(s, int) for s in (*x_strides, *grad_y.shape)):
        # Concrete strides: the kernels' density check itself.
        _C.check_backward_strides(grad_y, list(x_strides))
    # grad_x has x's layout: the strides the mask was made in.
    return torch.empty_strided(grad_y.shape, x_strides, dtype=grad_y.dtype, device=grad_y.device)
