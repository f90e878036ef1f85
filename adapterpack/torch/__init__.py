"""Adapters as torch tensors: ``load`` LoRA factors onto a device, ``materialize`` ΔW, ``apply`` / ``unapply`` to a model.

This is the only place the library imports torch (install the ``torch`` extra). Any input
:func:`adapterpack.open` accepts works: ``.apack`` files, PEFT folders, kohya files.

Memory (what a returned tensor shares, and why that is safe):

- ``.apack``, raw blobs, CPU, no dtype change: views of a private copy-on-write mapping of
  the file (as ``safetensors.torch`` does): zero copies, pages are read when first used,
  and writing to a tensor gives the process its own page, never changing the file. As with
  any mmap, truncating the file while the tensors live crashes the process on access
  (SIGBUS); replacing it atomically (adapterpack's writers do) is safe.
- compressed blobs (zstd, byteplanes): decoded into a fresh buffer that the tensor owns.
- a device other than the CPU (or ``zero_copy=False``): all raw blobs of one load in ONE buffer on
  the device, filled through two reused pinned host buffers (a few large copies, not one per
  tensor; :mod:`adapterpack.torch.staging`); tensors are views of it. A dtype change: cast there.
- an :class:`~adapterpack.Adapter` passed in: writable numpy arrays are adopted like
  ``torch.from_numpy`` (shared on the CPU), read-only ones are copied.
"""

from __future__ import annotations

import inspect
import os

import torch

from adapterpack.adapter import Adapter
from adapterpack.errors import ConversionError
from adapterpack.formats.detect import detect_format
from adapterpack.ops.files import open as open_adapter
from adapterpack.torch.apply import Applied, apply, unapply
from adapterpack.torch.decoders import TorchFactors, decode_all
from adapterpack.torch.decoders.base import as_2d
from adapterpack.torch.mapped import load_apack
from adapterpack.torch.tensors import TORCH_DTYPES, LoraTensors, lora_tensors, tensor, torch_device, torch_dtype

__all__ = [
    "TORCH_DTYPES",
    "Applied",
    "LoraTensors",
    "TorchFactors",
    "apply",
    "load",
    "materialize",
    "tensor",
    "torch_dtype",
    "unapply",
]


def load(
    path: str | os.PathLike[str] | Adapter,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    adapter: str | None = None,
    *,
    rank: int | None = None,
    verify: bool = True,
    zero_copy: bool = True,
) -> dict[str, LoraTensors]:
    """Every module of an adapter as :class:`LoraTensors` on ``device``, keyed by base-model module name.

    ``path`` is anything :func:`adapterpack.open` accepts, or an :class:`Adapter`;
    ``adapter`` names one adapter of a multi-adapter ``.apack``; ``dtype`` casts the factors
    (None keeps the stored dtype, bit-exact); ``rank`` truncates progressive encodings
    (passed to ``adapterpack.open(path, rank=...)``); ``verify`` checks each ``.apack`` blob's
    CRC-32C as it is read; ``zero_copy=False`` copies raw blobs into memory the tensors own
    instead of mapping the file (CPU only; other devices always copy). Every record goes
    through its encoding's torch decoder (:mod:`adapterpack.torch.decoders`). Pass-through
    tensors (PEFT ``modules_to_save``) are not LoRA factors and are not returned: read them with
    ``adapterpack.open(path).tensors`` and :func:`tensor`.
    """
    dev = torch_device(device)
    want = None if dtype is None else torch_dtype(dtype)
    if isinstance(path, Adapter):
        if rank is not None:
            raise ConversionError("rank= applies when opening a file; truncate an in-memory Adapter before loading it")
        return {name: lora_tensors(f) for name, f in decode_all(path.modules.values(), dev, want).items()}
    if rank is None and detect_format(path) == "apack":
        return load_apack(path, dev, want, adapter, verify, zero_copy=zero_copy)
    with _open(path, adapter, verify, rank) as src:
        return {name: lora_tensors(f) for name, f in decode_all(src.modules.values(), dev, want).items()}


def _open(path: str | os.PathLike[str], adapter: str | None, verify: bool, rank: int | None) -> Adapter:
    """``adapterpack.open``, passing ``rank`` on only when asked (and refusing it when ``open`` cannot truncate)."""
    if rank is None:
        return open_adapter(path, adapter=adapter, verify=verify)
    if "rank" not in inspect.signature(open_adapter).parameters:
        raise ConversionError("rank= needs adapterpack.open(path, rank=...) (the svd encoding), which this version lacks")
    return open_adapter(path, adapter=adapter, verify=verify, rank=rank)


def materialize(
    lora: LoraTensors | TorchFactors, *, dtype: torch.dtype | str | None = None, chunk: int | None = None
) -> torch.Tensor:
    """Dense ΔW on the factors' device, in the base weight's shape and layout.

    Accumulates in float32 (float64 if a factor is float64), as the numpy ``Module.delta``
    does; the result has that dtype, or ``dtype`` (cast from the float32 product). ``chunk``
    computes ``chunk`` output rows of the m×n product at a time, so the float32 temporary
    stays at chunk×n elements when the result is narrower (e.g. a bf16 ΔW of a large layer).
    For DoRA this is the direction update ``s·B·A`` only (see :meth:`adapterpack.adapter.Module.delta`).
    """
    work = torch.float64 if torch.float64 in (lora.A.dtype, lora.B.dtype) else torch.float32
    out_dtype = work if dtype is None else torch_dtype(dtype)
    a, b = as_2d(lora.A, lora.B)
    a, b = a.to(work), b.to(work)
    m, n = int(b.shape[0]), int(a.shape[1])
    if chunk is not None and chunk < 1:
        raise ConversionError(f"chunk must be a positive number of rows, got {chunk}")
    if chunk is None or chunk >= m:
        prod = (b @ a).mul_(lora.scale).to(out_dtype)
        if lora.transpose:
            prod = prod.T
        return prod.contiguous().reshape(lora.base_shape)
    out = torch.empty((n, m) if lora.transpose else (m, n), dtype=out_dtype, device=a.device)
    for i in range(0, m, chunk):
        blk = (b[i : i + chunk] @ a).mul_(lora.scale)
        if lora.transpose:
            out[:, i : i + chunk] = blk.T
        else:
            out[i : i + chunk] = blk
    return out.reshape(lora.base_shape)
