"""``python -m torch_ext.train`` with Blueoil's other weight quantizers and networks (TTQ, TWN, LmResnet, Darknet).

Runs are tiny, as in tests/test_train.py: 8x8 digits, one thread.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_ext import train
from torch_ext.train.config import build_model, parse_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "8", "--batch-size", "64", "--no-progress", "--device", "cpu", "--threads", "1"]


def test_ttq_through_the_training_command_learns_its_scales(tmp_path):
    out = tmp_path / "ttq"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch_ext.train", "--model", "lmnet_v1_quantize", "--weight-quantizer", "ttq",
         "--epochs", "1", "--out", str(out), *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "W2A2" in proc.stdout + proc.stderr  # ternary weights: two bits
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["weight_quantizer"] == "ttq"
    assert all(map(lambda e: e["train_loss"] == e["train_loss"], metrics["epochs"]))  # finite, not NaN
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    scales = {k: v for k, v in state.items() if k.endswith(("weight_quantizer.positive", "weight_quantizer.negative"))}
    # conv1..conv6 are quantized (conv7 float, as Blueoil): one positive and one negative scale each.
    assert len(scales) == 12, sorted(scales)
    # Every scale started at 1.0; the optimizer moved each of them.
    assert all(v.dim() == 0 and v.item() != 1.0 for v in scales.values()), scales
    # Blueoil's gradient of `negative` is +sum(grad) over the negative region. Every quantized
    # convolution here is followed by batch norm, so the loss does not change when both scales
    # are multiplied by one factor: p * dL/dp + n * dL/dn = 0 with dL/dn = -sum(grad over w < -t),
    # hence with p = n Blueoil's two scale gradients are equal, and scales that start equal stay
    # equal (up to rounding and batch norm's eps). docs/blueoil.md discusses this.
    for key, p in scales.items():
        if key.endswith("positive"):
            n = scales[key.replace("positive", "negative")]
            assert abs(p.item() - n.item()) <= 1e-2 * abs(p.item()), (key, p, n)
    # --eval rebuilds the TTQ model from the checkpoint and reproduces the accuracy.
    evaluated = train.main(["--eval", str(out / "checkpoint.pt"), "--device", "cpu"])
    assert evaluated["test_acc"] == pytest.approx(metrics["final"]["test_acc"])


def test_twn_one_tiny_epoch(tmp_path):
    result = train.main(["--model", "lmnet_v0_quantize", "--weight-quantizer", "twn", "--epochs", "1",
                         "--out", str(tmp_path / "twn"), *TINY])
    assert result["test_acc"] > 0.2


def test_weight_quantizer_names_aliases_and_model_defaults():
    assert parse_config(["--weight-quantizer", "binary"]).weight_quantizer == "binary_mean_scaling"
    assert parse_config(["--weight-quantizer", "binary-channel-wise"]).weight_quantizer == (
        "binary_channel_wise_mean_scaling")
    # Defaults follow the model, as Blueoil's configs: channel-wise binary for Darknet.
    assert parse_config(["--model", "darknet_quantize"]).weight_quantizer == "binary_channel_wise_mean_scaling"
    assert parse_config([]).weight_quantizer == "binary_mean_scaling"
    assert parse_config(["--model", "lmnet_v1"]).weight_quantizer == "binary_mean_scaling"
    cfg = parse_config(["--model", "lm_resnet_quantize"])
    assert (cfg.quantize_first_convolution, cfg.quantize_last_convolution) == (False, False)
    cfg = parse_config(["--model", "darknet_quantize"])
    assert (cfg.quantize_first_convolution, cfg.quantize_last_convolution) == (True, True)
    assert parse_config(["--weight-quantizer", "twn"]).bits_label == "W2A2"
    assert parse_config(["--weight-quantizer", "binary"]).bits_label == "W1A2"
    with pytest.raises(SystemExit):
        parse_config(["--weight-quantizer", "ternary"])


@pytest.mark.parametrize("name,wq", [
    *[(n, w) for n in ("lmnet_v0_quantize", "lmnet_quantize", "lm_resnet_quantize", "darknet_quantize")
      for w in ("binary", "binary-channel-wise", "ttq", "twn")],
    # The float models ignore the option.
    ("lmnet_v0", "ttq"), ("lm_resnet", "ttq"), ("darknet", "ttq"),
])
def test_build_model_accepts_every_weight_quantizer(name, wq, one_thread):
    cfg = parse_config(["--model", name, "--weight-quantizer", wq])
    torch.manual_seed(0)
    model = build_model(cfg.as_dict(), num_classes=10, in_channels=1)
    assert model.num_classes == 10
    ttq = any(k.endswith("weight_quantizer.positive") for k in model.state_dict())
    assert ttq == (wq == "ttq" and name.endswith("_quantize"))


def test_image_size_rule_per_model(tmp_path):
    # LmResnet, like LMNet v1, has three space-to-depth steps; LMNet v0 and Darknet pool with 'SAME' max pools.
    with pytest.raises(ValueError, match=r"--image-size=12 must be divisible by 8 for --model='lm_resnet_quantize'"):
        train.main(["--model", "lm_resnet_quantize", "--image-size", "12", "--out", str(tmp_path / "o")])
    result = train.main(["--model", "darknet", "--image-size", "12", "--epochs", "1", "--batch-size", "256",
                         "--no-progress", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "d")])
    assert result["test_acc"] >= 0.0
