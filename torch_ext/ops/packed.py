"""Bit-packed W1A2 inference (csrc/torch_ext/packed.h, docs/deploy.md): Python API and fake kernels.

Codes of 1..4 bits are packed as bit-planes, 64 channels a word: a packed
tensor is int64 ``[N, H, W, bit, words]``, ``words = ceil(C / 64)``, and a
packed binary weight int64 ``[O, kh, kw, words]``. ``torch_ext.deploy``
builds its stages on these operators (its TorchScript calls them directly).

The fake kernels make the checks of the CPU kernels that a fake tensor
allows (shapes, dtypes); the value checks (code range, weight padding bits,
threshold order) need data.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _C

__all__ = [
    "pack_binary_weights",
    "pack_codes",
    "packed_conv2d",
    "packed_conv2d_affine",
    "packed_conv2d_threshold",
    "packed_space_to_depth",
    "quantize_pack_codes",
    "unpack_codes",
]


# --------------------------------------------------------------------------
# The functional API.


def pack_codes(codes: torch.Tensor, bit: int) -> torch.Tensor:
    """uint8 codes ``[N, C, H, W]`` in ``0..2**bit - 1`` (``bit`` 1..4) as int64 ``[N, H, W, bit, words]``."""
    return torch.ops.torch_ext.pack_codes(codes, bit)


def quantize_pack_codes(x: torch.Tensor, bit: int, max_value: float) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` to packed codes in one pass (:func:`torch_ext.quantize_to_codes`' steps)."""
    return torch.ops.torch_ext.quantize_pack_codes(x, bit, max_value)


def unpack_codes(packed: torch.Tensor, channels: int) -> torch.Tensor:
    """Packed codes back to uint8 ``[N, channels, H, W]``: the inverse of :func:`pack_codes`."""
    return torch.ops.torch_ext.unpack_codes(packed, channels)


def pack_binary_weights(weight: torch.Tensor) -> torch.Tensor:
    """The signs of a floating conv weight ``[O, I, kh, kw]`` (``w >= 0`` is +1) as int64 ``[O, kh, kw, words]``."""
    return torch.ops.torch_ext.pack_binary_weights(weight)


def packed_space_to_depth(packed: torch.Tensor, channels: int, block: int) -> torch.Tensor:
    """Space-to-depth on packed codes, in TensorFlow's channel order: ``channels -> channels * block**2``."""
    return torch.ops.torch_ext.packed_space_to_depth(packed, channels, block)


def packed_conv2d(
    x: torch.Tensor, w: torch.Tensor, in_channels: int, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """Binary convolution of packed codes: the int32 accumulators ``[N, O, Ho, Wo]`` (``sum(code * sign)``)."""
    return torch.ops.torch_ext.packed_conv2d(x, w, in_channels, list(stride), list(padding))


def packed_conv2d_affine(
    x: torch.Tensor,
    w: torch.Tensor,
    in_channels: int,
    stride: Sequence[int],
    padding: Sequence[int],
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """:func:`packed_conv2d` then ``acc * scale[o] + bias[o]`` (float32 ``[O]`` each): float32 ``[N, O, Ho, Wo]``."""
    return torch.ops.torch_ext.packed_conv2d_affine(x, w, in_channels, list(stride), list(padding), scale, bias)


def packed_conv2d_threshold(
    x: torch.Tensor,
    w: torch.Tensor,
    in_channels: int,
    stride: Sequence[int],
    padding: Sequence[int],
    thresholds: torch.Tensor,
    direction: torch.Tensor,
    out_bit: int,
) -> torch.Tensor:
    """:func:`packed_conv2d` then the output codes as packed codes of ``out_bit`` bits.

    The code of channel ``o`` is the number of ``k`` with
    ``direction[o] * acc >= thresholds[o, k]`` (int32 ``[O, 2**out_bit - 1]``
    and ``[O]``, as :func:`torch_ext.deploy.fold_thresholds` makes them).
    """
    return torch.ops.torch_ext.packed_conv2d_threshold(
        x, w, in_channels, list(stride), list(padding), thresholds, direction, out_bit)


# --------------------------------------------------------------------------
# Fake kernels.


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
    _C.check_max_value(max_value, torch.float32, "quantize_pack_codes")
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
