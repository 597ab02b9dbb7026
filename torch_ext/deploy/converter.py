"""``convert(model)``: a trained low-bit model as bit-packed stages (docs/deploy.md).

The converter runs the model once on an example input with forward hooks on
its leaf modules, which gives the order in which they run; it requires that
each module's input is the previous module's output (a chain: no tensor work
in a ``forward`` between modules, no branches). It then walks the chain:

* while the data is float, modules run as float PyTorch ops (a
  ``QuantConv2d`` with its quantized weight as a plain ``nn.Conv2d``);
* a ``QuantActivation`` (bit 1..4) turns float data into packed codes, with
  exactly :func:`torch_ext.quantize_to_codes`' steps;
* on packed codes, a ``SpaceToDepth`` is a packed space-to-depth, and a
  convolution with binary weights (``where(w >= 0, s, -s)``, ``s`` per tensor
  or per output channel) is a packed convolution. When a ``QuantActivation``
  follows it (through any ``BatchNorm2d``, ``ReLU``, ``Dropout``,
  ``Identity``), batch norm, ReLU and quantizer are folded into integer
  thresholds (:func:`fold_thresholds`); otherwise the convolution's bias and a
  following batch norm are folded into a float affine output;
* anything else on packed codes first turns them back into float values.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models import SpaceToDepth, _GlobalAveragePool
from ..modules import QuantActivation
from ..ops.packed import pack_binary_weights
from ..quant_conv import QuantConv2d
from ..reference import levels_above_zero
from . import _stages as st

__all__ = ["DeployedModel", "convert", "fold_thresholds", "binary_weight"]

# Modules the converter knows. Float-only ones run as they are.
_FLOAT_PASSTHROUGH = (nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d, nn.Linear)
# Elementwise, per-channel and non-decreasing: folded into thresholds.
_FOLDABLE = (nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Dropout)
_MAX_PACKED_BIT = 4


def _refuse(name: str, module: nn.Module, reason: str) -> ValueError:
    return ValueError(f"convert: cannot convert module {name or '<model>'!r} ({type(module).__name__}): {reason}")


class DeployedModel(nn.Module):
    """A converted model: ``deployed(images) -> logits`` and ``deployed.codes(images)``.

    Built by :func:`convert`. It scripts (``torch.jit.script``) and the
    saved file runs wherever torch_ext's operators are loaded (Python with
    ``import torch_ext``, LibTorch linked with libtorch_ext).
    """

    def __init__(self, stages: List[nn.Module], in_channels: int, source: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.in_channels = in_channels
        self.source = source

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.size(1) != self.in_channels:
            raise ValueError(
                "DeployedModel: images must have shape [N, " + str(self.in_channels) + ", H, W], got images of "
                "shape " + str(x.shape))
        if x.dtype != torch.float32:
            raise TypeError("DeployedModel: images must be float32, got images of dtype " + str(x.dtype))
        if x.device.type != "cpu":
            raise ValueError("DeployedModel: images must be on the CPU, got images on " + str(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (the source model's output) for float32 images ``[N, C, H, W]`` on the CPU."""
        self._check_input(x)
        for stage in self.stages:
            x = stage.forward(x)  # (no hooks: skips nn.Module.__call__'s overhead in eager mode)
        return x

    @torch.jit.export
    def codes(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """uint8 NCHW codes of every ``QuantActivation`` of the source model, keyed by its module name."""
        self._check_input(x)
        out: Dict[str, torch.Tensor] = {}
        for stage in self.stages:
            x = stage.forward(x)
            if stage.key != "":
                out[stage.key] = stage.codes_of(x)
        return out

    def weight_bytes(self) -> int:
        """Bytes of everything the stages keep (packed weights, thresholds, float layers' tensors)."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))

    def extra_repr(self) -> str:
        return f"source={self.source}, in_channels={self.in_channels}"


# --------------------------------------------------------------------------
# Tracing the chain of leaf modules.


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _trace_chain(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, nn.Module, Tuple[int, ...]]]:
    """``(name, module, input shape)`` of the leaf modules in the order they run."""
    records: List[Tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    hooks = []

    def hook(name):
        def record(module, inputs, output):
            records.append((name, module, inputs[0] if inputs else None, output))
        return record

    for name, module in model.named_modules():
        if _is_leaf(module):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            output = model(example.clone())
    finally:
        for h in hooks:
            h.remove()
    if not records:
        raise _refuse("", model, "no module ran in its forward")
    seen = set()
    for name, module, _inp, _out in records:
        if name in seen:
            raise _refuse(name, module, "it runs more than once in the model's forward")
        seen.add(name)
    for i in range(1, len(records)):
        name, module, inp, _ = records[i]
        prev_name = records[i - 1][0]
        if not isinstance(inp, torch.Tensor) or not _same_tensor(inp, records[i - 1][3]):
            raise _refuse(
                name, module,
                f"its input is not the output of the module that ran before it ({prev_name!r}); the converter "
                "handles chains of modules, with no tensor operations between them in forward")
    if not isinstance(output, torch.Tensor) or not _same_tensor(output, records[-1][3]):
        raise _refuse("", model, f"its output is not the output of its last module ({records[-1][0]!r})")
    return [(name, module, tuple(inp.shape)) for name, module, inp, _o in records]


# --------------------------------------------------------------------------
# Weights and thresholds.


def binary_weight(conv: nn.Conv2d) -> Optional[torch.Tensor]:
    """The per-output-channel scale ``s`` if ``conv`` convolves with ``where(w >= 0, s, -s)``, else None."""
    if not isinstance(conv, QuantConv2d) or conv.weight_quantizer is None:
        return None
    with torch.no_grad():
        w = conv.weight.detach()
        wq = conv.quantized_weight().detach()
        if wq.shape != w.shape or not wq.is_floating_point():
            return None
        scale = wq.abs().amax(dim=(1, 2, 3))
        expected = torch.where(w >= 0, scale.view(-1, 1, 1, 1), -scale.view(-1, 1, 1, 1))
        if not torch.equal(wq, expected) or not torch.isfinite(scale).all():
            return None
    return scale


def _conv_padding(name: str, conv: nn.Conv2d) -> List[int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [0, 0]
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise _refuse(name, conv, f"padding='same' with an even kernel {conv.kernel_size} pads unevenly")
        return [kh // 2, kw // 2]
    return [int(p) for p in conv.padding]


def _packable_conv(name: str, conv: nn.Module) -> Optional[torch.Tensor]:
    """The binary scale of a convolution the packed kernels can run, else None."""
    if not isinstance(conv, nn.Conv2d):
        return None
    scale = binary_weight(conv)
    if scale is None:
        return None
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        return None
    return scale


def _check_bn(name: str, bn: nn.BatchNorm2d) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise _refuse(name, bn, "it has no running statistics (track_running_stats=False), so eval uses batch "
                                "statistics")


def _quant_params(name: str, act: QuantActivation) -> Tuple[int, float]:
    if act.bit > _MAX_PACKED_BIT:
        raise _refuse(name, act, f"bit={act.bit}: the packed kernels take codes of 1..{_MAX_PACKED_BIT} bits")
    # A learned max_value is read once here, as the value the trained model uses (float32 compute).
    return int(act.bit), act.fixed_max_value(torch.float32)


def fold_thresholds(
    pipeline: Callable[[torch.Tensor], torch.Tensor], out_channels: int, bound: int, out_bit: int, name: str = "",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer thresholds reproducing ``pipeline`` on every accumulator in ``-bound..bound``.

    ``pipeline(acc)`` maps an int64 ``[L]`` tensor of accumulator values to the
    int64 ``[out_channels, L]`` codes the float model gives for them. Each
    channel's codes must be monotone in the accumulator (batch norm with a
    negative scale makes them decrease; a zero scale makes them constant).

    Returns ``(thresholds int32 [O, 2^out_bit - 1], direction int32 [O])``
    such that the code of channel ``o`` is the number of ``k`` with
    ``direction[o] * acc >= thresholds[o, k]``, for every ``|acc| <= bound``.
    """
    levels = levels_above_zero(out_bit)
    acc = torch.arange(-bound, bound + 1, dtype=torch.int64)
    chunk = max(1, (1 << 22) // max(out_channels, 1))
    # int16 codes: [O, 2B + 1] stays small for wide layers too.
    codes = torch.cat([pipeline(acc[i:i + chunk]).to(torch.int16) for i in range(0, acc.numel(), chunk)], dim=1)
    if codes.shape != (out_channels, acc.numel()):
        raise ValueError(f"fold_thresholds: pipeline gave codes of shape {tuple(codes.shape)}, expected "
                         f"{(out_channels, acc.numel())}")
    increasing = codes[:, -1] >= codes[:, 0]
    # As a function of v = direction * acc (v also runs over -B..B), every channel's codes increase.
    codes_v = torch.where(increasing.unsqueeze(1), codes, codes.flip(1)).contiguous()
    if (codes_v.diff(dim=1) < 0).any():
        bad = int((codes_v.diff(dim=1) < 0).any(dim=1).nonzero()[0])
        raise ValueError(f"convert: module {name!r}: output channel {bad}'s codes are not monotone in the "
                         "accumulator; batch norm and quantizer cannot be folded into thresholds")
    ks = torch.arange(1, levels + 1, dtype=torch.int16).expand(out_channels, levels).contiguous()
    # The first v whose code is at least k (index 2B + 1: never, the threshold is B + 1).
    first = torch.searchsorted(codes_v, ks, side="left")
    thresholds = first - bound
    direction = torch.where(increasing, 1, -1).to(torch.int32)
    return thresholds.to(torch.int32).contiguous(), direction.contiguous()


# --------------------------------------------------------------------------
# The conversion.


def _example_input(model: nn.Module, image_size: int) -> torch.Tensor:
    for _name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return torch.zeros(1, module.in_channels, image_size, image_size)
    raise _refuse("", model, "it has no Conv2d, so the input's channel count is unknown; pass example_input")


def _float_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A plain nn.Conv2d convolving with ``conv``'s (quantized) weight."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode)
    with torch.no_grad():
        weight = conv.quantized_weight() if isinstance(conv, QuantConv2d) else conv.weight
        out.weight.copy_(weight.detach())
        if conv.bias is not None:
            out.bias.copy_(conv.bias.detach())
    return out


def _float_module(name: str, module: nn.Module) -> Optional[nn.Module]:
    """The float-stage equivalent of a known module (None: nothing to run)."""
    import copy

    if isinstance(module, nn.Conv2d):
        return _float_conv(module)
    if isinstance(module, nn.Dropout):
        return None
    if isinstance(module, nn.BatchNorm2d):
        _check_bn(name, module)
        return copy.deepcopy(module)
    if isinstance(module, _FLOAT_PASSTHROUGH):
        return copy.deepcopy(module)
    if isinstance(module, _GlobalAveragePool):
        return st.GlobalAveragePool()
    if isinstance(module, SpaceToDepth):
        return st.FloatSpaceToDepth(module.block_size)
    raise _refuse(name, module, "unknown module type; the converter knows Conv2d/QuantConv2d, BatchNorm2d, "
                                "QuantActivation, ReLU, SpaceToDepth, Dropout, Identity, Flatten, "
                                "AdaptiveAvgPool2d, Linear and the models' global average pool")


def _threshold_pipeline(conv: nn.Conv2d, scale: torch.Tensor, in_step: float, folded: Sequence[nn.Module],
                        act: QuantActivation) -> Callable[[torch.Tensor], torch.Tensor]:
    """acc -> codes through the source model's own float modules (model dtype float32)."""
    from ..codes import quantize_to_codes

    bias = conv.bias.detach() if conv.bias is not None else None
    scale64 = scale.to(torch.float64) * in_step

    def pipeline(acc: torch.Tensor) -> torch.Tensor:
        pre = (acc.to(torch.float64).view(1, -1) * scale64.view(-1, 1)).to(torch.float32)  # [O, L]
        if bias is not None:
            pre = pre + bias.view(-1, 1)
        y = pre.unsqueeze(0).unsqueeze(-1)  # [1, O, L, 1]
        with torch.no_grad():
            for module in folded:
                y = module(y)
            return quantize_to_codes(y[0, :, :, 0], act.bit, act.fixed_max_value(y.dtype)).to(torch.int64)

    return pipeline


def convert(model: nn.Module, example_input: Optional[torch.Tensor] = None, *, image_size: int = 32) -> DeployedModel:
    """Convert an eval-mode low-bit model into a :class:`DeployedModel` (docs/deploy.md).

    Args:
        model: an ``nn.Module`` in eval mode whose forward is a chain of known
            modules (``torch_ext.models.LmnetV1Quantize``,
            ``SampleNetworkQuantize``, an ``nn.Sequential`` of the same pieces).
        example_input: a float32 ``[N, C, H, W]`` input to trace the forward
            with (default zeros ``[1, C, image_size, image_size]``, ``C`` the
            first convolution's input channels).
        image_size: H and W of the default example input.

    Raises:
        ValueError: naming the module and the reason when something cannot be
            converted (training mode, an unknown module type, a
            ``QuantActivation`` with more than 4 bits, a non-float32 model, ...).
    """
    _check_convertible(model)
    if example_input is None:
        example_input = _example_input(model, image_size)
    traced = _trace_chain(model, example_input)
    chain = [(name, module) for name, module, _shape in traced]
    for name, module in chain:
        if not isinstance(module, (nn.Conv2d, QuantActivation, SpaceToDepth, _GlobalAveragePool, nn.Dropout)
                          + _FLOAT_PASSTHROUGH):
            _float_module(name, module)  # raises the "unknown module type" error
    stages = _StageBuilder(chain, [shape for _name, _module, shape in traced]).build()
    if not stages:
        raise _refuse("", model, "nothing to run")
    deployed = DeployedModel(stages, int(example_input.shape[1]), type(model).__name__)
    deployed.requires_grad_(False)
    return deployed.eval()


def _check_convertible(model: nn.Module) -> None:
    """Refuse, naming the module or tensor, a model the converter cannot take as it is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if module.training:
            raise _refuse(name, module, "it is in training mode; call model.eval() first (batch norm and dropout "
                                        "are converted as they act in eval)")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ValueError(f"convert: {name!r} has dtype {tensor.dtype}; the converter takes float32 models")
        if tensor.device.type != "cpu":
            raise ValueError(f"convert: {name!r} is on {tensor.device}; move the model to the CPU first")
    for name, module in model.named_modules():
        if isinstance(module, QuantActivation):
            _quant_params(name, module)  # (a custom backward plays no part in inference)


class _StageBuilder:
    """The stages of a traced chain, built left to right.

    While the data is float, modules gather into one :class:`FloatStage`; a
    ``QuantActivation`` turns the data into packed codes (``packed``: their
    channels, bit and max_value), which packed stages then carry until a
    module needs float values again.
    """

    def __init__(self, chain: List[Tuple[str, nn.Module]], shapes: List[Tuple[int, ...]]) -> None:
        self.chain = chain
        self.shapes = shapes
        self.stages: List[nn.Module] = []
        self.floats: List[nn.Module] = []
        self.packed: Optional[Tuple[int, int, float]] = None

    def build(self) -> List[nn.Module]:
        i = 0
        while i < len(self.chain):
            i = self._float_step(i) if self.packed is None else self._packed_step(i)
        self._flush_floats()
        if self.packed is not None:
            self.stages.append(st.CodesToFloatStage(*self.packed))
        return self.stages

    def _flush_floats(self) -> None:
        if self.floats:
            self.stages.append(st.FloatStage(list(self.floats)))
            self.floats.clear()

    def _float_step(self, i: int) -> int:
        """chain[i] on float data; returns the next index."""
        name, module = self.chain[i]
        if isinstance(module, QuantActivation):
            self._flush_floats()
            bit, max_value = _quant_params(name, module)
            shape = self.shapes[i]
            if len(shape) != 4:
                raise _refuse(name, module, f"its input has shape {shape}; packed codes need [N, C, H, W]")
            channels = int(shape[1])
            self.stages.append(st.QuantizeStage(name, channels, bit, max_value))
            self.packed = (channels, bit, max_value)
        else:
            m = _float_module(name, module)
            if m is not None:
                self.floats.append(m)
        return i + 1

    def _packed_step(self, i: int) -> int:
        """chain[i] on packed codes; returns the next index (``i`` itself when the module needs float data)."""
        name, module = self.chain[i]
        channels, bit, max_value = self.packed
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return i + 1
        if isinstance(module, SpaceToDepth):
            self.stages.append(st.PackedSpaceToDepthStage(channels, module.block_size))
            self.packed = (channels * module.block_size**2, bit, max_value)
            return i + 1
        scale = _packable_conv(name, module)
        if scale is not None:
            i, self.packed = _convert_conv(self.chain, i, scale, self.packed, self.stages)
            return i
        # Back to float values; the module runs in the float state.
        self.stages.append(st.CodesToFloatStage(*self.packed))
        self.packed = None
        return i


def _convert_conv(chain, i: int, scale: torch.Tensor, packed: Tuple[int, int, float], stages: List[nn.Module]):
    """A packed convolution at chain[i]; returns the next index and the new packed state."""
    name, conv = chain[i]
    channels, bit, max_value = packed
    if conv.in_channels != channels:
        raise _refuse(name, conv, f"in_channels={conv.in_channels} but its input has {channels} channels")
    weight = pack_binary_weights(conv.weight.detach())
    stride = [int(s) for s in conv.stride]
    padding = _conv_padding(name, conv)
    kh, kw = conv.kernel_size
    bound = levels_above_zero(bit) * channels * kh * kw
    if bound >= 2**31 - 1:
        raise _refuse(name, conv, f"its accumulator bound {bound} does not fit an int32")
    in_step = max_value / levels_above_zero(bit)

    # Look ahead: BatchNorm2d / ReLU / Dropout / Identity up to a QuantActivation -> thresholds.
    j = i + 1
    folded: List[nn.Module] = []
    while j < len(chain) and isinstance(chain[j][1], _FOLDABLE):
        if isinstance(chain[j][1], nn.BatchNorm2d):
            _check_bn(*chain[j])
        if not isinstance(chain[j][1], (nn.Dropout, nn.Identity)):
            folded.append(chain[j][1])
        j += 1
    if j < len(chain) and isinstance(chain[j][1], QuantActivation):
        act_name, act = chain[j]
        out_bit, out_max = _quant_params(act_name, act)
        pipeline = _threshold_pipeline(conv, scale, in_step, folded, act)
        thresholds, direction = fold_thresholds(pipeline, conv.out_channels, bound, out_bit, name)
        stages.append(st.PackedConvThresholdStage(act_name, channels, conv.out_channels, weight, stride, padding,
                                                  thresholds, direction, out_bit))
        return j + 1, (conv.out_channels, out_bit, out_max)

    # Affine output: conv bias and an immediately following batch norm folded.
    a = scale.to(torch.float64) * in_step
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(a)
    j = i + 1
    while j < len(chain) and isinstance(chain[j][1], (nn.Dropout, nn.Identity)):
        j += 1
    if j < len(chain) and isinstance(chain[j][1], nn.BatchNorm2d):
        bn = chain[j][1]
        _check_bn(*chain[j])
        inv = 1.0 / torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
        gamma = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(a)
        beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(a)
        g = gamma * inv
        a = a * g
        b = (b - bn.running_mean.detach().to(torch.float64)) * g + beta
        j += 1
    else:
        j = i + 1
    stages.append(st.PackedConvAffineStage(channels, conv.out_channels, weight, stride, padding,
                                           a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()))
    return j, None


def float_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as trained (float32)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
