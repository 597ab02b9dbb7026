"""Benchmarks of the linear mid-tread half quantizer against its peers.

Run ``python -m benchmarks.bench`` from the repository root (``make bench``;
the benchmarks are not part of the installed package). Two parts:

* **Operator benchmark.** Forward, backward and forward+backward of
  ``torch_ext`` next to the memory-limit yardsticks (``torch.relu`` out of
  place and a plain copy), ``torch.fake_quantize_per_tensor_affine``, the
  composite a user writes by hand (a straight-through ``autograd.Function``
  over the formula's eager tensor ops: :mod:`torch_ext.reference`) and that composite
  under ``torch.compile``; float32 and bfloat16, a small and a large size, on
  the CPU and, where one is visible, on CUDA.
* **Training-step benchmark.** One SGD step of ``LmnetV1Quantize`` against
  its float/ReLU twin ``LmnetV1`` at 32x32 (``--train-models lm_resnet``:
  also Blueoil's ResNet-18 with QuantActivation against the same with ReLU).

``--learnable`` runs :mod:`benchmarks.bench_learnable` and ``--deploy``
:mod:`benchmarks.bench_deploy` instead, with the options they can honour.

How it measures:

* Every candidate is warmed up first (``torch.compile`` compiles there,
  outside the timing; a failure is reported as n/a with its reason). The
  candidates of one case are then timed round-robin, one sample each per
  round, with the order rotated every round, so that the noise of a shared
  machine hits them all alike; the figure is the median over the rounds. A
  sample repeats the call enough times to last a millisecond or two (small
  sizes) and divides. CUDA samples are timed with CUDA events.
* The forward is the training forward: the input requires grad, so each
  candidate also saves what its backward needs. The backward is timed alone,
  given one forward graph (``torch.autograd.grad(..., retain_graph=True)``;
  the copy yardstick's backward is a copy). Forward+backward runs both.
* Bytes are counted honestly, per element: a forward reads ``x`` and writes
  ``y`` plus whatever it saves for backward that is neither ``x`` nor ``y``
  (torch_ext's 1-bit mask: 1/8 byte; fake_quantize's bool mask: 1 byte); a
  backward reads ``grad_y`` and what was saved (relu: ``y``; the composite:
  ``x``), and writes ``grad_x``. What is saved is measured with
  ``torch.autograd.graph.saved_tensors_hooks``, not assumed.
* ``ext/peer`` is torch_ext's median time divided by the peer's (below 1:
  torch_ext is faster). ``%copy`` is a figure's GB/s as a fraction of the
  device's copy bandwidth (``dst.copy_(src)`` into a preallocated tensor of
  the large size), measured in the same run.
* The compiled composite is compiled with ``donated_buffer=False``: a donated
  buffer forbids ``retain_graph=True``, and nothing could be donated here
  anyway (its saved bool mask is smaller than ``grad_x``).

Reading CPU figures: with glibc's default allocator every float32 output of
16M elements (64 MiB) is a fresh ``mmap``, so each out-of-place call pays a
page fault per 4 KiB of output, the same for every candidate; that cost can
exceed the kernel's. ``--reuse-freed-memory`` keeps freed blocks for reuse (as
jemalloc or tcmalloc do) and shows the kernels themselves. On a shared,
oversubscribed machine each ATen OpenMP region also waits for its second
thread to be scheduled; the ``min`` column shows what the quietest round got.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import torch_ext
from torch_ext._timing import _log, interleaved_medians

if not __package__:  # run as a file: the relative imports below need the package
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.bench")

from . import _modes
from ._common import (
    BIT, DEFAULT_SIZES, DTYPES, IMAGE_SHAPE, LAYOUTS, MAX_VALUE, QUICK_SIZES, check_devices, csv_list, parse_size,
    reuse_if_asked, size_name,
)
from ._operator import CANDIDATES, OPS, Result, bench_case, copy_bandwidth, no_donated_buffers
from ._report import Report, print_table, print_targets, print_train, targets
from ._train_step import TRAIN_MODELS, bench_train_step

__all__ = ["CANDIDATES", "OPS", "TRAIN_MODELS", "interleaved_medians", "main"]


def _sizes(text: str) -> List[int]:
    """``--sizes``: comma-separated element counts, K/M/G suffixes allowed."""
    return [parse_size(t) for t in csv_list(text)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=csv_list, default=None,
                   help="comma-separated: cpu,cuda (default: cpu, and cuda when one is visible; --deploy: cpu only)")
    p.add_argument("--dtypes", type=csv_list, default=["float32", "bfloat16"],
                   help="default: float32,bfloat16 (--learnable: float32; it times float32 and bfloat16)")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="element counts, K/M/G suffixes allowed (default: 64K,16M on CPU; 64K,256M on CUDA; "
                        "--learnable: 16M)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds per case (default 9 CPU, 30 CUDA; --learnable 15; --deploy 30)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls per candidate (default 2 CPU, 5 CUDA; --learnable 1)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="CPU: make glibc reuse freed blocks (as jemalloc/tcmalloc do) instead of mapping each "
                        "large output afresh, so that page faults do not hide the kernels' cost")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; --learnable and --deploy: 2)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: small size, few rounds, tiny batch")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--train-step", dest="train_step", action="store_true", default=None,
                   help="run the training-step benchmark (the default)")
    p.add_argument("--no-train-step", dest="train_step", action="store_false", help="skip it")
    p.add_argument("--only-train-step", action="store_true", help="skip the operator benchmark")
    p.add_argument("--train-batch", type=int, default=None,
                   help="batch of the training step (default 256 on CUDA, 32 on CPU; 2 with --quick)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed rounds of the training step")
    p.add_argument("--train-amp", default=None, metavar="DTYPE",
                   help="autocast the training step to bfloat16 or float16 (default: no autocast)")
    p.add_argument("--train-channels-last", action="store_true",
                   help="the training step's images and models in channels_last memory format")
    p.add_argument("--train-models", type=csv_list, default=["lmnet_v1"],
                   help="the training-step pairs, of " + ", ".join(TRAIN_MODELS) + " (default lmnet_v1): "
                        "LmnetV1Quantize vs LmnetV1; LmResnet with QuantActivation (float weights) vs LmResnet")
    p.add_argument("--layouts", type=csv_list, default=["contiguous"],
                   help="memory layouts of the operator cases: contiguous (a vector) and/or channels_last "
                        "(images [N, 64, 32, 32]; sizes must be multiples of 64K)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile'd composite (its compilation takes tens of seconds a case)")
    p.add_argument("--learnable", action="store_true",
                   help="benchmark the learnable max_value (PACT, LSQ) against the fixed operator, torch's "
                        "learnable fake-quantize, relu and copy instead (benchmarks.bench_learnable); honours "
                        "--devices, --sizes, --dtypes, --repeats, --warmup, --threads, --quick, --json, "
                        "--reuse-freed-memory and refuses the options it cannot honour")
    p.add_argument("--deploy", action="store_true",
                   help="benchmark the deployed (bit-packed) LMNet against the float and fake-quantized models "
                        "instead (benchmarks.bench_deploy); honours --threads, --repeats, --json, --devices cpu, "
                        "--reuse-freed-memory and refuses the options it cannot honour")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for option, values, known in (("--dtypes", args.dtypes, DTYPES), ("--layouts", args.layouts, LAYOUTS),
                                  ("--train-models", args.train_models, TRAIN_MODELS)):
        for v in values:
            if v not in known:
                raise SystemExit(f"{option}: unknown value {v!r} ({', '.join(known)})")
    if args.train_amp is not None and args.train_amp not in ("bfloat16", "float16"):
        raise SystemExit(f"--train-amp: must be bfloat16 or float16, got {args.train_amp!r}")
    if "channels_last" in args.layouts and args.sizes:
        bad = [n for n in args.sizes if n % math.prod(IMAGE_SHAPE)]
        if bad:
            raise SystemExit(f"--sizes: channels_last cases need multiples of {math.prod(IMAGE_SHAPE)} elements, "
                             f"got {', '.join(map(str, bad))}")


def _defaults(args: argparse.Namespace, dev_name: str) -> Dict[str, object]:
    """Sizes, rounds and warm-up calls for ``dev_name``: the options where given, else the device's defaults."""
    if args.quick:
        sizes, repeats, warmup, train = QUICK_SIZES, 3, 1, (2, 1, 0)
    elif dev_name == "cpu":
        sizes, repeats, warmup, train = DEFAULT_SIZES[dev_name], 9, 2, (32, 5, 1)
    else:
        sizes, repeats, warmup, train = DEFAULT_SIZES[dev_name], 30, 5, (256, 20, 3)
    return {
        "sizes": args.sizes or list(sizes),
        "repeats": args.repeats or repeats,
        "warmup": args.warmup if args.warmup is not None else warmup,
        "train_batch": args.train_batch or train[0],
        "train_repeats": args.train_repeats or train[1],
        "train_warmup": train[2],
    }


def _bench_device(args: argparse.Namespace, dev_name: str, copy_gbps: Dict[str, float],
                  report: Report) -> Tuple[List[Result], List[Dict[str, object]]]:
    """Every operator case and the training step on one device: (results, training-step records)."""
    device = torch.device(dev_name)
    d = _defaults(args, dev_name)
    results: List[Result] = []
    if not args.only_train_step:
        _log(f"{dev_name}: copy bandwidth at {size_name(max(d['sizes']))} float32")
        copy_gbps[dev_name] = copy_bandwidth(device, max(d["sizes"]), d["repeats"], d["warmup"])
        with no_donated_buffers():  # the backward timing needs retain_graph=True
            for layout in args.layouts:
                for dtype_name in args.dtypes:
                    for numel in d["sizes"]:
                        results += bench_case(device, DTYPES[dtype_name], numel, d["repeats"], d["warmup"],
                                              copy_gbps[dev_name], layout, not args.no_compile)
                        report.save(results)
    train = []
    if args.train_step is not False:
        for model in args.train_models:
            train.append(bench_train_step(device, d["train_batch"], d["train_repeats"], d["train_warmup"],
                                          amp=args.train_amp, channels_last=args.train_channels_last,
                                          model=model))
    return results, train


def _meta(argv: Optional[Sequence[str]], devices: List[str], reuse: Optional[bool]) -> Dict[str, object]:
    return {
        "torch": torch.__version__,
        "torch_ext": torch_ext.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "bit": BIT,
        "max_value": MAX_VALUE,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "cuda_device": torch.cuda.get_device_name() if "cuda" in devices else None,
        "cuda": torch.version.cuda if "cuda" in devices else None,
        "reuse_freed_memory": reuse,
    }


def _footer(meta: Dict[str, object], reuse: Optional[bool], elapsed: float) -> str:
    return (f"\n(torch {meta['torch']}, {meta['threads']} threads, CPU capability {meta['cpu_capability']}"
            + (f", {meta['cuda_device']}, CUDA {meta['cuda']}" if meta["cuda_device"] else "")
            + (", freed memory reused (glibc mallopt)" if reuse else "")
            + f"; {elapsed:.0f} s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.bench``: print the tables (and write ``--json``); returns the exit status."""
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.learnable:
        return _modes.run_learnable(args, argv, _parser)
    if args.deploy:
        return _modes.run_deploy(args, argv, _parser)
    devices = check_devices(args.devices)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reuse = reuse_if_asked(args)
    started = time.perf_counter()
    meta = _meta(argv, devices, reuse)
    copy_gbps: Dict[str, float] = {}
    report = Report(args.json, meta, copy_gbps)
    for dev_name in devices:
        dev_results, dev_train = _bench_device(args, dev_name, copy_gbps, report)
        report.results += dev_results
        report.train += dev_train
        report.save()
    found = targets(report.results, report.train)
    if report.results:
        print_table(report.results, copy_gbps)
    print_train(report.train)
    print_targets(found)
    elapsed = time.perf_counter() - started
    print(_footer(meta, reuse, elapsed))
    if args.json:
        report.save(targets=found, elapsed_s=elapsed)
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
