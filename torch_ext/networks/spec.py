"""The vocabulary of the network tables: a :class:`Layer` per row, a
:class:`NetworkSpec` per network, and one short constructor per kind of row.

A table says what Blueoil's network definition says and nothing more: each
layer's attribute name (which is its ``state_dict`` prefix), its width and
kernel, and how it is quantized in the quantized network. The builder
(:mod:`torch_ext.networks.builder`) turns a table into modules, float or
quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from torch import nn

from ..weight_quantization import binary_mean_scaling_quantize
from .layers import INITS

# A convolution's weights in the quantized network (the float network quantizes none):
FIRST = "first"  # quantized when quantize_first_convolution is True
QUANTIZED = "quantized"  # always quantized
LAST = "last"  # quantized when quantize_last_convolution is True
WEIGHTS = (FIRST, QUANTIZED, LAST)

# An activation in the quantized network (the float network has the float one everywhere):
QUANTIZER = "quantizer"  # the activation quantizer
FLOAT = "float"  # the network's float activation, quantized network or not
QUANTIZER_IF_LAST = "quantizer_if_last"  # the quantizer only when the last convolution is quantized
ACTIVATIONS = (QUANTIZER, FLOAT, QUANTIZER_IF_LAST)

#: Row kinds the builder knows.
KINDS = ("conv_bn", "conv", "classifier", "space_to_depth", "max_pool", "dropout", "global_pool", "resnet_group",
         "batch_norm", "activation", "linear")

# Blueoil's batch norm: tf.contrib.layers.batch_norm(decay=0.99, epsilon=1e-3).
BN_MOMENTUM = 0.01
BN_EPS = 1e-3
# Blueoil's LmResnet batch norm: decay=0.997, epsilon 1e-3.
RESNET_BN_MOMENTUM = 0.003


def leaky_relu() -> nn.Module:
    """``tf.nn.leaky_relu(alpha=0.1)``, the sample network's and Darknet's float activation."""
    return nn.LeakyReLU(0.1)


@dataclass(frozen=True)
class Layer:
    """One row of a network table (made by the constructors below, which set only what their kind uses).

    ``width=None`` means ``num_classes``; ``init=None`` the network's initialiser.
    """

    name: str
    kind: str
    width: Optional[int] = None
    kernel: int = 0
    weights: str = QUANTIZED
    act: str = QUANTIZER
    bias: bool = False
    init: Optional[str] = None
    blocks: int = 0
    stride: int = 1

    def __post_init__(self) -> None:
        """Refuse a typo in a table when the table is defined, not when a model is built."""
        for what, value, allowed in (("kind", self.kind, KINDS), ("weights", self.weights, WEIGHTS),
                                     ("act", self.act, ACTIVATIONS), ("init", self.init, (None,) + INITS)):
            if value not in allowed:
                raise ValueError(f"Layer {self.name!r}: {what}={value!r}; choose one of {allowed}")


@dataclass(frozen=True)
class NetworkSpec:
    """A network: its rows in forward order, plus what Blueoil sets for the whole network.

    ``weight_quantizer``, ``quantize_first`` and ``quantize_last`` are Blueoil's
    defaults for the quantized variant (its constructor's defaults);
    ``input_size_multiple`` is what H and W must be multiples of (checked in
    ``forward`` when above 1).
    """

    blueoil: str
    layers: Tuple[Layer, ...]
    float_activation: Callable[[], nn.Module] = nn.ReLU
    init: str = "glorot_uniform"
    bn_momentum: float = BN_MOMENTUM
    bn_eps: float = BN_EPS
    input_size_multiple: int = 1
    weight_quantizer: Any = binary_mean_scaling_quantize
    quantize_first: bool = True
    quantize_last: bool = False

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError(f"NetworkSpec {self.blueoil}: layer names repeat: {names}")


# ---------------------------------------------------------------- one constructor per row kind


def conv_bn(name: str, width: int, kernel: int, *, weights: str = QUANTIZED, act: str = QUANTIZER) -> Layer:
    """Blueoil's ``lmnet_block``: 'SAME' conv (no bias) -> batch norm -> activation."""
    return Layer(name, "conv_bn", width, kernel, weights=weights, act=act)


def conv(name: str, width: int, kernel: int, *, weights: str = QUANTIZED) -> Layer:
    """A bare 'SAME' convolution, no bias, no batch norm (LmResnet's first layer)."""
    return Layer(name, "conv", width, kernel, weights=weights)


def classifier(name: str) -> Layer:
    """The last 1x1 convolution to ``num_classes``: bias, weights N(0, 0.01), quantized when ``quantize_last``."""
    return Layer(name, "classifier", None, 1, weights=LAST, bias=True, init="normal")


def space_to_depth(name: str) -> Layer:
    """Space-to-depth with block 2 (TensorFlow's channel order): LMNet v1's pooling."""
    return Layer(name, "space_to_depth")


def max_pool(name: str) -> Layer:
    """2x2 max pool, stride 2, 'SAME'."""
    return Layer(name, "max_pool")


def dropout(name: str) -> Layer:
    """Dropout with the constructor's ``dropout`` probability."""
    return Layer(name, "dropout")


def global_pool(name: str) -> Layer:
    """Global average pool to ``[N, C]``."""
    return Layer(name, "global_pool")


def resnet_group(name: str, width: int, *, blocks: int, stride: int) -> Layer:
    """``blocks`` pre-activation basic blocks of two 3x3 convolutions; the first has ``stride`` (2: space-to-depth)."""
    return Layer(name, "resnet_group", width, 3, blocks=blocks, stride=stride)


def batch_norm(name: str) -> Layer:
    """A batch norm on its own (LmResnet's last one)."""
    return Layer(name, "batch_norm")


def activation(name: str, act: str = FLOAT) -> Layer:
    """An activation on its own (LmResnet's final ReLU, float in the quantized network too)."""
    return Layer(name, "activation", act=act)


def linear(name: str) -> Layer:
    """Fully connected to ``num_classes``: Glorot uniform, bias zero, never quantized (Blueoil)."""
    return Layer(name, "linear")
