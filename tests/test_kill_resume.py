"""No lost work: a training run killed with SIGKILL at arbitrary moments keeps
its last complete checkpoint intact, and --resume finishes with the same
weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ARGS = ["--model", "lmnet_v1_quantize", "--image-size", "8", "--batch-size", "64", "--no-progress",
        "--device", "cpu", "--threads", "1", "--epochs", "4"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch_ext.train", *ARGS, "--out", str(out), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _epochs_in_checkpoint(path: Path) -> int:
    # A checkpoint that loads at all must be complete: it is written to a temp
    # file and renamed, so a kill can never leave half of one behind.
    return int(torch.load(path, weights_only=False)["epoch"])


@pytest.mark.slow
def test_killed_twice_then_resumed_equals_uninterrupted(tmp_path):
    full = _train(tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read()

    cut = tmp_path / "cut"
    checkpoint = cut / "checkpoint.pt"
    kills = 0
    for target_epoch in (1, 2):
        proc = _train(cut, "--resume")
        # Kill part-way through the epoch after target_epoch was saved.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if checkpoint.exists():
                try:
                    if _epochs_in_checkpoint(checkpoint) >= target_epoch:
                        break
                except Exception:  # being replaced right now: look again
                    pass
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
        # What is on disk loads, and is a whole epoch.
        assert _epochs_in_checkpoint(checkpoint) >= target_epoch
    assert kills >= 1, "the run finished before it could be killed; make it longer"

    final = _train(cut, "--resume")
    assert final.wait(timeout=300) == 0, final.stderr.read()
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(checkpoint, weights_only=False)
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_diverging_run_stops_with_a_clear_message_and_writes_no_checkpoint(tmp_path):
    from torch_ext import train

    out = tmp_path / "diverged"
    with pytest.raises(FloatingPointError, match=r"training diverged: loss=nan.*smaller --lr"):
        train.main([*ARGS[:-2], "--epochs", "1", "--lr", "1e30", "--out", str(out)])
    assert not (out / "checkpoint.pt").exists()
