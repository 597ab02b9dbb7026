"""One builder for every network: a table (:class:`NetworkSpec`) in, the float
or the quantized modules out, and the base class whose ``forward`` runs them.

Layers are built in table order, so parameters are initialised in the order
(and from the same random stream) as the hand-written constructors did, and
the module tree, ``state_dict`` keys and ``str(model)`` follow the table.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from . import layers
from .layers import SpaceToDepth, _check_image_input, _GlobalAveragePool, _ResnetBasicBlock
from .quantizers import QuantizerConfig, check_positive_int
from .spec import FIRST, FLOAT, LAST, QUANTIZED, QUANTIZER_IF_LAST, Layer, NetworkSpec

__all__ = ["BlueoilNetwork", "build_layers"]

# The forward below calls it by this module's global name: FX must keep it a leaf here too.
torch.fx.wrap("_check_image_input")


class _Context:
    """What one construction decides per layer: float or quantized weights and activations."""

    def __init__(self, spec: NetworkSpec, num_classes: int, quant: Optional[QuantizerConfig],
                 quantize_first: bool, quantize_last: bool, dropout: float) -> None:
        self.spec, self.num_classes, self.quant = spec, num_classes, quant
        self.quantize_first, self.quantize_last, self.dropout = quantize_first, quantize_last, dropout

    def quantizes(self, weights: str) -> bool:
        """Whether a convolution marked ``weights`` gets quantized weights in this model."""
        if self.quant is None:
            return False
        return {FIRST: self.quantize_first, QUANTIZED: True, LAST: self.quantize_last}[weights]

    def activation(self, act: str) -> nn.Module:
        """A fresh activation: the quantizer, or the float one where the table (or the model) keeps it float."""
        if self.quant is None or act == FLOAT or (act == QUANTIZER_IF_LAST and not self.quantize_last):
            return self.spec.float_activation()
        return self.quant.activation()

    def conv(self, cin: int, cout: int, kernel: int, *, weights: str = QUANTIZED, bias: bool = False,
             init: Optional[str] = None) -> nn.Conv2d:
        """A 'SAME' convolution, initialised with the row's initialiser or else the network's."""
        quant = self.quant
        return layers.make_conv(
            cin, cout, kernel, bias=bias, quantize=self.quantizes(weights), init=init or self.spec.init,
            weight_quantizer=quant.weight_quantizer if quant is not None else None,
            weight_quantizer_kwargs=quant.weight_quantizer_kwargs if quant is not None else None,
        )

    def bn(self, channels: int) -> nn.BatchNorm2d:
        """The network's batch norm (LmResnet's decay differs from the others')."""
        return layers.batch_norm(channels, self.spec.bn_momentum, self.spec.bn_eps)


# ---------------------------------------------------------------- one function per row kind: (module, out channels)


def _conv_bn(layer: Layer, cin: int, ctx: _Context) -> Tuple[nn.Module, int]:
    conv = ctx.conv(cin, layer.width, layer.kernel, weights=layer.weights, init=layer.init)
    act = ctx.activation(layer.act)
    return layers.conv_block(conv, ctx.bn(layer.width), act), layer.width


def _conv(layer: Layer, cin: int, ctx: _Context) -> Tuple[nn.Module, int]:
    width = layer.width if layer.width is not None else ctx.num_classes
    return ctx.conv(cin, width, layer.kernel, weights=layer.weights, bias=layer.bias, init=layer.init), width


def _resnet_group(layer: Layer, cin: int, ctx: _Context) -> Tuple[nn.Module, int]:
    """``group{g}.block{i}``: only the first block changes the width and the resolution."""
    blocks = OrderedDict()
    for i in range(layer.blocks):
        blocks[f"block{i}"] = _ResnetBasicBlock(
            cin, layer.width, layer.stride if i == 0 else 1, activation=lambda: ctx.activation(layer.act),
            conv=lambda c_in, c_out, k: ctx.conv(c_in, c_out, k, weights=layer.weights), bn=ctx.bn,
            kernel_size=layer.kernel)
        cin = layer.width
    return nn.Sequential(blocks), cin


def _linear(layer: Layer, cin: int, ctx: _Context) -> Tuple[nn.Module, int]:
    fc = nn.Linear(cin, ctx.num_classes)
    # tf.contrib.layers.fully_connected: Glorot uniform weights, zero bias.
    nn.init.xavier_uniform_(fc.weight)
    nn.init.zeros_(fc.bias)
    return fc, ctx.num_classes


_BUILDERS: Dict[str, Callable[[Layer, int, _Context], Tuple[nn.Module, int]]] = {
    "conv_bn": _conv_bn,
    "conv": _conv,
    "classifier": _conv,
    "resnet_group": _resnet_group,
    "linear": _linear,
    "space_to_depth": lambda layer, cin, ctx: (SpaceToDepth(2), cin * 4),
    "max_pool": lambda layer, cin, ctx: (layers.max_pool(), cin),
    "dropout": lambda layer, cin, ctx: (nn.Dropout(float(ctx.dropout)), cin),
    "global_pool": lambda layer, cin, ctx: (_GlobalAveragePool(), cin),
    "batch_norm": lambda layer, cin, ctx: (ctx.bn(cin), cin),
    "activation": lambda layer, cin, ctx: (ctx.activation(layer.act), cin),
}


def _check_options(spec: NetworkSpec, name: str, quantize_last: bool, dropout: Any) -> None:
    """Refuse options the table cannot honour, before any layer is built."""
    kinds = {layer.kind for layer in spec.layers}
    if "dropout" in kinds and not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
    if quantize_last and not any(layer.weights == LAST for layer in spec.layers):
        why = ("the classifier is a fully connected layer, which Blueoil never quantizes" if "linear" in kinds
               else "no layer of its table is marked LAST")
        raise ValueError(f"{name}: quantize_last_convolution=True is not supported: {why}")


def build_layers(spec: NetworkSpec, name: str, in_channels: int, num_classes: int, *,
                 quant: Optional[QuantizerConfig] = None, quantize_first: bool = False,
                 quantize_last: bool = False, dropout: float = 0.5) -> "OrderedDict[str, nn.Module]":
    """The modules of ``spec``, by layer name in forward order: float when ``quant`` is None.

    ``name`` is the model's class name, for error messages.
    """
    _check_options(spec, name, quantize_last, dropout)
    ctx = _Context(spec, num_classes, quant, quantize_first, quantize_last, dropout)
    modules: "OrderedDict[str, nn.Module]" = OrderedDict()
    channels = in_channels
    for layer in spec.layers:
        modules[layer.name], channels = _BUILDERS[layer.kind](layer, channels, ctx)
    return modules


class BlueoilNetwork(nn.Module):
    """Base of the networks in :mod:`torch_ext.models`: built from the class's ``spec``, run in table order.

    Subclasses set ``spec`` and ``input_size_multiple`` and call
    :meth:`_init_float` or :meth:`_init_quantized` from their own constructor,
    which keeps each public class's signature and defaults explicit.
    """

    spec: ClassVar[NetworkSpec]
    #: Input height and width must be multiples of this (the training command checks it).
    input_size_multiple: int = 1
    # A compile-time constant for TorchScript (it does not see class attributes otherwise).
    __constants__ = ["input_size_multiple"]

    def _init_float(self, num_classes: int, in_channels: int, **options: Any) -> None:
        """Build the float network: the table's float activation everywhere, no quantized weight."""
        self._start(num_classes, in_channels)
        self._add_layers(in_channels, None, False, False, **options)

    def _init_quantized(self, num_classes: int, in_channels: int, activation_quantizer: Callable[..., nn.Module],
                        activation_quantizer_kwargs: Optional[Mapping[str, Any]], weight_quantizer: Any,
                        weight_quantizer_kwargs: Optional[Mapping[str, Any]], quantize_first: bool,
                        quantize_last: bool, **options: Any) -> None:
        """Build the quantized network, checking the arguments in the order the models always have."""
        self._start(num_classes, in_channels)
        quant = QuantizerConfig(type(self).__name__, activation_quantizer, activation_quantizer_kwargs,
                                weight_quantizer, weight_quantizer_kwargs)
        self.quantize_first_convolution = bool(quantize_first)
        self.quantize_last_convolution = bool(quantize_last)
        self._add_layers(in_channels, quant, self.quantize_first_convolution, self.quantize_last_convolution,
                         **options)

    def _start(self, num_classes: int, in_channels: int) -> None:
        nn.Module.__init__(self)
        check_positive_int(type(self).__name__, "num_classes", num_classes)
        check_positive_int(type(self).__name__, "in_channels", in_channels)
        self.num_classes = num_classes

    def _add_layers(self, in_channels: int, quant: Optional[QuantizerConfig], quantize_first: bool,
                    quantize_last: bool, **options: Any) -> None:
        modules = build_layers(self.spec, type(self).__name__, in_channels, self.num_classes, quant=quant,
                               quantize_first=quantize_first, quantize_last=quantize_last, **options)
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for images ``[N, in_channels, H, W]`` (H, W multiples of
        :attr:`input_size_multiple`)."""
        if self.input_size_multiple > 1:
            # TorchScript has no type(self).__name__ (and compiles only the branch it takes).
            name = "the model" if torch.jit.is_scripting() else type(self).__name__
            _check_image_input(x, self.input_size_multiple, name)
        for module in self.children():
            x = module(x)
        return x
