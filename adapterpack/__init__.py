"""adapterpack: store LoRA adapters compactly and safely, convert them, load them fast.

The numpy core imports without torch. Entry points:

- :func:`open` — any adapter (``.apack``, PEFT folder, kohya file) as a lazy :class:`Adapter`;
- :func:`save` — write adapters to an ``.apack`` file atomically;
- :mod:`adapterpack.formats` — PEFT and kohya import/export;
- :mod:`adapterpack.torch` — tensors on a device (needs the ``torch`` extra).

The names below are imported on first access (PEP 562), so ``import adapterpack`` — and with it
``adapterpack --help`` — costs no numpy; ``from adapterpack import open`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from adapterpack import moved
from adapterpack.version import __version__

#: Public name → the module that defines it.
_LAZY = {
    "Adapter": "adapterpack.adapter",
    "Module": "adapterpack.adapter",
    "StoredTensor": "adapterpack.adapter",
    "open": "adapterpack.ops.files",
    "save": "adapterpack.ops.files",
    "AdapterpackError": "adapterpack.errors",
}

if TYPE_CHECKING:
    from adapterpack.adapter import Adapter, Module, StoredTensor
    from adapterpack.errors import AdapterpackError
    from adapterpack.ops.files import open, save


#: Subpackages reachable as attributes of a bare ``import adapterpack`` (imported on first use, not at start-up).
_SUBPACKAGES = frozenset({"bank", "cli", "codecs", "container", "encodings", "formats", "linalg", "ops", "rng", "torch"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        if name in _SUBPACKAGES:  # adapterpack.ops.convert... after a bare `import adapterpack`, imported on first use
            return importlib.import_module(f"adapterpack.{name}")
        raise AttributeError(f"module 'adapterpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


moved.install()  # 0.1 import paths keep working for one minor version

__all__ = ["Adapter", "AdapterpackError", "Module", "StoredTensor", "__version__", "open", "save"]
