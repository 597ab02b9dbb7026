"""The stages a :class:`~torch_ext.deploy.DeployedModel` runs, one after the other.

Every stage maps one tensor to one tensor, so that the whole model scripts
with ``torch.jit.script`` (the loop over an ``nn.ModuleList`` is unrolled).
Between stages a tensor is either float32 NCHW (float work) or int64 packed
codes ``[N, H, W, bit, words]`` (csrc/torch_ext/packed.h, docs/deploy.md).

A stage whose output is the code of one of the source model's
``QuantActivation`` modules has that module's name in ``key`` and gives the
uint8 NCHW codes from its output with :meth:`codes_of`; the others have
``key == ""``.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..reference import levels_above_zero


class Stage(nn.Module):
    """Base of the stages: ``key`` and :meth:`codes_of`."""

    def __init__(self, key: str = "", channels: int = 0) -> None:
        super().__init__()
        self.key = key
        self.channels = channels

    def codes_of(self, y: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` codes of this stage's packed output ``y``."""
        return torch.ops.torch_ext.unpack_codes(y, self.channels)


class FloatStage(Stage):
    """Float PyTorch modules, run as they are (float32 in, float32 out)."""

    def __init__(self, modules: List[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GlobalAveragePool(nn.Module):
    """``x.mean(dim=(2, 3))``: ``[N, C, H, W] -> [N, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class FloatSpaceToDepth(nn.Module):
    """Space-to-depth in TensorFlow's channel order on float tensors (as ``torch_ext.models.SpaceToDepth``)."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        n, c, h, w = x.shape
        if h % b != 0 or w % b != 0:
            raise ValueError(
                "SpaceToDepth: height and width must be divisible by block_size=" + str(b) + ", got input shape "
                + str(x.shape)
            )
        x = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return x.reshape(n, b * b * c, h // b, w // b)


class QuantizeStage(Stage):
    """Float -> packed codes: ``quantize_to_codes(x, bit, max_value)`` (docs/quantizer.md), then packing.

    ``torch.ops.torch_ext.quantize_pack_codes`` computes each code with the
    steps of :func:`torch_ext.quantize_to_codes` for float32 input, each one
    rounded in float32, so the codes are the same.
    """

    def __init__(self, key: str, channels: int, bit: int, max_value: float) -> None:
        super().__init__(key, channels)
        self.bit = bit
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_ext.quantize_pack_codes(x, self.bit, self.max_value)


class CodesToFloatStage(Stage):
    """Packed codes -> float32 values ``(k / n) * m`` (as :func:`torch_ext.codes_to_values`)."""

    def __init__(self, channels: int, bit: int, max_value: float) -> None:
        super().__init__("", channels)
        self.register_buffer("m", torch.tensor(max_value, dtype=torch.float32))
        self.register_buffer("n", torch.tensor(levels_above_zero(bit), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.ops.torch_ext.unpack_codes(x, self.channels)
        # reference.dequantize's (k / n) * m, written out: TorchScript cannot take its steps object.
        return torch.mul(torch.div(codes.to(torch.float32), self.n), self.m)


class PackedSpaceToDepthStage(Stage):
    """Space-to-depth on packed codes (channels ``C -> C * block^2``)."""

    def __init__(self, channels: int, block: int) -> None:
        super().__init__("", channels)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_ext.packed_space_to_depth(x, self.channels, self.block)


class PackedConvThresholdStage(Stage):
    """Packed codes -> packed codes: binary convolution with folded batch norm and quantizer."""

    def __init__(self, key: str, in_channels: int, out_channels: int, weight: torch.Tensor, stride: List[int],
                 padding: List[int], thresholds: torch.Tensor, direction: torch.Tensor, out_bit: int) -> None:
        super().__init__(key, out_channels)
        self.in_channels = in_channels
        self.stride = stride
        self.padding = padding
        self.out_bit = out_bit
        self.register_buffer("weight", weight)
        self.register_buffer("thresholds", thresholds)
        self.register_buffer("direction", direction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_ext.packed_conv2d_threshold(
            x, self.weight, self.in_channels, self.stride, self.padding, self.thresholds, self.direction,
            self.out_bit)


class PackedConvAffineStage(Stage):
    """Packed codes -> float32: binary convolution, ``acc * scale[c] + bias[c]`` (conv bias and batch norm folded)."""

    def __init__(self, in_channels: int, out_channels: int, weight: torch.Tensor, stride: List[int],
                 padding: List[int], scale: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__("", out_channels)
        self.in_channels = in_channels
        self.stride = stride
        self.padding = padding
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_ext.packed_conv2d_affine(
            x, self.weight, self.in_channels, self.stride, self.padding, self.scale, self.bias)
