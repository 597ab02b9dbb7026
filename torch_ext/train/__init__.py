"""Train Blueoil's classifiers with quantization-aware training.

``python -m torch_ext.train`` trains one model (default: the W1A2
``LmnetV1Quantize`` on scikit-learn's digits) with Blueoil's recipe:
SGD with momentum 0.9, a piecewise-constant learning rate (divided by 10 at
50%, 75% and 87.5% of the steps), weight decay 5e-4 on convolution kernels
only (Blueoil's ``_weight_decay_loss`` regularises variables named
``kernel``), softmax cross-entropy, and pad + random-crop (+ horizontal flip
where it fits) augmentation. The defaults (6 epochs, batch 32, lr 0.1) are
tuned for digits on a 2-core CPU (``make train``; the README has its figures).

One deliberate departure from Blueoil: before each evaluation the batch-norm
statistics are re-estimated on ``--bn-recalibration-images`` training images
(:func:`torch_ext.train.loop.recalibrate_batch_norm`), because Blueoil's
``decay=0.99`` moving averages are meaningless after only a few hundred steps.

Output, in ``--out`` (default ``runs/<model>-<dataset>``), written by rank 0
only: ``metrics.json`` (the options and per-epoch loss/accuracy/lr/time),
``training.png`` (loss and accuracy curves, and a histogram of every
``QuantActivation``'s output codes on the test set) and ``checkpoint.pt``
(written atomically after every epoch, with every random number generator
state, so ``--resume`` continues bit-identically: on the CPU with the same
number of threads, on CUDA with ``--deterministic``).

``--eval CHECKPOINT`` evaluates a saved checkpoint. ``--compare`` trains the
W1A2 ``LmnetV1Quantize`` and the float ``LmnetV1`` the same way and prints
their test accuracies and wall times (``make train``).

Multi-GPU / multi-node: launch with ``torchrun``; when ``WORLD_SIZE`` > 1 the
run joins the process group (NCCL on CUDA, gloo on CPU), wraps the model in
``DistributedDataParallel`` and shards the data with a ``DistributedSampler``.
``--batch-size`` is the *global* batch size, split evenly across processes.

The package's parts:

* :mod:`.config`: the command line and the frozen :class:`TrainConfig`;
* :mod:`.run`: training, ``--eval`` and ``--compare``, ``main`` and ``cli``;
* :mod:`.loop`: one epoch, batch-norm recalibration, evaluation;
* :mod:`.checkpoint`: checkpoints, random number generator state, atomic writes;
* :mod:`.distributed`: process group and device;
* :mod:`.report`: progress, code histograms, the training plot.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Sequence

from .._extras import missing_extra

# Where each public name lives. They are imported on first use, so that a
# missing optional dependency (the 'train' extra) reaches cli() as a clear
# one-line error instead of failing this package's import.
_PUBLIC = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint_atomic": "checkpoint",
    "MODELS": "config",
    "TrainConfig": "config",
    "build_model": "config",
    "build_parser": "config",
    "parse_config": "config",
    "main": "run",
    "model_from_checkpoint": "run",
}

__all__ = sorted([*_PUBLIC, "cli"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point (``torch-ext-train``, ``python -m torch_ext.train``); returns the exit status."""
    try:
        from .run import cli as run_cli

        return run_cli(argv)
    except ImportError as exc:  # importing the command, or a data set's loader, needs an extra
        message = missing_extra(exc)
        if message is None:
            raise
        print(f"python -m torch_ext.train: error: {message}", file=sys.stderr)
        return 2
