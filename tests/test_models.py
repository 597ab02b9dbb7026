"""Structure, shapes and behaviour of torch_ext.models (Blueoil's classifiers)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ext import models
from torch_ext.models import LmnetV1, LmnetV1Quantize, SampleNetwork, SampleNetworkQuantize, SpaceToDepth
from torch_ext.modules import QuantActivation
from torch_ext.quant_conv import QuantConv2d
from torch_ext.weight_quantization import (
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
)

ALL_MODELS = [LmnetV1, LmnetV1Quantize, SampleNetwork, SampleNetworkQuantize]
LMNET_CONVS = ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7"]


def _conv(model, name):
    module = getattr(model, name)
    return module.conv if isinstance(module, nn.Sequential) else module


def _is_quantized(conv):
    return isinstance(conv, QuantConv2d) and conv.weight_quantizer is not None


@pytest.mark.parametrize("cls", ALL_MODELS)
@pytest.mark.parametrize("num_classes,in_channels,size", [(10, 3, 32), (3, 1, 16), (7, 3, 8)])
def test_output_shape(cls, num_classes, in_channels, size):
    torch.manual_seed(0)
    model = cls(num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_lmnet_layer_structure():
    model = LmnetV1(num_classes=10)
    expected = [  # (name, in, out, kernel, bias)
        ("conv1", 3, 32, 3, False), ("conv2", 32, 64, 3, False), ("conv3", 256, 128, 3, False),
        ("conv4", 128, 64, 3, False), ("conv5", 256, 128, 3, False), ("conv6", 512, 64, 1, False),
        ("conv7", 64, 10, 1, True),
    ]
    for name, cin, cout, k, bias in expected:
        conv = _conv(model, name)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (cin, cout, (k, k), (1, 1))
        assert conv.padding == (k // 2, k // 2), name  # TF 'SAME'
        assert (conv.bias is not None) == bias, name
    assert [type(getattr(model, n)).__name__ for n in ("pool2", "pool4", "pool5")] == ["SpaceToDepth"] * 3
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    # Order of the children is the order of Blueoil's graph.
    assert [n for n, _ in model.named_children()] == [
        "conv1", "conv2", "pool2", "conv3", "conv4", "pool4", "conv5", "pool5", "conv6", "dropout", "conv7", "pool7",
    ]


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_batch_norm_is_blueoils(cls):
    bns = [m for m in cls().modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        # decay=0.99 -> momentum 0.01, epsilon=1e-3, scale and center.
        assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3) and bn.affine


def test_float_models_have_no_quantizers():
    for cls in (LmnetV1, SampleNetwork):
        model = cls()
        assert not any(isinstance(m, (QuantConv2d, QuantActivation)) for m in model.modules())
    # Blueoil: LmnetV1 uses tf.nn.relu, the sample network leaky_relu(alpha=0.1).
    acts = [type(getattr(LmnetV1(), n).act) for n in LMNET_CONVS[:6]]
    assert acts == [nn.ReLU] * 6
    assert isinstance(SampleNetwork().block_1.act, nn.LeakyReLU)
    assert SampleNetwork().block_1.act.negative_slope == 0.1


@pytest.mark.parametrize("first,last", list(itertools.product([True, False], repeat=2)))
def test_lmnet_quantize_which_convs_are_quantized(first, last):
    model = LmnetV1Quantize(quantize_first_convolution=first, quantize_last_convolution=last)
    quantized = [n for n in LMNET_CONVS if _is_quantized(_conv(model, n))]
    middle = ["conv2", "conv3", "conv4", "conv5", "conv6"]
    expected = (["conv1"] if first else []) + middle + (["conv7"] if last else [])
    assert quantized == expected
    # Unquantized convolutions are plain float nn.Conv2d.
    for n in set(LMNET_CONVS) - set(expected):
        assert type(_conv(model, n)) is nn.Conv2d
    # Every QuantConv2d in the network is one of those, found via modules().
    assert sum(isinstance(m, QuantConv2d) for m in model.modules()) == len(expected)
    assert all(_conv(model, n).weight_quantizer is binary_mean_scaling_quantize for n in expected)


def test_lmnet_quantize_defaults_match_blueoil():
    # Blueoil's LmnetV1Quantize quantizes conv1..conv6 through its variable
    # getter; conv7, the classifier, keeps float weights.
    model = LmnetV1Quantize()
    assert [n for n in LMNET_CONVS if _is_quantized(_conv(model, n))] == LMNET_CONVS[:6]
    assert type(model.conv7) is nn.Conv2d and model.quantize_last_convolution is False
    assert model.quantize_first_convolution is True


def test_registry_builds_every_model_by_name():
    assert models.list_models() == sorted([
        "lmnet_v1", "lmnet_v1_quantize", "sample_network", "sample_network_quantize",
        # Blueoil's other classifiers (tests/test_blueoil_networks.py):
        "lmnet", "lmnet_quantize", "lmnet_v0", "lmnet_v0_quantize", "lm_resnet", "lm_resnet_quantize",
        "darknet", "darknet_quantize",
    ])
    for name, cls in [("lmnet_v1", LmnetV1), ("lmnet_v1_quantize", LmnetV1Quantize), ("sample_network", SampleNetwork),
                      ("sample_network_quantize", SampleNetworkQuantize)]:
        model = models.get_model(name, num_classes=4, in_channels=1)
        assert type(model) is cls and model.num_classes == 4
        assert models.get_model_builder(name) is cls
    # A weight quantizer can be named.
    model = models.get_model("lmnet_v1_quantize", weight_quantizer="binary_channel_wise_mean_scaling")
    assert model.conv2.conv.weight_quantizer is binary_channel_wise_mean_scaling_quantize
    with pytest.raises(ValueError, match=r"model='resnet18' is unknown; choose one of \['darknet'"):
        models.get_model("resnet18")
    with pytest.raises(ValueError, match=r"weight_quantizer='ternary' is unknown"):
        models.get_model("lmnet_v1_quantize", weight_quantizer="ternary")


def test_lmnet_quantize_activations():
    model = LmnetV1Quantize()
    acts = [m for m in model.modules() if isinstance(m, QuantActivation)]
    assert len(acts) == 5 and all(a.bit == 2 and a.max_value == 2.0 for a in acts)
    assert len({id(a) for a in acts}) == 5  # one module per layer, so each can be hooked
    assert [isinstance(getattr(model, n).act, QuantActivation) for n in LMNET_CONVS[:6]] == [True] * 5 + [False]
    assert isinstance(model.conv6.act, nn.ReLU)  # Blueoil keeps a plain ReLU on conv6


@pytest.mark.parametrize("first,last", list(itertools.product([True, False], repeat=2)))
def test_sample_network_quantize_which_convs_are_quantized(first, last):
    model = SampleNetworkQuantize(num_classes=5, quantize_first_convolution=first, quantize_last_convolution=last)
    assert _is_quantized(model.block_1.conv) == first
    assert _is_quantized(model.block_last) == last
    assert model.block_1.conv.bias is None and model.block_last.bias is not None
    assert (model.block_1.conv.out_channels, model.block_1.conv.kernel_size) == (32, (3, 3))
    assert (model.block_last.out_channels, model.block_last.kernel_size) == (5, (1, 1))
    acts = [m for m in model.modules() if isinstance(m, QuantActivation)]
    assert len(acts) == 1 and acts[0] is model.block_1.act


def test_custom_quantizers_are_used():
    model = LmnetV1Quantize(
        num_classes=4,
        activation_quantizer=QuantActivation,
        activation_quantizer_kwargs={"bit": 3, "max_value": 1.5},
        weight_quantizer=binary_channel_wise_mean_scaling_quantize,
        quantize_last_convolution=True,
    )
    acts = [m for m in model.modules() if isinstance(m, QuantActivation)]
    assert all(a.bit == 3 and a.max_value == 1.5 for a in acts)
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 7 and all(c.weight_quantizer is binary_channel_wise_mean_scaling_quantize for c in convs)
    # Any callable returning a module works as activation quantizer.
    relu6 = SampleNetworkQuantize(activation_quantizer=nn.ReLU6, activation_quantizer_kwargs={})
    assert isinstance(relu6.block_1.act, nn.ReLU6)
    # weight_quantizer=None: float weights, quantized activations.
    a2 = LmnetV1Quantize(weight_quantizer=None)
    assert not any(isinstance(m, QuantConv2d) for m in a2.modules())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        LmnetV1Quantize(num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        LmnetV1(in_channels=0)
    with pytest.raises(TypeError, match="activation_quantizer"):
        LmnetV1Quantize(activation_quantizer="quant")
    with pytest.raises(TypeError, match="activation_quantizer must return an nn.Module"):
        SampleNetworkQuantize(activation_quantizer=lambda **kw: torch.relu, activation_quantizer_kwargs={})
    with pytest.raises(TypeError, match="weight_quantizer"):
        SampleNetworkQuantize(weight_quantizer=3)
    with pytest.raises(ValueError, match="bit"):
        LmnetV1Quantize(activation_quantizer_kwargs={"bit": 0, "max_value": 2.0})
    with pytest.raises(ValueError, match="divisible by 8"):
        LmnetV1()(torch.rand(1, 3, 12, 12))


def test_initialisation_follows_tensorflow():
    torch.manual_seed(0)
    model = LmnetV1(num_classes=100)
    w7 = model.conv7.weight
    assert w7.std().item() == pytest.approx(0.01, rel=0.1) and torch.all(model.conv7.bias == 0)
    w3 = model.conv3.conv.weight  # Glorot uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    bound = (6.0 / (256 * 9 + 128 * 9)) ** 0.5
    assert w3.abs().max().item() <= bound and w3.abs().max().item() > 0.95 * bound
    # Sample network block_1: He truncated normal, cut at two standard deviations.
    w1 = SampleNetwork(in_channels=64).block_1.conv.weight
    std = (2.0 / (64 * 9)) ** 0.5 / 0.87962566103423978
    assert w1.abs().max().item() <= 2 * std
    assert w1.std().item() == pytest.approx((2.0 / (64 * 9)) ** 0.5, rel=0.05)


def _tf_space_to_depth_nhwc(x_nhwc: np.ndarray, b: int) -> np.ndarray:
    """tf.nn.space_to_depth's definition, element by element."""
    n, h, w, c = x_nhwc.shape
    out = np.empty((n, h // b, w // b, c * b * b), x_nhwc.dtype)
    for i, j, dy, dx in itertools.product(range(h // b), range(w // b), range(b), range(b)):
        out[:, i, j, (dy * b + dx) * c : (dy * b + dx + 1) * c] = x_nhwc[:, i * b + dy, j * b + dx, :]
    return out


@pytest.mark.parametrize("block", [2, 3])
def test_space_to_depth_has_tensorflow_channel_order(block):
    x = torch.arange(2 * 5 * 6 * 6, dtype=torch.float32).reshape(2, 5, 6, 6)
    y = SpaceToDepth(block)(x)
    ref = _tf_space_to_depth_nhwc(x.permute(0, 2, 3, 1).numpy(), block)
    np.testing.assert_array_equal(y.permute(0, 2, 3, 1).numpy(), ref)
    # Same values as pixel_unshuffle, in a different channel order.
    assert not torch.equal(y, F.pixel_unshuffle(x, block))
    assert torch.equal(y.sort(dim=1).values, F.pixel_unshuffle(x, block).sort(dim=1).values)
    # channels_last input gives the same result.
    assert torch.equal(SpaceToDepth(block)(x.contiguous(memory_format=torch.channels_last)), y)
    with pytest.raises(ValueError, match="divisible"):
        SpaceToDepth(block)(torch.zeros(1, 1, block + 1, block))


@pytest.mark.parametrize("cls", [LmnetV1Quantize, SampleNetworkQuantize])
def test_quantized_forward_uses_quantized_weights_and_codes(cls):
    torch.manual_seed(0)
    model = cls(num_classes=10, in_channels=1).eval()
    codes = {}

    def hook(name):
        def fn(module, inputs, output):
            codes[name] = output
        return fn

    for name, m in model.named_modules():
        if isinstance(m, QuantActivation):
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.rand(4, 1, 16, 16))
    # Every activation quantizer outputs the 2-bit levels {0, 2/3, 4/3, 2}.
    levels = torch.tensor([0.0, 2 / 3, 4 / 3, 2.0])
    for name, y in codes.items():
        assert torch.isclose(y.reshape(-1, 1), levels).any(dim=1).all(), name
    # Every quantized convolution convolves with +-mean(|w|).
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            qw = m.quantized_weight()
            assert qw.abs().unique().numel() == 1


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_gradients_reach_every_parameter(cls):
    torch.manual_seed(0)
    model = cls(num_classes=10, in_channels=1).train()
    x = torch.rand(8, 1, 16, 16)
    loss = F.cross_entropy(model(x), torch.arange(8) % 10)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum().item() for p in model.parameters()) > 0


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_channels_last_matches_contiguous(cls):
    torch.manual_seed(0)
    model = cls(num_classes=10).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    # The quantizers make tiny conv rounding differences either vanish or flip
    # a code; the logits agree closely either way.
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
