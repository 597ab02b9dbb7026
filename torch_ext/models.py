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

Each network is declared once, as a table of its layers
(:mod:`torch_ext.networks.tables`); one builder
(:func:`torch_ext.networks.builder.build_layers`) turns a table into the float
or the quantized modules. The classes here give each network its name,
constructor and documentation.

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

from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .modules import QuantActivation
from .quant_conv import QuantConv2d  # noqa: F401  (importable from here as before)
from .weight_quantization import (  # noqa: F401  (importable from here as before)
    TTQWeightQuantizer,
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    twn_weight_quantize,
)
from .networks.builder import BlueoilNetwork
from .networks.layers import SpaceToDepth, _GlobalAveragePool, _PadChannels, _ResnetBasicBlock  # noqa: F401
from .networks.quantizers import (  # noqa: F401  (DEFAULT_ACTIVATION_QUANTIZER_KWARGS: importable as before)
    DEFAULT_ACTIVATION_QUANTIZER_KWARGS,
    WEIGHT_QUANTIZER_ALIASES,
    WEIGHT_QUANTIZERS,
)
from .networks.spec import BN_EPS, BN_MOMENTUM, RESNET_BN_MOMENTUM, NetworkSpec  # noqa: F401
from .networks.tables import DARKNET, LM_RESNET, LMNET_V0, LMNET_V1, SAMPLE_NETWORK

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


def _rows(spec: NetworkSpec, kind: str) -> list:
    """The rows of one kind in a table (for the class attributes that describe a network)."""
    return [row for row in spec.layers if row.kind == kind]


class SampleNetwork(BlueoilNetwork):
    """Blueoil's float sample network.

    ``block_1``: 3x3 conv (32 filters, no bias) -> batch norm -> leaky ReLU(0.1);
    ``block_last``: 1x1 conv to ``num_classes`` (bias, weights N(0, 0.01));
    global average pool -> ``[N, num_classes]``.

    Args:
        num_classes: number of output classes.
        in_channels: channels of the input image (3 for RGB, 1 for grey).
    """

    spec = SAMPLE_NETWORK
    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple = SAMPLE_NETWORK.input_size_multiple

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        self._init_float(num_classes, in_channels)


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
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = SAMPLE_NETWORK.weight_quantizer,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = SAMPLE_NETWORK.quantize_first,
        quantize_last_convolution: bool = SAMPLE_NETWORK.quantize_last,
    ) -> None:
        self._init_quantized(num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                             weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                             quantize_last_convolution)


class LmnetV1(BlueoilNetwork):
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

    spec = LMNET_V1
    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple = LMNET_V1.input_size_multiple

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        self._init_float(num_classes, in_channels, dropout=dropout)


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
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = LMNET_V1.weight_quantizer,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = LMNET_V1.quantize_first,
        quantize_last_convolution: bool = LMNET_V1.quantize_last,
        dropout: float = 0.5,
    ) -> None:
        self._init_quantized(num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                             weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                             quantize_last_convolution, dropout=dropout)


#: Blueoil's ``Lmnet`` and ``LmnetQuantize`` (``classification/lmnet`` and
#: ``classification/lmnet_quantize``) are its LMNet v1 under another name.
Lmnet = LmnetV1
LmnetQuantize = LmnetV1Quantize


class LmnetV0(BlueoilNetwork):
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

    spec = LMNET_V0
    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple = LMNET_V0.input_size_multiple

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        self._init_float(num_classes, in_channels, dropout=dropout)


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
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = LMNET_V0.weight_quantizer,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = LMNET_V0.quantize_first,
        quantize_last_convolution: bool = LMNET_V0.quantize_last,
        dropout: float = 0.5,
    ) -> None:
        self._init_quantized(num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                             weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                             quantize_last_convolution, dropout=dropout)


class LmResnet(BlueoilNetwork):
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

    spec = LM_RESNET
    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple = LM_RESNET.input_size_multiple
    #: Widths and basic blocks of group0 .. group3 (from the table).
    widths = tuple(row.width for row in _rows(LM_RESNET, "resnet_group"))
    blocks_per_group = tuple(row.blocks for row in _rows(LM_RESNET, "resnet_group"))

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        self._init_float(num_classes, in_channels)


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
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = LM_RESNET.weight_quantizer,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = LM_RESNET.quantize_first,
        quantize_last_convolution: bool = LM_RESNET.quantize_last,
    ) -> None:
        self._init_quantized(num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
                             weight_quantizer, weight_quantizer_kwargs, quantize_first_convolution,
                             quantize_last_convolution)


class Darknet(BlueoilNetwork):
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

    spec = DARKNET
    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple = DARKNET.input_size_multiple
    #: (filters, kernel size) of block_1 .. block_18 (from the table).
    blocks = tuple((row.width, row.kernel) for row in _rows(DARKNET, "conv_bn"))
    #: The blocks followed by a max pool, and the pool's name.
    pools_after = {int(before.name[len("block_"):]): row.name
                   for before, row in zip(DARKNET.layers, DARKNET.layers[1:]) if row.kind == "max_pool"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        self._init_float(num_classes, in_channels)


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
        weight_quantizer: Union[str, Callable[..., torch.Tensor], None] = DARKNET.weight_quantizer,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        quantize_first_convolution: bool = DARKNET.quantize_first,
        quantize_last_convolution: bool = DARKNET.quantize_last,
    ) -> None:
        self._init_quantized(num_classes, in_channels, activation_quantizer, activation_quantizer_kwargs,
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
