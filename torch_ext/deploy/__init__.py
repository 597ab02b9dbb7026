"""Run trained low-bit networks as low-bit: bit-packed W1A2 inference on the CPU (docs/deploy.md).

* :func:`convert` turns an eval-mode model built from torch_ext's pieces
  (``QuantConv2d`` with binary weights, ``QuantActivation``, batch norm,
  ``SpaceToDepth``, ...) into a :class:`DeployedModel` whose quantized layers
  run on bit-packed codes with popcount arithmetic
  (``torch.ops.torch_ext.packed_conv2d_threshold`` and friends), batch norm
  and the activation quantizer folded into integer thresholds.
* ``python -m torch_ext.deploy CHECKPOINT --out model.pt [--eval]`` converts a
  training checkpoint and saves TorchScript.
* ``python -m benchmarks.bench_deploy`` (``benchmarks/`` at the repository
  root, not installed) measures it against the float models.
"""

from __future__ import annotations

from .converter import DeployedModel, binary_weight, convert, fold_thresholds

__all__ = ["DeployedModel", "binary_weight", "convert", "fold_thresholds"]
