"""CUDA itself: where the kernels' memory, launch and stream handling could
go wrong, each against the CPU's bits (docs/quantizer.md: "Results are
bit-identical on every device"): data pointers off a 16-byte boundary, the
grid-stride loop beyond one pass of the grid, the launch configuration cached
per device, a second GPU, the current stream, and the small selection
scripts/gpu_check.sh runs under compute-sanitizer (``-m sanitize``).

Each family's own CUDA cases (bit identity at every dtype, bit width and
layout, gradients, refusals, opcheck, torch.compile, autocast, more than 2^31
elements) sit beside its CPU cases, parametrized over the device:
tests/test_linear_mid_tread_half_quantize.py (the fixed max_value),
tests/test_learnable_max_value.py, tests/test_weight_quantization_ops.py,
tests/test_steps_cuda.py (the GPU's step forms).

Every test here is skipped, with the reason, where no GPU is visible or
torch_ext was built without its CUDA kernels (see tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import torch_ext
from torch_ext.reference import linear_mid_tread_half_quantize_backward_reference as reference_backward

from conftest import (
    CUDA_SKIP_REASON,
    DTYPES,
    HAS_CUDA,
    assert_bit_exact,
    dtype_id,
    grads_like,
    values_with_specials as values,
)

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)

ops = torch.ops.torch_ext
quantize = torch_ext.linear_mid_tread_half_quantize
quantize_ = torch_ext.linear_mid_tread_half_quantize_


# --------------------------------------------------------------------------
# Alignment of storage: sizes around the vector groups, every start offset.


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

#: The kernels' launch shape (cuda/quantize_kernel.cu):
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


# --------------------------------------------------------------------------
# Devices: the launch configuration of each, a second GPU.


def test_launch_configuration_is_per_device():
    """The launch configuration is cached per device (not asked of the
    runtime on every launch): calls on every visible device, in both orders,
    still give the CPU's results."""
    x = values((3 * elements_a_grid_pass() + 5,), torch.float32, 2.0, seed=29)
    y_cpu = quantize(x, 2, 2.0)
    order = list(range(torch.cuda.device_count()))
    for device in order + order[::-1]:
        assert_bit_exact(quantize(x.to(f"cuda:{device}"), 2, 2.0), y_cpu, f"cuda:{device}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_the_first_is_current():
    x = values((1000,), torch.float32)
    with torch.cuda.device(0):
        y = quantize(x.to("cuda:1"), 3, 2.0)
        assert y.device == torch.device("cuda:1")
    assert_bit_exact(y, quantize(x, 3, 2.0), nan_payload=False)


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
