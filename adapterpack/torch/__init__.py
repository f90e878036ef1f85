"""Adapters as torch tensors: ``load`` LoRA factors onto a device, ``materialize`` ΔW.

This is the only place the library imports torch (install the ``torch`` extra). Any input
:func:`adapterpack.open` accepts works: ``.apack`` files, PEFT folders, kohya files.

Memory (what a returned tensor shares, and why that is safe):

- ``.apack``, raw blobs, CPU, no dtype change: views of a private copy-on-write mapping of
  the file (as ``safetensors.torch`` does): zero copies, pages are read when first used,
  and writing to a tensor gives the process its own page, never changing the file. As with
  any mmap, truncating the file while the tensors live crashes the process on access
  (SIGBUS); replacing it atomically (adapterpack's writers do) is safe.
- compressed blobs (zstd, byteplanes): decoded into a fresh buffer that the tensor owns.
- a device other than the CPU, or a dtype change: a new tensor on the device.
- an :class:`~adapterpack.Adapter` passed in: writable numpy arrays are adopted like
  ``torch.from_numpy`` (shared on the CPU), read-only ones are copied.
"""

from __future__ import annotations

import math
import os

import torch

from ..adapter import Adapter
from ..api import open as open_adapter
from ..interop.detect import detect_format
from .mapped import load_apack
from .tensors import TORCH_DTYPES, LoraTensors, module_tensors, tensor, torch_device, torch_dtype

__all__ = ["TORCH_DTYPES", "LoraTensors", "load", "materialize", "tensor", "torch_dtype"]


def load(
    path: str | os.PathLike[str] | Adapter,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    adapter: str | None = None,
    *,
    verify: bool = True,
) -> dict[str, LoraTensors]:
    """Every module of an adapter as :class:`LoraTensors` on ``device``, keyed by base-model module name.

    ``path`` is anything :func:`adapterpack.open` accepts, or an :class:`Adapter`;
    ``adapter`` names one adapter of a multi-adapter ``.apack``; ``dtype`` casts the factors
    (None keeps the stored dtype, bit-exact); ``verify`` checks each ``.apack`` blob's
    CRC-32C as it is read. Pass-through tensors (PEFT ``modules_to_save``) are not LoRA
    factors and are not returned: read them with ``adapterpack.open(path).tensors`` and
    :func:`tensor`.
    """
    dev = torch_device(device)
    want = None if dtype is None else torch_dtype(dtype)
    if isinstance(path, Adapter):
        return {name: module_tensors(m, dev, want) for name, m in path.modules.items()}
    if detect_format(path) == "apack":
        return load_apack(path, dev, want, adapter, verify)
    with open_adapter(path, adapter=adapter, verify=verify) as src:
        return {name: module_tensors(m, dev, want) for name, m in src.modules.items()}


def materialize(lora: LoraTensors) -> torch.Tensor:
    """Dense ΔW on the factors' device, in the base weight's shape and layout.

    Accumulates in float32 (float64 if a factor is float64), as the numpy ``Module.delta``
    does; the result has that dtype.
    """
    work = torch.float64 if torch.float64 in (lora.A.dtype, lora.B.dtype) else torch.float32
    # explicit sizes, as the numpy Factors: -1 is ambiguous when a dimension is 0 (out == 0, in == 0)
    a = lora.A.reshape(lora.A.shape[0], math.prod(lora.A.shape[1:])).to(work)
    b = lora.B.reshape(lora.B.shape[0], lora.B.shape[1]).to(work)  # [out, r, 1, ...] → [out, r]
    prod = (b @ a).mul_(lora.scale)
    if lora.transpose:
        prod = prod.T
    return prod.contiguous().reshape(lora.base_shape)
