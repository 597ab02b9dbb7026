"""The three things ``python -m torch_ext.train`` does: train a model, evaluate a
checkpoint (``--eval``), and train the W1A2 LMNet next to its float twin
(``--compare``, what ``make train`` runs).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import data as data_module
from .. import models as models_module
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint_atomic,
    seed_everything,
    set_rng_state,
    write_json_atomic,
)
from .config import COMPARE_MODELS, RUN_DEFINING_ARGS, TrainConfig, bits_label, build_model, parse_config
from .distributed import Dist, select_device
from .loop import (
    EpochState,
    evaluate,
    param_groups,
    recalibrate_batch_norm,
    recalibration_images,
    shard,
    train_one_epoch,
)
from .report import Progress, log, plot

__all__ = ["cli", "main"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
PNG_NAME = "training.png"


@dataclasses.dataclass
class _Run:
    """Everything a training run has set up: the configuration, data, model and optimizer state."""

    cfg: TrainConfig
    splits: Any
    model: nn.Module  # the bare model: what checkpoints hold
    epoch: EpochState  # the model that trains (DDP-wrapped when distributed), optimizer, schedule
    sampler: DistributedSampler
    train_loader: DataLoader
    test_loader: DataLoader
    loader_gen: torch.Generator
    recal_images: torch.Tensor
    out_dir: Path
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    start_epoch: int = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME


#: torch_ext.data's argument names, as the command line spells them.
_OPTION_OF_ARGUMENT = {"data_dir": "--data-dir", "dataset": "--dataset", "image_size": "--image-size"}


def load_dataset(dataset: str, data_dir: Optional[str], image_size: Optional[int]):
    """``torch_ext.data.load_dataset``, its refusals naming the options as typed (``--data-dir``, not ``data_dir``)."""
    try:
        return data_module.load_dataset(dataset, data_dir, image_size)
    except (ValueError, FileNotFoundError) as exc:
        pattern = r"(?<![\w-])(" + "|".join(_OPTION_OF_ARGUMENT) + r")\b"
        message = re.sub(pattern, lambda m: _OPTION_OF_ARGUMENT[m.group(1)], str(exc))
        raise type(exc)(message) from exc


def _resolved_config(cfg: TrainConfig, ddp: Dist):
    """Load the data set; fill in what it decides (image size, flips)."""
    splits = load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size)
    multiple = getattr(models_module.get_model_builder(cfg.model), "input_size_multiple", 1)
    if splits.image_size % multiple:
        raise ValueError(
            f"--image-size={splits.image_size} must be divisible by {multiple} for --model={cfg.model!r} "
            "(three space-to-depth steps)"
        )
    if cfg.batch_size % ddp.world_size:
        raise ValueError(
            f"--batch-size={cfg.batch_size} must be divisible by the number of processes ({ddp.world_size})"
        )
    flip = splits.flip if cfg.flip is None else cfg.flip
    return cfg.resolved(image_size=splits.image_size, flip=flip, world_size=ddp.world_size), splits


def _loaders(cfg: TrainConfig, splits, ddp: Dist, device: torch.device, loader_gen: torch.Generator):
    per_rank_batch = cfg.batch_size // ddp.world_size
    sampler = DistributedSampler(
        splits.train, num_replicas=ddp.world_size, rank=ddp.rank, shuffle=True, seed=cfg.seed, drop_last=False,
    )
    drop_last = len(splits.train) // ddp.world_size >= per_rank_batch
    pin = device.type == "cuda"
    train_loader = DataLoader(
        splits.train, batch_size=per_rank_batch, sampler=sampler, drop_last=drop_last,
        num_workers=cfg.workers, generator=loader_gen, pin_memory=pin, persistent_workers=False,
    )
    test_loader = DataLoader(
        shard(splits.test, ddp), batch_size=max(per_rank_batch, 256), shuffle=False, num_workers=cfg.workers,
        pin_memory=pin,
    )
    if len(train_loader) == 0:
        raise ValueError(f"--dataset={cfg.dataset!r} has no training images")
    return sampler, train_loader, test_loader


def _learned_max_values(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Each QuantActivation's learned max_value, by module name (none without --learn-max-value)."""
    from ..modules import QuantActivation

    return {name: m.max_value for name, m in model.named_modules()
            if isinstance(m, QuantActivation) and m.learn_max_value is not None}


def _param_groups(model: torch.nn.Module, cfg: TrainConfig) -> List[Dict[str, Any]]:
    """param_groups, with the learned max_values in a group of their own (--max-value-weight-decay)."""
    groups = param_groups(model, cfg.weight_decay)
    learned = list(_learned_max_values(model).values())
    if not learned:
        return groups
    ids = {id(p) for p in learned}
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    return groups + [{"params": learned, "weight_decay": cfg.max_value_weight_decay}]


def _setup(cfg: TrainConfig, ddp: Dist, device: torch.device) -> _Run:
    cfg, splits = _resolved_config(cfg, ddp)
    channels_last = cfg.channels_last_on(device.type)
    # Same initial weights on every rank (DDP also broadcasts rank 0's).
    seed_everything(cfg.seed)
    model = build_model(cfg.as_dict(), splits.num_classes, splits.in_channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(_param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)
    # Rank-specific streams for dropout and augmentation; the sampler's
    # shuffling is seeded per epoch and so needs no saved state.
    seed_everything(cfg.seed + 1_000_003 * ddp.rank)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 2 + 1 + 7919 * ddp.rank)
    loader_gen = torch.Generator().manual_seed(cfg.seed * 2 + 2 + 7919 * ddp.rank)
    sampler, train_loader, test_loader = _loaders(cfg, splits, ddp, device, loader_gen)
    total_steps = len(train_loader) * cfg.epochs
    milestones = sorted({max(1, round(f * total_steps)) for f in cfg.lr_milestones})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    train_model: nn.Module = model
    if ddp.enabled:
        if device.type == "cuda":
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
        model = train_model.module
    epoch_state = EpochState(train_model, optimizer, scheduler, scaler, device, aug_gen, amp=cfg.amp,
                             channels_last=channels_last, pad=cfg.pad, flip=cfg.flip, lr=cfg.lr)
    return _Run(cfg, splits, model, epoch_state, sampler, train_loader, test_loader, loader_gen,
                recalibration_images(splits.train, cfg.bn_recalibration_images, cfg.seed), Path(cfg.out))


def _resume(run: _Run, ddp: Dist, device: torch.device) -> None:
    """With ``--resume``: continue from the checkpoint, refusing one of a different run."""
    cfg = run.cfg
    if cfg.resume is None:
        return
    path = run.checkpoint_path if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.is_file():
        log(ddp, f"--resume: no checkpoint at {str(path)!r} yet, starting a new run")
        return
    ckpt = load_checkpoint(path, "--resume")
    now = cfg.as_dict()
    differing = [f"{k}: checkpoint {ckpt['args'].get(k)!r}, now {now.get(k)!r}"
                 for k in RUN_DEFINING_ARGS if ckpt["args"].get(k) != now.get(k)]
    if differing:
        raise CheckpointError(f"--resume={str(path)!r} belongs to a different run; differing arguments: "
                              + "; ".join(differing))
    s = run.epoch
    try:
        run.model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.scheduler.load_state_dict(ckpt["scheduler"])
        s.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][ddp.rank], s.aug_gen, run.loader_gen, device)
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"--resume={str(path)!r} does not fit this run: {exc}") from exc
    run.start_epoch = int(ckpt["epoch"])
    run.history = list(ckpt.get("history", []))
    log(ddp, f"resumed from {str(path)!r} after epoch {run.start_epoch}")


def _save_checkpoint(run: _Run, ddp: Dist, epoch: int) -> None:
    """After each epoch: the checkpoint (every rank's RNG state) and metrics.json, atomically."""
    s = run.epoch
    rng_states = ddp.all_gather_object(rng_state(s.aug_gen, run.loader_gen, s.device))
    if not ddp.is_main:
        return
    args = run.cfg.as_dict()
    save_checkpoint_atomic(
        {
            "format": CHECKPOINT_FORMAT, "args": args, "epoch": epoch,
            "num_classes": run.splits.num_classes, "in_channels": run.splits.in_channels,
            "class_names": list(run.splits.class_names), "model": run.model.state_dict(),
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "rng": rng_states, "history": run.history,
        },
        run.checkpoint_path,
    )
    write_json_atomic({"args": args, "epochs": run.history}, run.out_dir / METRICS_NAME)


def _evaluate_run(run: _Run, ddp: Dist, histograms: bool) -> Dict[str, Any]:
    s = run.epoch
    return evaluate(run.model, run.test_loader, s.device, ddp, amp=s.amp, channels_last=s.channels_last,
                    histograms=histograms)


def _run_epoch(run: _Run, ddp: Dist, epoch: int, last_of_run: bool) -> Dict[str, Any]:
    """Train one epoch, recalibrate batch norm, evaluate, log and checkpoint; returns the test result."""
    cfg, s = run.cfg, run.epoch
    start = time.perf_counter()
    run.sampler.set_epoch(epoch)
    progress = Progress(run.train_loader, len(run.train_loader), f"epoch {epoch + 1}/{cfg.epochs}",
                        enabled=not cfg.no_progress and ddp.is_main)
    sums = ddp.all_reduce_sum(train_one_epoch(s, progress, epoch))
    recalibrate_batch_norm(run.model, run.recal_images, s.device, ddp, amp=s.amp, channels_last=s.channels_last)
    test = _evaluate_run(run, ddp, histograms=last_of_run)
    count = max(sums[2].item(), 1.0)
    record = {
        "epoch": epoch + 1, "train_loss": sums[0].item() / count, "train_acc": sums[1].item() / count,
        "test_loss": test["loss"], "test_acc": test["acc"], "lr": s.optimizer.param_groups[0]["lr"],
        "epoch_time_s": time.perf_counter() - start,
    }
    learned = _learned_max_values(run.model)
    if learned:
        # One host read an epoch, for the plot (report.py) and metrics.json.
        record["max_values"] = {name: float(p.detach()) for name, p in learned.items()}
    run.history.append(record)
    log(ddp, f"epoch {epoch + 1}/{cfg.epochs}: "
             f"train loss {record['train_loss']:.4f} acc {100 * record['train_acc']:.2f}% | "
             f"test loss {record['test_loss']:.4f} acc {100 * record['test_acc']:.2f}% | "
             f"{record['epoch_time_s']:.1f} s")
    _save_checkpoint(run, ddp, epoch + 1)
    return test


def _finish(run: _Run, ddp: Dist, test: Dict[str, Any], wall: float) -> Dict[str, Any]:
    """The run's result; rank 0 writes the final metrics.json, the plot and the ONNX export."""
    cfg, out_dir = run.cfg, run.out_dir
    histograms = test.get("histograms", {})
    result = {
        "model": cfg.model, "bits": cfg.bits_label, "dataset": cfg.dataset,
        "epochs_done": run.history[-1]["epoch"] if run.history else 0,
        "completed": bool(run.history) and run.history[-1]["epoch"] == cfg.epochs,
        "test_acc": test["acc"], "test_loss": test["loss"], "history": run.history, "histograms": histograms,
        "wall_time_s": wall, "out_dir": str(out_dir), "checkpoint": str(run.checkpoint_path),
        "metrics": str(out_dir / METRICS_NAME), "png": str(out_dir / PNG_NAME), "world_size": ddp.world_size,
        "module": run.model,  # the trained nn.Module (unwrapped from DDP), for programmatic use
    }
    if not ddp.is_main:
        return result
    final = {k: result[k] for k in ("test_acc", "test_loss", "epochs_done", "completed", "wall_time_s")}
    write_json_atomic({"args": cfg.as_dict(), "epochs": run.history, "final": final, "histograms": histograms},
                      out_dir / METRICS_NAME)
    if run.history:
        plot(out_dir / PNG_NAME, run.history, histograms, f"{cfg.model} ({result['bits']}) on {cfg.dataset}")
    if cfg.export_onnx:
        from ..export import export_trained_model

        export_trained_model(run.model, cfg.export_onnx, in_channels=run.splits.in_channels,
                             image_size=run.splits.image_size)
        log(ddp, f"wrote ONNX model {cfg.export_onnx}")
    log(ddp, f"test accuracy {100 * result['test_acc']:.2f}% after {result['epochs_done']} epochs, "
             f"{wall:.1f} s; wrote {out_dir}/{{{CHECKPOINT_NAME},{METRICS_NAME},{PNG_NAME}}}")
    return result


def train(cfg: TrainConfig, ddp: Dist, device: torch.device) -> Dict[str, Any]:
    """Train ``cfg.model`` as configured; returns its metrics and the trained module."""
    wall_start = time.perf_counter()
    run = _setup(cfg, ddp, device)
    _resume(run, ddp, device)
    cfg = run.cfg
    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, run.start_epoch + cfg.stop_after)
    if ddp.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    log(ddp, f"training {cfg.model} ({cfg.bits_label}) on {cfg.dataset}: {len(run.splits.train)} train / "
             f"{len(run.splits.test)} test images, {cfg.epochs} epochs x {len(run.train_loader)} steps, "
             f"device {device}, {ddp.world_size} process(es), {torch.get_num_threads()} threads")
    test: Dict[str, Any] = {}
    for epoch in range(run.start_epoch, end_epoch):
        test = _run_epoch(run, ddp, epoch, last_of_run=epoch == end_epoch - 1)
    # Every rank must be done with the checkpoint before anyone reads or exits.
    ddp.barrier()
    if not test:  # nothing left to train (resumed a finished run): evaluate it
        test = _evaluate_run(run, ddp, histograms=True)
    return _finish(run, ddp, test, time.perf_counter() - wall_start)


def eval_checkpoint(cfg: TrainConfig, ddp: Dist, device: torch.device) -> Dict[str, Any]:
    """``--eval CHECKPOINT``: test accuracy and code histograms of a saved model."""
    ckpt = load_checkpoint(cfg.eval, "--eval")
    saved = ckpt["args"]
    data_dir = cfg.data_dir if cfg.data_dir is not None else saved.get("data_dir")
    splits = load_dataset(saved["dataset"], data_dir, saved.get("image_size"))
    if (splits.num_classes, splits.in_channels) != (ckpt["num_classes"], ckpt["in_channels"]):
        raise CheckpointError(
            f"--eval={cfg.eval!r}: the model has {ckpt['num_classes']} classes and {ckpt['in_channels']} "
            f"input channels but the data set has {splits.num_classes} and {splits.in_channels}"
        )
    model = model_from_checkpoint(ckpt, "--eval", cfg.eval).to(device)
    if cfg.export_onnx and ddp.is_main:
        from ..export import export_trained_model

        export_trained_model(model, cfg.export_onnx, in_channels=ckpt["in_channels"], image_size=splits.image_size)
        log(ddp, f"wrote ONNX model {cfg.export_onnx}")
    channels_last = cfg.channels_last_on(device.type)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DataLoader(shard(splits.test, ddp), batch_size=256, shuffle=False, num_workers=cfg.workers)
    result = evaluate(model, loader, device, ddp, amp=cfg.amp, channels_last=channels_last, histograms=True)
    result.update(model=saved["model"], bits=bits_label(saved), dataset=saved["dataset"], epoch=ckpt["epoch"],
                  checkpoint=str(cfg.eval), test_acc=result["acc"], test_loss=result["loss"])
    if ddp.is_main:
        print(f"{cfg.eval}: {saved['model']} ({result['bits']}) after epoch {ckpt['epoch']}: test accuracy "
              f"{100 * result['acc']:.2f}% ({result['count']} images), loss {result['loss']:.4f}")
        for name, h in result["histograms"].items():
            total = max(sum(h["counts"]), 1)
            print(f"  {name}: output code fractions {' '.join(f'{c / total:.3f}' for c in h['counts'])}")
    return result


def model_from_checkpoint(ckpt: Dict[str, Any], argument: str = "checkpoint", path: Any = None) -> nn.Module:
    """The trained model of a checkpoint loaded by :func:`load_checkpoint` (on the CPU, train mode)."""
    saved = ckpt["args"]
    model = build_model(saved, ckpt["num_classes"], ckpt["in_channels"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{argument}={str(path)!r}: weights do not fit model {saved['model']!r}: {exc}") from exc
    return model


def _print_comparison(cfg: TrainConfig, results: Dict[str, Dict[str, Any]], summary: Dict[str, Any],
                      device: torch.device, world_size: int) -> None:
    lines = [
        f"{'model':<20} {'precision':<10} {'test accuracy':>14} {'wall time':>10}",
        f"{'-' * 20} {'-' * 10} {'-' * 14} {'-' * 10}",
    ]
    for n, r in results.items():
        lines.append(f"{n:<20} {r['bits']:<10} {100 * r['test_acc']:>13.2f}% {r['wall_time_s']:>9.1f}s")
    lines.append(
        f"{cfg.dataset}, {cfg.epochs} epochs each, {world_size} process(es) on {device}, "
        f"{summary['total_wall_time_s']:.0f} s in all; float - W1A2 = {summary['gap_points']:.2f} points; "
        f"targets (W1A2 >= 97%, within 1.5 points of float): {'met' if summary['targets_met'] else 'NOT met'}"
    )
    lines.append(f"plots: {', '.join(r['png'] for r in results.values())}")
    print("\n".join(lines), flush=True)


def compare(cfg: TrainConfig, ddp: Dist, device: torch.device) -> Dict[str, Any]:
    """``--compare``: train W1A2 LmnetV1Quantize and float LmnetV1 with identical settings."""
    start = time.perf_counter()
    base_out = Path(cfg.out)
    results = {name: train(cfg.for_model(name, str(base_out / name)), ddp, device) for name in COMPARE_MODELS}
    q, f = (results[n] for n in COMPARE_MODELS)
    gap = 100 * (f["test_acc"] - q["test_acc"])
    summary = {
        "dataset": cfg.dataset, "epochs": cfg.epochs,
        "runs": {n: {k: r[k] for k in ("bits", "test_acc", "test_loss", "wall_time_s", "png", "checkpoint")}
                 for n, r in results.items()},
        "gap_points": gap, "targets_met": q["test_acc"] >= 0.97 and gap <= 1.5,
        "total_wall_time_s": time.perf_counter() - start,
    }
    if ddp.is_main:
        write_json_atomic(summary, base_out / "compare.json")
        _print_comparison(cfg, results, summary, device, ddp.world_size)
    return summary


def _apply_process_settings(cfg: TrainConfig) -> Dict[str, Any]:
    """Set threads and determinism for the run; returns the settings to give back afterwards."""
    saved = {"threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
             "benchmark": torch.backends.cudnn.benchmark}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Reproducibility over speed: the same seed must give the same weights.
    torch.backends.cudnn.benchmark = False
    if cfg.deterministic:
        # cuBLAS reads this when it initialises, which has not happened yet.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return saved


def _needed_modules(cfg: TrainConfig) -> List[str]:
    """The optional modules (extras) this run will import, in the order it needs them."""
    needed = []
    if cfg.dataset in ("digits", "image_folder"):
        needed.append("sklearn")  # digits' loader; the 80/20 split
    if cfg.dataset == "image_folder":
        needed.append("PIL")
    if cfg.eval is None:
        needed.append("matplotlib")  # training.png, written after the last epoch
        if not cfg.no_progress and sys.stderr.isatty():
            needed.append("tqdm")  # the progress bar on a terminal
    if cfg.export_onnx:
        needed += ["onnx", "onnxscript"]
    return needed


def check_extras(cfg: TrainConfig) -> None:
    """Import now every optional module the run will need, so that a missing extra stops it before it trains.

    Raises the ``ImportError`` of the first one missing (:func:`torch_ext.train.cli`
    prints it as one line naming the extra to install).
    """
    for name in _needed_modules(cfg):
        importlib.import_module(name)


def _warn_about_slow_settings(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.amp == "fp16" and device.type == "cpu":
        print("python -m torch_ext.train: warning: --amp fp16 on the CPU is many times slower than float32 "
              "(most CPU kernels have no float16 path); use --amp bf16, or no --amp", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return its metrics.

    Returns the training result (``test_acc``, ``history``, ``histograms``,
    file paths, and the trained ``module``), the evaluation result with
    ``--eval``, or the comparison summary with ``--compare``. Errors in
    arguments or data raise ``ValueError`` / ``FileNotFoundError`` /
    :class:`CheckpointError`; :func:`cli` prints them instead.
    """
    cfg = parse_config(argv)
    check_extras(cfg)
    # Process-wide settings this run changes are given back at the end, so
    # that a program calling main() keeps its own.
    saved = _apply_process_settings(cfg)
    ddp = Dist()
    try:
        device = select_device(cfg.device, ddp)
        if ddp.is_main:
            _warn_about_slow_settings(cfg, device)
        ddp.init(device)
        if cfg.eval is not None:
            return eval_checkpoint(cfg, ddp, device)
        if cfg.compare:
            return compare(cfg, ddp, device)
        return train(cfg, ddp, device)
    finally:
        ddp.close()
        torch.set_num_threads(saved["threads"])
        torch.use_deterministic_algorithms(saved["deterministic"])
        torch.backends.cudnn.benchmark = saved["benchmark"]


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Like :func:`main`, printing errors as ``error: ...`` (exit status 2); ``torch_ext.train.cli`` calls it."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"python -m torch_ext.train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0
