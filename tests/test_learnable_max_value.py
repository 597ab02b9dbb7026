"""Learnable max_value (docs/quantizer.md, "Learnable max_value"): the
linear_mid_tread_half_quantize_learnable operators, on the CPU and on CUDA.

The forward must equal the fixed operator bit for bit; grad_x is the fixed
straight-through gradient; grad_max_value is compared with a float64
reference of PACT's and LSQ's formulas. The CUDA cases ("every device" and
the CUDA refusals) run each test on "cpu" and "cuda", the CUDA case skipped,
with the reason, without a GPU.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_ext
from torch_ext import QuantActivation
from torch_ext.ops import effective_max_value

from conftest import ALL_DEVICES, BITS, DTYPES, as_bits, dtype_id, requires_cuda, tie_values, values_with_specials

ops = torch.ops.torch_ext
learnable = torch_ext.linear_mid_tread_half_quantize_learnable
MODES = ("pact", "lsq")
F32_FLOOR = 2.0**-149
F32_MAX = torch.finfo(torch.float32).max


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample(dtype, bit, m, numel=3000, seed=0):
    """Ties (with neighbours), 0, -0, m, ±inf, NaN and random values over [-m/2, 3m/2]."""
    g = torch.Generator().manual_seed(seed)
    rand = ((torch.rand(numel, generator=g, dtype=torch.float64) * 2.0 - 0.5) * m).to(dtype)
    return torch.cat([tie_values(dtype, bit, m, max_k=256), rand])


def grads(numel, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


def reference(x, grad_y, m_tensor, bit, mode, scale_grad):
    """float64 reference: grad_x and the per-element terms of grad_max_value, summed in float64."""
    T = compute_dtype(x.dtype)
    m = effective_max_value(m_tensor, x.dtype)
    y = ops.linear_mid_tread_half_quantize(x, bit, m).double()
    xd = x.to(T).double()
    gd = grad_y.to(T).double()
    passes = (xd > 0) & (xd < m)
    above = xd >= m
    grad_x = torch.where(passes, grad_y, torch.zeros_like(grad_y))
    terms = torch.where(above, gd, torch.zeros_like(gd))
    if mode == "lsq":
        terms = terms + torch.where(passes, gd * (y - xd) / m, torch.zeros_like(gd))
    scale = 1.0 / math.sqrt(x.numel() * (2.0**bit - 1.0)) if scale_grad else 1.0
    return grad_x, terms * scale


def run(x, m_tensor, bit, mode, grad_y, scale_grad=None):
    x = x.detach().clone().requires_grad_()
    m = m_tensor.detach().clone().requires_grad_()
    y = learnable(x, m, bit, mode, scale_grad=scale_grad)
    y.backward(grad_y)
    return y.detach(), x.grad, m.grad


def assert_sum_close(actual, terms, dtype):
    """actual equals sum(terms) up to the rounding of a float64 sum (any order), then of dtype."""
    expected = terms.sum()
    slack = 64 * torch.finfo(torch.float64).eps * terms.abs().sum() + 2 * torch.finfo(dtype).eps * expected.abs()
    assert actual.dtype == dtype and actual.dim() == 0
    assert (actual.double() - expected).abs() <= slack + torch.finfo(dtype).tiny, (actual.item(), expected.item())


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("m", (2.0, 1.0 / 3.0, 6.0))
def test_forward_bit_identical_to_fixed_operator(dtype, bit, m):
    x = sample(dtype, bit, m)
    m_tensor = torch.tensor(m, dtype=torch.float64)
    fixed = ops.linear_mid_tread_half_quantize(x, bit, m)
    for mode in MODES:
        y = learnable(x, m_tensor, bit, mode)
        assert torch.equal(as_bits(y), as_bits(fixed)), (mode, dtype, bit, m)


@pytest.mark.parametrize("m_dtype", DTYPES, ids=dtype_id)
def test_max_value_dtype_is_rounded_once_to_the_compute_type(m_dtype):
    m_tensor = torch.tensor(0.7, dtype=m_dtype)
    x = sample(torch.float32, 2, 0.7)
    fixed = ops.linear_mid_tread_half_quantize(x, 2, float(m_tensor.float()))
    assert torch.equal(as_bits(learnable(x, m_tensor, 2)), as_bits(fixed))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bit", BITS)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_float64_reference(dtype, bit, mode):
    m = 2.0
    x = sample(dtype, bit, m)
    grad_y = grads(x.numel(), dtype)
    for m_dtype in (torch.float64, torch.float32):
        m_tensor = torch.tensor(m, dtype=m_dtype)
        for scale_grad in (False, True):
            _, grad_x, grad_m = run(x, m_tensor, bit, mode, grad_y, scale_grad)
            ref_x, terms = reference(x, grad_y, m_tensor, bit, mode, scale_grad)
            assert torch.equal(as_bits(grad_x), as_bits(ref_x))
            assert_sum_close(grad_m, terms, m_dtype)


@pytest.mark.parametrize("mode", MODES)
def test_edges_x_equal_zero_m_inf_nan(mode):
    m = 2.0
    below = torch.nextafter(torch.tensor(m), torch.tensor(0.0)).item()  # float32 neighbours of m
    beyond = torch.nextafter(torch.tensor(m), torch.tensor(4.0)).item()
    x = torch.tensor([0.0, -0.0, m, below, beyond, float("inf"), float("-inf"), float("nan"), -1.0, 1.0])
    grad_y = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0])
    _, grad_x, grad_m = run(x, torch.tensor(m, dtype=torch.float64), 2, mode, grad_y, scale_grad=False)
    # passes only 0 < x < m: nextafter(m, 0) and 1.0
    assert grad_x.tolist() == [0, 0, 0, 8.0, 0, 0, 0, 0, 0, 512.0]
    above = 4.0 + 16.0 + 32.0  # x = m, just above m, +inf; NaN is neither
    if mode == "pact":
        assert grad_m.item() == above
    else:
        y1 = float(ops.linear_mid_tread_half_quantize(torch.tensor([1.0]), 2, m))  # level 2 of 3: 4/3 in float32
        ylast = float(ops.linear_mid_tread_half_quantize(torch.tensor([below]), 2, m))  # m itself
        expected = (8.0 * (ylast - below) + 512.0 * (y1 - 1.0)) / m + above
        assert grad_m.item() == pytest.approx(expected, rel=1e-12)


def test_pact_integer_gradients_are_exact():
    # Sums of small integers are exact in double, whatever the order.
    x = torch.linspace(-1, 5, 100_003)
    grad_y = torch.arange(100_003, dtype=torch.float32) % 7 - 3
    _, _, grad_m = run(x, torch.tensor(2.0), 2, "pact", grad_y, scale_grad=False)
    assert grad_m.item() == float(grad_y.double()[x >= 2].sum())


def test_scale_grad_default_is_on_for_lsq_only():
    x = torch.linspace(-1, 5, 4096)
    g = torch.ones_like(x)
    for mode, scaled in (("pact", False), ("lsq", True)):
        _, _, default = run(x, torch.tensor(2.0, dtype=torch.float64), 2, mode, g)
        _, _, explicit = run(x, torch.tensor(2.0, dtype=torch.float64), 2, mode, g, scale_grad=scaled)
        _, _, other = run(x, torch.tensor(2.0, dtype=torch.float64), 2, mode, g, scale_grad=not scaled)
        assert torch.equal(default, explicit) and not torch.equal(default, other)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=300),
    m=st.floats(min_value=2.0**-10, max_value=1024.0, width=32),
    bit=st.sampled_from(BITS),
    mode=st.sampled_from(MODES),
)
def test_property_forward_and_gradients(values, m, bit, mode):
    x = torch.tensor(values, dtype=torch.float32)
    grad_y = (torch.arange(x.numel(), dtype=torch.float32) % 5) - 2  # small integers
    m_tensor = torch.tensor(m, dtype=torch.float32)
    y, grad_x, grad_m = run(x, m_tensor, bit, mode, grad_y, scale_grad=False)
    assert torch.equal(as_bits(y), as_bits(ops.linear_mid_tread_half_quantize(x, bit, m)))
    ref_x, terms = reference(x, grad_y, m_tensor, bit, mode, False)
    assert torch.equal(as_bits(grad_x), as_bits(ref_x))
    assert_sum_close(grad_m, terms, torch.float32)
    # PACT: with integer grads the sum is exact.
    if mode == "pact":
        assert grad_m.item() == float(grad_y.double()[x >= m].sum())


# ------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", MODES)
def test_grad_max_value_same_bits_for_every_thread_count_and_run(mode):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1_000_003, generator=g) * 2 + 1
    grad_y = torch.randn(1_000_003, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(run(x, torch.tensor(1.5), 2, mode, grad_y)[1:])
    finally:
        torch.set_num_threads(before)
    for grad_x, grad_m in results[1:]:
        assert torch.equal(as_bits(grad_x), as_bits(results[0][0]))
        assert torch.equal(as_bits(grad_m), as_bits(results[0][1]))


# ---------------------------------------------------- m out of range


@pytest.mark.parametrize("bad, effective", [(0.0, F32_FLOOR), (-1.0, F32_FLOOR), (float("nan"), F32_FLOOR),
                                            (float("-inf"), F32_FLOOR), (float("inf"), F32_MAX), (1e300, F32_MAX)])
@pytest.mark.parametrize("mode", MODES)
def test_max_value_out_of_range_is_clamped_in_the_kernel(bad, effective, mode):
    x = sample(torch.float32, 2, 2.0)
    x_finite = x[x.isfinite()]
    grad_y = grads(x_finite.numel(), torch.float32)
    m_tensor = torch.tensor(bad, dtype=torch.float64)
    assert effective_max_value(m_tensor) == effective
    y, grad_x, grad_m = run(x_finite, m_tensor, 2, mode, grad_y)
    assert torch.equal(as_bits(y), as_bits(ops.linear_mid_tread_half_quantize(x_finite, 2, effective)))
    assert y.isfinite().all() and grad_x.isfinite().all() and grad_m.isfinite()
    ref_x, terms = reference(x_finite, grad_y, m_tensor, 2, mode, mode == "lsq")
    assert torch.equal(as_bits(grad_x), as_bits(ref_x))
    assert_sum_close(grad_m, terms, torch.float64)


def test_pact_recovers_from_max_value_driven_below_zero():
    # An optimizer step drove m negative: the layer acts at the floor, its
    # loss stays finite, and PACT's gradient (the sum of grad_y where x >= m)
    # pushes m back up.
    module = QuantActivation(2, 2.0, learn_max_value="pact")
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    with torch.no_grad():
        module.max_value.fill_(-0.5)
    x = torch.rand(4096) * 3
    for _ in range(5):
        opt.zero_grad()
        loss = ((module(x) - x.clamp(max=2.0)) ** 2).mean()
        assert loss.isfinite()
        loss.backward()
        opt.step()
    assert module.max_value.item() > 0


# ------------------------------------------------------------ saved bytes


def saved_bytes(fn):
    total = []

    def pack(t):
        total.append((t.numel(), t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, total


@pytest.mark.parametrize("mode, per_element", [("pact", 0.25), ("lsq", 4.0)])
def test_saved_bytes_per_element(mode, per_element):
    numel = 1 << 20
    x = torch.randn(numel, requires_grad=True)
    m = torch.tensor(2.0, requires_grad=True)
    y, saved = saved_bytes(lambda: learnable(x, m, 2, mode))
    per_elem = sum(n * s for n, s in saved if n > 1)
    scalars = [(n, s) for n, s in saved if n <= 1]
    assert per_elem / numel == per_element
    assert scalars == [(1, 4)]  # max_value itself
    y.sum().backward()
    assert x.grad is not None and m.grad is not None


# ------------------------------------------------------- every device
# Each test on "cpu" and on "cuda" (skipped, with the reason, without a GPU:
# marked cuda for scripts/gpu_check.sh): the CPU's bits, no host-device sync,
# deterministic sums.


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bit", (1, 2, 3, 8, 16, 32))
@pytest.mark.parametrize("mode", MODES)
def test_device_matches_cpu(mode, bit, dtype, device):
    x = values_with_specials((4099,), dtype, max_value=1.5, seed=bit)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    m = torch.tensor(1.5)
    y_cpu, gx_cpu, gm_cpu = run(x, m, bit, mode, g)
    y_dev, gx_dev, gm_dev = run(x.to(device), m.to(device), bit, mode, g.to(device))
    assert y_dev.device.type == device
    assert torch.equal(as_bits(y_dev.cpu()), as_bits(y_cpu))
    assert torch.equal(as_bits(y_dev.cpu()), as_bits(torch_ext.linear_mid_tread_half_quantize(x, bit, 1.5)))
    assert torch.equal(as_bits(gx_dev.cpu()), as_bits(gx_cpu))
    # Both sums are in double, in different orders: equal up to float32 rounding.
    torch.testing.assert_close(gm_dev.cpu(), gm_cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_grad_max_value_is_deterministic_on_device(mode, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(3_000_017, device=device, generator=g) * 2 + 1
    grad_y = torch.randn(3_000_017, device=device, generator=g)
    m = torch.tensor(1.25, device=device)
    first = run(x, m, 2, mode, grad_y)[2]
    for _ in range(5):
        assert torch.equal(as_bits(run(x, m, 2, mode, grad_y)[2]), as_bits(first))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_on_cuda(mode):
    x = torch.randn(1 << 16, device="cuda", requires_grad=True)
    m = torch.tensor(1.0, device="cuda", requires_grad=True)
    learnable(x, m, 2, mode).sum().backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = learnable(x, m, 2, mode)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert m.grad is not None


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("bad", (0.0, -1.0, float("nan"), float("inf")))
def test_out_of_range_max_value_matches_cpu_on_device(bad, device):
    x = values_with_specials((1000,), torch.float32, max_value=2.0, nan=False)
    x = x[x.isfinite()]
    g = torch.ones_like(x)
    cpu = run(x, torch.tensor(bad), 2, "pact", g)
    dev = run(x.to(device), torch.tensor(bad, device=device), 2, "pact", g.to(device))
    assert torch.equal(as_bits(dev[0].cpu()), as_bits(cpu[0])) and dev[0].isfinite().all()
    assert torch.equal(as_bits(dev[1].cpu()), as_bits(cpu[1]))
    assert torch.equal(dev[2].cpu(), cpu[2])  # sums of ones: exact in either order


@pytest.mark.parametrize("device", ALL_DEVICES)
def test_opcheck_on_device(device):
    x = torch.randn(6, 5, device=device)
    m = torch.tensor(1.5, device=device, requires_grad=True)
    for mode in MODES:
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable, (x, m, 2, mode, mode == "lsq"))


# -------------------------------------------------------------- opcheck


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=dtype_id)
def test_opcheck(dtype):
    x = torch.randn(5, 7, dtype=dtype) * 2
    m = torch.tensor(1.5)
    for mode in MODES:
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable, (x, m.clone().requires_grad_(), 2, mode, True))
        torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable, (x.clone().requires_grad_(), m, 3, mode, False))
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable_forward, (x, m, 2))
    _, masks = ops.linear_mid_tread_half_quantize_learnable_forward(x, m, 2)
    g = torch.randn(5, 7, dtype=dtype)
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable_backward, (g, masks, m, 2, "pact", False))
    torch.library.opcheck(ops.linear_mid_tread_half_quantize_learnable_backward, (g, x, m, 2, "lsq", True))


# ---------------------------------------------------------------- errors


def test_bad_arguments_are_refused_with_the_argument_named():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"max_value must be a 0-dim tensor.*\[1\]"):
        learnable(x, torch.tensor([2.0]))
    with pytest.raises(TypeError, match=r"max_value must be a floating-point tensor.*dtype Long"):
        learnable(x, torch.tensor(2))
    with pytest.raises(ValueError, match=r"max_value must be on the device of x.*meta"):
        learnable(x, torch.tensor(2.0, device="meta"))
    with pytest.raises(ValueError, match=r"mode must be \"pact\" or \"lsq\", got mode='pac'"):
        learnable(x, torch.tensor(2.0), 2, "pac")
    with pytest.raises(ValueError, match=r'mode must be "pact" or "lsq", got mode="PACT"'):
        ops.linear_mid_tread_half_quantize_learnable(x, torch.tensor(2.0), 2, "PACT")
    with pytest.raises(ValueError, match=r"max_value must be a 0-dim tensor"):
        ops.linear_mid_tread_half_quantize_learnable(x, torch.ones(2), 2, "pact")
    with pytest.raises(TypeError, match="max_value must be a 0-dim floating tensor.*float"):
        learnable(x, 2.0)
    with pytest.raises(ValueError, match="bit must be in 1..16 or 32, got bit=17"):
        learnable(x, torch.tensor(2.0), 17)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.linear_mid_tread_half_quantize_learnable(torch.ones(3, dtype=torch.int32), torch.tensor(2.0), 2, "pact")
    with pytest.raises(ValueError, match=r"saved must have shape \[2, 2\]"):
        ops.linear_mid_tread_half_quantize_learnable_backward(
            x, torch.zeros(2, 3, dtype=torch.uint8), torch.tensor(2.0), 2, "pact", False)


@pytest.mark.cuda
@requires_cuda
def test_cuda_refuses_max_value_on_another_device():
    with pytest.raises(ValueError, match="max_value must be on the device of x"):
        learnable(torch.ones(4, device="cuda"), torch.tensor(1.0))


# ---------------------------------------------------------------- module


def test_module_parameter_state_dict_repr_and_pickle():
    q = QuantActivation(2, 1.5, learn_max_value="lsq")
    assert isinstance(q.max_value, torch.nn.Parameter) and q.max_value.dim() == 0
    assert list(q.state_dict()) == ["max_value"] and [n for n, _ in q.named_parameters()] == ["max_value"]
    assert repr(q) == "QuantActivation(bit=2, max_value=1.5, learn_max_value='lsq')"
    fixed = QuantActivation(2, 1.5)
    assert list(fixed.state_dict()) == [] and isinstance(fixed.max_value, float)
    x = torch.randn(64) * 2
    q2 = pickle.loads(pickle.dumps(q))
    assert torch.equal(q2(x), q(x)) and isinstance(q2.max_value, torch.nn.Parameter)
    with pytest.raises(ValueError, match="inplace=True, learn_max_value='pact'"):
        QuantActivation(2, 2.0, inplace=True, learn_max_value="pact")
    with pytest.raises(ValueError, match="mode must be \"pact\" or \"lsq\", got mode='PACT'"):
        QuantActivation(2, 2.0, learn_max_value="PACT")
    with pytest.raises(ValueError, match="custom backward"):
        QuantActivation(2, 2.0, backward=lambda g, x, b, m: g, learn_max_value="pact")


@pytest.mark.parametrize("mode", MODES)
def test_module_compile_export_script_match_eager(mode):
    q = QuantActivation(2, 1.5, learn_max_value=mode)
    x = torch.randn(4, 8) * 2
    y = q(x)
    y.sum().backward()
    eager_grad = q.max_value.grad.clone()
    q.max_value.grad = None
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    yc = compiled(x)
    yc.sum().backward()
    assert torch.equal(yc, y) and torch.equal(q.max_value.grad, eager_grad)
    ep = torch.export.export(q, (x,))
    assert torch.equal(ep.module()(x), y)
    scripted = torch.jit.script(q)
    assert torch.equal(scripted(x), y)
    q.max_value.grad = None
    scripted(x).sum().backward()
    assert torch.equal(q.max_value.grad, eager_grad)


def test_module_quantize_to_codes_and_freeze():
    q = QuantActivation(2, 1.5, learn_max_value="pact")
    with torch.no_grad():
        q.max_value.fill_(1.25)
    x = torch.randn(256) * 2
    codes = torch_ext.quantize_to_codes(q(x).detach(), 2, float(q.max_value))
    assert torch.equal(torch_ext.codes_to_values(codes, 2, float(q.max_value)), q(x).detach())
    y = q(x).detach()
    q.freeze_max_value_()
    assert q.max_value == 1.25 and q.learn_max_value is None and list(q.state_dict()) == []
    assert torch.equal(q(x), y)


def test_export_onnx_holds_the_learned_value(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), QuantActivation(2, 2.0, learn_max_value="lsq"))
    with torch.no_grad():
        model[1].max_value.fill_(0.8125)
    x = torch.randn(3, 8)
    path = tmp_path / "m.onnx"
    torch_ext.export_onnx(model, x, path)
    (out,) = torch_ext.run_onnx(path, x)
    assert torch.equal(torch.as_tensor(out), model(x).detach())
    assert isinstance(model[1].max_value, torch.nn.Parameter)  # the model itself is untouched


# ---------------------------------------------------------------- training


def test_train_learn_max_value_pact_changes_max_value(tmp_path):
    import json

    from torch_ext import train

    tiny = ["--model", "lmnet_v1_quantize", "--image-size", "8", "--batch-size", "64", "--no-progress",
            "--device", "cpu", "--threads", "1", "--epochs", "1"]
    result = train.main([*tiny, "--learn-max-value", "pact", "--max-value-weight-decay", "1e-4",
                         "--out", str(tmp_path / "pact")])
    module = result["module"]
    learned = {n: m for n, m in module.named_modules() if isinstance(m, QuantActivation) and m.learn_max_value}
    assert learned and all(m.learn_max_value == "pact" for m in learned.values())
    assert any(float(m.max_value) != 2.0 for m in learned.values())
    metrics = json.loads((tmp_path / "pact" / "metrics.json").read_text())
    recorded = metrics["epochs"][-1]["max_values"]
    assert recorded == {n: float(m.max_value) for n, m in learned.items()}
    assert metrics["args"]["learn_max_value"] == "pact" and (tmp_path / "pact" / "training.png").is_file()


def test_module_pickled_before_learn_max_value_still_loads():
    q = QuantActivation(2, 1.5)
    state = q.__dict__.copy()
    for key in ("learn_max_value", "_fixed", "scale_grad"):
        del state[key]
    old = QuantActivation.__new__(QuantActivation)
    old.__setstate__(state)
    x = torch.randn(32) * 2
    assert torch.equal(old(x), q(x)) and old.learn_max_value is None
