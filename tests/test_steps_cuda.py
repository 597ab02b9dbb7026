"""The GPU forward (step, clip and formula forms): the CPU's bits, where it could go wrong.

The CUDA kernels compare x with thresholds for 1 to 4 bits (found on the
host for the fixed max_value, on the device from the max_value tensor for
the learnable one), select for bit=32, and run the formula above 4 bits
(docs/quantizer.md, "How the GPU computes it"). tests/test_steps.py holds
the CPU to the reference formula on the same inputs, so equality with the
CPU here is equality with the formula: every float16/bfloat16 bit pattern,
every float32/float64 value within 1,500 ulps of each rounding tie, of 0
and of m, for max_values tiny to huge; every entry point (quantize, forward
with its mask, in place, the learnable forward's two masks, LSQ's
backward); and the memory path's edges: tails inside a tile, a mask byte
and a vector, and views that are not 16-byte aligned.

The host half of the shared step code (ValueSteps against Steps, the k-ary
search against the binary one) is tested without a GPU by
tests/cpp/test_steps.cpp.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CUDA_SKIP_REASON, HAS_CUDA, INT_OF, dtype_id, values_around as _around

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)]

ops = torch.ops.torch_ext

MAX_VALUES = (2.0, 1.0, 3.0, 6.0, 0.1, 0.7, 1.0 / 3.0, 1e-3, 1e-6, 1e-30, 1.7e4, 65504.0, 65520.0, 1e5, 3e38)
BITS = (1, 2, 3, 4, 5, 8, 32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(INT_OF[t.dtype])


def _same(cuda: torch.Tensor, cpu: torch.Tensor, what: str) -> None:
    a, b = _bits(cuda), _bits(cpu)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()[:5].flatten().tolist()
        raise AssertionError(f"{what}: CUDA differs from the CPU at {len(bad)}+ elements, first {bad}: "
                             f"CUDA {a.flatten()[bad].tolist()} CPU {b.flatten()[bad].tolist()}")


def _fixed_entry_points(x: torch.Tensor, bit: int, max_value: float, what: str) -> None:
    """quantize, forward (y, mask), forward_ and quantize_ on CUDA: the CPU's bits."""
    xc = x.cuda()
    y_cpu, mask_cpu = ops.linear_mid_tread_half_quantize_forward(x, bit, max_value)
    _same(ops.linear_mid_tread_half_quantize(xc, bit, max_value), y_cpu, f"quantize {what}")
    y, mask = ops.linear_mid_tread_half_quantize_forward(xc, bit, max_value)
    _same(y, y_cpu, f"forward {what}")
    assert torch.equal(mask.cpu(), mask_cpu), f"forward mask {what}"
    inplace = xc.clone()
    mask_inplace = ops.linear_mid_tread_half_quantize_forward_(inplace, bit, max_value)
    _same(inplace, y_cpu, f"forward_ {what}")
    assert torch.equal(mask_inplace.cpu(), mask_cpu), f"forward_ mask {what}"
    inplace = xc.clone()
    ops.linear_mid_tread_half_quantize_(inplace, bit, max_value)
    _same(inplace, y_cpu, f"quantize_ {what}")


def _learnable_entry_points(x: torch.Tensor, bit: int, max_value: float, what: str) -> None:
    """The learnable forward (y and both masks) and both backwards on CUDA: the CPU's bits."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = torch.tensor(max_value, dtype=compute)
    if not math.isfinite(m.item()):
        return
    y_cpu, masks_cpu = ops.linear_mid_tread_half_quantize_learnable_forward(x, m, bit)
    y, masks = ops.linear_mid_tread_half_quantize_learnable_forward(x.cuda(), m.cuda(), bit)
    _same(y, y_cpu, f"learnable forward {what}")
    assert torch.equal(masks.cpu(), masks_cpu), f"learnable masks {what}"
    grad = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64).to(x.dtype)
    for mode, saved in (("pact", masks_cpu), ("lsq", x)):
        gx_cpu, gm_cpu = ops.linear_mid_tread_half_quantize_learnable_backward(grad, saved, m, bit, mode, False)
        gx, gm = ops.linear_mid_tread_half_quantize_learnable_backward(
            grad.cuda(), saved.cuda(), m.cuda(), bit, mode, False)
        _same(gx, gx_cpu, f"learnable {mode} grad_x {what}")
        # Both sums in double, in different orders.
        torch.testing.assert_close(gm.cpu(), gm_cpu, rtol=1e-5, atol=1e-6 * max(1.0, abs(gm_cpu.item())),
                                   msg=f"learnable {mode} grad_max_value {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bit", BITS)
def test_every_16_bit_pattern(dtype, bit):
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = torch.cat([patterns, patterns[:4099]])  # ends inside a tile, a vector and a mask byte
    for max_value in MAX_VALUES:
        if not math.isfinite(torch.tensor(max_value, dtype=torch.float32).item()):
            continue
        what = f"{dtype} bit={bit} m={max_value}"
        _fixed_entry_points(x, bit, max_value, what)
        _learnable_entry_points(x, bit, max_value, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("bit", BITS)
def test_every_value_near_each_step(dtype, bit):
    n = 1 if bit == 32 else 2**bit - 1
    tiny = 1e-40 if dtype == torch.float32 else 1e-310
    for max_value in MAX_VALUES + (tiny, 1e300 if dtype == torch.float64 else 3.4e38):
        m = torch.tensor(max_value, dtype=dtype).item()
        centers = torch.tensor([k * m / (2 * n) for k in range(2 * min(n, 15) + 1)] + [m], dtype=torch.float64)
        x = _around(dtype, centers, 1500)
        what = f"{dtype} bit={bit} m={max_value}"
        _fixed_entry_points(x, bit, max_value, what)
        _learnable_entry_points(x, bit, max_value, what)


#: Sizes around the edges of the memory path: a tile is 256 threads x 64
#: bytes (4096 float32, 8192 16-bit elements); a vector 16 bytes; a mask byte
#: 8 elements.
EDGE_SIZES = (1, 7, 9, 63, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
def test_tails_and_misaligned_views(dtype, offset):
    """Sizes around a tile, a vector and a mask byte; views that start off a 16-byte boundary."""
    g = torch.Generator().manual_seed(offset)
    for numel in EDGE_SIZES:
        base = ((torch.rand(numel + offset, generator=g, dtype=torch.float64) * 3.0 - 0.5) * 2.0).to(dtype)
        x = base[offset:]
        for bit in (2, 32, 5):
            what = f"{dtype} numel={numel} offset={offset} bit={bit}"
            xc = base.cuda()[offset:]
            y_cpu, mask_cpu = ops.linear_mid_tread_half_quantize_forward(x, bit, 2.0)
            y, mask = ops.linear_mid_tread_half_quantize_forward(xc, bit, 2.0)
            _same(y, y_cpu, f"forward {what}")
            assert torch.equal(mask.cpu(), mask_cpu), f"mask {what}"
            gc = torch.randn(numel + offset, generator=g, dtype=torch.float64).to(dtype).cuda()[offset:]
            _same(ops.linear_mid_tread_half_quantize_backward(gc, mask),
                  ops.linear_mid_tread_half_quantize_backward(gc.cpu(), mask_cpu), f"backward {what}")
            _learnable_entry_points(x, bit, 2.0, what)


def test_learnable_steps_follow_max_value_on_the_device():
    """The thresholds come from the max_value tensor at run time: change it in place, y follows."""
    x = torch.linspace(-1.0, 4.0, 10_007, dtype=torch.float32)
    m = torch.tensor(2.0, device="cuda")
    for value in (2.0, 0.3, 3.7, 1e-30, 3e38):
        m.fill_(value)
        y, _ = ops.linear_mid_tread_half_quantize_learnable_forward(x.cuda(), m, 2)
        _same(y, ops.linear_mid_tread_half_quantize(x, 2, value), f"m={value}")
