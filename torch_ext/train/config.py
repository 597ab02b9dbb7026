"""The command line of ``python -m torch_ext.train`` and the run's configuration.

The parser reads the options; :func:`parse_config` checks them and returns a
:class:`TrainConfig`, a frozen dataclass, so nothing later mutates the run's
settings. The values that depend on the data set (image size, flips) or on
the launch (world size) are filled in once by :meth:`TrainConfig.resolved`,
which returns a new frozen object.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from torch import nn

from .. import data as data_module
from .. import models as models_module
from ..ops import validate_bit, validate_max_value

__all__ = ["MODELS", "RUN_DEFINING_ARGS", "TrainConfig", "build_model", "build_parser", "parse_config"]

MODELS = tuple(models_module.list_models())
# The two models of --compare (`make train`): the W1A2 network and its float twin.
COMPARE_MODELS = ("lmnet_v1_quantize", "lmnet_v1")
# Options that define a run: resuming with different values would not
# continue the same run, so it is refused.
RUN_DEFINING_ARGS = (
    "model", "dataset", "image_size", "epochs", "batch_size", "lr", "lr_milestones", "lr_gamma",
    "momentum", "weight_decay", "pad", "flip", "seed", "activation_bit", "activation_max_value",
    "weight_quantizer", "quantize_first_convolution", "quantize_last_convolution", "dropout", "world_size",
    "bn_recalibration_images", "learn_max_value", "max_value_weight_decay",
)


def _number(name: str, convert, accept, requirement: str):
    """An argparse type: ``convert(text)``, refused unless ``accept(value)``, with a message naming ``name``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{name} must be {requirement}, got {text!r}")
        return value

    return parse


def _positive_int(name: str):
    return _number(name, int, lambda v: v >= 1, "a positive integer")


def _non_negative_float(name: str):
    return _number(name, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def _milestones(text: str) -> Tuple[float, ...]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr-milestones must be comma-separated fractions in (0, 1), got {text!r}"
        ) from None
    if any(not 0.0 < v < 1.0 for v in values) or values != sorted(values):
        raise argparse.ArgumentTypeError(f"--lr-milestones must be increasing fractions in (0, 1), got {text!r}")
    return tuple(values)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), without the usage."""

    def error(self, message: str):
        # argparse writes "argument --epochs: --epochs must be ..." for our own
        # type errors, which already name the option.
        message = re.sub(r"^argument (\S+): (?=\1\b)", "", message)
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless there is no default or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling, augmentation and dropout")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lmnet_v1_quantize", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--dropout", type=float, default=0.5, help="LMNet dropout before conv7")
    p.add_argument("--activation-bit", type=int, default=2, help="QuantActivation bit (1..16, or 32: clip only)")
    p.add_argument("--activation-max-value", type=float, default=2.0, help="QuantActivation max_value")
    p.add_argument("--learn-max-value", default=None, choices=["pact", "lsq"],
                   help="learn each QuantActivation's max_value with PACT's or LSQ's gradient (default: fixed)")
    p.add_argument("--max-value-weight-decay", type=_non_negative_float("--max-value-weight-decay"), default=0.0,
                   help="L2 penalty on the learned max_values (PACT's regularizer; SGD weight decay of their group)")
    p.add_argument("--weight-quantizer", default=None, choices=sorted(models_module.WEIGHT_QUANTIZERS),
                   help="weight quantizer of the quantized models; binary, binary-channel-wise are short for "
                        "binary_mean_scaling, binary_channel_wise_mean_scaling (default: the model's, as in "
                        "Blueoil: binary_channel_wise_mean_scaling for darknet_quantize, else binary_mean_scaling)")
    p.add_argument("--quantize-first-convolution", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the first convolution's weights (default: the model's, as in Blueoil: "
                        "False for lm_resnet_quantize, else True)")
    p.add_argument("--quantize-last-convolution", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the last convolution's weights (default: the model's, as in Blueoil: "
                        "False for the lmnet*_quantize models, True for sample_network_quantize and "
                        "darknet_quantize; lm_resnet_quantize's classifier is never quantized)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--no-progress", action="store_true", help="no progress output during an epoch")
    p.add_argument("--compare", action="store_true",
                   help="train W1A2 lmnet_v1_quantize and float lmnet_v1 the same way and compare them")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m torch_ext.train`` argument parser."""
    p = _Parser(
        prog="python -m torch_ext.train",
        description="Quantization-aware training of Blueoil's LMNet / sample networks.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--dataset", default="digits",
                   help=f"one of {', '.join(data_module.DATASETS)}: digits is scikit-learn's (8x8, bundled); "
                        "cifar10 and image_folder are read from --data-dir, never downloaded")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="cifar10: the folder of CIFAR-10's python batches, DIR/data_batch_1 .. DIR/data_batch_5 "
                        "and DIR/test_batch (or DIR/cifar-10-batches-py/...); image_folder: one sub-folder of "
                        "images a class, DIR/<class>/*.png (or .jpg, ...), split 80/20 with a fixed seed, or "
                        "DIR/train/<class>/* and DIR/test/<class>/* (or DIR/val/<class>/*) as given")
    p.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                   help="input height and width (default 32)")
    _add_model_options(p)
    _add_recipe_options(p)
    _add_run_options(p)
    return p


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run's settings, checked; the fields are the command line's options."""

    dataset: str
    data_dir: Optional[str]
    image_size: Optional[int]
    model: str
    dropout: float
    activation_bit: int
    activation_max_value: float
    weight_quantizer: str
    quantize_first_convolution: bool
    quantize_last_convolution: bool
    epochs: int
    batch_size: int
    lr: float
    lr_milestones: Tuple[float, ...]
    lr_gamma: float
    momentum: float
    weight_decay: float
    pad: int
    flip: Optional[bool]
    bn_recalibration_images: int
    seed: int
    device: Optional[str]
    amp: Optional[str]
    channels_last: Optional[bool]
    out: str
    resume: Optional[str]
    eval: Optional[str]
    export_onnx: Optional[str]
    stop_after: Optional[int]
    deterministic: bool
    threads: Optional[int]
    workers: int
    no_progress: bool
    compare: bool
    world_size: int = 1
    learn_max_value: Optional[str] = None
    max_value_weight_decay: float = 0.0

    def resolved(self, *, image_size: int, flip: bool, world_size: int) -> "TrainConfig":
        """The configuration with the values only the data set and the launch know."""
        return dataclasses.replace(self, image_size=image_size, flip=flip, world_size=world_size)

    def for_model(self, model: str, out: str) -> "TrainConfig":
        """The same run for another model (``--compare``), with that model's defaults."""
        return dataclasses.replace(
            self, model=model, out=out, compare=False,
            quantize_first_convolution=_model_default(model, "quantize_first_convolution", None),
            quantize_last_convolution=_model_default(model, "quantize_last_convolution", None),
        )

    def as_dict(self) -> Dict[str, Any]:
        """JSON- and checkpoint-safe dict of every field (what ``metrics.json`` and checkpoints store)."""
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    def channels_last_on(self, device_type: str) -> bool:
        return (device_type == "cuda") if self.channels_last is None else self.channels_last

    @property
    def bits_label(self) -> str:
        return bits_label(self.as_dict())


#: Weight quantizers with three levels (+a, 0, -b): two bits a weight.
TERNARY_WEIGHT_QUANTIZERS = ("ttq", "twn")


def bits_label(args: Dict[str, Any]) -> str:
    """``W1A2``-style label of a model's precision (``float`` for the float models; ``W2`` for ternary weights)."""
    if not args["model"].endswith("_quantize"):
        return "float"
    a = "float" if args["activation_bit"] == 32 else str(args["activation_bit"])
    w = "2" if args.get("weight_quantizer") in TERNARY_WEIGHT_QUANTIZERS else "1"
    return f"W{w}A{a}"


def _weight_quantizer_name(model: str, given: Optional[str]) -> str:
    """The full name of ``given`` (an alias resolved), or of the model's own default weight quantizer."""
    aliases = models_module.WEIGHT_QUANTIZER_ALIASES
    if given is not None:
        return aliases.get(given, given)
    parameter = inspect.signature(models_module.get_model_builder(model)).parameters.get("weight_quantizer")
    default = parameter.default if parameter is not None else None
    if isinstance(default, str):
        return aliases.get(default, default)
    for name, quantizer in models_module.WEIGHT_QUANTIZERS.items():
        if quantizer is default and name not in aliases:
            return name
    return "binary_mean_scaling"  # float models: unused, recorded as before


def _model_default(model: str, option: str, given: Optional[bool]) -> bool:
    """``given``, or the model's own constructor default for ``option`` (False where it has none)."""
    if given is not None:
        return given
    parameter = inspect.signature(models_module.get_model_builder(model)).parameters.get(option)
    return bool(parameter.default) if parameter is not None else False


def _renamed(option: str, argument: str, exc: Exception) -> Exception:
    """The functional API's message for a bad ``argument``, naming the command-line ``option`` instead."""
    message = str(exc).split(": ", 1)[-1] if str(exc).startswith("linear_mid_tread_half_quantize") else str(exc)
    message = message.replace(f"{argument}=", "").replace(f"{argument} ", f"{option} ", 1)
    return type(exc)(message)


def _check(args: argparse.Namespace) -> None:
    """Refuse bad values and combinations with messages naming the option and the value."""
    if args.model not in MODELS:
        raise ValueError(f"--model={args.model!r} is unknown; choose one of {list(MODELS)}")
    if args.dataset not in data_module.DATASETS:
        raise ValueError(f"--dataset={args.dataset!r} is unknown; choose one of {list(data_module.DATASETS)}")
    for option, value in (("--pad", args.pad), ("--bn-recalibration-images", args.bn_recalibration_images),
                          ("--workers", args.workers)):
        if value < 0:
            raise ValueError(f"{option} must be >= 0, got {value}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    for option, argument, validate, value in (
        ("--activation-bit", "bit", validate_bit, args.activation_bit),
        ("--activation-max-value", "max_value", validate_max_value, args.activation_max_value),
    ):
        try:
            validate(value)
        except (TypeError, ValueError) as exc:
            raise _renamed(option, argument, exc) from None
    if args.eval is not None and (args.resume is not None or args.compare):
        raise ValueError("--eval cannot be combined with --resume or --compare")
    if args.compare and args.resume not in (None, "auto"):
        raise ValueError(
            f"--compare trains two models and resumes each from its own folder: use --resume without a path, "
            f"got --resume={args.resume!r}"
        )


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse and check ``argv`` (default ``sys.argv[1:]``) into a :class:`TrainConfig`.

    ``argparse`` exits (status 2) on malformed options; values that parse but
    are refused raise ``ValueError`` naming the option.
    """
    args = build_parser().parse_args(argv)
    _check(args)
    values = vars(args)
    if args.out is None:
        values["out"] = str(Path("runs") / ("compare" if args.compare else f"{args.model}-{args.dataset}"))
    values["lr_milestones"] = tuple(args.lr_milestones)
    for option in ("quantize_first_convolution", "quantize_last_convolution"):
        values[option] = _model_default(args.model, option, values[option])
    values["weight_quantizer"] = _weight_quantizer_name(args.model, values["weight_quantizer"])
    return TrainConfig(**values)


def build_model(config: Dict[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    """The network a run trains, from its options (a :meth:`TrainConfig.as_dict` or a checkpoint's ``args``)."""
    name = config["model"]
    kwargs: Dict[str, Any] = {"num_classes": num_classes, "in_channels": in_channels}
    parameters = inspect.signature(models_module.get_model_builder(name)).parameters
    if "activation_quantizer_kwargs" in parameters:
        kwargs.update(
            activation_quantizer_kwargs={"bit": config["activation_bit"], "max_value": config["activation_max_value"],
                                         **({"learn_max_value": config["learn_max_value"]}
                                            if config.get("learn_max_value") else {})},
            weight_quantizer=config["weight_quantizer"],
            quantize_first_convolution=config["quantize_first_convolution"],
            quantize_last_convolution=config["quantize_last_convolution"],
        )
    if "dropout" in parameters:
        kwargs["dropout"] = config["dropout"]
    return models_module.get_model(name, **kwargs)

