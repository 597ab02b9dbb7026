"""Property-based tests (hypothesis): the operator equals the pure-PyTorch
reference of docs/quantizer.md, bit for bit, on random inputs.

Random shapes (0 to 5 dims, sizes that are no multiple of any vector width),
random views (step slices, transposes, permutations, expands, storage offsets,
channels_last), every dtype, every valid bit width, max_values over the whole
range of finite doubles > 0 (awkward ones such as 1/3, 1e-6 and 1e6, and both
sides of where float32 rounds them to 0 or to infinity: those are refused with
a ValueError for every input but float64, and any other never gives NaN for
finite input), values drawn around the rounding ties k*m/(2n)
and their float neighbours, and specials; forward, in place, the kernel ops
and the gradient; CPU, and CUDA where visible (also compared with the CPU).

The budget is the hypothesis profile: "ci" by default (tests/conftest.py),
``pytest --hypothesis-profile=long`` for long runs. The number of examples
each test ran is printed at the end of the session.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, note, strategies as st

import torch_ext
from torch_ext.reference import (
    linear_mid_tread_half_quantize_backward_reference as reference_backward,
    linear_mid_tread_half_quantize_reference as reference,
)

from conftest import (
    BITS,
    DEVICES,
    DTYPES,
    EXAMPLE_COUNTS,
    HAS_CUDA,
    assert_bit_exact,
    assert_same_layout,
    expected_mask_in_layout,
    unpack_mask,
)

ops = torch.ops.torch_ext

#: Where float32 (the compute type of every input but float64) rounds a
#: max_value to 0 (at or below) or to infinity (at or above).
FLT_ROUNDS_TO_ZERO = 2.0**-150
FLT_ROUNDS_TO_INF = float.fromhex("0x1.ffffffp+127")

#: Awkward max_values: not representable, tiny, huge, the float neighbours of
#: 2, and both sides of where float32 rounds them to 0 or to infinity.
AWKWARD_MAX_VALUES = (
    1.0 / 3.0, 1e-6, 1e6, 2.0, 0.1, 6.0, 1.0, 255.0, 65504.0, 1e-30, 1e30,
    math.nextafter(2.0, 0.0), math.nextafter(2.0, 3.0), 2.0 / 3.0, 0.7,
    1e-46, 1e39, FLT_ROUNDS_TO_ZERO, math.nextafter(FLT_ROUNDS_TO_ZERO, 1.0), 2.0**-149,
    FLT_ROUNDS_TO_INF, math.nextafter(FLT_ROUNDS_TO_INF, 0.0), float(torch.finfo(torch.float32).max),
    5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
)

MAX_NUMEL = 3000


def _count(name: str) -> None:
    EXAMPLE_COUNTS[name] = EXAMPLE_COUNTS.get(name, 0) + 1


#: Every finite max_value > 0, subnormals and the largest double included.
max_values = st.one_of(
    st.sampled_from(AWKWARD_MAX_VALUES),
    st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False, allow_subnormal=True),
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
)


def refused_in_compute_type(dtype: torch.dtype, max_value: float) -> bool:
    """docs/quantizer.md: max_value is refused where it rounds to 0 or to
    infinity in x's compute type T (float64 for float64, else float32),
    decided here by the rounding itself, independently of the C++ check."""
    if dtype == torch.float64:
        return False
    m = torch.tensor(max_value, dtype=torch.float64).to(torch.float32)
    return bool(m == 0) or bool(m.isinf())


def expect_refused_or_no_nan(x: torch.Tensor, bit: int, max_value: float, what: str) -> bool:
    """True (and checks the refusal) where max_value is refused for x: a
    ValueError naming the value, from the functional API and the kernel ops,
    with x left untouched. Else False: the caller checks the results."""
    _count("max_value refused" if refused_in_compute_type(x.dtype, max_value) else "max_value accepted")
    if not refused_in_compute_type(x.dtype, max_value):
        return False
    x0 = x.clone()
    for call in (
        lambda: torch_ext.linear_mid_tread_half_quantize(x, bit, max_value),
        lambda: ops.linear_mid_tread_half_quantize_forward(x, bit, max_value),
        lambda: ops.linear_mid_tread_half_quantize_(x, bit, max_value),
        lambda: ops.linear_mid_tread_half_quantize_forward_(x, bit, max_value),
    ):
        with pytest.raises(ValueError, match=rf"max_value={re.escape(f'{max_value:g}')} rounds to (0|infinity) in float32"):
            call()
    assert_bit_exact(x, x0, "x untouched by a refused call " + what)
    return True


def assert_no_nan_for_finite_input(y: torch.Tensor, x: torch.Tensor, what: str) -> None:
    finite = x.isfinite()
    assert not y[finite].isnan().any(), f"NaN from finite input: {what}"


@st.composite
def shapes(draw, max_dims=5, max_numel=MAX_NUMEL):
    dims = draw(st.integers(0, max_dims))
    shape = []
    budget = max_numel
    for _ in range(dims):
        size = draw(st.integers(0, min(budget, 19)))
        shape.append(size)
        budget = max(1, budget // max(size, 1))
    return tuple(shape)


def _values(numel, dtype, bit, max_value, seed, mix):
    """``numel`` values: ties k*m/(2n) and their ulp neighbours, uniform values
    over [-m/2, 3m/2], and specials, in proportions ``mix``."""
    g = torch.Generator().manual_seed(seed)
    n = 2.0**bit - 1.0 if bit != 32 else 255.0
    k = torch.randint(0, int(2 * n) + 1, (numel,), generator=g).to(torch.float64)
    ties = (k * max_value / (2.0 * n)).to(dtype)
    steps = torch.randint(-2, 3, (numel,), generator=g)
    for direction, count in ((float("inf"), 1), (float("inf"), 2), (float("-inf"), -1), (float("-inf"), -2)):
        moved = ties.clone()
        for _ in range(abs(count)):
            moved = torch.nextafter(moved, torch.full_like(moved, direction))
        ties = torch.where(steps == count, moved, ties)
    uniform = ((torch.rand(numel, generator=g, dtype=torch.float64) * 2.0 - 0.5) * max_value).to(dtype)
    finfo = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), finfo.max, -finfo.max, finfo.tiny / 3, max_value, -1.0],
        dtype=torch.float64,
    ).to(dtype)
    special = specials[torch.randint(0, specials.numel(), (numel,), generator=g)]
    choice = torch.multinomial(torch.tensor(mix, dtype=torch.float64), numel, replacement=True, generator=g) if numel else torch.empty(0, dtype=torch.long)
    return torch.where(choice == 0, ties, torch.where(choice == 1, uniform, special))


@st.composite
def inputs(draw, devices=DEVICES):
    """(x, bit, max_value, description): x a random view of random values."""
    dtype = draw(st.sampled_from(DTYPES))
    bit = draw(st.sampled_from(BITS))
    # Over the whole range: a max_value that rounds to 0 or inf in T is
    # refused (expect_refused_or_no_nan), any other is quantized without NaN.
    max_value = draw(max_values)
    device = draw(st.sampled_from(devices))
    shape = draw(shapes())
    view = draw(st.sampled_from(["contiguous", "transpose", "permute", "step_slice", "expand", "offset", "channels_last"]))
    seed = draw(st.integers(0, 2**32 - 1))
    mix = draw(st.sampled_from([(6, 3, 1), (1, 0, 0), (0, 1, 0), (1, 1, 1), (8, 1, 1)]))

    def fill(base_shape):
        numel = math.prod(base_shape)
        return _values(numel, dtype, bit, max_value, seed, mix).reshape(base_shape).to(device)

    dims = len(shape)
    if view == "transpose" and dims >= 2:
        a, b = draw(st.permutations(range(dims)))[:2]
        base_shape = list(shape)
        base_shape[a], base_shape[b] = base_shape[b], base_shape[a]
        x = fill(tuple(base_shape)).transpose(a, b)
    elif view == "permute" and dims >= 2:
        perm = draw(st.permutations(range(dims)))
        inverse = [perm.index(i) for i in range(dims)]
        base_shape = tuple(shape[p] for p in perm)
        x = fill(base_shape).permute(*inverse)
    elif view == "step_slice" and dims >= 1:
        d = draw(st.integers(0, dims - 1))
        step = draw(st.integers(2, 4))
        start = draw(st.integers(0, step - 1))
        base_shape = list(shape)
        base_shape[d] = shape[d] * step + start
        index = [slice(None)] * dims
        index[d] = slice(start, start + shape[d] * step, step)
        x = fill(tuple(base_shape))[tuple(index)]
    elif view == "expand" and dims >= 1:
        which = draw(st.lists(st.booleans(), min_size=dims, max_size=dims))
        base_shape = tuple(1 if w else s for w, s in zip(which, shape))
        x = fill(base_shape).expand(*shape)
    elif view == "offset":
        numel = math.prod(shape)
        offset = draw(st.integers(1, 7))
        x = fill((numel + offset + 3,))[offset : offset + numel].view(shape)
    elif view == "channels_last" and dims in (4, 5):
        fmt = torch.channels_last if dims == 4 else torch.channels_last_3d
        x = fill(shape).contiguous(memory_format=fmt)
    else:
        view = "contiguous"
        x = fill(shape)
    assert tuple(x.shape) == shape
    description = f"{view} {tuple(shape)} strides={x.stride()} {dtype} bit={bit} max_value={max_value!r} {device}"
    note(description)
    return x, bit, max_value, description


def _grad_y(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Random grad_y, with inf, -inf, NaN and -0.0 mixed in (also outside (0, m))."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    flat = grad.view(-1)
    if flat.numel():
        specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=x.dtype)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 5),), generator=g)
        flat[idx] = specials[torch.randint(0, 4, (idx.numel(),), generator=g)]
    return grad.to(x.device)


@given(inputs())
def test_forward_matches_reference(case):
    x, bit, max_value, what = case
    _count("forward")
    if expect_refused_or_no_nan(x, bit, max_value, what):
        return
    expected = reference(x.cpu(), bit, max_value)
    y = torch_ext.linear_mid_tread_half_quantize(x, bit, max_value)
    assert y.device == x.device
    assert_bit_exact(y, expected, what, nan_payload=False)
    assert_no_nan_for_finite_input(y, x, what)
    # Laid out as PyTorch lays out an elementwise result (channels_last stays).
    assert_same_layout(y, torch.clamp(x, 0, 1), what)
    if x.is_cuda:
        assert_bit_exact(y, torch_ext.linear_mid_tread_half_quantize(x.cpu(), bit, max_value), "CUDA vs CPU " + what, nan_payload=False)


@given(inputs(), st.integers(0, 2**32 - 1))
def test_gradient_matches_reference(case, seed):
    x, bit, max_value, what = case
    _count("gradient")
    if expect_refused_or_no_nan(x, bit, max_value, what):
        return
    g = _grad_y(x, seed)
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = torch_ext.linear_mid_tread_half_quantize(leaf, bit, max_value)
    y.backward(g)
    assert leaf.grad.dtype == g.dtype
    assert_bit_exact(leaf.grad, reference_backward(g.cpu(), x.cpu(), max_value), what)
    # Through the module in place, on a non-leaf: the gradient of the original input.
    leaf2 = x.detach().clone().requires_grad_()
    h = leaf2 * 1
    out = torch_ext.QuantActivation(bit, max_value, inplace=True)(h)
    assert out is h
    assert_bit_exact(h.detach(), reference(x.cpu(), bit, max_value), "in place " + what, nan_payload=False)
    out.backward(g)
    # (MulBackward of `* 1` may rewrite NaN payloads of g.)
    assert_bit_exact(leaf2.grad, reference_backward(g.cpu(), x.cpu(), max_value), "in place grad " + what, nan_payload=False)


@given(inputs(), st.integers(0, 2**32 - 1))
def test_kernel_ops_match_reference(case, seed):
    x, bit, max_value, what = case
    _count("kernel ops")
    if expect_refused_or_no_nan(x, bit, max_value, what):
        return
    expected = reference(x.cpu(), bit, max_value)
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    assert_bit_exact(y, expected, "forward " + what, nan_payload=False)
    assert_no_nan_for_finite_input(y, x, "forward " + what)
    assert mask.dtype == torch.uint8 and mask.shape == ((x.numel() + 7) // 8,)
    # The mask follows y's memory order (x's own when x is dense).
    assert torch.equal(unpack_mask(mask, x.numel())[0], expected_mask_in_layout(x, max_value, y.stride())), "mask " + what
    g = _grad_y(x, seed)
    grad_x = ops.linear_mid_tread_half_quantize_backward(g, mask, y.stride())
    assert_bit_exact(grad_x, reference_backward(g.cpu(), x.cpu(), max_value), "backward " + what)
    assert_same_layout(grad_x, y, "grad_x in x's layout " + what)
    if x.stride() and 0 in x.stride() and x.numel() > 1:
        return  # an expanded view cannot be written in place
    xi = x.clone()
    mask_ = ops.linear_mid_tread_half_quantize_forward_(xi, bit, max_value)
    assert_bit_exact(xi, expected, "forward_ " + what, nan_payload=False)
    assert torch.equal(mask_.cpu(), mask.cpu()), "forward_ mask " + what
    xi = x.clone()
    ops.linear_mid_tread_half_quantize_(xi, bit, max_value)
    assert_bit_exact(xi, expected, "in place " + what, nan_payload=False)


@given(
    st.sampled_from(DTYPES),
    st.sampled_from(BITS),
    max_values,
    st.integers(0, 2**32 - 1),
    st.sampled_from(DEVICES),
)
def test_ties_dense(dtype, bit, max_value, seed, device):
    """Many values right at the ties and their neighbours, in one flat tensor."""
    _count("ties")
    x = _values(4099, dtype, bit, max_value, seed, (1, 0, 0)).to(device)
    what = f"{dtype} bit={bit} m={max_value!r}"
    if expect_refused_or_no_nan(x, bit, max_value, what):
        return
    expected = reference(x.cpu(), bit, max_value)
    y = torch_ext.linear_mid_tread_half_quantize(x, bit, max_value)
    assert_bit_exact(y, expected, what, nan_payload=False)
    assert_no_nan_for_finite_input(y, x, what)
    leaf = x.clone().requires_grad_()
    torch_ext.linear_mid_tread_half_quantize(leaf, bit, max_value).backward(torch.ones_like(x))
    assert_bit_exact(leaf.grad, reference_backward(torch.ones_like(x).cpu(), x.cpu(), max_value))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA: the CUDA-vs-CPU property needs a GPU")
@given(inputs(devices=("cuda",)), st.integers(0, 2**32 - 1))
def test_cuda_equals_cpu(case, seed):
    x, bit, max_value, what = case
    _count("cuda vs cpu")
    if expect_refused_or_no_nan(x, bit, max_value, what):
        return
    xc = x.cpu()
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    yc, maskc = ops.linear_mid_tread_half_quantize_forward(xc, bit, max_value)
    assert_bit_exact(y, yc, what, nan_payload=False)
    assert torch.equal(mask.cpu(), maskc), what
    g = _grad_y(x, seed)
    assert_bit_exact(
        ops.linear_mid_tread_half_quantize_backward(g, mask, y.stride()),
        ops.linear_mid_tread_half_quantize_backward(g.cpu(), maskc, yc.stride()),
        what,
    )
