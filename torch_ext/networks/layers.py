"""The building blocks the network tables name: convolutions with Blueoil's
initialisers, batch norm, space-to-depth, pools and LmResnet's basic block.

Class names here show in ``str(model)`` (and ``_GlobalAveragePool`` is matched
by the deploy converter), so they keep the names they had in ``models.py``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, List, Mapping, Optional

import torch
from torch import nn

from ..quant_conv import QuantConv2d

__all__ = ["SpaceToDepth", "batch_norm", "conv_block", "init_conv", "make_conv", "max_pool"]


def _check_image_input(x: torch.Tensor, multiple: int, name: str) -> None:
    """Refuse anything but ``[N, C, H, W]`` with H and W divisible by ``multiple``, naming the shape.

    Written in what TorchScript compiles, so a scripted model checks too; a
    leaf call under FX tracing (``torch.fx.wrap`` below, and in every module
    that calls it), so the traced graph keeps the check, which then runs on
    real tensors.
    """
    if x.dim() != 4 or x.shape[2] % multiple != 0 or x.shape[3] % multiple != 0:
        shape = "(" + ", ".join([str(d) for d in x.shape]) + ("," if x.dim() == 1 else "") + ")"
        raise ValueError(name + ": expected input [N, C, H, W] with H and W divisible by " + str(multiple)
                         + ", got shape " + shape)


torch.fx.wrap("_check_image_input")


class SpaceToDepth(nn.Module):
    """Rearrange ``[N, C, H, W]`` into ``[N, C*b*b, H/b, W/b]`` in TensorFlow's order.

    Output channel ``(dy * b + dx) * C + c`` holds input ``(c, y*b + dy, x*b + dx)``,
    which is what ``tf.nn.space_to_depth`` computes on NHWC data (Blueoil's
    ``_space_to_depth``). ``torch.nn.functional.pixel_unshuffle`` orders the
    channels differently (``c * b*b + dy * b + dx``); the two differ only by a
    fixed permutation of channels, so either trains equally well, but this one
    keeps the channel layout of Blueoil's weights.

    Args:
        block_size: ``b``; H and W must be divisible by it.
    """

    def __init__(self, block_size: int = 2) -> None:
        super().__init__()
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"SpaceToDepth: block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the rearrangement to a 4-D tensor."""
        b = self.block_size
        _check_image_input(x, b, "SpaceToDepth (block_size=" + str(b) + ")")
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // b, b, w // b, b)
        # -> [n, dy, dx, c, h/b, w/b]: the TF order puts the block offset outermost.
        x = x.permute(0, 3, 5, 1, 2, 4)
        return x.reshape(n, b * b * c, h // b, w // b)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, order=tensorflow"


class _GlobalAveragePool(nn.Module):
    """Average over the whole feature map and reshape to ``[N, C]`` (Blueoil ``pool7_reshape``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def max_pool() -> nn.MaxPool2d:
    """TensorFlow's ``max_pooling2d(pool_size=2, strides=2, padding='SAME')``: ceil mode pools odd edges alone."""
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


def batch_norm(channels: int, momentum: float, eps: float) -> nn.BatchNorm2d:
    """Blueoil's ``batch_norm(decay=d, epsilon=eps)``: PyTorch's momentum is ``1 - d``."""
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


# tf.keras VarianceScaling(distribution="truncated_normal") divides the
# standard deviation by the std of a unit normal truncated to [-2, 2].
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def init_conv(conv: nn.Conv2d, *, init: str = "glorot_uniform", normal_std: float = 0.01) -> None:
    """TensorFlow's conv initialisers, biases zero (so a network starts where Blueoil's does).

    ``init``: ``"glorot_uniform"`` (``tf.layers.conv2d``'s default),
    ``"he_truncated_normal"`` (``VarianceScaling(scale=2.0)``, fan-in, truncated
    at two standard deviations), ``"lecun_truncated_normal"`` (the same with
    ``scale=1.0``: ``tf.variance_scaling_initializer()``'s defaults) or
    ``"normal"`` (N(0, ``normal_std``)).
    """
    if init == "glorot_uniform":
        nn.init.xavier_uniform_(conv.weight)
    elif init in ("he_truncated_normal", "lecun_truncated_normal"):
        fan_in = conv.weight[0].numel()
        scale = 2.0 if init == "he_truncated_normal" else 1.0
        std = (scale / fan_in) ** 0.5 / _TRUNCATED_NORMAL_STD
        nn.init.trunc_normal_(conv.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    elif init == "normal":
        nn.init.normal_(conv.weight, mean=0.0, std=normal_std)
    else:
        raise ValueError(f"init_conv: unknown init={init!r}")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


#: The initialisers :func:`init_conv` knows (the network tables are checked against it).
INITS = ("glorot_uniform", "he_truncated_normal", "lecun_truncated_normal", "normal")


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    bias: bool,
    weight_quantizer: Optional[Callable[..., torch.Tensor]],
    weight_quantizer_kwargs: Optional[Mapping[str, Any]],
    quantize: bool,
    init: str = "glorot_uniform",
) -> nn.Conv2d:
    """A stride-1 'SAME' convolution: QuantConv2d when quantized, else a plain nn.Conv2d.

    A quantizer module instance is copied, so that every convolution learns its own parameters.
    """
    common = dict(kernel_size=kernel_size, stride=1, padding=kernel_size // 2, bias=bias)
    if quantize and weight_quantizer is not None:
        if isinstance(weight_quantizer, nn.Module):
            weight_quantizer = copy.deepcopy(weight_quantizer)
        conv: nn.Conv2d = QuantConv2d(
            in_channels,
            out_channels,
            weight_quantizer=weight_quantizer,
            weight_quantizer_kwargs=weight_quantizer_kwargs,
            **common,
        )
    else:
        conv = nn.Conv2d(in_channels, out_channels, **common)
    init_conv(conv, init=init)
    return conv


def conv_block(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: nn.Module) -> nn.Sequential:
    """Blueoil's ``lmnet_block``: conv (no bias) -> batch norm -> activation, as ``conv``/``bn``/``act``."""
    return nn.Sequential(OrderedDict(conv=conv, bn=bn, act=activation))


class _PadChannels(nn.Module):
    """Zero channels around ``x``: ``before`` in front, ``after`` behind (Blueoil's shortcut ``tf.pad``)."""

    def __init__(self, before: int, after: int) -> None:
        super().__init__()
        self.before, self.after = before, after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x, (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"before={self.before}, after={self.after}"


class _ResnetBasicBlock(nn.Module):
    """LmResnet's pre-activation basic block.

    ``x -> bn1 -> act1 -> [space-to-depth 2] -> conv1 (kxk) -> bn2 -> act2 -> conv2 (kxk)`` (k = 3 in LmResnet),
    plus the shortcut ``x -> [2x2 average pool] -> [zero channels to out_ch]``.
    With stride 2, space-to-depth replaces the strided convolution, so conv1
    sees ``4 * in_ch`` channels. ``activation()``, ``conv(cin, cout, k)`` and
    ``bn(channels)`` make the layers, float or quantized as the network is.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, activation, conv, bn, kernel_size: int = 3) -> None:
        super().__init__()
        self.bn1 = bn(in_ch)
        self.act1 = activation()
        self.pool = SpaceToDepth(2) if stride == 2 else nn.Identity()
        self.conv1 = conv(in_ch * stride * stride, out_ch, kernel_size)
        self.bn2 = bn(out_ch)
        self.act2 = activation()
        self.conv2 = conv(out_ch, out_ch, kernel_size)
        shortcut: List[nn.Module] = []
        if stride == 2:
            shortcut.append(nn.AvgPool2d(2, 2))
        if in_ch != out_ch:
            shortcut.append(_PadChannels((out_ch - in_ch) // 2, (out_ch - in_ch + 1) // 2))
        self.shortcut = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(x))
        y = self.conv1(self.pool(y))
        y = self.conv2(self.act2(self.bn2(y)))
        return self.shortcut(x) + y
