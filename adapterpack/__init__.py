"""adapterpack: store LoRA adapters compactly and safely, convert them, load them fast.

The numpy core imports without torch. Entry points:

- :func:`open` — any adapter (``.apack``, PEFT folder, kohya file) as a lazy :class:`Adapter`;
- :func:`save` — write adapters to an ``.apack`` file atomically;
- :mod:`adapterpack.interop` — PEFT and kohya import/export;
- :mod:`adapterpack.torch` — tensors on a device (needs the ``torch`` extra).
"""

from __future__ import annotations

__version__ = "0.1.0"

from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.api import open, save
from adapterpack.errors import AdapterpackError

__all__ = ["Adapter", "AdapterpackError", "Module", "StoredTensor", "__version__", "open", "save"]
