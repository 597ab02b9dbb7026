"""Blueoil's ternary weight quantizers (TTQ, TWN) against float64 references of Blueoil's formulas.

The references below are written from ``blueoil/quantizations/ternary.py``
(forward and backward), literally, in float64 numpy.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_ext import QuantConv2d, TTQWeightQuantizer, ttq_weight_quantize, twn_weight_quantize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _weight(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w.view(-1)[::7] = 0.0  # exact zeros
    return w.to(dtype=dtype, device=device)


# ---------------------------------------------------------------- references


def _ref_ttq(w, p, n, threshold, g):
    """Blueoil's ttq forward and backward in float64: (y, grad_w, grad_p, grad_n)."""
    w = np.asarray(w, np.float64)
    g = np.asarray(g, np.float64)
    t = np.max(np.abs(w)) * threshold
    pos, neg = w > t, w < -t
    mid = ~pos & ~neg
    y = np.where(pos, p, 0.0) - np.where(neg, n, 0.0)
    grad_w = np.where(pos, g * p, 0.0) + np.where(neg, g * n, 0.0) + np.where(mid, g, 0.0)
    return y, grad_w, np.sum(np.where(pos, g, 0.0)), np.sum(np.where(neg, g, 0.0))


def _ref_twn(w, threshold):
    """Blueoil's twn forward in float64."""
    w = np.asarray(w, np.float64)
    delta = np.sum(np.abs(w)) * threshold / w.size
    pos, neg = w > delta, w < -delta
    kept = pos | neg
    alpha = np.sum(np.abs(np.where(kept, w, 0.0))) / np.sum(kept)
    return alpha * np.where(pos, 1.0, 0.0) - alpha * np.where(neg, 1.0, 0.0)


def _no_near_ties(w, cutoff, rel=1e-5):
    """Whether no |w| lies within rounding distance of the cut-off (so float32 masks equal float64's)."""
    if cutoff == 0:  # only exact zeros sit on it, in every precision
        return True
    a = np.abs(np.asarray(w, np.float64))
    return not np.any(np.abs(a - cutoff) <= rel * cutoff)


# ---------------------------------------------------------------- TTQ


def test_ttq_blueoils_own_example():
    # blueoil tests/unit/test_quantizations.py::test_ttq_weight_quantizer, same numbers.
    w = torch.tensor([-5, -3, -0.0001, 0.0001, 5], dtype=torch.float32, requires_grad=True)
    q = TTQWeightQuantizer(threshold=0.005)
    y = q(w)
    y.backward(torch.tensor([1, 2, 3, 4, 5], dtype=torch.float32))
    assert y.tolist() == [-1, -1, 0, 0, 1]
    assert w.grad.tolist() == [1, 2, 3, 4, 5]
    assert q.positive.grad.item() == 5
    assert q.negative.grad.item() == 1 + 2  # Blueoil's sign: +sum over the negative region


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (10, 64, 1, 1), (7,), (5, 3)])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 0.9])
def test_ttq_matches_float64_reference(shape, dtype, device, threshold):
    w = _weight(shape, dtype, device)
    g = _weight(shape, dtype, device, seed=1) * 3
    p = torch.tensor(1.7, dtype=dtype, device=device, requires_grad=True)
    n = torch.tensor(0.6, dtype=dtype, device=device, requires_grad=True)
    wr = w.clone().requires_grad_()
    y = ttq_weight_quantize(wr, p, n, threshold)
    y.backward(g)
    w64 = w.double().cpu().numpy()
    ref_y, ref_gw, ref_gp, ref_gn = _ref_ttq(w64, p.item(), n.item(), threshold, g.double().cpu().numpy())
    assert _no_near_ties(w64, np.max(np.abs(w64)) * threshold)
    assert y.dtype == dtype and y.shape == w.shape and y.device == w.device
    # The outputs are the scales themselves: exact.
    np.testing.assert_array_equal(y.detach().double().cpu().numpy(), ref_y.astype(np.float32 if dtype ==
                                                                                  torch.float32 else np.float64))
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(wr.grad.double().cpu().numpy(), ref_gw, rtol=tol, atol=0)
    np.testing.assert_allclose(p.grad.item(), ref_gp, rtol=tol, atol=tol * np.abs(g.double().cpu().numpy()).sum())
    np.testing.assert_allclose(n.grad.item(), ref_gn, rtol=tol, atol=tol * np.abs(g.double().cpu().numpy()).sum())


def test_ttq_zeros_and_the_cutoff_itself():
    # max|w| = 10, threshold 0.5: t = 5; entries equal to +-t are in the middle (strict >, <).
    w = torch.tensor([0.0, -0.0, 5.0, -5.0, 5.5, -5.5, 10.0, -10.0], requires_grad=True)
    p = torch.tensor(2.0, requires_grad=True)
    n = torch.tensor(3.0, requires_grad=True)
    y = ttq_weight_quantize(w, p, n, 0.5)
    assert y.tolist() == [0, 0, 0, 0, 2, -3, 2, -3]
    # Exact zeros map to +0.0, not -0.0.
    assert not torch.signbit(y[:4]).any()
    g = torch.arange(1.0, 9.0)
    y.backward(g)
    assert w.grad.tolist() == [1, 2, 3, 4, 5 * 2, 6 * 3, 7 * 2, 8 * 3]
    assert p.grad.item() == 5 + 7 and n.grad.item() == 6 + 8


def test_ttq_all_zero_weight_and_zero_threshold():
    w = torch.zeros(3, 3, requires_grad=True)
    p, n = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    y = ttq_weight_quantize(w, p, n, 0.0)  # t = 0: nothing is above or below it
    assert torch.equal(y, torch.zeros(3, 3)) and not torch.signbit(y).any()
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(3, 3)) and p.grad.item() == 0 and n.grad.item() == 0
    # threshold 0 with nonzero weights: every nonzero entry is +-scale.
    w = torch.tensor([0.0, 1e-30, -1e-30])
    assert ttq_weight_quantize(w, torch.tensor(2.0), torch.tensor(3.0), 0.0).tolist() == [0, 2, -3]


def test_ttq_gradcheck_of_the_weight_path_inside_regions():
    # Away from the cut-off the forward is piecewise constant; Blueoil's grad_w
    # is a deliberate surrogate, so only the scales' gradients can be checked
    # against finite differences: grad_p = sum over the positive region
    # (exact derivative), grad_n = -(derivative) by Blueoil's sign.
    w = _weight((6, 4), torch.float64)
    p = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    n = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    g = _weight((6, 4), torch.float64, seed=3)
    (ttq_weight_quantize(w, p, n) * g).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        dp = ((ttq_weight_quantize(w, p + eps, n) - ttq_weight_quantize(w, p - eps, n)) * g).sum() / (2 * eps)
        dn = ((ttq_weight_quantize(w, p, n + eps) - ttq_weight_quantize(w, p, n - eps)) * g).sum() / (2 * eps)
    torch.testing.assert_close(p.grad, dp)
    torch.testing.assert_close(n.grad, -dn)


def test_ttq_under_torch_compile():
    w = _weight((16, 8, 3, 3)).requires_grad_()
    q = TTQWeightQuantizer()
    with torch.no_grad():
        q.positive.fill_(1.5)
        q.negative.fill_(0.5)
    g = _weight((16, 8, 3, 3), seed=2)
    q(w).backward(g)
    eager = (w.grad.clone(), q.positive.grad.clone(), q.negative.grad.clone())
    w.grad = q.positive.grad = q.negative.grad = None
    y = torch.compile(q, backend="aot_eager", fullgraph=True)(w)
    y.backward(g)
    torch.testing.assert_close(y, q(w), rtol=0, atol=0)
    for got, want in zip((w.grad, q.positive.grad, q.negative.grad), eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ttq_refuses_bad_input():
    w, s = torch.randn(4, 3), torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\), got 1\.0"):
        ttq_weight_quantize(w, s, s, 1.0)
    with pytest.raises(ValueError, match="threshold must be in .*got -0.1"):
        ttq_weight_quantize(w, s, s, -0.1)
    with pytest.raises(ValueError, match="threshold.*nan"):
        ttq_weight_quantize(w, s, s, float("nan"))
    with pytest.raises(TypeError, match="threshold must be a real number"):
        ttq_weight_quantize(w, s, s, "0.05")
    with pytest.raises(ValueError, match=r"positive must be a 0-dim tensor, got shape \(1,\)"):
        ttq_weight_quantize(w, torch.ones(1), s)
    with pytest.raises(ValueError, match=r"negative must be a 0-dim tensor, got shape \(4, 3\)"):
        ttq_weight_quantize(w, s, torch.ones(4, 3))
    with pytest.raises(TypeError, match="negative must be a 0-dim torch.Tensor, got float"):
        ttq_weight_quantize(w, s, 1.0)
    with pytest.raises(TypeError, match="positive must have w's dtype.*float64"):
        ttq_weight_quantize(w, s.double(), s)
    with pytest.raises(TypeError, match="w must have a floating dtype"):
        ttq_weight_quantize(torch.ones(3, dtype=torch.int64), s, s)
    with pytest.raises(ValueError, match=r"at least one element, got shape \(0, 3\)"):
        ttq_weight_quantize(torch.ones(0, 3), s, s)
    with pytest.raises(ValueError, match="TTQWeightQuantizer: threshold must be in .*got 2"):
        TTQWeightQuantizer(threshold=2)
    with pytest.raises(ValueError, match="init must be a finite number"):
        TTQWeightQuantizer(init=float("inf"))


# ---------------------------------------------------------------- TTQ inside QuantConv2d


def test_ttq_module_in_quant_conv_is_learned():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 8, 3, padding=1, bias=False, weight_quantizer=TTQWeightQuantizer,
                       weight_quantizer_kwargs={"threshold": 0.1})
    assert isinstance(conv.weight_quantizer, TTQWeightQuantizer) and conv.weight_quantizer.threshold == 0.1
    names = dict(conv.named_parameters())
    assert set(names) == {"weight", "weight_quantizer.positive", "weight_quantizer.negative"}
    assert set(conv.state_dict()) == set(names)
    assert conv.weight_quantizer.positive.item() == 1.0 and conv.weight_quantizer.negative.item() == 1.0
    x = torch.randn(2, 3, 6, 6)
    y = conv(x)
    torch.testing.assert_close(y, F.conv2d(x, conv.weight_quantizer(conv.weight), padding=1))
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    y.square().mean().backward()
    assert conv.weight_quantizer.positive.grad.abs().item() > 0
    opt.step()
    assert conv.weight_quantizer.positive.item() != 1.0 and conv.weight_quantizer.negative.item() != 1.0
    assert "TTQWeightQuantizer(threshold=0.1)" in repr(conv)


def test_quant_conv_module_instance_gets_call_kwargs_and_state_dict_round_trips():
    q = TTQWeightQuantizer()
    conv = QuantConv2d(2, 4, 1, weight_quantizer=q)
    assert conv.weight_quantizer is q and conv.weight_quantizer_kwargs == {}
    with torch.no_grad():
        q.positive.fill_(0.25)
    other = QuantConv2d(2, 4, 1, weight_quantizer=TTQWeightQuantizer())
    other.load_state_dict(conv.state_dict())
    assert other.weight_quantizer.positive.item() == 0.25
    torch.testing.assert_close(other.quantized_weight(), conv.quantized_weight())


# ---------------------------------------------------------------- TWN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (10, 64, 1, 1), (7,), (5, 3)])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.5])
def test_twn_matches_float64_reference(shape, dtype, device, threshold):
    w = _weight(shape, dtype, device)
    w64 = w.double().cpu().numpy()
    assert _no_near_ties(w64, np.abs(w64).mean() * threshold)
    y = twn_weight_quantize(w, threshold)
    assert y.dtype == dtype and y.shape == w.shape and y.device == w.device
    ref = _ref_twn(w64, threshold)
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    np.testing.assert_allclose(y.double().cpu().numpy(), ref, rtol=tol, atol=0)
    # Ternary: one magnitude; exact zeros (and everything at or under delta) map to +0.0.
    assert len(y.abs().unique()) == 2
    assert torch.all(y[w == 0] == 0) and not torch.signbit(y[w == 0]).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_weights(dtype):
    # 300k weights: a float16 sum of |w| or of the kept count would overflow (65504); the sums run in float32.
    w = _weight((128, 256, 3, 3), torch.float32)
    y = twn_weight_quantize(w.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    # The same as float32 on the rounded weights, up to rounding alpha and delta to dtype:
    # entries whose magnitude is within dtype's rounding of delta may fall on either side.
    wr = w.to(dtype).float()
    ref = twn_weight_quantize(wr)
    delta = wr.abs().mean() * 0.7
    near = (wr.abs() - delta).abs() <= delta * 2.0 ** -7
    assert near.sum() < 0.01 * w.numel()
    torch.testing.assert_close(y.float()[~near], ref[~near], rtol=1e-2, atol=0)
    s = torch.tensor(0.5, dtype=dtype)
    y = ttq_weight_quantize(w.to(dtype), s, s)
    assert y.dtype == dtype and set(y.unique().tolist()) == {-0.5, 0.0, 0.5}


def test_twn_straight_through_gradient_and_blueoils_tests_numbers():
    # Blueoil's test draws uniform(-10, 10) weights of shape (10, 2, 2, 4) with thresholds 0.3 and 0.7.
    g = torch.Generator().manual_seed(5)
    for threshold in (0.3, 0.7):
        w = (torch.rand(10, 2, 2, 4, generator=g) * 20 - 10).requires_grad_()
        grad_y = torch.rand(10, 2, 2, 4, generator=g) * 20 - 10
        y = twn_weight_quantize(w, threshold)
        y.backward(grad_y)
        assert torch.equal(w.grad, grad_y)
        np.testing.assert_allclose(y.detach().numpy(), _ref_twn(w.detach().numpy(), threshold), rtol=1e-5)


def test_twn_small_example_by_hand():
    # mean|w| = (0 + 1 + 2 + 3 + 4 + 10) / 6 = 10/3; delta = 0.7 * 10/3 = 2.333...
    # kept: -3, 4, -10 -> alpha = 17/3.
    w = torch.tensor([0.0, 1.0, -2.0, -3.0, 4.0, -10.0], dtype=torch.float64)
    a = 17 / 3
    assert twn_weight_quantize(w).tolist() == [0, 0, 0, -a, a, -a]


def test_twn_nothing_kept_gives_zeros_not_nan():
    # Blueoil divides 0 by 0 here (NaN); we return zeros (docstring: departure).
    assert torch.equal(twn_weight_quantize(torch.zeros(2, 3)), torch.zeros(2, 3))
    w = torch.full((4,), -0.5)  # delta = 2 * 0.5 = 1 >= max|w|
    y = twn_weight_quantize(w, 2.0)
    assert torch.equal(y, torch.zeros(4)) and not torch.isnan(y).any()


def test_twn_under_torch_compile_and_in_quant_conv():
    w = _weight((8, 4, 3, 3))
    compiled = torch.compile(twn_weight_quantize, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w), twn_weight_quantize(w), rtol=0, atol=0)
    conv = QuantConv2d(4, 8, 3, weight_quantizer=twn_weight_quantize, weight_quantizer_kwargs={"threshold": 0.5})
    with torch.no_grad():
        conv.weight.copy_(w)
    torch.testing.assert_close(conv.quantized_weight(), twn_weight_quantize(w, 0.5), rtol=0, atol=0)


def test_twn_refuses_bad_input():
    with pytest.raises(ValueError, match="twn_weight_quantize: threshold must be a finite number >= 0, got -1"):
        twn_weight_quantize(torch.randn(3), -1)
    with pytest.raises(ValueError, match="threshold.*inf"):
        twn_weight_quantize(torch.randn(3), float("inf"))
    with pytest.raises(TypeError, match="threshold must be a real number, got True"):
        twn_weight_quantize(torch.randn(3), True)
    with pytest.raises(TypeError, match="w must have a floating dtype"):
        twn_weight_quantize(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one element"):
        twn_weight_quantize(torch.ones(0))
