"""Fake (meta) kernels of every torch_ext operator: the one place they are registered.

They let FakeTensor tracing (torch.compile, torch.export, opcheck) know the
output shapes, dtypes and strides without running a kernel. Outputs are laid
out exactly as the C++ kernels lay them out (``empty_like`` keeps dense layouts
such as channels_last), and the arguments are checked by the same C++
function the kernels call, so tracing refuses exactly what eager refuses.
"""

from __future__ import annotations

import torch

from . import _C


def _mask_like(x: torch.Tensor) -> torch.Tensor:
    # 8 elements a byte, row-major order (csrc/torch_ext/torch_ext.h).
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
def _backward_fake(grad_y, mask):
    # The real kernels' check (grad_y's dtype, mask's dtype, shape and device),
    # with sizes read as SymInts so that dynamic shapes trace.
    _C.check_backward_arguments(grad_y, mask)
    return torch.empty_like(grad_y)


# ---- Learnable max_value (csrc/torch_ext/learnable.h) ----
# The checks of csrc/ops.cpp's check_learnable_arguments, in Python (same
# exception types and messages), so that tracing refuses what eager refuses.

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_learnable(x, max_value, bit, mode, op="linear_mid_tread_half_quantize_learnable", like="x"):
    if not (1 <= bit <= 16 or bit == 32):
        raise ValueError(f"{op}: bit must be in 1..16 or 32, got bit={bit}")
    if mode not in ("pact", "lsq"):
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
    return _contiguous_like(grad_y), max_value.new_empty(())
