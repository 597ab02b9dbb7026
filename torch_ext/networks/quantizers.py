"""Blueoil's weight quantizers by name, and the checked quantizer settings a
quantized network is built with (one place, so every network refuses bad
arguments with the same words)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from ..weight_quantization import (
    TTQWeightQuantizer,
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    twn_weight_quantize,
)

__all__ = ["DEFAULT_ACTIVATION_QUANTIZER_KWARGS", "QuantizerConfig", "WEIGHT_QUANTIZERS", "WEIGHT_QUANTIZER_ALIASES",
           "check_positive_int"]

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


def check_positive_int(cls_name: str, argument: str, value: Any) -> None:
    """Refuse ``num_classes``/``in_channels`` that are not positive ints (bools too), naming the model."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{cls_name}: {argument} must be a positive int, got {value!r}")


class QuantizerConfig:
    """Validated activation/weight quantizer settings shared by the quantized models.

    Checked when the model is constructed, before any layer is built, so a bad
    argument is refused with the model's name rather than deep in a layer.
    """

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
