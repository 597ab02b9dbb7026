"""Deployed and trained models through torch.export and AOTInductor (torch_ext.deploy.package, export_aoti).

The deployed (bit-packed) model and every registry model export with the
batch size symbolic, and give eager's logits (and, for the deployed model,
its codes) bit for bit at two batch sizes; the AOTInductor package of the
deployed model does too, loaded back from its file; a damaged file is
refused with one line; the command writes each format.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import torch_ext
from torch_ext import deploy
from torch_ext.deploy import package
from torch_ext.models import LmnetV1Quantize, get_model, list_models


def _with_drawn_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in eval mode, its batch-norm statistics drawn so that every code occurs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _lmnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _with_drawn_batch_norms(LmnetV1Quantize(num_classes=10, in_channels=3), seed)


#: The tolerance of float outputs of an AOTInductor package against eager
#: (docs/deploy.md): Inductor fuses and orders the float layers' sums its own
#: way (the deployed model's last mean, a trained model's batch norms); the
#: integer codes are bit for bit.
LOGITS_RTOL, LOGITS_ATOL = 1e-5, 1e-6


def _assert_outputs_equal(got, want, what: str, exact_floats: bool = True) -> None:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: output {i}: {g.dtype}{tuple(g.shape)}"
        if g.is_floating_point() and not exact_floats:
            torch.testing.assert_close(g, w, rtol=LOGITS_RTOL, atol=LOGITS_ATOL, msg=f"{what}: output {i}")
        else:
            assert torch.equal(g, w), f"{what}: output {i} differs from eager"


@pytest.fixture(scope="module")
def deployed():
    return deploy.convert(_lmnet())


def test_exported_deployed_model_equals_eager_at_two_batch_sizes(deployed, tmp_path):
    with_codes = package.WithCodes(deployed)
    path = package.write(with_codes, torch.rand(2, 3, 32, 32), str(tmp_path / "deployed.pt2"), "exported")
    assert package.format_of(path) == "exported"
    loaded = package.load(path)
    for batch in (1, 7):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            _assert_outputs_equal(loaded(x), with_codes(x), f"exported, batch {batch}")
    # The packed operators are graph nodes, not decomposed.
    targets = {str(n.target) for n in torch.export.load(path).graph.nodes if n.op == "call_function"}
    assert {"torch_ext.packed_conv2d_threshold.default", "torch_ext.quantize_pack_codes.default"} <= targets
    assert package.code_keys(deployed) == tuple(deployed.codes(torch.rand(1, 3, 32, 32)))


@pytest.mark.slow
def test_aoti_package_of_the_deployed_model_equals_eager(deployed, tmp_path):
    """One AOTInductor compile (~25 s on 2 cores): logits and every code, batch 1 and 64."""
    with_codes = package.WithCodes(deployed)
    path = package.write(with_codes, torch.rand(2, 3, 32, 32), str(tmp_path / "deployed.pt2"))
    assert package.format_of(path) == "aoti"
    assert not [p for p in tmp_path.iterdir() if p.name != "deployed.pt2"], "scratch files left behind"
    loaded = package.load(path)
    for batch in (1, 64):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            _assert_outputs_equal(loaded(x), with_codes(x), f"AOTInductor package, batch {batch}",
                                  exact_floats=False)
    # A fresh process that only imports torch_ext runs it.
    code = ("import torch, torch_ext; from torch_ext.deploy import package; "
            f"m = package.load({path!r}); out = m(torch.rand(3, 3, 32, 32)); print(tuple(out[0].shape), len(out))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert f"(3, 10) {1 + len(package.code_keys(deployed))}" in proc.stdout


def _damaged_files(tmp_path, deployed):
    good = package.write(deployed, torch.rand(2, 3, 32, 32), str(tmp_path / "good.pt2"), "exported")
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a model at all")
    flipped = bytearray(data)
    middle = len(flipped) // 3
    flipped[middle:middle + 64] = bytes(64)
    corrupted = tmp_path / "corrupted.pt2"
    corrupted.write_bytes(bytes(flipped))
    return {"truncated": truncated, "garbage": garbage, "corrupted": corrupted}


@pytest.mark.parametrize("kind", ["truncated", "garbage", "corrupted"])
def test_a_damaged_file_is_refused_with_one_line(deployed, tmp_path, kind):
    path = _damaged_files(tmp_path, deployed)[kind]
    with pytest.raises(ValueError) as info:
        package.load(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_a_missing_file_and_an_unknown_format_are_refused(deployed, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        package.load(str(tmp_path / "missing.pt2"))
    with pytest.raises(ValueError, match="format must be one of aoti, exported, torchscript, got 'onnx'"):
        package.write(deployed, torch.rand(1, 3, 32, 32), str(tmp_path / "x.pt2"), "onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        package.write(deployed, torch.rand(1, 3, 32, 32), str(tmp_path / "no" / "x.pt2"), "exported")


# --------------------------------------------------------------------------
# Every registry model (float and quantized), through torch.export.

def _registry_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _with_drawn_batch_norms(get_model(name, num_classes=10), 1)


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_exports_and_equals_eager_at_two_batch_sizes(name):
    model = _registry_model(name)
    program = package.export(model, torch.rand(2, 3, 32, 32))
    module = program.module()
    for batch in (1, 5):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
            got = module(x)
        # The same operators in the same order on the CPU: the same bits.
        _assert_outputs_equal(got, want, f"{name}, batch {batch}")


@pytest.mark.slow
def test_export_aoti_packages_a_quantized_registry_model(tmp_path):
    model = _registry_model("lmnet_v1_quantize").train()
    path = torch_ext.export.export_aoti(model, torch.rand(2, 3, 32, 32), tmp_path / "lmnet.pt2")
    assert model.training, "export_aoti must leave the model's mode as it was"
    loaded = package.load(path)
    model.eval()
    for batch in (1, 9):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
        got = loaded(x)
        _assert_outputs_equal(got, want, f"lmnet_v1_quantize package, batch {batch}", exact_floats=False)
    with pytest.raises(ValueError, match="one input tensor expected"):
        torch_ext.export.export_aoti(model, (torch.rand(1, 3, 32, 32), torch.rand(1)), tmp_path / "two.pt2")
