"""numpy → torch conversion (bit-exact, bfloat16 included) and the per-module container :class:`LoraTensors`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from adapterpack import dtypes
from adapterpack.adapter import TensorLike, as_array
from adapterpack.errors import ConversionError

if TYPE_CHECKING:
    from adapterpack.torch.decoders.base import TorchFactors

#: spec dtype name → torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LoraTensors:
    """One module's low-rank update on a device: ``ΔW = scale · B · A`` mapped onto ``base_shape``.

    ``A`` and ``B`` keep their stored shapes (``A [r, in, *k]``, ``B [out, r, 1, ...]``; for
    embeddings ``A [r, num_embeddings]``, ``B [dim, r]``). ``layout`` is ``linear``,
    ``embedding`` or ``conv``; ``transpose`` is true when the base weight holds the product
    transposed (embeddings, GPT-2 style ``fan_in_fan_out``). ``magnitude`` is DoRA's
    magnitude vector, else None.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    base_shape: tuple[int, ...]
    layout: str = "linear"
    transpose: bool = False
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """Inner dimension r."""
        return int(self.A.shape[0])


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


def lora_tensors(f: TorchFactors) -> LoraTensors:
    """:class:`LoraTensors` from a decoder's :class:`TorchFactors`: conv factors back in their stored
    shapes (``A [r, in, *k]``, ``B [out, r, 1, ...]``, views), everything else as decoded."""
    a, b = f.A, f.B
    if f.layout == "conv" and len(f.base_shape) > 2:
        a = a.reshape(a.shape[0], *f.base_shape[1:])
        b = b.reshape(b.shape[0], b.shape[1], *([1] * (len(f.base_shape) - 2)))
    return LoraTensors(
        A=a, B=b, scale=f.scale, base_shape=f.base_shape, layout=f.layout, transpose=f.transpose, magnitude=f.magnitude
    )
