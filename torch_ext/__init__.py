"""torch_ext: Blueoil's quantization-aware training for PyTorch.

The linear mid-tread half quantizer (docs/quantizer.md) as a registered operator with
CPU and CUDA kernels, ``QuantActivation``, Blueoil's binary weight quantizers,
the ternary ones (TTQ, TWN), ``QuantConv2d`` and Blueoil's classifiers (``torch_ext.models``).
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # registers the torch.ops.torch_ext operators
from . import _meta  # noqa: F401  (their fake kernels)
from .codes import code_dtype, codes_to_values, quantize_to_codes
from .export import export_aoti, export_onnx, run_onnx
from .modules import QuantActivation
from .ops import linear_mid_tread_half_quantize, linear_mid_tread_half_quantize_, linear_mid_tread_half_quantize_learnable
from .quant_conv import QuantConv2d
from .weight_quantization import (
    TTQWeightQuantizer,
    binary_channel_wise_mean_scaling_quantize,
    binary_mean_scaling_quantize,
    ttq_weight_quantize,
    twn_weight_quantize,
)
from . import models  # noqa: E402  (torch_ext.models.LmnetV1Quantize, ...)

__version__ = "0.1.0"

__all__ = [
    "QuantActivation",
    "QuantConv2d",
    "TTQWeightQuantizer",
    "binary_channel_wise_mean_scaling_quantize",
    "binary_mean_scaling_quantize",
    "built_with_cuda",
    "code_dtype",
    "codes_to_values",
    "export_aoti",
    "export_onnx",
    "linear_mid_tread_half_quantize",
    "linear_mid_tread_half_quantize_",
    "linear_mid_tread_half_quantize_learnable",
    "quantize_to_codes",
    "run_onnx",
    "ttq_weight_quantize",
    "twn_weight_quantize",
]


def built_with_cuda() -> bool:
    """Whether this build of torch_ext compiled and registered its CUDA kernels."""
    return bool(_C.built_with_cuda())
