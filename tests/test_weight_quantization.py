"""Blueoil's binary weight quantizers and QuantConv2d against docs/quantizer.md's formulas."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ext.quant_conv import QuantConv2d
from torch_ext.weight_quantization import (
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _weight(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w.view(-1)[::7] = 0.0  # exact zeros: docs/quantizer.md maps them to +scale
    return w.to(dtype=dtype, device=device)


def _ref_mean_scaling(w):
    """docs/quantizer.md, literally: where(w >= 0, 1, -1) * mean(|w|) over the whole tensor."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()


def _ref_channel_wise(w):
    """docs/quantizer.md, literally: the same with mean(|w|) per output channel (dims 1..)."""
    scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() > 1 else w.abs()
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (10, 64, 1, 1), (7,), (5, 3), (1, 1, 1, 1)])
def test_binary_mean_scaling_matches_formula(shape, dtype, device):
    w = _weight(shape, dtype, device)
    y = binary_mean_scaling_quantize(w)
    assert y.shape == w.shape and y.dtype == w.dtype and y.device == w.device
    torch.testing.assert_close(y, _ref_mean_scaling(w), rtol=0, atol=0)
    scale = w.abs().mean()
    assert set(y.unique().tolist()) <= {scale.item(), -scale.item()}
    # Zero weights map to +scale, never to -scale or 0.
    assert torch.all(y[w == 0] == scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (10, 64, 1, 1), (7,), (5, 3), (3, 1, 1, 1)])
def test_binary_channel_wise_matches_formula(shape, dtype, device):
    w = _weight(shape, dtype, device)
    y = binary_channel_wise_mean_scaling_quantize(w)
    assert y.shape == w.shape and y.dtype == w.dtype
    torch.testing.assert_close(y, _ref_channel_wise(w), rtol=0, atol=0)
    for o in range(w.shape[0]):
        scale = w[o].abs().mean()
        assert set(y[o].reshape(-1).tolist()) <= {scale.item(), -scale.item()}
        assert torch.all(y[o][w[o] == 0] == scale)


def test_channel_wise_scales_differ_per_channel():
    w = torch.stack([torch.full((4, 3, 3), 0.5), torch.full((4, 3, 3), -2.0)])
    y = binary_channel_wise_mean_scaling_quantize(w)
    assert torch.all(y[0] == 0.5) and torch.all(y[1] == -2.0)
    # The whole-tensor version uses one scale: mean(|w|) = 1.25.
    assert torch.all(binary_mean_scaling_quantize(w).abs() == 1.25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "quantize", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize]
)
def test_straight_through_gradient(quantize, device):
    w = _weight((8, 4, 3, 3), torch.float64, device).requires_grad_()
    grad_y = torch.randn(w.shape, dtype=torch.float64, device=device)
    grad_y.view(-1)[0] = float("inf")  # passed through unmasked, unlike the activation quantizer
    (grad_w,) = torch.autograd.grad(quantize(w), w, grad_y)
    assert torch.equal(grad_w, grad_y)


@pytest.mark.parametrize(
    "quantize", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize]
)
def test_strided_and_channels_last_inputs(quantize):
    base = _weight((16, 8, 3, 3))
    y = quantize(base)
    torch.testing.assert_close(quantize(base.contiguous(memory_format=torch.channels_last)), y, rtol=0, atol=0)
    wide = _weight((16, 16, 3, 3))
    torch.testing.assert_close(quantize(wide[:, ::2]), quantize(wide[:, ::2].contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "quantize", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize]
)
def test_refuses_non_float_weights(quantize):
    for bad in (torch.ones(3, 3, dtype=torch.int32), torch.ones(3, 3, dtype=torch.bool),
                torch.ones(3, 3, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="dtype"):
            quantize(bad)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize([1.0, -1.0])


def test_edge_shapes():
    assert binary_mean_scaling_quantize(torch.tensor(-3.0)).item() == -3.0
    assert binary_mean_scaling_quantize(torch.empty(0, 3)).shape == (0, 3)
    assert binary_channel_wise_mean_scaling_quantize(torch.empty(0, 3, 3, 3)).shape == (0, 3, 3, 3)
    with pytest.raises(ValueError, match="0-dim"):
        binary_channel_wise_mean_scaling_quantize(torch.tensor(1.0))


@pytest.mark.parametrize(
    "quantize", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize]
)
def test_under_torch_compile(quantize):
    # aot_eager traces forward and backward through dynamo and AOTAutograd
    # without needing a C++ compiler, which is what matters for the Function.
    w = _weight((8, 4, 3, 3)).requires_grad_()
    compiled = torch.compile(lambda t: quantize(t) * 2.0, backend="aot_eager", fullgraph=True)
    y = compiled(w)
    torch.testing.assert_close(y, quantize(w) * 2.0, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y.sum(), w)
    assert torch.equal(grad, torch.full_like(w, 2.0))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize(
    "quantize", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize]
)
def test_cuda_matches_cpu(quantize):
    w = _weight((64, 32, 3, 3))
    torch.testing.assert_close(quantize(w.cuda()).cpu(), quantize(w), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- QuantConv2d


def test_quant_conv_forward_uses_quantized_weight():
    torch.manual_seed(0)
    conv = QuantConv2d(4, 6, 3, padding=1, bias=True)
    x = torch.randn(2, 4, 9, 9)
    qw = conv.quantized_weight()
    torch.testing.assert_close(qw, _ref_mean_scaling(conv.weight.detach()), rtol=0, atol=0)
    torch.testing.assert_close(conv(x), F.conv2d(x, qw, conv.bias, padding=1), rtol=0, atol=0)
    # The float weight stays the parameter; the quantized one is derived.
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    assert set(conv.state_dict()) == set(nn.Conv2d(4, 6, 3).state_dict())


def test_quant_conv_gradient_reaches_float_weight():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 5, 3, padding=1, bias=False, weight_quantizer=binary_channel_wise_mean_scaling_quantize)
    x = torch.randn(2, 3, 6, 6)
    conv(x).square().sum().backward()
    # Straight-through: the float weight gets the gradient w.r.t. the quantized weight.
    qw = conv.quantized_weight().detach().requires_grad_()
    F.conv2d(x, qw, None, padding=1).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, qw.grad)


def test_quant_conv_without_quantizer_is_a_float_conv():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, stride=2, weight_quantizer=None)
    ref = nn.Conv2d(3, 4, 3, stride=2)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert conv.quantized_weight() is conv.weight
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)
    assert "weight_quantizer=None" in repr(conv)


def test_quant_conv_kwargs_and_repr():
    calls = []

    def scaled_sign(w, scale=1.0):
        calls.append(scale)
        return torch.sign(w) * scale

    conv = QuantConv2d(2, 2, 1, weight_quantizer=scaled_sign, weight_quantizer_kwargs={"scale": 0.5})
    assert torch.all(conv.quantized_weight().abs() <= 0.5) and calls == [0.5]
    text = repr(conv)
    assert "scaled_sign" in text and "'scale': 0.5" in text
    assert "binary_mean_scaling_quantize" in repr(QuantConv2d(2, 2, 1))


def test_quant_conv_refuses_bad_quantizer():
    with pytest.raises(TypeError, match="weight_quantizer"):
        QuantConv2d(2, 2, 1, weight_quantizer="binary")
    with pytest.raises(TypeError, match="weight_quantizer_kwargs"):
        QuantConv2d(2, 2, 1, weight_quantizer_kwargs=[1])


def test_quant_conv_padding_modes_and_channels_last():
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 3, 7, 7)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), conv.quantized_weight(), conv.bias)
    torch.testing.assert_close(conv(x), ref)
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv.to(memory_format=torch.channels_last)(xc), ref, rtol=1e-5, atol=1e-5)
