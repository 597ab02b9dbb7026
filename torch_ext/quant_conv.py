"""``QuantConv2d``: an ``nn.Conv2d`` that convolves with a quantized weight.

This is how Blueoil's ``custom_getter`` weight quantization looks in PyTorch:
the float weight stays the trained parameter (the optimizer updates it, the
state dict stores it) and every forward pass convolves with
``weight_quantizer(weight, **weight_quantizer_kwargs)``. With the
straight-through quantizers of :mod:`torch_ext.weight_quantization` the
gradient reaches the float weight unchanged. A quantizer with learned
parameters (:class:`torch_ext.TTQWeightQuantizer`) is a submodule of the layer.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Type, Union

import torch
from torch import nn

from .weight_quantization import binary_channel_wise_mean_scaling_quantize, binary_mean_scaling_quantize

__all__ = ["QuantConv2d"]


def _callable_name(fn: Any) -> str:
    """A short, stable name for a quantizer, for ``repr`` and error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if name is not None else repr(fn)


def _scripted_name(weight_quantizer: Any, kwargs: Mapping[str, Any]) -> str:
    if weight_quantizer is None:
        return "none"
    if not kwargs and weight_quantizer is binary_mean_scaling_quantize:
        return "binary_mean_scaling"
    if not kwargs and weight_quantizer is binary_channel_wise_mean_scaling_quantize:
        return "binary_channel_wise_mean_scaling"
    return "python"


class QuantConv2d(nn.Conv2d):
    """2-D convolution with a quantized weight.

    ``forward(x) = conv2d(x, weight_quantizer(weight, **weight_quantizer_kwargs), bias)``;
    the bias is not quantized (Blueoil quantizes only variables named
    ``kernel``).

    The weight quantizer may be

    * a function ``(w, **kwargs) -> w_q`` (the binary quantizers,
      :func:`torch_ext.twn_weight_quantize`);
    * an ``nn.Module`` instance, e.g. :class:`torch_ext.TTQWeightQuantizer`,
      whose parameters are learned: it is registered as the submodule
      ``weight_quantizer``, so ``parameters()``, the optimizer and the state
      dict (``weight_quantizer.positive``) see them;
    * an ``nn.Module`` subclass: this layer builds its own instance,
      ``weight_quantizer(**weight_quantizer_kwargs)``, and calls it with the
      weight alone (the kwargs were the constructor's);
    * ``None``: a plain float convolution.

    Args:
        *args, **kwargs: as for :class:`torch.nn.Conv2d`.
        weight_quantizer: as above, by default
            :func:`torch_ext.binary_mean_scaling_quantize`.
        weight_quantizer_kwargs: extra keyword arguments for the quantizer
            (for a subclass: for its constructor).
    """

    def __init__(
        self,
        *args: Any,
        weight_quantizer: Union[Callable[..., torch.Tensor], nn.Module, Type[nn.Module], None] = (
            binary_mean_scaling_quantize
        ),
        weight_quantizer_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if weight_quantizer is not None and not callable(weight_quantizer):
            raise TypeError(
                "QuantConv2d: weight_quantizer must be callable, an nn.Module or None, got "
                f"{weight_quantizer!r}"
            )
        if weight_quantizer_kwargs is not None and not isinstance(weight_quantizer_kwargs, Mapping):
            raise TypeError(
                "QuantConv2d: weight_quantizer_kwargs must be a mapping or None, got "
                f"{weight_quantizer_kwargs!r}"
            )
        super().__init__(*args, **kwargs)
        # Copied so that a caller mutating its dict later cannot change the layer.
        quantizer_kwargs = dict(weight_quantizer_kwargs or {})
        if isinstance(weight_quantizer, type) and issubclass(weight_quantizer, nn.Module):
            weight_quantizer = weight_quantizer(**quantizer_kwargs)
            quantizer_kwargs = {}
        # An nn.Module is registered as a submodule by nn.Module.__setattr__.
        self.weight_quantizer = weight_quantizer
        self.weight_quantizer_kwargs = quantizer_kwargs
        # What TorchScript runs (it cannot call a Python function held by the
        # module): the registered operator of a binary quantizer, or none.
        self.scripted_weight_quantizer: str = _scripted_name(weight_quantizer, quantizer_kwargs)

    @torch.jit.unused
    def quantized_weight(self) -> torch.Tensor:
        """The weight this layer convolves with (differentiable w.r.t. ``weight``)."""
        if self.weight_quantizer is None:
            return self.weight
        return self.weight_quantizer(self.weight, **self.weight_quantizer_kwargs)

    def _scripted_weight(self) -> torch.Tensor:
        if self.scripted_weight_quantizer == "binary_mean_scaling":
            return torch.ops.torch_ext.binary_mean_scaling_quantize(self.weight)
        if self.scripted_weight_quantizer == "binary_channel_wise_mean_scaling":
            return torch.ops.torch_ext.binary_channel_wise_mean_scaling_quantize(self.weight)
        if self.scripted_weight_quantizer == "none":
            return self.weight
        raise RuntimeError("QuantConv2d: in TorchScript only the binary weight quantizers (registered operators) "
                           "or none run; this layer's is a Python one")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with :meth:`quantized_weight` (padding modes as ``nn.Conv2d``)."""
        if torch.jit.is_scripting():
            return self._conv_forward(x, self._scripted_weight(), self.bias)
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        """``nn.Conv2d``'s description plus the weight quantizer and its kwargs."""
        s = super().extra_repr()
        if self.weight_quantizer is None:
            return s + ", weight_quantizer=None"
        if not isinstance(self.weight_quantizer, nn.Module):  # a module prints itself as a child
            s += f", weight_quantizer={_callable_name(self.weight_quantizer)}"
        if self.weight_quantizer_kwargs:
            s += f", weight_quantizer_kwargs={self.weight_quantizer_kwargs}"
        return s
