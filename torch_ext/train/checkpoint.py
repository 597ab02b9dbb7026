"""Checkpoints, random number generator state and atomic file writes.

A checkpoint holds the model, optimizer, scheduler, grad scaler, the epoch
and every random number generator state of every rank, so ``--resume``
continues bit-identically. Every file is written through a temporary file and
``os.replace``: a crash at any moment leaves the old file or the new one,
never a partial one.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint_atomic",
    "seed_everything",
    "set_rng_state",
    "write_atomic",
    "write_json_atomic",
]

CHECKPOINT_FORMAT = "torch_ext.train/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (corrupt, truncated, wrong kind or run)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(aug_gen: torch.Generator, loader_gen: torch.Generator, device: torch.device) -> Dict[str, Any]:
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


def set_rng_state(state: Dict[str, Any], aug_gen: torch.Generator, loader_gen: torch.Generator,
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


def write_atomic(path: Path, write) -> None:
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
    """``torch.save(state)`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(Path(path), lambda f: torch.save(state, f))


def write_json_atomic(obj: Any, path: Path) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _why_unreadable(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in our words: never torch's advice to load it
    with ``weights_only=False`` (a checkpoint of this command is plain data, so that would not help)."""
    text = str(exc)
    if "TorchScript archive" in text:
        return "is a TorchScript archive (torch.jit.save), not a torch_ext.train checkpoint"
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        return (f"is not a torch_ext.train checkpoint: it holds {what}, which a checkpoint never does "
                "(a whole model saved with torch.save(model)?)")
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first:
        first = ""
    return f"is not a readable checkpoint (corrupt or truncated?): {type(exc).__name__}{': ' + first if first else ''}"


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
        with warnings.catch_warnings():  # torch's notes on pickle protocols and TorchScript archives
            warnings.simplefilter("ignore")
            # weights_only: a checkpoint is data, never code.
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file, ...
        raise CheckpointError(f"{argument}={str(path)!r} {_why_unreadable(exc)}") from None
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
