"""Side-by-side timing of the learnable-max_value quantizer (forward + backward).

    python -m torch_ext.bench_learnable [--numel 16777216] [--threads 2] [--repeats 15] [--device cpu]

Rows, each the median of interleaved repeats (one call of every row per
round, so that load on a shared machine hits all rows alike):

* fixed: ``linear_mid_tread_half_quantize`` (float max_value), grad for x;
* pact / lsq: ``linear_mid_tread_half_quantize_learnable``, grads for x and m;
* torch_fq: ``torch._fake_quantize_learnable_per_tensor_affine`` (quant range
  0..2**bit-1, zero point 0, the same step m/n), grads for x and scale.

Prints milliseconds and each row's ratio to ``fixed``. Timing only: no
assertion about speed lives in the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import torch_ext


def _rows(numel: int, bit: int, device: str):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(numel, generator=g) * 1.5 + 0.5).to(device)
    grad = torch.randn(numel, generator=g).to(device)
    n = 2**bit - 1

    def fixed():
        x = x0.detach().requires_grad_()
        torch_ext.linear_mid_tread_half_quantize(x, bit, 2.0).backward(grad)

    def learnable(mode):
        m = torch.tensor(2.0, device=device, requires_grad=True)

        def run():
            x = x0.detach().requires_grad_()
            torch_ext.linear_mid_tread_half_quantize_learnable(x, m, bit, mode).backward(grad)

        return run

    def torch_fq():
        x = x0.detach().requires_grad_()
        scale = torch.tensor([2.0 / n], device=device, requires_grad=True)
        zero = torch.tensor([0.0], device=device)
        torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero, 0, n, 1.0).backward(grad)

    return {"fixed": fixed, "pact": learnable("pact"), "lsq": learnable("lsq"), "torch_fq": torch_fq}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m torch_ext.bench_learnable", description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=1 << 24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--bit", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = _rows(args.numel, args.bit, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {name: [] for name in rows}
    for fn in rows.values():  # warm up
        fn()
    for _ in range(args.repeats):
        for name, fn in rows.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"forward+backward, {args.numel} float32 elements, bit={args.bit}, {args.device}, "
          f"{args.threads} threads, median of {args.repeats} interleaved rounds")
    for name, ms in medians.items():
        print(f"  {name:<9} {ms:9.2f} ms   {ms / medians['fixed']:5.2f}x fixed")
    return medians


if __name__ == "__main__":
    main()
