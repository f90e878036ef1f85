"""adapterpack: store LoRA adapters compactly and safely, convert them, load them fast.

The numpy core imports without torch. Entry points:

- :func:`open` — any adapter (``.apack``, PEFT folder, kohya file) as a lazy :class:`Adapter`;
- :func:`save` — write adapters to an ``.apack`` file atomically;
- :mod:`adapterpack.formats` — PEFT and kohya import/export;
- :mod:`adapterpack.torch` — tensors on a device (needs the ``torch`` extra).
"""

from __future__ import annotations

from adapterpack import moved
from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.errors import AdapterpackError
from adapterpack.ops.files import open, save
from adapterpack.version import __version__

moved.install()

__all__ = ["Adapter", "AdapterpackError", "Module", "StoredTensor", "__version__", "open", "save"]
