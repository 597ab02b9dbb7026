"""Distributed set-up: one process per GPU (or CPU rank) under ``torchrun``.

When ``WORLD_SIZE`` > 1 the run joins the process group (NCCL on CUDA, gloo
on CPU); otherwise every collective here is a no-op, so the rest of the
training code never asks whether it runs distributed.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["Dist", "select_device"]


class Dist:
    """Rank/world information; a no-op group when not launched by torchrun."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        self.initialized_here = False
        # Where collectives run: NCCL only reduces CUDA tensors.
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.initialized_here = True
        if self.enabled and dist.get_backend() == "nccl":
            self.device = device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (a no-op in a single process)."""
        if self.enabled:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            tensor.copy_(on_device)
        return tensor

    def all_gather_object(self, obj: Any) -> List[Any]:
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, in place (a no-op in a single process)."""
        if self.enabled:
            dist.broadcast(tensor, src=0)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def select_device(requested: Optional[str], ddp: Dist) -> torch.device:
    """The ``--device`` to train on (default: CUDA when there is one), one GPU per process."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"--device={requested!r} is not a valid device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={requested!r} but CUDA is not available on this machine")
        if device.index is None:
            # One GPU per process under torchrun.
            device = torch.device("cuda", ddp.local_rank if ddp.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
