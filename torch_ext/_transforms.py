"""The quantizer under ``torch.func`` transforms (grad, vjp, jacrev, jvp, vmap) and FX tracing.

The differentiable operator's autograd is a C++ ``torch::autograd::Function``
(it saves a 1-bit mask), which functorch cannot transform. Under a transform
the functional API takes this route instead: a Python ``autograd.Function``
with ``setup_context`` (what functorch requires) whose forward is the same
registered kernel and whose backward is the same straight-through rule,
written with tensor operations (:func:`torch_ext.reference.linear_mid_tread_half_quantize_backward_reference`).
So values and gradients are bit-identical to eager autograd; only what is
saved differs (``x`` instead of the mask).

vmap needs a batching rule for the kernel: the quantizer is elementwise, so
the batched call is the plain call on the batched tensor, with the batch
dimension where it was.
"""

from __future__ import annotations

import torch

from .reference import linear_mid_tread_half_quantize_backward_reference

__all__ = ["quantize", "transforms_active"]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def transforms_active(x: torch.Tensor) -> bool:
    """Whether ``x`` is being transformed by torch.func (a grad, jvp or vmap level wraps it).

    Under torch.compile the answer is no: Dynamo traces the registered operator
    (and cannot call this check, a C++ builtin).
    """
    if torch.compiler.is_compiling():
        return False
    return _is_wrapped(x)


def _elementwise_vmap(info, in_dims, x, bit, max_value):
    return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, max_value), in_dims[0]


torch.library.register_vmap("torch_ext::linear_mid_tread_half_quantize", _elementwise_vmap)


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
        if ctx.user_backward is not None:
            return ctx.user_backward(grad_y, x, ctx.bit, ctx.max_value), None, None, None
        return linear_mid_tread_half_quantize_backward_reference(grad_y, x, ctx.max_value), None, None, None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, *_) -> torch.Tensor:
        # The forward-mode derivative of the straight-through estimator: the same mask.
        (x,) = ctx.saved_tensors
        if ctx.user_backward is not None:
            return ctx.user_backward(x_tangent, x, ctx.bit, ctx.max_value)
        return linear_mid_tread_half_quantize_backward_reference(x_tangent, x, ctx.max_value)


def quantize(x: torch.Tensor, bit: int, max_value: float, backward=None) -> torch.Tensor:
    """The differentiable quantizer through :class:`_Quantize` (arguments already checked)."""
    return _Quantize.apply(x, bit, max_value, backward)
