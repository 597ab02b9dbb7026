"""Blueoil's classification zoo in torch_ext.models: LmnetV0, Lmnet, LmResnet, Darknet (float and quantized).

The layer tables and parameter counts below were written by hand from
Blueoil's network definitions (``blueoil/networks/classification/
lmnet_v0.py``, ``lmnet_v1.py``, ``lm_resnet.py``, ``darknet.py`` and
``blocks.py``), not from torch_ext's code: a trainable-parameter count is
the sum over convolutions of ``cin * cout * k * k`` (+ ``cout`` with a
bias) plus ``2 * C`` per batch norm (TensorFlow's ``scale=True,
center=True``: gamma and beta).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import sgd_losses
from torch_ext import TTQWeightQuantizer, models
from torch_ext.data import load_digits
from torch_ext.models import (
    Darknet,
    DarknetQuantize,
    LmResnet,
    LmResnetQuantize,
    Lmnet,
    LmnetQuantize,
    LmnetV0,
    LmnetV0Quantize,
    LmnetV1,
    LmnetV1Quantize,
)
from torch_ext.modules import QuantActivation
from torch_ext.quant_conv import QuantConv2d
from torch_ext.weight_quantization import (
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    twn_weight_quantize,
)

# These models are small for a CPU: one thread avoids OpenMP hand-offs, above all on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


NEW_MODELS = [LmnetV0, LmnetV0Quantize, LmResnet, LmResnetQuantize, Darknet, DarknetQuantize]


def _convs(model):
    """(name, conv) of every convolution, in graph order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _quantized(conv):
    return isinstance(conv, QuantConv2d) and conv.weight_quantizer is not None


def _count(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- parameter counts


# in_channels=3, num_classes=10, counted by hand from Blueoil's layer definitions.
LMNET_V0_PARAMS = (
    (3 * 32 * 9 + 2 * 32)          # conv1 + bn
    + (32 * 64 * 9 + 2 * 64)       # conv2
    + (64 * 128 * 9 + 2 * 128)     # conv3
    + (128 * 256 * 9 + 2 * 256)    # conv4
    + (256 * 256 * 9 + 2 * 256)    # conv5
    + (256 * 64 * 1 + 2 * 64)      # conv6 (1x1)
    + (64 * 10 + 10)               # conv7 (1x1, bias)
)  # = 996394
LMNET_V1_PARAMS = (
    (3 * 32 * 9 + 64) + (32 * 64 * 9 + 128)        # conv1, conv2
    + (256 * 128 * 9 + 256) + (128 * 64 * 9 + 128)  # conv3 (after space-to-depth: 4 * 64 in), conv4
    + (256 * 128 * 9 + 256) + (512 * 64 + 128)      # conv5, conv6 (4 * 128 in)
    + (64 * 10 + 10)                                # conv7
)  # = 717226


def _resnet_block(cin, cout, stride):
    # bn1(cin) + conv1 (cin*stride^2 after space-to-depth -> cout, 3x3) + bn2(cout) + conv2 (3x3)
    return 2 * cin + cin * stride * stride * cout * 9 + 2 * cout + cout * cout * 9


LM_RESNET_PARAMS = (
    3 * 64 * 9                                                   # first conv, no bias
    + _resnet_block(64, 64, 1) * 2                               # group0
    + _resnet_block(64, 128, 2) + _resnet_block(128, 128, 1)     # group1
    + _resnet_block(128, 256, 2) + _resnet_block(256, 256, 1)    # group2
    + _resnet_block(256, 512, 2) + _resnet_block(512, 512, 1)    # group3
    + 2 * 512                                                    # final bn
    + 512 * 10 + 10                                              # fully connected "linear"
)  # = 15645002
# Darknet's block_1 .. block_18: (in, out, kernel), typed from darknet.py.
DARKNET_BLOCKS = [
    (3, 32, 3), (32, 64, 3), (64, 128, 3), (128, 64, 1), (64, 128, 3), (128, 256, 3), (256, 128, 1),
    (128, 256, 3), (256, 512, 3), (512, 256, 1), (256, 512, 3), (512, 256, 1), (256, 512, 3), (512, 1024, 3),
    (1024, 512, 1), (512, 1024, 3), (1024, 512, 1), (512, 1024, 3),
]
DARKNET_PARAMS = sum(i * o * k * k + 2 * o for i, o, k in DARKNET_BLOCKS) + 1024 * 10 + 10  # = 19827626


@pytest.mark.parametrize("cls,expected", [
    (LmnetV0, LMNET_V0_PARAMS), (LmnetV0Quantize, LMNET_V0_PARAMS),
    (Lmnet, LMNET_V1_PARAMS), (LmnetQuantize, LMNET_V1_PARAMS),
    (LmResnet, LM_RESNET_PARAMS), (LmResnetQuantize, LM_RESNET_PARAMS),
    (Darknet, DARKNET_PARAMS), (DarknetQuantize, DARKNET_PARAMS),
])
def test_parameter_count_matches_blueoil(cls, expected):
    assert (LMNET_V0_PARAMS, LMNET_V1_PARAMS, LM_RESNET_PARAMS, DARKNET_PARAMS) == (
        996394, 717226, 15645002, 19827626)
    assert _count(cls(num_classes=10, in_channels=3)) == expected


@pytest.mark.parametrize("name,base,quantized_convs", [
    ("lmnet_v0_quantize", LMNET_V0_PARAMS, 6),   # conv1..conv6
    ("lmnet_quantize", LMNET_V1_PARAMS, 6),      # conv1..conv6
    ("lm_resnet_quantize", LM_RESNET_PARAMS, 16),  # 4 groups x 2 blocks x 2 convs
    ("darknet_quantize", DARKNET_PARAMS, 19),    # block_1..block_18 and conv_19
])
def test_ttq_adds_two_learned_scales_per_quantized_convolution(name, base, quantized_convs):
    model = models.get_model(name, weight_quantizer="ttq")
    quantizers = [m for m in model.modules() if isinstance(m, TTQWeightQuantizer)]
    assert len(quantizers) == quantized_convs and len({id(q) for q in quantizers}) == quantized_convs
    assert _count(model) == base + 2 * quantized_convs
    assert sum(1 for n in model.state_dict() if n.endswith("weight_quantizer.positive")) == quantized_convs
    # A module instance given to the model is copied per convolution, never shared.
    model = models.get_model(name, weight_quantizer=TTQWeightQuantizer(threshold=0.1))
    quantizers = [m for m in model.modules() if isinstance(m, TTQWeightQuantizer)]
    assert len({id(q) for q in quantizers}) == quantized_convs and {q.threshold for q in quantizers} == {0.1}


# ---------------------------------------------------------------- layer lists


def test_lmnet_aliases_are_lmnet_v1():
    # Blueoil: classification/__init__.py has Lmnet = LmnetV1, LmnetQuantize = LmnetV1Quantize.
    assert Lmnet is LmnetV1 and LmnetQuantize is LmnetV1Quantize
    assert models.get_model_builder("lmnet") is LmnetV1
    assert models.get_model_builder("lmnet_quantize") is LmnetV1Quantize


def test_lmnet_v0_layers():
    model = LmnetV0(num_classes=10)
    # (name, in, out, kernel, bias), from lmnet_v0.py.
    expected = [("conv1.conv", 3, 32, 3, False), ("conv2.conv", 32, 64, 3, False),
                ("conv3.conv", 64, 128, 3, False), ("conv4.conv", 128, 256, 3, False),
                ("conv5.conv", 256, 256, 3, False), ("conv6.conv", 256, 64, 1, False), ("conv7", 64, 10, 1, True)]
    got = [(n, c.in_channels, c.out_channels, c.kernel_size[0], c.bias is not None) for n, c in _convs(model)]
    assert got == expected
    for _, conv in _convs(model):
        assert conv.stride == (1, 1) and conv.padding == (conv.kernel_size[0] // 2,) * 2  # 'SAME'
    assert [n for n, _ in model.named_children()] == [
        "conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "conv5", "pool5", "conv6",
        "dropout", "conv7", "pool7"]
    for i in range(1, 6):
        pool = getattr(model, f"pool{i}")
        assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.ceil_mode) == (2, 2, True)
    assert model.dropout.p == 0.5
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all((b.momentum, b.eps) == (0.01, 1e-3) for b in bns)
    assert all(isinstance(getattr(model, f"conv{i}").act, nn.ReLU) for i in range(1, 7))


def test_max_pool_is_tensorflow_same_on_odd_sizes():
    # TF 'SAME' 2x2/2 pooling of a 5x5 map gives 3x3; the last row/column is pooled alone.
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    y = LmnetV0(num_classes=2).pool1(x)
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0].tolist() == [[6, 8, 9], [16, 18, 19], [21, 23, 24]]


@pytest.mark.parametrize("first,last", [(True, False), (False, False), (True, True)])
def test_lmnet_v0_quantize_which_layers_are_quantized(first, last):
    model = LmnetV0Quantize(quantize_first_convolution=first, quantize_last_convolution=last)
    quantized = [n for n, c in _convs(model) if _quantized(c)]
    expected = ([f"conv{i}.conv" for i in range(1 if first else 2, 7)]) + (["conv7"] if last else [])
    assert quantized == expected
    assert [type(getattr(model, f"conv{i}").act) for i in range(1, 7)] == [QuantActivation] * 5 + [nn.ReLU]
    defaults = LmnetV0Quantize()
    assert (defaults.quantize_first_convolution, defaults.quantize_last_convolution) == (True, False)


def test_lm_resnet_layers():
    model = LmResnet(num_classes=10)
    got = [(n, c.in_channels, c.out_channels, c.kernel_size[0]) for n, c in _convs(model)]
    # From lm_resnet.py: 3x3 first conv, then per block conv1 (after space-to-depth at stride 2) and conv2.
    expected = [("conv0", 3, 64, 3)]
    for g, (cin, cout) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)]):
        stride = 1 if g == 0 else 2
        expected += [(f"group{g}.block0.conv1", cin * stride * stride, cout, 3),
                     (f"group{g}.block0.conv2", cout, cout, 3),
                     (f"group{g}.block1.conv1", cout, cout, 3),
                     (f"group{g}.block1.conv2", cout, cout, 3)]
    assert got == expected
    assert all(c.bias is None and c.padding == (1, 1) for _, c in _convs(model))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 17 and all((b.momentum, b.eps) == (0.003, 1e-3) for b in bns)  # decay=0.997
    assert isinstance(model.linear, nn.Linear) and (model.linear.in_features, model.linear.out_features) == (512, 10)
    assert [n for n, _ in model.named_children()] == ["conv0", "group0", "group1", "group2", "group3", "bn", "relu",
                                                      "gap", "linear"]
    for g in (1, 2, 3):
        block = getattr(model, f"group{g}").block0
        assert isinstance(block.pool, models.SpaceToDepth)
        assert [type(m).__name__ for m in block.shortcut] == ["AvgPool2d", "_PadChannels"]
    assert len(model.group0.block0.shortcut) == 0 and isinstance(model.group0.block0.pool, nn.Identity)


def test_lm_resnet_block_is_pre_activation_with_padded_shortcut():
    torch.manual_seed(0)
    block = LmResnet(num_classes=2).group1.block0.eval()  # 64 -> 128, stride 2
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        y = block(x)
        # Blueoil's basicblock, written out: shortcut = avg_pool(x), zero channels 32 before and 32 after.
        h = F.relu(block.bn1(x))
        h = block.conv1(models.SpaceToDepth(2)(h))
        h = block.conv2(F.relu(block.bn2(h)))
        shortcut = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 32, 32))
    torch.testing.assert_close(y, shortcut + h)
    assert y.shape == (2, 128, 4, 4)


def test_lm_resnet_quantize_which_layers_are_quantized():
    model = LmResnetQuantize()
    quantized = [n for n, c in _convs(model) if _quantized(c)]
    assert quantized == [n for n, _ in _convs(model) if n.startswith("group")] and len(quantized) == 16
    assert not _quantized(model.conv0) and isinstance(model.linear, nn.Linear)
    acts = [type(m) for n, m in model.named_modules() if n.endswith(("act1", "act2"))]
    assert acts == [QuantActivation] * 16 and isinstance(model.relu, nn.ReLU)
    assert _quantized(LmResnetQuantize(quantize_first_convolution=True).conv0)
    with pytest.raises(ValueError, match="quantize_last_convolution=True is not supported"):
        LmResnetQuantize(quantize_last_convolution=True)


def test_darknet_layers():
    model = Darknet(num_classes=10)
    got = [(n, c.in_channels, c.out_channels, c.kernel_size[0]) for n, c in _convs(model)]
    expected = [(f"block_{i}.conv", *b) for i, b in enumerate(DARKNET_BLOCKS, start=1)] + [("conv_19", 1024, 10, 1)]
    assert got == expected
    names = [n for n, _ in model.named_children()]
    for block, pool in ((1, 1), (2, 2), (5, 3), (8, 4), (13, 5)):  # max pools after these blocks
        assert names[names.index(f"block_{block}") + 1] == f"pool_{pool}"
    assert names[-2:] == ["conv_19", "pool_6"] and len(names) == 18 + 5 + 2
    assert all(isinstance(getattr(model, f"block_{i}").act, nn.LeakyReLU) for i in range(1, 19))
    assert model.block_1.act.negative_slope == 0.1
    assert all(c.bias is None for n, c in _convs(model) if n != "conv_19") and model.conv_19.bias is not None
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 18 and all((b.momentum, b.eps) == (0.01, 1e-3) for b in bns)


def test_darknet_initialisers():
    torch.manual_seed(0)
    model = Darknet(num_classes=10)
    # tf.variance_scaling_initializer(): scale 1, fan-in, truncated normal -> std sqrt(1 / fan_in), |w| <= 2 std/0.88.
    w = model.block_14.conv.weight  # 512 * 9 fan-in, 4.7M entries
    fan_in = 512 * 9
    assert abs(w.std().item() / fan_in ** -0.5 - 1) < 0.01
    assert w.abs().max().item() <= 2 * fan_in ** -0.5 / 0.87962566103423978 + 1e-7
    assert abs(model.conv_19.weight.std().item() / 0.01 - 1) < 0.1 and torch.all(model.conv_19.bias == 0)


@pytest.mark.parametrize("first,last", [(True, True), (False, False), (True, False), (False, True)])
def test_darknet_quantize_flags(first, last):
    model = DarknetQuantize(quantize_first_convolution=first, quantize_last_convolution=last)
    assert _quantized(model.block_1.conv) == first
    assert _quantized(model.conv_19) == last
    assert all(_quantized(getattr(model, f"block_{i}").conv) for i in range(2, 19))
    assert all(isinstance(getattr(model, f"block_{i}").act, QuantActivation) for i in range(1, 18))
    assert isinstance(model.block_18.act, QuantActivation if last else nn.LeakyReLU)
    assert model.block_2.conv.weight_quantizer is binary_channel_wise_mean_scaling_quantize  # Blueoil's configs


def test_darknet_quantize_defaults_match_blueoil():
    model = DarknetQuantize()
    assert (model.quantize_first_convolution, model.quantize_last_convolution) == (True, True)


@pytest.mark.parametrize("cls", NEW_MODELS)
@pytest.mark.parametrize("size", [8, 16, 32])
def test_output_shape_on_digit_sizes(cls, size):
    torch.manual_seed(0)
    model = cls(num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_lm_resnet_refuses_sizes_not_divisible_by_8():
    assert LmResnet.input_size_multiple == 8 and LmnetV1.input_size_multiple == 8
    assert LmnetV0.input_size_multiple == 1 and Darknet.input_size_multiple == 1
    with pytest.raises(ValueError, match=r"divisible by 8, got shape \(1, 1, 12, 12\)"):
        LmResnet(in_channels=1)(torch.rand(1, 1, 12, 12))


@pytest.mark.parametrize("name", ["lmnet_v0_quantize", "lm_resnet_quantize", "darknet_quantize"])
@pytest.mark.parametrize("wq", ["binary", "binary-channel-wise", "ttq", "twn"])
def test_every_weight_quantizer_by_name(name, wq):
    model = models.get_model(name, num_classes=10, in_channels=1, weight_quantizer=wq)
    quantized = [c for _, c in _convs(model) if _quantized(c)]
    want = {"binary": binary_mean_scaling_quantize, "binary-channel-wise": binary_channel_wise_mean_scaling_quantize,
            "twn": twn_weight_quantize}
    if wq == "ttq":
        assert all(isinstance(c.weight_quantizer, TTQWeightQuantizer) for c in quantized)
    else:
        assert all(c.weight_quantizer is want[wq] for c in quantized)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_registry_lists_the_new_models():
    names = set(models.list_models())
    assert {"lmnet_v0", "lmnet_v0_quantize", "lmnet", "lmnet_quantize", "lm_resnet", "lm_resnet_quantize",
            "darknet", "darknet_quantize"} <= names
    with pytest.raises(ValueError, match="weight_quantizer='ternary' is unknown"):
        models.get_model("darknet_quantize", weight_quantizer="ternary")


# ---------------------------------------------------------------- training on digits


@pytest.fixture(scope="module")
def digits_batch():
    splits = load_digits(image_size=8)
    images = torch.stack([splits.train[i][0] for i in range(64)])
    labels = torch.tensor([splits.train[i][1] for i in range(64)])
    return images, labels




@pytest.mark.parametrize("name,kwargs,lr", [
    ("lmnet_v0", {}, 0.05), ("lmnet_v0_quantize", {}, 0.05),
    ("lmnet_quantize", {"weight_quantizer": "ttq"}, 0.05),
    ("lm_resnet", {}, 0.02), ("lm_resnet_quantize", {}, 0.02),
    ("darknet", {}, 0.01), ("darknet_quantize", {}, 0.05),
    ("lmnet_v0_quantize", {"weight_quantizer": "twn"}, 0.05),
])
def test_few_steps_on_digits_lower_the_loss(name, kwargs, lr, digits_batch):
    images, labels = digits_batch
    torch.manual_seed(0)
    losses = sgd_losses(models.get_model(name, num_classes=10, in_channels=1, **kwargs).train(), images, labels, lr=lr)
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
    assert min(losses[-3:]) < 0.85 * losses[0], losses


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("name,wq", [("lmnet_v0_quantize", "ttq"), ("darknet_quantize", "twn")])
def test_onnx_export_folds_the_new_quantizers(name, wq, tmp_path):
    why = "ONNX export needs onnx, onnxscript and onnxruntime"
    pytest.importorskip("onnx", reason=why)
    pytest.importorskip("onnxscript", reason=why)
    pytest.importorskip("onnxruntime", reason=why)
    from torch_ext import export_onnx, run_onnx

    torch.manual_seed(0)
    model = models.get_model(name, num_classes=10, in_channels=1, weight_quantizer=wq)
    if wq == "ttq":  # scales as training leaves them: different per layer and sign
        for i, q in enumerate(m for m in model.modules() if isinstance(m, TTQWeightQuantizer)):
            with torch.no_grad():
                q.positive.fill_(0.5 + i)
                q.negative.fill_(2.0 - 0.25 * i)
    model.eval()
    x = torch.rand(3, 1, 16, 16)
    path = tmp_path / "model.onnx"
    export_onnx(model, x, path)
    (logits,) = run_onnx(path, x)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
