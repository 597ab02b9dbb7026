"""Write state dicts of the Python models for the C++ test test_python_weights.

    python tests/cpp/make_python_weights.py OUTDIR

ctest runs this first (a fixture, see tests/cpp/CMakeLists.txt) with the
Python whose torch the C++ build links. For each case it builds the Python
model, gives every parameter and buffer random values (so that a weight or
batch-norm statistic loaded into the wrong place changes the output), and
writes, with torch.save:

* CASE.state_dict.pt: dict(model.state_dict()) (a plain dict: LibTorch's
  unpickler does not know OrderedDict);
* CASE.io.pt: {"input": x, "output": model(x)} in eval mode.

tests/cpp/test_python_weights.cpp builds the same model in C++ with the same
options, loads the state dict and compares the outputs.
"""

from __future__ import annotations

import os
import sys

import torch

try:
    from torch_ext import models
except ImportError as error:  # the extension must be built for the Python models to run
    sys.exit(
        f"make_python_weights: cannot import torch_ext ({error}); build the Python extension first "
        "(make build, or python setup.py build_ext --inplace)"
    )

# name: (builder, kwargs, input shape). The C++ test builds the same models.
CASES = {
    "lmnet_v1_quantize": (models.LmnetV1Quantize, {}, (2, 3, 32, 32)),
    "lmnet_v1_quantize_channel_wise": (
        models.LmnetV1Quantize,
        dict(num_classes=5, in_channels=1, weight_quantizer="binary_channel_wise_mean_scaling",
             quantize_last_convolution=True, activation_quantizer_kwargs={"bit": 3, "max_value": 1.5}),
        (3, 1, 16, 24),
    ),
    "lmnet_v1": (models.LmnetV1, {}, (2, 3, 16, 16)),
    "sample_network_quantize": (models.SampleNetworkQuantize, {}, (2, 3, 12, 12)),
    "sample_network_quantize_float_edges": (
        models.SampleNetworkQuantize,
        dict(num_classes=4, quantize_first_convolution=False, quantize_last_convolution=False),
        (2, 3, 8, 8),
    ),
    "sample_network": (models.SampleNetwork, {}, (2, 3, 12, 12)),
}


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype == torch.long:  # num_batches_tracked
                tensor.fill_(int(torch.randint(1, 100, (), generator=generator)))
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_python_weights.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    generator = torch.Generator().manual_seed(16)
    for name, (builder, kwargs, shape) in CASES.items():
        model = builder(**kwargs)
        randomize(model, generator)
        model.eval()
        x = torch.randn(shape, generator=generator) * 2
        with torch.no_grad():
            y = model(x)
        torch.save(dict(model.state_dict()), os.path.join(out, f"{name}.state_dict.pt"))
        torch.save({"input": x, "output": y}, os.path.join(out, f"{name}.io.pt"))
    print(f"make_python_weights: wrote {len(CASES)} cases to {out}")


if __name__ == "__main__":
    main()
