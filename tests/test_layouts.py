"""The packed mask in memory order: no copies for dense layouts.

docs/quantizer.md, "The packed gradient mask": the mask follows the memory
order of the dense tensor the kernel runs on (x itself when x is dense:
contiguous, channels_last, channels_last_3d, any permutation), and the
backward op gets that layout's strides (``x_strides``). These tests check the
values and gradients bit for bit against the pure-PyTorch reference for every
layout x dtype x a few bit widths, with grad_y in x's layout and in others,
that grad_x comes out in x's layout, that a dense input is never copied (the
profiler counts the copies), and that the schema change keeps opcheck,
torch.compile and torch.export working.

CUDA against CPU for these layouts is in test_linear_mid_tread_half_quantize.py (its device-parametrised section).
"""

from __future__ import annotations

import pytest
import torch

import torch_ext
from torch_ext.reference import (
    linear_mid_tread_half_quantize_backward_reference as reference_backward,
    linear_mid_tread_half_quantize_reference as reference,
)

from conftest import (
    DTYPES,
    assert_bit_exact,
    assert_same_layout,
    contiguous_strides,
    dtype_id,
    is_dense,
    expected_mask,
    expected_mask_in_layout,
    tie_values,
    unpack_mask,
)

ops = torch.ops.torch_ext
quantize = torch_ext.linear_mid_tread_half_quantize
quantize_ = torch_ext.linear_mid_tread_half_quantize_

BITS = (1, 2, 8, 32)


def values(shape, dtype, max_value, seed):
    """Values over [-m/2, 3m/2] with the ties of bit=2 and specials mixed in."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for n in shape:
        numel *= n
    x = ((torch.rand(numel, generator=g, dtype=torch.float64) * 2.0 - 0.5) * max_value).to(dtype)
    special = tie_values(dtype, 2, max_value)
    if numel:
        idx = torch.randint(0, numel, (min(numel, special.numel()),), generator=g)
        x[idx] = special[torch.randint(0, special.numel(), (idx.numel(),), generator=g)]
    return x.reshape(shape)


#: Each layout makes a view of the one tensor `make` returns (so the in-place
#: tests see the base); "dense" says whether it is non-overlapping and dense.
LAYOUTS = {
    "contiguous": (lambda make: make((2, 3, 5, 7)), True),
    "channels_last": (lambda make: make((2, 5, 7, 3)).permute(0, 3, 1, 2), True),
    "channels_last_3d": (lambda make: make((2, 4, 5, 3, 3)).permute(0, 4, 1, 2, 3), True),
    "permuted": (lambda make: make((5, 2, 7, 3)).permute(1, 3, 0, 2), True),
    "size_one_dims_permuted": (lambda make: make((1, 9, 1, 4)).permute(2, 3, 0, 1), True),
    "non_dense_view": (lambda make: make((2, 5, 7, 6)).permute(0, 3, 1, 2)[:, 1:5:2, 1:, ::2], False),
    "step_slice": (lambda make: make((19, 23))[::2, 1::3], False),
    "empty_channels_last": (lambda make: make((0, 2, 2, 3)).permute(0, 3, 1, 2), True),
    "empty_middle": (lambda make: make((3, 0, 5)), True),
}


def make_layout(name, dtype, max_value, seed=0):
    build, dense = LAYOUTS[name]
    x = build(lambda shape: values(shape, dtype, max_value, seed))
    assert is_dense(x) == dense or x.numel() == 0, name
    return x


def grad_layouts(x, seed):
    """grad_y in x's own layout, row-major, channels_last and a non-dense view."""
    g = values(tuple(x.shape), x.dtype, 1.0, seed)
    g[..., ::3] = float("inf") if g.numel() else 0.0  # inf and NaN must become exactly 0 outside
    out = {"like_x": torch.empty_like(x).copy_(g), "contiguous": g.contiguous()}
    if x.dim() == 4:
        out["channels_last"] = g.contiguous(memory_format=torch.channels_last)
    wide = values((*x.shape[:-1], 2 * x.shape[-1]), x.dtype, 1.0, seed + 1) if x.dim() else None
    if wide is not None:
        strided = wide[..., ::2]
        strided.copy_(g)
        out["strided_view"] = strided
    return out


def memory_order_mask(x, max_value):
    """The rule of docs/quantizer.md read directly from x's memory: the bit
    for memory offset k is 0 < x.as_strided([numel], [1])[k] < m."""
    flat = x.as_strided((x.numel(),), (1,))
    return expected_mask(flat, max_value)


# --------------------------------------------------------------------------
# Values, masks and gradients against the reference.


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_mask_and_gradients(dtype, layout):
    max_value = 2.0
    for bit in BITS:
        x = make_layout(layout, dtype, max_value, seed=bit)
        what = f"{layout} {dtype_id(dtype)} bit={bit}"
        expected = reference(x, bit, max_value)
        y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
        assert_bit_exact(y, expected, what, nan_payload=False)
        assert is_dense(y)
        if is_dense(x):
            assert_same_layout(y, x, what)
        bits, padding = unpack_mask(mask, x.numel())
        assert torch.equal(bits, expected_mask_in_layout(x, max_value, y.stride())), what
        if is_dense(x) and x.numel():
            assert torch.equal(bits, memory_order_mask(x, max_value)), what
        assert not padding.any()
        assert_bit_exact(quantize(x, bit, max_value), expected, "no grad " + what, nan_payload=False)

        for gname, g in grad_layouts(x, seed=bit + 10).items():
            expected_grad = reference_backward(g, x, max_value)
            # The backward op with y's strides: grad_x in y's (x's) layout.
            grad_x = ops.linear_mid_tread_half_quantize_backward(g, mask, y.stride())
            assert_bit_exact(grad_x, expected_grad, f"backward op, grad_y {gname}, {what}")
            assert_same_layout(grad_x, y, f"grad_x in x's layout, grad_y {gname}, {what}")
            # Through autograd, x the same view of a base that requires grad.
            src = _source_of(layout, dtype, max_value, bit).requires_grad_()
            xin = LAYOUTS[layout][0](lambda shape: src)
            assert_bit_exact(xin.detach(), x, what)
            yq = quantize(xin, bit, max_value)
            (grad,) = torch.autograd.grad(yq, xin, g)
            assert_bit_exact(grad, expected_grad, f"autograd, grad_y {gname}, {what}")
            assert_same_layout(grad, y, f"autograd grad_x layout, grad_y {gname}, {what}")


def _source_of(layout, dtype, max_value, seed):
    """The base tensor a layout's view is taken from."""
    holder = []
    LAYOUTS[layout][0](lambda shape: holder.append(values(shape, dtype, max_value, seed)) or holder[-1])
    return holder[-1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_in_place_mask_and_gradients(dtype, layout):
    max_value = 1.0 / 3.0
    for bit in BITS:
        what = f"{layout} {dtype_id(dtype)} bit={bit}"
        base0 = _source_of(layout, dtype, max_value, bit)
        x0 = LAYOUTS[layout][0](lambda shape: base0)
        dense = is_dense(x0)
        # The kernel op: x's memory order when dense, row-major otherwise.
        base = base0.clone()
        xv = LAYOUTS[layout][0](lambda shape: base)
        mask = ops.linear_mid_tread_half_quantize_forward_(xv, bit, max_value)
        order = x0.stride() if dense else contiguous_strides(x0.shape)
        assert torch.equal(unpack_mask(mask, x0.numel())[0], expected_mask_in_layout(x0, max_value, order)), what
        assert_bit_exact(xv, reference(x0, bit, max_value), what, nan_payload=False)
        g = values(tuple(x0.shape), dtype, 1.0, bit + 20)
        assert_bit_exact(
            ops.linear_mid_tread_half_quantize_backward(g, mask, order), reference_backward(g, x0, max_value), what
        )
        # Through autograd: the base requires grad, the view is quantized in place.
        leaf = base0.clone().requires_grad_()
        h = leaf.clone()
        view = LAYOUTS[layout][0](lambda shape: h)
        assert quantize_(view, bit, max_value) is view
        for gname, gl in grad_layouts(x0, seed=bit + 30).items():
            (grad_base,) = torch.autograd.grad(view, leaf, gl, retain_graph=True)
            expected = torch.zeros_like(base0)
            LAYOUTS[layout][0](lambda shape: expected).copy_(reference_backward(gl, x0, max_value))
            assert_bit_exact(grad_base, expected, f"in-place autograd, grad_y {gname}, {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_leaf_gradient_in_x_layout(dtype):
    """A channels_last leaf gets a channels_last .grad, whatever grad_y's layout."""
    x = make_layout("channels_last", dtype, 2.0).requires_grad_()
    for g in grad_layouts(x.detach(), seed=3).values():
        x.grad = None
        quantize(x, 2, 2.0).backward(g)
        assert_bit_exact(x.grad, reference_backward(g, x.detach(), 2.0))
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_float16_and_bfloat16_conversions_on_every_bit_pattern():
    """The CPU kernels convert float16/bfloat16 with integer operations of their
    own: every one of the 65536 patterns, quantized and clipped, against the
    reference (which converts with c10), in both layouts."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = patterns.view(dtype).reshape(4, 64, 16, 16)
        for max_value in (2.0, 6e4, 1e-5, 3.0e38):
            if dtype == torch.float16 and max_value > 7e4:
                continue
            for bit in (1, 4, 16, 32):
                for xl in (x, x.contiguous(memory_format=torch.channels_last)):
                    expected = reference(xl, bit, max_value)
                    y, mask = ops.linear_mid_tread_half_quantize_forward(xl, bit, max_value)
                    assert_bit_exact(y, expected, f"{dtype} bit={bit} m={max_value}", nan_payload=False)
                    assert torch.equal(unpack_mask(mask, xl.numel())[0], memory_order_mask(xl, max_value))
                    # NaN results are the one NaN of formula.h.
                    nan_bits = {torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}[dtype]
                    assert (y.view(torch.int16)[y.isnan()] == nan_bits).all()


# --------------------------------------------------------------------------
# No copies for dense inputs: counted by the profiler.


def _count_copies(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return sum(n in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy") for n in names)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "permuted"])
def test_dense_inputs_are_never_copied(layout):
    x = make_layout(layout, torch.float32, 2.0).requires_grad_()
    g = torch.empty_like(x).copy_(values(tuple(x.shape), torch.float32, 1.0, 5))
    holder = {}

    def forward():
        holder["y"] = quantize(x, 2, 2.0)

    assert _count_copies(forward) == 0, "forward"
    y = holder["y"]
    assert_same_layout(y, x)
    assert _count_copies(lambda: torch.autograd.grad(y, x, g, retain_graph=True)) == 0, "backward, grad_y like x"
    # grad_y in another layout: exactly one copy.
    other = g.contiguous() if not x.is_contiguous() else g.contiguous(memory_format=torch.channels_last)
    assert not other.is_contiguous() or not x.is_contiguous()
    assert _count_copies(lambda: torch.autograd.grad(y, x, other, retain_graph=True)) == 1, "backward, other layout"
    with torch.no_grad():
        assert _count_copies(lambda: quantize(x, 2, 2.0)) == 0, "no grad"
    h = x.detach().clone().requires_grad_(False)
    assert _count_copies(lambda: quantize_(h, 2, 2.0)) == 0, "in place, no grad"
    leaf = x.detach().clone().requires_grad_()
    hx = leaf.clone()
    assert _count_copies(lambda: quantize_(hx, 2, 2.0)) == 0, "in place, differentiable"
    assert _count_copies(lambda: torch.autograd.grad(hx, leaf, g)) == 0, "in-place backward"


def test_non_dense_input_is_copied_once_into_y():
    x = make_layout("non_dense_view", torch.float32, 2.0).requires_grad_(False)
    assert _count_copies(lambda: ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)) == 1
    assert _count_copies(lambda: quantize(x, 2, 2.0)) == 1


# --------------------------------------------------------------------------
# The backward op's x_strides argument.


def test_backward_x_strides_are_checked():
    x = make_layout("channels_last", torch.float32, 2.0)
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)
    g = torch.ones_like(x)
    with pytest.raises(ValueError, match="x_strides must have one stride a dim"):
        ops.linear_mid_tread_half_quantize_backward(g, mask, [1, 2])
    with pytest.raises(ValueError, match="is not a dense layout"):
        ops.linear_mid_tread_half_quantize_backward(g, mask, [2 * s for s in y.stride()])
    with pytest.raises(ValueError, match="is not a dense layout"):
        ops.linear_mid_tread_half_quantize_backward(g, mask, [0, 1, 1, 1])
    # None: the mask is row-major (a contiguous x), grad_x laid out like grad_y.
    xc = x.contiguous()
    _, mask_c = ops.linear_mid_tread_half_quantize_forward(xc, 2, 2.0)
    gx = ops.linear_mid_tread_half_quantize_backward(g, mask_c)
    assert_bit_exact(gx, reference_backward(g, xc, 2.0))
    assert_same_layout(gx, g)


def test_opcheck_with_layouts():
    # No NaN: opcheck compares outputs with assert_close, where NaN != NaN.
    for layout in ("channels_last", "channels_last_3d", "permuted", "non_dense_view", "empty_channels_last"):
        x = make_layout(layout, torch.float32, 2.0).nan_to_num_(0.25)
        y, mask = ops.linear_mid_tread_half_quantize_forward(x, 2, 2.0)
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_forward.default, (x, 2, 2.0))
        torch.library.opcheck(ops.linear_mid_tread_half_quantize.default, (x.clone().requires_grad_(), 2, 2.0))
        if is_dense(x):
            torch.library.opcheck(ops.linear_mid_tread_half_quantize_forward_.default, (x.clone(), 2, 2.0))
            torch.library.opcheck(ops.linear_mid_tread_half_quantize_.default, (x.clone(), 2, 2.0))
        for g in grad_layouts(x, seed=1).values():
            g = g.nan_to_num_(0.5)
            torch.library.opcheck(ops.linear_mid_tread_half_quantize_backward.default, (g, mask, list(y.stride())))
            torch.library.opcheck(ops.linear_mid_tread_half_quantize_backward.default, (g, mask))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_channels_last_training_matches_eager(dynamic):
    """The saved x_strides trace (as SymInts with dynamic shapes): forward and
    backward of the out-of-place and in-place ops, compiled whole."""
    torch._dynamo.reset()

    def step(x, g):
        y = quantize(x, 3, 2.0)
        h = x * 2
        quantize_(h, 3, 2.0)
        loss = (y * g).sum() + (h * g).sum()
        return loss, y

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for layout in ("channels_last", "channels_last_3d", "permuted"):
        x = make_layout(layout, torch.float32, 2.0)
        g = values(tuple(x.shape), torch.float32, 1.0, 9).nan_to_num_(0.5).contiguous()
        xe = x.clone().requires_grad_()
        xc = x.clone().requires_grad_()
        le, ye = step(xe, g)
        lc, yc = compiled(xc, g)
        assert_bit_exact(yc, ye, layout, nan_payload=False)
        assert_same_layout(yc, ye, layout)
        le.backward()
        lc.backward()
        assert_bit_exact(xc.grad, xe.grad, layout, nan_payload=False)
        assert_same_layout(xc.grad, xe.grad, layout)


def test_export_channels_last_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch_ext.QuantActivation(2, 2.0)).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    ep = torch.export.export(model, (x,))
    assert_bit_exact(ep.module()(x), model(x))
