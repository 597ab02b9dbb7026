"""Blueoil's binary weight quantizers (``blueoil/quantizations/binary.py``).

Both quantizers map every weight to ``+scale`` or ``-scale`` and use the
straight-through estimator in backward (``grad_w = grad_y``), exactly as
docs/quantizer.md ("Weight quantizers") states. They are written with plain PyTorch
operations inside a ``torch.autograd.Function``, so they run on every device
PyTorch supports, for every floating dtype, and trace under ``torch.compile``.
"""

from __future__ import annotations

import torch

__all__ = [
    "binary_mean_scaling_quantize",
    "binary_channel_wise_mean_scaling_quantize",
]


def _check_weight(w: torch.Tensor, name: str) -> None:
    """Refuse inputs the formulas do not cover, naming the argument (docs/quantizer.md)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(
            f"{name}: w must have a floating dtype, got dtype={w.dtype}"
        )


def _signed_scale(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # where(w >= 0, 1, -1) * scale is exactly where(w >= 0, scale, -scale):
    # multiplying by +-1 is exact in IEEE arithmetic, and selecting avoids an
    # extra full-size temporary. `w >= 0` is what maps a zero weight to +scale.
    return torch.where(w >= 0, scale, -scale)


def _mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean(|w|) over the whole tensor."""
    # A float sum's rounding depends on the order of the terms, which follows
    # the memory layout: summing a contiguous copy makes a channels_last or
    # strided weight give exactly the scale of its contiguous twin. (Weights
    # are small; the copy costs nothing next to the convolution.)
    return w.abs().contiguous().mean()


class _BinaryMeanScaling(torch.autograd.Function):
    """Autograd function behind :func:`binary_mean_scaling_quantize`."""

    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _signed_scale(w, _mean_abs(w))

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D401 - nothing to save
        # The straight-through estimator needs nothing from the forward pass.
        pass

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Straight-through estimator (docs/quantizer.md): grad_w = grad_y, unmasked.
        return grad_y


def _channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean(|w|) over every dim but the first, kept broadcastable against ``w``."""
    if w.dim() == 1:
        # One weight per output channel: the mean over an empty set of dims is
        # the element itself. (torch.mean(dim=()) would reduce over all dims.)
        return w.abs()
    return w.abs().contiguous().mean(dim=tuple(range(1, w.dim())), keepdim=True)


class _BinaryChannelWiseMeanScaling(torch.autograd.Function):
    """Autograd function behind :func:`binary_channel_wise_mean_scaling_quantize`."""

    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _signed_scale(w, _channel_mean_abs(w))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_y


def binary_mean_scaling_quantize(w: torch.Tensor) -> torch.Tensor:
    """Binary mean scaling quantizer (Blueoil ``binary_mean_scaling_quantizer``).

    Forward::

        y = where(w >= 0, 1, -1) * mean(|w|)        # mean over the whole tensor

    so a zero weight maps to ``+mean(|w|)``. Backward is the straight-through
    estimator ``grad_w = grad_y``.

    Args:
        w: floating-point tensor of any shape (typically a conv weight).

    Returns:
        A tensor of ``w``'s shape, dtype and device.

    Raises:
        TypeError: if ``w`` is not a floating-point tensor.
    """
    _check_weight(w, "binary_mean_scaling_quantize")
    return _BinaryMeanScaling.apply(w)


def binary_channel_wise_mean_scaling_quantize(w: torch.Tensor) -> torch.Tensor:
    """Binary channel-wise mean scaling quantizer (Blueoil
    ``binary_channel_wise_mean_scaling_quantizer``).

    Forward, for a weight whose first dim is the output channel (PyTorch conv
    layout ``[out, in, kh, kw]``)::

        scale[o] = mean(|w[o, ...]|)                 # over dims 1 .. w.dim()-1
        y[o, ...] = where(w[o, ...] >= 0, 1, -1) * scale[o]

    Backward is the straight-through estimator ``grad_w = grad_y``.

    Args:
        w: floating-point tensor with at least one dim.

    Returns:
        A tensor of ``w``'s shape, dtype and device.

    Raises:
        TypeError: if ``w`` is not a floating-point tensor.
        ValueError: if ``w`` is 0-dim (it has no output-channel dim).
    """
    _check_weight(w, "binary_channel_wise_mean_scaling_quantize")
    if w.dim() == 0:
        raise ValueError(
            "binary_channel_wise_mean_scaling_quantize: w must have an output-"
            f"channel dim (dim >= 1), got a 0-dim tensor of shape {tuple(w.shape)}"
        )
    return _BinaryChannelWiseMeanScaling.apply(w)
