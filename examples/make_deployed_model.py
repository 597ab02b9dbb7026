"""Write a deployed (bit-packed) LmnetV1Quantize for the LibTorch example run_deployed_model.

    python examples/make_deployed_model.py MODEL.pt2 EXPECTED.pt [SCRIPTED.pt SCRIPTED_EXPECTED.pt]

MODEL.pt2: the AOTInductor package (``torch_ext.deploy.package``) of a W1A2
LmnetV1Quantize (random weights, batch-norm statistics drawn so that every
code occurs), converted by ``torch_ext.deploy.convert``; its entry point
returns the logits and then the codes of every QuantActivation
(``package.WithCodes``). EXPECTED.pt: ``torch.save`` of a dict with what
Python computes: ``images``, ``logits`` and ``codes`` (a list in the
package's order); the C++ example checks that LibTorch computes the same.
SCRIPTED.pt: ``torch.jit.script`` of the same W1A2 model itself (not
deployed: float arithmetic, registered operators only; TorchScript, the
route before torch.export), with its expected logits in SCRIPTED_EXPECTED.pt.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

import torch_ext
from torch_ext import deploy
from torch_ext.deploy import package
from torch_ext.models import LmnetV1Quantize


def main(argv) -> int:
    if len(argv) not in (2, 4):
        print(__doc__, file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = LmnetV1Quantize(num_classes=10, in_channels=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1.0, 2.0)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    deployed = deploy.convert(model)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        logits, *codes = package.WithCodes(deployed)(images)
    package.write(package.WithCodes(deployed), images, argv[0], "aoti")
    torch.save({"images": images, "logits": logits, "codes": codes,
                "code_keys": list(package.code_keys(deployed))}, argv[1])
    print(f"saved {argv[0]} and {argv[1]} (torch_ext from {torch_ext.__file__})")
    if len(argv) == 4:
        with torch.no_grad():
            float_logits = model(images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation, on purpose here
            torch.jit.script(model).save(argv[2])
        torch.save({"images": images, "logits": float_logits, "codes": [], "code_keys": []}, argv[3])
        print(f"saved {argv[2]} and {argv[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
