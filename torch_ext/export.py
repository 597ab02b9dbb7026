"""ONNX export of models that use torch_ext's quantizers, and a runner for onnxruntime.

:func:`export_onnx` exports a model with PyTorch's dynamo-based ONNX exporter
(``torch.onnx.export(..., dynamo=True)``). The registered operator
``torch.ops.torch_ext.linear_mid_tread_half_quantize`` has no ONNX
counterpart, so a ``custom_translation_table`` writes it with standard ONNX
operators, step for step in docs/quantizer.md's order and compute type (the
steps of :mod:`torch_ext.reference`, run on ONNX nodes)::

    c = Where(x < 0, 0, x); c = Where(c > m, m, c)     # NaN kept, -inf -> 0, +inf -> m
    y = Mul(Div(Floor(Add(Mul(Div(c, m), n), 0.5)), n), m)   # bit 32: y = c

(float16 and bfloat16 inputs are Cast to float32 first and back after, as
the kernels compute in float32). onnxruntime evaluates these one IEEE
operation at a time, so its quantizer outputs equal PyTorch's bit for bit.

``Where`` rather than ``Clip``: ONNX leaves ``Clip`` of NaN and the sign of a
clipped ``-0.0`` unspecified; the two comparisons pin both down as docs/quantizer.md
does.

Weight quantizers (:class:`torch_ext.QuantConv2d`) are folded by default:
the export holds each layer's quantized weight (exactly
``quantized_weight()``, ``±scale``) as a constant, which is what a deployment
runtime wants. ``fold_weights=False`` exports the float weights and the
quantizer's expression (Abs, ReduceMean, Where, ...) instead.

A learned ``max_value`` (``QuantActivation(learn_max_value="pact"|"lsq")``)
is exported as its value (the clamped m the kernels use), like a fixed one.

In-place quantizers (``QuantActivation(inplace=True)``,
``linear_mid_tread_half_quantize_``) are exported as their out-of-place
equivalent (an ONNX graph has no in-place operations).

:func:`run_onnx` runs an exported file in onnxruntime, checking the inputs
against the model's declared inputs first so that a wrong shape or dtype
fails with a message that names the input.

Needs the ``onnx``, ``onnxscript`` and (for :func:`run_onnx`) ``onnxruntime``
packages (``pip install onnx onnxscript onnxruntime``).
"""

from __future__ import annotations

import copy
import ctypes
import operator
import os
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import reference

__all__ = ["export_aoti", "export_onnx", "export_trained_model", "onnx_translation_table", "run_onnx"]

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# --------------------------------------------------------------------------
# The quantizer in standard ONNX operators.


def _onnx_steps(np_t) -> SimpleNamespace:
    """:class:`torch_ext.reference.Steps` as ONNX nodes (opset 18), constants in T (``np_t``)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    def constant(value: float):
        # One rounding of the Python double to T, like the kernels' T(max_value).
        return op.Constant(value=ir.tensor(np_t(value)))

    return SimpleNamespace(constant=constant, less=op.Less, greater=op.Greater, where=op.Where, div=op.Div,
                           mul=op.Mul, add=op.Add, floor=op.Floor)


def _quantize_onnx(x, bit: int, max_value: float):
    """ONNX translation of ``torch_ext::linear_mid_tread_half_quantize`` (traced by the exporter).

    The formula is :mod:`torch_ext.reference`'s, run on ONNX nodes instead of tensors.
    """
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    dtype = x.dtype
    if dtype == ir.DataType.DOUBLE:
        t, np_t = ir.DataType.DOUBLE, np.float64
    else:
        t, np_t = ir.DataType.FLOAT, np.float32
    steps = _onnx_steps(np_t)
    m = steps.constant(max_value)
    n = None if bit == 32 else steps.constant(reference.levels_above_zero(bit))
    xt = x if dtype == t else op.Cast(x, to=t)
    y = reference.quantize_in_compute_type(xt, m, n, steps)
    return y if dtype == t else op.Cast(y, to=dtype)


def onnx_translation_table() -> Dict[Any, Any]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Use it directly when exporting with ``torch.onnx.export`` yourself;
    :func:`export_onnx` passes it for you.
    """
    return {torch.ops.torch_ext.linear_mid_tread_half_quantize.default: _quantize_onnx}


# --------------------------------------------------------------------------
# Preparing the model.


def _as_tuple(example_inputs: Inputs) -> Tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        for i, t in enumerate(example_inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"export_onnx: example_inputs must be a tensor or a sequence of tensors, "
                    f"got element {i} of type {type(t).__name__}"
                )
        return tuple(example_inputs)
    raise TypeError(
        f"export_onnx: example_inputs must be a tensor or a sequence of tensors, got {type(example_inputs).__name__}"
    )


def _describe(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"[{', '.join(map(str, t.shape))}] {str(t.dtype).replace('torch.', '')}" for t in inputs)


def _fold_weight_quantizers(model: nn.Module) -> None:
    """Replace each QuantConv2d's weight by its quantized weight and drop the quantizer (in place)."""
    from .quant_conv import QuantConv2d

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, QuantConv2d) and module.weight_quantizer is not None:
                module.weight.copy_(module.quantized_weight())
                module.weight_quantizer = None
                module.weight_quantizer_kwargs = {}


_VIEW_KWARGS = ("_x_size", "_x_stride", "_x_storage_offset", "_x_slice_dim", "_x_slice_start", "_x_slice_end")


def _replace_inplace_quantizers(ep: "torch.export.ExportedProgram") -> None:
    """Rewrite functionalized calls of the in-place quantizer as the out-of-place one.

    ``run_decompositions`` turns ``linear_mid_tread_half_quantize_(x)`` into
    ``auto_functionalized_v2(op, _all_bases=[base], ...)`` whose item 1 is
    the updated base; the ONNX exporter has no translation for that. The
    updated base is ``quantize(base)`` when ``x`` is the whole base (or an
    alias of it), and ``slice_scatter(base, quantize(slice(base)))`` when
    ``x`` is a slice of it.
    """
    from torch.export.graph_signature import TensorArgument

    inplace_op = torch.ops.torch_ext.linear_mid_tread_half_quantize_.default
    functional_op = torch.ops.torch_ext.linear_mid_tread_half_quantize.default
    aten = torch.ops.aten
    graph = ep.graph_module.graph
    renamed: Dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or "auto_functionalized" not in str(node.target):
            continue
        if not node.args or node.args[0] is not inplace_op:
            continue
        kw = node.kwargs
        bases = kw["_all_bases"]
        base = bases[kw["_x_base_index"]]
        bit, max_value = kw["bit"], kw["max_value"]
        base_val = base.meta["val"]
        fake_mode = base_val.fake_mode
        with graph.inserting_before(node), fake_mode:
            if not any(k in kw for k in _VIEW_KWARGS):  # x is base itself, or an alias of it
                new = graph.call_function(functional_op, (base, bit, max_value))
                new.meta["val"] = functional_op(base_val, bit, max_value)
            elif "_x_slice_dim" in kw:
                dim, start, end = kw["_x_slice_dim"], kw["_x_slice_start"], kw["_x_slice_end"]
                part = graph.call_function(aten.slice.Tensor, (base, dim, start, end))
                part.meta["val"] = aten.slice.Tensor(base_val, dim, start, end)
                q = graph.call_function(functional_op, (part, bit, max_value))
                q.meta["val"] = functional_op(part.meta["val"], bit, max_value)
                new = graph.call_function(aten.slice_scatter.default, (base, q, dim, start, end))
                new.meta["val"] = aten.slice_scatter.default(base_val, q.meta["val"], dim, start, end)
            else:
                raise NotImplementedError(
                    "export_onnx: the in-place linear_mid_tread_half_quantize_ is applied to a strided view "
                    "(as_strided) of a tensor, which this exporter cannot rewrite; use the out-of-place "
                    "torch_ext.linear_mid_tread_half_quantize (or QuantActivation(inplace=False)) there"
                )
        for user in list(node.users):
            index = user.args[1] if user.target is operator.getitem else None
            if index is None:
                raise NotImplementedError(f"export_onnx: unexpected use {user.format_node()} of {node.name}")
            if index == 1 + kw["_x_base_index"]:
                renamed[user.name] = new.name
                user.replace_all_uses_with(new)
            elif user.users:
                raise NotImplementedError(f"export_onnx: unexpected use {user.format_node()} of {node.name}")
            graph.erase_node(user)
        graph.erase_node(node)
    if renamed:
        for spec in ep.graph_signature.output_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name in renamed:
                spec.arg = TensorArgument(name=renamed[spec.arg.name])
        graph.lint()
        ep.graph_module.recompile()


# --------------------------------------------------------------------------
# Export.


def _require(fn: str, *modules: str) -> None:
    """Import the optional ``modules`` now, or raise an ImportError that names the extra to install."""
    import importlib

    from ._extras import missing_extra

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"{fn}: {missing_extra(exc) or exc}", name=exc.name) from exc


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: Union[str, "os.PathLike[str]"],
    *,
    fold_weights: bool = True,
    dynamic_batch: bool = False,
    **kwargs: Any,
) -> "torch.onnx.ONNXProgram":
    """Export ``model`` (in eval mode) to the ONNX file ``path``; returns the ``ONNXProgram``.

    The model is not modified: a copy is put in eval mode (batch norm uses
    its running statistics, dropout is off), weight quantizers are folded
    (``fold_weights``), in-place quantizers become out-of-place, and the copy
    is exported with ``torch.export`` and ``torch.onnx.export(dynamo=True)``,
    the quantizer written in standard ONNX operators (module docstring).

    Args:
        model: the ``nn.Module`` to export (any device).
        example_inputs: a tensor, or a tuple of tensors, of the shapes and
            dtypes the exported model takes (its input shapes are fixed to
            these, except the batch dim with ``dynamic_batch``).
        path: the ``.onnx`` file to write (weights inside it, unless you pass
            ``external_data=True``).
        fold_weights: store each ``QuantConv2d``'s quantized weight as a
            constant (default) instead of its float weight and quantizer.
        dynamic_batch: make dim 0 of every input (and output) dynamic.
        **kwargs: ``dynamic_shapes`` goes to ``torch.export.export``; the
            rest to ``torch.onnx.export`` (e.g. ``opset_version``,
            ``input_names``, ``output_names``, ``external_data``,
            ``optimize``, ``verbose``, ``custom_translation_table`` entries
            added to the quantizer's).

    Raises:
        ValueError: the model refuses ``example_inputs`` (e.g. a wrong number
            of channels or a size the model cannot take); the message names
            the input shapes and the model's own error.
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` not
            tensors.
        ImportError: ``onnx`` or ``onnxscript`` is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be a torch.nn.Module, got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    _require("export_onnx", "onnx", "onnxscript")
    export_model = _model_to_export(model, fold_weights)
    _check_runs(type(model).__name__, export_model, args)
    if "dynamo" in kwargs and not kwargs.pop("dynamo"):
        raise ValueError(
            "export_onnx: uses the dynamo exporter (torch.onnx.export(..., dynamo=True)); dynamo=False is not supported"
        )
    args, dynamic_shapes = _dynamic_shapes(args, dynamic_batch, kwargs.pop("dynamic_shapes", None))
    ep = _exported_program(export_model, args, dynamic_shapes)
    table = onnx_translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("external_data", False)
    if dynamic_shapes is not None:
        kwargs["dynamic_shapes"] = dynamic_shapes  # names the ONNX dims ("batch")
    return torch.onnx.export(ep, args, os.fspath(path), dynamo=True, custom_translation_table=table, **kwargs)


def _model_to_export(model: nn.Module, fold_weights: bool) -> nn.Module:
    """An eval-mode copy of ``model``, learned max_values frozen and (``fold_weights``) weight quantizers folded."""
    from .modules import QuantActivation

    export_model = copy.deepcopy(model).eval()
    # A learned max_value (QuantActivation(learn_max_value=...)) is exported as
    # its value: the fixed quantizer with that m, a constant of the graph.
    for module in export_model.modules():
        if isinstance(module, QuantActivation):
            module.freeze_max_value_()
    if fold_weights:
        _fold_weight_quantizers(export_model)
    return export_model


def _check_runs(model_name: str, export_model: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
    """Run the model once: a bad input shape fails here, with the model's own message, not deep in torch.export."""
    with torch.no_grad():
        try:
            export_model(*args)
        except Exception as exc:
            raise ValueError(
                f"export_onnx: {model_name} cannot run on the example input(s) {_describe(args)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _dynamic_shapes(args: Tuple[torch.Tensor, ...], dynamic_batch: bool, dynamic_shapes: Any):
    """``(args, dynamic_shapes)`` for torch.export: the user's, or dim 0 of every input named "batch"."""
    if dynamic_batch and dynamic_shapes is not None:
        raise ValueError("export_onnx: give dynamic_batch=True or dynamic_shapes, not both")
    if not dynamic_batch:
        return args, dynamic_shapes
    for i, t in enumerate(args):
        if t.dim() == 0:
            raise ValueError(f"export_onnx: dynamic_batch needs inputs with a batch dim, input {i} is 0-dim")
    if any(t.shape[0] == 1 for t in args):
        # torch.export specializes a dim of size 1; trace with a batch of 2.
        args = tuple(torch.cat([t, t]) for t in args)
    batch = torch.export.Dim("batch")
    return args, tuple({0: batch} for _ in args)


def _exported_program(export_model: nn.Module, args: Tuple[torch.Tensor, ...], dynamic_shapes: Any):
    """``torch.export`` of the prepared model, in-place quantizers written as out-of-place ones."""
    with torch.no_grad():
        ep = torch.export.export(export_model, args, dynamic_shapes=dynamic_shapes, strict=False)
    # In-place quantizers: functionalize (no decompositions yet: the ONNX
    # exporter picks its own), then write them as out-of-place ones.
    inplace_op = torch.ops.torch_ext.linear_mid_tread_half_quantize_.default
    if any(node.target is inplace_op for node in ep.graph.nodes):
        ep = ep.run_decompositions({})
        _replace_inplace_quantizers(ep)
    return ep


def export_trained_model(
    model: nn.Module,
    path: Union[str, "os.PathLike[str]"],
    *,
    in_channels: int,
    image_size: int,
    dynamic_batch: bool = True,
) -> "torch.onnx.ONNXProgram":
    """Export an image classifier taking ``[N, in_channels, image_size, image_size]`` float32 images.

    What ``python -m torch_ext.train --export-onnx PATH`` calls after
    training: :func:`export_onnx` with an example batch on the model's device,
    the batch dim dynamic by default.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    example = torch.zeros(1, in_channels, image_size, image_size, device=device)
    return export_onnx(model, example, path, dynamic_batch=dynamic_batch)


def export_aoti(
    model: nn.Module,
    example_inputs: Inputs,
    path: Union[str, "os.PathLike[str]"],
    *,
    dynamic_batch: bool = True,
) -> str:
    """``torch.export`` of ``model`` (in eval mode) compiled by AOTInductor into the package ``path`` (a ``.pt2``).

    The registered torch_ext operators are recorded as custom-operator nodes
    (their fake kernels keep the batch size symbolic when ``dynamic_batch``,
    dim 0 of the first input). Run the package in Python with
    ``torch_ext.deploy.package.load(path)`` (or
    ``torch._inductor.aoti_load_package`` after ``import torch_ext``), in
    LibTorch with ``torch::inductor::AOTIModelPackageLoader`` in a process
    linked with libtorch_ext. Needs a C++ compiler (AOTInductor compiles the
    model); returns ``path``.
    """
    from torch_ext.deploy import package  # the writer of deployed models, shared

    inputs = _as_tuple(example_inputs)
    if len(inputs) != 1:
        raise ValueError(f"export_aoti: one input tensor expected, got {_describe(inputs)}")
    was_training = model.training
    model.eval()
    try:
        return package.write(model, inputs[0], os.fspath(path), "aoti", dynamic_batch=dynamic_batch)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------
# Running an exported model.

_ORT_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def _to_ort_value(t: torch.Tensor):
    import onnxruntime as ort

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: pass the bits
        from onnx import TensorProto

        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.int16).numpy(), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


def _to_torch(value) -> torch.Tensor:
    if "bfloat16" in value.data_type():
        out = torch.empty(value.shape(), dtype=torch.bfloat16)
        if out.numel():
            ctypes.memmove(out.data_ptr(), value.data_ptr(), value.tensor_size_in_bytes())
        return out
    return torch.from_numpy(value.numpy().copy())


def run_onnx(
    model: Union[str, "os.PathLike[str]", bytes, Any],
    *inputs: torch.Tensor,
    providers: Optional[Sequence[str]] = None,
) -> List[torch.Tensor]:
    """Run an ONNX model in onnxruntime on torch tensors; returns its outputs as CPU tensors.

    Args:
        model: an ``.onnx`` path, serialized bytes, an ``onnx.ModelProto`` or
            the ``ONNXProgram`` that :func:`export_onnx` returns.
        *inputs: one tensor per model input, in order.
        providers: onnxruntime execution providers (default CPU).

    Raises:
        ValueError: wrong number of inputs, or an input whose shape or dtype
            the model does not take (naming the input, what it expects and
            what it got).
    """
    _require("run_onnx", "onnxruntime")
    import onnxruntime as ort

    if hasattr(model, "model_proto"):  # torch.onnx.ONNXProgram
        model = model.model_proto
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    session = ort.InferenceSession(model, providers=list(providers or ["CPUExecutionProvider"]))
    declared = session.get_inputs()
    if len(inputs) != len(declared):
        raise ValueError(
            f"run_onnx: the model takes {len(declared)} input(s) "
            f"({', '.join(d.name for d in declared)}), got {len(inputs)}"
        )
    feed = {}
    for d, t in zip(declared, inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"run_onnx: input {d.name!r} must be a torch.Tensor, got {type(t).__name__}")
        want = [s if isinstance(s, int) else None for s in d.shape]
        shape_ok = len(want) == t.dim() and all(w is None or w == s for w, s in zip(want, t.shape))
        if not shape_ok:
            expected = "[" + ", ".join(str(s) if isinstance(s, int) else str(s or "?") for s in d.shape) + "]"
            raise ValueError(
                f"run_onnx: input {d.name!r} must have shape {expected}, got shape {list(t.shape)}"
            )
        dtype = _ORT_TO_TORCH.get(d.type)
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"run_onnx: input {d.name!r} must have dtype {dtype}, got dtype {t.dtype}")
        feed[d.name] = _to_ort_value(t)
    return [_to_torch(v) for v in session.run_with_ort_values(None, feed)]
