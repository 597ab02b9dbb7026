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


# ---- Blueoil's binary weight quantizers (csrc/weight_quantization.cpp). The
# output is laid out like w (the kernels write into empty_like(w)). The checks
# are those of the C++ kernels, with their wording: tracing refuses what
# eager refuses.


def _check_weight_fake(op: str, w: torch.Tensor) -> None:
    if not w.is_floating_point():
        raise TypeError(f"{op}: w must have a floating dtype, got dtype={w.dtype}")


@torch.library.register_fake("torch_ext::binary_mean_scaling_quantize")
def _binary_mean_scaling_fake(w):
    _check_weight_fake("binary_mean_scaling_quantize", w)
    return torch.empty_like(w)


@torch.library.register_fake("torch_ext::binary_channel_wise_mean_scaling_quantize")
def _binary_channel_wise_mean_scaling_fake(w):
    _check_weight_fake("binary_channel_wise_mean_scaling_quantize", w)
    if w.dim() == 0:
        raise ValueError(
            "binary_channel_wise_mean_scaling_quantize: w must have an output-channel dim (dim >= 1), "
            "got a 0-dim tensor of shape ()"
        )
    return torch.empty_like(w)
