"""A pure-PyTorch reference of docs/quantizer.md, one eager op per step.

It is slow on purpose: every step of the contract is its own rounded tensor
operation in the compute type T, so it can be read against docs/quantizer.md line by
line. Tests compare the operators with it; users can too.
"""

from __future__ import annotations

import torch

__all__ = [
    "clip",
    "compute_dtype",
    "level",
    "linear_mid_tread_half_quantize_reference",
    "linear_mid_tread_half_quantize_backward_reference",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """docs/quantizer.md's T: float64 for float64 inputs, float32 for float16, bfloat16 and float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clip(xt: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """c = min(max(x, 0), m) in T: NaN propagates, -0.0 is kept (x < 0 is false for it), -inf -> 0, +inf -> m."""
    c = torch.where(xt < 0, torch.zeros((), dtype=xt.dtype, device=xt.device), xt)
    return torch.where(c > m, m, c)


def level(c: torch.Tensor, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """floor((c / m) * n + 0.5) in T, each step one rounded operation: the code of a clipped value.

    Returns a fresh tensor (NaN where c is NaN). :func:`torch_ext.quantize_to_codes`
    and the quantizer below are built on it.
    """
    v = torch.div(c, m)  # a fresh tensor: the steps below work in place, each still one rounding
    v.mul_(n)
    v.add_(0.5)
    return v.floor_()


def linear_mid_tread_half_quantize_reference(x: torch.Tensor, bit: int, max_value: float) -> torch.Tensor:
    """y = (floor((clip(x, 0, m) / m) * n + 0.5) / n) * m in T, rounded to x.dtype.

    ``n = 2**bit - 1``; ``bit == 32`` clips only. No argument checks: this is
    the formula, nothing else.
    """
    t = compute_dtype(x.dtype)
    xt = x.to(t)
    m = torch.tensor(max_value, dtype=t, device=x.device)  # T(max_value): one rounding
    c = clip(xt, m)
    if bit == 32:
        return c.to(x.dtype)
    n = torch.tensor(2.0**bit - 1.0, dtype=t, device=x.device)
    v = torch.div(level(c, m, n), n)
    v = torch.mul(v, m)
    return v.to(x.dtype)


def linear_mid_tread_half_quantize_backward_reference(
    grad_y: torch.Tensor, x: torch.Tensor, max_value: float
) -> torch.Tensor:
    """grad_x = grad_y where 0 < x < m (compared in T), exactly 0 elsewhere."""
    t = compute_dtype(x.dtype)
    xt = x.to(t)
    m = torch.tensor(max_value, dtype=t, device=x.device)
    passes = (xt > 0) & (xt < m)
    return torch.where(passes, grad_y, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device))
