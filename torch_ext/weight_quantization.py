"""Blueoil's weight quantizers: ``TTQWeightQuantizer``, and the functions of :mod:`torch_ext.ops.weight_quantization`.

The functional quantizers (binary mean scaling, channel-wise, TTQ, TWN) and
their fake kernels live with the other operator families in
:mod:`torch_ext.ops.weight_quantization`; they are importable from here too.
This module holds the ``nn.Module`` with TTQ's learned scales.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .ops.weight_quantization import (
    _check_threshold,
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    ttq_weight_quantize,
    twn_weight_quantize,
)

__all__ = [
    "TTQWeightQuantizer",
    "binary_mean_scaling_quantize",
    "binary_channel_wise_mean_scaling_quantize",
    "ttq_weight_quantize",
    "twn_weight_quantize",
]


class TTQWeightQuantizer(nn.Module):
    """:func:`ttq_weight_quantize` with its learned scales as parameters.

    ``forward(w) = ttq_weight_quantize(w, self.positive, self.negative, self.threshold)``.
    ``positive`` and ``negative`` are 0-dim ``nn.Parameter`` s starting at
    ``init`` (Blueoil: 1.0); give each quantized convolution its own
    instance, as Blueoil creates one pair per kernel. Held by a
    :class:`torch_ext.QuantConv2d`, the scales are its parameters
    (``weight_quantizer.positive``), so the optimizer and the state dict see them.

    Args:
        threshold: the cut-off fraction of ``max(|w|)``, in [0, 1) (default 0.05).
        init: the scales' initial value (default 1.0).
    """

    def __init__(self, threshold: float = 0.05, init: float = 1.0) -> None:
        super().__init__()
        self.threshold = _check_threshold(type(self).__name__, threshold, below_one=True)
        if isinstance(init, bool) or not isinstance(init, numbers.Real) or not math.isfinite(float(init)):
            raise ValueError(f"{type(self).__name__}: init must be a finite number, got {init!r}")
        self.positive = nn.Parameter(torch.tensor(float(init)))
        self.negative = nn.Parameter(torch.tensor(float(init)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The ternary weight: ``+positive`` / ``0`` / ``-negative``."""
        return ttq_weight_quantize(w, self.positive, self.negative, self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
