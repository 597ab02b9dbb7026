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

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint_atomic
from .config import MODELS, TrainConfig, build_model, build_parser, parse_config
from .run import cli, main, model_from_checkpoint

__all__ = [
    "MODELS",
    "CheckpointError",
    "TrainConfig",
    "build_model",
    "build_parser",
    "cli",
    "load_checkpoint",
    "main",
    "model_from_checkpoint",
    "parse_config",
    "save_checkpoint_atomic",
]
