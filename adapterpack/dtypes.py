"""The spec's element types (spec/format.md §3): name ↔ numpy dtype ↔ safetensors name.

bfloat16 has no numpy builtin; ``ml_dtypes`` (the JAX project's numpy extension types)
gives a real numpy dtype, so bf16 tensors round-trip bit-exact and convert with correct
round-to-nearest-even instead of hand-written bit twiddling.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from adapterpack.errors import ConversionError, UnknownDTypeError


@dataclass(frozen=True)
class DType:
    """One row of the spec's dtype table."""

    name: str
    numpy: np.dtype
    safetensors: str

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        """True for the floating types (the ones byteplanes and dtype casts apply to)."""
        return self.name in ("float64", "float32", "float16", "bfloat16")


def _row(name: str, np_dtype: object, st: str) -> DType:
    return DType(name, np.dtype(np_dtype).newbyteorder("<"), st)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _row("float64", np.float64, "F64"),
        _row("float32", np.float32, "F32"),
        _row("float16", np.float16, "F16"),
        _row("bfloat16", ml_dtypes.bfloat16, "BF16"),
        _row("int64", np.int64, "I64"),
        _row("int32", np.int32, "I32"),
        _row("int16", np.int16, "I16"),
        _row("int8", np.int8, "I8"),
        _row("uint8", np.uint8, "U8"),
        _row("bool", np.bool_, "BOOL"),
    )
}

_BY_NUMPY = {d.numpy.newbyteorder("="): d for d in DTYPES.values()}
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES.values()}

#: Short aliases accepted on the command line.
ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}


def by_name(name: str) -> DType:
    """The dtype called ``name`` in the spec (aliases such as ``bf16`` accepted)."""
    row = DTYPES.get(ALIASES.get(name, name))
    if row is None:
        raise UnknownDTypeError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return row


def of_array(arr: np.ndarray) -> DType:
    """The spec dtype of a numpy array; refuses types the format cannot hold."""
    row = _BY_NUMPY.get(arr.dtype.newbyteorder("="))
    if row is None:
        raise UnknownDTypeError(f"numpy dtype {arr.dtype} has no .apack dtype")
    return row


def by_safetensors(code: str) -> DType:
    """The spec dtype for a safetensors dtype code such as ``BF16``."""
    row = _BY_SAFETENSORS.get(code)
    if row is None:
        raise UnknownDTypeError(f"safetensors dtype {code!r} has no .apack dtype")
    return row


def as_bytes(arr: np.ndarray) -> memoryview:
    """The C-order bytes of ``arr`` as a flat memoryview (works for bfloat16, which has no buffer format)."""
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float64 ``x`` rounded to the nearest bfloat16 value (ties to even; 8 significant bits, subnormals
    below 2⁻¹²⁶), still as float64, so the cast to bfloat16 that follows is exact."""
    _, e = np.frexp(x)  # x = f·2^e, 0.5 ≤ |f| < 1
    quantum = np.ldexp(1.0, np.maximum(e, -125) - 8)
    with np.errstate(invalid="ignore"):  # inf / nan pass through unchanged
        return np.where(np.isfinite(x), np.round(x / quantum) * quantum, x)


def cast_array(arr: np.ndarray, dtype: str, where: str = "tensor") -> tuple[np.ndarray, float]:
    """(``arr`` cast to ``dtype``, max |x − x'| over finite values); non-float arrays come back untouched.

    Refuses a cast that turns finite values into infinities (e.g. float32 above 65504 to float16).
    """
    src = of_array(arr)
    dst = by_name(dtype)
    if not src.is_float or not dst.is_float or src.name == dst.name:
        return arr, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        # ml_dtypes casts float64 to bfloat16 through float32 (two roundings): round once, exactly, first
        exact = round_bf16(arr) if src.name == "float64" and dst.name == "bfloat16" else arr
        out = exact.astype(dst.numpy)
        wide_in, wide_out = arr.astype(np.float64), out.astype(np.float64)
        finite = np.isfinite(wide_in)
        overflow = finite & ~np.isfinite(wide_out)
        if overflow.any():
            big = float(np.max(np.abs(wide_in[overflow])))
            raise ConversionError(f"{where}: casting to {dst.name} overflows (|value| {big:.6g} is out of range)")
        err = float(np.max(np.abs(wide_in[finite] - wide_out[finite]), initial=0.0))
    return out, err
