"""The training-step benchmark: one SGD step of a network with QuantActivation against its float/ReLU twin."""

from __future__ import annotations

import functools
import statistics
from typing import Callable, Dict, Optional

import torch

from torch_ext._timing import _log, interleaved_medians

from ._common import DTYPES

#: The training-step pairs: a network with QuantActivation and its float
#: twin with ReLU. ``lmnet_v1``: Blueoil's W1A2 LmnetV1Quantize (binary
#: weights too) against LmnetV1. ``lm_resnet``: Blueoil's ResNet-18 for small
#: images with QuantActivation in every basic block and float weights, against
#: the same network with ReLU: what the activations alone cost.
TRAIN_MODELS = ("lmnet_v1", "lm_resnet")


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                amp: Optional[torch.dtype]) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
        logits = model(images)
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    opt.step()


def train_pair(name: str) -> Dict[str, Callable[[], torch.nn.Module]]:
    """{quantized network's name: builder, float twin's name: builder}, in that order, for ``name`` of TRAIN_MODELS."""
    from torch_ext.models import LmnetV1, LmnetV1Quantize, LmResnet, LmResnetQuantize  # imported when needed

    if name == "lmnet_v1":
        return {"LmnetV1Quantize": functools.partial(LmnetV1Quantize, num_classes=10),
                "LmnetV1": functools.partial(LmnetV1, num_classes=10)}
    if name == "lm_resnet":
        return {"LmResnet+QuantActivation": functools.partial(LmResnetQuantize, num_classes=10,
                                                              weight_quantizer=None),
                "LmResnet": functools.partial(LmResnet, num_classes=10)}
    raise ValueError(f"--train-models: unknown value {name!r} ({', '.join(TRAIN_MODELS)})")


def bench_train_step(device: torch.device, batch: int, repeats: int, warmup: int, *,
                     amp: Optional[str] = None, channels_last: bool = False,
                     model: str = "lmnet_v1") -> Dict[str, object]:
    """Time one SGD step of each network of the pair ``model``, interleaved; the JSON's ``train_step`` record."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    steps: Dict[str, Callable[[], object]] = {}
    pair = train_pair(model)
    quantized, float_name = pair
    for name, build in pair.items():
        torch.manual_seed(0)
        net = build().to(device, memory_format=memory_format).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        steps[name] = functools.partial(_train_step, net, opt, images, labels, DTYPES.get(amp))
    _log(f"{device.type} training step, batch {batch}, amp {amp}, channels_last {channels_last}: "
         f"{quantized} vs {float_name} ({repeats} rounds)")
    timed = interleaved_medians(steps, device, repeats, warmup)
    samples = {n: s for n, (_, s) in timed.items()}
    med = {n: statistics.median(s) for n, s in samples.items()}
    return {
        "device": device.type,
        "model": model,
        "quantized": quantized,
        "float": float_name,
        "batch": batch,
        "image_size": [32, 32],
        "amp": amp,
        "channels_last": channels_last,
        "optimizer": "SGD(lr=0.01, momentum=0.9)",
        "median_s": med,
        "samples_s": samples,
        "ratio_quantized_over_float": med[quantized] / med[float_name],
    }
