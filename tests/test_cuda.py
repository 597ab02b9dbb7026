"""CUDA: bit-identical to the CPU (docs/quantizer.md: "Results are bit-identical on
every device"), at every dtype, bit width, layout and size, beyond 2^31
elements, on a non-default stream, under torch.compile and torch.autocast.

Every test here is skipped, with the reason, where no GPU is visible or
torch_ext was built without its CUDA kernels (see tests/conftest.py).
"""

from __future__ import annotations

import math

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
    BITS,
    CUDA_SKIP_REASON,
    DTYPES,
    HAS_CUDA,
    as_bits,
    assert_bit_exact,
    assert_same_layout,
    dtype_id,
    is_dense,
    expected_mask,
    requires_triton,
    tie_values,
    unpack_mask,
)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)

ops = torch.ops.torch_ext
quantize = torch_ext.linear_mid_tread_half_quantize
quantize_ = torch_ext.linear_mid_tread_half_quantize_
MAX_VALUES = (2.0, 1.0 / 3.0, 6.0, 1e-6, 1e6)


def values(shape, dtype, max_value=2.0, seed=0, nan=True) -> torch.Tensor:
    """CPU values over [-m/2, 3m/2] with ties, their neighbours and specials."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    x = ((torch.rand(numel, generator=g, dtype=torch.float64) * 2.0 - 0.5) * max_value).to(dtype)
    special = tie_values(dtype, 3, max_value)
    if not nan:
        special = special[~special.isnan()]
    if numel:
        idx = torch.randint(0, numel, (min(numel, special.numel()),), generator=g)
        x[idx] = special[torch.randint(0, special.numel(), (idx.numel(),), generator=g)]
    return x.reshape(shape)


def grads_like(x: torch.Tensor, seed=1) -> torch.Tensor:
    """grad_y with inf, -inf, NaN and -0.0 mixed in."""
    g = values(x.shape, x.dtype, 1.0, seed=seed)
    flat = g.view(-1)
    flat[::5] = float("inf")
    flat[1::7] = float("nan")
    flat[2::9] = float("-inf")
    flat[3::11] = -0.0
    return g.to(x.device)


def both(fn, x, *args):
    """fn on the CUDA copy and on the CPU copy of x."""
    return fn(x.cuda(), *args), fn(x.cpu(), *args)


# --------------------------------------------------------------------------
# Bit identity with the CPU.


@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bit_identical_to_cpu(dtype, bit):
    for max_value in MAX_VALUES:
        x = torch.cat([tie_values(dtype, bit, max_value, max_k=8192), values((4099,), dtype, max_value, seed=bit)])
        what = f"{dtype_id(dtype)} bit={bit} max_value={max_value}"
        xc = x.cuda()
        y = quantize(xc, bit, max_value)
        y_cpu = quantize(x, bit, max_value)
        assert y.is_cuda
        assert_bit_exact(y, y_cpu, "CUDA vs CPU " + what, nan_payload=False)
        assert_bit_exact(y, reference(x, bit, max_value), "CUDA vs reference " + what, nan_payload=False)
        (yf, mask), (yf_cpu, mask_cpu) = both(ops.linear_mid_tread_half_quantize_forward, x, bit, max_value)
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
            ops.linear_mid_tread_half_quantize_backward(g.cuda(), mask),
            ops.linear_mid_tread_half_quantize_backward(g, mask_cpu),
            "backward op " + what,
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_bits_identical_to_cpu(dtype):
    """NaN in, NaN out, with the same bits on both devices (docs/quantizer.md's
    bit-identity read strictly: NaN payloads and signs included)."""
    nan = torch.tensor([float("nan")], dtype=dtype)
    patterns = torch.cat([nan, -nan])
    if dtype in (torch.float32, torch.float64):
        bits = as_bits(patterns)
        patterns = torch.cat([patterns, (bits | 1).view(dtype), (bits | 0x15).view(dtype)])
    x = patterns.repeat(9)  # also through the vectorized path
    for bit in (1, 2, 16, 32):
        y, y_cpu = both(quantize, x, bit, 2.0)
        assert y.isnan().all()
        assert_bit_exact(y, y_cpu, f"bit={bit}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_identical_to_cpu(dtype):
    for bit in (1, 2, 8, 16, 32):
        for max_value in (2.0, 1.0 / 3.0, 1e6):
            x = torch.cat([tie_values(dtype, bit, max_value, max_k=2048), values((1001,), dtype, max_value)])
            g = grads_like(x)
            grads = []
            for device in ("cuda", "cpu"):
                leaf = x.to(device).clone().requires_grad_()
                quantize(leaf, bit, max_value).backward(g.to(device))
                assert leaf.grad.device.type == device and leaf.grad.dtype == dtype
                grads.append(leaf.grad)
            assert_bit_exact(grads[0], grads[1], f"bit={bit} m={max_value}")
            assert_bit_exact(grads[0], reference_backward(g, x, max_value), f"bit={bit} m={max_value}")
            # Exactly +0 outside (0, m), even where grad_y is inf or NaN.
            t = compute_dtype(dtype)
            outside = ~((x.to(t) > 0) & (x.to(t) < torch.tensor(max_value, dtype=t)))
            assert (as_bits(grads[0])[outside] == 0).all()


# --------------------------------------------------------------------------
# Layouts, odd sizes, alignment.

LAYOUTS = {
    "contiguous": lambda t: t(2, 3, 5, 7),
    "transposed": lambda t: t(13, 7).t(),
    "permuted": lambda t: t(2, 3, 5, 7).permute(3, 1, 0, 2),
    "step_slices": lambda t: t(19, 23)[::2, 1::3],
    # channels_last as permuted NHWC views, so that in place writes reach the base
    "channels_last": lambda t: t(4, 5, 7, 6).permute(0, 3, 1, 2),
    "channels_last_3d": lambda t: t(2, 4, 5, 3, 3).permute(0, 4, 1, 2, 3),
    "channels_last_sliced": lambda t: t(2, 5, 7, 6).permute(0, 3, 1, 2)[:, 1:5:2, 1:, ::2],
    "expanded": lambda t: t(1, 5, 1).expand(4, 5, 3),
    "zero_dim": lambda t: t(),
    "empty": lambda t: t(0, 3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layouts_identical_to_cpu(dtype, layout):
    bit, max_value = 3, 1.5

    def make_on(device):
        return lambda *shape: values(shape, dtype, max_value, seed=len(shape)).to(device)

    x = LAYOUTS[layout](make_on("cuda"))
    x_cpu = LAYOUTS[layout](make_on("cpu"))
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
    gx = ops.linear_mid_tread_half_quantize_backward(g.cuda(), mask)
    assert_bit_exact(gx, ops.linear_mid_tread_half_quantize_backward(g, mask_cpu), layout)
    if layout != "expanded":
        # In place on the view: the base takes exactly the CPU's values.
        base_holder = {}

        def keep(device):
            def make(*shape):
                base_holder[device] = values(shape, dtype, max_value, seed=len(shape)).to(device)
                return base_holder[device]
            return make

        v, v_cpu = LAYOUTS[layout](keep("cuda")), LAYOUTS[layout](keep("cpu"))
        quantize_(v, bit, max_value)
        quantize_(v_cpu, bit, max_value)
        assert_bit_exact(v, y_cpu, "in place " + layout, nan_payload=False)
        assert_bit_exact(base_holder["cuda"], base_holder["cpu"], "in place, whole base " + layout, nan_payload=False)


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "permuted", "channels_last_sliced", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_memory_order_mask_identical_to_cpu(dtype, layout):
    """The mask in the memory order of the dense tensor the kernel ran on
    (docs/quantizer.md): the same bits as the CPU for the same layout, and the
    backward with x_strides, grad_y in x's layout or another, and autograd
    (grad_x in x's layout) identical to the CPU."""
    for bit in (1, 2, 8, 32):
        max_value = 1.5
        x_cpu = LAYOUTS[layout](lambda *shape: values(shape, dtype, max_value, seed=bit))
        x = LAYOUTS[layout](lambda *shape: values(shape, dtype, max_value, seed=bit).cuda())
        assert x.stride() == x_cpu.stride()
        what = f"{layout} {dtype_id(dtype)} bit={bit}"
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
            gx = ops.linear_mid_tread_half_quantize_backward(gl.cuda(), mask, y.stride())
            gx_cpu = ops.linear_mid_tread_half_quantize_backward(gl, mask_cpu, y_cpu.stride())
            assert_bit_exact(gx, gx_cpu, f"backward op, grad_y {gname}, {what}")
            assert_bit_exact(gx, reference_backward(gl, x_cpu, max_value), f"backward op, grad_y {gname}, {what}")
            assert gx.stride() == y.stride() or gx.numel() == 0, what
            leaf = x.detach().clone().requires_grad_()
            (grad,) = torch.autograd.grad(quantize(leaf * 1, bit, max_value), leaf, gl.cuda())
            assert_bit_exact(grad, gx_cpu, f"autograd, grad_y {gname}, {what}", nan_payload=False)
        if layout != "empty":
            xi, xi_cpu = x.clone(), x_cpu.clone()
            assert torch.equal(
                ops.linear_mid_tread_half_quantize_forward_(xi, bit, max_value).cpu(),
                ops.linear_mid_tread_half_quantize_forward_(xi_cpu, bit, max_value),
            ), "forward_ mask " + what


@pytest.mark.parametrize("offset", range(0, 9))
def test_odd_sizes_and_misaligned_pointers(offset):
    """Sizes around the 8-element groups and 128-bit words, starting at every
    offset (data pointers that are not 16-byte aligned take the scalar path)."""
    for dtype in DTYPES:
        base = values((70000 + 16,), dtype, 2.0, seed=offset)
        base_cuda = base.cuda()
        g_base = grads_like(base).cuda()
        for size in (1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 255, 256, 257, 1023, 4097, 65537):
            x, x_cpu = base_cuda[offset : offset + size], base[offset : offset + size]
            y, mask = ops.linear_mid_tread_half_quantize_forward(x, 4, 2.0)
            y_cpu, mask_cpu = ops.linear_mid_tread_half_quantize_forward(x_cpu, 4, 2.0)
            assert_bit_exact(y, y_cpu, f"{dtype} offset={offset} size={size}", nan_payload=False)
            assert torch.equal(mask.cpu(), mask_cpu), f"{dtype} offset={offset} size={size}"
            assert_bit_exact(quantize(x, 4, 2.0), y_cpu, nan_payload=False)
            g = g_base[offset : offset + size]
            assert_bit_exact(
                ops.linear_mid_tread_half_quantize_backward(g, mask),
                ops.linear_mid_tread_half_quantize_backward(g.cpu(), mask_cpu),
            )
            xi, xi_cpu = base_cuda.clone(), base.clone()
            ops.linear_mid_tread_half_quantize_forward_(xi[offset : offset + size], 4, 2.0)
            ops.linear_mid_tread_half_quantize_forward_(xi_cpu[offset : offset + size], 4, 2.0)
            assert_bit_exact(xi, xi_cpu, "in place, neighbours untouched", nan_payload=False)


# --------------------------------------------------------------------------
# The grid-stride loop: more elements than one pass of the grid covers.

#: The kernels' launch shape (cuda/linear_mid_tread_half_quantize_kernel.cu):
#: 256 threads a block, 8 elements a thread a pass, the grid capped at the
#: blocks resident at once.
THREADS, GROUP = 256, 8
#: 5 M + 3: above 2 passes of an H200's grid (132 multiprocessors x 8 blocks x
#: 256 threads x 8 elements = 2,162,688 elements a pass), with a partial last group.
GRID_STRIDE_NUMEL = 5_000_003


def elements_a_grid_pass() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.multi_processor_count * max(1, props.max_threads_per_multi_processor // THREADS) * THREADS * GROUP


@pytest.mark.parametrize("offset", (0, 1), ids=("aligned", "offset1"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grid_stride_loop_identical_to_cpu(dtype, offset):
    """Forward, in-place forward and backward over 5 M + 3 elements, each
    thread looping over the grid more than once; at element offset 0 (16-byte
    aligned: the 128-bit path) and 1 (misaligned: the scalar path)."""
    numel, bit, max_value = GRID_STRIDE_NUMEL, 3, 1.5
    assert numel > 2 * elements_a_grid_pass(), "the grid covers this size in under 2 passes: raise GRID_STRIDE_NUMEL"
    base = values((offset + numel,), dtype, max_value, seed=17 + offset)
    base_cuda = base.cuda()
    x, x_cpu = base_cuda[offset:], base[offset:]
    assert (x.data_ptr() % 16 == 0) == (offset == 0), "the view is not (mis)aligned as intended"
    what = f"{dtype_id(dtype)} offset={offset} numel={numel}"

    y_cpu, mask_cpu = ops.linear_mid_tread_half_quantize_forward(x_cpu, bit, max_value)
    y, mask = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    assert_bit_exact(y, y_cpu, "forward " + what)
    assert torch.equal(mask.cpu(), mask_cpu), "mask " + what
    assert_bit_exact(quantize(x, bit, max_value), y_cpu, "forward without mask " + what)

    # In place on the view: the elements before it are left alone.
    xi = base_cuda.clone()
    mask_ = ops.linear_mid_tread_half_quantize_forward_(xi[offset:], bit, max_value)
    assert_bit_exact(xi[offset:], y_cpu, "in-place forward " + what)
    assert_bit_exact(xi[:offset], base[:offset], "in place: the element before the view " + what)
    assert torch.equal(mask_.cpu(), mask_cpu), "in-place mask " + what
    xi = base_cuda.clone()
    quantize_(xi[offset:], bit, max_value)
    assert_bit_exact(xi[offset:], y_cpu, "in place without mask " + what)
    assert_bit_exact(xi[:offset], base[:offset], "in place without mask: the element before the view " + what)
    del xi

    # Backward, grad_y at the same offset (inf, NaN and -0.0 in it).
    g_base = grads_like(base)
    g_cpu = g_base[offset:]
    g = g_base.cuda()[offset:]
    assert_bit_exact(
        ops.linear_mid_tread_half_quantize_backward(g, mask),
        ops.linear_mid_tread_half_quantize_backward(g_cpu, mask_cpu),
        "backward " + what,
    )
    leaf = x.clone().requires_grad_()
    quantize(leaf, bit, max_value).backward(g)
    assert_bit_exact(leaf.grad, ops.linear_mid_tread_half_quantize_backward(g_cpu, mask_cpu), "autograd " + what)


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_sanitizer_workload(dtype):
    """Every kernel, aligned and misaligned, at sizes around the 8-element
    groups and just above one grid pass: the selection scripts/gpu_check.sh
    runs under compute-sanitizer (memcheck, racecheck), small enough for it."""
    sizes = (1, 7, 9, 4097, elements_a_grid_pass() + 11)
    base = values((max(sizes) + 1,), dtype, 2.0, seed=23)
    base_cuda = base.cuda()
    g_base = grads_like(base)
    g_base_cuda = g_base.cuda()
    for offset in (0, 1):
        for size in sizes:
            what = f"{dtype_id(dtype)} offset={offset} size={size}"
            x, x_cpu = base_cuda[offset : offset + size], base[offset : offset + size]
            y_cpu, mask_cpu = ops.linear_mid_tread_half_quantize_forward(x_cpu, 4, 2.0)
            y, mask = ops.linear_mid_tread_half_quantize_forward(x, 4, 2.0)
            assert_bit_exact(y, y_cpu, what)
            assert torch.equal(mask.cpu(), mask_cpu), what
            assert_bit_exact(quantize(x, 4, 2.0), y_cpu, what)
            xi = base_cuda.clone()
            mask_ = ops.linear_mid_tread_half_quantize_forward_(xi[offset : offset + size], 4, 2.0)
            assert_bit_exact(xi[offset : offset + size], y_cpu, "in-place forward " + what)
            assert torch.equal(mask_.cpu(), mask_cpu), what
            xi = base_cuda.clone()
            quantize_(xi[offset : offset + size], 4, 2.0)
            assert_bit_exact(xi[offset : offset + size], y_cpu, "in place " + what)
            g = g_base_cuda[offset : offset + size]
            assert_bit_exact(
                ops.linear_mid_tread_half_quantize_backward(g, mask),
                ops.linear_mid_tread_half_quantize_backward(g_base[offset : offset + size], mask_cpu),
                "backward " + what,
            )


def test_launch_configuration_is_per_device():
    """The launch configuration is cached per device (not asked of the
    runtime on every launch): calls on every visible device, in both orders,
    still give the CPU's results."""
    x = values((3 * elements_a_grid_pass() + 5,), torch.float32, 2.0, seed=29)
    y_cpu = quantize(x, 2, 2.0)
    order = list(range(torch.cuda.device_count()))
    for device in order + order[::-1]:
        assert_bit_exact(quantize(x.to(f"cuda:{device}"), 2, 2.0), y_cpu, f"cuda:{device}")


def test_empty_and_zero_dim():
    for dtype in DTYPES:
        for shape in ((), (0,), (3, 0, 2)):
            x = values(shape, dtype, 2.0).cuda().requires_grad_()
            y = quantize(x, 2, 2.0)
            assert y.shape == x.shape and y.is_cuda and y.dtype == dtype
            y.backward(torch.ones_like(y))
            assert_bit_exact(x.grad, reference_backward(torch.ones(shape, dtype=dtype), x.detach().cpu(), 2.0))


def test_refused_input_on_cuda():
    x = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="bit=0"):
        ops.linear_mid_tread_half_quantize(x, 0, 2.0)
    with pytest.raises(ValueError, match="max_value"):
        ops.linear_mid_tread_half_quantize_forward(x, 2, float("nan"))
    with pytest.raises(TypeError, match="x"):
        quantize(torch.ones(4, dtype=torch.int32, device="cuda"), 2, 2.0)
    xi = x.clone()
    with pytest.raises(ValueError):
        quantize_(xi, 33, 2.0)
    assert torch.equal(xi, x)


def test_gradient_on_another_device_is_refused():
    x = values((10,), torch.float32).cuda().requires_grad_()
    with pytest.raises(RuntimeError, match="device"):
        quantize(x, 2, 2.0).backward(torch.ones(10))
    _, mask = ops.linear_mid_tread_half_quantize_forward(x.detach(), 2, 2.0)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        ops.linear_mid_tread_half_quantize_backward(torch.ones(10), mask)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_the_first_is_current():
    x = values((1000,), torch.float32)
    with torch.cuda.device(0):
        y = quantize(x.to("cuda:1"), 3, 2.0)
        assert y.device == torch.device("cuda:1")
    assert_bit_exact(y, quantize(x, 3, 2.0), nan_payload=False)


# --------------------------------------------------------------------------
# More than 2^31 elements.

HUGE_NUMEL = 2**31 + 4099


def test_more_than_2_31_elements_bfloat16():
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip(f"needs 14 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    bit, max_value = 3, 1.5
    period = 65537
    pattern = values((period,), torch.bfloat16, max_value, seed=2024)
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


# --------------------------------------------------------------------------
# Streams.


def test_runs_on_the_current_stream():
    """The kernels run on the current stream: behind a long kernel queued on
    a side stream, they must still see the values written after it."""
    x_cpu = values((1 << 20,), torch.float32, 2.0, seed=5)
    g_cpu = grads_like(x_cpu)
    x_src, g_src = x_cpu.cuda(), g_cpu.cuda()
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        x = torch.zeros(x_cpu.shape, device="cuda")
        g = torch.zeros(g_cpu.shape, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s: a kernel on another stream would run first, on zeros
        x.copy_(x_src)
        g.copy_(g_src)
        y, mask = ops.linear_mid_tread_half_quantize_forward(x, 3, 2.0)
        y2 = quantize(x, 3, 2.0)
        gx = ops.linear_mid_tread_half_quantize_backward(g, mask)
        xi = x.clone()
        quantize_(xi, 3, 2.0)
    side.synchronize()
    y_cpu, mask_cpu = ops.linear_mid_tread_half_quantize_forward(x_cpu, 3, 2.0)
    assert_bit_exact(y, y_cpu, nan_payload=False)
    assert_bit_exact(y2, y_cpu, nan_payload=False)
    assert_bit_exact(xi, y_cpu, nan_payload=False)
    assert torch.equal(mask.cpu(), mask_cpu)
    assert_bit_exact(gx, ops.linear_mid_tread_half_quantize_backward(g_cpu, mask_cpu))


def test_autograd_on_a_side_stream():
    x_cpu = values((100_003,), torch.bfloat16, 2.0, seed=6)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = x_cpu.cuda().requires_grad_()
        y = torch_ext.QuantActivation(2, 2.0)(x)
        y.backward(torch.ones_like(y))
    side.synchronize()
    assert_bit_exact(y, quantize(x_cpu, 2, 2.0), nan_payload=False)
    assert_bit_exact(x.grad, reference_backward(torch.ones_like(x_cpu), x_cpu, 2.0))


# --------------------------------------------------------------------------
# opcheck, torch.compile, autocast.


def _opcheck_samples():
    return [
        values((5, 7), torch.float32, nan=False).cuda(),
        values((5, 7), torch.bfloat16, nan=False).cuda(),
        values((2, 3, 4, 5), torch.float16, nan=False).cuda().contiguous(memory_format=torch.channels_last),
        values((6, 5), torch.float64, nan=False).cuda().t(),
    ]


def test_opcheck_on_cuda():
    for x in _opcheck_samples():
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


@requires_triton
def test_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    module = torch_ext.QuantActivation(4, 1.0 / 3.0)
    module_inplace = torch_ext.QuantActivation(4, 1.0 / 3.0, inplace=True)

    def fn(x):
        return module(x) + module_inplace(x * 2.0)

    compiled = torch.compile(fn, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        x = values((8, 3, 17, 9), dtype, 1.0 / 3.0, seed=9, nan=False).cuda().contiguous(memory_format=torch.channels_last)
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


@pytest.mark.parametrize("amp_dtype", (torch.bfloat16, torch.float16), ids=dtype_id)
def test_autocast_training(amp_dtype):
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


def test_repeated_calls_are_deterministic():
    x = values((1_000_003,), torch.float16, 2.0, seed=11).cuda()
    first = ops.linear_mid_tread_half_quantize_forward(x, 5, 2.0)
    for _ in range(3):
        again = ops.linear_mid_tread_half_quantize_forward(x, 5, 2.0)
        assert torch.equal(as_bits(again[0]), as_bits(first[0]))
        assert torch.equal(again[1], first[1])


# ===========================================================================
# Learnable max_value (torch_ext.linear_mid_tread_half_quantize_learnable):
# CUDA kernels against the CPU's, no host-device sync, deterministic sums.
# ===========================================================================

LEARN_MODES = ("pact", "lsq")


def _learnable_run(x, m, bit, mode, grad_y):
    x = x.detach().clone().requires_grad_()
    m = m.detach().clone().requires_grad_()
    y = torch_ext.linear_mid_tread_half_quantize_learnable(x, m, bit, mode)
    y.backward(grad_y)
    return y.detach(), x.grad, m.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bit", (1, 2, 3, 8, 16, 32))
@pytest.mark.parametrize("mode", LEARN_MODES)
def test_learnable_cuda_matches_cpu(dtype, bit, mode):
    x = values((4099,), dtype, max_value=1.5, seed=bit)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    m = torch.tensor(1.5)
    y_cpu, gx_cpu, gm_cpu = _learnable_run(x, m, bit, mode, g)
    y_cuda, gx_cuda, gm_cuda = _learnable_run(x.cuda(), m.cuda(), bit, mode, g.cuda())
    assert torch.equal(as_bits(y_cuda.cpu()), as_bits(y_cpu))
    assert torch.equal(as_bits(y_cuda.cpu()), as_bits(quantize(x, bit, 1.5)))
    assert torch.equal(as_bits(gx_cuda.cpu()), as_bits(gx_cpu))
    # Both sums are in double, in different orders: equal up to float32 rounding.
    torch.testing.assert_close(gm_cuda.cpu(), gm_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", LEARN_MODES)
def test_learnable_cuda_grad_max_value_is_deterministic(mode):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3_000_017, device="cuda", generator=g) * 2 + 1
    grad_y = torch.randn(3_000_017, device="cuda", generator=g)
    m = torch.tensor(1.25, device="cuda")
    first = _learnable_run(x, m, 2, mode, grad_y)[2]
    for _ in range(5):
        assert torch.equal(as_bits(_learnable_run(x, m, 2, mode, grad_y)[2]), as_bits(first))


@pytest.mark.parametrize("mode", LEARN_MODES)
def test_learnable_cuda_no_host_sync(mode):
    x = torch.randn(1 << 16, device="cuda", requires_grad=True)
    m = torch.tensor(1.0, device="cuda", requires_grad=True)
    torch_ext.linear_mid_tread_half_quantize_learnable(x, m, 2, mode).sum().backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = torch_ext.linear_mid_tread_half_quantize_learnable(x, m, 2, mode)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert m.grad is not None


@pytest.mark.parametrize("bad", (0.0, -1.0, float("nan"), float("inf")))
def test_learnable_cuda_out_of_range_max_value_matches_cpu(bad):
    x = values((1000,), torch.float32, max_value=2.0, nan=False)
    x = x[x.isfinite()]
    g = torch.ones_like(x)
    cpu = _learnable_run(x, torch.tensor(bad), 2, "pact", g)
    cuda = _learnable_run(x.cuda(), torch.tensor(bad, device="cuda"), 2, "pact", g.cuda())
    assert torch.equal(as_bits(cuda[0].cpu()), as_bits(cpu[0])) and cuda[0].isfinite().all()
    assert torch.equal(as_bits(cuda[1].cpu()), as_bits(cpu[1]))
    assert torch.equal(cuda[2].cpu(), cpu[2])  # sums of ones: exact in either order


def test_learnable_cuda_refuses_max_value_on_another_device():
    with pytest.raises(ValueError, match="max_value must be on the device of x"):
        torch_ext.linear_mid_tread_half_quantize_learnable(torch.ones(4, device="cuda"), torch.tensor(1.0))


def test_learnable_cuda_opcheck():
    x = torch.randn(6, 5, device="cuda")
    m = torch.tensor(1.5, device="cuda", requires_grad=True)
    for mode in LEARN_MODES:
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable, (x, m, 2, mode, mode == "lsq"))
