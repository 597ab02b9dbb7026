"""Write a deployed (bit-packed) LmnetV1Quantize for the LibTorch example run_deployed_model.

    python examples/make_deployed_model.py MODEL.pt EXPECTED.pt [SCRIPTED.pt SCRIPTED_EXPECTED.pt]

MODEL.pt: ``torch.jit.script(torch_ext.deploy.convert(model))`` of a W1A2
LmnetV1Quantize (random weights, batch-norm statistics drawn so that every
code occurs). EXPECTED.pt: a scripted module whose buffers ``images``,
``logits`` and ``conv3_codes`` are what Python computes; the C++ example
checks that LibTorch computes the same. SCRIPTED.pt: ``torch.jit.script`` of
the same W1A2 model itself (not deployed: float arithmetic, registered
operators only), with its expected logits in SCRIPTED_EXPECTED.pt.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import torch_ext
from torch_ext import deploy
from torch_ext.models import LmnetV1Quantize


class _Expected(nn.Module):
    def __init__(self, images: torch.Tensor, logits: torch.Tensor, conv3_codes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images)
        self.register_buffer("logits", logits)
        self.register_buffer("conv3_codes", conv3_codes)

    def forward(self) -> torch.Tensor:
        return self.logits


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
    logits = deployed(images)
    codes = deployed.codes(images)["conv3.act"]
    torch.jit.script(deployed).save(argv[0])
    torch.jit.script(_Expected(images, logits, codes)).save(argv[1])
    print(f"saved {argv[0]} and {argv[1]} (torch_ext from {torch_ext.__file__})")
    if len(argv) == 4:
        with torch.no_grad():
            float_logits = model(images)
        torch.jit.script(model).save(argv[2])
        torch.jit.script(_Expected(images, float_logits, codes)).save(argv[3])
        print(f"saved {argv[2]} and {argv[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
