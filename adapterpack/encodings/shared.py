"""``shared``: one member of an adapter bank, ΔW = U·Σ·Vᵀ with U, V shared by the bank (spec/shared.md).

Every adapter of a bank references the same ``U`` [out, R] and ``V`` [in, R] blobs for a module
and holds its own ``S``: an R×R matrix (``form: full``) or R values (``form: diagonal``). Reading
one adapter reads only the shared bases and its own ``S``.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import tensor_info
from adapterpack.encodings.base import Encoding, check_slots, layout_params, register_encoding, validate_unread
from adapterpack.errors import RankError, RecordError
from adapterpack.factors import Factors

if TYPE_CHECKING:
    from adapterpack.adapter import Module

FORMS = ("full", "diagonal")
LAYOUTS = ("linear", "embedding")
FLOATS = dtypes.FLOATS


def shared_base_shape(out: int, inp: int, layout: str, fan_in_fan_out: bool) -> tuple[int, int]:
    """The base weight's shape for U [out, R], V [in, R]: [out, in], or [in, out] when transposed."""
    return (inp, out) if layout == "embedding" or fan_in_fan_out else (out, inp)


@register_encoding
class Shared(Encoding):
    """ΔW = U·S·Vᵀ (full S) or U·diag(σ)·Vᵀ, transposed for embeddings and fan_in_fan_out."""

    encoding_id = "shared"
    slots: ClassVar[dict[str, bool]] = {"U": True, "V": True, "S": True}

    def validate(self, module: Module) -> None:
        where = f"module {module.name!r}"
        p = module.params
        check_slots(module, self.slots, "shared needs tensors U, V and S")
        rank = p.get("rank")
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise RankError(f"{where}: rank must be an integer >= 1, got {rank!r:.200}")
        form = p.get("form")
        if not isinstance(form, str) or form not in FORMS:
            raise RecordError(f"{where}: form must be one of {FORMS}, got {form!r:.200}")
        layout, fifo = layout_params(p, where, LAYOUTS)
        (udt, ush), (vdt, vsh), (sdt, ssh) = (tensor_info(module.tensors[s]) for s in ("U", "V", "S"))
        if udt not in FLOATS or not udt == vdt == sdt:
            raise RecordError(f"{where}: U, V and S must share one float dtype, got {udt}, {vdt}, {sdt}")
        if len(ush) != 2 or len(vsh) != 2:
            raise RecordError(f"{where}: U and V must be 2-D, got {list(ush)} and {list(vsh)}")
        want_s = (rank, rank) if form == "full" else (rank,)
        if ush[1] != rank or vsh[1] != rank or ssh != want_s:
            raise RankError(
                f"{where}: rank {rank} does not fit U {list(ush)}, V {list(vsh)}, S {list(ssh)} "
                f"(U and V need {rank} columns, a {form} S the shape {list(want_s)})"
            )
        base = tuple(module.base_shape)
        expect = shared_base_shape(ush[0], vsh[0], layout, bool(fifo))
        if base != expect:
            raise RecordError(f"{where}: base_shape {list(base)} disagrees with U {list(ush)}, V {list(vsh)} ({layout})")

    def to_factors(self, module: Module) -> Factors:
        """B = U·S (float64, so the product is exact to binary64 rounding), A = Vᵀ, scale 1."""
        validate_unread(self, module)
        u = module.array("U").astype(np.float64)
        v = module.array("V").astype(np.float64)
        s = module.array("S").astype(np.float64)
        b = u * s[None, :] if s.ndim == 1 else u @ s
        p = module.params
        layout = p.get("layout", "linear")
        return Factors(
            A=np.ascontiguousarray(v.T),
            B=b,
            scale=1.0,
            base_shape=tuple(module.base_shape),
            transpose=layout == "embedding" or bool(p.get("fan_in_fan_out", False)),
            layout=layout,
        )

    def summary(self, module: Module) -> dict[str, Any]:
        p = module.params
        return {"rank": p["rank"], "form": p["form"], "layout": p.get("layout", "linear"), "shared": ["U", "V"]}
