"""Speed of a deployed (bit-packed) LmnetV1Quantize against the float models, side by side.

    python -m benchmarks.bench_deploy [--batch-sizes 1 64] [--threads 2] [--repeats 30] [--no-onnx] [--no-aoti]
                                      [--json PATH]

from the repository root (``python -m benchmarks.bench --deploy`` runs the same
with the options it can honour).

Candidates, all on the CPU with the same thread count, LmnetV1Quantize
(W1A2) at 32x32, 10 classes:

* ``deployed_aoti``: :func:`torch_ext.deploy.convert` of the W1A2 model,
  ``torch.export``-ed and compiled by AOTInductor (the ``.pt2`` that
  ``python -m torch_ext.deploy`` writes and LibTorch runs), loaded back;
* ``deployed_exported``: the same ExportedProgram, its module run;
* ``deployed``: the converted model, eager;
* ``deployed_script``: the same, ``torch.jit.script``-ed (TorchScript,
  deprecated in torch 2.14; ``aoti=False`` leaves the package out, which
  takes ~25 s to compile);
* ``float_lmnet``: PyTorch eval of the float ``LmnetV1``;
* ``w1a2_pytorch``: PyTorch eval of the W1A2 ``LmnetV1Quantize`` (float arithmetic);
* ``w1a2_onnxruntime``: onnxruntime on ``torch_ext.export_onnx`` of the W1A2
  model (when onnx and onnxruntime are installed).

Timing: the benchmarks' interleaving loop
(:func:`torch_ext._timing.interleaved_medians`): the candidates alternate in
rounds (a sample repeats a call enough to last a couple of milliseconds), so
a busy machine slows them alike; each figure is the median over the rounds.
The per-layer table times each packed stage alone on its real input the same
way and gives its rate in binary operations a second:
``2 * N * Ho * Wo * O * C * kh * kw * bit`` (an AND and a popcount-add for
each pair of a weight bit and an activation bit-plane bit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import torch
from torch import nn

from torch_ext._timing import interleaved_medians
from torch_ext.deploy import _stages as st
from torch_ext.deploy import package
from torch_ext.deploy.converter import DeployedModel, convert, float_weight_bytes

IMAGE_SIZE = 32


def _models(seed: int = 0):
    from torch_ext.models import LmnetV1, LmnetV1Quantize

    torch.manual_seed(seed)
    quant = LmnetV1Quantize(num_classes=10, in_channels=3)
    flt = LmnetV1(num_classes=10, in_channels=3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (quant, flt):
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    # Statistics of a trained model's order of magnitude, so every code occurs.
                    m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return quant.eval(), flt.eval()


def _load_average() -> Optional[float]:
    """The 1-minute load average (other work on the machine slows every candidate), where the OS tells it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median seconds a call of each function on the CPU, sampled round-robin in interleaved rounds."""
    return {name: median for name, (median, _) in interleaved_medians(fns, torch.device("cpu"), repeats,
                                                                       warmup).items()}


def _onnx_runner(model: nn.Module, batch: int, threads: int, folder: str) -> Optional[Callable[[torch.Tensor], Any]]:
    try:
        import onnxruntime as ort

        from torch_ext import export_onnx
    except ImportError:
        return None
    path = str(Path(folder) / f"lmnet_w1a2_b{batch}.onnx")
    try:
        export_onnx(model, torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE), path)
    except Exception as exc:  # the exporter's extra packages missing, ...
        print(f"(onnxruntime candidate left out: export failed: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def _packed_layers(deployed, x: torch.Tensor) -> List[Dict[str, Any]]:
    """Each packed convolution stage with its input and its binary-operation count."""
    layers = []
    with torch.no_grad():
        for i, stage in enumerate(deployed.stages):
            if isinstance(stage, (st.PackedConvThresholdStage, st.PackedConvAffineStage)):
                out = stage(x)
                n, ho, wo = x.shape[0], out.shape[1 if out.dim() == 5 else 2], out.shape[2 if out.dim() == 5 else 3]
                o, kh, kw = stage.weight.shape[:3]
                bit = x.shape[3]
                ops = 2 * n * ho * wo * o * stage.in_channels * kh * kw * bit
                layers.append(dict(index=i, name=stage.key or f"stage{i}", kind=type(stage).__name__, input=x,
                                   stage=stage, binary_ops=ops, shape=f"{stage.in_channels}->{o} {kh}x{kw} "
                                   f"{x.shape[1]}x{x.shape[2]} a{bit}"))
                x = out
            else:
                x = stage(x)
    return layers


def run(batch_sizes: Sequence[int] = (1, 64), threads: int = 2, repeats: int = 30,
        out: Optional[TextIO] = None, onnx: bool = True, aoti: bool = True) -> Dict[str, Any]:
    """Measure the candidates and the per-layer rates; print the tables to ``out``; return the figures.

    ``onnx=False`` leaves out the onnxruntime candidate (its export takes a
    while), ``aoti=False`` the AOTInductor package (~25 s to compile). The
    figures: ``batches`` (batch -> candidate -> ``seconds``,
    ``speedup_vs_float``), ``layers`` (batch -> one record a packed layer),
    ``weight_bytes``, the load averages before and after.
    """
    out = out if out is not None else sys.stdout  # looked up now: a test may have replaced it
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(batch_sizes, threads, repeats, out, onnx, aoti)
    finally:
        torch.set_num_threads(threads_before)


def _print_header(result: Dict[str, Any], out: TextIO) -> None:
    wb = result["weight_bytes"]
    print(f"Deployed LmnetV1Quantize (W1A2) vs float, {IMAGE_SIZE}x{IMAGE_SIZE}, {result['threads']} threads, "
          f"median of {result['repeats']} interleaved rounds; {os.cpu_count()} CPUs, load average "
          f"{result['load_average_before']}", file=out)
    print(f"weights: deployed {wb['deployed']} bytes, float LmnetV1 {wb['float_lmnet']} bytes "
          f"({wb['float_lmnet'] / wb['deployed']:.1f}x smaller)", file=out)
    print(f"{'batch':>5}  {'candidate':<18} {'ms/batch':>10} {'ms/image':>10} {'float/this':>10}", file=out)


def _candidates(models: Dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor,
                onnx_runner: Optional[Callable[[torch.Tensor], Any]]) -> Dict[str, Callable[[], Any]]:
    """Each candidate's call on ``x``, in table order (the package first, where there is one)."""
    fns = {name: (lambda m=model: m(x)) for name, model in models.items() if model is not None}
    if onnx_runner is not None:
        fns["w1a2_onnxruntime"] = lambda: onnx_runner(x)
    return fns


def _time_batch(fns: Dict[str, Callable[[], Any]], batch: int, repeats: int, out: TextIO) -> Dict[str, Any]:
    """Time the candidates at one batch, print a row each: candidate -> seconds, speed-up over float."""
    medians = _interleaved(fns, repeats)
    rows = {}
    for name, seconds in medians.items():
        speedup = medians["float_lmnet"] / seconds
        rows[name] = {"seconds": seconds, "speedup_vs_float": speedup}
        print(f"{batch:>5}  {name:<18} {1e3 * seconds:>10.3f} {1e3 * seconds / batch:>10.4f} "
              f"{speedup:>9.2f}x", file=out)
    return rows


def _time_layers(deployed: DeployedModel, x: torch.Tensor, batch: int, repeats: int,
                 out: TextIO) -> List[Dict[str, Any]]:
    """Time each packed layer alone on its real input, print its rate in binary operations a second."""
    layers = _packed_layers(deployed, x)
    layer_fns = {f"{layer['index']}": (lambda s=layer["stage"], i=layer["input"]: s(i)) for layer in layers}
    layer_medians = _interleaved(layer_fns, repeats)
    print(f"\n  packed layers at batch {batch}:", file=out)
    print(f"  {'layer':<12} {'conv':<28} {'output':<10} {'ms':>8} {'Gbop/s':>8}", file=out)
    rows = []
    for layer in layers:
        seconds = layer_medians[f"{layer['index']}"]
        rate = layer["binary_ops"] / seconds / 1e9
        kind = "codes" if layer["kind"] == "PackedConvThresholdStage" else "float"
        print(f"  {layer['name']:<12} {layer['shape']:<28} {kind:<10} {1e3 * seconds:>8.3f} {rate:>8.1f}", file=out)
        rows.append({"layer": layer["name"], "conv": layer["shape"], "output": kind, "seconds": seconds,
                     "binary_ops": layer["binary_ops"], "gbops": rate})
    return rows


def _run(batch_sizes, threads, repeats, out, onnx, aoti) -> Dict[str, Any]:
    import warnings

    quant, flt = _models()
    deployed = convert(quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: a candidate on purpose
        scripted = torch.jit.script(deployed)
    example = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    exported = package.export(deployed, example).module()
    result: Dict[str, Any] = {
        "threads": threads, "repeats": repeats, "image_size": IMAGE_SIZE,
        "weight_bytes": {"deployed": deployed.weight_bytes(), "float_lmnet": float_weight_bytes(flt),
                         "w1a2_pytorch": float_weight_bytes(quant)},
        "batches": {}, "layers": {},
    }
    result["load_average_before"] = _load_average()
    _print_header(result, out)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        packaged = package.load(package.write(deployed, example, os.path.join(folder, "deployed.pt2"))) \
            if aoti else None
        models = {"deployed_aoti": packaged, "deployed_exported": exported, "deployed": deployed,
                  "deployed_script": scripted, "float_lmnet": flt, "w1a2_pytorch": quant}
        for batch in batch_sizes:
            x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
            runner = _onnx_runner(quant, batch, threads, folder) if onnx else None
            result["batches"][str(batch)] = _time_batch(_candidates(models, x, runner), batch, repeats, out)
            result["layers"][str(batch)] = _time_layers(deployed, x, batch, repeats, out)
            print("", file=out)
    result["load_average_after"] = _load_average()
    print(f"load average after: {result['load_average_after']}", file=out)
    print("float/this: float LmnetV1 eval's median time / the candidate's (above 1: faster than float).", file=out)
    print("Gbop/s: 2 * N * Ho * Wo * O * C * kh * kw * bit binary operations a second.", file=out)
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks.bench_deploy``: print the tables (and write ``--json``); returns the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_deploy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--no-onnx", action="store_true", help="leave out the onnxruntime candidate")
    parser.add_argument("--no-aoti", action="store_true", help="leave out the AOTInductor package (~25 s to compile)")
    args = parser.parse_args(argv)
    for option, value in (("--threads", args.threads), ("--repeats", args.repeats),
                          ("--batch-sizes", min(args.batch_sizes))):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    result = run(args.batch_sizes, args.threads, args.repeats, onnx=not args.no_onnx, aoti=not args.no_aoti)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
