"""Integer codes (torch_ext/codes.py): quantize_to_codes / codes_to_values.

codes_to_values(quantize_to_codes(x)) must be bit for bit the operator's
output, for every dtype, bit width and rounding tie, on every device.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import BITS, DTYPES, assert_bit_exact, tie_values

import torch_ext
from torch_ext.codes import code_dtype, codes_to_values, quantize_to_codes

CODE_BITS = tuple(b for b in BITS if b != 32)
MAX_VALUES = (2.0, 1.0, 0.1, 6.0, 3.7, 1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_equals_the_operator_bit_for_bit(device, dtype):
    # Every tie k*m/(2n), its neighbours one ulp away, 0, -0.0, m, +-inf, huge values.
    for bit in CODE_BITS:
        for max_value in MAX_VALUES:
            x = tie_values(dtype, bit, max_value, max_k=512).to(device)
            x = x[~x.isnan()]  # a code has no NaN (tested below)
            y = torch.ops.torch_ext.linear_mid_tread_half_quantize(x, bit, max_value)
            codes = quantize_to_codes(x, bit, max_value)
            assert codes.dtype == code_dtype(bit) and codes.device == x.device
            assert_bit_exact(codes_to_values(codes, bit, max_value, dtype), y, f"{dtype} bit={bit} m={max_value}")


def test_codes_are_the_levels(device):
    n = 2**3 - 1
    x = torch.tensor([-1.0, -0.0, 0.0, 0.1, 1.0, 1.5, 2.0, 3.0, float("inf"), float("-inf"), float("nan")],
                     device=device)
    codes = quantize_to_codes(x, 3, 2.0)
    # floor((c/m)*n + 0.5): ties round up (1.0 -> 3.5 -> 4), -inf -> 0, +inf -> n, NaN -> 0.
    assert codes.tolist() == [0, 0, 0, 0, 4, 5, n, n, n, 0, 0]
    # docs/quantizer.md's example: bit=1, max_value=2, x=1.0 gives the upper level.
    assert quantize_to_codes(torch.tensor([1.0], device=device), 1, 2.0).tolist() == [1]
    assert codes_to_values(codes, 3, 2.0).tolist() == pytest.approx(
        [0.0, 0.0, 0.0, 0.0, 8 / 7, 10 / 7, 2.0, 2.0, 2.0, 0.0, 0.0]
    )


@pytest.mark.parametrize(
    "bit, dtype", [(1, torch.uint8), (8, torch.uint8), (9, torch.int16), (15, torch.int16), (16, torch.int32)]
)
def test_code_dtypes_hold_every_level(bit, dtype):
    assert code_dtype(bit) == dtype
    n = 2**bit - 1
    x = torch.tensor([-5.0, 0.0, 1.0, 2.0, 9.0])
    codes = quantize_to_codes(x, bit, 2.0)
    assert codes.dtype == dtype
    assert codes.tolist() == [0, 0, (n + 1) // 2, n, n]  # (1/2)*n + 0.5 rounds up for odd n
    values = codes_to_values(codes, bit, 2.0).tolist()
    assert values[:2] == [0.0, 0.0] and values[3:] == [2.0, 2.0]


def test_float64_is_computed_in_float64():
    # Near the ties, float64 inputs give other codes than the same values
    # rounded to float32 would: T is float64 for them, as in the operator.
    x = tie_values(torch.float64, 2, 2.0)
    x = x[~x.isnan()]
    codes = quantize_to_codes(x, 2, 2.0)
    assert bool((codes != quantize_to_codes(x.float(), 2, 2.0)).any())
    y = torch_ext.linear_mid_tread_half_quantize(x, 2, 2.0)
    assert_bit_exact(codes_to_values(codes, 2, 2.0, torch.float64), y)


def test_default_dtype_other_integer_dtypes_layouts_and_shapes():
    x = torch.randn(2, 3, 4, 5) * 2
    y = torch_ext.linear_mid_tread_half_quantize(x, 4, 2.0)
    codes = quantize_to_codes(x, 4, 2.0)
    assert codes.shape == x.shape
    assert_bit_exact(codes_to_values(codes, 4, 2.0), y)  # dtype defaults to float32
    assert_bit_exact(codes_to_values(codes.long(), 4, 2.0), y)
    assert_bit_exact(codes_to_values(codes.to(torch.int8), 4, 2.0), y)
    # Strided and channels_last inputs: the same codes as contiguous ones.
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(quantize_to_codes(cl, 4, 2.0), codes)
    assert torch.equal(quantize_to_codes(x.transpose(1, 3), 4, 2.0), codes.transpose(1, 3))
    # Empty and 0-dim tensors.
    assert quantize_to_codes(torch.empty(0, 3), 2, 2.0).shape == (0, 3)
    zero_dim = quantize_to_codes(torch.tensor(1.2), 2, 2.0)
    assert zero_dim.shape == () and zero_dim.item() == 2
    assert codes_to_values(zero_dim, 2, 2.0).shape == ()


def test_input_is_not_modified():
    x = torch.randn(100) * 3
    before = x.clone()
    codes = quantize_to_codes(x, 2, 2.0)
    codes_before = codes.clone()
    codes_to_values(codes, 2, 2.0)
    assert torch.equal(x, before) and torch.equal(codes, codes_before)


@pytest.mark.parametrize("bit", [0, 17, -1, 33])
def test_refuses_bad_bit(bit):
    x = torch.ones(3)
    with pytest.raises(ValueError, match=rf"quantize_to_codes: bit must be in 1\.\.16, got bit={bit}"):
        quantize_to_codes(x, bit, 2.0)
    with pytest.raises(ValueError, match=rf"codes_to_values: bit must be in 1\.\.16, got bit={bit}"):
        codes_to_values(torch.ones(3, dtype=torch.uint8), bit, 2.0)


def test_refuses_bit_32_clearly():
    with pytest.raises(ValueError, match=r"got bit=32.*no integer levels"):
        quantize_to_codes(torch.ones(3), 32, 2.0)
    with pytest.raises(ValueError, match=r"got bit=32.*no integer levels"):
        codes_to_values(torch.ones(3, dtype=torch.int32), 32, 2.0)
    with pytest.raises(ValueError, match=r"got bit=32"):
        code_dtype(32)


@pytest.mark.parametrize("bit", [2.0, True, "2", None])
def test_refuses_non_int_bit(bit):
    with pytest.raises(TypeError, match=r"quantize_to_codes: bit must be an int"):
        quantize_to_codes(torch.ones(3), bit, 2.0)


@pytest.mark.parametrize("max_value", [0.0, -1.0, float("inf"), float("-inf"), float("nan")])
def test_refuses_bad_max_value(max_value):
    with pytest.raises(ValueError, match=r"quantize_to_codes: max_value must be finite and > 0, got max_value="):
        quantize_to_codes(torch.ones(3), 2, max_value)
    with pytest.raises(ValueError, match=r"codes_to_values: max_value must be finite and > 0, got max_value="):
        codes_to_values(torch.ones(3, dtype=torch.uint8), 2, max_value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_refuses_non_floating_x(dtype):
    x = torch.ones(3, dtype=dtype)
    message = rf"quantize_to_codes: x must be a floating-point tensor.*got x of dtype {dtype}"
    with pytest.raises(TypeError, match=message):
        quantize_to_codes(x, 2, 2.0)
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        quantize_to_codes([1.0, 2.0], 2, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_refuses_non_integer_codes(dtype):
    message = rf"codes_to_values: codes must be an integer tensor, got codes of dtype {dtype}"
    with pytest.raises(TypeError, match=message):
        codes_to_values(torch.ones(3, dtype=dtype), 2, 2.0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, "float32"])
def test_refuses_non_floating_result_dtype(dtype):
    with pytest.raises(TypeError, match=r"codes_to_values: dtype must be a floating dtype"):
        codes_to_values(torch.ones(3, dtype=torch.uint8), 2, 2.0, dtype)


@pytest.mark.parametrize("max_value", [1e-46, 1e39])
def test_max_value_that_rounds_to_zero_or_inf_is_refused(max_value):
    # Finite and > 0 as a double, but 0 or inf in float32 (the compute type of float32 x).
    x = torch.rand(5)
    with pytest.raises(ValueError, match=rf"quantize_to_codes: max_value={re.escape(f'{max_value:g}')}.*float32"):
        quantize_to_codes(x, 2, max_value)
    with pytest.raises(ValueError, match=r"codes_to_values: max_value="):
        codes_to_values(torch.zeros(5, dtype=torch.uint8), 2, max_value, torch.float32)
    # float64 computes in float64, where both values are fine.
    assert quantize_to_codes(x.double(), 2, max_value).dtype == torch.uint8
