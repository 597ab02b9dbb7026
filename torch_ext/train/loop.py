"""The pieces of a training run: the optimizer's parameter groups, one epoch
of training, batch-norm recalibration and evaluation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .. import data as data_module
from .distributed import Dist
from .report import CodeHistograms, Progress

__all__ = [
    "EpochState",
    "autocast",
    "evaluate",
    "param_groups",
    "recalibrate_batch_norm",
    "recalibration_images",
    "shard",
    "train_one_epoch",
]


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on convolution kernels only, as Blueoil (no decay on BN or biases)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, nn.Conv2d) and name == "weight":
                decay.append(param)
            else:
                no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class EpochState:
    """What one training epoch works with: the model (maybe DDP-wrapped), its optimizer and schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                 device: torch.device, aug_gen: torch.Generator, *, amp: Optional[str], channels_last: bool,
                 pad: int, flip: bool, lr: float) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.device, self.aug_gen = device, aug_gen
        self.amp, self.channels_last, self.pad, self.flip, self.lr = amp, channels_last, pad, flip, lr


def _train_step(s: EpochState, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
    """One optimizer step; returns ``[loss * n, correct, n]``."""
    images = images.to(s.device, non_blocking=True)
    labels = labels.to(s.device, non_blocking=True)
    images = data_module.augment_batch(images, pad=s.pad, flip=s.flip, generator=s.aug_gen)
    if s.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(s.device, s.amp):
        logits = s.model(images)
    loss = F.cross_entropy(logits.float(), labels)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(
            f"training diverged: loss={loss_value} at epoch {epoch + 1}; try a smaller --lr (now {s.lr})"
        )
    n = labels.numel()
    return torch.tensor([loss_value * n, (logits.argmax(1) == labels).sum().item(), n], dtype=torch.float64)


def train_one_epoch(s: EpochState, progress: Progress, epoch: int) -> torch.Tensor:
    """Train over the batches ``progress`` yields; returns this rank's ``[loss sum, correct, count]``."""
    s.model.train()
    sums = torch.zeros(3, dtype=torch.float64)
    for images, labels in progress:
        sums += _train_step(s, images, labels, epoch)
        progress.update(loss=f"{sums[0].item() / max(sums[2].item(), 1.0):.4f}",
                        lr=f"{s.scheduler.get_last_lr()[0]:.2g}")
    return sums


def autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, ddp: Dist, *, amp: Optional[str],
              channels_last: bool, histograms: bool = False) -> Dict[str, Any]:
    """Test loss and accuracy over this rank's shard, summed over all ranks."""
    model.eval()
    hist = CodeHistograms(model) if histograms else None
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    try:
        with torch.no_grad():
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                with autocast(device, amp):
                    logits = model(images)
                sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").item()
                sums[1] += (logits.argmax(1) == labels).sum().item()
                sums[2] += labels.numel()
    finally:
        if hist is not None:
            hist.remove()
    ddp.all_reduce_sum(sums)
    count = max(sums[2].item(), 1.0)
    result: Dict[str, Any] = {"loss": sums[0].item() / count, "acc": sums[1].item() / count, "count": int(sums[2])}
    if hist is not None:
        result["histograms"] = hist.reduced(ddp)
    return result


def recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, device: torch.device, ddp: Dist, *,
                            amp: Optional[str], channels_last: bool, batch_size: int = 256) -> None:
    """Re-estimate every batch norm's running statistics on ``images`` ("precise BN").

    Blueoil's ``decay=0.99`` moving averages assume ~10^5 training steps: in a
    run of a few hundred steps they are still dominated by their initial
    values (mean 0, variance 1) and lag the weights, and the eval-mode network
    is useless (digits, 6 epochs: 10% test accuracy against 99% in train
    mode). So before each evaluation the statistics are recomputed as the
    plain average over a fixed set of un-augmented training images. Dropout
    stays off and nothing random is drawn, so this is deterministic and keeps
    ``--resume`` exact; the result is what the checkpoint stores.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or images.shape[0] == 0:
        return
    saved_momentum = [bn.momentum for bn in bns]
    was_training = model.training
    model.eval()  # dropout off ...
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the recalibration batches
        bn.train()  # ... but batch norm collects statistics
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device, amp):
                    model(x)
    finally:
        for bn, momentum in zip(bns, saved_momentum):
            bn.momentum = momentum
        model.train(was_training)
    # All ranks saw the same images; make the buffers bit-identical anyway.
    for bn in bns:
        for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked):
            ddp.broadcast_(buf)


def recalibration_images(dataset, count: int, seed: int) -> torch.Tensor:
    """A fixed, seeded choice of ``count`` training images (all when fewer), stacked."""
    n = len(dataset)
    if count <= 0 or n == 0:
        return torch.empty(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]
    return torch.stack([dataset[int(i)][0] for i in order])


def shard(dataset, ddp: Dist):
    """This rank's part of an evaluation set: every world_size-th item, no padding."""
    if not ddp.enabled:
        return dataset
    return Subset(dataset, list(range(ddp.rank, len(dataset), ddp.world_size)))
