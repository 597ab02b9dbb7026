"""torch_ext's operators, one module an operator family.

Each module holds its family's functional Python API (typed, documented,
over ``torch.ops.torch_ext``), the fake kernels of its operators
(``torch.library.register_fake``: torch.compile, torch.export, opcheck) and
its Python autograd for torch.func, and declares its public names in ``__all__``:

* :mod:`~torch_ext.ops.quantize`: ``linear_mid_tread_half_quantize`` (and ``_``);
* :mod:`~torch_ext.ops.learnable`: the learnable max_value;
* :mod:`~torch_ext.ops.packed`: bit-packed W1A2 inference (``torch_ext.deploy``);
* :mod:`~torch_ext.ops.weight_quantization`: Blueoil's binary and ternary weight quantizers.

Every public module of this package is imported here and its ``__all__``
becomes this package's names (and ``torch_ext``'s): a new family is a new
module, with no edit here or in ``torch_ext/__init__.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import List

__all__: List[str] = []


def _import_families() -> None:
    """Import every module of the package not starting with ``_`` (sorted by name) and take its ``__all__``."""
    names = globals()
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in module.__all__:
            value = getattr(module, name)
            if names.get(name, value) is not value:
                raise ImportError(f"torch_ext.ops: {info.name} exports {name!r}, which another family exports too")
            names[name] = value
            if name not in __all__:
                __all__.append(name)


_import_families()
__all__.sort()
