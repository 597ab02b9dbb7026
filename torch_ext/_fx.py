"""FX symbolic tracing: torch_ext's Python-level quantizers are leaf calls of the graph.

``torch.fx.symbolic_trace`` runs a model's ``forward`` on ``Proxy`` objects.
The quantizers check their arguments and call an ``autograd.Function``,
neither of which a Proxy can go through; so, as torchvision does for its
operators, a quantizer that receives a Proxy records itself as one
``call_function`` node instead, and the traced ``GraphModule`` calls the same
Python function when it runs.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch

__all__ = ["is_fx_proxy", "leaf_call"]


def is_fx_proxy(value: Any) -> bool:
    return isinstance(value, torch.fx.Proxy)


def leaf_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Optional[torch.fx.Proxy]:
    """When an argument is an FX Proxy: ``fn(*args, **kwargs)`` recorded as one graph node; else None."""
    proxy = next((a for a in itertools.chain(args, kwargs.values()) if is_fx_proxy(a)), None)
    if proxy is None:
        return None
    return proxy.tracer.create_proxy("call_function", fn, args, kwargs)
