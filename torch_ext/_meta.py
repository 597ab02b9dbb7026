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
