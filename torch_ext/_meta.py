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


# --------------------------------------------------------------------------
# Bit-packed inference (csrc/torch_ext/packed.h, docs/deploy.md). The checks
# are those of the CPU kernels that a fake tensor allows (shapes, dtypes);
# the value checks (code range, weight padding bits, threshold order) need data.


def _packed_words(channels: int) -> int:
    return (channels + 63) // 64


def _check_packed(op: str, name: str, t: torch.Tensor, channels: int) -> None:
    torch._check(channels >= 1, lambda: f"{op}: channels must be >= 1, got {channels}")
    torch._check(t.dtype == torch.int64, lambda: f"{op}: {name} must be an int64 tensor of packed codes, got {t.dtype}")
    torch._check(t.dim() == 5, lambda: f"{op}: {name} must have shape [N, H, W, bit, words], got {list(t.shape)}")
    torch._check(1 <= t.shape[3] <= 4, lambda: f"{op}: {name} must have 1..4 bit-planes (dim 3), got {list(t.shape)}")
    torch._check(
        t.shape[4] == _packed_words(channels),
        lambda: f"{op}: {name} holds {t.shape[4]} words a bit-plane but {channels} channels need "
        f"{_packed_words(channels)}",
    )


@torch.library.register_fake("torch_ext::pack_codes")
def _pack_codes_fake(codes, bit):
    torch._check(1 <= bit <= 4, lambda: f"pack_codes: bit must be in 1..4, got bit={bit}")
    torch._check(codes.dtype == torch.uint8, lambda: f"pack_codes: codes must be a uint8 tensor, got {codes.dtype}")
    torch._check(codes.dim() == 4 and codes.shape[1] >= 1, lambda: f"pack_codes: codes must be [N, C, H, W]")
    n, c, h, w = codes.shape
    return codes.new_empty((n, h, w, bit, _packed_words(c)), dtype=torch.int64)


@torch.library.register_fake("torch_ext::quantize_pack_codes")
def _quantize_pack_codes_fake(x, bit, max_value):
    torch._check(1 <= bit <= 4, lambda: f"quantize_pack_codes: bit must be in 1..4, got bit={bit}")
    torch._check(x.dtype == torch.float32, lambda: f"quantize_pack_codes: x must be float32, got {x.dtype}")
    torch._check(x.dim() == 4 and x.shape[1] >= 1, lambda: "quantize_pack_codes: x must be [N, C, H, W]")
    n, c, h, w = x.shape
    return x.new_empty((n, h, w, bit, _packed_words(c)), dtype=torch.int64)


@torch.library.register_fake("torch_ext::unpack_codes")
def _unpack_codes_fake(packed, channels):
    _check_packed("unpack_codes", "packed", packed, channels)
    n, h, w = packed.shape[:3]
    return packed.new_empty((n, channels, h, w), dtype=torch.uint8)


@torch.library.register_fake("torch_ext::pack_binary_weights")
def _pack_binary_weights_fake(weight):
    torch._check(weight.is_floating_point(), lambda: f"pack_binary_weights: weight must be floating, got {weight.dtype}")
    torch._check(weight.dim() == 4, lambda: f"pack_binary_weights: weight must be [O, I, kh, kw]")
    o, i, kh, kw = weight.shape
    return weight.new_empty((o, kh, kw, _packed_words(i)), dtype=torch.int64)


@torch.library.register_fake("torch_ext::packed_space_to_depth")
def _packed_space_to_depth_fake(packed, channels, block):
    _check_packed("packed_space_to_depth", "packed", packed, channels)
    torch._check(block >= 1, lambda: f"packed_space_to_depth: block must be >= 1, got block={block}")
    n, h, w, bit = packed.shape[:4]
    torch._check(h % block == 0 and w % block == 0, lambda: "packed_space_to_depth: H and W must divide by block")
    return packed.new_empty((n, h // block, w // block, bit, _packed_words(channels * block * block)))


def _conv_shape(op, x, w, in_channels, stride, padding):
    _check_packed(op, "x", x, in_channels)
    torch._check(w.dtype == torch.int64 and w.dim() == 4, lambda: f"{op}: w must be int64 [O, kh, kw, words]")
    torch._check(w.shape[3] == _packed_words(in_channels), lambda: f"{op}: w's words do not match in_channels")
    torch._check(len(stride) == 2 and min(stride) >= 1, lambda: f"{op}: stride must be two ints >= 1")
    torch._check(len(padding) == 2 and min(padding) >= 0, lambda: f"{op}: padding must be two ints >= 0")
    n, h, wd = x.shape[:3]
    o, kh, kw = w.shape[:3]
    torch._check(h + 2 * padding[0] >= kh and wd + 2 * padding[1] >= kw, lambda: f"{op}: kernel larger than input")
    return n, o, (h + 2 * padding[0] - kh) // stride[0] + 1, (wd + 2 * padding[1] - kw) // stride[1] + 1


@torch.library.register_fake("torch_ext::packed_conv2d")
def _packed_conv2d_fake(x, w, in_channels, stride, padding):
    return x.new_empty(_conv_shape("packed_conv2d", x, w, in_channels, stride, padding), dtype=torch.int32)


@torch.library.register_fake("torch_ext::packed_conv2d_affine")
def _packed_conv2d_affine_fake(x, w, in_channels, stride, padding, scale, bias):
    shape = _conv_shape("packed_conv2d_affine", x, w, in_channels, stride, padding)
    for name, t in (("scale", scale), ("bias", bias)):
        torch._check(t.dtype == torch.float32 and t.dim() == 1 and t.shape[0] == shape[1],
                     lambda: f"packed_conv2d_affine: {name} must be float32 [{shape[1]}]")
    return x.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("torch_ext::packed_conv2d_threshold")
def _packed_conv2d_threshold_fake(x, w, in_channels, stride, padding, thresholds, direction, out_bit):
    n, o, ho, wo = _conv_shape("packed_conv2d_threshold", x, w, in_channels, stride, padding)
    torch._check(1 <= out_bit <= 4, lambda: f"packed_conv2d_threshold: out_bit must be in 1..4, got out_bit={out_bit}")
    torch._check(thresholds.dtype == torch.int32 and list(thresholds.shape) == [o, 2**out_bit - 1],
                 lambda: f"packed_conv2d_threshold: thresholds must be int32 [{o}, {2**out_bit - 1}]")
    torch._check(direction.dtype == torch.int32 and list(direction.shape) == [o],
                 lambda: f"packed_conv2d_threshold: direction must be int32 [{o}]")
    return x.new_empty((n, ho, wo, out_bit, _packed_words(o)), dtype=torch.int64)

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
