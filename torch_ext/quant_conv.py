"""``QuantConv2d``: an ``nn.Conv2d`` that convolves with a quantized weight.

This is how Blueoil's ``custom_getter`` weight quantization looks in PyTorch:
the float weight stays the trained parameter (the optimizer updates it, the
state dict stores it) and every forward pass convolves with
``weight_quantizer(weight, **weight_quantizer_kwargs)``. With the
straight-through quantizers of :mod:`torch_ext.weight_quantization` the
gradient reaches the float weight unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .weight_quantization import binary_mean_scaling_quantize

__all__ = ["QuantConv2d"]


def _callable_name(fn: Any) -> str:
    """A short, stable name for a quantizer, for ``repr`` and error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if name is not None else repr(fn)


class QuantConv2d(nn.Conv2d):
    """2-D convolution with a quantized weight.

    ``forward(x) = conv2d(x, weight_quantizer(weight, **weight_quantizer_kwargs), bias)``;
    the bias is not quantized (Blueoil quantizes only variables named
    ``kernel``).

    Args:
        *args, **kwargs: as for :class:`torch.nn.Conv2d`.
        weight_quantizer: callable ``(w, **kwargs) -> w_q``, by default
            :func:`torch_ext.binary_mean_scaling_quantize`; ``None`` makes this
            a plain float convolution.
        weight_quantizer_kwargs: extra keyword arguments for the quantizer.
    """

    def __init__(
        self,
        *args: Any,
        weight_quantizer: Optional[Callable[..., torch.Tensor]] = binary_mean_scaling_quantize,
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if weight_quantizer is not None and not callable(weight_quantizer):
            raise TypeError(
                "QuantConv2d: weight_quantizer must be callable or None, got "
                f"{weight_quantizer!r}"
            )
        if weight_quantizer_kwargs is not None and not isinstance(weight_quantizer_kwargs, Mapping):
            raise TypeError(
                "QuantConv2d: weight_quantizer_kwargs must be a mapping or None, got "
                f"{weight_quantizer_kwargs!r}"
            )
        super().__init__(*args, **kwargs)
        self.weight_quantizer = weight_quantizer
        # Copied so that a caller mutating its dict later cannot change the layer.
        self.weight_quantizer_kwargs = dict(weight_quantizer_kwargs or {})

    def quantized_weight(self) -> torch.Tensor:
        """The weight this layer convolves with (differentiable w.r.t. ``weight``)."""
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight, **self.weight_quantizer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with :meth:`quantized_weight` (padding modes as ``nn.Conv2d``)."""
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        """``nn.Conv2d``'s description plus the weight quantizer and its kwargs."""
        s = super().extra_repr()
        if self.weight_quantizer is None:
            return s + ", weight_quantizer=None"
        s += f", weight_quantizer={_callable_name(self.weight_quantizer)}"
        if self.weight_quantizer_kwargs:
            s += f", weight_quantizer_kwargs={self.weight_quantizer_kwargs}"
        return s
