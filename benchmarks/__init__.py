"""The benchmarks of torch_ext: not part of the installed package, run from the repository root.

* ``python -m benchmarks.bench`` (``make bench``): the operator against
  ``torch.relu``, a copy, ``torch.fake_quantize_per_tensor_affine`` and the
  hand-written composite (eager and compiled), and the training step of the
  quantized LMNet against its float twin (:mod:`benchmarks.bench`).
* ``python -m benchmarks.bench_learnable`` (or ``python -m benchmarks.bench
  --learnable``): the learnable max_value (PACT, LSQ) against the fixed
  operator and torch's learnable fake-quantize.
* ``python -m benchmarks.bench_deploy`` (or ``python -m benchmarks.bench
  --deploy``): the deployed, bit-packed LMNet against the float models.

They import ``torch_ext`` (the timing loop is
:func:`torch_ext._timing.interleaved_medians`, which ``python -m
torch_ext.deploy --speed-against`` uses too); nothing in ``torch_ext``
imports them.
"""
