"""What a run shows: progress, log lines, code histograms and the training plot.

Progress suits where it goes: on a terminal a progress bar redrawn in place;
into a file or a CI log (not a TTY) a few plain lines an epoch, not one
redraw per step.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, TextIO

import numpy as np
import torch
from torch import nn

from ..codes import quantize_to_codes
from ..modules import QuantActivation
from .checkpoint import write_atomic
from .distributed import Dist

__all__ = ["CodeHistograms", "Progress", "log", "plot"]

# Lines an epoch when progress goes to a file: at 25%, 50%, 75% of the steps.
PROGRESS_LINES_PER_EPOCH = 3


def log(ddp: Dist, msg: str) -> None:
    """One line on stderr, from rank 0 only."""
    if ddp.is_main:
        print(msg, file=sys.stderr, flush=True)


class Progress:
    """Iterate over an epoch's batches, showing progress: a bar on a TTY, a few lines elsewhere.

    ``update(loss=..., lr=...)`` after each step sets what the next redraw or
    line shows.
    """

    def __init__(self, items: Iterable[Any], total: int, desc: str, *, enabled: bool,
                 stream: Optional[TextIO] = None) -> None:
        self.items, self.total, self.desc, self.enabled = items, total, desc, enabled
        self.stream = sys.stderr if stream is None else stream
        self.postfix: Dict[str, str] = {}
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(items, total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, **postfix: str) -> None:
        self.postfix = postfix
        if self._bar is not None:
            self._bar.set_postfix(**postfix)

    def __iter__(self) -> Iterator[Any]:
        if self._bar is not None:
            try:
                yield from self._bar
            finally:
                self._bar.close()
            return
        marks = {max(1, (self.total * k) // (PROGRESS_LINES_PER_EPOCH + 1)) for k in range(1, PROGRESS_LINES_PER_EPOCH + 1)}
        for step, item in enumerate(self.items, start=1):
            yield item
            if self.enabled and step in marks and step < self.total:
                details = " ".join(f"{k} {v}" for k, v in self.postfix.items())
                print(f"{self.desc}: step {step}/{self.total} {details}".rstrip(), file=self.stream, flush=True)


class CodeHistograms:
    """Forward hooks counting each QuantActivation's output codes (``quantize_to_codes``).

    Layers with ``bit=32`` have no codes and are skipped. The output of a
    QuantActivation is one of its levels, so its code is the code of the
    layer's input, also when the layer works in place.
    """

    def __init__(self, model: nn.Module) -> None:
        self.counts: Dict[str, torch.Tensor] = {}
        self.meta: Dict[str, Dict[str, float]] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, QuantActivation) and int(module.bit) <= 16:
                self.meta[name] = {"bit": int(module.bit), "max_value": _max_value(module)}
                self._handles.append(module.register_forward_hook(self._hook(name, module)))

    def _hook(self, name: str, module: QuantActivation):
        bit, max_value = int(module.bit), _max_value(module)

        def hook(_module, _inputs, output):
            codes = quantize_to_codes(output.detach(), bit, max_value).to(torch.int64)
            if codes.is_cuda and torch.are_deterministic_algorithms_enabled():
                codes = codes.cpu()  # CUDA bincount uses atomics and is refused in deterministic mode
            counts = torch.bincount(codes.flatten(), minlength=2**bit).cpu()
            self.counts[name] = self.counts.get(name, torch.zeros_like(counts)) + counts

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reduced(self, ddp: Dist) -> Dict[str, Dict[str, Any]]:
        """Every layer's counts summed over all ranks, with its ``bit`` and ``max_value``."""
        out = {}
        for name, meta in self.meta.items():
            counts = self.counts.get(name, torch.zeros(2 ** meta["bit"], dtype=torch.int64))
            counts = ddp.all_reduce_sum(counts.clone())
            out[name] = dict(meta, counts=counts.tolist())
        return out


def _max_value(module: QuantActivation) -> float:
    # A learned max_value (--learn-max-value): the clamped value the kernels use.
    return module.fixed_max_value() if getattr(module, "learn_max_value", None) is not None else float(module.max_value)


def _plot_max_values(fig, grid_row, history: List[Dict[str, Any]]) -> None:
    """Each layer's learned max_value over the epochs (--learn-max-value)."""
    ax = fig.add_subplot(grid_row)
    epochs = [h["epoch"] for h in history]
    for name in history[-1]["max_values"]:
        ax.plot(epochs, [h.get("max_values", {}).get(name, float("nan")) for h in history], "o-", label=name)
    ax.set(xlabel="epoch", ylabel="max_value", title="learned max_value per layer")
    ax.legend(fontsize="small", ncol=3)


def _plot_curves(fig, grid, cols: int, history: List[Dict[str, Any]]) -> None:
    epochs = [h["epoch"] for h in history]
    for col, (key, scale, label) in enumerate((("loss", 1, "cross-entropy loss"), ("acc", 100, "accuracy (%)"))):
        ax = fig.add_subplot(grid[0, col * cols : (col + 1) * cols])
        ax.plot(epochs, [scale * h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [scale * h[f"test_{key}"] for h in history], "s-", label="test")
        ax.set(xlabel="epoch", ylabel=label, title=label.split(" (")[0])
        ax.legend()


def plot(path: Path, history: List[Dict[str, Any]], histograms: Dict[str, Dict[str, Any]], title: str) -> None:
    """Loss and accuracy curves, plus one bar chart of output codes per QuantActivation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(histograms)
    cols = 3
    hist_rows = math.ceil(len(names) / cols)
    learned = 1 if history and "max_values" in history[-1] else 0
    fig = plt.figure(figsize=(12, 3.6 * (1 + hist_rows + learned)), constrained_layout=True)
    grid = fig.add_gridspec(1 + hist_rows + learned, cols * 2)
    _plot_curves(fig, grid, cols, history)
    if learned:
        _plot_max_values(fig, grid[1 + hist_rows, :], history)
    for i, name in enumerate(names):
        h = histograms[name]
        counts = np.asarray(h["counts"], dtype=np.float64)
        frac = counts / max(counts.sum(), 1.0)
        ax = fig.add_subplot(grid[1 + i // cols, 2 * (i % cols) : 2 * (i % cols) + 2])
        ax.bar(np.arange(len(frac)), frac)
        ax.set(title=f"{name} (bit={h['bit']}, max={h['max_value']:g})", xlabel="output code",
               ylabel="fraction (test set)")
        ax.set_xticks(np.arange(len(frac)) if len(frac) <= 16 else np.linspace(0, len(frac) - 1, 9).round())
    fig.suptitle(title)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
