"""Writing and loading a deployed model: an AOTInductor package, an ExportedProgram, or TorchScript.

* ``aoti`` (the default): :func:`torch.export.export` of the model, the
  batch size symbolic, compiled and packaged by AOTInductor into a ``.pt2``:
  no Python interpreter between the stages. Python runs it with
  :func:`load` (``torch._inductor.aoti_load_package``), LibTorch with
  ``torch::inductor::AOTIModelPackageLoader``; the torch_ext operators must
  be registered in the process (``import torch_ext``, or linking
  libtorch_ext), as the package calls them by name.
* ``exported``: the ExportedProgram itself (``torch.export.save``), a
  ``.pt2`` that needs no compiler to write; :func:`load` gives its module.
* ``torchscript``: ``torch.jit.script`` (``.pt``), for torch versions before
  export was ready; TorchScript is deprecated from torch 2.14 on.

The packed operators are recorded as custom-operator nodes (each has a fake
kernel, so shapes stay symbolic in the batch).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Tuple

import torch
from torch import nn

FORMATS = ("aoti", "exported", "torchscript")
#: Batch sizes an exported or packaged model accepts.
MAX_BATCH = 1 << 16


class WithCodes(nn.Module):
    """``forward(images) -> (logits, codes of each QuantActivation, in the order of DeployedModel.codes)``.

    Exported programs and AOTInductor packages have one entry point: this
    one also returns the codes (the C++ example checks them against Python's).
    """

    def __init__(self, deployed: nn.Module) -> None:
        super().__init__()
        self.deployed = deployed

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self.deployed._check_input(x)
        outs = []
        for stage in self.deployed.stages:
            x = stage.forward(x)
            if stage.key != "":
                outs.append(stage.codes_of(x))
        return (x, *outs)


def code_keys(deployed: nn.Module) -> Tuple[str, ...]:
    """The names of the codes :class:`WithCodes` returns after the logits, in order."""
    return tuple(stage.key for stage in deployed.stages if stage.key != "")


def export(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export(model, (example,))`` with the batch dimension symbolic (1 to MAX_BATCH)."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes)


@contextlib.contextmanager
def _quiet_cpu_compile():
    # A CUDA build of torch on a machine with no GPU warns from
    # cpp_extension that no CUDA runtime is found; the package is CPU code.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*No CUDA runtime is found.*")
        import logging

        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def package(program: torch.export.ExportedProgram, path: str) -> str:
    """Compile ``program`` with AOTInductor and write the package to ``path`` (a ``.pt2``)."""
    with _quiet_cpu_compile():
        return torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def write(model: nn.Module, example: torch.Tensor, path: str, fmt: str = "aoti", *,
          dynamic_batch: bool = True) -> str:
    """Write ``model`` (eval mode) to ``path`` in format ``fmt`` (:data:`FORMATS`); returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(path)
    if not out.parent.exists():
        raise FileNotFoundError(f"{str(out)!r}: folder {str(out.parent)!r} does not exist")
    # Written under the same name in a scratch folder next to the target, then
    # moved: a failed compile leaves no half-written file (and the archive's
    # top folder, named after the file, is the final one).
    scratch = Path(tempfile.mkdtemp(prefix=".deploy-", dir=out.parent))
    tmp = scratch / out.name
    try:
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # said once, by the caller
                torch.jit.script(model).save(str(tmp))
        else:
            program = export(model, example, dynamic_batch=dynamic_batch)
            if fmt == "exported":
                torch.export.save(program, str(tmp))
            else:
                package(program, str(tmp))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(out)


def format_of(path: str) -> str:
    """The format of a file written by :func:`write`, from its contents; ValueError for anything else."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path!r}: no such file")
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path!r} is not a deployed model (.pt2 or TorchScript .pt): not a readable archive "
                         f"({exc})") from None
    if bad is not None:
        raise ValueError(f"{path!r} is not a deployed model: archive member {bad!r} is corrupted")
    if any("/data/aotinductor/" in n or n.startswith("data/aotinductor/") for n in names):
        return "aoti"
    if any(n.endswith("models/model.json") or "/models/" in n for n in names):
        return "exported"
    if any(n.endswith("constants.pkl") or n.endswith("code/__torch__.py") for n in names):
        return "torchscript"
    raise ValueError(f"{path!r} is not a deployed model: an archive of neither an AOTInductor package, an "
                     "ExportedProgram nor TorchScript")


def load(path: str) -> Callable[[torch.Tensor], object]:
    """A callable of what :func:`write` wrote to ``path``, its format read from the file.

    The torch_ext operators must be registered (``import torch_ext``).
    """
    import torch_ext  # noqa: F401  (registers the operators the file calls)

    fmt = format_of(path)
    try:
        if fmt == "aoti":
            with _quiet_cpu_compile():
                return torch._inductor.aoti_load_package(str(path))
        if fmt == "exported":
            return torch.export.load(str(path)).module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))
    except Exception as exc:  # a damaged member that the zip check let through
        raise ValueError(f"{path!r}: cannot load this {fmt} file: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
