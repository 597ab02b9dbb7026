"""Bit-packed inference (docs/deploy.md): the operators and torch_ext.deploy.convert.

* the packed convolution's accumulator equals sum(sign(w) * code) exactly
  (float64 reference convolution of integers: every partial sum is an
  integer below 2^53, so it is exact), for every ISA the kernels have;
* thresholds reproduce the float pipeline on every accumulator value,
  including channels whose batch-norm scale is negative or zero;
* per-layer codes of converted models agree with the source model except
  where its float pre-activation lies within float rounding of a boundary;
* the digits test set: predictions and accuracy of a trained model;
* every op passes torch.library.opcheck and refuses bad input clearly.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import torch_ext
from torch_ext import deploy
from torch_ext.models import LmnetV1Quantize, SampleNetworkQuantize, SpaceToDepth

ops = torch.ops.torch_ext
ISAS = ("baseline", "avx2", "default")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Run the packed kernels capped at each ISA (the default is the best the CPU has)."""
    if request.param == "default":
        monkeypatch.delenv("TORCH_EXT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("TORCH_EXT_CPU_ISA", request.param)
    return request.param


def reference_acc(codes: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """sum(sign(w) * code) by a float64 convolution of integers (exact: all sums are integers < 2^53)."""
    sign = torch.where(weight >= 0, 1.0, -1.0).to(torch.float64)
    out = F.conv2d(codes.to(torch.float64), sign, stride=stride, padding=padding)
    return out.to(torch.int64)


def random_case(gen, n, c, h, w, o, k, bit):
    codes = torch.randint(0, 2**bit, (n, c, h, w), dtype=torch.uint8, generator=gen)
    weight = torch.randn(o, c, k, k, generator=gen)
    # Exact zeros count as +1 (Blueoil's sign of 0).
    weight[weight.abs() < 0.1] = 0.0
    return codes, weight


# --------------------------------------------------------------------------
# Exactness of the accumulators.


@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 0), (5, 1, 2), (5, 2, 1), (3, 2, 2), (1, 2, 1)])
@pytest.mark.parametrize("c", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_packed_conv_equals_reference(isa, k, stride, padding, c, bit):
    gen = torch.Generator().manual_seed(1000 * c + 10 * k + bit)
    n, h, w, o = 1 + (c % 9), 7 + (c % 3), 9 - (c % 2), 1 + (c * 7) % 67
    codes, weight = random_case(gen, n, c, h, w, o, k, bit)
    x = ops.pack_codes(codes, bit)
    acc = ops.packed_conv2d(x, ops.pack_binary_weights(weight), c, [stride, stride], [padding, padding])
    assert acc.dtype == torch.int32
    assert torch.equal(acc.to(torch.int64), reference_acc(codes, weight, stride, padding))


@settings(max_examples=60)
@given(
    n=hst.integers(1, 9), c=hst.integers(1, 130), h=hst.integers(1, 11), w=hst.integers(1, 11),
    o=hst.integers(1, 70), kh=hst.sampled_from([1, 2, 3, 5]), kw=hst.sampled_from([1, 3, 4, 5]),
    sh=hst.integers(1, 3), sw=hst.integers(1, 3), ph=hst.integers(0, 2), pw=hst.integers(0, 2),
    bit=hst.integers(1, 4), isa_name=hst.sampled_from(ISAS), seed=hst.integers(0, 2**31 - 1),
)
def test_packed_conv_property(n, c, h, w, o, kh, kw, sh, sw, ph, pw, bit, isa_name, seed):
    if h + 2 * ph < kh or w + 2 * pw < kw:
        return  # no output pixel; the refusal is tested below
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bit, (n, c, h, w), dtype=torch.uint8, generator=gen)
    weight = torch.randn(o, c, kh, kw, generator=gen)
    old = os.environ.pop("TORCH_EXT_CPU_ISA", None)
    try:
        if isa_name != "default":
            os.environ["TORCH_EXT_CPU_ISA"] = isa_name
        acc = ops.packed_conv2d(ops.pack_codes(codes, bit), ops.pack_binary_weights(weight), c, [sh, sw], [ph, pw])
    finally:
        os.environ.pop("TORCH_EXT_CPU_ISA", None)
        if old is not None:
            os.environ["TORCH_EXT_CPU_ISA"] = old
    assert torch.equal(acc.to(torch.int64), reference_acc(codes, weight, (sh, sw), (ph, pw)))


def threshold_reference(acc: torch.Tensor, thresholds: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    v = acc.to(torch.int64) * direction.view(1, -1, 1, 1).to(torch.int64)
    return (v.unsqueeze(-1) >= thresholds.view(1, thresholds.shape[0], 1, 1, -1).to(torch.int64)).sum(-1)


@pytest.mark.parametrize("c,o,out_bit", [(3, 5, 1), (64, 64, 2), (70, 130, 2), (130, 65, 3), (17, 200, 4)])
def test_threshold_and_affine_outputs(isa, c, o, out_bit):
    gen = torch.Generator().manual_seed(c * o + out_bit)
    codes, weight = random_case(gen, 3, c, 6, 7, o, 3, 2)
    x = ops.pack_codes(codes, 2)
    w = ops.pack_binary_weights(weight)
    acc = ops.packed_conv2d(x, w, c, [1, 1], [1, 1])
    bound = 3 * c * 9
    levels = 2**out_bit - 1
    thresholds = torch.randint(-bound // 3, bound // 3, (o, levels), generator=gen).sort(dim=1).values.to(torch.int32)
    thresholds[0] = -bound - 5  # constant: every level reached
    thresholds[-1] = bound + 1  # constant: code 0
    direction = torch.where(torch.rand(o, generator=gen) < 0.5, 1, -1).to(torch.int32)
    packed = ops.packed_conv2d_threshold(x, w, c, [1, 1], [1, 1], thresholds, direction, out_bit)
    assert packed.shape == (3, 6, 7, out_bit, (o + 63) // 64)
    expected = threshold_reference(acc, thresholds, direction)
    assert torch.equal(ops.unpack_codes(packed, o).to(torch.int64), expected)
    # The padding bits of the output's last word stay 0.
    if o % 64:
        assert int((packed[..., -1] >> (o % 64)).abs().sum()) == 0

    scale = torch.randn(o, generator=gen)
    bias = torch.randn(o, generator=gen)
    y = ops.packed_conv2d_affine(x, w, c, [1, 1], [1, 1], scale, bias)
    assert torch.equal(y, acc.to(torch.float32) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("c", [1, 3, 32, 63, 64, 65, 100, 130])
@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_pack_unpack_space_to_depth(c, bit):
    gen = torch.Generator().manual_seed(c + bit)
    codes = torch.randint(0, 2**bit, (2, c, 6, 4), dtype=torch.uint8, generator=gen)
    packed = ops.pack_codes(codes, bit)
    assert packed.shape == (2, 6, 4, bit, (c + 63) // 64) and packed.dtype == torch.int64
    assert torch.equal(ops.unpack_codes(packed, c), codes)
    # Bit p of channel j is bit (j % 64) of word j // 64 of plane p.
    j = c - 1
    assert int((packed[1, 5, 3, bit - 1, j // 64] >> (j % 64)) & 1) == (int(codes[1, j, 5, 3]) >> (bit - 1)) & 1
    # Channels-last and other strides give the same packing.
    assert torch.equal(ops.pack_codes(codes.to(memory_format=torch.channels_last), bit), packed)
    s2d = ops.packed_space_to_depth(packed, c, 2)
    assert torch.equal(ops.unpack_codes(s2d, 4 * c), SpaceToDepth(2)(codes))


def test_quantize_pack_codes_equals_quantize_to_codes(isa):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 5, 6, generator=gen) * 2
    for bit, m in [(1, 2.0), (2, 2.0), (3, 1.5), (4, 6.0)]:
        n = 2**bit - 1
        # Every rounding boundary and its float neighbours, NaN and infinities.
        special = torch.tensor([(k + 0.5) / n * m for k in range(n)] + [0.0, -0.0, m, -1.0, math.inf, -math.inf,
                                                                        math.nan], dtype=torch.float32)
        special = torch.cat([special, torch.nextafter(special, special + 1), torch.nextafter(special, special - 1)])
        y = x.clone()
        y.view(-1)[: special.numel()] = special
        expected = ops.pack_codes(torch_ext.quantize_to_codes(y, bit, m), bit)
        assert torch.equal(ops.quantize_pack_codes(y, bit, m), expected)


def test_pack_binary_weights_sign_of_zero_and_padding():
    w = torch.tensor([0.0, -0.0, 1.0, -1.0, math.nan]).view(1, 5, 1, 1)
    packed = ops.pack_binary_weights(w)
    # w >= 0: 0.0 and -0.0 are +1; NaN is not >= 0 (-1, as where(w >= 0, s, -s) gives).
    assert packed.shape == (1, 1, 1, 1) and int(packed) == 0b00111


# --------------------------------------------------------------------------
# opcheck and refusals.


def _op_cases():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4, (2, 70, 6, 6), dtype=torch.uint8, generator=gen)
    x = ops.pack_codes(codes, 2)
    w = ops.pack_binary_weights(torch.randn(5, 70, 3, 3, generator=gen))
    th = torch.tensor([[-10, 0, 10]] * 5, dtype=torch.int32)
    d = torch.tensor([1, -1, 1, 1, -1], dtype=torch.int32)
    return {
        "pack_codes": (codes, 2),
        "quantize_pack_codes": (torch.randn(2, 70, 4, 4, generator=gen), 2, 2.0),
        "unpack_codes": (x, 70),
        "pack_binary_weights": (torch.randn(5, 70, 3, 3, generator=gen),),
        "packed_space_to_depth": (x, 70, 2),
        "packed_conv2d": (x, w, 70, [1, 1], [1, 1]),
        "packed_conv2d_affine": (x, w, 70, [2, 1], [0, 1], torch.randn(5, generator=gen), torch.randn(5, generator=gen)),
        "packed_conv2d_threshold": (x, w, 70, [1, 1], [1, 1], th, d, 2),
    }


@pytest.mark.parametrize("name", sorted(_op_cases()))
def test_opcheck(name):
    torch.library.opcheck(getattr(ops, name), _op_cases()[name])


def _bad_inputs():
    c = _op_cases()
    codes = c["pack_codes"][0]
    x, w = c["packed_conv2d"][0], c["packed_conv2d"][1]
    th, d = c["packed_conv2d_threshold"][5], c["packed_conv2d_threshold"][6]
    s, b = c["packed_conv2d_affine"][5], c["packed_conv2d_affine"][6]
    w_pad = w.clone()
    w_pad[0, 0, 0, -1] |= 1 << 63  # a bit beyond channel 70
    th_desc = th.flip(1).contiguous()
    return [
        ("pack_codes", (codes.float(), 2), TypeError, "codes must be a uint8"),
        ("pack_codes", (codes, 5), ValueError, "bit must be in 1..4, got bit=5"),
        ("pack_codes", (codes[0], 2), ValueError, "codes must have shape"),
        ("pack_codes", (codes | 4, 2), ValueError, "codes must be in 0..3"),
        ("quantize_pack_codes", (codes.float().double(), 2, 2.0), TypeError, "x must be a float32"),
        ("quantize_pack_codes", (codes.float(), 2, -1.0), ValueError, "max_value must be finite and > 0"),
        # As quantize_to_codes: a max_value that float32 (x's type) rounds to 0 or to infinity.
        ("quantize_pack_codes", (codes.float(), 2, 1e-46), ValueError, "max_value=1e-46 rounds to 0 in float32"),
        ("quantize_pack_codes", (codes.float(), 2, 1e39), ValueError, "max_value=1e+39 rounds to infinity"),
        ("unpack_codes", (x, 64), ValueError, "64 channels need 1"),
        ("unpack_codes", (x.to(torch.int32), 70), TypeError, "packed must be an int64"),
        ("unpack_codes", (x[0], 70), ValueError, "packed must have shape [N, H, W, bit, words]"),
        ("pack_binary_weights", (torch.ones(2, 3, 3, dtype=torch.float32),), ValueError, "weight must have shape"),
        ("pack_binary_weights", (torch.ones(2, 3, 3, 3, dtype=torch.int64),), TypeError, "weight must be a floating"),
        ("packed_space_to_depth", (x, 70, 4), ValueError, "divisible by block=4"),
        ("packed_space_to_depth", (x, 70, 0), ValueError, "block must be >= 1"),
        ("packed_conv2d", (x, w, 64, [1, 1], [1, 1]), ValueError, "64 channels need 1"),
        ("packed_conv2d", (x, w[:, :, :, :1].contiguous(), 70, [1, 1], [1, 1]), ValueError, "w holds 1 words"),
        ("packed_conv2d", (x, w.float(), 70, [1, 1], [1, 1]), TypeError, "w must be an int64"),
        ("packed_conv2d", (x, w, 70, [0, 1], [1, 1]), ValueError, "stride must be two ints >= 1"),
        ("packed_conv2d", (x, w, 70, [1, 1], [-1, 1]), ValueError, "padding must be two ints >= 0"),
        ("packed_conv2d", (x[:, :1, :1], w, 70, [1, 1], [0, 0]), ValueError, "larger than the padded input"),
        ("packed_conv2d", (x, w_pad, 70, [1, 1], [1, 1]), ValueError, "bits set beyond in_channels=70"),
        ("packed_conv2d_affine", (x, w, 70, [1, 1], [1, 1], s.double(), b), TypeError, "scale must be a Float"),
        ("packed_conv2d_affine", (x, w, 70, [1, 1], [1, 1], s, b[:4]), ValueError, "bias must have shape [5]"),
        ("packed_conv2d_threshold", (x, w, 70, [1, 1], [1, 1], th, d, 3), ValueError, "thresholds must have shape [5, 7]"),
        ("packed_conv2d_threshold", (x, w, 70, [1, 1], [1, 1], th, d, 0), ValueError, "out_bit must be in 1..4"),
        ("packed_conv2d_threshold", (x, w, 70, [1, 1], [1, 1], th.long(), d, 2), TypeError, "thresholds must be an int32"),
        ("packed_conv2d_threshold", (x, w, 70, [1, 1], [1, 1], th_desc, d, 2), ValueError, "thresholds must ascend"),
        ("packed_conv2d_threshold", (x, w, 70, [1, 1], [1, 1], th, d * 2, 2), ValueError, "direction must hold +1 or -1"),
    ]


@pytest.mark.parametrize("name,args,exc,message", _bad_inputs(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_refused(name, args, exc, message):
    snapshot = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=_escape(message)):
        getattr(ops, name)(*args)
    for a, b in zip(args, snapshot):  # inputs untouched
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("max_value", [-1.0, 1e-46, 1e39])
def test_the_fake_quantize_pack_codes_refuses_the_max_values_the_kernel_refuses(max_value):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1, 3, 2, 2)
        with pytest.raises(ValueError, match=r"quantize_pack_codes: max_value"):
            ops.quantize_pack_codes(x, 2, max_value)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to pass a tensor of another device")
def test_cuda_tensor_is_refused():
    codes = torch.zeros(1, 3, 2, 2, dtype=torch.uint8, device="cuda")
    with pytest.raises((RuntimeError, NotImplementedError), match="CUDA"):
        ops.pack_codes(codes, 2)


# --------------------------------------------------------------------------
# Thresholds.


def _conv_bn_act(c_in, c_out, k, gammas, bit=2, max_value=2.0, weight_quantizer=None):
    kwargs = {} if weight_quantizer is None else {"weight_quantizer": weight_quantizer}
    conv = torch_ext.QuantConv2d(c_in, c_out, k, padding=k // 2, bias=False, **kwargs)
    bn = nn.BatchNorm2d(c_out, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(gammas)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(0.2, 3)
    return nn.Sequential(conv, bn, torch_ext.QuantActivation(bit, max_value))


@pytest.mark.parametrize("quantizer", ["mean", "channel_wise"])
@pytest.mark.parametrize("out_bit", [1, 2, 4])
def test_thresholds_negative_and_zero_batch_norm_scale(quantizer, out_bit):
    torch.manual_seed(out_bit)
    wq = (torch_ext.binary_mean_scaling_quantize if quantizer == "mean"
          else torch_ext.binary_channel_wise_mean_scaling_quantize)
    gammas = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.25, 2.0, -0.0, 0.1])
    block = _conv_bn_act(5, 8, 3, gammas, bit=out_bit, max_value=1.5, weight_quantizer=wq).eval()
    conv, bn, act = block
    scale = deploy.binary_weight(conv)
    assert scale is not None
    in_bit, in_max = 2, 2.0
    bound = 3 * 5 * 9
    step = in_max / 3

    def pipeline(acc):
        pre = (acc.double().view(1, -1) * (scale.double().view(-1, 1) * step)).float()
        return torch_ext.quantize_to_codes(bn(pre.unsqueeze(0).unsqueeze(-1))[0, :, :, 0], act.bit,
                                           act.max_value).long()

    thresholds, direction = deploy.fold_thresholds(pipeline, 8, bound, out_bit)
    assert direction[1] == -1 and direction[4] == -1 and direction[0] == 1
    acc = torch.arange(-bound, bound + 1)
    expected = pipeline(acc)  # [8, L]
    got = (direction.view(-1, 1, 1).long() * acc.view(1, -1, 1) >= thresholds.view(8, 1, -1).long()).sum(-1)
    assert torch.equal(got, expected)
    # Zero-scale channels are constant.
    assert expected[2].unique().numel() == 1 and expected[6].unique().numel() == 1

    # The whole block converted: a quantized input in front makes the conv packed.
    model = nn.Sequential(torch_ext.QuantActivation(in_bit, in_max), *block).eval()
    deployed = deploy.convert(model, torch.zeros(1, 5, 6, 6))
    # The model ends in a quantizer: its values come back as float.
    assert [type(s).__name__ for s in deployed.stages] == ["QuantizeStage", "PackedConvThresholdStage",
                                                           "CodesToFloatStage"]
    x = torch.randn(4, 5, 9, 7) * 2
    codes_in = torch_ext.quantize_to_codes(x, in_bit, in_max)
    acc = ops.packed_conv2d(ops.pack_codes(codes_in, in_bit), ops.pack_binary_weights(conv.weight), 5, [1, 1], [1, 1])
    # pipeline() maps accumulators to all 8 channels' codes; keep each channel's own.
    per_channel = acc.permute(1, 0, 2, 3).reshape(8, -1)
    codes_expected = torch.stack([pipeline(per_channel[o].long())[o] for o in range(8)])
    got = deployed.codes(x)["3"].permute(1, 0, 2, 3).reshape(8, -1).long()
    assert torch.equal(got, codes_expected)


# --------------------------------------------------------------------------
# Converted models against their source.


def _randomize_batch_norm(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 2 - 0.4)  # some negative
                m.bias.copy_(torch.rand(m.num_features, generator=gen))


def _model_cases():
    cases = []
    for first, last in itertools.product([False, True], repeat=2):
        cases.append(("lmnet", dict(quantize_first_convolution=first, quantize_last_convolution=last)))
        cases.append(("sample", dict(quantize_first_convolution=first, quantize_last_convolution=last)))
    cases.append(("lmnet", dict(weight_quantizer=torch_ext.binary_channel_wise_mean_scaling_quantize)))
    cases.append(("lmnet", dict(activation_quantizer_kwargs={"bit": 1, "max_value": 1.0})))
    cases.append(("lmnet", dict(activation_quantizer_kwargs={"bit": 3, "max_value": 4.0})))
    cases.append(("lmnet", dict(weight_quantizer=None)))
    cases.append(("sample", dict(activation_quantizer_kwargs={"bit": 4, "max_value": 2.0})))
    return cases


def _build(kind, kwargs, in_channels=3):
    cls = LmnetV1Quantize if kind == "lmnet" else SampleNetworkQuantize
    return cls(num_classes=10, in_channels=in_channels, **kwargs)


def _record(model, x):
    """Per QuantActivation: its input (pre-activation); per conv: its input and quantized weight."""
    acts, convs, hooks = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch_ext.QuantActivation):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: acts.__setitem__(name, i[0].clone())))
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: convs.__setitem__(name, i[0].clone())))
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return logits, acts, convs


def _pre_activation_error_bound(model, act_name, conv_inputs):
    """Per element, a bound on |float pre-activation - exact pre-activation| (Higham's summation bound).

    The block is conv -> bn -> act. A float sum of n terms is within
    (n - 1) u sum|terms| of the exact sum; batch norm's own few roundings add
    a few u of the magnitudes involved.
    """
    block_name = act_name.rsplit(".", 1)[0]
    block = model.get_submodule(block_name)
    conv, bn = block.conv, block.bn
    x = conv_inputs[block_name + ".conv"].double()
    w = conv.quantized_weight().detach().double() if isinstance(conv, torch_ext.QuantConv2d) else conv.weight.double()
    abs_sum = F.conv2d(x.abs(), w.abs(), padding=conv.padding)
    n_terms = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    u = 2.0**-24
    gain = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs().view(1, -1, 1, 1)
    mag = (abs_sum + bn.running_mean.double().abs().view(1, -1, 1, 1)) * gain + bn.bias.double().abs().view(1, -1, 1, 1)
    return (n_terms + 8) * u * mag


def _case_id(value):
    """A test id without memory addresses (functions by name), the same in every pytest process."""
    if isinstance(value, str):
        return value
    return str({k: getattr(v, "__name__", v) for k, v in value.items()})


@pytest.mark.parametrize("kind,kwargs", _model_cases(), ids=_case_id)
def test_converted_codes_and_logits_agree(kind, kwargs):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = _build(kind, kwargs)
    _randomize_batch_norm(model, gen)
    model.eval()
    deployed = deploy.convert(model)
    x = torch.rand(6, 3, 16, 24, generator=gen)
    _assert_codes_and_logits_agree(model, deployed, x)


def _assert_codes_and_logits_agree(model, deployed, x):
    logits, acts, convs = _record(model, x)
    codes = deployed.codes(x)
    assert sorted(codes) == sorted(acts)
    total = disagree = 0
    for name, pre in acts.items():
        act = model.get_submodule(name)
        max_value = act.fixed_max_value()  # the learned value too, where max_value is learned
        expected = torch_ext.quantize_to_codes(pre, act.bit, max_value)
        got = codes[name]
        assert got.dtype == torch.uint8 and got.shape == expected.shape
        diff = got.long() - expected.long()
        bad = diff != 0
        total += diff.numel()
        disagree += int(bad.sum())
        if not bad.any():
            continue
        # Every disagreement: one code apart, and the float pre-activation is
        # within the float rounding bound of the boundary between the two codes.
        assert diff.abs().max() == 1, name
        n = 2**act.bit - 1
        lower = torch.minimum(got, expected).long()[bad].double()
        boundary = (lower + 0.5) / n * max_value
        tol = _pre_activation_error_bound(model, name, convs)[bad]
        assert ((pre.double()[bad] - boundary).abs() <= tol).all(), name
    assert disagree <= total * 1e-3
    out = deployed(x)
    assert out.shape == logits.shape
    if disagree == 0:
        torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-5)


def test_user_composed_sequential_and_script_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16, eps=1e-3), torch_ext.QuantActivation(2, 2.0),
        torch_ext.QuantConv2d(16, 70, 3, stride=2, padding=1, bias=True), nn.ReLU(), nn.BatchNorm2d(70),
        torch_ext.QuantActivation(3, 3.0), SpaceToDepth(2),
        torch_ext.QuantConv2d(280, 24, 1, bias=True), nn.BatchNorm2d(24), nn.ReLU(), nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )
    _randomize_batch_norm(model, torch.Generator().manual_seed(1))
    model.eval()
    deployed = deploy.convert(model, torch.zeros(1, 2, 16, 16))
    kinds = [type(s).__name__ for s in deployed.stages]
    assert kinds == ["FloatStage", "QuantizeStage", "PackedConvThresholdStage", "PackedSpaceToDepthStage",
                     "PackedConvAffineStage", "FloatStage"]
    x = torch.rand(3, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)
    scripted = torch.jit.script(deployed)
    path = tmp_path / "deployed.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    assert torch.equal(loaded(x), deployed(x))
    got, want = loaded.codes(x), deployed.codes(x)
    assert sorted(got) == ["2", "6"] and all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------
# Refusals of the converter and of the deployed model.


def _refusal_cases():
    lm = LmnetV1Quantize()
    yield "training mode", lm.train(), "'conv1' .*training mode|'<model>' .*training mode"
    yield "bit 5", LmnetV1Quantize(activation_quantizer_kwargs={"bit": 5, "max_value": 2.0}).eval(), \
        r"'conv1.act' \(QuantActivation\): bit=5"
    yield "unknown module", nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid()).eval(), r"'1' \(Sigmoid\): unknown"

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.act = torch_ext.QuantActivation()

        def forward(self, x):
            return self.act(self.conv(x) + x)

    yield "not a chain", Residual().eval(), r"'act' \(QuantActivation\): its input is not the output"
    yield "float64", LmnetV1Quantize().double().eval(), "torch.float64"
    yield "untracked batch norm", nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval(), "no running statistics"


@pytest.mark.parametrize("label,model,message", list(_refusal_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_convert_refuses(label, model, message):
    with pytest.raises(ValueError, match=message):
        deploy.convert(model)


def test_deployed_refuses_bad_images():
    deployed = deploy.convert(SampleNetworkQuantize().eval())
    with pytest.raises(ValueError, match=r"images must have shape \[N, 3, H, W\]"):
        deployed(torch.rand(2, 1, 8, 8))
    with pytest.raises(TypeError, match="images must be float32"):
        deployed(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    lm = deploy.convert(LmnetV1Quantize().eval())
    with pytest.raises(ValueError, match="divisible by block"):
        lm(torch.rand(1, 3, 20, 20))


def test_tampered_saved_model(tmp_path):
    torch.manual_seed(0)
    deployed = deploy.convert(LmnetV1Quantize().eval())
    path = tmp_path / "model.pt"
    torch.jit.script(deployed).save(str(path))
    x = torch.rand(2, 3, 32, 32)
    # Truncated file: refused at load.
    data = path.read_bytes()
    broken = tmp_path / "truncated.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError):
        torch.jit.load(str(broken))
    # Edited tensors: refused when run, with the argument named.
    loaded = torch.jit.load(str(path))
    stage = getattr(loaded.stages, "2")  # conv2, a threshold stage
    with torch.no_grad():
        stage.thresholds.copy_(stage.thresholds.flip(1))
    with pytest.raises(Exception, match="thresholds must ascend"):
        loaded(x)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        getattr(loaded.stages, "2").direction.fill_(0)
    with pytest.raises(Exception, match="direction must hold"):
        loaded(x)
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        getattr(loaded.stages, "2").weight[..., -1] |= 1 << 40  # conv2 has 32 input channels: bit 40 is padding
    with pytest.raises(Exception, match="bits set beyond in_channels=32"):
        loaded(x)


@pytest.mark.parametrize("kwargs", [{}, {"quantize_last_convolution": False}, {"quantize_last_convolution": True}])
def test_weights_are_25x_smaller_than_float(kwargs):
    from torch_ext.deploy.__main__ import float_weight_bytes

    model = LmnetV1Quantize(**kwargs).eval()
    deployed = deploy.convert(model)
    assert float_weight_bytes(model) >= 25 * deployed.weight_bytes()


# --------------------------------------------------------------------------
# A trained model on the digits test set.


def _train_digits(model, splits, epochs, gen):
    images, labels = splits.train.images, splits.train.labels
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(labels.numel(), generator=gen)
        for i in range(0, labels.numel(), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
    # Blueoil's batch norm momentum (0.01) needs far more steps than this to
    # settle: recompute the running statistics as plain averages instead.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for i in range(0, labels.numel(), 256):
            model(images[i:i + 256])
    return model.eval()


@pytest.mark.slow
def test_digits_trained_model_predictions_agree(one_thread):
    from torch_ext.data import load_digits

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    splits = load_digits(16)
    model = LmnetV1Quantize(num_classes=10, in_channels=1, dropout=0.0)
    _train_digits(model, splits, 4, gen)
    images, labels = splits.test.images, splits.test.labels
    deployed = deploy.convert(model, image_size=16)
    with torch.no_grad():
        want = model(images).argmax(1)
    got = deployed(images).argmax(1)
    acc_model = (want == labels).double().mean().item()
    acc_deployed = (got == labels).double().mean().item()
    agree = (got == want).double().mean().item()
    print(f"digits: model accuracy {acc_model:.4f}, deployed {acc_deployed:.4f}, agreement {agree:.4f}")
    assert acc_model > 0.5, acc_model  # the model did learn
    assert agree >= 0.999, agree
    assert abs(acc_model - acc_deployed) <= 0.001


# --------------------------------------------------------------------------
# python -m torch_ext.deploy (its benchmark, benchmarks/bench_deploy.py, is tested in tests/test_bench.py)


@pytest.mark.slow
def test_deploy_command_converts_a_training_checkpoint(tmp_path):
    from torch_ext import train
    from torch_ext.deploy.__main__ import cli, main

    run = tmp_path / "run"
    train.main(["--model", "lmnet_v1_quantize", "--image-size", "8", "--batch-size", "64", "--no-progress",
                "--device", "cpu", "--threads", "1", "--epochs", "1", "--out", str(run)])
    out = tmp_path / "model.pt2"
    result = main([str(run / "checkpoint.pt"), "--out", str(out), "--eval"])
    assert out.is_file() and result["format"] == "aoti"
    assert result["images"] == 360
    assert result["agreement"] >= 0.99
    assert abs(result["deployed_accuracy"] - result["pytorch_accuracy"]) <= 0.01
    assert result["float_weight_bytes"] >= 25 * result["weight_bytes"]
    # The package runs in a fresh process that only imports torch_ext.
    code = ("import torch, torch_ext; from torch_ext.deploy import package; m = package.load(%r); "
            "print(tuple(m(torch.rand(2, 1, 8, 8)).shape))" % str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert "(2, 10)" in proc.stdout
    # The other formats, each evaluated and timed from the file it wrote.
    for fmt, name in (("exported", "model_ep.pt2"), ("torchscript", "model.pt")):
        other = main([str(run / "checkpoint.pt"), "--out", str(tmp_path / name), "--format", fmt, "--eval",
                      "--speed-against", str(run / "checkpoint.pt")])
        assert other["format"] == fmt and other["agreement"] >= 0.99
        assert f"deployed ({fmt})" in other["ms_per_image"]
    # Errors: a clear message and exit status 2.
    assert cli([str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert cli([str(garbage), "--out", str(out)]) == 2


def test_inplace_quantizers_channels_last_and_clip_only():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), torch_ext.QuantActivation(2, 2.0, inplace=True),
        torch_ext.QuantConv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        torch_ext.QuantActivation(2, 2.0, inplace=True), nn.Flatten(),
    )
    _randomize_batch_norm(model, torch.Generator().manual_seed(3))
    model.eval()
    deployed = deploy.convert(model, torch.zeros(1, 3, 6, 6))
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x.clone())
    got = deployed(x.to(memory_format=torch.channels_last))
    assert torch.equal(got, want)
    clip_only = nn.Sequential(nn.Conv2d(3, 8, 3), torch_ext.QuantActivation(32, 2.0)).eval()
    with pytest.raises(ValueError, match=r"'1' \(QuantActivation\): bit=32"):
        deploy.convert(clip_only)


@settings(max_examples=40)
@given(
    gamma=hst.floats(-3, 3), beta=hst.floats(-2, 2), mean=hst.floats(-5, 5), var=hst.floats(0.01, 4),
    scale=hst.floats(0, 2), out_bit=hst.integers(1, 4), max_value=hst.floats(0.25, 6), bound=hst.integers(1, 300),
    relu=hst.booleans(),
)
def test_fold_thresholds_property(gamma, beta, mean, var, scale, out_bit, max_value, bound, relu):
    """The thresholds reproduce conv scale -> batch norm (-> ReLU) -> quantizer on every accumulator."""
    bn = nn.BatchNorm2d(2, eps=1e-3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([gamma, -gamma]))
        bn.bias.fill_(beta)
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
    modules = [bn] + ([nn.ReLU()] if relu else [])
    s = torch.tensor([scale, scale / 2], dtype=torch.float64)

    def pipeline(acc):
        y = (acc.double().view(1, -1) * s.view(-1, 1) * (2.0 / 3.0)).float().unsqueeze(0).unsqueeze(-1)
        with torch.no_grad():
            for m in modules:
                y = m(y)
        return torch_ext.quantize_to_codes(y[0, :, :, 0], out_bit, max_value).long()

    thresholds, direction = deploy.fold_thresholds(pipeline, 2, bound, out_bit)
    acc = torch.arange(-bound, bound + 1)
    got = (direction.view(-1, 1, 1).long() * acc.view(1, -1, 1) >= thresholds.view(2, 1, -1).long()).sum(-1)
    assert torch.equal(got, pipeline(acc))


@pytest.mark.parametrize("mode", ["pact", "lsq"])
def test_learned_max_value_converts_with_the_value_it_learned(mode):
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = LmnetV1Quantize(activation_quantizer_kwargs={"bit": 2, "max_value": 2.0, "learn_max_value": mode})
    _randomize_batch_norm(model, gen)
    with torch.no_grad():
        for i, act in enumerate(m for m in model.modules() if isinstance(m, torch_ext.QuantActivation)):
            act.max_value.fill_(1.5 + 0.25 * i)  # as if trained: a different clip in each layer
    model.eval()
    _assert_codes_and_logits_agree(model, deploy.convert(model), torch.rand(6, 3, 16, 24, generator=gen))
