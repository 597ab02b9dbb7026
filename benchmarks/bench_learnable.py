"""Side-by-side timing of the learnable-max_value quantizer (forward + backward).

    python -m benchmarks.bench_learnable [--numel 16M] [--threads 2] [--repeats 15] [--warmup 1]
                                         [--device cpu] [--dtype float32] [--bit 2] [--json PATH]

from the repository root (``python -m benchmarks.bench --learnable`` runs the
same, over its ``--devices``, ``--sizes`` and ``--dtypes``).

Rows, all on the same ``x`` and ``grad`` (``--dtype``: float32 or bfloat16;
max_value stays a float32 0-dim tensor):

* fixed: ``linear_mid_tread_half_quantize`` (float max_value), grad for x;
* pact / lsq: ``linear_mid_tread_half_quantize_learnable``, grads for x and m;
* torch_fq: ``torch._fake_quantize_learnable_per_tensor_affine`` (quant range
  0..2**bit-1, zero point 0, the same step m/n), grads for x and scale;
* relu: ``torch.relu`` forward + backward, the memory-bound yardstick;
* copy: ``dst.copy_(x)`` into a preallocated tensor, the device's copy speed.

Timing: the benchmarks' interleaving loop
(:func:`torch_ext._timing.interleaved_medians`). Every row is warmed up, then
the rows are timed round-robin, one sample of every row per round, the order
rotated each round, so that load on a shared machine hits all rows alike; a
sample repeats the call enough to last a millisecond or two (small sizes) and
divides; CUDA samples are timed with CUDA events. Each figure is the median
over the rounds.

Prints milliseconds, each row's ratio to ``fixed`` and to ``relu``;
``--json`` writes one record per device/size/dtype/row. Timing only: no
assertion about speed lives in the tests.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

import torch_ext
from torch_ext._timing import interleaved_medians

if not __package__:  # run as a file: the relative imports below need the package
    raise SystemExit("run it from the repository root as a module: python -m benchmarks.bench_learnable")

from ._common import parse_size, size_name, write_json

__all__ = ["DTYPES", "ROWS", "benchmark", "main", "run_case"]

#: The rows, in table order.
ROWS = ("fixed", "pact", "lsq", "torch_fq", "relu", "copy")
#: The dtypes of x and grad that the rows are timed in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

DEFAULT_NUMEL = 1 << 24
DEFAULT_THREADS = 2
DEFAULT_REPEATS = 15
DEFAULT_WARMUP = 1
DEFAULT_BIT = 2
MAX_VALUE = 2.0


def _rows(numel: int, bit: int, device: torch.device, dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(numel, generator=g) * 1.5 + 0.5).to(device=device, dtype=dtype)
    grad = torch.randn(numel, generator=g).to(device=device, dtype=dtype)
    dst = torch.empty_like(x0)
    n = 2**bit - 1

    def fixed():
        x = x0.detach().requires_grad_()
        torch_ext.linear_mid_tread_half_quantize(x, bit, MAX_VALUE).backward(grad)

    def learnable(mode):
        m = torch.tensor(MAX_VALUE, device=device, requires_grad=True)  # float32, 0-dim

        def run():
            x = x0.detach().requires_grad_()
            torch_ext.linear_mid_tread_half_quantize_learnable(x, m, bit, mode).backward(grad)

        return run

    def torch_fq():
        x = x0.detach().requires_grad_()
        scale = torch.tensor([MAX_VALUE / n], device=device, requires_grad=True)
        zero = torch.tensor([0.0], device=device)
        torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero, 0, n, 1.0).backward(grad)

    def relu():
        x = x0.detach().requires_grad_()
        torch.relu(x).backward(grad)

    def copy():
        dst.copy_(x0)

    return {"fixed": fixed, "pact": learnable("pact"), "lsq": learnable("lsq"), "torch_fq": torch_fq,
            "relu": relu, "copy": copy}


def run_case(device: str, numel: int, dtype: str = "float32", bit: int = DEFAULT_BIT,
             repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP) -> List[Dict[str, object]]:
    """Time every row on one device, size and dtype: one record per row (a failed row: status n/a, its reason)."""
    dev = torch.device(device)
    failed: Dict[str, str] = {}
    timed = interleaved_medians(_rows(numel, bit, dev, DTYPES[dtype]), dev, repeats, warmup, failed)
    fixed = timed.get("fixed", (None,))[0]
    relu = timed.get("relu", (None,))[0]
    records = []
    for row in ROWS:
        rec: Dict[str, object] = {"device": device, "size": numel, "dtype": dtype, "bit": bit, "row": row,
                                  "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup}
        if row in timed:
            median, samples = timed[row]
            rec.update(status="ok", ms=median * 1e3, min_ms=min(samples) * 1e3,
                       samples_ms=[s * 1e3 for s in samples],
                       ratio_to_fixed=median / fixed if fixed else None,
                       ratio_to_relu=median / relu if relu else None)
        else:
            rec.update(status="n/a", reason=failed.get(row, "not timed"), ms=None, ratio_to_fixed=None,
                       ratio_to_relu=None)
        records.append(rec)
    return records


def _ratio(value: Optional[float], name: str) -> str:
    return f"{value:5.2f}x {name}" if value is not None else f"{'':>6} {'':<{len(name)}}"


def _print_case(records: Sequence[Dict[str, object]], out: TextIO) -> None:
    r0 = records[0]
    print(f"forward+backward, {size_name(r0['size'])} ({r0['size']}) {r0['dtype']} elements, bit={r0['bit']}, "
          f"{r0['device']}, {r0['threads']} threads, median of {r0['repeats']} interleaved rounds "
          f"(warm-up {r0['warmup']})", file=out)
    for r in records:
        if r["status"] != "ok":
            print(f"  {r['row']:<9} {'n/a':>9}      ({r['reason']})", file=out)
            continue
        # relu's own "x relu" (1.00x) and the copy's say nothing: left blank.
        to_relu = r["ratio_to_relu"] if r["row"] not in ("relu", "copy") else None
        print(f"  {r['row']:<9} {r['ms']:9.3f} ms   {_ratio(r['ratio_to_fixed'], 'fixed')}   "
              f"{_ratio(to_relu, 'relu')}".rstrip(), file=out)


def benchmark(devices: Sequence[str] = ("cpu",), sizes: Sequence[int] = (DEFAULT_NUMEL,),
              dtypes: Sequence[str] = ("float32",), repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
              threads: Optional[int] = DEFAULT_THREADS, bit: int = DEFAULT_BIT, json_path: Optional[str] = None,
              out: Optional[TextIO] = None, meta: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Every case (device, then dtype, then size), each printed as it ends; the JSON document, written to ``json_path``.

    The document is ``{"meta": {...}, "results": [record, ...]}``, one record per
    device/size/dtype/row (``ms``: median; ``ratio_to_fixed``, ``ratio_to_relu``:
    of the medians), rewritten after every case.
    """
    out = out if out is not None else sys.stdout  # looked up now: a test may have replaced it
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: {d!r} is not timed here ({', '.join(DTYPES)})")
    for option, value in (("--repeats", repeats), ("--threads", threads), ("--bit", bit)):
        if value is not None and value < 1:
            raise SystemExit(f"{option}: must be >= 1, got {value}")
    if warmup < 0:
        raise SystemExit(f"--warmup: must be >= 0, got {warmup}")
    for numel in sizes:
        if numel < 1:
            raise SystemExit(f"--numel: must be >= 1, got {numel}")
    for device in devices:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: no CUDA device is visible to torch (torch.cuda.is_available() "
                             "is False)")
    if threads is not None:
        torch.set_num_threads(threads)
    doc: Dict[str, object] = {
        "meta": {
            "torch": torch.__version__, "torch_ext": torch_ext.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "repeats": repeats,
            "warmup": warmup, "bit": bit, "max_value": MAX_VALUE, "rows": list(ROWS),
            "cuda_device": (torch.cuda.get_device_name()
                            if any(torch.device(d).type == "cuda" for d in devices) else None),
            **(meta or {}),
        },
        "results": [],
    }
    first = True
    for device in devices:
        for dtype in dtypes:
            for numel in sizes:
                records = run_case(device, numel, dtype, bit, repeats, warmup)
                if not first:
                    print("", file=out)
                first = False
                _print_case(records, out)
                out.flush()
                doc["results"] += records
                if json_path:
                    write_json(json_path, doc)
    print("x fixed, x relu: the row's median time / fixed's, / relu's (relu: forward + backward of torch.relu; "
          "copy: dst.copy_(x), preallocated)", file=out)
    return doc


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """The CLI: one device, size and dtype. Returns ``{row: median ms}`` of the rows that ran."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_learnable", description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=parse_size, default=DEFAULT_NUMEL, help="elements (K/M/G suffixes allowed)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="warm-up calls of every row")
    p.add_argument("--bit", type=int, default=DEFAULT_BIT)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="of x and grad (max_value: float32)")
    p.add_argument("--json", metavar="PATH", help="write one record per row as JSON")
    args = p.parse_args(argv)
    doc = benchmark([args.device], [args.numel], [args.dtype], args.repeats, args.warmup, args.threads, args.bit,
                    args.json, meta={"argv": list(argv) if argv is not None else sys.argv[1:]})
    return {r["row"]: r["ms"] for r in doc["results"] if r["status"] == "ok"}


if __name__ == "__main__":
    main()
