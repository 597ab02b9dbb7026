"""Blueoil's classification networks, in float and quantized form.

* :class:`LmnetV1` / :class:`LmnetV1Quantize`: Blueoil's LMNet v1
  (``blueoil/networks/classification/lmnet_v1.py``).
* :class:`Lmnet` / :class:`LmnetQuantize`: Blueoil's ``Lmnet`` /
  ``LmnetQuantize`` (``classification/lmnet_quantize``), which Blueoil defines
  as aliases of LMNet v1; so are these.
* :class:`LmnetV0` / :class:`LmnetV0Quantize`: LMNet v0
  (``classification/lmnet_v0.py``): max pooling instead of space-to-depth.
* :class:`LmResnet` / :class:`LmResnetQuantize`: Blueoil's ResNet-18 variant
  (``classification/lm_resnet.py``): pre-activation blocks, space-to-depth
  before the stride-2 convolutions.
* :class:`Darknet` / :class:`DarknetQuantize`: Darknet-19
  (``classification/darknet.py``).
* :class:`SampleNetwork` / :class:`SampleNetworkQuantize`: Blueoil's quantize
  example (``blueoil/networks/classification/quantize_example.py``).

docs/blueoil.md lists every Blueoil quantizer and network with its torch_ext name.

The quantized networks are built from :class:`torch_ext.QuantConv2d` and
:class:`torch_ext.QuantActivation` modules, so every quantizer can be found
with ``model.modules()``. Convolutions that are *not* quantized (the first and
last ones when ``quantize_first_convolution`` / ``quantize_last_convolution``
are False, and all of them in the float networks) are plain ``nn.Conv2d``.

Translation notes from Blueoil's TensorFlow code:

* Batch norm ``decay=0.99, epsilon=1e-3`` is ``nn.BatchNorm2d(momentum=0.01,
  eps=1e-3)`` (PyTorch's momentum is the weight of the *new* batch);
  LmResnet's ``decay=0.997`` is ``momentum=0.003``.
* Convolution kernels are initialised as in Blueoil: ``tf.layers.conv2d``'s
  default (Glorot uniform) in LMNet, He truncated normal
  (``VarianceScaling(scale=2.0)``) in the sample network's ``block_1``, and
  N(0, 0.01) in the last 1x1 convolution; Darknet's blocks use TF1's
  ``tf.variance_scaling_initializer()`` defaults (scale 1, fan-in, truncated
  normal: LeCun truncated normal); biases zero.
* TensorFlow's ``max_pooling2d(2, 2, padding='SAME')`` is
  ``nn.MaxPool2d(2, 2, ceil_mode=True)`` (the same windows, odd sizes included).
* Each quantized convolution gets its own weight quantizer: a quantizer with
  learned parameters (TTQ) is instantiated once per convolution, as Blueoil
  creates one ``positive``/``negative`` pair per kernel.
* ``padding='SAME'`` with stride 1 and odd kernels is ``padding=k // 2``.
* Space-to-depth uses TensorFlow's channel order (see :class:`SpaceToDepth`).
* Inputs are NCHW; the models also accept ``channels_last`` tensors.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .modules import QuantActivation
from .quant_conv import QuantConv2d
from .weight_quantization import (
    TTQWeightQuantizer,
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    twn_weight_quantize,
)

__all__ = [
    "WEIGHT_QUANTIZERS",
    "get_model",
    "get_model_builder",
    "list_models",
    "SpaceToDepth",
    "SampleNetwork",
    "SampleNetworkQuantize",
    "LmnetV1",
    "LmnetV1Quantize",
    "Lmnet",
    "LmnetQuantize",
    "LmnetV0",
    "LmnetV0Quantize",
    "LmResnet",
    "LmResnetQuantize",
    "Darknet",
    "DarknetQuantize",
    "WEIGHT_QUANTIZER_ALIASES",
]

# Blueoil's batch norm: tf.contrib.layers.batch_norm(decay=0.99, epsilon=1e-3).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
# Blueoil's default activation quantizer settings (W1A2 networks).
DEFAULT_ACTIVATION_QUANTIZER_KWARGS = {"bit": 2, "max_value": 2.0}
#: Short names of :data:`WEIGHT_QUANTIZERS` (the training command's
#: ``--weight-quantizer binary|binary-channel-wise|ttq|twn``) -> full names.
WEIGHT_QUANTIZER_ALIASES: Mapping[str, str] = {
    "binary": "binary_mean_scaling",
    "binary-channel-wise": "binary_channel_wise_mean_scaling",
}
_CANONICAL_WEIGHT_QUANTIZERS: Dict[str, Any] = {
    "binary_mean_scaling": binary_mean_scaling_quantize,
    "binary_channel_wise_mean_scaling": binary_channel_wise_mean_scaling_quantize,
    # A class: each quantized convolution builds its own instance (its own learned scales).
    "ttq": TTQWeightQuantizer,
    "twn": twn_weight_quantize,
}
#: Blueoil's weight quantizers by name (full names and the short aliases): the
#: quantized models' ``weight_quantizer`` takes one of these names, any
#: callable ``w -> quantized w``, an ``nn.Module`` quantizer or its class.
WEIGHT_QUANTIZERS: Mapping[str, Any] = {
    **_CANONICAL_WEIGHT_QUANTIZERS,
    **{alias: _CANONICAL_WEIGHT_QUANTIZERS[name] for alias, name in WEIGHT_QUANTIZER_ALIASES.items()},
}


def _check_image_input(x: torch.Tensor, multiple: int, name: str) -> None:
    """Refuse anything but ``[N, C, H, W]`` with H and W divisible by ``multiple``, naming the shape.

    Written in what TorchScript compiles, so a scripted model checks too; a
    leaf call under FX tracing (``torch.fx.wrap`` below), so the traced graph
    keeps the check, which then runs on real tensors.
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


# tf.keras VarianceScaling(distribution="truncated_normal") divides the
# standard deviation by the std of a unit normal truncated to [-2, 2].
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def _init_conv(conv: nn.Conv2d, *, init: str = "glorot_uniform", normal_std: float = 0.01) -> None:
    """TensorFlow's conv initialisers, biases zero.

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
        raise ValueError(f"_init_conv: unknown init={init!r}")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _make_conv(
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
    """A stride-1 'SAME' convolution: QuantConv2d when quantized, else nn.Conv2d.

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
    _init_conv(conv, init=init)
    return conv


def _conv_block(conv: nn.Conv2d, activation: nn.Module) -> nn.Sequential:
    """Blueoil's ``lmnet_block``: conv (no bias) -> batch norm -> activation."""
    return nn.Sequential(
        OrderedDict(
            conv=conv,
            bn=nn.BatchNorm2d(conv.out_channels, eps=BN_EPS, momentum=BN_MOMENTUM),
            act=activation,
        )
    )


def _check_num_classes(cls_name: str, num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{cls_name}: num_classes must be a positive int, got {num_classes!r}")


def _check_in_channels(cls_name: str, in_channels: int) -> None:
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"{cls_name}: in_channels must be a positive int, got {in_channels!r}")


class _QuantizerConfig:
    """Validated activation/weight quantizer settings shared by the quantized models."""

    def __init__(
        self,
        cls_name: str,
        activation_quantizer: Callable[..., nn.Module],
        activation_quantizer_kwargs: Optional[Mapping[str, Any]],
        weight_quantizer: Optional[Callable[..., torch.Tensor]],
        weight_quantizer_kwargs: Optional[Mapping[str, Any]],
    ) -> None:
        if not callable(activation_quantizer):
            raise TypeError(
                f"{cls_name}: activation_quantizer must be a callable returning an nn.Module, "
                f"got {activation_quantizer!r}"
            )
        if isinstance(weight_quantizer, str):
            if weight_quantizer not in WEIGHT_QUANTIZERS:
                raise ValueError(
                    f"{cls_name}: weight_quantizer={weight_quantizer!r} is unknown; "
                    f"choose one of {sorted(WEIGHT_QUANTIZERS)} or pass a callable"
                )
            weight_quantizer = WEIGHT_QUANTIZERS[weight_quantizer]
        if weight_quantizer is not None and not callable(weight_quantizer):
            raise TypeError(f"{cls_name}: weight_quantizer must be callable or None, got {weight_quantizer!r}")
        self.cls_name = cls_name
        self.activation_quantizer = activation_quantizer
        self.activation_quantizer_kwargs = dict(
            DEFAULT_ACTIVATION_QUANTIZER_KWARGS if activation_quantizer_kwargs is None else activation_quantizer_kwargs
        )
        self.weight_quantizer = weight_quantizer
        self.weight_quantizer_kwargs = dict(weight_quantizer_kwargs or {})

    def activation(self) -> nn.Module:
        """A fresh activation quantizer module (one per layer, so each can be inspected)."""
        module = self.activation_quantizer(**self.activation_quantizer_kwargs)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{self.cls_name}: activation_quantizer must return an nn.Module, "
                f"got {type(module).__name__} from {self.activation_quantizer!r}"
            )
        return module


def _init_quantized(model: nn.Module, num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                    weight_quantizer, weight_quantizer_kwargs, quantize_first, quantize_last, **build_kwargs) -> None:
    """The constructor the quantized networks share: check, store the flags, build the layers."""
    nn.Module.__init__(model)
    name = type(model).__name__
    _check_num_classes(name, num_classes)
    _check_in_channels(name, in_channels)
    quant = _QuantizerConfig(
        name, activation_quantizer, activation_quantizer_kwargs, weight_quantizer, weight_quantizer_kwargs
    )
    model.num_classes = num_classes
    model.quantize_first_convolution = bool(quantize_first)
    model.quantize_last_convolution = bool(quantize_last)
    model._build(in_channels, *build_kwargs.values(), activation=quant.activation, quant=quant,
                 quantize_first=model.quantize_first_convolution, quantize_last=model.quantize_last_convolution)


class _GlobalAveragePool(nn.Module):
    """Average over the whole feature map and reshape to ``[N, C]`` (Blueoil ``pool7_reshape``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class SampleNetwork(nn.Module):
    """Blueoil's float sample network.

    ``block_1``: 3x3 conv (32 filters, no bias) -> batch norm -> leaky ReLU(0.1);
    ``block_last``: 1x1 conv to ``num_classes`` (bias, weights N(0, 0.01));
    global average pool -> ``[N, num_classes]``.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image (3 for RGB, 1 for grey).
    """

    input_size_multiple = 1

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_num_classes(type(self).__name__, num_classes)
        _check_in_channels(type(self).__name__, in_channels)
        self.num_classes = num_classes
        self._build(in_channels, activation=lambda: nn.LeakyReLU(0.1), quant=None, quantize_first=False,
                    quantize_last=False)

    def _build(self, in_channels, *, activation, quant, quantize_first, quantize_last) -> None:
        wq = quant.weight_quantizer if quant is not None else None
        wq_kwargs = quant.weight_quantizer_kwargs if quant is not None else None
        self.block_1 = _conv_block(
            _make_conv(in_channels, 32, 3, bias=False, weight_quantizer=wq, weight_quantizer_kwargs=wq_kwargs,
                       quantize=quantize_first, init="he_truncated_normal"),
            activation(),
        )
        self.block_last = _make_conv(
            32, self.num_classes, 1, bias=True, weight_quantizer=wq, weight_quantizer_kwargs=wq_kwargs,
            quantize=quantize_last, init="normal",
        )
        self.pool = _GlobalAveragePool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]``."""
        return self.pool(self.block_last(self.block_1(x)))


class SampleNetworkQuantize(SampleNetwork):
    """Blueoil's quantized sample network (``SampleNetworkQuantize``).

    As :class:`SampleNetwork`, with the activation quantizer in place of leaky ReLU
    and quantized convolution weights.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image.
        activation_quantizer: callable returning an activation ``nn.Module``
            (default :class:`torch_ext.QuantActivation`).
        activation_quantizer_kwargs: its kwargs (default ``{"bit": 2, "max_value": 2.0}``).
        weight_quantizer: weight quantizer for the convolutions: a callable or a
            name in :data:`WEIGHT_QUANTIZERS` (default
            :func:`torch_ext.binary_mean_scaling_quantize`; None: float weights).
        weight_quantizer_kwargs: its kwargs (default none).
        quantize_first_convolution: quantize ``block_1``'s weight (Blueoil default True).
        quantize_last_convolution: quantize ``block_last``'s weight (Blueoil default True).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        activation_quantizer: Callable[..., nn.Module] = QuantActivation,
        activation_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = binary_mean_scaling_quantize,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = True,
        quantize_last_convolution: bool = True,
    ) -> None:
        _init_quantized(self, num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                        weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                        quantize_last_convolution)


class LmnetV1(nn.Module):
    """Blueoil's float LMNet v1 classifier.

    ========  =========================================================
    conv1     3x3 conv, 32, no bias -> BN -> ReLU
    conv2     3x3 conv, 64 -> BN -> ReLU
    pool2     space-to-depth 2
    conv3     3x3 conv, 128 -> BN -> ReLU
    conv4     3x3 conv, 64 -> BN -> ReLU
    pool4     space-to-depth 2
    conv5     3x3 conv, 128 -> BN -> ReLU
    pool5     space-to-depth 2
    conv6     1x1 conv, 64 -> BN -> ReLU
    dropout   p = 0.5 (``tf.layers.dropout`` default rate)
    conv7     1x1 conv to num_classes, bias, weights N(0, 0.01)
    pool7     global average pool -> ``[N, num_classes]``
    ========  =========================================================

    Input height and width must be divisible by 8 (three space-to-depth steps).

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image (3 for RGB, 1 for grey).
        dropout: dropout probability before conv7.
    """

    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple = 8

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        _check_num_classes(type(self).__name__, num_classes)
        _check_in_channels(type(self).__name__, in_channels)
        self.num_classes = num_classes
        self._build(
            in_channels,
            dropout,
            activation=lambda: nn.ReLU(),
            quant=None,
            quantize_first=False,
            quantize_last=False,
        )

    def _build(self, in_channels, dropout, *, activation, quant, quantize_first, quantize_last) -> None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        wq = quant.weight_quantizer if quant is not None else None
        wq_kwargs = quant.weight_quantizer_kwargs if quant is not None else None

        def conv(cin, cout, k, *, quantize=True, bias=False, init="glorot_uniform"):
            return _make_conv(cin, cout, k, bias=bias, weight_quantizer=wq, weight_quantizer_kwargs=wq_kwargs,
                              quantize=quantize and quant is not None, init=init)

        self.conv1 = _conv_block(conv(in_channels, 32, 3, quantize=quantize_first), activation())
        self.conv2 = _conv_block(conv(32, 64, 3), activation())
        self.pool2 = SpaceToDepth(2)
        self.conv3 = _conv_block(conv(256, 128, 3), activation())
        self.conv4 = _conv_block(conv(128, 64, 3), activation())
        self.pool4 = SpaceToDepth(2)
        self.conv5 = _conv_block(conv(256, 128, 3), activation())
        self.pool5 = SpaceToDepth(2)
        # Blueoil gives conv6 a plain ReLU, in the quantized network too.
        self.conv6 = _conv_block(conv(512, 64, 1), nn.ReLU())
        self.dropout = nn.Dropout(float(dropout))
        self.conv7 = conv(64, self.num_classes, 1, quantize=quantize_last, bias=True, init="normal")
        self.pool7 = _GlobalAveragePool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]`` (H, W divisible by 8)."""
        # TorchScript has no type(self).__name__ (and compiles only the branch it takes).
        name = "the model" if torch.jit.is_scripting() else type(self).__name__
        _check_image_input(x, 8, name)
        x = self.conv1(x)
        x = self.pool2(self.conv2(x))
        x = self.conv3(x)
        x = self.pool4(self.conv4(x))
        x = self.pool5(self.conv5(x))
        x = self.dropout(self.conv6(x))
        return self.pool7(self.conv7(x))


class LmnetV1Quantize(LmnetV1):
    """Blueoil's quantized LMNet v1 (``LmnetV1Quantize``).

    As :class:`LmnetV1`, with the activation quantizer in place of ReLU
    in conv1..conv5 (conv6 keeps its ReLU, as in Blueoil) and binary weights in
    conv1..conv6. conv7, the classifier, keeps float weights by default, as in
    Blueoil (its quantizing variable getter covers conv1..conv6 only);
    ``quantize_last_convolution=True`` quantizes it too, and
    ``quantize_first_convolution=False`` keeps conv1 float.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image.
        activation_quantizer: callable returning an activation ``nn.Module``
            (default :class:`torch_ext.QuantActivation`).
        activation_quantizer_kwargs: its kwargs (default ``{"bit": 2, "max_value": 2.0}``).
        weight_quantizer: weight quantizer for the convolutions: a callable or a
            name in :data:`WEIGHT_QUANTIZERS` (default
            :func:`torch_ext.binary_mean_scaling_quantize`; None: float weights).
        weight_quantizer_kwargs: its kwargs (default none).
        quantize_first_convolution: quantize conv1's weight (Blueoil default True).
        quantize_last_convolution: quantize conv7's weight (default False: float, as Blueoil).
        dropout: dropout probability before conv7.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        activation_quantizer: Callable[..., nn.Module] = QuantActivation,
        activation_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = binary_mean_scaling_quantize,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = True,
        quantize_last_convolution: bool = False,
        dropout: float = 0.5,
    ) -> None:
        _init_quantized(self, num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                        weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                        quantize_last_convolution, dropout=dropout)


#: Blueoil's ``Lmnet`` and ``LmnetQuantize`` (``classification/lmnet`` and
#: ``classification/lmnet_quantize``) are its LMNet v1 under another name.
Lmnet = LmnetV1
LmnetQuantize = LmnetV1Quantize


def _max_pool() -> nn.MaxPool2d:
    """TensorFlow's ``max_pooling2d(pool_size=2, strides=2, padding='SAME')``."""
    return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


def _weight_quantizer_of(quant):
    if quant is None:
        return None, None
    return quant.weight_quantizer, quant.weight_quantizer_kwargs


class LmnetV0(nn.Module):
    """Blueoil's float LMNet v0 classifier (``classification/lmnet_v0.py``).

    ========  =========================================================
    conv1     3x3 conv, 32, no bias -> BN -> ReLU;    pool1: 2x2 max pool
    conv2     3x3 conv, 64 -> BN -> ReLU;             pool2: 2x2 max pool
    conv3     3x3 conv, 128 -> BN -> ReLU;            pool3: 2x2 max pool
    conv4     3x3 conv, 256 -> BN -> ReLU;            pool4: 2x2 max pool
    conv5     3x3 conv, 256 -> BN -> ReLU;            pool5: 2x2 max pool
    conv6     1x1 conv, 64 -> BN -> ReLU
    dropout   p = 0.5
    conv7     1x1 conv to num_classes, bias, weights N(0, 0.01)
    pool7     global average pool -> ``[N, num_classes]``
    ========  =========================================================

    The max pools are TensorFlow's 'SAME' pools (``ceil_mode=True``), so any
    input size works (a 1x1 map stays 1x1).

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image.
        dropout: dropout probability before conv7.
    """

    input_size_multiple = 1

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        _check_num_classes(type(self).__name__, num_classes)
        _check_in_channels(type(self).__name__, in_channels)
        self.num_classes = num_classes
        self._build(in_channels, dropout, activation=lambda: nn.ReLU(), quant=None, quantize_first=False,
                    quantize_last=False)

    def _build(self, in_channels, dropout, *, activation, quant, quantize_first, quantize_last) -> None:
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        wq, wq_kwargs = _weight_quantizer_of(quant)

        def conv(cin, cout, k, *, quantize=True, bias=False, init="glorot_uniform"):
            return _make_conv(cin, cout, k, bias=bias, weight_quantizer=wq, weight_quantizer_kwargs=wq_kwargs,
                              quantize=quantize and quant is not None, init=init)

        self.conv1 = _conv_block(conv(in_channels, 32, 3, quantize=quantize_first), activation())
        self.pool1 = _max_pool()
        self.conv2 = _conv_block(conv(32, 64, 3), activation())
        self.pool2 = _max_pool()
        self.conv3 = _conv_block(conv(64, 128, 3), activation())
        self.pool3 = _max_pool()
        self.conv4 = _conv_block(conv(128, 256, 3), activation())
        self.pool4 = _max_pool()
        self.conv5 = _conv_block(conv(256, 256, 3), activation())
        self.pool5 = _max_pool()
        # conv6 keeps a plain ReLU in the quantized network too, as in Blueoil.
        self.conv6 = _conv_block(conv(256, 64, 1), nn.ReLU())
        self.dropout = nn.Dropout(float(dropout))
        self.conv7 = conv(64, self.num_classes, 1, quantize=quantize_last, bias=True, init="normal")
        self.pool7 = _GlobalAveragePool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]``."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        x = self.pool4(self.conv4(x))
        x = self.pool5(self.conv5(x))
        x = self.dropout(self.conv6(x))
        return self.pool7(self.conv7(x))


class LmnetV0Quantize(LmnetV0):
    """Blueoil's quantized LMNet v0 (``LmnetV0Quantize``).

    As :class:`LmnetV0`, with the activation quantizer in place of ReLU in
    conv1..conv5 (conv6 keeps its ReLU) and quantized weights in conv1..conv6;
    conv7 keeps float weights by default, as in Blueoil (its quantizing
    variable getter covers the ``lmnet_block`` s, conv1..conv6, only).
    Blueoil has no flags here; ``quantize_first_convolution=False`` keeps
    conv1 float and ``quantize_last_convolution=True`` quantizes conv7.

    Args:
        num_classes, in_channels, dropout: as :class:`LmnetV0`.
        activation_quantizer: callable returning an activation ``nn.Module``
            (default :class:`torch_ext.QuantActivation`).
        activation_quantizer_kwargs: its kwargs (default ``{"bit": 2, "max_value": 2.0}``).
        weight_quantizer: a name in :data:`WEIGHT_QUANTIZERS`, a callable, an
            ``nn.Module`` quantizer or its class (default
            :func:`torch_ext.binary_mean_scaling_quantize`; None: float weights).
        weight_quantizer_kwargs: its kwargs (default none).
        quantize_first_convolution: quantize conv1's weight (default True, as Blueoil).
        quantize_last_convolution: quantize conv7's weight (default False, as Blueoil).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        activation_quantizer: Callable[..., nn.Module] = QuantActivation,
        activation_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = binary_mean_scaling_quantize,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = True,
        quantize_last_convolution: bool = False,
        dropout: float = 0.5,
    ) -> None:
        _init_quantized(self, num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                        weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                        quantize_last_convolution, dropout=dropout)


# Blueoil's LmResnet batch norm: tf.contrib.layers.batch_norm(decay=0.997), epsilon 1e-3.
RESNET_BN_MOMENTUM = 0.003


def _resnet_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=RESNET_BN_MOMENTUM)


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

    ``x -> bn1 -> act1 -> [space-to-depth 2] -> conv1 (3x3) -> bn2 -> act2 -> conv2 (3x3)``,
    plus the shortcut ``x -> [2x2 average pool] -> [zero channels to out_ch]``.
    With stride 2, space-to-depth replaces the strided convolution, so conv1
    sees ``4 * in_ch`` channels.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, activation, conv) -> None:
        super().__init__()
        self.bn1 = _resnet_bn(in_ch)
        self.act1 = activation()
        self.pool = SpaceToDepth(2) if stride == 2 else nn.Identity()
        self.conv1 = conv(in_ch * stride * stride, out_ch, 3)
        self.bn2 = _resnet_bn(out_ch)
        self.act2 = activation()
        self.conv2 = conv(out_ch, out_ch, 3)
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


class LmResnet(nn.Module):
    """Blueoil's float LmResnet: ResNet-18 for small images (``classification/lm_resnet.py``).

    ========  =============================================================
    conv0     3x3 conv, 64, no bias (stride 1, no max pool)
    group0    2 basic blocks, 64 channels
    group1    2 basic blocks, 128 channels, the first with stride 2
    group2    2 basic blocks, 256 channels, the first with stride 2
    group3    2 basic blocks, 512 channels, the first with stride 2
    bn, relu  batch norm -> ReLU (plain ReLU in the quantized network too)
    gap       global average pool
    linear    fully connected to num_classes (bias)
    ========  =============================================================

    Basic blocks are pre-activation (see :class:`_ResnetBasicBlock`); stride 2
    is space-to-depth before the convolution, the shortcut is a 2x2 average
    pool and zero channels. Batch norm ``decay=0.997`` (``momentum=0.003``),
    ``eps=1e-3``; every convolution and the linear layer are Glorot uniform,
    biases zero. Input height and width must be divisible by 8.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image.
    """

    input_size_multiple = 8
    widths = (64, 128, 256, 512)
    blocks_per_group = (2, 2, 2, 2)

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_num_classes(type(self).__name__, num_classes)
        _check_in_channels(type(self).__name__, in_channels)
        self.num_classes = num_classes
        self._build(in_channels, activation=lambda: nn.ReLU(), quant=None, quantize_first=False,
                    quantize_last=False)

    def _build(self, in_channels, *, activation, quant, quantize_first, quantize_last) -> None:
        if quantize_last:
            raise ValueError(
                f"{type(self).__name__}: quantize_last_convolution=True is not supported: the classifier is "
                "a fully connected layer, which Blueoil never quantizes"
            )
        wq, wq_kwargs = _weight_quantizer_of(quant)

        def conv(cin, cout, k, *, quantize=True):
            return _make_conv(cin, cout, k, bias=False, weight_quantizer=wq, weight_quantizer_kwargs=wq_kwargs,
                              quantize=quantize and quant is not None)

        self.conv0 = conv(in_channels, self.widths[0], 3, quantize=quantize_first)
        in_ch = self.widths[0]
        for g, (width, count) in enumerate(zip(self.widths, self.blocks_per_group)):
            blocks = OrderedDict()
            for i in range(count):
                stride = 2 if (g > 0 and i == 0) else 1
                blocks[f"block{i}"] = _ResnetBasicBlock(in_ch, width, stride, activation=activation, conv=conv)
                in_ch = width
            setattr(self, f"group{g}", nn.Sequential(blocks))
        self.bn = _resnet_bn(in_ch)
        self.relu = nn.ReLU()
        self.gap = _GlobalAveragePool()
        self.linear = nn.Linear(in_ch, self.num_classes)
        # tf.contrib.layers.fully_connected: Glorot uniform weights, zero bias.
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]`` (H, W divisible by 8)."""
        # TorchScript has no type(self).__name__ (and compiles only the branch it takes).
        name = "the model" if torch.jit.is_scripting() else type(self).__name__
        _check_image_input(x, 8, name)
        x = self.conv0(x)
        x = self.group3(self.group2(self.group1(self.group0(x))))
        x = self.relu(self.bn(x))
        return self.linear(self.gap(x))


class LmResnetQuantize(LmResnet):
    """Blueoil's quantized LmResnet (``LmResnetQuantize``).

    As :class:`LmResnet`, with the activation quantizer in place of both
    ReLUs of every basic block and quantized weights in the 16 convolutions
    of group0..group3 (Blueoil's quantizing variable getter covers the groups
    only): conv0 and the linear classifier stay float, and the ReLU after the
    final batch norm stays a ReLU.

    Args:
        num_classes, in_channels: as :class:`LmResnet`.
        activation_quantizer, activation_quantizer_kwargs, weight_quantizer,
            weight_quantizer_kwargs: as :class:`LmnetV0Quantize`.
        quantize_first_convolution: quantize conv0's weight (default False, as Blueoil).
        quantize_last_convolution: must be False: the classifier is a fully
            connected layer (accepted so that every quantized model takes the flag).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        activation_quantizer: Callable[..., nn.Module] = QuantActivation,
        activation_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = binary_mean_scaling_quantize,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = False,
        quantize_last_convolution: bool = False,
    ) -> None:
        _init_quantized(self, num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                        weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                        quantize_last_convolution)


class Darknet(nn.Module):
    """Blueoil's float Darknet-19 classifier (``classification/darknet.py``).

    Eighteen blocks ``block_1 .. block_18`` of conv (no bias) -> BN -> leaky
    ReLU(0.1), with 2x2 'SAME' max pools after blocks 1, 2, 5, 8 and 13
    (``pool_1 .. pool_5``); then ``conv_19``, a 1x1 conv to ``num_classes``
    (bias, weights N(0, 0.01)), and the global average pool (``pool_6``).
    Widths and kernels (:attr:`blocks`): 32/3, 64/3, 128/3, 64/1, 128/3,
    256/3, 128/1, 256/3, 512/3, 256/1, 512/3, 256/1, 512/3, 1024/3, 512/1,
    1024/3, 512/1, 1024/3. Block kernels: TF1's
    ``tf.variance_scaling_initializer()`` (LeCun truncated normal); batch norm
    ``decay=0.99``, ``eps=1e-3``. Any input size works.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image.
    """

    input_size_multiple = 1
    #: (filters, kernel size) of block_1 .. block_18.
    blocks = ((32, 3), (64, 3), (128, 3), (64, 1), (128, 3), (256, 3), (128, 1), (256, 3), (512, 3), (256, 1),
              (512, 3), (256, 1), (512, 3), (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3))
    #: The blocks followed by a max pool, and the pool's name.
    pools_after = {1: "pool_1", 2: "pool_2", 5: "pool_3", 8: "pool_4", 13: "pool_5"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        _check_num_classes(type(self).__name__, num_classes)
        _check_in_channels(type(self).__name__, in_channels)
        self.num_classes = num_classes
        self._build(in_channels, activation=lambda: nn.LeakyReLU(0.1), quant=None, quantize_first=False,
                    quantize_last=False)

    def _build(self, in_channels, *, activation, quant, quantize_first, quantize_last) -> None:
        wq, wq_kwargs = _weight_quantizer_of(quant)
        layers = OrderedDict()
        cin = in_channels
        for i, (cout, k) in enumerate(self.blocks, start=1):
            quantize = quant is not None and (quantize_first or i > 1)
            conv = _make_conv(cin, cout, k, bias=False, weight_quantizer=wq, weight_quantizer_kwargs=wq_kwargs,
                              quantize=quantize, init="lecun_truncated_normal")
            # block_18's activation: the quantizer only when the last convolution is quantized (Blueoil).
            last_float = i == len(self.blocks) and quant is not None and not quantize_last
            act = nn.LeakyReLU(0.1) if last_float else activation()
            layers[f"block_{i}"] = _conv_block(conv, act)
            if i in self.pools_after:
                layers[self.pools_after[i]] = _max_pool()
            cin = cout
        for name, module in layers.items():
            setattr(self, name, module)
        self.conv_19 = _make_conv(cin, self.num_classes, 1, bias=True, weight_quantizer=wq,
                                  weight_quantizer_kwargs=wq_kwargs, quantize=quant is not None and quantize_last,
                                  init="normal")
        self.pool_6 = _GlobalAveragePool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]``."""
        for module in self.children():
            x = module(x)
        return x


class DarknetQuantize(Darknet):
    """Blueoil's quantized Darknet-19 (``DarknetQuantize``).

    As :class:`Darknet`, with the activation quantizer in place of leaky
    ReLU in every block and quantized weights in every convolution, by
    default binary channel-wise (Blueoil's Darknet configs use
    ``binary_channel_wise_mean_scaling_quantizer``).

    ``quantize_first_convolution=False`` keeps block_1's weight float.
    ``quantize_last_convolution=False`` keeps conv_19's weight float and gives
    block_18 a leaky ReLU. Departure: Blueoil's variable getter looks for the
    name ``conv_23/`` (YOLOv2's last convolution), which this network lacks,
    so in Blueoil conv_19 stays quantized whatever the flag; here the flag
    does what it says. With the defaults (both True, Blueoil's defaults) the
    two agree. (Blueoil's ``darknet_quantize_cifar10`` config sets both to False.)

    Args:
        num_classes, in_channels: as :class:`Darknet`.
        activation_quantizer, activation_quantizer_kwargs, weight_quantizer,
            weight_quantizer_kwargs: as :class:`LmnetV0Quantize`, but the default
            weight quantizer is :func:`torch_ext.binary_channel_wise_mean_scaling_quantize`.
        quantize_first_convolution: quantize block_1's weight (default True, as Blueoil).
        quantize_last_convolution: quantize conv_19's weight (default True, as Blueoil).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        activation_quantizer: Callable[..., nn.Module] = QuantActivation,
        activation_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = binary_channel_wise_mean_scaling_quantize,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = True,
        quantize_last_convolution: bool = True,
    ) -> None:
        _init_quantized(self, num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                        weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                        quantize_last_convolution)


# --------------------------------------------------------------------------
# The registry (torchvision's convention): build a network by name.

_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "darknet": Darknet,
    "darknet_quantize": DarknetQuantize,
    "lm_resnet": LmResnet,
    "lm_resnet_quantize": LmResnetQuantize,
    "lmnet": Lmnet,
    "lmnet_quantize": LmnetQuantize,
    "lmnet_v0": LmnetV0,
    "lmnet_v0_quantize": LmnetV0Quantize,
    "lmnet_v1": LmnetV1,
    "lmnet_v1_quantize": LmnetV1Quantize,
    "sample_network": SampleNetwork,
    "sample_network_quantize": SampleNetworkQuantize,
}


def list_models() -> List[str]:
    """The names :func:`get_model` knows, sorted."""
    return sorted(_MODELS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The class (or function) that :func:`get_model` calls for ``name``."""
    if name not in _MODELS:
        raise ValueError(f"model={name!r} is unknown; choose one of {list_models()}")
    return _MODELS[name]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build network ``name`` (see :func:`list_models`) with its constructor's ``kwargs``.

    ``get_model("lmnet_v1_quantize", num_classes=10, in_channels=1,
    weight_quantizer="binary_channel_wise_mean_scaling")`` is
    ``LmnetV1Quantize(num_classes=10, in_channels=1, weight_quantizer=...)``.
    """
    return get_model_builder(name)(**kwargs)
