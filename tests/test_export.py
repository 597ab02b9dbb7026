"""The ecosystem routes: torch.export, torch.compile (a whole training step),
TorchScript, and ONNX export run in onnxruntime (torch_ext/export.py).

Inputs are kept small (LMNet on 16x16 or 32x32 images) so the file runs in
about a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import inspect
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_SKIP_REASON, HAS_CUDA, assert_bit_exact, tie_values
from torch import nn

import torch_ext
from torch_ext.models import LmnetV1Quantize, SampleNetworkQuantize
from torch_ext.weight_quantization import binary_channel_wise_mean_scaling_quantize


def _lmnet(seed: int = 0, **kwargs) -> LmnetV1Quantize:
    """An LMNet with batch-norm statistics that spread activations over all levels."""
    torch.manual_seed(seed)
    model = LmnetV1Quantize(**kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


# --------------------------------------------------------------------------
# torch.export


def test_torch_export_lmnet_eval_matches_eager():
    model = _lmnet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert "torch_ext.linear_mid_tread_half_quantize.default" in ops
        expected = model(x)
        assert_bit_exact(ep.module()(x), expected)
        # The saved program loads and runs too (the fake kernel is registered with torch_ext).
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf)
        assert_bit_exact(loaded.module()(x), expected)
        x2 = torch.randn(2, 3, 32, 32)
        assert_bit_exact(loaded.module()(x2), model(x2))


# --------------------------------------------------------------------------
# torch.compile: a whole training step


def _train_step_eager(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _compiled_train_step(model, opt, backend):
    """forward + loss (AOTAutograd also compiles their backward) and the optimizer step,
    each one graph under torch.compile(fullgraph=True).

    torch.optim's ``step`` wrapper calls ``torch._dynamo.graph_break()`` on
    purpose (and Dynamo refuses an optimizer step in the graph that computed
    the gradients), so the step compiled is the unwrapped ``step`` under
    ``no_grad``, which is what the wrapper runs for a non-differentiable
    optimizer.
    """
    forward = torch.compile(lambda x, y: F.cross_entropy(model(x), y), fullgraph=True, backend=backend)
    raw_step = inspect.unwrap(type(opt).step)
    opt_step = torch.compile(lambda: raw_step(opt), fullgraph=True, backend=backend)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = forward(x, y)
        loss.backward()
        with torch.no_grad():
            opt_step()
        return loss.detach()

    return step


def _check_compiled_training(device, backend, steps, rtol, atol):
    torch._dynamo.reset()
    eager = _lmnet().to(device).train()
    compiled_model = copy.deepcopy(eager)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    opt_e, opt_c = sgd(eager), sgd(compiled_model)
    step_c = _compiled_train_step(compiled_model, opt_c, backend)
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(2, 3, 16, 16, generator=gen).to(device)
        y = torch.randint(0, 10, (2,), generator=gen).to(device)
        torch.manual_seed(100 + i)  # the same dropout mask in both
        loss_e = _train_step_eager(eager, opt_e, x, y)
        torch.manual_seed(100 + i)
        loss_c = step_c(x, y)
        torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol, msg=lambda m: f"loss, step {i}: {m}")
        for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"{name}, step {i}: {m}")
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(opt_c.state[q]["momentum_buffer"], opt_e.state[p]["momentum_buffer"],
                                       rtol=rtol, atol=atol, msg=lambda m: f"momentum of {name}, step {i}: {m}")


def test_compiled_training_step_matches_eager_cpu():
    # backend="aot_eager": Dynamo + AOTAutograd (forward/backward graphs,
    # functionalized optimizer) running eager kernels. Inductor's C++ compile of
    # this step takes ~110 s on the 2-core CI machine; the CUDA test uses inductor.
    # Same kernels, so equal to the bit; dropout included (same RNG stream).
    _check_compiled_training("cpu", "aot_eager", steps=2, rtol=0.0, atol=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)
def test_compiled_training_step_matches_eager_cuda_inductor():
    # Inductor fuses and reorders float sums, and its RNG differs from eager's:
    # no dropout, one step, compared within float tolerance.
    torch._dynamo.reset()
    eager = _lmnet(dropout=0.0).cuda().train()
    compiled_model = copy.deepcopy(eager)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    step_c = _compiled_train_step(compiled_model, opt_c, "inductor")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    loss_e = _train_step_eager(eager, opt_e, x, y)
    loss_c = step_c(x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------
# TorchScript


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        return torch.jit.script(model)


def test_torchscript_model_with_quant_activation_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        torch_ext.QuantActivation(3, 1.5),
        nn.Conv2d(8, 8, 1),
        torch_ext.QuantActivation(2, 2.0, inplace=True),
        torch_ext.QuantActivation(32, 1.0),
    )
    scripted = _script(model)
    assert "ops.torch_ext.linear_mid_tread_half_quantize(" in getattr(scripted, "2").code
    x = torch.randn(2, 3, 8, 8) * 2
    for train in (True, False):
        model.train(train)
        scripted.train(train)
        xe, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, ys = model(xe), scripted(xs)
        assert_bit_exact(ys, ye, f"train={train}")
        g = torch.randn_like(ye)
        ye.backward(g)
        ys.backward(g)
        assert_bit_exact(xs.grad, xe.grad, f"grad, train={train}")
        for pe, ps in zip(model.parameters(), scripted.parameters()):
            assert_bit_exact(ps.grad, pe.grad)
    # Saved and loaded (what a LibTorch program does with torch::jit::load).
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf).eval()
    model.eval()
    with torch.no_grad():
        assert_bit_exact(loaded(x), model(x))


def test_torchscript_sample_network_matches_eager():
    model = SampleNetworkQuantize(weight_quantizer=None).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_bit_exact(_script(model)(x), model(x))


def test_torchscript_refuses_custom_backward_clearly():
    def my_backward(grad_y, x, bit, max_value):
        return grad_y

    model = nn.Sequential(nn.Identity(), torch_ext.QuantActivation(2, 2.0, backward=my_backward))
    with pytest.raises(RuntimeError, match=r"QuantActivation\(backward=.*my_backward\) cannot be scripted"):
        _script(model)
    # Eager still uses it.
    x = torch.tensor([5.0, -1.0], requires_grad=True)
    model(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


def test_quant_activation_repr_and_inplace_unchanged():
    assert repr(torch_ext.QuantActivation()) == "QuantActivation(bit=2, max_value=2.0)"
    q = torch_ext.QuantActivation(3, 1.5, inplace=True)
    x = torch.tensor([0.3, 2.0, -1.0])
    assert q(x) is x
    assert_bit_exact(x, torch_ext.linear_mid_tread_half_quantize(torch.tensor([0.3, 2.0, -1.0]), 3, 1.5))


# --------------------------------------------------------------------------
# ONNX

from torch_ext.export import export_onnx, run_onnx  # noqa: E402  (imports onnx lazily)


@pytest.fixture
def onnx():
    """The onnx module; skips the test where onnx, onnxscript or onnxruntime is missing."""
    why = "ONNX export tests need onnx, onnxscript and onnxruntime (pip install onnx onnxscript onnxruntime)"
    module = pytest.importorskip("onnx", reason=why)
    pytest.importorskip("onnxscript", reason=why)
    pytest.importorskip("onnxruntime", reason=why)
    return module

#: (bit, max_value) of the quantizer export test: every branch of the formula.
ONNX_CONFIGS = ((1, 2.0), (2, 2.0), (3, 1.5), (4, 0.1), (8, 6.0), (16, 3.7), (32, 2.0))
ONNX_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _Quantizers(nn.Module):
    """One quantizer per (bit, max_value) for each input; every other one in place;
    plus the in-place function on a slice (a view) of a tensor."""

    def __init__(self):
        super().__init__()
        self.qs = nn.ModuleList(
            torch_ext.QuantActivation(bit, m, inplace=i % 2 == 1) for i, (bit, m) in enumerate(ONNX_CONFIGS)
        )

    def forward(self, *xs):
        outs = [q(x.clone()) for x in xs for q in self.qs]
        y = xs[0].clone()
        torch_ext.linear_mid_tread_half_quantize_(y[1:-1], 2, 1.0)
        return tuple(outs) + (y,)


def test_onnx_quantizer_bit_identical_to_pytorch(tmp_path, onnx):
    inputs = tuple(
        torch.cat([tie_values(dtype, bit, m, max_k=128) for bit, m in ONNX_CONFIGS]) for dtype in ONNX_DTYPES
    )
    model = _Quantizers()
    path = tmp_path / "quantizers.onnx"
    export_onnx(model, inputs, path)

    graph = onnx.load(str(path)).graph
    op_types = {node.op_type for node in graph.node}
    assert {"Where", "Div", "Mul", "Add", "Floor", "Cast"} <= op_types
    assert not any(node.domain not in ("", "ai.onnx") for node in graph.node), "only standard ONNX operators"

    outputs = run_onnx(path, *inputs)
    expected = model(*inputs)
    assert len(outputs) == len(expected) == len(ONNX_DTYPES) * len(ONNX_CONFIGS) + 1
    for i, (out, ref) in enumerate(zip(outputs[:-1], expected[:-1])):
        dtype, (bit, m) = ONNX_DTYPES[i // len(ONNX_CONFIGS)], ONNX_CONFIGS[i % len(ONNX_CONFIGS)]
        assert_bit_exact(out, ref, f"{dtype} bit={bit} max_value={m}")  # NaN payloads included
    assert_bit_exact(outputs[-1], expected[-1], "in-place on a slice")


def test_onnx_lmnet_matches_pytorch_dynamic_batch(tmp_path, onnx):
    model = _lmnet().train()  # exported in eval mode all the same
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "lmnet.onnx"
    export_onnx(model, x, path, dynamic_batch=True)
    # The model itself is left as it was.
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))
    assert model.conv2.conv.weight_quantizer is not None

    graph = onnx.load(str(path)).graph
    op_types = [node.op_type for node in graph.node]
    assert op_types.count("Floor") == 5  # the five activation quantizers (conv1..conv5)
    model.eval()
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 32, 32)
        (logits,) = run_onnx(path, xb)
        with torch.no_grad():
            expected = model(xb)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(logits.argmax(1), expected.argmax(1))

    # A wrong input shape for the exported model: a clear error naming the input.
    bad_shape = r"run_onnx: input 'x' must have shape \[batch, 3, 32, 32\], got shape \[2, 1, 32, 32\]"
    with pytest.raises(ValueError, match=bad_shape):
        run_onnx(path, torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"must have dtype torch.float32, got dtype torch.float64"):
        run_onnx(path, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"takes 1 input\(s\) \(x\), got 2"):
        run_onnx(path, x, x)


def test_onnx_weight_quantizer_expressed_unfolded(tmp_path, onnx):
    torch.manual_seed(0)
    model = SampleNetworkQuantize(weight_quantizer=binary_channel_wise_mean_scaling_quantize).eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "sample.onnx"
    export_onnx(model, x, path, fold_weights=False)
    (logits,) = run_onnx(path, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)


def test_export_trained_model_for_the_training_command(tmp_path, onnx):
    from torch_ext.export import export_trained_model

    torch.manual_seed(0)
    model = SampleNetworkQuantize(num_classes=4, in_channels=1).eval()
    path = tmp_path / "trained.onnx"
    export_trained_model(model, path, in_channels=1, image_size=16)
    x = torch.rand(3, 1, 16, 16)  # any batch size
    (logits,) = run_onnx(path, x)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 1, 32, 32), r"expected input\[1, 1, 32, 32\] to have 3 channels"),
        ((1, 3, 30, 30), r"H and W divisible by 8"),
        ((3, 32, 32), r"expected input \[N, C, H, W\]"),
    ],
)
def test_onnx_export_refuses_bad_input_shape_clearly(tmp_path, onnx, shape, message):
    model = LmnetV1Quantize().eval()
    path = tmp_path / "bad.onnx"
    with pytest.raises(ValueError, match=r"export_onnx: LmnetV1Quantize cannot run on the example input\(s\) "
                                         r"\[" + ", ".join(map(str, shape)) + r"\] float32: .*" + message):
        export_onnx(model, torch.randn(*shape), path)
    assert not path.exists()


def test_onnx_export_refuses_bad_arguments(tmp_path, onnx):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        export_onnx(lambda x: x, torch.ones(1), tmp_path / "f.onnx")
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a sequence of tensors"):
        export_onnx(nn.Identity(), [1.0], tmp_path / "f.onnx")


def test_training_command_exports_onnx(onnx, tmp_path):
    """python -m torch_ext.train --export-onnx: the trained model runs in onnxruntime like in PyTorch."""
    from torch_ext import train

    path = tmp_path / "lmnet.onnx"
    result = train.main(["--model", "lmnet_v1_quantize", "--image-size", "8", "--batch-size", "64", "--epochs", "1",
                         "--no-progress", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "run"),
                         "--export-onnx", str(path)])
    assert path.exists()
    model = result["module"].eval()
    x = torch.rand(3, 1, 8, 8)
    (logits,) = run_onnx(path, x)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
