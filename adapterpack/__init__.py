"""adapterpack: store LoRA adapters compactly and safely, convert them, load them fast.

The numpy core imports without torch. Entry points:

- :func:`open` — any adapter (``.apack``, PEFT folder, kohya file) as a lazy :class:`Adapter`;
- :func:`save` — write adapters to an ``.apack`` file atomically;
- :mod:`adapterpack.interop` — PEFT and kohya import/export;
- :mod:`adapterpack.torch` — tensors on a device (needs the ``torch`` extra).

The names below are imported on first access (PEP 562), so ``import adapterpack`` — and with it
``adapterpack --help`` — costs no numpy; ``from adapterpack import open`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_LAZY = {
    "Adapter": "adapterpack.adapter",
    "Module": "adapterpack.adapter",
    "StoredTensor": "adapterpack.adapter",
    "open": "adapterpack.api",
    "save": "adapterpack.api",
    "AdapterpackError": "adapterpack.errors",
}

if TYPE_CHECKING:
    from adapterpack.adapter import Adapter, Module, StoredTensor
    from adapterpack.api import open, save
    from adapterpack.errors import AdapterpackError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["Adapter", "AdapterpackError", "Module", "StoredTensor", "__version__", "open", "save"]
