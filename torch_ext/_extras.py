"""Optional dependencies: which extra of ``pip install torch_ext[...]`` brings which module.

The core (operators, modules, models) needs only torch. A command that needs
more says, in one line, which extra to install instead of a traceback.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["EXTRA_OF_MODULE", "missing_extra"]

#: Top-level module -> the extra that installs it (setup.py reads requirements/<extra>.txt).
EXTRA_OF_MODULE = {
    "numpy": "train",
    "sklearn": "train",
    "matplotlib": "train",
    "tqdm": "train",
    "PIL": "train",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnx_ir": "onnx",
    "onnxruntime": "onnx",
}


def missing_extra(exc: ImportError) -> Optional[str]:
    """For an ImportError of an optional module: one line saying which extra to install; else None."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return (f"this needs the '{extra}' extra, and {name} is not installed: "
            f"pip install 'torch_ext[{extra}]' (from a source tree: pip install --no-build-isolation '.[{extra}]')")
