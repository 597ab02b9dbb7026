"""Shared fixtures and helpers of the pytest suite.

- ``devices``/``device``: "cpu", plus "cuda" where a GPU is visible and
  torch_ext was built with its CUDA kernels.
- ``ALL_DEVICES``: "cpu" and "cuda" for ``parametrize("device", ...)``, the
  "cuda" case collected everywhere and skipped, with the reason, without a GPU.
- ``values_with_specials``/``grads_like``: the fixed quantizer's inputs
  (ties, their neighbours, specials) and gradients (inf, NaN, -0.0 mixed in).
- ``assert_bit_exact``: compares two tensors bit for bit (viewed as integers
  of the same width), so that -0.0 vs 0.0 and NaN payloads count.
- hypothesis profiles: "ci" (loaded by default: a fixed, modest, derandomized
  budget) and "long" (``pytest --hypothesis-profile=long``).
- the ``slow`` marker: tests that take long but still run by default
  (deselect with ``-m "not slow"``); the ``sanitize`` marker: the small CUDA
  selection that scripts/gpu_check.sh runs under compute-sanitizer; the
  ``cuda`` marker: every test that runs on the GPU (scripts/gpu_check.sh's
  pytest step runs ``-m cuda``), set here on the tests of test_cuda.py and on
  those parametrized with the device "cuda", written on the others.
- ``requires_cuda``, ``requires_triton``: skip, with the reason, where no
  usable GPU or no Triton is there.

Test files import the plain helpers with ``from conftest import ...`` (pytest
puts this folder on ``sys.path``, as it has no ``__init__.py``).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import torch_ext

# --------------------------------------------------------------------------
# Hypothesis profiles. The "ci" budget is fixed and derandomized, so CI runs
# the same examples every time; "long" is for hunting (hours if you like:
# HYPOTHESIS_LONG_EXAMPLES=100000).
settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("HYPOTHESIS_LONG_EXAMPLES", "5000")),
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# hypothesis' pytest plugin loads the profile named by --hypothesis-profile
# after this file is imported; without the option, "ci" stays.
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes 10 s or more on 2 cores; make test runs it, make check leaves it out (-m 'not slow')"
    )
    config.addinivalue_line(
        "markers",
        "sanitize: the small CUDA selection scripts/gpu_check.sh runs under compute-sanitizer "
        "(select with -m sanitize)",
    )
    config.addinivalue_line(
        "markers",
        "cuda: runs on the GPU: scripts/gpu_check.sh runs -m cuda (set by pytest_collection_modifyitems on "
        "the tests of test_cuda.py and those parametrized with the device 'cuda'; write it on the others)",
    )


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """The ``cuda`` marker on every test of test_cuda.py and every test with a "cuda" device parameter."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.path.name == "test_cuda.py" or (
            callspec is not None and any(_is_cuda_device(v) for v in callspec.params.values())
        ):
            item.add_marker(pytest.mark.cuda)


#: Examples run by each property test (test_properties.py counts them).
EXAMPLE_COUNTS: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # tests/test_docs.py: the README's and docs' code blocks not run, each with its reason.
    not_run = [value for reports in terminalreporter.stats.values() for report in reports
               if getattr(report, "when", None) == "call"
               for name, value in getattr(report, "user_properties", ()) if name == "docs_not_run"]
    if not_run:
        terminalreporter.write_sep("-", f"docs blocks not run ({len(not_run)})")
        for line in not_run:
            terminalreporter.write_line(line)
    if EXAMPLE_COUNTS:
        total = sum(EXAMPLE_COUNTS.values())
        parts = ", ".join(f"{name} {count}" for name, count in EXAMPLE_COUNTS.items())
        terminalreporter.write_line(
            f"hypothesis examples run ({settings.default.max_examples} max a test, profile "
            f"{config.getoption('hypothesis_profile', None) or 'ci'}): {total} ({parts})"
        )


# --------------------------------------------------------------------------
# Devices, dtypes, bit widths.

#: The floating dtypes of docs/quantizer.md.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Every valid bit width.
BITS = tuple(range(1, 17)) + (32,)

CUDA_AVAILABLE = torch.cuda.is_available()
CUDA_BUILT = torch_ext.built_with_cuda()
HAS_CUDA = CUDA_AVAILABLE and CUDA_BUILT
#: Why the CUDA tests are skipped here ("" where they run).
CUDA_SKIP_REASON = (
    ""
    if HAS_CUDA
    else (
        "no CUDA GPU visible (torch.cuda.is_available() is False)"
        if not CUDA_AVAILABLE
        else "torch_ext was built without its CUDA kernels (torch_ext.built_with_cuda() is False)"
    )
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)

DEVICES = ("cpu",) + (("cuda",) if HAS_CUDA else ())
#: "cpu" and "cuda", the "cuda" case always collected and skipped, with the
#: reason, where no usable GPU is (``@pytest.mark.parametrize("device",
#: ALL_DEVICES)``): a family's CUDA cases beside its CPU ones, marked ``cuda``
#: by pytest_collection_modifyitems on every machine.
ALL_DEVICES = ("cpu", pytest.param("cuda", marks=requires_cuda))


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton_package
    except ImportError:  # pragma: no cover - a torch without the helper
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return has_triton_package()


#: Whether Triton is installed: torch.compile's default (inductor) backend
#: needs it for CUDA code (its CPU code is C++ and needs no Triton).
HAS_TRITON = _has_triton()
requires_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="needs Triton (torch.compile's inductor backend on CUDA): triton is not installed"
)


@pytest.fixture(scope="session")
def devices() -> tuple[str, ...]:
    """The devices to test on: "cpu", and "cuda" where it is usable."""
    return DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Parametrizes a test over ``DEVICES``."""
    return request.param


# --------------------------------------------------------------------------
# Bit-exact comparison.

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, contiguous, viewed as signed integers of the same width."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.view(_INT_OF_WIDTH[t.element_size()])


def assert_bit_exact(
    actual: torch.Tensor, expected: torch.Tensor, msg: str = "", *, nan_payload: bool = True
) -> None:
    """Same dtype, same shape and the same bits in every element.

    With ``nan_payload=False`` a NaN matches any NaN (docs/quantizer.md says "NaN stays
    NaN" but fixes no payload; the pure-PyTorch reference's vectorized
    dtype conversions write a different NaN than a scalar conversion does).
    The device may differ (both are compared on the CPU). On a mismatch the
    message names how many elements differ and shows the first few, with the
    index, both values and both bit patterns.
    """
    prefix = f"{msg}: " if msg else ""
    assert actual.dtype == expected.dtype, f"{prefix}dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = as_bits(actual), as_bits(expected)
    differ = a != e
    if not nan_payload and actual.is_floating_point():
        differ &= ~(actual.detach().cpu().isnan() & expected.detach().cpu().isnan())
    if bool(differ.any()):
        where = differ.nonzero()
        av = actual.detach().cpu()
        ev = expected.detach().cpu()
        lines = []
        for idx in where[:8].tolist():
            i = tuple(idx)
            lines.append(
                f"  at {i}: {av[i].item()!r} (bits {a[i].item():#x}) != expected {ev[i].item()!r} (bits {e[i].item():#x})"
            )
        raise AssertionError(
            f"{prefix}{where.shape[0]} of {a.numel()} elements differ ({actual.dtype}):\n" + "\n".join(lines)
        )


def assert_same_layout(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """Same shape and the same strides, ignoring dims of size 1 and empty
    tensors (whose strides mean nothing)."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    a = [s for s, n in zip(actual.stride(), actual.shape) if n > 1]
    e = [s for s, n in zip(expected.stride(), expected.shape) if n > 1]
    assert a == e, f"{msg}: strides {actual.stride()} != {expected.stride()} for shape {tuple(actual.shape)}"


@pytest.fixture(scope="session")
def bit_exact():
    """``assert_bit_exact`` as a fixture."""
    return assert_bit_exact


def dtype_id(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: test ids."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------
# The packed gradient mask: bit j of byte b is element 8*b + j of x in
# row-major order, set where 0 < x < m (compared in T).


def unpack_mask(mask: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first ``numel`` bits as bool, the padding bits after them), on the CPU."""
    assert mask.dtype == torch.uint8 and mask.dim() == 1, (mask.dtype, mask.shape)
    bits = (mask.cpu().to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
    bits = bits.reshape(-1).bool()
    return bits[:numel], bits[numel:]


def expected_mask(x: torch.Tensor, max_value: float) -> torch.Tensor:
    """0 < x < T(max_value) compared in T, flattened in row-major order, on the CPU."""
    t = torch.float64 if x.dtype == torch.float64 else torch.float32
    xt = x.detach().cpu().to(t)
    return ((xt > 0) & (xt < torch.tensor(max_value, dtype=t))).reshape(-1)


def expected_mask_in_layout(x: torch.Tensor, max_value: float, strides) -> torch.Tensor:
    """expected_mask in the memory order of the dense layout with these
    strides (docs/quantizer.md: bit k is the element at memory offset k)."""
    flags = expected_mask(x, max_value).reshape(x.shape)
    dense = torch.empty_strided(x.shape, strides, dtype=torch.bool)
    dense.copy_(flags)
    return dense.as_strided((x.numel(),), (1,))


def is_dense(x: torch.Tensor) -> bool:
    """x.is_non_overlapping_and_dense() of C++: every element at its own
    offset, the offsets filling one span (any order of the dims)."""
    if x.numel() == 0:
        return True  # no element, no overlap (and strides that mean nothing)
    if x.dim() == 1:
        return x.shape[0] < 2 or x.stride(0) == 1
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def contiguous_strides(shape) -> tuple:
    """The strides of a row-major tensor of this shape (as .contiguous() makes them)."""
    return torch.empty(shape, device="meta").stride()


# --------------------------------------------------------------------------
# Adversarial values.


def next_up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def next_down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, float("-inf")))


def tie_values(dtype: torch.dtype, bit: int, max_value: float, max_k: int | None = None) -> torch.Tensor:
    """Every rounding tie ``k*m/(2n)`` (k = 0..2n, at most ``max_k`` of them
    spread over the range) in ``dtype``, each with its neighbours one ulp
    below and above, plus 0, -0.0, m and its neighbours, ±inf, NaN and huge
    values. 1-D, in ``dtype``.

    The ties are computed in float64 and rounded once to ``dtype``; the
    neighbours are taken in ``dtype`` itself.
    """
    n = 2.0**bit - 1.0 if bit != 32 else 1.0
    count = int(2 * n) + 1
    if max_k is None or count <= max_k:
        k = torch.arange(count, dtype=torch.float64)
    else:
        # The low end, the high end and an even spread in between.
        edge = max_k // 4
        k = torch.cat(
            [
                torch.arange(edge, dtype=torch.float64),
                torch.linspace(edge, count - 1 - edge, max_k - 2 * edge, dtype=torch.float64).round(),
                torch.arange(count - edge, count, dtype=torch.float64),
            ]
        ).unique()
    ties = (k * max_value / (2.0 * n)).to(dtype)
    m = torch.tensor([max_value], dtype=torch.float64).to(dtype)
    finfo = torch.finfo(dtype)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), finfo.max, -finfo.max, finfo.tiny, -finfo.tiny,
         finfo.smallest_normal / 4, -1.0, 1.0, 0.5, 2.0],
        dtype=torch.float64,
    ).to(dtype)
    base = torch.cat([ties, m, 2 * m, m / 2])
    return torch.cat([base, next_down(base), next_up(base), specials])


def values_with_specials(shape, dtype, max_value=2.0, seed=0, nan=True) -> torch.Tensor:
    """CPU values over [-m/2, 3m/2] with 3-bit ties, their neighbours and specials."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    x = ((torch.rand(numel, generator=g, dtype=torch.float64) * 2.0 - 0.5) * max_value).to(dtype)
    special = tie_values(dtype, 3, max_value)
    if not nan:
        special = special[~special.isnan()]
    if numel:
        idx = torch.randint(0, numel, (min(numel, special.numel()),), generator=g)
        x[idx] = special[torch.randint(0, special.numel(), (idx.numel(),), generator=g)]
    return x.reshape(shape)


def grads_like(x: torch.Tensor, seed=1) -> torch.Tensor:
    """grad_y for x (on x's device) with inf, -inf, NaN and -0.0 mixed in."""
    g = values_with_specials(x.shape, x.dtype, 1.0, seed=seed)
    flat = g.view(-1)
    flat[::5] = float("inf")
    flat[1::7] = float("nan")
    flat[2::9] = float("-inf")
    flat[3::11] = -0.0
    return g.to(x.device)


@pytest.fixture
def one_thread():
    """Small models run faster on one thread (no OpenMP hand-offs), above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sgd_losses(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 15,
               lr: float = 0.05) -> list[float]:
    """The cross-entropy loss of each of ``steps`` SGD steps (momentum 0.9) on one batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


#: The integer type of each float type's width (bit views of a tensor).
INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}


def values_around(dtype: torch.dtype, centers: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every value within ``ulps`` bit patterns of each center (non-negative), their negatives, and the specials."""
    it = INT_OF[dtype]
    base = centers.to(dtype).abs().view(it)
    offsets = torch.arange(-ulps, ulps + 1, dtype=it)
    bits = (base[:, None] + offsets[None, :]).reshape(-1)
    bits = bits[(bits >= 0) & (bits <= torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(it))]
    x = bits.view(dtype)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan], dtype=dtype)
    return torch.cat([x, -x, specials])
