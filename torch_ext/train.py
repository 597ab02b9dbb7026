"""Train Blueoil's classifiers with quantization-aware training.

``python -m torch_ext.train`` trains one model (default: the W1A2
``LmnetV1Quantize`` on scikit-learn's digits) with Blueoil's recipe:
SGD with momentum 0.9, a piecewise-constant learning rate (divided by 10 at
50%, 75% and 87.5% of the steps), weight decay 5e-4 on convolution kernels
only (Blueoil's ``_weight_decay_loss`` regularises variables named
``kernel``), softmax cross-entropy, and pad + random-crop (+ horizontal flip
where it fits) augmentation. The defaults (6 epochs, batch 32, lr 0.1) are
tuned for digits on a 2-core CPU: there ``--compare`` measured 98.1-99.4%
test accuracy for W1A2 (seeds 0-2) against 98.9-99.2% for float, about 15 s
an epoch per model with 2 threads.

One deliberate departure from Blueoil: before each evaluation the batch-norm
statistics are re-estimated on ``--bn-recalibration-images`` training images
(see :func:`_recalibrate_batch_norm`), because Blueoil's ``decay=0.99``
moving averages are meaningless after only a few hundred steps.

Output, in ``--out`` (default ``runs/<model>-<dataset>``), written by rank 0
only:

* ``metrics.json``: the arguments and per-epoch loss/accuracy/lr/time.
* ``training.png``: loss and accuracy curves, and for every
  ``QuantActivation`` layer a histogram of its output codes
  ``round(y / max_value * (2**bit - 1))`` on the test set.
* ``checkpoint.pt``: written atomically after every epoch; it holds the
  model, optimizer, scheduler, grad scaler, the epoch and every random number
  generator state, so ``--resume`` continues bit-identically (on the CPU with
  the same number of threads; on CUDA with ``--deterministic``).

``--eval CHECKPOINT`` evaluates a saved checkpoint. ``--compare`` trains the
W1A2 ``LmnetV1Quantize`` and the float ``LmnetV1`` the same way and prints
their test accuracies and wall times (``make train``).

Multi-GPU / multi-node: launch with ``torchrun``; when ``WORLD_SIZE`` > 1 the
script joins the process group (NCCL on CUDA, gloo on CPU), wraps the model
in ``DistributedDataParallel`` and shards the data with a
``DistributedSampler``. ``--batch-size`` is the *global* batch size, split
evenly across processes, so a run means the same thing at any world size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from . import data as data_module
from . import models as models_module
from .modules import QuantActivation
from .weight_quantization import (
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
)

__all__ = [
    "MODELS",
    "CheckpointError",
    "build_parser",
    "build_model",
    "main",
    "cli",
    "save_checkpoint_atomic",
    "load_checkpoint",
]

MODELS = ("lmnet_v1_quantize", "lmnet_v1", "sample_network_quantize", "sample_network")
WEIGHT_QUANTIZERS = {
    "binary_mean_scaling": binary_mean_scaling_quantize,
    "binary_channel_wise_mean_scaling": binary_channel_wise_mean_scaling_quantize,
}
CHECKPOINT_FORMAT = "torch_ext.train/1"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
PNG_NAME = "training.png"
# Arguments that define a run: resuming with different values would not
# continue the same run, so it is refused.
RUN_DEFINING_ARGS = (
    "model", "dataset", "image_size", "epochs", "batch_size", "lr", "lr_milestones", "lr_gamma",
    "momentum", "weight_decay", "pad", "flip", "seed", "activation_bit", "activation_max_value",
    "weight_quantizer", "quantize_first_convolution", "quantize_last_convolution", "dropout", "world_size",
    "bn_recalibration_images",
)

# The two models of --compare (`make train`): the W1A2 network and its float twin.
COMPARE_MODELS = ("lmnet_v1_quantize", "lmnet_v1")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, truncated, wrong kind or run)."""


# --------------------------------------------------------------------------
# Command line


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        return value

    return parse


def _non_negative_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text!r}")
        return value

    return parse


def _milestones(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr-milestones must be comma-separated fractions in (0, 1), got {text!r}"
        ) from None
    if any(not 0.0 < v < 1.0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(
            f"--lr-milestones must be increasing fractions in (0, 1), got {text!r}"
        )
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless there is no default or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m torch_ext.train`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m torch_ext.train",
        description="Quantization-aware training of Blueoil's LMNet / sample networks.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default="lmnet_v1_quantize", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(data_module.DATASETS)}")
    p.add_argument("--data-dir", default=None, help="folder of the cifar10 batches or of the image folder")
    p.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                   help="input height and width (default 32)")
    # The defaults of --epochs, --batch-size and --lr are tuned for the default
    # data set (digits) and the 2-core budget of `make train`; larger data sets
    # want more epochs (Blueoil trains CIFAR-10 for hundreds).
    p.add_argument("--epochs", type=_positive_int("--epochs"), default=6, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32,
                   help="global batch size (split across processes)")
    p.add_argument("--lr", type=_non_negative_float("--lr"), default=0.1, help="initial learning rate")
    p.add_argument("--lr-milestones", type=_milestones, default="0.5,0.75,0.875",
                   help="fractions of the total steps at which the learning rate is multiplied by --lr-gamma")
    p.add_argument("--lr-gamma", type=_non_negative_float("--lr-gamma"), default=0.1,
                   help="learning-rate factor at each milestone")
    p.add_argument("--momentum", type=_non_negative_float("--momentum"), default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=_non_negative_float("--weight-decay"), default=5e-4,
                   help="L2 on convolution kernels")
    p.add_argument("--pad", type=int, default=2, help="pixels of zero padding before the random crop")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, except for digits)")
    p.add_argument("--bn-recalibration-images", type=int, default=256, metavar="N",
                   help="re-estimate batch-norm statistics on N training images before each evaluation "
                        "(0: keep the moving averages, as Blueoil)")
    p.add_argument("--dropout", type=float, default=0.5, help="LMNet dropout before conv7")
    p.add_argument("--activation-bit", type=int, default=2, help="QuantActivation bit (1..16, or 32: clip only)")
    p.add_argument("--activation-max-value", type=float, default=2.0, help="QuantActivation max_value")
    p.add_argument("--weight-quantizer", default="binary_mean_scaling", choices=sorted(WEIGHT_QUANTIZERS),
                   help="weight quantizer of the quantized models")
    p.add_argument("--quantize-first-convolution", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the first convolution's weights")
    p.add_argument("--quantize-last-convolution", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the last convolution's weights")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling, augmentation and dropout")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"],
                   help="autocast to bf16 (default when given) or fp16 (with a grad scaler)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA, off for CPU)")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<dataset>, "
                                               "runs/compare with --compare)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or without a value from OUT/checkpoint.pt if it exists")
    p.add_argument("--eval", default=None, metavar="CHECKPOINT", help="only evaluate CHECKPOINT on the test set")
    p.add_argument("--export-onnx", default=None, metavar="PATH",
                   help="after training (or with --eval) export the model to this ONNX file (batch dim dynamic)")
    p.add_argument("--stop-after", type=_positive_int("--stop-after"), default=None, metavar="N",
                   help="stop after N epochs in this invocation (for time-sliced or preemptible jobs; "
                        "continue with --resume)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels, so that --resume is bit-exact on GPUs too "
                        "(CPU runs are deterministic anyway)")
    p.add_argument("--threads", type=_positive_int("--threads"), default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes (0: load in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", action="store_true",
                   help="train W1A2 lmnet_v1_quantize and float lmnet_v1 the same way and compare them")
    return p


def _validate(args: argparse.Namespace) -> None:
    """Refuse bad combinations with messages naming the argument and value."""
    if args.model not in MODELS:
        raise ValueError(f"--model={args.model!r} is unknown; choose one of {list(MODELS)}")
    if args.dataset not in data_module.DATASETS:
        raise ValueError(f"--dataset={args.dataset!r} is unknown; choose one of {list(data_module.DATASETS)}")
    if args.pad < 0:
        raise ValueError(f"--pad must be >= 0, got {args.pad}")
    if args.bn_recalibration_images < 0:
        raise ValueError(f"--bn-recalibration-images must be >= 0, got {args.bn_recalibration_images}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (1 <= args.activation_bit <= 16 or args.activation_bit == 32):
        raise ValueError(f"--activation-bit must be in 1..16 or 32, got {args.activation_bit}")
    if not math.isfinite(args.activation_max_value) or args.activation_max_value <= 0:
        raise ValueError(f"--activation-max-value must be finite and > 0, got {args.activation_max_value}")
    if args.eval is not None and (args.resume is not None or args.compare):
        raise ValueError("--eval cannot be combined with --resume or --compare")
    if args.compare and args.resume not in (None, "auto"):
        raise ValueError(
            f"--compare trains two models and resumes each from its own folder: use --resume without a path, "
            f"got --resume={args.resume!r}"
        )


# --------------------------------------------------------------------------
# Models


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    *,
    activation_bit: int = 2,
    activation_max_value: float = 2.0,
    weight_quantizer: str = "binary_mean_scaling",
    quantize_first_convolution: bool = True,
    quantize_last_convolution: bool = True,
    dropout: float = 0.5,
) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) with Blueoil's constructor arguments."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; choose one of {list(MODELS)}")
    if weight_quantizer not in WEIGHT_QUANTIZERS:
        raise ValueError(f"weight_quantizer={weight_quantizer!r} is unknown; choose one of {sorted(WEIGHT_QUANTIZERS)}")
    quant_kwargs = dict(
        activation_quantizer=QuantActivation,
        activation_quantizer_kwargs={"bit": activation_bit, "max_value": activation_max_value},
        weight_quantizer=WEIGHT_QUANTIZERS[weight_quantizer],
        quantize_first_convolution=quantize_first_convolution,
        quantize_last_convolution=quantize_last_convolution,
    )
    if name == "lmnet_v1_quantize":
        return models_module.LmnetV1Quantize(num_classes, in_channels, dropout=dropout, **quant_kwargs)
    if name == "lmnet_v1":
        return models_module.LmnetV1(num_classes, in_channels, dropout=dropout)
    if name == "sample_network_quantize":
        return models_module.SampleNetworkQuantize(num_classes, in_channels, **quant_kwargs)
    return models_module.SampleNetwork(num_classes, in_channels)


def _model_from_args(args: Dict[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    return build_model(
        args["model"],
        num_classes,
        in_channels,
        activation_bit=args["activation_bit"],
        activation_max_value=args["activation_max_value"],
        weight_quantizer=args["weight_quantizer"],
        quantize_first_convolution=args["quantize_first_convolution"],
        quantize_last_convolution=args["quantize_last_convolution"],
        dropout=args["dropout"],
    )


def _bits_label(args: Dict[str, Any]) -> str:
    """``W1A2``-style label of a model's precision."""
    if not args["model"].endswith("_quantize"):
        return "float"
    a = "float" if args["activation_bit"] == 32 else str(args["activation_bit"])
    return f"W1A{a}"


# --------------------------------------------------------------------------
# Distributed set-up


class _Dist:
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

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _select_device(requested: Optional[str], ddp: _Dist) -> torch.device:
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


# --------------------------------------------------------------------------
# Random number generators


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(aug_gen: torch.Generator, loader_gen: torch.Generator, device: torch.device) -> Dict[str, Any]:
    """Every RNG state a resumed run needs, as checkpoint-safe (weights_only) objects."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "augment": aug_gen.get_state(),
        "loader": loader_gen.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], aug_gen: torch.Generator, loader_gen: torch.Generator,
                   device: torch.device) -> None:
    py = state["python"]
    # weights_only loading turns the tuple into a list; random.setstate wants tuples.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    loader_gen.set_state(state["loader"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------
# Checkpoints and files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """Write ``path`` via a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the old file or the new one, never a
    partial file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint_atomic(state: Dict[str, Any], path: os.PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically (see :func:`_write_atomic`)."""
    _write_atomic(Path(path), lambda f: torch.save(state, f))


def _write_json_atomic(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def load_checkpoint(path: os.PathLike, argument: str = "checkpoint") -> Dict[str, Any]:
    """Load a checkpoint written by this module, on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt, or not a torch_ext.train checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r}: no such checkpoint file")
    try:
        # weights_only: a checkpoint is data, never code.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file, ...
        raise CheckpointError(
            f"{argument}={str(path)!r} is not a readable checkpoint (corrupt or truncated?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{argument}={str(path)!r} is not a torch_ext.train checkpoint "
            f"(format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [k for k in ("args", "model", "epoch", "num_classes", "in_channels") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{argument}={str(path)!r} lacks {missing}")
    return ckpt


# --------------------------------------------------------------------------
# Training pieces


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
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


class _CodeHistograms:
    """Forward hooks counting each QuantActivation's output codes.

    Code of an output ``y``: ``round(y / max_value * (2**bit - 1))``, an
    integer in ``0 .. 2**bit - 1`` (layers with ``bit=32`` have no codes and
    are skipped).
    """

    def __init__(self, model: nn.Module) -> None:
        self.counts: Dict[str, torch.Tensor] = {}
        self.meta: Dict[str, Dict[str, float]] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, QuantActivation) and int(module.bit) <= 16:
                self.meta[name] = {"bit": int(module.bit), "max_value": float(module.max_value)}
                self._handles.append(module.register_forward_hook(self._hook(name, module)))

    def _hook(self, name: str, module: nn.Module):
        levels = 2 ** int(module.bit) - 1
        max_value = float(module.max_value)

        def hook(_module, _inputs, output):
            codes = torch.round(output.detach().float() / max_value * levels).clamp_(0, levels).to(torch.int64)
            if codes.is_cuda and torch.are_deterministic_algorithms_enabled():
                codes = codes.cpu()  # CUDA bincount uses atomics and is refused in deterministic mode
            counts = torch.bincount(codes.flatten(), minlength=levels + 1).cpu()
            self.counts[name] = self.counts.get(name, torch.zeros_like(counts)) + counts

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reduced(self, ddp: _Dist) -> Dict[str, Dict[str, Any]]:
        out = {}
        for name, meta in self.meta.items():
            counts = self.counts.get(name, torch.zeros(2 ** meta["bit"], dtype=torch.int64))
            counts = ddp.all_reduce_sum(counts.clone())
            out[name] = dict(meta, counts=counts.tolist())
        return out


def _autocast(device: torch.device, amp: Optional[str]):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device, ddp: _Dist, *, amp: Optional[str],
              channels_last: bool, histograms: bool = False) -> Dict[str, Any]:
    """Test loss and accuracy over this rank's shard, summed over all ranks."""
    model.eval()
    hist = _CodeHistograms(model) if histograms else None
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    try:
        with torch.no_grad():
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                with _autocast(device, amp):
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


def _recalibrate_batch_norm(model: nn.Module, images: torch.Tensor, device: torch.device, ddp: _Dist, *,
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
                with _autocast(device, amp):
                    model(x)
    finally:
        for bn, momentum in zip(bns, saved_momentum):
            bn.momentum = momentum
        model.train(was_training)
    if ddp.enabled:
        # All ranks saw the same images; make the buffers bit-identical anyway.
        for bn in bns:
            for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked):
                dist.broadcast(buf, src=0)


def _recalibration_images(dataset, count: int, seed: int) -> torch.Tensor:
    """A fixed, seeded choice of ``count`` training images (all when fewer), stacked."""
    n = len(dataset)
    if count <= 0 or n == 0:
        return torch.empty(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]
    return torch.stack([dataset[int(i)][0] for i in order])


def _shard(dataset, ddp: _Dist):
    """This rank's part of an evaluation set: every world_size-th item, no padding."""
    if not ddp.enabled:
        return dataset
    return Subset(dataset, list(range(ddp.rank, len(dataset), ddp.world_size)))


def _plot(path: Path, history: List[Dict[str, Any]], histograms: Dict[str, Dict[str, Any]], title: str) -> None:
    """Loss and accuracy curves, plus one bar chart of output codes per QuantActivation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(histograms)
    cols = 3
    hist_rows = math.ceil(len(names) / cols)
    fig = plt.figure(figsize=(12, 3.6 * (1 + hist_rows)), constrained_layout=True)
    grid = fig.add_gridspec(1 + hist_rows, cols * 2)
    epochs = [h["epoch"] for h in history]
    ax = fig.add_subplot(grid[0, :cols])
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax.legend()
    ax = fig.add_subplot(grid[0, cols:])
    ax.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax.plot(epochs, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax.legend()
    for i, name in enumerate(names):
        h = histograms[name]
        counts = np.asarray(h["counts"], dtype=np.float64)
        frac = counts / max(counts.sum(), 1.0)
        ax = fig.add_subplot(grid[1 + i // cols, 2 * (i % cols) : 2 * (i % cols) + 2])
        ax.bar(np.arange(len(frac)), frac)
        ax.set(title=f"{name} (bit={h['bit']}, max={h['max_value']:g})", xlabel="output code",
               ylabel="fraction (test set)")
        ax.set_xticks(np.arange(len(frac)) if len(frac) <= 16 else np.linspace(0, len(frac) - 1, 9).round())
    fig.suptitle(title)
    _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def _log(ddp: _Dist, msg: str) -> None:
    if ddp.is_main:
        print(msg, file=sys.stderr, flush=True)


def _args_dict(args: argparse.Namespace, ddp: _Dist) -> Dict[str, Any]:
    d = {k: v for k, v in vars(args).items()}
    d["world_size"] = ddp.world_size
    return d


# --------------------------------------------------------------------------
# The three modes


def _train(args: argparse.Namespace, ddp: _Dist, device: torch.device) -> Dict[str, Any]:
    wall_start = time.perf_counter()
    splits = data_module.load_dataset(args.dataset, args.data_dir, args.image_size)
    if args.model.startswith("lmnet") and splits.image_size % 8:
        raise ValueError(
            f"--image-size={splits.image_size} must be divisible by 8 for --model={args.model!r} "
            "(three space-to-depth steps)"
        )
    flip = splits.flip if args.flip is None else args.flip
    args.flip = flip
    args.image_size = splits.image_size
    out_dir = Path(args.out)
    ckpt_path = out_dir / CHECKPOINT_NAME
    run_args = _args_dict(args, ddp)

    if args.batch_size % ddp.world_size:
        raise ValueError(
            f"--batch-size={args.batch_size} must be divisible by the number of processes ({ddp.world_size})"
        )
    per_rank_batch = args.batch_size // ddp.world_size
    channels_last = (device.type == "cuda") if args.channels_last is None else args.channels_last

    # Same initial weights on every rank (DDP also broadcasts rank 0's).
    _seed_everything(args.seed)
    model = _model_from_args(run_args, splits.num_classes, splits.in_channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        _param_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum
    )

    # Rank-specific streams for dropout and augmentation; the sampler's
    # shuffling is seeded per epoch and so needs no saved state.
    _seed_everything(args.seed + 1_000_003 * ddp.rank)
    aug_gen = torch.Generator().manual_seed(args.seed * 2 + 1 + 7919 * ddp.rank)
    loader_gen = torch.Generator().manual_seed(args.seed * 2 + 2 + 7919 * ddp.rank)
    sampler = DistributedSampler(
        splits.train, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True, seed=args.seed,
        drop_last=False,
    )
    drop_last = len(splits.train) // ddp.world_size >= per_rank_batch
    pin = device.type == "cuda"
    train_loader = DataLoader(
        splits.train, batch_size=per_rank_batch, sampler=sampler, drop_last=drop_last,
        num_workers=args.workers, generator=loader_gen, pin_memory=pin, persistent_workers=False,
    )
    test_loader = DataLoader(
        _shard(splits.test, ddp), batch_size=max(per_rank_batch, 256), shuffle=False, num_workers=args.workers,
        pin_memory=pin,
    )
    recal_images = _recalibration_images(splits.train, args.bn_recalibration_images, args.seed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"dataset={args.dataset!r} has no training images")
    total_steps = steps_per_epoch * args.epochs
    milestones = sorted({max(1, round(f * total_steps)) for f in args.lr_milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=args.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    train_model: nn.Module = model
    if ddp.enabled:
        if device.type == "cuda":
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
        model = train_model.module

    start_epoch = 0
    history: List[Dict[str, Any]] = []
    resume_from = None
    if args.resume is not None:
        resume_from = ckpt_path if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto" and not resume_from.is_file():
            _log(ddp, f"--resume: no checkpoint at {str(resume_from)!r} yet, starting a new run")
            resume_from = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, "--resume")
        differing = [
            f"{k}: checkpoint {ckpt['args'].get(k)!r}, now {run_args.get(k)!r}"
            for k in RUN_DEFINING_ARGS
            if ckpt["args"].get(k) != run_args.get(k)
        ]
        if differing:
            raise CheckpointError(
                f"--resume={str(resume_from)!r} belongs to a different run; differing arguments: "
                + "; ".join(differing)
            )
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"][ddp.rank], aug_gen, loader_gen, device)
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"--resume={str(resume_from)!r} does not fit this run: {exc}") from exc
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
        _log(ddp, f"resumed from {str(resume_from)!r} after epoch {start_epoch}")

    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _log(
        ddp,
        f"training {args.model} ({_bits_label(run_args)}) on {args.dataset}: {len(splits.train)} train / "
        f"{len(splits.test)} test images, {args.epochs} epochs x {steps_per_epoch} steps, "
        f"device {device}, {ddp.world_size} process(es), {torch.get_num_threads()} threads",
    )

    from tqdm import tqdm

    test_result: Dict[str, Any] = {}
    for epoch in range(start_epoch, end_epoch):
        epoch_start = time.perf_counter()
        sampler.set_epoch(epoch)
        train_model.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        bar = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr, leave=False,
            disable=args.no_progress or not ddp.is_main, dynamic_ncols=True,
        )
        for images, labels in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images = data_module.augment_batch(images, pad=args.pad, flip=flip, generator=aug_gen)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, args.amp):
                logits = train_model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training diverged: loss={loss_value} at epoch {epoch + 1}; try a smaller --lr (now {args.lr})"
                )
            n = labels.numel()
            sums += torch.tensor([loss_value * n, (logits.argmax(1) == labels).sum().item(), n], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2g}")
        bar.close()
        ddp.all_reduce_sum(sums)
        last_of_run = epoch == end_epoch - 1
        _recalibrate_batch_norm(model, recal_images, device, ddp, amp=args.amp, channels_last=channels_last)
        test_result = _evaluate(model, test_loader, device, ddp, amp=args.amp, channels_last=channels_last,
                                histograms=last_of_run)
        record = {
            "epoch": epoch + 1,
            "train_loss": sums[0].item() / max(sums[2].item(), 1.0),
            "train_acc": sums[1].item() / max(sums[2].item(), 1.0),
            "test_loss": test_result["loss"],
            "test_acc": test_result["acc"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - epoch_start,
        }
        history.append(record)
        _log(
            ddp,
            f"epoch {epoch + 1}/{args.epochs}: "
            f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}% | "
            f"test loss {record['test_loss']:.4f} acc {100 * record['test_acc']:.2f}% | "
            f"{record['epoch_time_s']:.1f} s",
        )
        rng_states = ddp.all_gather_object(_rng_state(aug_gen, loader_gen, device))
        if ddp.is_main:
            save_checkpoint_atomic(
                {
                    "format": CHECKPOINT_FORMAT,
                    "args": run_args,
                    "epoch": epoch + 1,
                    "num_classes": splits.num_classes,
                    "in_channels": splits.in_channels,
                    "class_names": list(splits.class_names),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_states,
                    "history": history,
                },
                ckpt_path,
            )
            _write_json_atomic({"args": run_args, "epochs": history}, out_dir / METRICS_NAME)
    # Every rank must be done with the checkpoint before anyone reads or exits.
    ddp.barrier()

    completed = bool(history) and history[-1]["epoch"] == args.epochs
    if not test_result:  # nothing left to train (resumed a finished run): evaluate it
        test_result = _evaluate(model, test_loader, device, ddp, amp=args.amp, channels_last=channels_last,
                                histograms=True)
    histograms = test_result.get("histograms", {})
    wall = time.perf_counter() - wall_start
    png_path = out_dir / PNG_NAME
    result = {
        "model": args.model,
        "bits": _bits_label(run_args),
        "dataset": args.dataset,
        "epochs_done": history[-1]["epoch"] if history else 0,
        "completed": completed,
        "test_acc": test_result["acc"],
        "test_loss": test_result["loss"],
        "history": history,
        "histograms": histograms,
        "wall_time_s": wall,
        "out_dir": str(out_dir),
        "checkpoint": str(ckpt_path),
        "metrics": str(out_dir / METRICS_NAME),
        "png": str(png_path),
        "world_size": ddp.world_size,
        "module": model,  # the trained nn.Module (unwrapped from DDP), for programmatic use
    }
    if ddp.is_main:
        _write_json_atomic(
            {"args": run_args, "epochs": history, "final": {k: result[k] for k in
                                                              ("test_acc", "test_loss", "epochs_done", "completed",
                                                               "wall_time_s")},
             "histograms": histograms},
            out_dir / METRICS_NAME,
        )
        if history:
            _plot(png_path, history, histograms, f"{args.model} ({result['bits']}) on {args.dataset}")
        if args.export_onnx:
            from .export import export_trained_model

            export_trained_model(model, args.export_onnx, in_channels=splits.in_channels, image_size=splits.image_size)
            _log(ddp, f"wrote ONNX model {args.export_onnx}")
        _log(ddp, f"test accuracy {100 * result['test_acc']:.2f}% after {result['epochs_done']} epochs, "
                  f"{wall:.1f} s; wrote {out_dir}/{{{CHECKPOINT_NAME},{METRICS_NAME},{PNG_NAME}}}")
    return result


def _eval_checkpoint(args: argparse.Namespace, ddp: _Dist, device: torch.device) -> Dict[str, Any]:
    ckpt = load_checkpoint(args.eval, "--eval")
    saved = ckpt["args"]
    data_dir = args.data_dir if args.data_dir is not None else saved.get("data_dir")
    splits = data_module.load_dataset(saved["dataset"], data_dir, saved.get("image_size"))
    if (splits.num_classes, splits.in_channels) != (ckpt["num_classes"], ckpt["in_channels"]):
        raise CheckpointError(
            f"--eval={args.eval!r}: the model has {ckpt['num_classes']} classes and {ckpt['in_channels']} "
            f"input channels but the data set has {splits.num_classes} and {splits.in_channels}"
        )
    model = _model_from_args(saved, ckpt["num_classes"], ckpt["in_channels"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"--eval={args.eval!r}: weights do not fit model {saved['model']!r}: {exc}") from exc
    if args.export_onnx and ddp.is_main:
        from .export import export_trained_model

        export_trained_model(model, args.export_onnx, in_channels=ckpt["in_channels"], image_size=splits.image_size)
    channels_last = (device.type == "cuda") if args.channels_last is None else args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(_shard(splits.test, ddp), batch_size=256, shuffle=False, num_workers=args.workers)
    result = _evaluate(model, loader, device, ddp, amp=args.amp, channels_last=channels_last, histograms=True)
    result.update(model=saved["model"], bits=_bits_label(saved), dataset=saved["dataset"], epoch=ckpt["epoch"],
                  checkpoint=str(args.eval), test_acc=result["acc"], test_loss=result["loss"])
    if ddp.is_main:
        print(f"{args.eval}: {saved['model']} ({result['bits']}) after epoch {ckpt['epoch']}: test accuracy "
              f"{100 * result['acc']:.2f}% ({result['count']} images), loss {result['loss']:.4f}")
        for name, h in result["histograms"].items():
            total = max(sum(h["counts"]), 1)
            fracs = " ".join(f"{c / total:.3f}" for c in h["counts"])
            print(f"  {name}: output code fractions {fracs}")
    return result


def _compare(args: argparse.Namespace, ddp: _Dist, device: torch.device) -> Dict[str, Any]:
    """Train W1A2 LmnetV1Quantize and float LmnetV1 with identical settings and compare."""
    start = time.perf_counter()
    base_out = Path(args.out)
    results = {}
    for name in COMPARE_MODELS:
        run = argparse.Namespace(**vars(args))
        run.model = name
        run.out = str(base_out / name)
        run.compare = False
        results[name] = _train(run, ddp, device)
    q, f = (results[n] for n in COMPARE_MODELS)
    gap = 100 * (f["test_acc"] - q["test_acc"])
    met = q["test_acc"] >= 0.97 and gap <= 1.5
    summary = {
        "dataset": args.dataset,
        "epochs": args.epochs,
        "runs": {n: {k: r[k] for k in ("bits", "test_acc", "test_loss", "wall_time_s", "png")}
                 for n, r in results.items()},
        "gap_points": gap,
        "targets_met": met,
        "total_wall_time_s": time.perf_counter() - start,
    }
    if ddp.is_main:
        _write_json_atomic(summary, base_out / "compare.json")
        lines = [
            f"{'model':<20} {'precision':<10} {'test accuracy':>14} {'wall time':>10}",
            f"{'-' * 20} {'-' * 10} {'-' * 14} {'-' * 10}",
        ]
        for n, r in results.items():
            lines.append(f"{n:<20} {r['bits']:<10} {100 * r['test_acc']:>13.2f}% {r['wall_time_s']:>9.1f}s")
        lines.append(
            f"{args.dataset}, {args.epochs} epochs each, {ddp.world_size} process(es) on {device}, "
            f"{summary['total_wall_time_s']:.0f} s in all; "
            f"float - W1A2 = {gap:.2f} points; targets (W1A2 >= 97%, within 1.5 points of float): "
            f"{'met' if met else 'NOT met'}"
        )
        lines.append(f"plots: {results[COMPARE_MODELS[0]]['png']}, {results[COMPARE_MODELS[1]]['png']}")
        print("\n".join(lines), flush=True)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its metrics.

    Returns the training result (``test_acc``, ``history``, ``histograms``,
    file paths, and the trained ``module``), the evaluation result with
    ``--eval``, or the comparison summary with ``--compare``. Errors in arguments or data raise
    ``ValueError`` / ``FileNotFoundError`` / :class:`CheckpointError`; use
    :func:`cli` for a command line that prints them instead.
    """
    args = build_parser().parse_args(argv)
    _validate(args)
    if args.out is None:
        args.out = str(Path("runs") / ("compare" if args.compare else f"{args.model}-{args.dataset}"))
    # Process-wide settings this run changes, given back at the end so that a
    # program calling main() keeps its own.
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_benchmark = torch.backends.cudnn.benchmark
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Reproducibility over speed: the same seed must give the same weights.
    torch.backends.cudnn.benchmark = False
    if args.deterministic:
        # cuBLAS reads this when it initialises, which has not happened yet.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    ddp = _Dist()
    try:
        device = _select_device(args.device, ddp)
        ddp.init(device)
        if args.eval is not None:
            return _eval_checkpoint(args, ddp, device)
        if args.compare:
            return _compare(args, ddp, device)
        return _train(args, ddp, device)
    finally:
        ddp.close()
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.backends.cudnn.benchmark = saved_benchmark


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point: like :func:`main`, printing errors as ``error: ...`` (exit status 2)."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"python -m torch_ext.train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
