"""torch_ext.ops: one module an operator family, its names reaching ``torch_ext.ops`` and ``torch_ext``.

Also: every registered operator has its fake kernel in its family's module,
the packed family's functions are the operators, and the formula's steps
(torch_ext.reference) are written once, in docs/quantizer.md's order.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import torch_ext
import torch_ext.ops
from torch_ext import reference

FAMILIES = sorted(i.name for i in pkgutil.iter_modules(torch_ext.ops.__path__) if not i.name.startswith("_"))


def test_the_families():
    assert {"quantize", "learnable", "packed", "weight_quantization"} <= set(FAMILIES)
    for old in ("ops.py", "_meta.py", "_transforms.py"):
        assert not (Path(torch_ext.__file__).parent / old).exists(), f"torch_ext/{old} is absorbed by torch_ext/ops/"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_names_reach_torch_ext_ops_and_torch_ext(family):
    module = importlib.import_module(f"torch_ext.ops.{family}")
    assert module.__all__, f"torch_ext.ops.{family} declares no __all__"
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(torch_ext.ops, name) is value, name
        assert getattr(torch_ext, name) is value, name
        assert name in torch_ext.ops.__all__ and name in torch_ext.__all__, name
        if callable(value) and not isinstance(value, type) and name.islower():
            assert value.__doc__, f"torch_ext.ops.{family}.{name} has no docstring"


@pytest.mark.parametrize("name", [
    "BackwardFn", "LEARN_MAX_VALUE_MODES", "effective_max_value", "linear_mid_tread_half_quantize",
    "linear_mid_tread_half_quantize_", "linear_mid_tread_half_quantize_learnable", "validate_bit",
    "validate_learn_mode", "validate_max_value",
])
def test_the_names_of_the_former_ops_module(name):
    assert hasattr(torch_ext.ops, name)


def _torch_ext_operators():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("torch_ext::"))


def test_every_operator_has_its_fake_kernel_in_torch_ext_ops():
    registry = pytest.importorskip("torch._library.simple_registry")
    ops_dir = Path(torch_ext.ops.__file__).parent.resolve()
    missing = []
    for name in _torch_ext_operators():
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd"):
            continue  # traced through its decomposition
        kernel = registry.singleton.find(name).fake_impl.kernel
        source = getattr(kernel, "source", "") if kernel is not None else ""
        if not source or Path(source.rsplit(":", 1)[0]).resolve().parent != ops_dir:
            missing.append(f"{name} ({source or 'no fake kernel'})")
    assert not missing, "operators without a fake kernel in torch_ext/ops/: " + ", ".join(missing)


def test_the_packed_functions_are_the_operators():
    torch.manual_seed(0)
    bit, max_value = 2, 2.0
    x = torch.randn(2, 70, 4, 4) * 2
    codes = torch_ext.quantize_to_codes(x, bit, max_value)
    packed = torch_ext.ops.quantize_pack_codes(x, bit, max_value)
    assert torch.equal(packed, torch_ext.ops.pack_codes(codes, bit))
    assert torch.equal(torch_ext.ops.unpack_codes(packed, 70), codes)
    weight = torch_ext.ops.pack_binary_weights(torch.randn(3, 70, 3, 3))
    acc = torch_ext.ops.packed_conv2d(packed, weight, 70, (1, 1), (1, 1))
    assert torch.equal(acc, torch.ops.torch_ext.packed_conv2d(packed, weight, 70, [1, 1], [1, 1]))
    s2d = torch_ext.ops.packed_space_to_depth(packed, 70, 2)
    assert torch.equal(s2d, torch.ops.torch_ext.packed_space_to_depth(packed, 70, 2))


class _RecordingSteps:
    """reference.Steps on torch tensors (out of place), recording the operations' names."""

    def __init__(self):
        self.names = []

    def __getattr__(self, name):
        functions = {"less": torch.lt, "greater": torch.gt, "where": torch.where, "div": torch.div,
                     "mul": torch.mul, "add": torch.add, "floor": torch.floor, "constant": float}

        def step(*args):
            if name != "constant":
                self.names.append(name)
            return functions[name](*args)

        return step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("bit", [1, 2, 8, 32])
def test_the_formula_is_written_once_in_docs_order(dtype, bit):
    x = torch.tensor([-float("inf"), -1.0, -0.0, 0.0, 0.3, 0.5, 1.0, 1.99, 2.0, 7.0, float("inf"), float("nan")],
                     dtype=dtype)
    t = reference.compute_dtype(dtype)
    m, n = reference.constants(t, x.device, bit, 2.0)
    steps = _RecordingSteps()
    y = reference.quantize_in_compute_type(x.to(t), m, n, steps).to(dtype)
    clip = ["less", "where", "greater", "where"]
    assert steps.names == (clip if bit == 32 else clip + ["div", "mul", "add", "floor", "div", "mul"])
    # The in-place torch steps and these out-of-place ones: the same bits, and the operator's.
    torch.testing.assert_close(y, reference.linear_mid_tread_half_quantize_reference(x, bit, 2.0),
                               rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, torch_ext.linear_mid_tread_half_quantize(x, bit, 2.0),
                               rtol=0, atol=0, equal_nan=True)


def test_the_python_straight_through_gradient_is_the_reference_one():
    from torch_ext.ops import quantize

    x = torch.tensor([-1.0, 0.0, 0.5, 1.9, 2.0, 3.0], requires_grad=True)
    grad = torch.func.grad(lambda t: torch_ext.linear_mid_tread_half_quantize(t, 2, 2.0).sum())(x)
    expected = reference.linear_mid_tread_half_quantize_backward_reference(torch.ones(6), x.detach(), 2.0)
    assert torch.equal(grad, expected)
    assert torch.equal(quantize._grad_x(None, torch.ones(6), x.detach(), 2, 2.0), expected)
