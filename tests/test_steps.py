"""The CPU forward's step form: the same bits as the formula, with no division.

For 1 to 3 bits (and 4 bits, and the clip of bit=32, for float16 and
bfloat16) the CPU kernels find, once a call, the n thresholds where
floor((clip(x, m) / m) * n + 0.5) steps up and the n + 1 results, and then
compare and select on the bits of x (docs/quantizer.md, "How the CPU computes
it"). These tests hold that form to the reference formula where it could go
wrong: every bit pattern of the 16-bit types, and for float32 and float64
every value within a few thousand ulps of each rounding tie k*m/(2n), of 0
and of m, for max_values that are and are not representable, tiny and huge;
through every entry point (no grad, training forward with its mask, in
place). The wider formula paths (4 bits and more for float32/float64) run
the same checks. Every test runs each compiled copy of the loops (baseline
x86-64, AVX2, AVX-512; TORCH_EXT_CPU_ISA caps the one used), so a machine
with AVX-512 tests all three.
"""

from __future__ import annotations

import math

import pytest
import torch

from torch_ext.reference import (
    linear_mid_tread_half_quantize_backward_reference as reference_backward,
    linear_mid_tread_half_quantize_reference as reference,
)

from conftest import INT_OF, assert_bit_exact, dtype_id, expected_mask, unpack_mask, values_around as _around

ops = torch.ops.torch_ext

CPU_ISAS = ("baseline", "avx2", "avx512")


@pytest.fixture(params=CPU_ISAS, autouse=True)
def cpu_isa(request, monkeypatch):
    """Each test once per copy of the CPU loops (a CPU without an ISA runs the next narrower one)."""
    monkeypatch.setenv("TORCH_EXT_CPU_ISA", request.param)
    return request.param

NAN_BITS = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0, torch.float32: 0x7FC00000,
            torch.float64: 0x7FF8000000000000}

#: max_values: representable or not in each type, tiny (subnormal in the
#: 16-bit types, or in float32), huge, and float16's overflow edge.
MAX_VALUES = (2.0, 1.0, 3.0, 6.0, 0.1, 0.7, 1.0 / 3.0, 1e-3, 1e-6, 1e-30, 1.7e4, 65504.0, 65520.0, 1e5, 3e38)


def _all_entry_points(x: torch.Tensor, bit: int, max_value: float, what: str) -> None:
    """quantize, forward (y and mask) and forward_ in place: the reference's bits."""
    expected = reference(x, bit, max_value)
    nan_bits = NAN_BITS[x.dtype]
    y = ops.linear_mid_tread_half_quantize(x, bit, max_value)
    assert_bit_exact(y, expected, f"quantize {what}", nan_payload=False)
    assert (y.view(INT_OF[x.dtype])[y.isnan()] == nan_bits).all(), f"{what}: NaN is not the one NaN"
    y_fwd, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    assert torch.equal(y_fwd.view(INT_OF[x.dtype]), y.view(INT_OF[x.dtype])), f"forward {what}"
    flags, padding = unpack_mask(mask, x.numel())
    assert torch.equal(flags, expected_mask(x, max_value)), f"mask {what}"
    assert not padding.any(), f"mask padding {what}"
    x_in_place = x.clone()
    mask_in_place = ops.linear_mid_tread_half_quantize_forward_(x_in_place, bit, max_value)
    assert torch.equal(x_in_place.view(INT_OF[x.dtype]), y.view(INT_OF[x.dtype])), f"forward_ {what}"
    assert torch.equal(mask_in_place, mask), f"forward_ mask {what}"
    x_in_place = x.clone()
    ops.linear_mid_tread_half_quantize_(x_in_place, bit, max_value)
    assert torch.equal(x_in_place.view(INT_OF[x.dtype]), y.view(INT_OF[x.dtype])), f"quantize_ {what}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bit", [1, 2, 3, 4, 5, 32])
def test_every_16_bit_pattern(dtype, bit):
    # 65536 patterns in an odd-sized tensor: blocks end inside a mask byte.
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = torch.cat([patterns, patterns[:4099]])
    for max_value in MAX_VALUES:
        if not math.isfinite(torch.tensor(max_value, dtype=torch.float32).item()):
            continue
        _all_entry_points(x, bit, max_value, f"{dtype} bit={bit} m={max_value}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_every_value_near_each_step(dtype, bit):
    n = 2**bit - 1
    tiny = 1e-40 if dtype == torch.float32 else 1e-310  # subnormal max_values
    for max_value in MAX_VALUES + (tiny, 1e300 if dtype == torch.float64 else 3.4e38):
        m = torch.tensor(max_value, dtype=dtype).item()
        centers = torch.tensor([k * m / (2 * n) for k in range(2 * n + 1)] + [m], dtype=torch.float64)
        x = _around(dtype, centers, 1500)
        _all_entry_points(x, bit, max_value, f"{dtype} bit={bit} m={max_value}")


def test_many_threads_and_tails():
    """A size that splits over threads and ends mid-block: the step form per block."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = ((torch.rand(1_000_003, generator=g, dtype=torch.float64) * 3.0 - 0.5) * 2.0).to(dtype)
        for bit in (1, 2, 3, 4, 32):
            _all_entry_points(x, bit, 2.0, f"{dtype} bit={bit}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=dtype_id)
def test_backward_of_every_copy(dtype):
    """The backward masks grad_y by the forward's mask, bit for bit (inf, NaN and -0.0 in grad_y)."""
    g = torch.Generator().manual_seed(1)
    x = ((torch.rand(70_001, generator=g, dtype=torch.float64) * 3.0 - 0.5) * 2.0).to(dtype)
    grad_y = torch.randn(70_001, generator=g, dtype=torch.float64).to(dtype)
    grad_y[::97] = math.inf
    grad_y[1::89] = math.nan
    grad_y[2::83] = -0.0
    _, mask = ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)
    grad_x = ops.linear_mid_tread_half_quantize_backward(grad_y, mask)
    assert_bit_exact(grad_x, reference_backward(grad_y, x, 2.0))
