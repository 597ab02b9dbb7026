"""``QuantActivation``: the quantizer as an ``nn.Module``, to drop in where a ReLU was."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops import BackwardFn, linear_mid_tread_half_quantize, linear_mid_tread_half_quantize_, validate_bit, validate_max_value

__all__ = ["QuantActivation"]


class QuantActivation(nn.Module):
    """Blueoil's ``LinearMidTreadHalfQuantizer`` as a module (docs/quantizer.md).

    Args:
        bit: bits of the activation code, 1..16 (``2**bit - 1`` levels above 0), or 32 to clip only.
        max_value: the clip ceiling ``m``, finite and > 0.
        inplace: overwrite the input, like ``nn.ReLU(inplace=True)``; the
            gradient is still that of the original input.
        backward: optional ``backward(grad_y, x, bit, max_value) -> grad_x``
            replacing the straight-through gradient.

    Bad arguments are refused here, at construction (``ValueError``/``TypeError``).

    ``torch.jit.script`` works on models using it (the scripted forward calls
    the registered operators, so a saved model loads in LibTorch where
    torch_ext's library is linked), except with a custom ``backward``, which
    is a Python callable: scripting such a module raises a ``RuntimeError``
    saying so.
    """

    def __init__(
        self, bit: int = 2, max_value: float = 2.0, inplace: bool = False, backward: Optional[BackwardFn] = None
    ) -> None:
        super().__init__()
        if backward is not None and not callable(backward):
            raise TypeError(f"backward must be callable or None, got backward={backward!r}")
        self.bit = validate_bit(bit)
        self.max_value = validate_max_value(max_value)
        self.inplace = bool(inplace)
        self.backward = backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # Eager, torch.compile, torch.export: the checked functional API,
            # which also runs a custom backward (a Python autograd.Function).
            if self.inplace:
                return linear_mid_tread_half_quantize_(x, self.bit, self.max_value, backward=self.backward)
            return linear_mid_tread_half_quantize(x, self.bit, self.max_value, backward=self.backward)
        # TorchScript (compiles only this part): the registered operators
        # themselves, so a saved model runs wherever torch_ext's library is
        # loaded (Python or LibTorch). __prepare_scriptable__ refused backward=.
        if self.inplace:
            torch.ops.torch_ext.linear_mid_tread_half_quantize_(x, self.bit, self.max_value)
            return x
        return torch.ops.torch_ext.linear_mid_tread_half_quantize(x, self.bit, self.max_value)

    def __prepare_scriptable__(self) -> "QuantActivation":
        # torch.jit.script calls this on every submodule before compiling.
        if self.backward is not None:
            raise RuntimeError(
                f"QuantActivation(backward={getattr(self.backward, '__qualname__', repr(self.backward))}) cannot be "
                "scripted: a custom backward is a Python callable that TorchScript cannot run; script a model "
                "built with backward=None (the straight-through gradient), or use torch.compile / torch.export"
            )
        return self

    def extra_repr(self) -> str:
        text = f"bit={self.bit}, max_value={self.max_value}"
        if self.inplace:
            text += ", inplace=True"
        if self.backward is not None:
            text += f", backward={getattr(self.backward, '__qualname__', repr(self.backward))}"
        return text
