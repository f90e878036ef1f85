"""Adapters as torch tensors: ``load`` factors onto a device, ``materialize`` ΔW, ``apply`` / ``unapply`` to a model.

This is the only place the library imports torch (install the ``torch`` extra). Any input
:func:`adapterpack.open` accepts works: ``.apack`` files, PEFT folders, kohya files.

Memory (what a returned tensor shares, and why that is safe):

- ``.apack``, raw blobs, CPU, no dtype change: views of the reader's private copy-on-write mapping
  of the file, which is opened once (as ``safetensors.torch`` does): zero copies, pages are read when first used,
  and writing to a tensor gives the process its own page, never changing the file. As with
  any mmap, truncating the file while the tensors live crashes the process on access
  (SIGBUS); replacing it atomically (adapterpack's writers do) is safe.
- compressed blobs (zstd, byteplanes, pco): decoded into a fresh buffer that the tensor owns.
- a device other than the CPU (or ``zero_copy=False``): all raw blobs of one load in ONE buffer on
  the device, filled through two reused pinned host buffers (a few large copies, not one per
  tensor; :mod:`adapterpack.torch.staging`); tensors are views of it. A dtype change: cast there.
- an :class:`~adapterpack.Adapter` passed in: slots it reads from an ``.apack`` file are staged as
  above, copied into one buffer (its reader maps the file read-only); writable numpy arrays are
  adopted like ``torch.from_numpy`` (shared on the CPU), read-only ones are copied.

Factors come back as :class:`~adapterpack.factors.Factors`, the type the numpy encodings
use, holding torch tensors (``LoraTensors`` and ``TorchFactors`` are its deprecated old names).
"""

from __future__ import annotations

import warnings
from typing import Any

from adapterpack.factors import Factors
from adapterpack.torch.apply import Applied, apply, unapply
from adapterpack.torch.mapped import load
from adapterpack.torch.tensors import TORCH_DTYPES, materialize, tensor, torch_device, torch_dtype

__all__ = [
    "TORCH_DTYPES",
    "Applied",
    "Factors",
    "apply",
    "load",
    "materialize",
    "tensor",
    "torch_device",
    "torch_dtype",
    "unapply",
]

#: Old names of :class:`Factors` (the one factors type, numpy or torch), kept for one minor version.
_DEPRECATED = {"LoraTensors": Factors, "TorchFactors": Factors}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        warnings.warn(f"adapterpack.torch.{name} is deprecated; use adapterpack.torch.Factors", DeprecationWarning, stacklevel=2)
        return _DEPRECATED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
