"""What every fit checks first: finite factors, and a product ΔW = s·B·A its arithmetic can hold.

Fits and analyses of ΔW (bank bases, re-ranking spectra, nola coefficients, audits, importance)
compute in binary64 from the factors and square ΔW's size (energies, Gram matrices). One NaN or
infinity spreads through everything computed from it — in a bank, through the shared bases into
every other member — and a product past binary64's range turns into inf and NaN the same way. So
each fit refuses such input up front, naming adapter and module. Storing and bit-exact conversion
do not fit anything: they keep such values as they are (the spec stores values bit-exact).

The check reads each factor once (its sum of squares in binary64, which is finite exactly when
every value is finite and small enough) and never forms ΔW: ``|s|·‖B‖_F·‖A‖_F`` bounds ‖ΔW‖_F.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from adapterpack import dtypes
from adapterpack.errors import ConversionError

if TYPE_CHECKING:
    from adapterpack.adapter import Adapter

#: The largest bound on ‖ΔW‖_F a fit accepts: half of binary64's exponent range (fits square ΔW's
#: size) less 2^32 of headroom for the sums over ranks, dimensions and coefficients they form.
MAX_NORM = 2.0**480


def _sum_squares(x: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):  # a NaN widened (bf16's cast warns) or squares past binary64
        flat = np.asarray(x, dtype=np.float64).ravel()
        return float(flat @ flat)


def check_product(A: np.ndarray, B: np.ndarray, scale: float, *, where: str, dtype: str | None = None) -> None:
    """Refuse, with a :class:`~adapterpack.errors.ConversionError` naming ``where``, factors of
    ``ΔW = scale·B·A`` a fit cannot use: a NaN or infinity in ``A``, ``B`` or ``scale``, or a product
    whose bound ``|scale|·‖B‖_F·‖A‖_F`` exceeds :data:`MAX_NORM` or, when given, the largest value of
    ``dtype`` (the float dtype the fit stores values of ΔW's size in, e.g. a bank's Σᵢ)."""
    s = float(scale)
    if not math.isfinite(s):
        raise ConversionError(f"{where}: scale {s!r} is not finite")
    norms = []
    for slot, x in (("A", A), ("B", B)):
        sq = _sum_squares(x)
        if not math.isfinite(sq) and not np.all(np.isfinite(x)):
            raise ConversionError(f"{where}: {slot} holds non-finite values (NaN or inf)")
        norms.append(math.sqrt(sq))  # inf when the squares overflow binary64: refused below
    norm_a, norm_b = norms
    bound = 0.0 if 0.0 in (s, norm_a, norm_b) else abs(s) * norm_b * norm_a
    limit = MAX_NORM if dtype is None else min(MAX_NORM, dtypes.by_name(dtype).max or MAX_NORM)
    if bound > limit:
        what = "binary64 fits" if limit == MAX_NORM else dtypes.by_name(str(dtype)).name
        raise ConversionError(
            f"{where}: ΔW = scale·B·A is too large (scale {s:.6g} × ‖B‖_F {norm_b:.6g} × ‖A‖_F {norm_a:.6g} "
            f"exceeds {limit:.6g}, the limit for {what})"
        )


def check_adapter(adapter: Adapter, *, dtype: str | None = None) -> None:
    """:func:`check_product` on every module of ``adapter`` a fit reads (DoRA records are kept as
    they are by every fit, so they are not checked), naming adapter and module."""
    for m in adapter:
        if m.params.get("dora", False):
            continue
        f = m.factors()
        check_product(f.A, f.B, f.scale, where=f"adapter {adapter.name!r} module {m.name!r}", dtype=dtype)
