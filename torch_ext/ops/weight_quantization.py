"""Blueoil's weight quantizers (``blueoil/quantizations/binary.py`` and ``ternary.py``): API and fake kernels.

* The binary quantizers map every weight to ``+scale`` or ``-scale`` and use
  the straight-through estimator in backward (``grad_w = grad_y``), exactly as
  docs/quantizer.md ("Weight quantizers") states.
* The ternary quantizers map every weight to ``+a``, ``0`` or ``-b``:
  :func:`ttq_weight_quantize` (trained ternary quantization, the learned
  scales held by :class:`torch_ext.TTQWeightQuantizer`) and
  :func:`twn_weight_quantize` (ternary weight networks). docs/blueoil.md
  lists them with Blueoil's names.

All are written with plain PyTorch operations inside a
``torch.autograd.Function`` with ``setup_context`` and
``generate_vmap_rule``, so they run on every device PyTorch supports, for
every floating dtype, trace under ``torch.compile`` and transform under
torch.func. (A C++/CUDA kernel does not pay for weight tensors of these
sizes: docs/blueoil.md has the measurement.) The binary ones are also
registered operators (csrc/ops/weight_quantization.cpp), which ``torch.jit.trace``
records so that a traced model runs in LibTorch; their fake kernels are here.
"""

from __future__ import annotations

import math
import numbers

import torch

from .._fx import leaf_call

__all__ = [
    "binary_channel_wise_mean_scaling_quantize",
    "binary_mean_scaling_quantize",
    "ttq_weight_quantize",
    "twn_weight_quantize",
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


class _StraightThroughScaling(torch.autograd.Function):
    """The binary quantizers' gradient: straight through (docs/quantizer.md), grad_w = grad_y,
    unmasked. A subclass gives the forward."""

    generate_vmap_rule = True  # only tensor operations: torch.vmap derives the batched rule

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D401 - nothing to save
        # The straight-through estimator needs nothing from the forward pass.
        pass

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad_y


class _BinaryMeanScaling(_StraightThroughScaling):
    """Autograd function behind :func:`binary_mean_scaling_quantize`."""

    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _signed_scale(w, _mean_abs(w))


def _check_channel_dim(w: torch.Tensor) -> None:
    if w.dim() == 0:
        raise ValueError(
            "binary_channel_wise_mean_scaling_quantize: w must have an output-"
            f"channel dim (dim >= 1), got a 0-dim tensor of shape {tuple(w.shape)}"
        )


def _channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean(|w|) over every dim but the first, kept broadcastable against ``w``."""
    if w.dim() == 1:
        # One weight per output channel: the mean over an empty set of dims is
        # the element itself. (torch.mean(dim=()) would reduce over all dims.)
        return w.abs()
    return w.abs().contiguous().mean(dim=tuple(range(1, w.dim())), keepdim=True)


class _BinaryChannelWiseMeanScaling(_StraightThroughScaling):
    """Autograd function behind :func:`binary_channel_wise_mean_scaling_quantize`."""

    @staticmethod
    def forward(w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _signed_scale(w, _channel_mean_abs(w))


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
    traced = leaf_call(binary_mean_scaling_quantize, w)
    if traced is not None:
        return traced
    _check_weight(w, "binary_mean_scaling_quantize")
    if torch.jit.is_tracing():
        # torch.jit.trace records the registered operator (same values, C++ autograd), so the traced
        # model holds no Python op and runs in LibTorch.
        return torch.ops.torch_ext.binary_mean_scaling_quantize(w)
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
    traced = leaf_call(binary_channel_wise_mean_scaling_quantize, w)
    if traced is not None:
        return traced
    _check_weight(w, "binary_channel_wise_mean_scaling_quantize")
    _check_channel_dim(w)
    if torch.jit.is_tracing():  # as in binary_mean_scaling_quantize
        return torch.ops.torch_ext.binary_channel_wise_mean_scaling_quantize(w)
    return _BinaryChannelWiseMeanScaling.apply(w)


# --------------------------------------------------------------------------
# Ternary quantizers (Blueoil ``blueoil/quantizations/ternary.py``).


def _check_threshold(name: str, threshold, *, below_one: bool) -> float:
    """``threshold`` as a float, refused (naming it) unless finite, >= 0 and, where asked, < 1."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{name}: threshold must be a real number, got {threshold!r}")
    value = float(threshold)
    if not math.isfinite(value) or value < 0 or (below_one and value >= 1):
        requirement = "in [0, 1)" if below_one else "a finite number >= 0"
        raise ValueError(f"{name}: threshold must be {requirement}, got {threshold!r}")
    return value


def _check_nonempty(w: torch.Tensor, name: str) -> None:
    _check_weight(w, name)
    if w.numel() == 0:
        raise ValueError(f"{name}: w must have at least one element, got shape {tuple(w.shape)}")


def _check_scale(scale, w: torch.Tensor, name: str, argument: str) -> None:
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name}: {argument} must be a 0-dim torch.Tensor, got {type(scale).__name__}")
    if scale.dim() != 0:
        raise ValueError(f"{name}: {argument} must be a 0-dim tensor, got shape {tuple(scale.shape)}")
    if scale.dtype != w.dtype or scale.device != w.device:
        raise TypeError(
            f"{name}: {argument} must have w's dtype and device ({w.dtype}, {w.device}), "
            f"got {argument}.dtype={scale.dtype}, {argument}.device={scale.device}"
        )


# The ternary quantizers select with 0/1 float masks and multiplications
# rather than torch.where: on CPU a boolean-mask where/masked_fill costs about
# ten times a multiplication (docs/blueoil.md has the numbers), and multiplying
# by an exact 0 or 1 gives the same values as selecting.


def _ttq_masks(w: torch.Tensor, threshold: float):
    # The cut-off in w's dtype (Blueoil: float32 max times a float32 threshold).
    cutoff = w.abs().amax() * threshold
    return w > cutoff, w < -cutoff


class _TTQ(torch.autograd.Function):
    """Autograd function behind :func:`ttq_weight_quantize`."""

    generate_vmap_rule = True  # only tensor operations: torch.vmap derives the batched rule

    @staticmethod
    def forward(w, positive, negative, threshold):  # type: ignore[override]
        above, below = _ttq_masks(w, threshold)
        # p * 1 - n * 0 = p, p * 0 - n * 1 = -n; in the middle 0 * p - 0 * n is +-0.0,
        # and adding +0.0 makes it +0.0 (as Blueoil's where(..., zeros)) without changing any other value.
        return (above.to(w.dtype) * positive - below.to(w.dtype) * negative) + 0.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, positive, negative, threshold = inputs
        above, below = _ttq_masks(w, threshold)
        ctx.save_for_backward(above, below, positive, negative)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        above, below, positive, negative = ctx.saved_tensors
        a = above.to(grad_y.dtype)
        b = below.to(grad_y.dtype)
        grad_w = grad_p = grad_n = None
        if ctx.needs_input_grad[0]:
            # The factor is exactly positive, negative or 1 (0/1 masks), so grad_w is g*p, g*n or g.
            grad_w = grad_y * (a * positive + b * negative + (1.0 - a - b))
        if ctx.needs_input_grad[1]:
            grad_p = (grad_y * a).sum()
        if ctx.needs_input_grad[2]:
            # Blueoil's sign (and the TTQ paper's): +sum, although the forward has -negative there.
            grad_n = (grad_y * b).sum()
        return grad_w, grad_p, grad_n, None


def ttq_weight_quantize(
    w: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, threshold: float = 0.05
) -> torch.Tensor:
    """Trained ternary quantization (Blueoil ``ttq_weight_quantizer``; Zhu et al. 2016).

    Forward, with one cut-off for the whole tensor::

        t = max(|w|) * threshold
        y = +positive   where w >  t
            -negative   where w < -t
            0           elsewhere (so an exact zero weight maps to +0.0)

    Backward, as Blueoil defines it (``g = grad_y``)::

        grad_w        = g * positive  where w > t;  g * negative  where w < -t;  g elsewhere
        grad_positive = sum(g over w >  t)
        grad_negative = sum(g over w < -t)

    ``grad_negative`` has Blueoil's (and the TTQ paper's) sign: the derivative
    of ``-negative`` would be ``-sum``; we keep Blueoil's so that a Blueoil
    recipe trains the same way. ``t`` is computed in ``w``'s dtype, as
    Blueoil computes it in float32. The selections are computed as 0/1 masks
    times the scales, which gives exactly Blueoil's values for finite scales
    (an infinite scale would give NaN instead of 0 outside its region).

    Args:
        w: floating-point tensor of any shape, at least one element.
        positive: 0-dim tensor (the learned positive scale), ``w``'s dtype and device.
        negative: 0-dim tensor (the learned negative scale), ``w``'s dtype and device.
        threshold: cut-off as a fraction of ``max(|w|)``, in [0, 1) (default 0.05).

    Returns:
        A tensor of ``w``'s shape, dtype and device.

    Raises:
        TypeError: ``w`` not a floating tensor, a scale not a tensor or of
            another dtype/device, ``threshold`` not a number.
        ValueError: ``w`` empty, a scale not 0-dim, ``threshold`` out of range.
    """
    name = "ttq_weight_quantize"
    traced = leaf_call(ttq_weight_quantize, w, positive, negative, threshold)
    if traced is not None:
        return traced
    _check_nonempty(w, name)
    _check_scale(positive, w, name, "positive")
    _check_scale(negative, w, name, "negative")
    threshold = _check_threshold(name, threshold, below_one=True)
    return _TTQ.apply(w, positive, negative, threshold)


class _TWN(torch.autograd.Function):
    """Autograd function behind :func:`twn_weight_quantize`."""

    generate_vmap_rule = True  # only tensor operations: torch.vmap derives the batched rule

    @staticmethod
    def forward(w, threshold):  # type: ignore[override]
        # Sums in float32 at least: a float16 sum of |w| or count overflows at 65504.
        acc = torch.promote_types(w.dtype, torch.float32)
        a = w.abs().contiguous()  # layout-independent sums, as _mean_abs
        # Blueoil's order of operations: sum(|w|) * threshold / size.
        delta = a.sum(dtype=acc) * threshold / w.numel()
        sign = (w > delta).to(w.dtype) - (w < -delta).to(w.dtype)  # 1, -1, or 0 (|w| <= delta)
        # alpha = mean(|w| over the kept entries); 0 when none is kept (Blueoil: NaN).
        count = torch.count_nonzero(sign).clamp(min=1).to(acc)
        alpha = (a * sign.abs()).sum(dtype=acc) / count
        # alpha >= 0, so the middle is +0.0 * alpha = +0.0.
        return sign * alpha.to(w.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        # Straight-through estimator, as Blueoil: grad_w = grad_y.
        return grad_y, None


def twn_weight_quantize(w: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """Ternary weight networks (Blueoil ``twn_weight_quantizer``; Li et al. 2016).

    Forward, over the whole tensor (as Blueoil: one ``delta`` and one ``alpha`` per weight)::

        delta = sum(|w|) * threshold / numel(w)          # threshold * mean(|w|)
        kept  = |w| > delta
        alpha = sum(|w| over kept) / count(kept)
        y     = alpha * sign(w)   where kept, else 0

    An exact zero weight is never kept (``delta >= 0``), so it maps to +0.0.
    Backward is the straight-through estimator ``grad_w = grad_y``. The sums
    run in float32 or wider (float16 would overflow), ``delta`` is compared
    and ``alpha`` returned in ``w``'s dtype.

    Departure from Blueoil: when no entry is kept (an all-zero weight, or a
    ``threshold`` so large that ``delta >= max(|w|)``), Blueoil divides 0 by 0
    and returns NaN everywhere; this returns zeros (``alpha = 0``), so one
    dead layer does not turn the whole network into NaN.

    Args:
        w: floating-point tensor of any shape, at least one element.
        threshold: ``delta`` as a multiple of ``mean(|w|)``, finite and >= 0 (default 0.7).

    Returns:
        A tensor of ``w``'s shape, dtype and device.

    Raises:
        TypeError: ``w`` not a floating tensor, ``threshold`` not a number.
        ValueError: ``w`` empty, ``threshold`` negative or not finite.
    """
    name = "twn_weight_quantize"
    traced = leaf_call(twn_weight_quantize, w, threshold)
    if traced is not None:
        return traced
    _check_nonempty(w, name)
    threshold = _check_threshold(name, threshold, below_one=False)
    return _TWN.apply(w, threshold)


# --------------------------------------------------------------------------
# Fake kernels of the binary operators. The output is laid out like w (the
# kernels write into empty_like(w)); the checks are the functional API's,
# with the C++ kernels' wording: tracing refuses what eager refuses.


@torch.library.register_fake("torch_ext::binary_mean_scaling_quantize")
def _binary_mean_scaling_fake(w):
    _check_weight(w, "binary_mean_scaling_quantize")
    return torch.empty_like(w)


@torch.library.register_fake("torch_ext::binary_channel_wise_mean_scaling_quantize")
def _binary_channel_wise_mean_scaling_fake(w):
    _check_weight(w, "binary_channel_wise_mean_scaling_quantize")
    _check_channel_dim(w)
    return torch.empty_like(w)
