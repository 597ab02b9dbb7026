"""The operator benchmark's output: the tables, the targets it checks, and its JSON document."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

from ._common import DEFAULT_SIZES, size_name, write_json
from ._operator import Result


class Report:
    """The JSON document, rewritten after every case, so a run killed at a time limit keeps what it measured.

    Keys: ``meta``, ``copy_bandwidth_gbps`` (device -> GB/s), ``results`` (one
    :class:`Result` a row), ``train_step`` (one record a pair and device), and
    at the end ``targets`` and ``elapsed_s``.
    """

    def __init__(self, path: Optional[str], meta: Dict[str, object], copy_gbps: Dict[str, float]) -> None:
        self.path, self.meta, self.copy_gbps = path, meta, copy_gbps
        self.results: List[Result] = []
        self.train: List[Dict[str, object]] = []

    def save(self, results: Optional[List[Result]] = None, **extra: object) -> None:
        """Write what is done, plus ``results`` of the device in progress and ``extra`` keys (no-op without a path)."""
        if not self.path:
            return
        done = self.results + (results or [])
        doc = {"meta": self.meta, "copy_bandwidth_gbps": self.copy_gbps, "results": [asdict(r) for r in done],
               "train_step": self.train, **extra}
        write_json(self.path, doc)


# --------------------------------------------------------------------------
# Targets: the figures this project promises.


def _find(results: Sequence[Result], **kw) -> Optional[Result]:
    for r in results:
        if all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def _ratio_target(results, device, dtype, size, op, peer, limit, text) -> Dict[str, object]:
    r = _find(results, device=device, dtype=dtype, size=size, op=op, candidate=peer)
    value = r.torch_ext_ratio if r is not None else None
    return {
        "target": text, "device": device, "dtype": dtype, "size": size, "op": op, "peer": peer,
        "value": value, "limit": limit, "kind": "time ratio torch_ext/peer <=",
        "met": None if value is None else value <= limit,
    }


def _fraction_target(results, device, dtype, size, op, limit, text) -> Dict[str, object]:
    r = _find(results, device=device, dtype=dtype, size=size, op=op, candidate="torch_ext")
    value = r.fraction_of_copy if r is not None else None
    return {
        "target": text, "device": device, "dtype": dtype, "size": size, "op": op, "peer": "copy bandwidth",
        "value": value, "limit": limit, "kind": "fraction of copy GB/s >=",
        "met": None if value is None else value >= limit,
    }


def _cpu_targets(results: Sequence[Result]) -> List[Dict[str, object]]:
    cpu, big = "cpu", DEFAULT_SIZES["cpu"][1]
    if not _find(results, device=cpu, dtype="float32", size=big):
        return []
    return [_ratio_target(results, cpu, "float32", big, op, peer, limit, text) for op, peer, limit, text in (
        ("forward", "relu", 1.2, "CPU fp32 16M forward within 1.2x of relu"),
        ("backward", "relu", 1.2, "CPU fp32 16M backward within 1.2x of relu"),
        ("forward+backward", "fake_quantize", 1.0, "CPU fp32 16M fwd+bwd at least as fast as fake_quantize"),
        ("forward+backward", "composite", 0.25, "CPU fp32 16M fwd+bwd at least 4x faster than the composite"),
        ("forward+backward", "composite_compiled", 1.0,
         "CPU fp32 16M fwd+bwd at least as fast as the compiled composite"),
    )]


def _cuda_targets(results: Sequence[Result]) -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = []
    big = DEFAULT_SIZES["cuda"][1]
    for dtype in ("float32", "bfloat16"):
        if not _find(results, device="cuda", dtype=dtype, size=big):
            continue
        for op in ("forward", "backward"):
            out.append(_fraction_target(results, "cuda", dtype, big, op, 0.85,
                                        f"GPU {dtype} 256M {op} at >= 85% of copy bandwidth"))
            for peer in ("fake_quantize", "composite_compiled"):
                out.append(_ratio_target(results, "cuda", dtype, big, op, peer, 1.0,
                                         f"GPU {dtype} 256M {op} at least as fast as {peer}"))
    return out


def targets(results: Sequence[Result], train: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The promised figures (README), where this run measured them at the target size."""
    out = _cpu_targets(results) + _cuda_targets(results)
    for t in train:
        if t["device"] == "cuda":
            value = t["ratio_quantized_over_float"]
            out.append({
                "target": f"GPU training step (batch {t['batch']}) within 1.15x of the float twin",
                "device": "cuda", "value": value, "limit": 1.15, "kind": "time ratio quantized/float <=",
                "met": value <= 1.15,
            })
    return out


# --------------------------------------------------------------------------
# Tables.


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "n/a"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def print_table(results: Sequence[Result], copy_gbps: Dict[str, float], out=None) -> None:
    """The operator table, one block per (device, op, dtype, size, layout), then the copy bandwidths."""
    out = out if out is not None else sys.stdout  # looked up now: a test may have replaced it
    header = (f"{'device':<6} {'op':<16} {'dtype':<8} {'layout':<13} {'size':>5}  {'candidate':<18} {'median':>10} "
              f"{'min':>10} {'GB/s':>7} {'%copy':>6} {'ext/peer':>8} {'saved B/el':>10}")
    print(header, file=out)
    print("-" * len(header), file=out)
    last_group = None
    for r in results:
        group = (r.device, r.op, r.dtype, r.size, r.layout)
        if last_group is not None and group != last_group:
            print("", file=out)
        last_group = group
        row = f"{r.device:<6} {r.op:<16} {r.dtype:<8} {r.layout:<13} {size_name(r.size):>5}  {r.candidate:<18} "
        if r.status != "ok":
            print(f"{row}{'n/a':>10}  ({r.reason})", file=out)
            continue
        ratio = "" if r.candidate == "torch_ext" or r.torch_ext_ratio is None else f"{r.torch_ext_ratio:.2f}x"
        frac = "" if r.fraction_of_copy is None else f"{100 * r.fraction_of_copy:.0f}%"
        print(f"{row}{_fmt_time(r.median_s):>10} {_fmt_time(r.min_s):>10} {r.gbps:7.1f} {frac:>6} {ratio:>8} "
              f"{r.saved_bytes_per_element:10.3f}", file=out)
    for dev, bw in copy_gbps.items():
        print(f"\n{dev} copy bandwidth (dst.copy_(src), float32, preallocated): {bw:.1f} GB/s", file=out)
    print("median/min: over the interleaved rounds; GB/s, %copy and ext/peer are of the medians.", file=out)
    print("ext/peer: torch_ext's median time / the candidate's (below 1: torch_ext is faster).", file=out)


def print_train(train: Sequence[Dict[str, object]], out=None) -> None:
    """One line per training-step pair: both medians and their ratio."""
    out = out if out is not None else sys.stdout
    for t in train:
        med = t["median_s"]
        setting = (f", autocast {t['amp']}" if t.get("amp") else "") + (", channels_last" if t.get("channels_last")
                                                                          else "")
        q, f = t["quantized"], t["float"]
        print(f"\nTraining step on {t['device']} (batch {t['batch']}, 32x32, SGD{setting}; median of "
              f"{len(t['samples_s'][f])} interleaved rounds): {q} "
              f"{_fmt_time(med[q])}, {f} {_fmt_time(med[f])}, "
              f"ratio {t['ratio_quantized_over_float']:.2f}x", file=out)


def print_targets(targets_: Sequence[Dict[str, object]], out=None) -> None:
    """The targets, each met, MISSED or n/a (not measured at its size), with its figure and limit."""
    out = out if out is not None else sys.stdout
    if not targets_:
        return
    print("\nTargets:", file=out)
    for t in targets_:
        value = t["value"]
        if value is None:
            status, shown = "n/a", "n/a"
        else:
            status = "met" if t["met"] else "MISSED"
            shown = f"{100 * value:.0f}%" if "fraction" in t["kind"] else f"{value:.2f}x"
        print(f"  [{status:>6}] {t['target']}: {shown} (limit {t['limit']})", file=out)
