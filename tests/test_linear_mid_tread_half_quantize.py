"""The linear mid-tread half quantizer against docs/quantizer.md.

Every rule of docs/quantizer.md has a test here that fails when the rule breaks:
the forward formula (order of operations, compute type, ties up, clip only
for bit=32), the straight-through gradient (strict mask, exactly 0 outside
even for inf/NaN grads, dtype of grad_y), bit-identity across layouts and
thread counts, the refused arguments, and the public names. Values are
compared bit for bit with the pure-PyTorch reference (torch_ext.reference),
which is itself checked against a step-by-step NumPy evaluation.

The CUDA cases sit beside the CPU ones: the tests of "Every device" run on
"cpu" and "cuda" (skipped, with the reason, without a GPU); test_cuda.py
keeps what is about CUDA itself (alignment, the grid-stride loop, launch
configuration, streams, a second GPU). Random (hypothesis) inputs are in
test_properties.py.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import torch_ext
from torch_ext.reference import (
    compute_dtype,
    linear_mid_tread_half_quantize_backward_reference as reference_backward,
    linear_mid_tread_half_quantize_reference as reference,
)

from conftest import (
    ALL_DEVICES,
    BITS,
    DTYPES,
    as_bits,
    assert_bit_exact,
    assert_same_layout,
    contiguous_strides,
    dtype_id,
    is_dense,
    expected_mask,
    expected_mask_in_layout,
    grads_like,
    requires_cuda,
    requires_triton,
    tie_values,
    unpack_mask,
    values_with_specials,
)

ops = torch.ops.torch_ext
quantize = torch_ext.linear_mid_tread_half_quantize
quantize_ = torch_ext.linear_mid_tread_half_quantize_

#: max_values of the reference grid: the default, awkward fractions, tiny and huge.
MAX_VALUES = (2.0, 1.0 / 3.0, 6.0, 0.7, 1e-6, 1e6)


def random_values(shape, dtype, max_value=2.0, seed=0, device="cpu") -> torch.Tensor:
    """Values over [-m/2, 3m/2] with ties, specials and their neighbours mixed in."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    x = (torch.rand(numel, generator=g, dtype=torch.float64) * 2.0 - 0.5) * max_value
    x = x.to(dtype)
    special = tie_values(dtype, 2, max_value)
    if numel:
        idx = torch.randint(0, numel, (min(numel, special.numel()),), generator=g)
        x[idx] = special[torch.randint(0, special.numel(), (idx.numel(),), generator=g)]
    return x.reshape(shape).to(device)


# --------------------------------------------------------------------------
# The reference is docs/quantizer.md: check it, step by step, with NumPy.


def numpy_spec(x: torch.Tensor, bit: int, max_value: float) -> torch.Tensor:
    """docs/quantizer.md evaluated with NumPy, one correctly rounded operation per step."""
    np_t = np.float64 if x.dtype == torch.float64 else np.float32
    xs = x.detach().cpu().to(torch.float64 if np_t is np.float64 else torch.float32).numpy()
    m = np_t(max_value)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        c = np.where(xs < 0, np_t(0), np.where(xs > m, m, xs)).astype(np_t)
        if bit == 32:
            y = c
        else:
            n = np_t(2.0**bit - 1.0)
            v = (c / m).astype(np_t)
            v = (v * n).astype(np_t)
            v = (v + np_t(0.5)).astype(np_t)
            v = np.floor(v).astype(np_t)
            v = (v / n).astype(np_t)
            y = (v * m).astype(np_t)
    return torch.from_numpy(np.ascontiguousarray(y)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bit", (1, 2, 3, 4, 5, 8, 11, 16, 32))
def test_reference_and_op_match_numpy_step_by_step(dtype, bit):
    for max_value in (2.0, 1.0 / 3.0, 6.0):
        x = tie_values(dtype, bit, max_value, max_k=1024)
        expected = numpy_spec(x, bit, max_value)
        assert_bit_exact(reference(x, bit, max_value), expected, f"reference bit={bit} m={max_value}", nan_payload=False)
        assert_bit_exact(quantize(x, bit, max_value), expected, f"op bit={bit} m={max_value}", nan_payload=False)


# --------------------------------------------------------------------------
# Values: every dtype x every bit x several max_values, adversarial inputs.


@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_entry_point_matches_reference(dtype, bit):
    """Functional, torch.ops, in-place, kernel ops and module: all bit-exact
    with the reference on the ties k*m/(2n), their neighbours and specials."""
    for max_value in MAX_VALUES:
        x = tie_values(dtype, bit, max_value, max_k=4096)
        x = torch.cat([x, random_values((777,), dtype, max_value, seed=bit)])
        expected = reference(x, bit, max_value)
        what = f"{dtype_id(dtype)} bit={bit} max_value={max_value}"
        x0 = x.clone()

        assert_bit_exact(quantize(x, bit, max_value), expected, "functional " + what, nan_payload=False)
        assert_bit_exact(ops.linear_mid_tread_half_quantize(x, bit, max_value), expected, "op " + what, nan_payload=False)
        assert_bit_exact(torch_ext.QuantActivation(bit, max_value)(x), expected, "module " + what, nan_payload=False)
        y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
        assert_bit_exact(y, expected, "forward op " + what, nan_payload=False)
        bits, _ = unpack_mask(mask, x.numel())
        assert torch.equal(bits, expected_mask(x, max_value)), "mask " + what
        assert_bit_exact(x, x0, "out-of-place calls left x alone")

        xi = x.clone()
        assert quantize_(xi, bit, max_value) is xi
        assert_bit_exact(xi, expected, "in-place " + what, nan_payload=False)
        xi = x.clone()
        assert ops.linear_mid_tread_half_quantize_(xi, bit, max_value) is None
        assert_bit_exact(xi, expected, "in-place op " + what, nan_payload=False)
        xi = x.clone()
        mask_ = ops.linear_mid_tread_half_quantize_forward_(xi, bit, max_value)
        assert_bit_exact(xi, expected, "forward_ op " + what, nan_payload=False)
        assert torch.equal(mask_, mask), "forward_ mask is that of the original x: " + what

        # NaN stays NaN (docs/quantizer.md fixes no payload; the in-kernel bits are
        # compared across devices in test_nan_bits_identical_to_cpu).
        for out in (quantize(x, bit, max_value), xi):
            assert torch.equal(out.isnan(), x.isnan()), what


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_awkward_max_values(dtype):
    """max_values whose T(m) is not the float given, or is a denormal of T."""
    tiny = 1e-40 if dtype != torch.float64 else 5e-324  # a denormal of T
    for max_value in (1.0 / 3.0, 0.1, 1e-6, 1e6, 1e-30, 3.0e38, tiny, float(np.nextafter(2.0, 3.0)), 65504.0):
        for bit in (1, 2, 7, 16, 32):
            x = tie_values(dtype, bit, max_value, max_k=512)
            assert_bit_exact(quantize(x, bit, max_value), reference(x, bit, max_value), f"bit={bit} m={max_value}", nan_payload=False)


def test_spec_example_ties_round_up():
    # docs/quantizer.md: bit=1, max_value=2, x=1.0 gives 2.0 where torch.round would give 0.0.
    for dtype in DTYPES:
        x = torch.tensor([1.0], dtype=dtype)
        assert quantize(x, 1, 2.0).item() == 2.0
        assert torch.round(x / 2.0).item() * 2.0 == 0.0
    # bit=2, m=2: levels 0, 2/3, 4/3, 2, and each tie k*m/(2n) goes up.
    x = torch.tensor([-1.0, 0.0, 1 / 3, 0.3333, 0.6, 1.0, 1.4, 5 / 3, 1.9, 2.0, 7.0])
    y = quantize(x, 2, 2.0)
    expected = torch.tensor([0.0, 0.0, 2 / 3, 0.0, 2 / 3, 4 / 3, 4 / 3, 2.0, 2.0, 2.0, 2.0])
    assert torch.equal(y, expected), y
    # Defaults: bit=2, max_value=2.0.
    assert torch.equal(quantize(x), y)
    assert torch.equal(torch_ext.QuantActivation()(x), y)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_special_values(dtype):
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1e30, 1e30], dtype=dtype)
    for bit in (1, 2, 8, 16):
        y = quantize(x, bit, 2.0)
        assert_bit_exact(y[:4], torch.tensor([0.0, 0.0, 2.0, 0.0], dtype=dtype), f"bit={bit}")
        assert y[4].isnan()
        assert y[5].item() == 0.0 and y[6].item() == 2.0
    # bit=32 clips only: -0.0 stays -0.0, as torch.clamp leaves it.
    y = quantize(x, 32, 2.0)
    assert_bit_exact(y[:4], torch.tensor([0.0, -0.0, 2.0, 0.0], dtype=dtype), "bit=32")
    assert y[4].isnan()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("max_value", (2.0, 1.0 / 3.0, 1e-6, 1e6, 0.1))
def test_bit_32_clips_only(dtype, max_value):
    x = torch.cat([tie_values(dtype, 8, max_value, max_k=2048), random_values((1001,), dtype, max_value)])
    y = quantize(x, 32, max_value)
    # clip(x, 0, T(m)) rounded to the dtype: torch.clamp in T is the same thing.
    t = compute_dtype(dtype)
    clamped = torch.clamp(x.to(t), torch.tensor(0.0, dtype=t), torch.tensor(max_value, dtype=t)).to(dtype)
    assert_bit_exact(y, clamped, nan_payload=False)
    # Values in [0, m) pass through unchanged: no quantization at all.
    inside = (x > 0) & (x.to(t) < torch.tensor(max_value, dtype=t))
    assert_bit_exact(y[inside], x[inside])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_denormals(dtype):
    finfo = torch.finfo(dtype)
    sub = finfo.smallest_normal
    k = torch.arange(0, 64, dtype=torch.float64)
    x = torch.cat([(k * sub / 64), -(k * sub / 64), k * sub]).to(dtype)
    x = torch.cat([x, torch.nextafter(x, torch.ones_like(x))])
    for max_value in (2.0, sub * 8, sub * 100, 1e-6, 1e-40):
        for bit in (1, 4, 16, 32):
            y = quantize(x, bit, max_value)
            assert_bit_exact(y, reference(x, bit, max_value), f"m={max_value} bit={bit}", nan_payload=False)
            xr = x.detach().clone().requires_grad_()
            quantize(xr, bit, max_value).backward(torch.ones_like(xr))
            assert_bit_exact(xr.grad, reference_backward(torch.ones_like(x), x, max_value), f"grad m={max_value}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtype_preserved(dtype):
    x = random_values((3, 5), dtype)
    for bit in (1, 8, 32):
        assert quantize(x, bit, 2.0).dtype == dtype
        assert ops.linear_mid_tread_half_quantize_forward(x, bit, 2.0)[0].dtype == dtype
        assert torch_ext.QuantActivation(bit, 2.0)(x).dtype == dtype
        xi = x.clone()
        assert quantize_(xi, bit, 2.0).dtype == dtype


def test_max_value_int_is_accepted():
    x = random_values((50,), torch.float32)
    assert_bit_exact(quantize(x, 3, 2), quantize(x, 3, 2.0))
    assert torch_ext.QuantActivation(3, 2).max_value == 2.0


# --------------------------------------------------------------------------
# Layouts: the result never depends on the memory layout, and the output is
# laid out as torch.clamp lays it out (channels_last stays channels_last).


def _layouts():
    # Each layout is a view of the one tensor that `make` returns, so that the
    # in-place tests can check the elements outside the view too; the
    # channels_last ones are permuted NHWC (NDHWC) tensors, which is what
    # .contiguous(memory_format=torch.channels_last) produces.
    return {
        "contiguous": (lambda make: make((2, 3, 5, 7))),
        "odd_1d": (lambda make: make((1031,))),
        "transposed": (lambda make: make((13, 7)).t()),
        "permuted": (lambda make: make((2, 3, 5, 7)).permute(3, 1, 0, 2)),
        "step_slices": (lambda make: make((19, 23))[::2, 1::3]),
        "offset_slice": (lambda make: make((203,))[3:190]),
        "channels_last": (lambda make: make((2, 5, 7, 3)).permute(0, 3, 1, 2)),
        "channels_last_odd": (lambda make: make((3, 9, 11, 5)).permute(0, 3, 1, 2)),
        "channels_last_3d": (lambda make: make((2, 4, 5, 3, 3)).permute(0, 4, 1, 2, 3)),
        "channels_last_sliced": (lambda make: make((2, 5, 7, 6)).permute(0, 3, 1, 2)[:, 1:5:2, 1:, ::2]),
        "expanded": (lambda make: make((1, 5, 1)).expand(4, 5, 3)),
        "expanded_scalar": (lambda make: make(()).expand(3, 4)),
        "size_one_dims": (lambda make: make((1, 1, 37, 1))),
        "zero_dim": (lambda make: make(())),
        "empty": (lambda make: make((0,))),
        "empty_3d": (lambda make: make((3, 0, 5))),
        "empty_channels_last": (lambda make: make((0, 2, 2, 3)).permute(0, 3, 1, 2)),
    }


LAYOUTS = _layouts()
WRITABLE = [name for name in LAYOUTS if not name.startswith("expanded")]


def _maker(dtype, max_value, seed=0, device="cpu"):
    return lambda shape: random_values(shape, dtype, max_value, seed=seed, device=device)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layouts_out_of_place(dtype, layout):
    bit, max_value = 3, 2.0
    x = LAYOUTS[layout](_maker(dtype, max_value))
    if layout in ("channels_last", "channels_last_odd"):
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if layout == "channels_last_3d":
        assert x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    expected = reference(x, bit, max_value)
    oracle = torch.clamp(x, 0, max_value)  # how PyTorch lays out an elementwise result
    for name, y in (
        ("functional", quantize(x, bit, max_value)),
        ("forward op", ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)[0]),
        ("module", torch_ext.QuantActivation(bit, max_value)(x)),
    ):
        assert_bit_exact(y, expected, f"{name} {layout}", nan_payload=False)
        assert_same_layout(y, oracle, f"{name} {layout}")
        if layout.startswith("channels_last") and layout != "channels_last_sliced":
            fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
            assert y.is_contiguous(memory_format=fmt), f"{name} {layout}: channels_last stays channels_last"
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    assert mask.shape == ((x.numel() + 7) // 8,)
    bits, padding = unpack_mask(mask, x.numel())
    # The mask follows y's memory order, which is x's own for a dense x.
    if is_dense(x):
        assert_same_layout(y, x, layout)
    assert torch.equal(bits, expected_mask_in_layout(x, max_value, y.stride())), layout
    assert not padding.any(), "the padding bits of the last mask byte are 0"


@pytest.mark.parametrize("layout", WRITABLE)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layouts_in_place(dtype, layout):
    """In-place ops on views write exactly the view's elements of the base."""
    bit, max_value = 4, 1.0 / 3.0
    make = _maker(dtype, max_value, seed=3)
    # Build the view twice over the same values: one to write, one to read.
    bases = []

    def remember(shape):
        base = make(shape)
        bases.append(base)
        return base

    view0 = LAYOUTS[layout](remember)
    base0 = bases[-1]
    expected_base = base0.clone()
    expected_view = LAYOUTS[layout](lambda shape: expected_base)
    expected_view.copy_(reference(view0, bit, max_value))

    for name in ("functional", "op", "forward_", "module"):
        base = base0.clone()
        view = LAYOUTS[layout](lambda shape: base)
        if name == "functional":
            assert quantize_(view, bit, max_value) is view
        elif name == "op":
            ops.linear_mid_tread_half_quantize_(view, bit, max_value)
        elif name == "module":
            assert torch_ext.QuantActivation(bit, max_value, inplace=True)(view) is view
        else:
            dense = is_dense(view)
            mask = ops.linear_mid_tread_half_quantize_forward_(view, bit, max_value)
            bits, _ = unpack_mask(mask, view0.numel())
            # x's memory order when x is dense, row-major otherwise.
            order = view0.stride() if dense else contiguous_strides(view0.shape)
            assert torch.equal(bits, expected_mask_in_layout(view0, max_value, order)), f"{layout}: mask of x"
        assert view.data_ptr() == LAYOUTS[layout](lambda shape: base).data_ptr()
        assert_bit_exact(view, reference(view0, bit, max_value), f"{name} {layout}", nan_payload=False)
        assert_bit_exact(base, expected_base, f"{name} {layout}: the whole base", nan_payload=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_in_place_on_overlapping_memory_raises_like_relu_(dtype):
    x = torch.tensor([1.3], dtype=dtype).expand(4)
    for call in (
        lambda: quantize_(x, 2, 2.0),
        lambda: ops.linear_mid_tread_half_quantize_(x, 2, 2.0),
        lambda: ops.linear_mid_tread_half_quantize_forward_(x, 2, 2.0),
    ):
        with pytest.raises(RuntimeError, match="single memory location"):
            call()
        assert x[0].item() == torch.tensor(1.3, dtype=dtype).item()


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 129, 1000, 4097, 16384 * 3 + 5])
def test_odd_sizes(size):
    for dtype in DTYPES:
        x = random_values((size,), dtype, 2.0, seed=size)
        assert_bit_exact(quantize(x, 5, 2.0), reference(x, 5, 2.0), f"size={size}", nan_payload=False)
        y, mask = ops.linear_mid_tread_half_quantize_forward(x, 5, 2.0)
        bits, padding = unpack_mask(mask, size)
        assert torch.equal(bits, expected_mask(x, 2.0)) and not padding.any()
        g = random_values((size,), dtype, 2.0, seed=size + 1)
        assert_bit_exact(ops.linear_mid_tread_half_quantize_backward(g, mask), reference_backward(g, x, 2.0))


def test_zero_dim_and_empty_gradients():
    for x in (torch.tensor(0.5, requires_grad=True), torch.tensor(3.0, requires_grad=True), torch.empty(0, 3, requires_grad=True)):
        y = quantize(x, 2, 2.0)
        assert y.shape == x.shape
        y.backward(torch.ones_like(y))
        assert_bit_exact(x.grad, reference_backward(torch.ones_like(x), x.detach(), 2.0))


# --------------------------------------------------------------------------
# Threads.


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_thread_count_independence(dtype):
    numel = (1 << 18) + 13
    x = random_values((numel,), dtype, 2.0, seed=7)
    g = random_values((numel,), dtype, 2.0, seed=8)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, mask = ops.linear_mid_tread_half_quantize_forward(x, 3, 2.0)
            xi = x.clone()
            mask_ = ops.linear_mid_tread_half_quantize_forward_(xi, 3, 2.0)
            results[threads] = (quantize(x, 3, 2.0), y, mask, xi, mask_, ops.linear_mid_tread_half_quantize_backward(g, mask))
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    for threads in (2, 3):
        for a, b in zip(results[1], results[threads]):
            assert_bit_exact(b, a, f"{threads} threads vs 1")
    assert_bit_exact(results[1][0], reference(x, 3, 2.0), nan_payload=False)


def test_python_threads_at_once_equal_one_thread():
    inputs = [random_values((4099 + 97 * i,), DTYPES[i % 4], 2.0, seed=100 + i) for i in range(8)]

    def work(i):
        x = inputs[i].clone().requires_grad_()
        out = []
        for bit in (1, 2, 5, 16, 32):
            y = quantize(x, bit, 2.0)
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
            out += [y.detach(), grad]
        return out

    serial = [work(i) for i in range(len(inputs))]
    barrier = threading.Barrier(4, timeout=120)

    def concurrent(i):
        barrier.wait() if i < 4 else None
        return [work(i) for _ in range(3)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(concurrent, range(len(inputs))))
    for i, runs in enumerate(parallel):
        for run in runs:
            for a, b in zip(serial[i], run):
                assert_bit_exact(b, a, f"input {i}")


# --------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bit", (1, 2, 8, 16, 32))
def test_gradient_is_the_exact_mask(dtype, bit):
    for max_value in (2.0, 1.0 / 3.0, 1e-6, 1e6):
        x0 = torch.cat([tie_values(dtype, bit, max_value, max_k=1024), random_values((333,), dtype, max_value)])
        # grad_y with inf, -inf, NaN and -0.0 everywhere, also outside (0, m).
        g = random_values(x0.shape, dtype, 1.0, seed=bit)
        g[::5] = float("inf")
        g[1::5] = float("nan")
        g[2::7] = float("-inf")
        g[3::11] = -0.0
        expected = reference_backward(g, x0, max_value)
        inside = expected_mask(x0, max_value)
        # exactly +0.0 outside (0, m), grad_y's bits inside
        assert (as_bits(expected)[~inside] == 0).all()
        assert_bit_exact(expected[inside], g[inside])

        for name, fn in (
            ("functional", lambda x: quantize(x, bit, max_value)),
            ("op", lambda x: ops.linear_mid_tread_half_quantize(x, bit, max_value)),
            ("module", torch_ext.QuantActivation(bit, max_value)),
            ("module inplace, x * 1", lambda x: torch_ext.QuantActivation(bit, max_value, inplace=True)(x * 1)),
            ("functional inplace", lambda x: quantize_(x.clone(), bit, max_value)),
        ):
            x = x0.clone().requires_grad_()
            y = fn(x)
            y.backward(g)
            assert x.grad.dtype == g.dtype
            # (`x * 1` rewrites NaN payloads of g in its own backward)
            assert_bit_exact(x.grad, expected, f"{name} bit={bit} m={max_value}", nan_payload="* 1" not in name)

        _, mask = ops.linear_mid_tread_half_quantize_forward(x0, bit, max_value)
        assert_bit_exact(ops.linear_mid_tread_half_quantize_backward(g, mask), expected, "backward op")


def test_grad_dtype_is_grad_y_dtype():
    x = random_values((100,), torch.float16, 2.0)
    _, mask = ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)
    for gdtype in DTYPES:
        g = random_values((100,), gdtype, 1.0, seed=5)
        grad_x = ops.linear_mid_tread_half_quantize_backward(g, mask)
        assert grad_x.dtype == gdtype
        assert_bit_exact(grad_x, reference_backward(g, x, 2.0))


def test_no_gradient_to_bit_or_max_value():
    x = random_values((10,), torch.float32).requires_grad_()
    y = quantize(x, 2, 2.0)
    # The graph has one input edge: x. bit and max_value are not tensors in it.
    edges = [fn for fn, _ in y.grad_fn.next_functions if fn is not None]
    assert len(edges) == 1
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.shape == x.shape
    # A tensor max_value is refused rather than silently detached.
    with pytest.raises(TypeError, match="max_value"):
        quantize(x, 2, torch.tensor(2.0, requires_grad=True))
    # The custom backward path returns no gradient for them either.
    y = quantize(x, 2, 2.0, backward=lambda g, x, bit, m: g)
    assert len([fn for fn, _ in y.grad_fn.next_functions if fn is not None]) == 1


def test_backward_op_layouts_and_mask_order():
    """The mask indexes grad_y's elements in row-major order, whatever its strides."""
    x = random_values((2, 3, 5, 7), torch.float32, 2.0, seed=11)
    _, mask = ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)
    g = random_values((2, 3, 5, 7), torch.float32, 1.0, seed=12)
    expected = reference_backward(g, x, 2.0)
    for layout in (torch.contiguous_format, torch.channels_last):
        gl = g.contiguous(memory_format=layout)
        grad_x = ops.linear_mid_tread_half_quantize_backward(gl, mask)
        assert_bit_exact(grad_x, expected)
        assert grad_x.stride() == torch.clamp(gl, 0, 1).stride()
    # A transposed grad_y: element (i, j) of the logical tensor uses bit i*cols + j.
    x2 = random_values((9, 13), torch.float64, 2.0, seed=13)
    _, mask2 = ops.linear_mid_tread_half_quantize_forward(x2, 2, 2.0)
    g2 = random_values((13, 9), torch.float64, 1.0, seed=14).t()
    assert_bit_exact(ops.linear_mid_tread_half_quantize_backward(g2, mask2), reference_backward(g2, x2, 2.0))
    # Padding bits of the mask are ignored.
    x3 = random_values((13,), torch.float32, 2.0, seed=15)
    _, mask3 = ops.linear_mid_tread_half_quantize_forward(x3, 2, 2.0)
    mask3[-1] |= 0xE0
    g3 = torch.ones(13)
    assert_bit_exact(ops.linear_mid_tread_half_quantize_backward(g3, mask3), reference_backward(g3, x3, 2.0))


def test_backward_op_with_a_hand_made_mask():
    g = torch.arange(1, 21, dtype=torch.float32)
    mask = torch.tensor([0b10100101, 0xFF, 0b0110], dtype=torch.uint8)
    keep = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1] + [1] * 8 + [0, 1, 1, 0], dtype=torch.bool)
    assert_bit_exact(ops.linear_mid_tread_half_quantize_backward(g, mask), torch.where(keep, g, torch.zeros(())))


def test_backward_op_refuses_bad_arguments():
    g = torch.ones(10)
    mask = torch.zeros(2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="grad_y"):
        ops.linear_mid_tread_half_quantize_backward(g.int(), mask)
    with pytest.raises(TypeError, match="mask"):
        ops.linear_mid_tread_half_quantize_backward(g, mask.int())
    with pytest.raises(ValueError, match="mask"):
        ops.linear_mid_tread_half_quantize_backward(g, torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask"):
        ops.linear_mid_tread_half_quantize_backward(g, torch.zeros(1, 2, dtype=torch.uint8))


def _fake_backward_cases():
    g = torch.ones(10)
    mask = torch.zeros(2, dtype=torch.uint8)
    return {
        "int32 grad_y": (g.int(), mask),
        "int64 grad_y": (g.long(), mask),
        "int32 mask": (g, mask.int()),
        "bool mask": (g, mask.bool()),
        "mask too long": (g, torch.zeros(3, dtype=torch.uint8)),
        "mask too short": (g, torch.zeros(1, dtype=torch.uint8)),
        "2-d mask": (g, torch.zeros(1, 2, dtype=torch.uint8)),
    }


@pytest.mark.parametrize("case", list(_fake_backward_cases()))
def test_fake_backward_refuses_exactly_what_the_kernel_refuses(case):
    """The fake backward calls the kernels' own C++ check (through _C): the
    same exception type and message under FakeTensorMode as in eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    grad_y, mask = _fake_backward_cases()[case]
    with pytest.raises((TypeError, ValueError)) as eager:
        ops.linear_mid_tread_half_quantize_backward(grad_y, mask)
    with FakeTensorMode() as mode:
        fake_grad_y, fake_mask = mode.from_tensor(grad_y), mode.from_tensor(mask)
        with pytest.raises(type(eager.value)) as fake:
            ops.linear_mid_tread_half_quantize_backward(fake_grad_y, fake_mask)
    assert str(fake.value) == str(eager.value)


def test_fake_backward_refuses_a_mask_on_another_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    grad_y = torch.ones(10)
    mask = torch.zeros(2, dtype=torch.uint8, device="meta")
    with FakeTensorMode() as mode:
        fake_grad_y, fake_mask = mode.from_tensor(grad_y), mode.from_tensor(mask)
        assert fake_mask.device.type == "meta" and fake_grad_y.device.type == "cpu"
        with pytest.raises(ValueError, match=r"mask and grad_y must be on the same device, got mask on meta and grad_y on cpu"):
            ops.linear_mid_tread_half_quantize_backward(fake_grad_y, fake_mask)


def test_compile_tracing_refuses_an_int_grad_y():
    """torch.compile refuses an int32 grad_y while tracing (fake tensors),
    before any backend or kernel runs."""
    torch._dynamo.reset()
    compiled_graphs = []

    def backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda g, m: ops.linear_mid_tread_half_quantize_backward(g, m), backend=backend, fullgraph=True)
    with pytest.raises(Exception, match=r"grad_y must be a floating-point tensor .* got grad_y of dtype Int"):
        fn(torch.ones(10, dtype=torch.int32), torch.zeros(2, dtype=torch.uint8))
    assert compiled_graphs == [], "the graph reached the backend"
    # A valid call traces and runs.
    g = torch.arange(10, dtype=torch.float32)
    assert torch.equal(fn(g, torch.full((2,), 0xFF, dtype=torch.uint8)), g)
    assert len(compiled_graphs) == 1


def test_kernel_ops_are_not_differentiable_themselves():
    x = random_values((20,), torch.float32).requires_grad_()
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)
    with pytest.raises(RuntimeError):
        y.sum().backward()
    # In place into a leaf that requires grad: refused, x untouched.
    x0 = x.detach().clone()
    with pytest.raises(RuntimeError, match="leaf"):
        ops.linear_mid_tread_half_quantize_forward_(x, 2, 2.0)
    assert_bit_exact(x.detach(), x0)
    g = torch.ones(20, requires_grad=True)
    grad_x = ops.linear_mid_tread_half_quantize_backward(g, mask)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_in_place_bumps_the_version_counter():
    # A tensor saved for backward (exp saves its output) and then overwritten
    # must make backward fail, as with torch.relu_; also under no_grad.
    for grad_mode in (True, False):
        base = torch.rand(10, requires_grad=True)
        a = base.exp()
        version = a._version
        with torch.set_grad_enabled(grad_mode):
            quantize_(a, 2, 2.0)
        assert a._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            a.sum().backward()


@pytest.mark.parametrize("backward", (None, "custom"))
def test_in_place_on_a_view_of_a_non_leaf(backward):
    """Like relu_ on a view: the view's elements get this op's gradient, the
    others pass through the CopySlices untouched."""
    fn = (lambda g, x, bit, m: g * 3) if backward else None
    leaf = random_values((40,), torch.float32, 2.0, seed=41).requires_grad_()
    base = leaf * 1
    view = base[5:29:3]
    original = leaf.detach().clone()
    assert quantize_(view, 2, 2.0, backward=fn) is view
    expected_values = original.clone()
    expected_values[5:29:3] = reference(original[5:29:3], 2, 2.0)
    assert_bit_exact(base.detach(), expected_values, nan_payload=False)
    g = random_values((40,), torch.float32, 1.0, seed=42).nan_to_num(nan=1.0)
    base.backward(g)
    expected = g.clone()
    expected[5:29:3] = g[5:29:3] * 3 if backward else reference_backward(g[5:29:3], original[5:29:3], 2.0)
    assert_bit_exact(leaf.grad, expected)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "transposed"))
def test_gradient_of_a_sum(layout):
    """y.sum().backward() hands the backward an expanded (stride 0) grad_y."""
    x = LAYOUTS[layout](_maker(torch.float32, 2.0, seed=43)).detach().requires_grad_()
    quantize(x, 2, 2.0).sum().backward()
    assert_bit_exact(x.grad, reference_backward(torch.ones_like(x), x.detach(), 2.0))


def test_in_place_on_an_inference_tensor_outside_inference_mode_raises_like_relu_():
    with torch.inference_mode():
        x = random_values((20,), torch.float32, 2.0, seed=44)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        torch.relu_(x)
    # torch.relu_ itself writes before it raises (torch 2.14): take the
    # snapshot after it, so that only our calls are judged.
    x0 = x.clone()
    for call in (
        lambda: quantize_(x, 2, 2.0),
        lambda: ops.linear_mid_tread_half_quantize_(x, 2, 2.0),
        lambda: ops.linear_mid_tread_half_quantize_forward_(x, 2, 2.0),
    ):
        with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
            call()
        assert_bit_exact(x, x0, "x untouched")


def test_inference_mode():
    with torch.inference_mode():
        x = random_values((20,), torch.float32, 2.0, seed=45)
        expected = reference(x, 2, 2.0)
        assert_bit_exact(quantize(x, 2, 2.0), expected, nan_payload=False)
        assert_bit_exact(torch_ext.QuantActivation(2, 2.0)(x), expected, nan_payload=False)
        assert quantize_(x, 2, 2.0) is x
        assert_bit_exact(x, expected, nan_payload=False)
    # Out of place on an inference tensor outside inference mode is fine.
    assert_bit_exact(quantize(x, 2, 2.0), reference(x, 2, 2.0), nan_payload=False)


def test_in_place_under_no_grad_on_leaf_is_allowed():
    x = random_values((30,), torch.float32).requires_grad_()
    x0 = x.detach().clone()
    with torch.no_grad():
        assert quantize_(x, 2, 2.0) is x
        torch_ext.QuantActivation(2, 2.0, inplace=True)(x)
    assert_bit_exact(x.detach(), reference(x0, 2, 2.0), nan_payload=False)
    assert x.requires_grad and x.is_leaf


# --------------------------------------------------------------------------
# opcheck: schemas, autograd registration, fake kernels, AOT dispatch.


def _opcheck_samples():
    # No NaN: opcheck compares eager and traced outputs with NaN != NaN.
    def values(shape, dtype):
        return random_values(shape, dtype).nan_to_num(nan=0.25, posinf=float("inf"), neginf=float("-inf"))

    cl = torch.channels_last
    samples = []
    for dtype in DTYPES:
        samples.append((dtype_id(dtype), values((5, 7), dtype)))
    samples += [
        ("channels_last", values((2, 3, 4, 5), torch.float32).contiguous(memory_format=cl)),
        ("transposed", values((6, 5), torch.float64).t()),
        ("step_slice", values((30,), torch.float16)[1::3]),
        ("zero_dim", torch.tensor(1.2)),
        ("empty", torch.empty(0, 4)),
    ]
    return samples


OPCHECK_SAMPLES = _opcheck_samples()


@pytest.mark.parametrize("name,x", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
@pytest.mark.parametrize("bit", (2, 32))
def test_opcheck_quantize(name, x, bit):
    torch.library.opcheck(ops.linear_mid_tread_half_quantize.default, (x, bit, 1.5))
    torch.library.opcheck(ops.linear_mid_tread_half_quantize.default, (x.clone().requires_grad_(), bit, 1.5))
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_.default, (x.clone(), bit, 1.5))
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_forward.default, (x, bit, 1.5))
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_forward_.default, (x.clone(), bit, 1.5))


@pytest.mark.parametrize("name,x", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
def test_opcheck_backward(name, x):
    _, mask = ops.linear_mid_tread_half_quantize_forward(x, 3, 1.5)
    g = torch.ones_like(x)
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_backward.default, (g, mask))


def test_opcheck_in_place_on_non_leaf_requiring_grad():
    base = random_values((4, 6), torch.float32).requires_grad_()
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_.default, (base * 1.0, 3, 1.5))


# --------------------------------------------------------------------------
# torch.compile(fullgraph=True) equals eager, forward and backward.


def _eager_and_compiled(fn, compiled, x, g):
    out = []
    for f in (fn, compiled):
        xr = x.detach().clone().requires_grad_()
        y = f(xr)
        (grad,) = torch.autograd.grad(y, xr, g)
        out.append((y.detach(), grad))
    return out


def test_compile_inductor_function_forward_and_backward():
    torch._dynamo.reset()

    def fn(x):
        return torch_ext.linear_mid_tread_half_quantize(x * 1.0, 3, 1.5) * 2.0

    compiled = torch.compile(fn, fullgraph=True)
    x = torch.cat([tie_values(torch.float32, 3, 1.5), random_values((1000,), torch.float32, 1.5)])
    g = random_values(x.shape, torch.float32, 1.0, seed=2)
    (ye, ge), (yc, gc) = _eager_and_compiled(fn, compiled, x, g)
    assert_bit_exact(yc, ye)
    assert_bit_exact(gc, ge)


@pytest.mark.parametrize("inplace", (False, True))
def test_compile_module(inplace):
    torch._dynamo.reset()
    module = torch_ext.QuantActivation(4, 1.0 / 3.0, inplace=inplace)

    def fn(x):
        return module(x * 1.0) + 0.0  # a non-leaf input, as in a network

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for x in (
        random_values((4, 3, 5, 6), torch.float32, 1 / 3, seed=1),
        random_values((2, 3, 5, 7), torch.bfloat16, 1 / 3, seed=2).contiguous(memory_format=torch.channels_last),
    ):
        g = random_values(x.shape, x.dtype, 1.0, seed=3)
        (ye, ge), (yc, gc) = _eager_and_compiled(fn, compiled, x, g)
        # (the `* 1.0` and `+ 0.0` around the module may rewrite NaN payloads)
        assert_bit_exact(yc, ye, nan_payload=False)
        assert_bit_exact(gc, ge, nan_payload=False)
        assert_bit_exact(ye, reference(x, 4, 1 / 3), nan_payload=False)
        assert_bit_exact(ge, reference_backward(g, x, 1 / 3), nan_payload=False)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()

    def fn(x):
        return torch_ext.linear_mid_tread_half_quantize(x, 2, 2.0)

    def fn_(x):
        return torch_ext.linear_mid_tread_half_quantize_(x * 1.0, 2, 2.0)

    for f in (fn, fn_):
        compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
        for shape in ((7,), (13,), (3, 129), (2, 3, 4, 5)):
            x = random_values(shape, torch.float32, 2.0, seed=sum(shape))
            g = random_values(shape, torch.float32, 1.0, seed=1)
            (ye, ge), (yc, gc) = _eager_and_compiled(f, compiled, x, g)
            assert_bit_exact(yc, ye, nan_payload=False)
            assert_bit_exact(gc, ge)


def test_compile_no_grad_in_place_function():
    torch._dynamo.reset()

    def fn(x):
        torch_ext.linear_mid_tread_half_quantize_(x, 5, 0.7)
        return x

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = random_values((257,), torch.float16, 0.7)
    a, b = x.clone(), x.clone()
    fn(a)
    out = compiled(b)
    assert_bit_exact(b, a, nan_payload=False)
    assert_bit_exact(out, a, nan_payload=False)


# --------------------------------------------------------------------------
# The module.


def test_module_repr():
    text = repr(torch_ext.QuantActivation(3, 1.5))
    assert text.startswith("QuantActivation(")
    assert "bit=3" in text and "max_value=1.5" in text
    assert "bit=2" in repr(torch_ext.QuantActivation()) and "max_value=2.0" in repr(torch_ext.QuantActivation())
    assert "inplace=True" in repr(torch_ext.QuantActivation(inplace=True))
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), torch_ext.QuantActivation(4, 6.0))
    assert "QuantActivation(bit=4, max_value=6.0" in repr(seq)


def test_module_has_no_parameters_or_buffers():
    module = torch_ext.QuantActivation(3, 1.5)
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    assert module.state_dict() == {}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_module_inplace_writes_input_and_gives_spec_gradient(dtype):
    bit, max_value = 3, 1.5
    base = random_values((4, 5, 6), dtype, max_value, seed=21).requires_grad_()
    g = random_values(base.shape, dtype, 1.0, seed=22)
    h = base * 1  # a non-leaf input, as the output of a previous layer
    data_ptr = h.data_ptr()
    module = torch_ext.QuantActivation(bit, max_value, inplace=True)
    y = module(h)
    assert y is h and h.data_ptr() == data_ptr
    assert_bit_exact(h.detach(), reference(base.detach(), bit, max_value), nan_payload=False)
    y.backward(g)
    # The gradient of the original input (its mask), not of the overwritten values.
    assert_bit_exact(base.grad, reference_backward(g, base.detach(), max_value))


def test_module_inplace_gradient_is_of_the_original_input():
    # bit=1, m=2: x=1.9 quantizes to y=2.0 and x=0.1 to y=0.0. The mask of x
    # passes both, the mask of y neither: the mask is taken before the overwrite.
    max_value = 2.0
    base = torch.tensor([1.9, 2.5, 0.1, -1.0], requires_grad=True)
    h = base * 1
    torch_ext.QuantActivation(1, max_value, inplace=True)(h).sum().backward()
    assert base.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


def _leaves_requiring_grad():
    """(name, x): a leaf that requires grad, and views of such leaves."""
    yield "leaf", torch.rand(50).mul(3).requires_grad_()
    leaf = torch.rand(10, 5).mul(3).requires_grad_()
    yield "view of a leaf", leaf[2:7]
    # A leaf that is itself a view of a tensor that does not require grad
    # (torch.rand(50).view(10, 5).requires_grad_(), or .reshape(...)): its
    # views have that tensor, not the leaf, as their _base.
    leaf = torch.rand(50).mul(3).view(10, 5).requires_grad_()
    yield "leaf that is a view", leaf
    yield "view of a leaf that is a view", leaf[2:7]


@pytest.mark.parametrize(
    "how,backward",
    [("functional", None), ("functional", "custom"), ("module", None), ("module", "custom"), ("op", None), ("forward_ op", None)],
)
@pytest.mark.parametrize("kind", [name for name, _ in _leaves_requiring_grad()])
def test_in_place_on_leaf_requiring_grad_raises_without_touching_x(kind, how, backward):
    fn = (lambda g, x, bit, m: g) if backward else None
    x = dict(_leaves_requiring_grad())[kind]
    x0 = x.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        if how == "functional":
            quantize_(x, 2, 2.0, backward=fn)
        elif how == "module":
            torch_ext.QuantActivation(2, 2.0, inplace=True, backward=fn)(x)
        elif how == "op":
            ops.linear_mid_tread_half_quantize_(x, 2, 2.0)
        else:
            ops.linear_mid_tread_half_quantize_forward_(x, 2, 2.0)
    assert_bit_exact(x.detach(), x0, f"{kind}: x must be untouched when the call is refused")


class RecordingBackward:
    """A picklable custom backward that records its arguments and returns 3 * grad_y."""

    def __init__(self):
        self.calls = []

    def __call__(self, grad_y, x, bit, max_value):
        self.calls.append((grad_y.detach().clone(), x.detach().clone(), bit, max_value))
        return grad_y * 3


def triple_backward(grad_y, x, bit, max_value):
    return grad_y * 3


@pytest.mark.parametrize("inplace", (False, True))
@pytest.mark.parametrize("how", ("functional", "module"))
def test_custom_backward_called_with_spec_arguments(inplace, how):
    bit, max_value = 5, 0.7
    base = random_values((3, 11), torch.float32, max_value, seed=31).requires_grad_()
    g = random_values(base.shape, torch.float32, 1.0, seed=32)
    rec = RecordingBackward()
    h = base * 1
    if how == "module":
        y = torch_ext.QuantActivation(bit, max_value, inplace=inplace, backward=rec)(h)
    elif inplace:
        y = quantize_(h, bit, max_value, backward=rec)
    else:
        y = quantize(h, bit, max_value, backward=rec)
    assert (y is h) == inplace
    assert_bit_exact(y.detach(), reference(base.detach(), bit, max_value), nan_payload=False)
    y.backward(g)
    assert len(rec.calls) == 1
    grad_y, x, got_bit, got_max = rec.calls[0]
    assert_bit_exact(grad_y, g)
    assert_bit_exact(x, base.detach())  # the original input, also when in place
    assert got_bit == bit and isinstance(got_bit, int)
    assert got_max == max_value and isinstance(got_max, float)
    assert_bit_exact(base.grad, g * 3)  # its result is the gradient


def test_custom_backward_on_a_leaf_out_of_place():
    x = random_values((17,), torch.float64).requires_grad_()
    quantize(x, 3, 2.0, backward=triple_backward).backward(torch.ones_like(x))
    assert_bit_exact(x.grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize("inplace", (False, True))
@pytest.mark.parametrize("backward", (None, triple_backward))
def test_module_pickles(inplace, backward):
    module = torch_ext.QuantActivation(5, 0.7, inplace=inplace, backward=backward)
    x = random_values((40,), torch.float32, 0.7)
    expected = module(x.clone())
    for restored in (
        pickle.loads(pickle.dumps(module)),
        copy.deepcopy(module),
        _torch_save_load(module),
    ):
        assert isinstance(restored, torch_ext.QuantActivation)
        assert (restored.bit, restored.max_value, restored.inplace) == (5, 0.7, inplace)
        assert restored.backward is backward
        assert repr(restored) == repr(module)
        assert_bit_exact(restored(x.clone()), expected, nan_payload=False)


def _torch_save_load(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_model_with_quant_activation_trains_on_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), torch_ext.QuantActivation(2, 2.0), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 8)
    target = x[:, :1].clamp(min=0)
    first = None
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# --------------------------------------------------------------------------
# Refused input: the table of docs/quantizer.md, through every entry point.

BAD_BITS = (0, 17, 31, 33, -1)
BAD_MAX_VALUES = (0.0, -1.0, float("nan"), float("inf"), float("-inf"))
BAD_DTYPES = {
    torch.int32: ("int32", "Int"),
    torch.int64: ("int64", "Long"),
    torch.bool: ("bool", "Bool"),
    torch.uint8: ("uint8", "Byte"),
    torch.complex64: ("complex64", "ComplexFloat"),
}


def _max_value_pattern(value: float) -> str:
    if math.isnan(value):
        return r"max_value=nan"
    if math.isinf(value):
        return r"max_value=-inf" if value < 0 else r"max_value=inf"
    return rf"max_value={int(value)}(\.0)?\b"


def _entry_points(x, bit, max_value):
    """Every way to call the quantizer with these arguments."""
    yield "functional", lambda: quantize(x, bit, max_value)
    yield "functional custom backward", lambda: quantize(x, bit, max_value, backward=triple_backward)
    yield "functional in place", lambda: quantize_(x, bit, max_value)
    yield "functional in place custom backward", lambda: quantize_(x, bit, max_value, backward=triple_backward)
    yield "torch.ops", lambda: ops.linear_mid_tread_half_quantize(x, bit, max_value)
    yield "torch.ops in place", lambda: ops.linear_mid_tread_half_quantize_(x, bit, max_value)
    yield "torch.ops forward", lambda: ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    yield "torch.ops forward_", lambda: ops.linear_mid_tread_half_quantize_forward_(x, bit, max_value)
    yield "module", lambda: torch_ext.QuantActivation(bit, max_value)(x)
    yield "module in place", lambda: torch_ext.QuantActivation(bit, max_value, inplace=True)(x)


def _check_refused(x, bit, max_value, exc, pattern):
    x0 = x.detach().clone()
    for requires_grad in (False, True):
        if requires_grad and not x.is_floating_point():
            continue
        for name, call in _entry_points(x, bit, max_value):
            # requires_grad: a non-leaf, so that in-place calls are otherwise allowed.
            xx = (x.detach().clone().requires_grad_() * 1) if requires_grad else x
            call = dict(_entry_points(xx, bit, max_value))[name]
            with pytest.raises(exc, match=pattern):
                call()
            assert_bit_exact(xx.detach(), x0, f"{name}: x untouched after a refused call")


@pytest.mark.parametrize("bit", BAD_BITS)
def test_refuses_bad_bit(bit):
    x = random_values((9,), torch.float32)
    _check_refused(x, bit, 2.0, ValueError, rf"\bbit={bit}\b")
    with pytest.raises(ValueError, match=rf"bit={bit}\b"):
        torch_ext.QuantActivation(bit, 2.0)


@pytest.mark.parametrize("max_value", BAD_MAX_VALUES)
def test_refuses_bad_max_value(max_value):
    x = random_values((9,), torch.float32)
    _check_refused(x, 2, max_value, ValueError, _max_value_pattern(max_value))
    with pytest.raises(ValueError, match=_max_value_pattern(max_value)):
        torch_ext.QuantActivation(2, max_value)


@pytest.mark.parametrize("dtype", list(BAD_DTYPES), ids=dtype_id)
def test_refuses_non_floating_x(dtype):
    x = torch.tensor([0, 1, 2, 3, 1, 0, 1], dtype=torch.int64).to(dtype)
    names = BAD_DTYPES[dtype]
    _check_refused(x, 2, 2.0, TypeError, r"\bx\b.*(" + "|".join(re.escape(n) for n in names) + r")\b")


# max_value that rounds to 0 or to infinity in the compute type T of x
# (docs/quantizer.md: m = T(max_value); T is float32 for float16, bfloat16 and
# float32 inputs). float32 rounds to nearest even: 2^-150 (half the smallest
# subnormal) rounds to 0, 2^128 - 2^103 (half an ulp above FLT_MAX) to inf.
FLT_ROUNDS_TO_ZERO = 2.0**-150
FLT_ROUNDS_TO_INF = float.fromhex("0x1.ffffffp+127")
FLT_MAX = float(torch.finfo(torch.float32).max)
#: Refused with every input but float64.
MAX_VALUES_ROUNDING_TO_0_IN_FLOAT32 = (1e-46, FLT_ROUNDS_TO_ZERO, 1e-300, 5e-324)
MAX_VALUES_ROUNDING_TO_INF_IN_FLOAT32 = (1e39, FLT_ROUNDS_TO_INF, 1e300, 1.7976931348623157e308)
#: Accepted with every input: the extreme values that still round to a finite float32 > 0.
EXTREME_FLOAT32_MAX_VALUES = (
    math.nextafter(FLT_ROUNDS_TO_ZERO, 1.0),  # rounds up to 2^-149, the smallest subnormal
    2.0**-149,
    1.2e-38,
    FLT_MAX,
    math.nextafter(FLT_ROUNDS_TO_INF, 0.0),  # rounds down to FLT_MAX
)
FLOAT32_COMPUTED = (torch.float32, torch.float16, torch.bfloat16)
_C10_DTYPE_NAME = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}


@pytest.mark.parametrize("dtype", FLOAT32_COMPUTED, ids=dtype_id)
@pytest.mark.parametrize("max_value", MAX_VALUES_ROUNDING_TO_0_IN_FLOAT32 + MAX_VALUES_ROUNDING_TO_INF_IN_FLOAT32)
def test_refuses_max_value_that_rounds_to_0_or_inf_in_float32(dtype, max_value):
    """Before, 1e-46 or 1e39 passed the check (finite and > 0 as a double)
    and every output was NaN; now every entry point refuses it, naming the
    value and x's dtype, and leaves x untouched."""
    x = random_values((9,), dtype)
    to = "0" if max_value < 1.0 else "infinity"
    pattern = (
        rf"max_value={re.escape(f'{max_value:g}')} rounds to {to} in float32, "
        rf"the compute type of x of dtype {_C10_DTYPE_NAME[dtype]}\b"
    )
    _check_refused(x, 2, max_value, ValueError, pattern)
    _check_refused(x, 32, max_value, ValueError, pattern)
    # The module takes it (it knows no dtype yet) and refuses at the call.
    module = torch_ext.QuantActivation(2, max_value)
    with pytest.raises(ValueError, match=pattern):
        module(x)
    # The Python validator keeps its one-argument form; with dtype= it asks the C++ check.
    assert torch_ext.ops.validate_max_value(max_value) == max_value
    with pytest.raises(ValueError, match=pattern):
        torch_ext.ops.validate_max_value(max_value, dtype=dtype)
    # Tracing refuses it too: the fake kernels call the same C++ check.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        for op in (ops.linear_mid_tread_half_quantize, ops.linear_mid_tread_half_quantize_forward):
            with pytest.raises(ValueError, match=pattern):
                op(fake, 2, max_value)


@pytest.mark.parametrize("max_value", MAX_VALUES_ROUNDING_TO_0_IN_FLOAT32 + MAX_VALUES_ROUNDING_TO_INF_IN_FLOAT32)
def test_float64_accepts_what_rounds_to_0_or_inf_in_float32(max_value):
    """float64 computes in float64: every finite max_value > 0 is exact there,
    and finite inputs give no NaN."""
    x = torch.cat([random_values((999,), torch.float64, 2.0), torch.tensor([0.0, -0.0, 1e-310, 1e308, -1e308])])
    x = torch.cat([x, x * max_value])
    x = x[x.isfinite()]
    assert torch_ext.ops.validate_max_value(max_value, dtype=torch.float64) == max_value
    for bit in (1, 2, 8, 16, 32):
        y = quantize(x, bit, max_value)
        assert not y.isnan().any(), f"NaN from finite input, bit={bit} max_value={max_value!r}"
        assert_bit_exact(y, reference(x, bit, max_value), f"bit={bit} max_value={max_value!r}")
        y2, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
        assert_bit_exact(y2, y)
        assert torch.equal(unpack_mask(mask, x.numel())[0], expected_mask(x, max_value))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("max_value", EXTREME_FLOAT32_MAX_VALUES, ids=lambda v: float.hex(v))
def test_extreme_max_values_that_round_to_a_finite_float32_are_accepted(dtype, max_value):
    """Right inside the refused ranges' edges: accepted, equal to the
    reference, and never NaN for finite input."""
    finfo = torch.finfo(dtype)
    x = torch.cat(
        [
            random_values((999,), dtype, 2.0),
            torch.tensor([0.0, -0.0, finfo.tiny, finfo.max, -finfo.max, max_value, max_value / 3], dtype=torch.float64).to(dtype),
        ]
    )
    x = x[x.isfinite()]
    for bit in (1, 2, 8, 16, 32):
        y = quantize(x, bit, max_value)
        assert not y.isnan().any(), f"NaN from finite input, bit={bit} max_value={max_value!r}"
        assert_bit_exact(y, reference(x, bit, max_value), f"bit={bit} max_value={max_value!r}", nan_payload=False)
    assert torch_ext.ops.validate_max_value(max_value, dtype=dtype) == max_value


def test_refused_messages_are_clear():
    x = torch.ones(3)
    with pytest.raises(ValueError) as info:
        quantize(x, 17, 2.0)
    assert "bit" in str(info.value) and "17" in str(info.value) and "32" in str(info.value)
    with pytest.raises(ValueError) as info:
        ops.linear_mid_tread_half_quantize(x, 0, 2.0)
    assert "bit=0" in str(info.value)
    with pytest.raises(ValueError) as info:
        ops.linear_mid_tread_half_quantize(x, 2, -1.0)
    assert "max_value=-1" in str(info.value)
    with pytest.raises(TypeError) as info:
        ops.linear_mid_tread_half_quantize(torch.ones(3, dtype=torch.int32), 2, 2.0)
    assert "x" in str(info.value) and ("Int" in str(info.value) or "int32" in str(info.value))


def test_module_constructor_refuses_bad_arguments():
    for bit in BAD_BITS:
        with pytest.raises(ValueError, match="bit"):
            torch_ext.QuantActivation(bit=bit)
    for max_value in BAD_MAX_VALUES:
        with pytest.raises(ValueError, match="max_value"):
            torch_ext.QuantActivation(max_value=max_value)
    for backward in (1, "grad", [triple_backward]):
        with pytest.raises(TypeError, match="backward"):
            torch_ext.QuantActivation(backward=backward)
    for bit in (2.0, "2", None):
        with pytest.raises(TypeError, match="bit"):
            torch_ext.QuantActivation(bit=bit)


def test_refuses_non_tensor_x():
    with pytest.raises(TypeError, match="x"):
        quantize([1.0, 2.0], 2, 2.0)
    with pytest.raises(TypeError, match="x"):
        quantize_(np.ones(3, dtype=np.float32), 2, 2.0)


# --------------------------------------------------------------------------
# Every device: the CPU's bits (docs/quantizer.md: "Results are bit-identical
# on every device"). Each test runs on "cpu" and on "cuda" (skipped, with
# the reason, without a GPU: marked cuda for scripts/gpu_check.sh); on the CPU
# it holds every entry point to the out-of-place one and to the reference.


def _on_device_and_cpu(fn, x, device, *args):
    """fn on the copy of x on device and on the CPU copy of x."""
    return fn(x.to(device), *args), fn(x.cpu(), *args)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bit_identical_to_cpu(dtype, bit, device):
    for max_value in MAX_VALUES:
        x = torch.cat([tie_values(dtype, bit, max_value, max_k=8192),
                       values_with_specials((4099,), dtype, max_value, seed=bit)])
        what = f"{dtype_id(dtype)} bit={bit} max_value={max_value}"
        xc = x.to(device)
        y = quantize(xc, bit, max_value)
        y_cpu = quantize(x, bit, max_value)
        assert y.device.type == device
        assert_bit_exact(y, y_cpu, f"{device} vs CPU " + what, nan_payload=False)
        assert_bit_exact(y, reference(x, bit, max_value), f"{device} vs reference " + what, nan_payload=False)
        (yf, mask), (yf_cpu, mask_cpu) = _on_device_and_cpu(
            ops.linear_mid_tread_half_quantize_forward, x, device, bit, max_value)
        assert_bit_exact(yf, yf_cpu, "forward op " + what, nan_payload=False)
        assert torch.equal(mask.cpu(), mask_cpu), "mask " + what
        xi = xc.clone()
        mask_ = ops.linear_mid_tread_half_quantize_forward_(xi, bit, max_value)
        assert_bit_exact(xi, y_cpu, "forward_ op " + what, nan_payload=False)
        assert torch.equal(mask_.cpu(), mask_cpu), "forward_ mask " + what
        xi = xc.clone()
        assert quantize_(xi, bit, max_value) is xi
        assert_bit_exact(xi, y_cpu, "in place " + what, nan_payload=False)
        assert torch.equal(y.isnan().cpu(), x.isnan())
        g = grads_like(x)
        assert_bit_exact(
            ops.linear_mid_tread_half_quantize_backward(g.to(device), mask),
            ops.linear_mid_tread_half_quantize_backward(g, mask_cpu),
            "backward op " + what,
        )


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_bits_identical_to_cpu(dtype, device):
    """NaN in, NaN out, with the same bits on every device (docs/quantizer.md's
    bit-identity read strictly: NaN payloads and signs included)."""
    nan = torch.tensor([float("nan")], dtype=dtype)
    patterns = torch.cat([nan, -nan])
    if dtype in (torch.float32, torch.float64):
        bits = as_bits(patterns)
        patterns = torch.cat([patterns, (bits | 1).view(dtype), (bits | 0x15).view(dtype)])
    x = patterns.repeat(9)  # also through the vectorized path
    for bit in (1, 2, 16, 32):
        y, y_cpu = _on_device_and_cpu(quantize, x, device, bit, 2.0)
        assert y.isnan().all()
        assert_bit_exact(y, y_cpu, f"{device} bit={bit}")


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_identical_to_cpu(dtype, device):
    for bit in (1, 2, 8, 16, 32):
        for max_value in (2.0, 1.0 / 3.0, 1e6):
            x = torch.cat([tie_values(dtype, bit, max_value, max_k=2048),
                           values_with_specials((1001,), dtype, max_value)])
            g = grads_like(x)
            grads = []
            for on in (device, "cpu"):
                leaf = x.to(on).clone().requires_grad_()
                quantize(leaf, bit, max_value).backward(g.to(on))
                assert leaf.grad.device.type == on and leaf.grad.dtype == dtype
                grads.append(leaf.grad)
            assert_bit_exact(grads[0], grads[1], f"{device} bit={bit} m={max_value}")
            assert_bit_exact(grads[0], reference_backward(g, x, max_value), f"{device} bit={bit} m={max_value}")
            # Exactly +0 outside (0, m), even where grad_y is inf or NaN.
            t = compute_dtype(dtype)
            outside = ~((x.to(t) > 0) & (x.to(t) < torch.tensor(max_value, dtype=t)))
            assert (as_bits(grads[0])[outside] == 0).all()


#: Views built the same way on every device (views of a fresh tensor made by
#: the function given), the channels_last ones as permuted NHWC views, so
#: that in place writes reach the base.
DEVICE_LAYOUTS = {
    "contiguous": lambda t: t(2, 3, 5, 7),
    "transposed": lambda t: t(13, 7).t(),
    "permuted": lambda t: t(2, 3, 5, 7).permute(3, 1, 0, 2),
    "step_slices": lambda t: t(19, 23)[::2, 1::3],
    "channels_last": lambda t: t(4, 5, 7, 6).permute(0, 3, 1, 2),
    "channels_last_3d": lambda t: t(2, 4, 5, 3, 3).permute(0, 4, 1, 2, 3),
    "channels_last_sliced": lambda t: t(2, 5, 7, 6).permute(0, 3, 1, 2)[:, 1:5:2, 1:, ::2],
    "expanded": lambda t: t(1, 5, 1).expand(4, 5, 3),
    "zero_dim": lambda t: t(),
    "empty": lambda t: t(0, 3),
}


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", list(DEVICE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layouts_identical_to_cpu(dtype, layout, device):
    bit, max_value = 3, 1.5

    def make_on(on):
        return lambda *shape: values_with_specials(shape, dtype, max_value, seed=len(shape)).to(on)

    x = DEVICE_LAYOUTS[layout](make_on(device))
    x_cpu = DEVICE_LAYOUTS[layout](make_on("cpu"))
    assert x.stride() == x_cpu.stride()
    y, y_cpu = quantize(x, bit, max_value), quantize(x_cpu, bit, max_value)
    assert_bit_exact(y, y_cpu, layout, nan_payload=False)
    assert_same_layout(y, y_cpu, layout)
    if layout in ("channels_last", "channels_last_3d"):
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        assert x.is_contiguous(memory_format=fmt) and y.is_contiguous(memory_format=fmt)
    (yf, mask), (_, mask_cpu) = (
        ops.linear_mid_tread_half_quantize_forward(x, bit, max_value),
        ops.linear_mid_tread_half_quantize_forward(x_cpu, bit, max_value),
    )
    assert_bit_exact(yf, y_cpu, layout, nan_payload=False)
    assert torch.equal(mask.cpu(), mask_cpu)
    g = grads_like(x_cpu)
    gx = ops.linear_mid_tread_half_quantize_backward(g.to(device), mask)
    assert_bit_exact(gx, ops.linear_mid_tread_half_quantize_backward(g, mask_cpu), layout)
    if layout != "expanded":
        # In place on the view: the base takes exactly the CPU's values.
        bases = {}

        def keep(key, on):
            def make(*shape):
                bases[key] = values_with_specials(shape, dtype, max_value, seed=len(shape)).to(on)
                return bases[key]
            return make

        v, v_cpu = DEVICE_LAYOUTS[layout](keep("device", device)), DEVICE_LAYOUTS[layout](keep("cpu", "cpu"))
        quantize_(v, bit, max_value)
        quantize_(v_cpu, bit, max_value)
        assert_bit_exact(v, y_cpu, "in place " + layout, nan_payload=False)
        assert_bit_exact(bases["device"], bases["cpu"], "in place, whole base " + layout, nan_payload=False)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "permuted", "channels_last_sliced", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_memory_order_mask_identical_to_cpu(dtype, layout, device):
    """The mask in the memory order of the dense tensor the kernel ran on
    (docs/quantizer.md): the same bits as the CPU for the same layout, and the
    backward with x_strides, grad_y in x's layout or another, and autograd
    (grad_x in x's layout) identical to the CPU."""
    for bit in (1, 2, 8, 32):
        max_value = 1.5
        x_cpu = DEVICE_LAYOUTS[layout](lambda *shape: values_with_specials(shape, dtype, max_value, seed=bit))
        x = DEVICE_LAYOUTS[layout](lambda *shape: values_with_specials(shape, dtype, max_value, seed=bit).to(device))
        assert x.stride() == x_cpu.stride()
        what = f"{device} {layout} {dtype_id(dtype)} bit={bit}"
        (y, mask), (y_cpu, mask_cpu) = (
            ops.linear_mid_tread_half_quantize_forward(x, bit, max_value),
            ops.linear_mid_tread_half_quantize_forward(x_cpu, bit, max_value),
        )
        assert y.stride() == y_cpu.stride(), what
        assert_bit_exact(y, y_cpu, what, nan_payload=False)
        assert torch.equal(mask.cpu(), mask_cpu), "mask " + what
        if is_dense(x) and x.numel():
            # Bit k is the element at memory offset k of x.
            flat = x_cpu.as_strided((x_cpu.numel(),), (1,))
            assert torch.equal(unpack_mask(mask, x.numel())[0], expected_mask(flat, max_value)), what
        g_cpu = grads_like(x_cpu)
        for gname, gl in (("like x", torch.empty_like(g_cpu).copy_(g_cpu)), ("contiguous", g_cpu.contiguous())):
            gx = ops.linear_mid_tread_half_quantize_backward(gl.to(device), mask, y.stride())
            gx_cpu = ops.linear_mid_tread_half_quantize_backward(gl, mask_cpu, y_cpu.stride())
            assert_bit_exact(gx, gx_cpu, f"backward op, grad_y {gname}, {what}")
            assert_bit_exact(gx, reference_backward(gl, x_cpu, max_value), f"backward op, grad_y {gname}, {what}")
            assert gx.stride() == y.stride() or gx.numel() == 0, what
            leaf = x.detach().clone().requires_grad_()
            (grad,) = torch.autograd.grad(quantize(leaf * 1, bit, max_value), leaf, gl.to(device))
            assert_bit_exact(grad, gx_cpu, f"autograd, grad_y {gname}, {what}", nan_payload=False)
        if layout != "empty":
            xi, xi_cpu = x.clone(), x_cpu.clone()
            assert torch.equal(
                ops.linear_mid_tread_half_quantize_forward_(xi, bit, max_value).cpu(),
                ops.linear_mid_tread_half_quantize_forward_(xi_cpu, bit, max_value),
            ), "forward_ mask " + what


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_empty_and_zero_dim(device):
    for dtype in DTYPES:
        for shape in ((), (0,), (3, 0, 2)):
            x = values_with_specials(shape, dtype, 2.0).to(device).requires_grad_()
            y = quantize(x, 2, 2.0)
            assert y.shape == x.shape and y.device.type == device and y.dtype == dtype
            y.backward(torch.ones_like(y))
            assert_bit_exact(x.grad, reference_backward(torch.ones(shape, dtype=dtype), x.detach().cpu(), 2.0))


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_refused_input_on_device(device):
    x = torch.ones(4, device=device)
    with pytest.raises(ValueError, match="bit=0"):
        ops.linear_mid_tread_half_quantize(x, 0, 2.0)
    with pytest.raises(ValueError, match="max_value"):
        ops.linear_mid_tread_half_quantize_forward(x, 2, float("nan"))
    with pytest.raises(TypeError, match="x"):
        quantize(torch.ones(4, dtype=torch.int32, device=device), 2, 2.0)
    xi = x.clone()
    with pytest.raises(ValueError):
        quantize_(xi, 33, 2.0)
    assert torch.equal(xi, x)


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_repeated_calls_are_deterministic(device):
    x = values_with_specials((1_000_003,), torch.float16, 2.0, seed=11).to(device)
    first = ops.linear_mid_tread_half_quantize_forward(x, 5, 2.0)
    for _ in range(3):
        again = ops.linear_mid_tread_half_quantize_forward(x, 5, 2.0)
        assert torch.equal(as_bits(again[0]), as_bits(first[0]))
        assert torch.equal(again[1], first[1])


def _device_opcheck_samples(device):
    def values(shape, dtype):
        return values_with_specials(shape, dtype, nan=False).to(device)

    return [
        values((5, 7), torch.float32),
        values((5, 7), torch.bfloat16),
        values((2, 3, 4, 5), torch.float16).contiguous(memory_format=torch.channels_last),
        values((6, 5), torch.float64).t(),
    ]


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_opcheck_on_device(device):
    for x in _device_opcheck_samples(device):
        torch.library.opcheck(ops.linear_mid_tread_half_quantize.default, (x, 3, 1.5))
        torch.library.opcheck(ops.linear_mid_tread_half_quantize.default, (x.clone().requires_grad_(), 3, 1.5))
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_.default, (x.clone(), 3, 1.5))
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_forward.default, (x, 3, 1.5))
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_forward_.default, (x.clone(), 3, 1.5))
        y, mask = ops.linear_mid_tread_half_quantize_forward(x, 3, 1.5)
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_backward.default, (torch.ones_like(x), mask))
        for g in (torch.ones_like(x), torch.ones_like(x).contiguous()):
            torch.library.opcheck(
                ops.linear_mid_tread_half_quantize_backward.default, (g, mask, list(y.stride()))
            )


@pytest.mark.cuda
@requires_cuda
@requires_triton
def test_compile_fullgraph_on_cuda():
    """torch.compile(fullgraph=True) with inductor's CUDA code (Triton): the
    eager bits, forward and backward (the CPU's inductor: test_compile_*)."""
    torch._dynamo.reset()
    module = torch_ext.QuantActivation(4, 1.0 / 3.0)
    module_inplace = torch_ext.QuantActivation(4, 1.0 / 3.0, inplace=True)

    def fn(x):
        return module(x) + module_inplace(x * 2.0)

    compiled = torch.compile(fn, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = values_with_specials((8, 3, 17, 9), dtype, 1.0 / 3.0, seed=9, nan=False).cuda()
        x = x.contiguous(memory_format=torch.channels_last)
        g = grads_like(x, seed=10).nan_to_num(nan=1.0, posinf=3.0, neginf=-3.0)
        results = []
        for f in (fn, compiled):
            leaf = x.detach().clone().requires_grad_()
            y = f(leaf)
            (grad,) = torch.autograd.grad(y, leaf, g)
            results.append((y, grad))
        (ye, ge), (yc, gc) = results
        assert_bit_exact(yc, ye, str(dtype))
        assert_bit_exact(gc, ge, str(dtype))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("amp_dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
def test_autocast_training(amp_dtype):
    """A model with QuantActivation trains under torch.autocast on CUDA, the
    quantizer running in the autocast dtype on docs/quantizer.md's values."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        torch_ext.QuantActivation(2, 2.0),
        nn.Conv2d(8, 8, 3, padding=1),
        torch_ext.QuantActivation(2, 2.0, inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).cuda()
    seen = []
    model[2].register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].detach(), out.detach())))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    x = torch.randn(32, 3, 12, 12, device="cuda")
    target = torch.randint(0, 4, (32,), device="cuda")
    losses = []
    for _ in range(25):
        with torch.autocast("cuda", dtype=amp_dtype):
            loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-5:]) < losses[0], losses
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # The quantizer ran in the autocast dtype, on the values docs/quantizer.md gives.
    x_in, y_out = seen[-1]
    assert y_out.dtype == x_in.dtype
    assert_bit_exact(y_out, reference(x_in.cpu(), 2, 2.0).cuda(), nan_payload=False)
    levels = torch.tensor([0.0, 2 / 3, 4 / 3, 2.0], dtype=y_out.dtype, device="cuda")
    assert torch.isin(y_out, levels).all()


# --------------------------------------------------------------------------
# Devices: a gradient on another device than its tensor, and the other way round.


@pytest.mark.cuda
@requires_cuda
def test_cpu_tensor_with_cuda_gradient_is_refused():
    x = random_values((10,), torch.float32).requires_grad_()
    y = quantize(x, 2, 2.0)
    with pytest.raises(RuntimeError, match="device"):
        y.backward(torch.ones(10, device="cuda"))
    assert x.grad is None
    _, mask = ops.linear_mid_tread_half_quantize_forward(x.detach(), 2, 2.0)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.linear_mid_tread_half_quantize_backward(torch.ones(10, device="cuda"), mask)


@pytest.mark.cuda
@requires_cuda
def test_gradient_on_another_device_is_refused():
    x = values_with_specials((10,), torch.float32).cuda().requires_grad_()
    with pytest.raises(RuntimeError, match="device"):
        quantize(x, 2, 2.0).backward(torch.ones(10))
    _, mask = ops.linear_mid_tread_half_quantize_forward(x.detach(), 2, 2.0)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.linear_mid_tread_half_quantize_backward(torch.ones(10), mask)


def test_public_names():
    assert callable(torch_ext.linear_mid_tread_half_quantize)
    assert issubclass(torch_ext.QuantActivation, nn.Module)
    assert isinstance(torch_ext.built_with_cuda(), bool)
    for name in (
        "linear_mid_tread_half_quantize",
        "linear_mid_tread_half_quantize_",
        "linear_mid_tread_half_quantize_forward",
        "linear_mid_tread_half_quantize_forward_",
        "linear_mid_tread_half_quantize_backward",
    ):
        assert hasattr(ops, name)
    assert str(ops.linear_mid_tread_half_quantize.default._schema) == (
        "torch_ext::linear_mid_tread_half_quantize(Tensor x, int bit, float max_value) -> Tensor"
    )
    assert torch_ext.linear_mid_tread_half_quantize.__doc__ and torch_ext.QuantActivation.__doc__


# --------------------------------------------------------------------------
# More than 2^31 elements on the CPU and on CUDA (bfloat16 keeps it at 4 GiB an array).


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


HUGE_NUMEL = 2**31 + 4099  # not a multiple of 8, 64 or any vector width


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_more_than_2_31_elements_bfloat16_cpu():
    need = 9.5  # x, y (4 GiB each), the mask (0.25 GiB), slack
    if _mem_available_gib() < need:
        pytest.skip(f"needs {need} GiB of free memory, {_mem_available_gib():.1f} GiB available")
    bit, max_value = 3, 1.5
    period = 65537  # prime: every element position meets every pattern value
    pattern = random_values((period,), torch.bfloat16, max_value, seed=2024)
    x = pattern.repeat(HUGE_NUMEL // period + 1)[:HUGE_NUMEL]
    assert x.is_contiguous() and x.numel() > 2**31
    y_pattern = reference(pattern, bit, max_value)

    def check_periodic(t, expected_period, what):
        assert_bit_exact(t[:period], expected_period, f"{what}: first period", nan_payload=False)
        # t is periodic iff t[i] == t[i + period]: together this checks every element.
        assert torch.equal(as_bits(t[:-period]), as_bits(t[period:])), f"{what}: not periodic"
        tail = t[-(HUGE_NUMEL % period) - period :]
        assert_bit_exact(tail[:period], expected_period, f"{what}: last whole period", nan_payload=False)

    y = quantize(x, bit, max_value)
    check_periodic(y, y_pattern, "out of place")
    del y

    mask = ops.linear_mid_tread_half_quantize_forward_(x, bit, max_value)  # x becomes y
    assert mask.numel() == (HUGE_NUMEL + 7) // 8
    check_periodic(x, y_pattern, "in place")
    pattern_mask = expected_mask(pattern, max_value)
    for start in (0, 2**31 - 8 * 4096, 2**31 - 5, HUGE_NUMEL - 9000):
        start = start - start % 8
        stop = min(start + 8 * 4096, HUGE_NUMEL)
        bits, padding = unpack_mask(mask[start // 8 : (stop + 7) // 8], stop - start)
        idx = torch.arange(start, stop) % period
        assert torch.equal(bits, pattern_mask[idx]), f"mask at {start}"
        if stop == HUGE_NUMEL:
            assert not padding.any()

    grad_x = ops.linear_mid_tread_half_quantize_backward(x, mask)
    check_periodic(grad_x, reference_backward(y_pattern, pattern, max_value), "backward")


@pytest.mark.cuda
@requires_cuda
def test_more_than_2_31_elements_bfloat16_cuda():
    """The CUDA kernels' 64-bit indexing: out of place, forward with its mask
    (the last, partial byte's padding 0), backward and in place, across 2^31."""
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip(f"needs 14 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    bit, max_value = 3, 1.5
    period = 65537
    pattern = values_with_specials((period,), torch.bfloat16, max_value, seed=2024)
    x = pattern.cuda().repeat(HUGE_NUMEL // period + 1)[:HUGE_NUMEL]
    y_pattern = quantize(pattern, bit, max_value)  # the CPU's values

    def check(t, expected, what):
        assert torch.equal(as_bits(t[:period]), as_bits(expected)), f"{what}: first period"
        assert torch.equal(t[:-period].view(torch.int16), t[period:].view(torch.int16)), f"{what}: not periodic"
        start = (HUGE_NUMEL // period - 1) * period
        assert torch.equal(as_bits(t[start : start + period]), as_bits(expected)), f"{what}: last whole period"
        # Right across the 2^31 boundary, against the CPU.
        lo, hi = 2**31 - 5000, HUGE_NUMEL
        idx = torch.arange(lo, hi) % period
        assert torch.equal(as_bits(t[lo:hi]), as_bits(expected[idx])), f"{what}: from below 2^31 to the end"

    y = quantize(x, bit, max_value)
    check(y, y_pattern, "out of place")
    del y
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    check(y, y_pattern, "forward op")
    del y
    _, pattern_mask = ops.linear_mid_tread_half_quantize_forward(pattern, bit, max_value)
    pattern_bits = expected_mask(pattern, max_value)
    assert torch.equal(unpack_mask(pattern_mask, period)[0], pattern_bits)
    for start in (0, 2**31 - 4096, HUGE_NUMEL - HUGE_NUMEL % 8 - 8192):
        bits, _ = unpack_mask(mask[start // 8 : start // 8 + 1024], 8192)
        idx = torch.arange(start, start + 8192) % period
        assert torch.equal(bits, pattern_bits[idx]), f"mask at {start}"
    # The last, partial byte: its padding bits are 0.
    tail = HUGE_NUMEL % 8
    bits, padding = unpack_mask(mask[-1:], tail)
    assert torch.equal(bits, pattern_bits[torch.arange(HUGE_NUMEL - tail, HUGE_NUMEL) % period])
    assert not padding.any()
    grad = ops.linear_mid_tread_half_quantize_backward(x, mask)
    check(grad, ops.linear_mid_tread_half_quantize_backward(pattern, pattern_mask), "backward op")
    del grad
    mask_ = ops.linear_mid_tread_half_quantize_forward_(x, bit, max_value)
    assert torch.equal(mask_, mask)
    check(x, y_pattern, "in place")


def test_the_module_names_itself_in_its_refusals():
    # Issue 25: QuantActivation(bit=0) named the function linear_mid_tread_half_quantize.
    for kwargs, exc, message in (
        ({"bit": 0}, ValueError, "QuantActivation: bit must be in 1..16 or 32, got bit=0"),
        ({"bit": 2.0}, TypeError, "QuantActivation: bit must be an int"),
        ({"max_value": -1.0}, ValueError, "QuantActivation: max_value must be finite and > 0"),
        ({"max_value": 0.0, "learn_max_value": "pact"}, ValueError, "QuantActivation: max_value must be finite"),
        ({"learn_max_value": "PACT"}, ValueError, "QuantActivation: mode must be \"pact\" or \"lsq\""),
    ):
        with pytest.raises(exc) as info:
            torch_ext.QuantActivation(**kwargs)
        assert str(info.value).startswith(message) and "linear_mid_tread_half_quantize" not in str(info.value)


def test_an_unknown_cpu_isa_is_refused_in_one_line(monkeypatch):
    # TORCH_EXT_CPU_ISA (csrc/torch_ext/cpu_isa.h) caps the CPU loops; a value it does not know was a
    # silent "no cap". Needs the extension built from the present cpu_isa.h.
    x = torch.randn(64)
    monkeypatch.setenv("TORCH_EXT_CPU_ISA", "foo")
    calls = {
        "quantize": lambda: torch_ext.linear_mid_tread_half_quantize(x, 2, 2.0),
        "learnable": lambda: torch_ext.linear_mid_tread_half_quantize_learnable(x, torch.tensor(2.0)),
        "pack": lambda: ops.quantize_pack_codes(torch.rand(1, 3, 4, 4), 2, 2.0),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value).strip()
        assert "\n" not in message.split(" (Triggered")[0], (name, message)
        assert message.startswith("TORCH_EXT_CPU_ISA='foo' is not one of baseline, avx2, avx512"), (name, message)
    for value in ("baseline", "avx2", "avx512", ""):
        monkeypatch.setenv("TORCH_EXT_CPU_ISA", value)
        assert torch.equal(calls["quantize"](), torch_ext.reference.linear_mid_tread_half_quantize_reference(x, 2, 2.0))
