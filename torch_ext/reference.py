"""docs/quantizer.md's formula, written once, and a pure-PyTorch reference of it, one eager op per step.

The formula is written over a small set of operations (:class:`Steps`), each
one rounded operation in the compute type T: :func:`clip`, :func:`level`,
:func:`dequantize` and :func:`quantize_in_compute_type`. This module runs them
on torch tensors (:data:`TORCH_STEPS`); the ONNX export runs the same functions
on ONNX nodes (``torch_ext.export``), and ``torch_ext.codes`` builds the
integer codes from them, so the order of the steps is stated in one place.

The reference is slow on purpose: every step of the contract is its own
rounded tensor operation in T, so it can be read against docs/quantizer.md
line by line. Tests compare the operators with it; users can too. Its
backward, :func:`linear_mid_tread_half_quantize_backward_reference`, is the
fixed straight-through gradient the Python autograd of ``torch_ext.ops`` uses.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple

import torch

__all__ = [
    "Steps",
    "TORCH_STEPS",
    "clip",
    "compute_dtype",
    "constants",
    "dequantize",
    "level",
    "levels_above_zero",
    "linear_mid_tread_half_quantize_reference",
    "linear_mid_tread_half_quantize_backward_reference",
    "quantize_in_compute_type",
]


class Steps(Protocol):
    """The operations the formula is written in, each one IEEE operation rounded in T.

    ``mul``, ``add`` and ``floor`` may overwrite their first operand: the
    formula gives them only results of an earlier step (fresh values), so
    torch can work in place (one temporary instead of four) and ONNX need not.
    """

    def constant(self, value: float) -> Any:
        """A scalar in T (only 0.0 and 0.5 here: exact in every T)."""

    def less(self, a: Any, b: Any) -> Any: ...

    def greater(self, a: Any, b: Any) -> Any: ...

    def where(self, condition: Any, a: Any, b: Any) -> Any: ...

    def div(self, a: Any, b: Any) -> Any: ...

    def mul(self, a: Any, b: Any) -> Any: ...

    def add(self, a: Any, b: Any) -> Any: ...

    def floor(self, a: Any) -> Any: ...


class _TorchSteps:
    """:class:`Steps` on torch tensors: ``div`` makes a fresh tensor, the steps after it work in place."""

    @staticmethod
    def constant(value: float) -> float:
        return value  # a Python scalar keeps the tensor's dtype (T)

    less = staticmethod(torch.lt)
    greater = staticmethod(torch.gt)
    where = staticmethod(torch.where)
    div = staticmethod(torch.div)

    @staticmethod
    def mul(a: torch.Tensor, b) -> torch.Tensor:
        return a.mul_(b)

    @staticmethod
    def add(a: torch.Tensor, b) -> torch.Tensor:
        return a.add_(b)

    @staticmethod
    def floor(a: torch.Tensor) -> torch.Tensor:
        return a.floor_()


#: The formula's steps as eager torch operations.
TORCH_STEPS: Steps = _TorchSteps()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """docs/quantizer.md's T: float64 for float64 inputs, float32 for float16, bfloat16 and float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def levels_above_zero(bit: int) -> int:
    """docs/quantizer.md's n = 2**bit - 1: the codes are 0..n, the levels (k / n) * m."""
    return (1 << bit) - 1


def constants(
    t: torch.dtype, device: torch.device, bit: int, max_value: float
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(m, n)`` as 0-dim tensors of dtype ``t`` on ``device``; ``n`` is None for ``bit=32`` (clip only).

    Tensors on the data's device, not Python scalars: CUDA's division by a
    CPU scalar multiplies by its reciprocal instead (docs/quantizer.md forbids it).
    """
    m = torch.tensor(max_value, dtype=t, device=device)  # T(max_value): one rounding
    n = None if bit == 32 else torch.tensor(levels_above_zero(bit), dtype=t, device=device)
    return m, n


def clip(xt, m, steps: Steps = TORCH_STEPS):
    """c = min(max(x, 0), m) in T: NaN propagates, -0.0 is kept (x < 0 is false for it), -inf -> 0, +inf -> m."""
    zero = steps.constant(0.0)
    c = steps.where(steps.less(xt, zero), zero, xt)
    return steps.where(steps.greater(c, m), m, c)


def level(c, m, n, steps: Steps = TORCH_STEPS):
    """floor((c / m) * n + 0.5) in T, each step one rounded operation: the code of a clipped value.

    Returns a fresh value (NaN where c is NaN). :func:`torch_ext.quantize_to_codes`
    and the quantizer below are built on it.
    """
    v = steps.div(c, m)
    v = steps.mul(v, n)
    v = steps.add(v, steps.constant(0.5))
    return steps.floor(v)


def dequantize(k, m, n, steps: Steps = TORCH_STEPS):
    """(k / n) * m in T: the value of code ``k`` (``k`` already in T)."""
    return steps.mul(steps.div(k, n), m)


def quantize_in_compute_type(xt, m, n, steps: Steps = TORCH_STEPS):
    """y = (floor((clip(x, 0, m) / m) * n + 0.5) / n) * m, all in T; ``n=None`` (bit 32) clips only."""
    c = clip(xt, m, steps)
    if n is None:
        return c
    return dequantize(level(c, m, n, steps), m, n, steps)


def linear_mid_tread_half_quantize_reference(x: torch.Tensor, bit: int, max_value: float) -> torch.Tensor:
    """y = (floor((clip(x, 0, m) / m) * n + 0.5) / n) * m in T, rounded to x.dtype.

    ``n = 2**bit - 1``; ``bit == 32`` clips only. No argument checks: this is
    the formula, nothing else.
    """
    t = compute_dtype(x.dtype)
    m, n = constants(t, x.device, bit, max_value)
    return quantize_in_compute_type(x.to(t), m, n).to(x.dtype)


def linear_mid_tread_half_quantize_backward_reference(
    grad_y: torch.Tensor, x: torch.Tensor, max_value: float
) -> torch.Tensor:
    """grad_x = grad_y where 0 < x < m (compared in T), exactly 0 elsewhere: the straight-through gradient."""
    t = compute_dtype(x.dtype)
    xt = x.to(t)
    m = torch.tensor(max_value, dtype=t, device=x.device)
    passes = (xt > 0) & (xt < m)
    return torch.where(passes, grad_y, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device))
