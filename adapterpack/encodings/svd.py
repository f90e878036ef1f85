"""``svd``: ΔW as singular values and vectors, truncatable to any rank by byte prefixes (spec/svd.md).

ΔW (2-D, before the layout maps it onto the base weight) ``= Utᵀ · diag(S) · Vt`` with S descending,
so the rank-j truncation — the best rank-j approximation (Eckart–Young) — is the first j entries
of S and the first j rows of Ut and Vt: a reader opening a file at rank j reads only those rows of raw
Ut and Vt blobs, up to the next prefix CRC checkpoint (spec/format.md §8.1).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Module, StoredTensor, TensorLike, tensor_info
from adapterpack.encodings.base import Encoding, check_slots, layout_params, register_encoding, validate_unread
from adapterpack.encodings.lora import FLOATS
from adapterpack.errors import ConversionError, RankError, RecordError
from adapterpack.factors import Factors

if TYPE_CHECKING:
    from adapterpack.linalg.lowrank import Spectrum


def svd_base_shape(layout: str, fan_in_fan_out: bool, out: int, n: int, base: tuple[int, ...]) -> bool:
    """Whether ``base`` is the base weight shape of a 2-D ``[out, n]`` ΔW under ``layout``."""
    if layout == "linear":
        return base == ((n, out) if fan_in_fan_out else (out, n))
    if layout == "embedding":
        return base == (n, out)
    return len(base) >= 3 and base[0] == out and math.prod(base[1:]) == n


def singular_values(module: Module) -> np.ndarray:
    """S of an svd record as float64, refused unless finite, >= 0 and descending (spec/svd.md §2)."""
    s64 = np.asarray(module.array("S")).astype(np.float64)
    if np.any(~np.isfinite(s64)) or np.any(s64 < 0) or np.any(np.diff(s64) > 0):
        raise RecordError(f"module {module.name!r}: singular values S must be finite, >= 0 and descending")
    return s64


def s_dtype_for(dtype: str) -> str:
    """The dtype writers store S in next to vectors of ``dtype``: float64 with float64, else float32."""
    return "float64" if dtypes.by_name(dtype).name == "float64" else "float32"


def _prefix(t: TensorLike, rows: int) -> TensorLike:
    return t.prefix(rows) if isinstance(t, StoredTensor) else t[:rows]


@register_encoding
class Svd(Encoding):
    """ΔW = Utᵀ·diag(S)·Vt, singular values descending; any rank j ≤ k is a prefix of each tensor."""

    encoding_id = "svd"
    slots: ClassVar[dict[str, bool]] = {"S": True, "Ut": True, "Vt": True}
    #: Ut and Vt carry prefix CRCs; S (k numbers, at most about two rows of Ut's bytes) is read whole on a prefix read.
    prefix_slots: ClassVar[tuple[str, ...]] = ("Ut", "Vt")

    def validate(self, module: Module) -> None:
        where = f"module {module.name!r}"
        p = module.params
        check_slots(module, self.slots, "svd needs tensors S, Ut and Vt")
        rank = p.get("rank")
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 0:
            raise RankError(f"{where}: rank must be an integer >= 0, got {rank!r:.200}")
        layout, fifo = layout_params(p, where)
        (sdt, ssh), (udt, ush), (vdt, vsh) = (tensor_info(module.tensors[s]) for s in ("S", "Ut", "Vt"))
        if sdt not in FLOATS or udt not in FLOATS or udt != vdt:
            raise RecordError(f"{where}: S, Ut and Vt must be floats, Ut and Vt of one dtype; got {sdt}, {udt}, {vdt}")
        if len(ssh) != 1 or len(ush) != 2 or len(vsh) != 2:
            raise RecordError(f"{where}: S must be 1-D, Ut and Vt 2-D; got {list(ssh)}, {list(ush)}, {list(vsh)}")
        if not ssh[0] == ush[0] == vsh[0] == rank:
            raise RankError(
                f"{where}: rank {rank} must equal S's length and Ut's and Vt's rows; got {list(ssh)}, {list(ush)}, {list(vsh)}"
            )
        if rank > min(ush[1], vsh[1]):
            raise RankError(f"{where}: rank {rank} exceeds min(out, in) = {min(ush[1], vsh[1])}")
        if not svd_base_shape(layout, fifo, ush[1], vsh[1], tuple(module.base_shape)):
            raise RecordError(
                f"{where}: base_shape {list(module.base_shape)} disagrees with Ut {list(ush)}, Vt {list(vsh)} ({layout})"
            )

    def to_factors(self, module: Module) -> Factors:
        """B = Utᵀ·√S, A = √S·Vt, scale 1 (float32; float64 when the vectors are float64).

        Splitting √S evenly keeps both factors of the same magnitude, which keeps them well
        within fp16/bf16 range when they are exported.
        """
        validate_unread(self, module)
        s64 = singular_values(module)
        ut = np.asarray(module.array("Ut"))
        vt = np.asarray(module.array("Vt"))
        work = np.float64 if ut.dtype == np.float64 else np.float32
        root = np.sqrt(s64).astype(work)
        p = module.params
        layout = p.get("layout", "linear")
        return Factors(
            A=root[:, None] * vt.astype(work),
            B=ut.astype(work).T * root[None, :],
            scale=1.0,
            base_shape=tuple(module.base_shape),
            transpose=layout == "embedding" or bool(p.get("fan_in_fan_out", False)),
            layout=layout,
        )

    def summary(self, module: Module) -> dict[str, Any]:
        p = module.params
        return {"rank": p["rank"], "scale": 1.0, "layout": p.get("layout", "linear")}

    def truncate(self, module: Module, rank: int) -> Module:
        """The record cut to its first ``min(rank, k)`` singular triplets (prefix views; nothing read)."""
        j = max(0, min(int(rank), int(module.params["rank"])))
        tensors = {s: _prefix(module.tensors[s], j) for s in self.slots}
        return Module(
            module.name, self.encoding_id, tuple(module.base_shape), {**module.params, "rank": j}, tensors, module.must_understand
        )


def from_spectrum(
    name: str, spectrum: Spectrum, factors: Factors, *, rank: int | None = None, dtype: str = "float32", s_dtype: str | None = None
) -> Module:
    """An svd record of the first ``rank`` triplets of ``spectrum`` (the SVD of ``factors``' 2-D ΔW).

    Ut and Vt are cast to ``dtype``, S to ``s_dtype`` (default float32 — k numbers, negligible
    bytes — or float64 with float64 vectors).
    Exactly-zero singular values are dropped (a zero module is rank 0).
    """
    k = int(np.count_nonzero(spectrum.S > 0))
    if rank is not None:
        if int(rank) < 0:
            raise ConversionError(f"module {name!r}: rank must be >= 0, got {rank}")
        k = min(k, int(rank))
    row = dtypes.by_name(dtype)
    if not row.is_float:
        raise ConversionError(f"module {name!r}: svd vectors must be a float dtype, not {row.name}")
    s_dtype = s_dtype or s_dtype_for(row.name)
    np_dt, s_dt = row.numpy, dtypes.by_name(s_dtype).numpy
    u, vt = spectrum.vectors(k)
    params: dict[str, Any] = {"rank": k, **factors.record_params}
    return Module(
        name,
        "svd",
        tuple(factors.base_shape),
        params,
        {
            "S": np.ascontiguousarray(spectrum.S[:k]).astype(s_dt),
            "Ut": np.ascontiguousarray(u.T).astype(np_dt),
            "Vt": np.ascontiguousarray(vt).astype(np_dt),
        },
    )
