"""``python -m benchmarks.bench --learnable`` and ``--deploy``: the other benchmarks, behind the same options.

Each mode honours the options it can and refuses the others, in one line
naming the option and why, rather than ignoring them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch_ext._timing import _log

from ._common import BIT, QUICK_SIZES, check_devices, reuse_if_asked

_UNSET = object()

# What each mode cannot honour, whatever the value: option dest -> (the option, why).
_TRAIN_ONLY = "it times no training step"
_TRAIN_OPTIONS = {
    "train_step": ("--train-step/--no-train-step", _TRAIN_ONLY),
    "only_train_step": ("--only-train-step", _TRAIN_ONLY),
    "train_batch": ("--train-batch", _TRAIN_ONLY),
    "train_repeats": ("--train-repeats", _TRAIN_ONLY),
    "train_amp": ("--train-amp", _TRAIN_ONLY),
    "train_channels_last": ("--train-channels-last", _TRAIN_ONLY),
    "train_models": ("--train-models", _TRAIN_ONLY),
}
LEARNABLE_REFUSES = {
    "deploy": ("--deploy", "choose one of --learnable and --deploy"),
    **_TRAIN_OPTIONS,
}
DEPLOY_REFUSES = {
    "sizes": ("--sizes", "it times LMNet at batch sizes 1 and 64 (python -m benchmarks.bench_deploy --batch-sizes)"),
    "dtypes": ("--dtypes", "it times its float32 models only"),
    "layouts": ("--layouts", "it times images in the models' own layout"),
    "warmup": ("--warmup", "its warm-up is fixed at 2 calls a candidate"),
    "quick": ("--quick", "it has no quick mode (python -m benchmarks.bench_deploy --batch-sizes 1 --repeats 3 "
                         "--no-onnx)"),
    **_TRAIN_OPTIONS,
}


def _argv_list(argv: Optional[Sequence[str]]) -> List[str]:
    return list(argv) if argv is not None else sys.argv[1:]


def _given(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Dict[str, object]:
    """The options given on the command line (dest -> value), defaults left out."""
    dests = vars(parser.parse_args(argv))
    ns = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    return {dest: value for dest, value in vars(ns).items() if value is not _UNSET}


def _refuse(mode: str, given: Dict[str, object], refused: Dict[str, Tuple[str, str]]) -> None:
    for dest in given:
        if dest in refused:
            option, why = refused[dest]
            raise SystemExit(f"{mode}: cannot honour {option}: {why}")


def run_learnable(args: argparse.Namespace, argv: Optional[Sequence[str]],
                  parser: Callable[[], argparse.ArgumentParser]) -> int:
    """``--learnable``: :func:`benchmarks.bench_learnable.benchmark` over the options; the exit status."""
    from . import bench_learnable  # only this mode needs it

    given = _given(parser(), argv)
    _refuse("--learnable", given, LEARNABLE_REFUSES)
    other = [layout for layout in args.layouts if layout != "contiguous"]
    if other:
        raise SystemExit(f"--learnable: cannot honour --layouts {','.join(other)}: it times contiguous vectors only")
    dtypes = args.dtypes if "dtypes" in given else ["float32"]
    other = [d for d in dtypes if d not in bench_learnable.DTYPES]
    if other:
        raise SystemExit(f"--learnable: cannot honour --dtypes {','.join(other)}: it times "
                         f"{', '.join(bench_learnable.DTYPES)}")
    devices = check_devices(args.devices)
    quick = {"sizes": list(QUICK_SIZES), "repeats": 3, "warmup": 1} if args.quick else {}
    sizes = args.sizes or quick.get("sizes") or [bench_learnable.DEFAULT_NUMEL]
    repeats = args.repeats if args.repeats is not None else quick.get("repeats", bench_learnable.DEFAULT_REPEATS)
    warmup = args.warmup if args.warmup is not None else quick.get("warmup", bench_learnable.DEFAULT_WARMUP)
    threads = args.threads if args.threads is not None else bench_learnable.DEFAULT_THREADS
    reuse = reuse_if_asked(args)
    bench_learnable.benchmark(devices, sizes, dtypes, repeats, warmup, threads, BIT, args.json,
                              meta={"argv": _argv_list(argv), "reuse_freed_memory": reuse})
    if args.json:
        _log(f"wrote {args.json}")
    return 0


def run_deploy(args: argparse.Namespace, argv: Optional[Sequence[str]],
               parser: Callable[[], argparse.ArgumentParser]) -> int:
    """``--deploy``: :func:`benchmarks.bench_deploy.main` with the options it honours; the exit status."""
    from . import bench_deploy  # only this mode needs it

    given = _given(parser(), argv)
    _refuse("--deploy", given, DEPLOY_REFUSES)
    other = [d for d in (args.devices or []) if d != "cpu"]
    if other:
        raise SystemExit(f"--deploy: cannot honour --devices {','.join(other)}: the deployed model runs on the CPU "
                         "only")
    reuse_if_asked(args)
    forwarded: List[str] = []
    for option, value in (("--threads", args.threads), ("--repeats", args.repeats), ("--json", args.json)):
        if value is not None:
            forwarded += [option, str(value)]
    bench_deploy.main(forwarded)
    return 0
