"""Integer codes of the linear mid-tread half quantizer, for deployment.

The quantizer (docs/quantizer.md) outputs one of ``n + 1`` levels ``(k / n) * m``,
``k = 0..n``, ``n = 2**bit - 1``. A deployment runtime or an integer kernel
wants ``k`` itself (Blueoil's converter consumes these codes):

* :func:`quantize_to_codes` gives ``k = floor((c / m) * n + 0.5)``, computed
  step by step in docs/quantizer.md's compute type ``T`` (float64 for float64 inputs,
  float32 otherwise), as the smallest integer dtype that holds ``0..n``
  (:func:`code_dtype`);
* :func:`codes_to_values` gives back ``(k / n) * m`` in ``T``, rounded to the
  requested dtype: bit for bit the forward's output, for every input that is
  not NaN.

So ``codes_to_values(quantize_to_codes(x, bit, m), bit, m, x.dtype)`` equals
``torch_ext.linear_mid_tread_half_quantize(x, bit, m)`` exactly (NaN aside:
a code cannot hold NaN, and NaN inputs get code 0).

Both are plain PyTorch tensor operations, so they run on every device
PyTorch supports (CPU, CUDA) and keep the input's shape. ``bit=32`` (clip
only) has no levels and is refused.
"""

from __future__ import annotations

import torch

from . import reference
from .ops.quantize import validate_bit, validate_max_value
from .reference import compute_dtype

__all__ = ["code_dtype", "codes_to_values", "quantize_to_codes"]

#: The input dtypes of the quantizer (docs/quantizer.md).
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def code_dtype(bit: int) -> torch.dtype:
    """The dtype of :func:`quantize_to_codes`' result for ``bit`` (1..16).

    ``torch.uint8`` for ``bit <= 8``, ``torch.int16`` for ``bit <= 15`` and
    ``torch.int32`` for ``bit == 16`` (``65535`` does not fit an ``int16``,
    and PyTorch's ``uint16`` lacks most operators, CUDA ones in particular).
    """
    bit = _check_bit("code_dtype", bit)
    if bit <= 8:
        return torch.uint8
    if bit <= 15:
        return torch.int16
    return torch.int32


def _as_from(fn: str, exc: Exception) -> Exception:
    """The functional API's error for a bad argument, naming ``fn`` instead of the operator."""
    message = str(exc).replace("linear_mid_tread_half_quantize: ", "")
    return type(exc)(f"{fn}: {message}")


def _check_bit(fn: str, bit) -> int:
    # The operator's own check, then the one rule of codes: bit=32 has no levels.
    try:
        value = validate_bit(bit)
    except (TypeError, ValueError) as exc:
        raise _as_from(fn, exc.__class__(str(exc).replace("1..16 or 32", "1..16"))) from None
    if value == 32:
        raise ValueError(
            f"{fn}: bit must be in 1..16, got bit=32: bit=32 is the full-precision (clip only) "
            "quantizer, which has no integer levels"
        )
    return value


def _check_max_value(fn: str, max_value, dtype: torch.dtype) -> float:
    try:
        return validate_max_value(max_value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise _as_from(fn, exc) from None


def quantize_to_codes(x: torch.Tensor, bit: int = 2, max_value: float = 2.0) -> torch.Tensor:
    """The quantizer's integer level ``k = floor((c / m) * n + 0.5)`` of every element of ``x``.

    ``c = min(max(x, 0), m)``, ``m = max_value``, ``n = 2**bit - 1``, each step
    rounded in docs/quantizer.md's ``T`` (float64 for float64 ``x``, float32 for float32,
    float16 and bfloat16), as the forward computes it: ties round up, ``-inf``
    gives 0 and ``+inf`` gives ``n``. NaN gives 0 (a code has no NaN).

    Args:
        x: floating tensor (float16, bfloat16, float32 or float64), any shape
            and device.
        bit: 1..16 (``bit=32`` has no levels and is refused).
        max_value: the clip ceiling ``m``, finite and > 0.

    Returns:
        Codes in ``0..n`` of ``x``'s shape and device, dtype :func:`code_dtype`
        (``uint8`` for ``bit <= 8``, ``int16`` up to 15, ``int32`` for 16).

    Raises:
        ValueError: ``bit`` not in 1..16, or ``max_value`` not finite and > 0
            or rounding to 0 or infinity in the compute type.
        TypeError: ``x`` not a floating tensor, or ``bit`` not an int.
    """
    fn = "quantize_to_codes"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got x of type {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: x must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got x of dtype {x.dtype}"
        )
    bit = _check_bit(fn, bit)
    max_value = _check_max_value(fn, max_value, x.dtype)
    t = compute_dtype(x.dtype)
    m, n = reference.constants(t, x.device, bit, max_value)
    xt = x.to(t)
    # The formula's level (torch_ext.reference: clip, divide, multiply, add, floor), NaN -> 0.
    v = reference.level(reference.clip(xt, m), m, n)
    v.nan_to_num_(nan=0.0)
    # Every value is now a whole number in 0..n: the cast is exact.
    return v.to(code_dtype(bit))


def codes_to_values(
    codes: torch.Tensor, bit: int = 2, max_value: float = 2.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The quantizer's output ``(k / n) * m`` for codes ``k`` (the inverse of :func:`quantize_to_codes`).

    Computed in docs/quantizer.md's ``T`` for ``dtype`` (float64 for float64, float32
    otherwise), then rounded to ``dtype``: exactly the values the forward
    gives for inputs of that dtype.

    Args:
        codes: integer tensor (any integer dtype, e.g. from
            :func:`quantize_to_codes`), any shape and device. Codes are not
            range-checked (that would need a device synchronisation): a code
            outside ``0..n`` maps to ``(k / n) * m`` all the same.
        bit: 1..16, as given to :func:`quantize_to_codes`.
        max_value: ``m``, finite and > 0, as given to :func:`quantize_to_codes`.
        dtype: the floating dtype of the result (float16, bfloat16, float32
            or float64); use the dtype of the quantized input.

    Raises:
        ValueError: ``bit`` not in 1..16, or ``max_value`` not finite and > 0.
        TypeError: ``codes`` not an integer tensor, ``dtype`` not floating,
            or ``bit`` not an int.
    """
    fn = "codes_to_values"
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{fn}: codes must be a torch.Tensor, got codes of type {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"{fn}: codes must be an integer tensor, got codes of dtype {codes.dtype}")
    bit = _check_bit(fn, bit)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: dtype must be a floating dtype (torch.float16, torch.bfloat16, torch.float32 or "
            f"torch.float64), got dtype={dtype!r}"
        )
    max_value = _check_max_value(fn, max_value, dtype)
    t = compute_dtype(dtype)
    m, n = reference.constants(t, codes.device, bit, max_value)
    return reference.dequantize(codes.to(t), m, n).to(dtype)
