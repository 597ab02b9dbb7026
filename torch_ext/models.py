"""Blueoil's classification networks, in float and quantized form.

* :class:`LmnetV1` / :class:`LmnetV1Quantize`: Blueoil's LMNet v1
  (``blueoil/networks/classification/lmnet_v1.py``).
* :class:`SampleNetwork` / :class:`SampleNetworkQuantize`: Blueoil's quantize
  example (``blueoil/networks/classification/quantize_example.py``).

The quantized networks are built from :class:`torch_ext.QuantConv2d` and
:class:`torch_ext.QuantActivation` modules, so every quantizer can be found
with ``model.modules()``. Convolutions that are *not* quantized (the first and
last ones when ``quantize_first_convolution`` / ``quantize_last_convolution``
are False, and all of them in the float networks) are plain ``nn.Conv2d``.

Translation notes from Blueoil's TensorFlow code:

* Batch norm ``decay=0.99, epsilon=1e-3`` is ``nn.BatchNorm2d(momentum=0.01,
  eps=1e-3)`` (PyTorch's momentum is the weight of the *new* batch).
* Convolution kernels are initialised as in Blueoil: ``tf.layers.conv2d``'s
  default (Glorot uniform) in LMNet, He truncated normal
  (``VarianceScaling(scale=2.0)``) in the sample network's ``block_1``, and
  N(0, 0.01) in the last 1x1 convolution; biases zero.
* ``padding='SAME'`` with stride 1 and odd kernels is ``padding=k // 2``.
* Space-to-depth uses TensorFlow's channel order (see :class:`SpaceToDepth`).
* Inputs are NCHW; the models also accept ``channels_last`` tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .modules import QuantActivation
from .quant_conv import QuantConv2d
from .weight_quantization import binary_channel_wise_mean_scaling_quantize, binary_mean_scaling_quantize

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
]

# Blueoil's batch norm: tf.contrib.layers.batch_norm(decay=0.99, epsilon=1e-3).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
# Blueoil's default activation quantizer settings (W1A2 networks).
DEFAULT_ACTIVATION_QUANTIZER_KWARGS = {"bit": 2, "max_value": 2.0}
#: Blueoil's weight quantizers by name: the quantized models' ``weight_quantizer``
#: takes one of these names or any callable ``w -> quantized w``.
WEIGHT_QUANTIZERS: Mapping[str, Callable[..., torch.Tensor]] = {
    "binary_mean_scaling": binary_mean_scaling_quantize,
    "binary_channel_wise_mean_scaling": binary_channel_wise_mean_scaling_quantize,
}


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
        if x.dim() != 4:
            raise ValueError(f"SpaceToDepth: expected a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        b = self.block_size
        if h % b or w % b:
            raise ValueError(
                f"SpaceToDepth: height and width must be divisible by block_size={b}, "
                f"got input shape {tuple(x.shape)}"
            )
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
    at two standard deviations) or ``"normal"`` (N(0, ``normal_std``)).
    """
    if init == "glorot_uniform":
        nn.init.xavier_uniform_(conv.weight)
    elif init == "he_truncated_normal":
        fan_in = conv.weight[0].numel()
        std = (2.0 / fan_in) ** 0.5 / _TRUNCATED_NORMAL_STD
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
    """A stride-1 'SAME' convolution: QuantConv2d when quantized, else nn.Conv2d."""
    common = dict(kernel_size=kernel_size, stride=1, padding=kernel_size // 2, bias=bias)
    if quantize and weight_quantizer is not None:
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
        if x.dim() != 4 or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(
                f"{type(self).__name__}: expected input [N, C, H, W] with H and W divisible by 8, "
                f"got shape {tuple(x.shape)}"
            )
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


# --------------------------------------------------------------------------
# The registry (torchvision's convention): build a network by name.

_MODELS: Dict[str, Callable[..., nn.Module]] = {
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
