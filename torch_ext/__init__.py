"""torch_ext: Blueoil's quantization-aware training for PyTorch.

The linear mid-tread half quantizer (docs/quantizer.md) as a registered operator with
CPU and CUDA kernels, ``QuantActivation``, Blueoil's binary weight quantizers,
the ternary ones (TTQ, TWN), ``QuantConv2d`` and Blueoil's classifiers (``torch_ext.models``).

The functional API of every operator family (:mod:`torch_ext.ops`) is
re-exported here: its names are ``torch_ext.ops.__all__``.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers the torch.ops.torch_ext operators
from . import ops  # their Python API and fake kernels, one module a family
from .ops import *  # noqa: F401,F403  (every family's functional API)
from .codes import code_dtype, codes_to_values, quantize_to_codes
from .export import export_aoti, export_onnx, run_onnx
from .modules import QuantActivation
from .quant_conv import QuantConv2d
from .weight_quantization import TTQWeightQuantizer
from . import models  # noqa: E402  (torch_ext.models.LmnetV1Quantize, ...)

__version__ = "0.1.0"

__all__ = sorted({
    *ops.__all__,
    "QuantActivation",
    "QuantConv2d",
    "TTQWeightQuantizer",
    "built_with_cuda",
    "code_dtype",
    "codes_to_values",
    "export_aoti",
    "export_onnx",
    "quantize_to_codes",
    "run_onnx",
})


def built_with_cuda() -> bool:
    """Whether this build of torch_ext compiled and registered its CUDA kernels."""
    return bool(_C.built_with_cuda())
