"""The spec's element types (spec/format.md §3): the one table of dtypes the package uses.

Each row gives the spec name, safetensors code, itemsize, kind, largest finite value, torch and
GGML names, and — built on first use — the numpy dtype. bfloat16 has no numpy builtin: its numpy
dtype is ``ml_dtypes.bfloat16`` (the JAX project's numpy extension type), whose import is slow, so
it is imported only when a bfloat16 array is materialized. Importing this module, opening a file
and reading its index never import it; :attr:`DType.bits` and :func:`bf16_from_float32` /
:func:`bf16_to_float32` handle bfloat16 as uint16 bit patterns without it (bit-exact with ml_dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from adapterpack.errors import ConversionError, UnknownDTypeError


@dataclass(frozen=True)
class DType:
    """One row of the spec's dtype table."""

    name: str
    #: The safetensors dtype code (``BF16``).
    safetensors: str
    #: Bytes per element.
    itemsize: int
    #: numpy's kind letter: ``f`` float, ``i`` signed, ``u`` unsigned, ``b`` bool.
    kind: str
    #: Largest finite value (floats only; None otherwise).
    max: float | None = None
    #: The ``torch`` attribute naming the same type (``torch.bfloat16``).
    torch: str = ""
    #: The GGML type name (``bf16``) for the float types GGUF stores, else None.
    gguf: str | None = None
    _numpy: str = field(default="", repr=False)

    @cached_property
    def numpy(self) -> np.dtype:
        """The little-endian numpy dtype (bfloat16: ``ml_dtypes.bfloat16``, imported here on first use)."""
        if self.name == "bfloat16":
            import ml_dtypes  # start-up: only a materialized bfloat16 array needs it

            return np.dtype(ml_dtypes.bfloat16).newbyteorder("<")
        return np.dtype(self._numpy).newbyteorder("<")

    @cached_property
    def bits(self) -> np.dtype:
        """A builtin little-endian numpy dtype of the same itemsize holding the raw bits (bfloat16: uint16);
        the dtype itself for every other row. Needs no extension type."""
        return np.dtype(np.uint16).newbyteorder("<") if self.name == "bfloat16" else self.numpy

    @property
    def is_float(self) -> bool:
        """True for the floating types (the ones byteplanes and dtype casts apply to)."""
        return self.kind == "f"


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float64", "F64", 8, "f", float(np.finfo(np.float64).max), "float64", None, "<f8"),
        DType("float32", "F32", 4, "f", float(np.finfo(np.float32).max), "float32", "f32", "<f4"),
        DType("float16", "F16", 2, "f", float(np.finfo(np.float16).max), "float16", "f16", "<f2"),
        DType("bfloat16", "BF16", 2, "f", float.fromhex("0x1.fep127"), "bfloat16", "bf16"),
        DType("int64", "I64", 8, "i", None, "int64", None, "<i8"),
        DType("int32", "I32", 4, "i", None, "int32", None, "<i4"),
        DType("int16", "I16", 2, "i", None, "int16", None, "<i2"),
        DType("int8", "I8", 1, "i", None, "int8", None, "|i1"),
        DType("uint8", "U8", 1, "u", None, "uint8", None, "|u1"),
        DType("bool", "BOOL", 1, "b", None, "bool", None, "|b1"),
    )
}

#: The floating types, widest first (the ones LoRA factors, casts and byteplanes use).
FLOATS: tuple[str, ...] = tuple(n for n, d in DTYPES.items() if d.is_float)

#: Builtin numpy dtypes (native byte order) → row; bfloat16 is matched by name in :func:`of_array`.
_BY_NUMPY = {np.dtype(d._numpy).newbyteorder("="): d for d in DTYPES.values() if d._numpy}
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES.values()}
_BY_GGUF = {d.gguf: d for d in DTYPES.values() if d.gguf}

#: Short aliases accepted on the command line.
ALIASES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
#: The float types a cast or an export writes, widest first (float64 is read, never written by one).
CAST_TARGETS: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: Their command-line names (``fp32``, ``fp16``, ``bf16``), in the same order.
CAST_CHOICES: tuple[str, ...] = tuple(next(a for a, n in ALIASES.items() if n == name) for name in CAST_TARGETS)


def by_name(name: str) -> DType:
    """The dtype called ``name`` in the spec (aliases such as ``bf16`` accepted)."""
    row = DTYPES.get(ALIASES.get(name, name))
    if row is None:
        raise UnknownDTypeError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return row


def of_array(arr: np.ndarray) -> DType:
    """The spec dtype of a numpy array; refuses types the format cannot hold."""
    dt = arr.dtype
    row = _BY_NUMPY.get(dt.newbyteorder("="))
    if row is None and dt.name == "bfloat16" and dt == DTYPES["bfloat16"].numpy.newbyteorder("="):
        row = DTYPES["bfloat16"]  # an ml_dtypes array exists, so ml_dtypes is already imported
    if row is None:
        raise UnknownDTypeError(f"numpy dtype {arr.dtype} has no .apack dtype")
    return row


def by_safetensors(code: str) -> DType:
    """The spec dtype for a safetensors dtype code such as ``BF16``."""
    row = _BY_SAFETENSORS.get(code)
    if row is None:
        raise UnknownDTypeError(f"safetensors dtype {code!r} has no .apack dtype")
    return row


def by_gguf(code: str) -> DType:
    """The spec dtype for a GGML float type name such as ``bf16``."""
    row = _BY_GGUF.get(code)
    if row is None:
        raise UnknownDTypeError(f"GGML type {code!r} has no .apack dtype (known: {', '.join(_BY_GGUF)})")
    return row


def as_bytes(arr: np.ndarray) -> memoryview:
    """The C-order bytes of ``arr`` as a flat memoryview (works for bfloat16, which has no buffer format)."""
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


# --- bfloat16 as bits, without ml_dtypes ----------------------------------------------------------------


def bf16_from_float32(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16 (nearest, ties to even; subnormals kept; ±inf kept; overflow to ±inf),
    as uint16 bit patterns. NaN becomes the quiet NaN 0x7FC0 with its sign. Bit-exact with
    ``x.astype(ml_dtypes.bfloat16)``; other float inputs are first cast to float32 (one more rounding for
    float64: use :func:`round_bf16` first)."""
    shape = np.shape(x)
    u = np.array(x, dtype=np.float32, ndmin=1, copy=None).view(np.uint32)  # ndmin: 0-d ops would give scalars
    r = u >> np.uint32(16)
    r &= np.uint32(1)  # the bit kept last: ties go to where it is 0
    r += np.uint32(0x7FFF)
    r += u  # wraps only for NaN patterns, which are replaced below
    r >>= np.uint32(16)
    out = r.astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0)
    return out.reshape(shape)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16 or int16) widened to float32 — exact, NaN payloads kept. Bit-exact with
    ``bits.view(ml_dtypes.bfloat16).astype(np.float32)``."""
    b = np.asarray(bits)
    if b.dtype.itemsize != 2 or b.dtype.kind not in "iu":
        raise ConversionError(f"bfloat16 bits must be 16-bit integers, not {b.dtype}")
    return (b.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


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
