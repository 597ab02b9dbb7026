"""``python -m torch_ext.deploy CHECKPOINT --out model.pt2 [--eval]``: a training checkpoint as a deployed model.

Loads a checkpoint written by ``python -m torch_ext.train``, converts its
model with :func:`torch_ext.deploy.convert` and writes it (``--format``,
:mod:`torch_ext.deploy.package`): an AOTInductor package by default (a
``.pt2``: ``torch_ext.deploy.package.load`` in Python after ``import
torch_ext``, ``torch::inductor::AOTIModelPackageLoader`` in LibTorch linked
with libtorch_ext), an ExportedProgram (``exported``), or TorchScript
(``torchscript``, deprecated from torch 2.14 on). ``--eval`` scores the
written model, loaded back, on the checkpoint's test set next to the PyTorch
model it came from: accuracy, agreement of the predictions, weight bytes.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import package
from .converter import DeployedModel, convert, float_weight_bytes


def load_trained_model(path: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """The eval-mode model of a ``torch_ext.train`` checkpoint and the checkpoint's saved arguments.

    The one place that knows the training command's checkpoint API
    (``load_checkpoint``, ``model_from_checkpoint``).
    """
    from torch_ext.train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path, "CHECKPOINT")
    saved = dict(ckpt["args"])
    model = model_from_checkpoint(ckpt, "CHECKPOINT", path)
    saved.update(num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"])
    return model.eval(), saved


def _test_images(saved: Dict[str, Any], data_dir: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    from torch_ext.data import load_dataset

    splits = load_dataset(saved["dataset"], data_dir if data_dir is not None else saved.get("data_dir"),
                          saved.get("image_size"))
    images, labels = [], []
    for i in range(len(splits.test)):
        image, label = splits.test[i]
        images.append(image)
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels)


def evaluate(deployed: nn.Module, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> Dict[str, float]:
    """Accuracy of ``deployed`` and ``model`` on ``images`` and the agreement of their predictions."""
    got, want = [], []
    with torch.no_grad():
        for i in range(0, labels.numel(), batch_size):
            got.append(deployed(images[i:i + batch_size]).argmax(1))
            want.append(model(images[i:i + batch_size]).argmax(1))
    got_t, want_t = torch.cat(got), torch.cat(want)
    return {
        "images": int(labels.numel()),
        "deployed_accuracy": float((got_t == labels).double().mean()),
        "pytorch_accuracy": float((want_t == labels).double().mean()),
        "agreement": float((got_t == want_t).double().mean()),
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m torch_ext.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint of python -m torch_ext.train")
    parser.add_argument("--out", required=True,
                        help="where to write the deployed model (.pt2; .pt for --format torchscript)")
    parser.add_argument("--format", choices=package.FORMATS, default="aoti",
                        help="aoti: torch.export + AOTInductor package (default); exported: the ExportedProgram "
                             "(no compiler needed); torchscript: torch.jit.script (deprecated in torch 2.14)")
    parser.add_argument("--eval", action="store_true", help="score the deployed model on the test set")
    parser.add_argument("--data-dir", default=None, help="data folder (default: the one the checkpoint names)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--speed-against", metavar="CHECKPOINT", default=None,
                        help="also time the deployed model against the PyTorch model of this checkpoint (e.g. the "
                             "float twin) and the source model, batch 64, interleaved rounds")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, saved = load_trained_model(args.checkpoint)
    image_size = saved.get("image_size") or 32
    deployed: DeployedModel = convert(model, image_size=image_size)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"--out={str(out)!r}: folder {str(out.parent)!r} does not exist")
    if args.format == "torchscript":
        print("python -m torch_ext.deploy: note: TorchScript is deprecated from torch 2.14 on; "
              "the default --format aoti writes a torch.export/AOTInductor package", file=sys.stderr)
    example = torch.rand(2, saved["in_channels"], image_size, image_size)
    package.write(deployed, example, str(out), args.format)
    result: Dict[str, Any] = {
        "out": str(out),
        "format": args.format,
        "model": saved["model"],
        "weight_bytes": deployed.weight_bytes(),
        "float_weight_bytes": float_weight_bytes(model),
    }
    print(f"{args.checkpoint}: {saved['model']} -> {out} ({args.format}, {len(deployed.stages)} stages; weights "
          f"{result['weight_bytes']} bytes, {result['float_weight_bytes']} as float32: "
          f"{result['float_weight_bytes'] / max(result['weight_bytes'], 1):.1f}x smaller)")
    if args.eval:
        images, labels = _test_images(saved, args.data_dir)
        loaded = package.load(str(out))
        result.update(evaluate(loaded, model, images, labels))
        print(f"test set of {saved['dataset']} ({result['images']} images): deployed accuracy "
              f"{100 * result['deployed_accuracy']:.2f}%, PyTorch model {100 * result['pytorch_accuracy']:.2f}%, "
              f"predictions agree on {100 * result['agreement']:.2f}%")
    if args.speed_against:
        result.update(_speed(package.load(str(out)), model, args.speed_against, saved, args.format))
    return result


def _speed(deployed, model: nn.Module, other_path: str, saved: Dict[str, Any], fmt: str,
           batch: int = 64, repeats: int = 15) -> Dict[str, Any]:
    """Median seconds an image of the deployed model, the source model and another checkpoint's model."""
    from torch_ext._timing import interleaved_medians

    other, other_saved = load_trained_model(other_path)
    size = saved.get("image_size") or 32
    images = torch.rand(batch, saved["in_channels"], size, size, generator=torch.Generator().manual_seed(0))
    calls = {f"deployed ({fmt})": deployed, saved["model"]: model, f"{other_saved['model']} (other)": other}
    with torch.no_grad():
        medians = interleaved_medians({name: functools.partial(fn, images) for name, fn in calls.items()},
                                      torch.device("cpu"), repeats, 2)
    per_image = {name: median / batch for name, (median, _) in medians.items()}
    other_name = f"{other_saved['model']} (other)"
    print(f"speed, batch {batch}, {torch.get_num_threads()} threads, medians of {repeats} interleaved rounds: "
          + ", ".join(f"{name} {1e3 * t:.3f} ms an image" for name, t in per_image.items())
          + f"; deployed is {per_image[other_name] / per_image[f'deployed ({fmt})']:.2f}x faster than "
          f"{other_saved['model']}")
    return {"ms_per_image": {name: 1e3 * t for name, t in per_image.items()}}


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Like :func:`main`, printing errors as ``error: ...`` (exit status 2)."""
    try:
        main(argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"python -m torch_ext.deploy: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
