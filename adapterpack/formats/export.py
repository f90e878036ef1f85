"""What the PEFT and kohya writers share: which records they can export, the output dtype, one
state dict that casts float tensors and refuses key collisions, and the rule for pass-through tensors;
with the llama.cpp and vLLM writers: an alpha read as float32, and scales baked into B, both refused
where the reader would see inf (or "no alpha") instead of the value.

Names: every exporter holds module and tensor names to the rule ``.apack`` holds them to
(:mod:`adapterpack.names`: 1–1,024 code points, no lone surrogate), and writes no key holding a
control character (no model's parameter is named so, and a NUL ends the key for C readers).
"""

from __future__ import annotations

import math
import unicodedata

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, TensorLike
from adapterpack.encodings import get_encoding
from adapterpack.encodings.lower import as_lora
from adapterpack.errors import ConversionError
from adapterpack.formats.source import source_format
from adapterpack.names import check_name

#: How an error message tells the user to leave pass-through tensors out (CLI flag and API argument).
DROP_HINT = "pass --drop-tensors (drop_tensors=True) to leave them out"


def check_module_names(adapter: Adapter) -> None:
    """Refuse a module name no output may hold (:mod:`adapterpack.names`), before any tensor is read."""
    for m in adapter:
        check_name(m.name, "module", ConversionError)


def check_key(key: str, what: str) -> str:
    """``key`` (or the module name in it) unless no exporter may write it: a control character names no
    model's parameter, and a NUL ends the key for C readers. ``what`` says what ``key`` is, for the error."""
    if not key.isprintable() and any(unicodedata.category(c) == "Cc" for c in key):
        raise ConversionError(f"{what} {key!r:.120} holds a control character; no model has such a parameter")
    return key


def lora_records(adapter: Adapter, target: str) -> list[Module]:
    """Every module as a valid lora record (other encodings lowered exactly through their factors,
    :func:`~adapterpack.encodings.lower.as_lora`); refuses an adapter with none, or with a name no output may hold."""
    check_module_names(adapter)
    modules = [as_lora(m) for m in adapter]
    if not modules:
        raise ConversionError(f"adapter {adapter.name!r} has no modules to export; a {target} adapter needs at least one")
    for m in modules:
        get_encoding("lora").validate(m)
    return modules


def target_dtype(dtype: str | None) -> str | None:
    """The spec name of the dtype float tensors are cast to (None: keep), refusing non-float dtypes."""
    if dtype is None:
        return None
    row = dtypes.by_name(dtype)
    if not row.is_float:
        raise ConversionError(f"cannot store LoRA factors as {row.name}; pick a float dtype")
    return row.name


def float32_alpha(value: float, where: str, reader: str) -> float:
    """``value`` as ``reader`` sees it: kohya's loaders and llama.cpp read alpha as float32. Refuses a value
    that is not finite, beyond float32's range (read as inf) or nonzero but rounding to 0 (both read alpha 0
    as "no alpha": kohya takes alpha = rank, llama.cpp scale 1)."""
    with np.errstate(over="ignore", under="ignore"):
        read = float(np.float32(value))
    if not math.isfinite(read) or (read == 0 and value != 0):
        raise ConversionError(f"{where}: alpha {value:.6g} does not fit float32, the type alpha has in {reader}")
    return read


def scaled(arr: np.ndarray, factor: float, where: str) -> np.ndarray:
    """``arr · factor`` in binary64 (for a caller to round once to its output dtype), refusing finite values
    the product turns into infinities or NaN (a scale baked into B that binary64 cannot hold)."""
    wide = np.asarray(arr, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = wide * factor
    grew = np.isfinite(wide) & ~np.isfinite(out)
    if grew.any():
        big = float(np.max(np.abs(wide[grew])))
        raise ConversionError(f"{where}: scaling B by {factor:.6g} overflows (|value| {big:.6g} becomes {out[grew][0]})")
    return out


def contiguous(arr: np.ndarray) -> np.ndarray:
    """``arr`` in C order, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


class StateDict:
    """Tensors to write by key: float tensors cast to one dtype, a second tensor under a key refused."""

    def __init__(self, dtype: str | None, target: str) -> None:
        self.dtype = target_dtype(dtype)
        self.target = target
        self.tensors: dict[str, np.ndarray] = {}

    def cast(self, arr: np.ndarray, where: str) -> np.ndarray:
        """``arr`` in the output dtype when it is a float tensor (refusing overflow), else unchanged."""
        return arr if self.dtype is None else dtypes.cast_array(arr, self.dtype, where)[0]

    def put(self, key: str, arr: np.ndarray, *, cast: bool = True) -> None:
        """Add ``arr`` under ``key`` (cast unless ``cast`` is false)."""
        check_key(key, f"the {self.target} key")
        if key in self.tensors:
            raise ConversionError(f"two tensors would be written under the {self.target} key {key!r} (module names collide)")
        self.tensors[key] = contiguous(self.cast(arr, f"tensor {key!r}") if cast else arr)


def pass_through(adapter: Adapter, *, own: tuple[str | None, ...], drop_tensors: bool, target: str) -> dict[str, TensorLike]:
    """The pass-through tensors an export writes: all of them when the adapter came from one of the
    ``own`` formats (its own keys), none with ``drop_tensors``, else a refusal naming the flag."""
    fmt = source_format(adapter)
    if not adapter.tensors or fmt in own:
        for key in adapter.tensors:
            check_name(key, "tensor", ConversionError)
        return dict(adapter.tensors)
    if drop_tensors:
        return {}
    some = ", ".join(list(adapter.tensors)[:3]) + (", ..." if len(adapter.tensors) > 3 else "")
    origin = f" from a {fmt} file" if fmt else ""
    raise ConversionError(
        f"adapter holds {len(adapter.tensors)} tensors that are not LoRA factors{origin} ({some}); "
        f"{target} would not understand them ({DROP_HINT})"
    )
