"""The registered weight-quantizer operators (csrc/ops/weight_quantization.cpp, kernels in csrc/composite/).

``torch.ops.torch_ext.binary_mean_scaling_quantize`` and
``binary_channel_wise_mean_scaling_quantize`` against the Python quantizers of
torch_ext/weight_quantization.py and docs/quantizer.md's formula: values and
gradients bit for bit, layouts, refusals with the same wording, opcheck,
torch.compile(fullgraph=True) and TorchScript.
"""

import re

import pytest
import torch

import torch_ext  # noqa: F401  (registers the operators)
from torch_ext.weight_quantization import (
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
)

ops = torch.ops.torch_ext
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
#: "cuda" is collected everywhere, skipped without a GPU (the operators are
#: composites of ATen ops: a visible GPU is all they need); marked cuda by
#: tests/conftest.py for scripts/gpu_check.sh.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible "
                                                  "(torch.cuda.is_available() is False)")),
]
# (operator, Python reference, name)
PAIRS = [
    (ops.binary_mean_scaling_quantize, binary_mean_scaling_quantize, "binary_mean_scaling_quantize"),
    (
        ops.binary_channel_wise_mean_scaling_quantize,
        binary_channel_wise_mean_scaling_quantize,
        "binary_channel_wise_mean_scaling_quantize",
    ),
]
PAIR_IDS = [p[2] for p in PAIRS]


def _weight(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    w.view(-1)[::7] = 0.0  # exact zeros map to +scale
    return w.to(dtype=dtype, device=device)


def _formula(w, channel_wise):
    """docs/quantizer.md with ATen ops: where(w >= 0, 1, -1) * mean(|w|)."""
    if not channel_wise:
        scale = w.abs().mean()
    elif w.dim() == 1:
        scale = w.abs()
    else:
        scale = w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
    return torch.where(w >= 0, 1, -1).to(w.dtype) * scale


def _bits(t):
    return t.contiguous().view(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (10, 64, 1, 1), (7,), (5, 3), (1, 1, 1, 1), (64, 32, 3, 3)])
@pytest.mark.parametrize("op,python,name", PAIRS, ids=PAIR_IDS)
def test_op_is_the_python_quantizer_bit_for_bit(op, python, name, shape, dtype, device):
    w = _weight(shape, dtype, device)
    y = op(w)
    assert y.shape == w.shape and y.dtype == w.dtype and y.device == w.device
    assert torch.equal(_bits(y), _bits(python(w)))
    assert torch.equal(_bits(y), _bits(_formula(w, "channel" in name)))
    assert not torch.signbit(y[w == 0]).any()  # +scale, never -scale (nor -0.0)


@pytest.mark.parametrize("op,python,name", PAIRS, ids=PAIR_IDS)
def test_op_keeps_layout_and_scale_of_channels_last_and_strided(op, python, name):
    w = _weight((32, 16, 3, 3))
    cl = w.contiguous(memory_format=torch.channels_last)
    y = op(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_bits(y), _bits(op(w)))
    assert torch.equal(_bits(y), _bits(python(cl)))
    strided = _weight((32, 16, 3, 6))[..., ::2]
    assert torch.equal(_bits(op(strided)), _bits(python(strided)))


@pytest.mark.parametrize("op,python,name", PAIRS, ids=PAIR_IDS)
def test_op_gradient_is_straight_through(op, python, name):
    w = _weight((8, 4, 3, 3), torch.float64).requires_grad_()
    grad_y = torch.randn(w.shape, dtype=torch.float64)
    grad_y.view(-1)[0] = float("inf")  # passed through unmasked
    (g_op,) = torch.autograd.grad(op(w), w, grad_y)
    (g_py,) = torch.autograd.grad(python(w), w, grad_y)
    assert torch.equal(g_op, grad_y) and torch.equal(g_op, g_py)


@pytest.mark.parametrize("op,python,name", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_op_refuses_what_python_refuses_with_the_same_words(op, python, name, dtype):
    w = torch.ones((2, 3), dtype=dtype)
    with pytest.raises(TypeError) as from_python:
        python(w)
    with pytest.raises(TypeError, match=re.escape(str(from_python.value))):
        op(w)
    assert f"got dtype={dtype}" in str(from_python.value)


def test_channel_wise_op_refuses_a_0_dim_w_with_python_words():
    w = torch.tensor(1.5)
    with pytest.raises(ValueError) as from_python:
        binary_channel_wise_mean_scaling_quantize(w)
    with pytest.raises(ValueError, match=re.escape(str(from_python.value))):
        ops.binary_channel_wise_mean_scaling_quantize(w)
    # A 0-dim w is fine for the whole-tensor quantizer.
    assert ops.binary_mean_scaling_quantize(w).item() == 1.5


OPCHECK_SAMPLES = [
    ("float32", _weight((6, 4, 3, 3))),
    ("float64", _weight((6, 4, 3, 3), torch.float64)),
    ("float16", _weight((5, 3), torch.float16)),
    ("bfloat16", _weight((7,), torch.bfloat16)),
    ("channels_last", _weight((4, 3, 2, 2)).contiguous(memory_format=torch.channels_last)),
    ("transposed", _weight((6, 5)).t()),
    ("empty", torch.empty((0, 3))),
]


@pytest.mark.parametrize("name,w", OPCHECK_SAMPLES, ids=[s[0] for s in OPCHECK_SAMPLES])
@pytest.mark.parametrize("op", [p[0] for p in PAIRS], ids=PAIR_IDS)
def test_opcheck(op, name, w):
    torch.library.opcheck(op.default, (w,))
    torch.library.opcheck(op.default, (w.clone().requires_grad_(),))


@pytest.mark.parametrize("op,python,name", PAIRS, ids=PAIR_IDS)
def test_compile_fullgraph_matches_eager(op, python, name):
    torch._dynamo.reset()
    w = _weight((8, 4, 3, 3)).requires_grad_()

    def f(t):
        return (op(t) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), f(w))
    (g_c,) = torch.autograd.grad(compiled(w), w)
    (g_e,) = torch.autograd.grad(f(w), w)
    assert torch.equal(g_c, g_e)
    # Tracing refuses what eager refuses.
    with pytest.raises(Exception, match="w must have a floating dtype"):
        torch.compile(lambda t: op(t), fullgraph=True, backend="aot_eager")(torch.ones(3, dtype=torch.int64))


def test_torchscript_records_the_ops():
    @torch.jit.script
    def quantize_both(w: torch.Tensor) -> torch.Tensor:
        return torch.ops.torch_ext.binary_mean_scaling_quantize(w) + torch.ops.torch_ext.binary_channel_wise_mean_scaling_quantize(w)

    graph = str(quantize_both.graph)
    assert "torch_ext::binary_mean_scaling_quantize" in graph
    assert "torch_ext::binary_channel_wise_mean_scaling_quantize" in graph
    w = _weight((4, 3, 3, 3))
    assert torch.equal(quantize_both(w), binary_mean_scaling_quantize(w) + binary_channel_wise_mean_scaling_quantize(w))
