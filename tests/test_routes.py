"""The wider PyTorch toolbox: FX symbolic tracing and torch.func transforms.

Every route gives the same values as eager PyTorch, and gradients equal to
eager autograd bit for bit.
"""

import pytest
import torch
from torch import nn

import torch_ext
from torch_ext import QuantActivation, QuantConv2d, models
from torch_ext.weight_quantization import (
    TTQWeightQuantizer,
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    twn_weight_quantize,
)

DTYPES = [torch.float32, torch.float64]


def _inputs(dtype=torch.float32, shape=(3, 5)):
    # Values on both sides of 0 and max_value = 2, so the mask has both kinds of entries.
    return (torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 1).to(dtype)


def _eager_grad(fn, x, grad_y=None):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y) if grad_y is None else grad_y)
    return g


def _twice(grad_y, x, bit, max_value):  # a custom backward, in tensor operations
    return 2 * grad_y * (x > 0)


# ---------------------------------------------------------------- FX


def test_fx_traces_quant_activation_as_one_operator_call():
    for inplace in (False, True):
        module = QuantActivation(bit=3, max_value=1.5, inplace=inplace)
        gm = torch.fx.symbolic_trace(module)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        op = torch.ops.torch_ext.linear_mid_tread_half_quantize_ if inplace else \
            torch.ops.torch_ext.linear_mid_tread_half_quantize
        assert targets == [op], gm.graph
        x = _inputs()
        assert torch.equal(gm(x.clone()), module(x.clone()))


def test_fx_refuses_a_python_backward_clearly():
    with pytest.raises(TypeError, match="backward= cannot be recorded by FX tracing"):
        torch.fx.symbolic_trace(QuantActivation(backward=_twice))


@pytest.mark.parametrize("quantizer", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize,
                                       twn_weight_quantize, TTQWeightQuantizer])
def test_fx_traces_quant_conv_with_the_weight_quantizer_as_a_leaf(quantizer):
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, weight_quantizer=quantizer)
    gm = torch.fx.symbolic_trace(conv)
    functions = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"}
    name = "ttq_weight_quantize" if quantizer is TTQWeightQuantizer else quantizer.__name__
    assert name in functions, gm.graph
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(gm(x), conv(x))


@pytest.mark.parametrize("name", models.list_models())
def test_fx_traces_every_model(name):
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=5, in_channels=3).eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(gm(x), model(x))
    # The input check is kept in the graph and still refuses a bad shape.
    if getattr(model, "input_size_multiple", 1) > 1:
        with pytest.raises(ValueError, match="divisible by 8"):
            gm(torch.randn(1, 3, 12, 12))


def test_create_feature_extractor_returns_the_layer_output():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    model = models.LmnetV1Quantize().eval()
    extractor = feature_extraction.create_feature_extractor(model, {"conv2.act": "c2", "conv7": "logits_map"})
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    hook = model.conv2.act.register_forward_hook(lambda m, i, o: seen.setdefault("c2", o))
    model(x)
    hook.remove()
    out = extractor(x)
    assert torch.equal(out["c2"], seen["c2"])
    assert out["logits_map"].shape == (2, 10, 4, 4)


# ---------------------------------------------------------------- torch.func


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_func_grad_vjp_jacrev_jvp_equal_eager_autograd(dtype, inplace):
    x = _inputs(dtype)
    module = QuantActivation(bit=2, max_value=2.0, inplace=inplace)

    def f(t):
        return module(t * 1)  # a non-leaf, so the in-place module may write into it

    eager = _eager_grad(f, x)
    assert torch.equal(torch.func.grad(lambda t: f(t).sum())(x), eager)
    y, vjp = torch.func.vjp(f, x)
    assert torch.equal(y, f(x)) and torch.equal(vjp(torch.ones_like(y))[0], eager)
    jac = torch.func.jacrev(f)(x.flatten()).reshape(x.numel(), x.numel())
    assert torch.equal(jac, torch.diag(eager.flatten()))
    _, tangent = torch.func.jvp(f, (x,), (torch.ones_like(x),))
    assert torch.equal(tangent, eager)


def test_func_with_a_custom_backward():
    x = _inputs(torch.float64)
    module = QuantActivation(backward=_twice)
    assert torch.equal(torch.func.grad(lambda t: module(t).sum())(x), _eager_grad(module, x))
    assert torch.equal(torch.func.grad(lambda t: module(t).sum())(x), 2.0 * (x > 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_of_the_operator_and_of_grad(dtype):
    x = _inputs(dtype, (4, 3, 5))
    batched = torch.vmap(torch_ext.linear_mid_tread_half_quantize)(x)
    assert torch.equal(batched, torch_ext.linear_mid_tread_half_quantize(x))
    per_sample = torch.vmap(torch.func.grad(lambda t: torch_ext.linear_mid_tread_half_quantize(t).sum()))(x)
    assert torch.equal(per_sample, _eager_grad(torch_ext.linear_mid_tread_half_quantize, x))


@pytest.mark.parametrize("quantizer", [binary_mean_scaling_quantize, binary_channel_wise_mean_scaling_quantize,
                                       twn_weight_quantize])
def test_func_on_the_weight_quantizers(quantizer):
    w = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    ws = torch.randn(3, 5, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.vmap(quantizer)(ws), torch.stack([quantizer(v) for v in ws]))
    grad_y = torch.randn_like(w)
    assert torch.equal(torch.func.vjp(quantizer, w)[1](grad_y)[0], _eager_grad(quantizer, w, grad_y))


def test_per_sample_gradients_of_a_quantized_model_equal_a_loop():
    # Differential privacy's per-sample gradients: vmap(grad) over a batch, against one backward per sample.
    torch.manual_seed(0)
    model = models.SampleNetworkQuantize(num_classes=3, in_channels=2).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    images = torch.randn(4, 2, 8, 8)
    labels = torch.tensor([0, 1, 2, 1])

    def loss(p, image, label):
        logits = torch.func.functional_call(model, (p, buffers), (image[None],))
        return nn.functional.cross_entropy(logits, label[None])

    batched = torch.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    for i in range(len(images)):
        model.zero_grad()
        nn.functional.cross_entropy(model(images[i : i + 1]), labels[i : i + 1]).backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(batched[name][i], param.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- TorchScript and jit.trace


def _node_kinds(block) -> set:
    """Every node kind of a TorchScript graph, inside if/loop blocks too."""
    kinds = set()
    for node in block.nodes():
        kinds.add(node.kind())
        for inner in node.blocks():
            kinds |= _node_kinds(inner)
    return kinds


@pytest.mark.parametrize("name", ["lmnet_v1_quantize", "sample_network_quantize", "lmnet_v1", "sample_network"])
@pytest.mark.parametrize("route", ["script", "trace"])
def test_torchscript_of_whole_models_records_only_registered_ops(name, route, tmp_path):
    import io

    torch.manual_seed(0)
    kwargs = {"weight_quantizer": "binary_channel_wise_mean_scaling"} if name == "lmnet_v1_quantize" else {}
    model = models.get_model(name, num_classes=4, in_channels=3, **kwargs).eval()
    x = torch.randn(2, 3, 16, 16)
    scripted = torch.jit.script(model) if route == "script" else torch.jit.trace(model, x)
    kinds = _node_kinds(scripted.inlined_graph)
    assert not any("Python" in k for k in kinds), sorted(kinds)
    if name.endswith("_quantize"):
        assert any(k.startswith("torch_ext::") and "scaling_quantize" in k for k in kinds), sorted(kinds)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert torch.equal(loaded(x), model(x))
    if route == "script" and name.startswith("lmnet"):  # the scripted model still checks its input
        with pytest.raises(Exception, match="divisible by 8"):
            loaded(torch.randn(1, 3, 12, 12))


def test_torchscript_refuses_a_python_weight_quantizer_at_run_time():
    conv = QuantConv2d(3, 4, 3, weight_quantizer=twn_weight_quantize)
    scripted = torch.jit.script(conv)
    with pytest.raises(Exception, match="only the binary weight quantizers"):
        scripted(torch.randn(1, 3, 5, 5))
