"""``qsvd``: ΔW as singular triplets with each component's vectors quantized at its own width (spec/qsvd.md).

ΔW (2-D, before the layout maps it onto the base weight) ``= Σ_j S_j · û_j · v̂_jᵀ``, components in
descending order of the source's singular values. Component j's vectors û_j (``out`` values) and
v̂_j (``n`` values) are stored at width ``bits[j]``: 1–8 bits with one binary16 scale per group of
``group_size`` values (:mod:`adapterpack.linalg.quantize`), or :data:`FLOAT` (binary16 values).
The record is one uint8 tensor, ``data``: component after component, each its singular value, its
scales and its codes, so the rank-j truncation is a byte prefix (read and checked alone,
spec/format.md §8.1) and a component's bytes in the file are exactly :func:`component_nbytes`.

The writer (:func:`encode_qsvd`) quantizes U and V with per-group least-squared-error scales and by
default stores the unbiased S (each component keeps its weight along its source direction: lower KL
than a least-squares S, which shrinks components; measured); least-squares refits of V and S are
options. :func:`component_table` gives each component's exact bytes and estimated error at every
width for an allocator, :func:`relative_error` the exact error of a record without forming ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from adapterpack.adapter import Module, StoredTensor, TensorLike, tensor_info
from adapterpack.encodings.base import Encoding, check_slots, layout_params, register_encoding, validate_unread
from adapterpack.errors import ConversionError, RankError, RecordError
from adapterpack.factors import Factors
from adapterpack.limits import MAX_FACTOR_ELEMENTS
from adapterpack.linalg.quantize import CODE_BLOCK, dequantize_into, float16_vector, n_groups, quantize_rows, unpack_codes

#: Quantized widths the format allows (bits per value, plus one binary16 scale per group).
BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
#: The width meaning "stored as float": binary16 (IEEE half) values, no scales.
FLOAT: int = 16
#: Values per scale unless a writer says otherwise.
DEFAULT_GROUP_SIZE: int = 256
#: Largest group size a record may declare (a group larger than any vector is one scale per vector).
MAX_GROUP_SIZE: int = 1 << 30
#: How :func:`encode_qsvd` sets S after quantizing (see there).
S_FITS = ("ls", "unbiased", "source")
#: The writer's defaults (:func:`encode_qsvd`, :func:`component_table`).
DEFAULT_WRITER: dict[str, Any] = {"search": True, "refit": False, "s_fit": "unbiased"}
#: Bytes of one singular value (S is binary32) and of one scale (binary16).
S_BYTES, SCALE_BYTES = 4, 2

ENCODING_ID = "qsvd"


# --- sizes -------------------------------------------------------------------------------------------


def code_bytes(width: int, count: int) -> int:
    """Bytes of one vector of ``count`` values at ``width`` (its codes, byte-padded; FLOAT: 2 per value)."""
    return 2 * count if width == FLOAT else -(-count * width // 8)


def scale_count(width: int, count: int, group_size: int) -> int:
    """Scales of one vector of ``count`` values at ``width`` (none for FLOAT)."""
    return 0 if width == FLOAT else n_groups(count, group_size)


def component_nbytes(width: int, out: int, n: int, group_size: int) -> int:
    """Stored bytes of one component (its slice of the ``data`` stream): its singular value, scales and codes."""
    return (
        S_BYTES
        + SCALE_BYTES * (scale_count(width, out, group_size) + scale_count(width, n, group_size))
        + code_bytes(width, out)
        + code_bytes(width, n)
    )


def stream_bytes(bits: Sequence[int], out: int, n: int, group_size: int) -> int:
    """Bytes of the ``data`` stream of components ``bits`` of an ``[out, n]`` ΔW."""
    return sum(component_nbytes(b, out, n, group_size) for b in bits)


def component_spans(bits: Sequence[int], out: int, n: int, group_size: int) -> list[tuple[int, int, int, int, int, int]]:
    """Per component, offsets in ``data`` where its parts start: ``(S, û scales, v̂ scales, û codes, v̂ codes, end)``."""
    spans = []
    at = 0
    for w in bits:
        su = at + S_BYTES
        sv = su + SCALE_BYTES * scale_count(w, out, group_size)
        cu = sv + SCALE_BYTES * scale_count(w, n, group_size)
        cv = cu + code_bytes(w, out)
        end = cv + code_bytes(w, n)
        spans.append((at, su, sv, cu, cv, end))
        at = end
    return spans


def matrix_shape(layout: str, fan_in_fan_out: bool, base: tuple[int, ...], where: str) -> tuple[int, int]:
    """``(out, n)`` of the 2-D ΔW a record of ``layout`` maps onto ``base`` (spec/qsvd.md §1)."""
    if layout == "conv":
        if len(base) < 3:
            raise RecordError(f"{where}: a conv record needs a base_shape of >= 3 dimensions, got {list(base)}")
        return int(base[0]), int(math.prod(base[1:]))
    if len(base) != 2:
        raise RecordError(f"{where}: a {layout} record needs a 2-D base_shape, got {list(base)}")
    rows, cols = int(base[0]), int(base[1])
    return (cols, rows) if layout == "embedding" or fan_in_fan_out else (rows, cols)


# --- the allocator's table ---------------------------------------------------------------------------


@dataclass
class ComponentTable:
    """Per component (rows) and width (columns): exact stored bytes and estimated squared ΔW error."""

    bits: tuple[int, ...]
    nbytes: np.ndarray  # int64 [k, len(bits)]
    err: np.ndarray  # float64 [k, len(bits)]
    cut_err: np.ndarray  # float64 [k]
    fixed_nbytes: int


def _check_width(width: Any, where: str, error: type[Exception]) -> int:
    if isinstance(width, (bool, np.bool_)) or not isinstance(width, (int, np.integer)) or (width not in BITS and width != FLOAT):
        raise error(f"{where}: a component width must be one of {list(BITS)} or {FLOAT} (float), got {width!r:.80}")
    return int(width)


def _check_group_size(group_size: Any, where: str, error: type[Exception]) -> int:
    if (
        isinstance(group_size, (bool, np.bool_))
        or not isinstance(group_size, (int, np.integer))
        or not (1 <= group_size <= MAX_GROUP_SIZE)
    ):
        raise error(f"{where}: group_size must be an integer in [1, {MAX_GROUP_SIZE}], got {group_size!r:.80}")
    return int(group_size)


def _svd_inputs(u: Any, s: Any, vt: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = (np.asarray(x, dtype=np.float64) for x in (u, s, vt))
    if u.ndim != 2 or s.ndim != 1 or vt.ndim != 2 or not (u.shape[1] == s.size == vt.shape[0]):
        raise ConversionError(
            f"qsvd: u [out, k], s [k], vt [k, n] expected, got {list(u.shape)}, {list(s.shape)}, {list(vt.shape)}"
        )
    if not (np.all(np.isfinite(u)) and np.all(np.isfinite(s)) and np.all(np.isfinite(vt))):
        raise ConversionError("qsvd: singular values and vectors must be finite")
    return u, s, vt


def _cos2(dot: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((a > 0) & (b > 0), dot * dot / np.where((a > 0) & (b > 0), a * b, 1.0), 0.0)


def component_table(
    u: Any,
    s: Any,
    vt: Any,
    bits: Sequence[int] = (*BITS, FLOAT),
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    search: bool | None = None,
    s_fit: str | None = None,
) -> ComponentTable:
    """Bytes and estimated squared Frobenius error of every component of ``u·diag(s)·vt`` at every width in ``bits``.

    Component j's own error at width b, with ``c = cos²(u_j, û_j) · cos²(v_j, v̂_j)``, for the S that
    :func:`encode_qsvd` writes with the same ``search`` and ``s_fit`` (default: the writer's defaults):
    ``s_j²·(1 − c)`` for least squares, ``s_j²·(1/c − 1)`` for unbiased, ``s_j²·‖u_jv_jᵀ − û_jv̂_jᵀ‖²`` for
    the source's S; cross terms between components are ignored. ``nbytes`` is exact (each component's slice
    of ``data``); the record's container overhead (index entry, blob alignment) is not in it.
    """
    search = DEFAULT_WRITER["search"] if search is None else search
    s_fit = s_fit or DEFAULT_WRITER["s_fit"]
    u, s, vt = _svd_inputs(u, s, vt)
    widths = tuple(_check_width(b, "component_table", ConversionError) for b in bits)
    g = _check_group_size(group_size, "component_table", ConversionError)
    out, n, k = u.shape[0], vt.shape[1], s.size
    nbytes = np.array([[component_nbytes(b, out, n, g) for b in widths] for _ in range(k)], dtype=np.int64).reshape(k, len(widths))
    err = np.zeros((k, len(widths)))
    nu, nv = np.sum(u[:, :k] ** 2, axis=0), np.sum(vt[:k] ** 2, axis=1)
    for c, b in enumerate(widths):
        qu = _store_rows(u[:, :k].T, [b] * k, g, search)[2]
        qv = _store_rows(vt[:k], [b] * k, g, search)[2]
        du, dv = np.sum(u[:, :k].T * qu, axis=1), np.sum(vt[:k] * qv, axis=1)
        nqu, nqv = np.sum(qu * qu, axis=1), np.sum(qv * qv, axis=1)
        cos2 = _cos2(du, nu, nqu) * _cos2(dv, nv, nqv)
        if s_fit == "ls":
            own = 1.0 - cos2
        elif s_fit == "unbiased":
            own = 1.0 / np.maximum(cos2, 1e-12) - 1.0
        else:
            own = nu * nv - 2.0 * du * dv + nqu * nqv
        err[:, c] = s[:k] ** 2 * np.maximum(0.0, own)
    return ComponentTable(bits=widths, nbytes=nbytes, err=err, cut_err=s**2, fixed_nbytes=0)


# --- the writer --------------------------------------------------------------------------------------


def _store_rows(
    x: np.ndarray, widths: Sequence[int], group_size: int, search: bool
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Row j of ``x`` [k, N] at ``widths[j]``: (codes bytes per row, scales per row, decoded values [k, N] float64);
    rows of one width are quantized together."""
    k, count = x.shape
    codes: list[np.ndarray] = [np.zeros(0, np.uint8)] * k
    scales: list[np.ndarray] = [np.zeros(0, np.float16)] * k
    values = np.zeros((k, count))
    for w in sorted(set(widths)):
        rows = [j for j in range(k) if widths[j] == w]
        if w == FLOAT:
            h = float16_vector(x[rows])
            if not np.all(np.isfinite(h)):
                raise ConversionError("qsvd: a singular vector overflows binary16")
            values[rows] = h.astype(np.float64)
            for i, j in enumerate(rows):
                codes[j] = np.frombuffer(h[i].astype("<f2").tobytes(), dtype=np.uint8)
            continue
        q = quantize_rows(x[rows], w, group_size, search=search)
        values[rows] = q.values
        for i, j in enumerate(rows):
            codes[j], scales[j] = q.codes[i], q.scales[i]
    return codes, scales, values


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``gram⁻¹ · rhs`` for a symmetric positive semi-definite ``gram`` (least squares if singular)."""
    try:
        if np.linalg.cond(gram) < 1e12:
            return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        pass
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def encode_qsvd(
    u: Any,
    s: Any,
    vt: Any,
    bits: Sequence[int],
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    template: Module,
    search: bool | None = None,
    refit: bool | None = None,
    s_fit: str | None = None,
) -> Module:
    """A qsvd record of the first ``len(bits)`` components of ``ΔW = u·diag(s)·vt`` (all of u, s, vt is the target).

    ``template`` gives the name, base_shape and layout params. ``search`` picks each group's scale by
    minimum squared error (else round-to-nearest from the group max); ``refit`` refits V by least
    squares after U is quantized (else V is the source's). ``s_fit`` sets S once both are quantized:
    ``"ls"`` least squares (least Frobenius error), ``"unbiased"`` each component's projection on its
    source direction kept (``S_j = s_j / ((u_jᵀû_j)(v_jᵀv̂_j))``), ``"source"`` the source's S.
    Unset options take :data:`DEFAULT_WRITER`'s.
    """
    search = DEFAULT_WRITER["search"] if search is None else search
    refit = DEFAULT_WRITER["refit"] if refit is None else refit
    s_fit = s_fit or DEFAULT_WRITER["s_fit"]
    if s_fit not in S_FITS:
        raise ConversionError(f"qsvd: s_fit must be one of {S_FITS}, got {s_fit!r}")
    u, s, vt = _svd_inputs(u, s, vt)
    where = f"module {template.name!r}"
    widths = [_check_width(b, where, ConversionError) for b in bits]
    g = _check_group_size(group_size, where, ConversionError)
    k = len(widths)
    if k > s.size:
        raise ConversionError(f"{where}: {k} widths for {s.size} components")
    layout, fifo = layout_params(template.params, where)
    out, n = matrix_shape(layout, fifo, tuple(template.base_shape), where)
    if (u.shape[0], vt.shape[1]) != (out, n):
        raise ConversionError(
            f"{where}: vectors of a [{u.shape[0]}, {vt.shape[1]}] ΔW do not fit base_shape {list(template.base_shape)}"
        )
    if np.any(np.abs(u[:, :k]) > 1.0 + 1e-6) or np.any(np.abs(vt[:k]) > 1.0 + 1e-6):
        raise ConversionError(f"{where}: singular vectors must be unit vectors (|entries| <= 1)")
    uc, us, uv = _store_rows(u[:, :k].T, widths, g, search)
    uh = uv.T  # [out, k]
    if refit and k:
        # V absorbing U's error: argmin_M ‖u·diag(s)·vt − Û·Mᵀ‖ = vtᵀ·diag(s)·(uᵀÛ)·(ÛᵀÛ)⁻¹, k×k products only
        m = vt.T @ (s[:, None] * (u.T @ uh))
        m = _solve(uh.T @ uh, m.T).T  # [n, k]
        sig = np.linalg.norm(m, axis=0)
        v_src = np.where(sig > 0, m / np.where(sig > 0, sig, 1.0), vt[:k].T).T  # [k, n]
    else:
        sig, v_src = s[:k].copy(), vt[:k]
    vc, vs, vv = _store_rows(np.asarray(v_src).reshape(k, n), widths, g, search)
    vh = vv.T  # [n, k]
    if s_fit == "ls" and k:
        gram = (uh.T @ uh) * (vh.T @ vh)
        rhs = np.einsum("ji,ij->j", uh.T @ u, s[:, None] * (vt @ vh))
        sig = _solve(gram, rhs)
    elif s_fit == "unbiased" and k:
        # ⟨u_j v_jᵀ, S_j û_j v̂_jᵀ⟩ = s_j: the component keeps its own direction's weight (no least-squares shrinkage)
        proj = np.sum(u[:, :k] * uh, axis=0) * np.sum(vt[:k] * vh.T, axis=1)
        sig = np.where(np.abs(proj) > 1e-12, s[:k] / np.where(np.abs(proj) > 1e-12, proj, 1.0), 0.0)
    elif s_fit == "source" and refit and k:
        sig = s[:k].copy()
    sig = np.where(np.isfinite(sig), sig, 0.0)
    parts: list[np.ndarray] = []
    for j, b in enumerate(widths):
        vcj = vc[j]
        if sig[j] < 0:  # keep S >= 0: negate v̂_j exactly (code c -> 2^b − 1 − c; FLOAT: the sign bit)
            vcj = _negated(vcj, b, n)
            sig[j] = -sig[j]
        sj = np.asarray([sig[j]], dtype="<f4")
        if not np.all(np.isfinite(sj)):
            raise ConversionError(f"{where}: a refit singular value overflows binary32")
        parts += [_bytes(sj), _bytes(us[j].astype("<f2")), _bytes(vs[j].astype("<f2")), uc[j], vcj]
    params: dict[str, Any] = {"rank": k, "bits": widths, "group_size": g}
    if layout != "linear":
        params["layout"] = layout
    if fifo:
        params["fan_in_fan_out"] = True
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return Module(template.name, ENCODING_ID, tuple(template.base_shape), params, {"data": data})


def _bytes(x: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(x).tobytes(), dtype=np.uint8)


def _negated(codes: np.ndarray, width: int, count: int) -> np.ndarray:
    if width == FLOAT:
        h = codes.copy().view("<u2")
        return (h ^ np.uint16(0x8000)).view(np.uint8)
    from adapterpack.linalg.quantize import pack_codes

    return pack_codes(((1 << width) - 1) - unpack_codes(codes, width, count), width)


# --- the reader --------------------------------------------------------------------------------------


def relative_error(module: Module, u: Any, s: Any, vt: Any) -> float:
    """Exact ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` of ``module``'s 2-D ΔŴ against ``u·diag(s)·vt``, from k×k Gram products."""
    u, s, vt = _svd_inputs(u, s, vt)
    f = module.factors()
    a, b = (np.asarray(x, dtype=np.float64) for x in f.matrices())
    sc = float(f.scale)
    total = float(s @ s)
    cross = sc * float(np.sum(s * np.einsum("ij,ji->i", u.T @ b, a @ vt.T)))
    own = sc * sc * float(np.sum((b.T @ b) * (a @ a.T)))
    err2 = max(total - 2.0 * cross + own, 0.0)
    if total == 0.0:
        return 0.0 if own == 0.0 else math.inf
    return math.sqrt(err2 / total)


def check_values(module: Module, name: str, x: np.ndarray) -> None:
    """Refuse non-finite or negative singular values / scales (spec/qsvd.md §2)."""
    x = np.asarray(x)
    for i in range(0, x.size, CODE_BLOCK):  # in blocks: the check's temporaries stay small
        part = x[i : i + CODE_BLOCK]
        if not np.all(np.isfinite(part)) or np.any(part < 0):
            raise RecordError(f"module {module.name!r}: {name} must be finite and >= 0")


def _halves_into(module: Module, j: int, dst: np.ndarray, halves: np.ndarray, factor: np.float32) -> None:
    """``dst = float32(halves) · factor`` in blocks, refusing non-finite values (a FLOAT-width vector)."""
    for i in range(0, halves.size, CODE_BLOCK):
        x = halves[i : i + CODE_BLOCK].astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise RecordError(f"module {module.name!r}: component {j} holds non-finite float values")
        np.multiply(x, factor, out=dst[i : i + CODE_BLOCK])


@dataclass(frozen=True)
class RecordPlan:
    """A qsvd record's params, validated from the index alone: widths, group size, layout and ΔW shape."""

    bits: tuple[int, ...]
    group_size: int
    layout: str
    fan_in_fan_out: bool
    out: int
    n: int

    @property
    def rank(self) -> int:
        return len(self.bits)

    def nbytes(self, rank: int | None = None) -> int:
        """Bytes of ``data`` holding the first ``rank`` components (all by default)."""
        return stream_bytes(self.bits[: self.rank if rank is None else rank], self.out, self.n, self.group_size)

    def spans(self) -> list[tuple[int, int, int, int, int, int]]:
        """:func:`component_spans` of the record."""
        return component_spans(self.bits, self.out, self.n, self.group_size)

    def check_data(self, where: str, dtype: str, shape: Sequence[int]) -> None:
        """Refuse a ``data`` tensor that is not the uint8 stream the params need (spec/qsvd.md §1)."""
        want = self.nbytes()
        if dtype != "uint8" or list(shape) != [want]:
            raise RecordError(
                f"{where}: rank {self.rank}, bits and group_size {self.group_size} of a [{self.out}, {self.n}] ΔW need "
                f"data as uint8 [{want}]; got {dtype} {list(shape)}"
            )


def record_plan(module: Module) -> RecordPlan:
    """:class:`RecordPlan` of a qsvd record; RecordError / RankError for bad params."""
    where = f"module {module.name!r}"
    p = module.params
    rank = p.get("rank")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 0:
        raise RankError(f"{where}: rank must be an integer >= 0, got {rank!r:.200}")
    bits = p.get("bits")
    if not isinstance(bits, list) or len(bits) != rank:
        raise RecordError(f"{where}: bits must be a list of {rank} widths (one per component), got {bits!r:.200}")
    widths = tuple(_check_width(b, where, RecordError) for b in bits)
    g = _check_group_size(p.get("group_size"), where, RecordError)
    layout, fifo = layout_params(p, where)
    out, n = matrix_shape(layout, fifo, tuple(module.base_shape), where)
    if rank > min(out, n):
        raise RankError(f"{where}: rank {rank} exceeds min(out, in) = {min(out, n)}")
    if rank * (out + n) > MAX_FACTOR_ELEMENTS:
        raise RankError(f"{where}: rank {rank} factors of a [{out}, {n}] ΔW exceed {MAX_FACTOR_ELEMENTS} elements")
    return RecordPlan(widths, g, layout, fifo, out, n)


def _prefix(t: TensorLike, rows: int) -> TensorLike:
    return t.prefix(rows) if isinstance(t, StoredTensor) else t[:rows]


@register_encoding
class Qsvd(Encoding):
    """ΔW = Σ_j S_j·û_j·v̂_jᵀ with û_j, v̂_j at width bits[j]; any rank j ≤ k is a prefix of each tensor."""

    encoding_id = ENCODING_ID
    slots: ClassVar[dict[str, bool]] = {"data": True}
    prefix_slots: ClassVar[tuple[str, ...]] = ("data",)

    def validate(self, module: Module) -> None:
        check_slots(module, self.slots, "qsvd needs one tensor, data")
        plan = record_plan(module)
        plan.check_data(f"module {module.name!r}", *tensor_info(module.tensors["data"]))

    def to_factors(self, module: Module) -> Factors:
        """B[:, j] = û_j·√S_j, A[j] = √S_j·v̂_j in float32, scale 1 (√S_j computed in binary64, rounded to binary32)."""
        validate_unread(self, module)
        plan = record_plan(module)
        out, n, g = plan.out, plan.n, plan.group_size
        data = np.asarray(module.array("data"))
        a = np.zeros((plan.rank, n), np.float32)
        b = np.zeros((out, plan.rank), np.float32)
        for j, (w, (s0, su, sv, cu, cv, end)) in enumerate(zip(plan.bits, plan.spans(), strict=True)):
            s = np.frombuffer(data[s0:su].tobytes(), dtype="<f4")
            check_values(module, f"component {j}: singular value", s)
            scales = data[su:cu].view("<f2")
            check_values(module, f"component {j}: scales", scales)
            root = np.float32(np.sqrt(np.float64(s[0])))
            # decoded block by block straight into the factors: temporaries bounded whatever the vector's length
            for dst, (c0, c1), (g0, g1) in ((b[:, j], (cu, cv), (su, sv)), (a[j], (cv, end), (sv, cu))):
                if w == FLOAT:
                    _halves_into(module, j, dst, data[c0:c1].view("<f2"), root)
                else:
                    sc = scales[(g0 - su) // SCALE_BYTES : (g1 - su) // SCALE_BYTES]
                    dequantize_into(dst, data[c0:c1], sc, w, g, root)
        transpose = plan.layout == "embedding" or plan.fan_in_fan_out
        return Factors(A=a, B=b, scale=1.0, base_shape=tuple(module.base_shape), transpose=transpose, layout=plan.layout)

    def summary(self, module: Module) -> dict[str, Any]:
        p = module.params
        return {
            "rank": p["rank"],
            "scale": 1.0,
            "layout": p.get("layout", "linear"),
            "bits": list(p.get("bits", [])),
            "group_size": p.get("group_size"),
        }

    def truncate(self, module: Module, rank: int) -> Module:
        """The record cut to its first ``min(rank, k)`` components (a prefix view of data; nothing read)."""
        self.validate(module)
        plan = record_plan(module)
        j = max(0, min(int(rank), plan.rank))
        bits = list(plan.bits[:j])
        tensors = {"data": _prefix(module.tensors["data"], plan.nbytes(j))}
        return Module(
            module.name,
            self.encoding_id,
            tuple(module.base_shape),
            {**module.params, "rank": j, "bits": bits},
            tensors,
            module.must_understand,
        )


def from_factors(name: str, factors: Factors, bits: Sequence[int], group_size: int = DEFAULT_GROUP_SIZE, **kw: Any) -> Module:
    """A qsvd record of ``factors``' ΔW (exact SVD from the factors, then :func:`encode_qsvd` of the first ``len(bits)``)."""
    from adapterpack.linalg.lowrank import spectrum_of

    spec = spectrum_of(factors, where=f"module {name!r}")
    u, vt = spec.vectors()
    template = Module(name, ENCODING_ID, tuple(factors.base_shape), factors.record_params, {})
    return encode_qsvd(u, spec.S, vt, bits, group_size, template=template, **kw)
