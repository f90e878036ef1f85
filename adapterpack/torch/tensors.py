"""numpy → torch conversion (bit-exact, bfloat16 included), devices and dtypes, and ΔW of torch :class:`Factors`.

The factors of a torch load are :class:`~adapterpack.factors.Factors` holding torch tensors,
the type the numpy encodings use; ``LoraTensors`` is its deprecated old name.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from adapterpack import dtypes
from adapterpack.adapter import TensorLike, as_array
from adapterpack.errors import ConversionError, SizeLimitError
from adapterpack.factors import Factors
from adapterpack.limits import MAX_DELTA_ELEMENTS

#: spec dtype name → torch dtype (from the one dtype table, :data:`adapterpack.dtypes.DTYPES`).
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, d.torch) for name, d in dtypes.DTYPES.items()}
FLOATS = tuple(TORCH_DTYPES[name] for name in dtypes.FLOATS)


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a torch dtype or a spec name/alias (``"bf16"``, ``"float32"``)."""
    if isinstance(dtype, str):
        try:
            dtype = TORCH_DTYPES[dtypes.by_name(dtype).name]
        except Exception:
            raise ConversionError(f"unknown dtype {dtype!r} (use e.g. torch.bfloat16, 'bf16', 'float32')") from None
    if dtype not in FLOATS:
        raise ConversionError(f"LoRA factors can only be loaded as a floating dtype (float64/32/16, bfloat16), not {dtype}")
    return dtype


def torch_device(device: torch.device | str | int) -> torch.device:
    """``torch.device(device)``, with a bad name, or a CUDA device this process cannot use, reported as an adapterpack error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConversionError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise ConversionError(f"device {str(dev)!r} is not available here ({n} CUDA device(s))")
    return dev


def place(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move ``t`` to ``device`` (copying in its stored dtype), then cast there if asked."""
    if device.type != "cpu":
        t = t.to(device)
    if dtype is not None and dtype != t.dtype:
        t = t.to(dtype)
    return t


def tensor(arr: TensorLike, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """A numpy array or stored tensor as a torch tensor on ``device``, optionally cast to ``dtype``.

    Bit-exact for every spec dtype (bfloat16 passes through int16: torch.from_numpy does
    not know ml_dtypes' bfloat16). Writable arrays are adopted without a copy on the CPU
    (like ``torch.from_numpy``); read-only arrays are copied, never aliased.
    """
    dev = torch_device(device)
    want = None if dtype is None else torch_dtype(dtype)
    a = as_array(arr)
    dt = dtypes.of_array(a)
    a = np.require(a, dtype=dt.numpy, requirements="C")  # keeps 0-d arrays 0-d (ascontiguousarray makes them [1])
    bits = a.view(np.int16) if dt.name == "bfloat16" else a
    if a.flags.writeable:
        t = torch.from_numpy(bits)
    else:
        t = torch.empty(a.shape, dtype=torch.int16 if dt.name == "bfloat16" else TORCH_DTYPES[dt.name])
        np.copyto(t.numpy(), bits, casting="no")
    if dt.name == "bfloat16":
        t = t.view(torch.bfloat16)
    return place(t, dev, want)


def as_2d(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[r, in, *k]`` → ``[r, in·k]`` and B ``[out, r, 1, ...]`` → ``[out, r]`` as views (explicit sizes:
    -1 is ambiguous when a dimension is 0); 2-D factors are returned as they are."""
    if a.dim() != 2:
        a = a.reshape(a.shape[0], math.prod(a.shape[1:]))
    if b.dim() != 2:
        b = b.reshape(b.shape[0], b.shape[1])
    return a, b


def check_factors(lora: Factors, where: str) -> tuple[int, int]:
    """(m, n) of ``lora``'s 2-D product, refused (ConversionError) unless A ``[r, n]``, B ``[m, r]`` (stored shapes too),
    ``m·n`` elements fill ``base_shape`` and a DoRA magnitude has m values: torch's reshape or matmul error otherwise."""
    a, b = lora.A, lora.B
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 2 or b.dim() < 2:
        raise ConversionError(f"{where}: A and B must be torch tensors of at least 2 dimensions")
    r, n, m = int(a.shape[0]), math.prod(int(d) for d in a.shape[1:]), int(b.shape[0])
    if int(b.shape[1]) != r or math.prod(int(d) for d in b.shape[2:]) != 1:
        raise ConversionError(f"{where}: B {list(b.shape)} does not fit A {list(a.shape)} (B must be [out, r, 1, ...])")
    if m * n != math.prod(int(d) for d in lora.base_shape):
        raise ConversionError(f"{where}: B·A is {m}x{n}, which does not fill base_shape {list(lora.base_shape)}")
    mag = lora.magnitude
    if mag is not None and (not isinstance(mag, torch.Tensor) or tuple(mag.shape) != (m,)):
        raise ConversionError(f"{where}: DoRA magnitude must hold B's {m} rows, got {list(getattr(mag, 'shape', []))}")
    return m, n


def stored_shapes(f: Factors) -> Factors:
    """``f`` with a conv record's factors in their stored shapes (``A [r, in, *k]``, ``B [out, r, 1, ...]``, views),
    as :func:`adapterpack.torch.load` returns them; other layouts as they are."""
    if f.layout != "conv" or len(f.base_shape) <= 2:
        return f
    a, b = f.A, f.B
    a = a.reshape(a.shape[0], *f.base_shape[1:])
    b = b.reshape(b.shape[0], b.shape[1], *([1] * (len(f.base_shape) - 2)))
    return Factors(a, b, f.scale, f.base_shape, f.transpose, f.layout, f.magnitude)


def materialize(lora: Factors, *, dtype: torch.dtype | str | None = None, chunk: int | None = None) -> torch.Tensor:
    """Dense ΔW of torch :class:`Factors` on their device, in the base weight's shape and layout.

    Accumulates in float32 (float64 if a factor is float64), as the numpy ``Module.delta``
    does; the result has that dtype, or ``dtype`` (cast from the float32 product). ``chunk``
    computes ``chunk`` output rows of the m×n product at a time, so the float32 temporary
    stays at chunk×n elements when the result is narrower (e.g. a bf16 ΔW of a large layer).
    For DoRA this is the direction update ``s·B·A`` only (see :meth:`adapterpack.adapter.Module.delta`).
    A ΔW of more than :data:`~adapterpack.limits.MAX_DELTA_ELEMENTS` elements is refused (SizeLimitError), as
    ``Module.delta`` refuses it, before anything is allocated.
    """
    m, n = check_factors(lora, "materialize")
    if m * n > MAX_DELTA_ELEMENTS:
        raise SizeLimitError(
            f"a dense ΔW of shape {list(lora.base_shape)} holds {m * n} elements, over the limit of {MAX_DELTA_ELEMENTS}"
        )
    if chunk is not None and chunk < 1:
        raise ConversionError(f"chunk must be a positive number of rows, got {chunk}")
    work = torch.float64 if torch.float64 in (lora.A.dtype, lora.B.dtype) else torch.float32
    out_dtype = work if dtype is None else torch_dtype(dtype)
    a, b = as_2d(lora.A, lora.B)
    a, b = a.to(work), b.to(work)
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


def _deprecated_lora_tensors(f: Factors) -> Factors:
    """Deprecated: :func:`stored_shapes`."""
    return stored_shapes(f)


_DEPRECATED: dict[str, tuple[Any, str]] = {
    "LoraTensors": (Factors, "adapterpack.encodings.Factors"),
    "lora_tensors": (_deprecated_lora_tensors, "adapterpack.torch.tensors.stored_shapes"),
}


def __getattr__(name: str) -> Any:
    """Old names, kept for one minor version: ``LoraTensors`` is :class:`Factors`."""
    if name in _DEPRECATED:
        value, new = _DEPRECATED[name]
        warnings.warn(f"adapterpack.torch.tensors.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
