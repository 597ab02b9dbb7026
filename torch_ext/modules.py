"""``QuantActivation``: the quantizer as an ``nn.Module``, to drop in where a ReLU was."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from .ops import (
    BackwardFn,
    effective_max_value,
    linear_mid_tread_half_quantize,
    linear_mid_tread_half_quantize_,
    linear_mid_tread_half_quantize_learnable,
    validate_bit,
    validate_learn_mode,
    validate_max_value,
)

__all__ = ["QuantActivation"]


def _checked(validate, value):
    """``validate(value)``, its refusal naming the module (``QuantActivation: bit must be ...``), not the function."""
    try:
        return validate(value)
    except (TypeError, ValueError) as exc:
        message = re.sub(r"^(linear_mid_tread_half_quantize|learn_max_value): ", "", str(exc))
        raise type(exc)(f"QuantActivation: {message}") from None


class QuantActivation(nn.Module):
    """Blueoil's ``LinearMidTreadHalfQuantizer`` as a module (docs/quantizer.md).

    Args:
        bit: bits of the activation code, 1..16 (``2**bit - 1`` levels above 0), or 32 to clip only.
        max_value: the clip ceiling ``m``, finite and > 0.
        inplace: overwrite the input, like ``nn.ReLU(inplace=True)``; the
            gradient is still that of the original input.
        backward: optional ``backward(grad_y, x, bit, max_value) -> grad_x``
            replacing the straight-through gradient.
        learn_max_value: ``None`` (``max_value`` is a fixed float), ``"pact"``
            or ``"lsq"``: ``max_value`` becomes an ``nn.Parameter`` (a 0-dim
            float32 tensor, in the state dict) learned with that gradient
            (docs/quantizer.md, "Learnable max_value"); ``"lsq"`` scales its
            gradient by ``1/sqrt(numel * (2**bit - 1))`` as LSQ does. Not with
            ``inplace=True`` (LSQ's backward needs the original input, and the
            in-place learnable path is not built) nor with ``backward``.

    Bad arguments are refused here, at construction (``ValueError``/``TypeError``).

    ``torch.jit.script`` works on models using it (the scripted forward calls
    the registered operators, so a saved model loads in LibTorch where
    torch_ext's library is linked), except with a custom ``backward``, which
    is a Python callable: scripting such a module raises a ``RuntimeError``
    saying so.
    """

    def __init__(
        self,
        bit: int = 2,
        max_value: float = 2.0,
        inplace: bool = False,
        backward: Optional[BackwardFn] = None,
        learn_max_value: Optional[str] = None,
    ) -> None:
        super().__init__()
        if backward is not None and not callable(backward):
            raise TypeError(f"QuantActivation: backward must be callable or None, got backward={backward!r}")
        self.bit = _checked(validate_bit, bit)
        self.inplace = bool(inplace)
        self.backward = backward
        if learn_max_value is None:
            self.max_value = _checked(validate_max_value, max_value)
            self.learn_max_value = None
            # TorchScript guards (NoneType attributes prune the other branch when scripting).
            self._fixed: Optional[bool] = True
        else:
            mode = _checked(validate_learn_mode, learn_max_value)
            if self.inplace:
                raise ValueError(
                    f"QuantActivation(inplace=True, learn_max_value={mode!r}): the learnable max_value has no "
                    "in-place path (LSQ's gradient needs the original input); use inplace=False"
                )
            if backward is not None:
                raise ValueError(
                    f"QuantActivation(backward=..., learn_max_value={mode!r}): a custom backward gives no gradient "
                    "for max_value; use one or the other"
                )
            self.max_value = nn.Parameter(torch.tensor(_checked(validate_max_value, max_value), dtype=torch.float32))
            self.learn_max_value = mode
            self._fixed = None
        self.scale_grad = learn_max_value == "lsq"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.learn_max_value is not None:
                return linear_mid_tread_half_quantize_learnable(
                    x, self.max_value, self.bit, self.learn_max_value, scale_grad=self.scale_grad
                )
            # Eager, torch.compile, torch.export: the checked functional API,
            # which also runs a custom backward (a Python autograd.Function).
            if self.inplace:
                return linear_mid_tread_half_quantize_(x, self.bit, self.max_value, backward=self.backward)
            return linear_mid_tread_half_quantize(x, self.bit, self.max_value, backward=self.backward)
        # TorchScript (compiles only this part): the registered operators
        # themselves, so a saved model runs wherever torch_ext's library is
        # loaded (Python or LibTorch). __prepare_scriptable__ refused backward=.
        mode = self.learn_max_value
        if mode is not None:
            return torch.ops.torch_ext.linear_mid_tread_half_quantize_learnable(
                x, self.max_value, self.bit, mode, self.scale_grad
            )
        fixed = self._fixed
        if fixed is None:
            raise RuntimeError("QuantActivation: unreachable")
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

    def fixed_max_value(self, dtype: torch.dtype = torch.float32) -> float:
        """The ``m`` used for inputs of ``dtype``, as a Python float (reads a learned value on the host).

        For a learned ``max_value`` it is the clamped value of
        :func:`torch_ext.ops.effective_max_value`, what ``export_onnx`` and
        ``quantize_to_codes`` take.
        """
        if self.learn_max_value is None:
            return float(self.max_value)
        return effective_max_value(self.max_value, dtype)

    def __setstate__(self, state) -> None:
        # Modules pickled before learn_max_value existed are fixed ones.
        state.setdefault("learn_max_value", None)
        state.setdefault("_fixed", True)
        state.setdefault("scale_grad", False)
        super().__setstate__(state)

    def freeze_max_value_(self) -> "QuantActivation":
        """Turn a learned ``max_value`` into a fixed float (its clamped value, :meth:`fixed_max_value`), in place.

        What ``export_onnx`` does to its copy of the model: the exported graph
        holds the learned value as a constant. Returns ``self``.
        """
        if self.learn_max_value is not None:
            value = self.fixed_max_value()
            del self.max_value  # the Parameter
            self.max_value = value
            self.learn_max_value = None
            self._fixed = True
            self.scale_grad = False
        return self

    def extra_repr(self) -> str:
        if self.learn_max_value is not None:
            text = f"bit={self.bit}, max_value={float(self.max_value.detach()):g}, learn_max_value={self.learn_max_value!r}"
            return text
        text = f"bit={self.bit}, max_value={self.max_value}"
        if self.inplace:
            text += ", inplace=True"
        if self.backward is not None:
            text += f", backward={getattr(self.backward, '__qualname__', repr(self.backward))}"
        return text
