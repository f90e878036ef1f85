"""Rank and bits chosen together under one whole-file byte budget: ``adapterpack compress``.

Every module's exact SVD comes from its factors (:func:`adapterpack.ops.rerank.spectrum_with_factors`;
nothing out×in is formed). The ``qsvd`` encoding's component table gives, per singular component and
bit width, its exact stored bytes and the squared error quantizing it adds (a cut costs σ²). Each
module's choices are the lower convex hull of (bytes, distortion) over rank × bits per component
(:mod:`adapterpack.linalg.bitalloc`); the exact multiple-choice knapsack
(:func:`adapterpack.linalg.allocate.choice_dp`) picks one per module, and :func:`adapterpack.ops.budget.fit_to_file`
shrinks the allocation until the whole file (index and padding included) fits the budget.

Objectives (``weighting``):

- data-free (default ``balanced``): a module's distortion is its squared error ``E = Σ_cut σ² + Σ_kept err``;
  the budget minimises ``Σ E^0.75`` (= ``Σ‖ΔW − ΔŴ‖_F^1.5``, rerank's balanced, now with quantization noise)
  with every module at or above ¾ of the bytes one uniform level of bytes per (out + in) affords it
  (the rank floor of rerank's balanced, in bytes); ``absolute`` minimises ``Σ E``.
- measured (``importance``, an ``adapterpack importance`` file): a module's distortion is the
  second-order KL ``½·σ_cutᵀ F σ_cut`` of its cut (cross terms included) plus ``½·F_ll·err_l`` for
  each kept component quantized (zero-mean noise uncorrelated across components: the cross terms of
  F vanish in expectation, and noise on component l is weighed by that component's own curvature).

Library entry point: :func:`compress` (an in-memory adapter in, the compressed adapter and its
report out); :func:`compress_file` reads and writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from adapterpack import progress
from adapterpack.adapter import Adapter, Module, decoded_bytes
from adapterpack.errors import ConversionError
from adapterpack.formats.source import base_init_problem
from adapterpack.linalg import allocate
from adapterpack.linalg.bitalloc import Choices, module_choices
from adapterpack.ops.budget import apack_file_size, fit_to_file
from adapterpack.ops.importance import Importance
from adapterpack.ops.report import footprint
from adapterpack.ops.rerank import spectrum_with_factors

WEIGHTINGS = ("balanced", "absolute")
#: ``balanced``: exponent of the error norm minimised (E is a squared norm: E^0.75 = ‖·‖^1.5) and the floor's fraction.
BALANCED_POWER = allocate.BALANCED_EXPONENT / 2
BALANCED_FLOOR = allocate.BALANCED_FLOOR


def _qsvd() -> ModuleType:
    """The qsvd encoding module (BITS, FLOAT, component_table, encode_qsvd, relative_error)."""
    from adapterpack.encodings import qsvd

    return qsvd


@dataclass
class ModuleResult:
    """One module: its rank and bits per kept component, bytes of its record, exact relative ΔW error."""

    name: str
    selected: bool
    old_rank: int
    rank: int
    bits: list[int]
    nbytes: int
    energy: float  # ‖ΔW‖²_F
    rel_error: float  # exact ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F
    distortion: float  # what the allocation minimised for this module (squared error or second-order KL)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "selected": self.selected,
            "old_rank": self.old_rank,
            "rank": self.rank,
            "bits": list(self.bits),
            "bytes": self.nbytes,
            "energy": self.energy,
            "rel_error": self.rel_error,
            "distortion": self.distortion,
            "notes": list(self.notes),
        }


@dataclass
class CompressReport:
    """Per-module results and totals of one compression."""

    budget: int
    fp16_bytes: int
    file_bytes: int
    weighting: str
    objective: str  # "data-free" or "importance"
    bits: tuple[int, ...]
    group_size: int
    codec: str
    rounds: int
    allocation_budget: int
    modules: list[ModuleResult]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> dict[str, Any]:
        """Bytes (file, budget, fp16 factors), ratio to fp16, relative error of all ΔW stacked, worst module."""
        sel = [m for m in self.modules if m.selected]
        energy = sum(m.energy for m in sel)
        err2 = sum(m.energy * m.rel_error**2 for m in sel)
        return {
            "modules": len(self.modules),
            "compressed": len(sel),
            "budget": self.budget,
            "file_bytes": self.file_bytes,
            "fp16_bytes": self.fp16_bytes,
            "ratio_fp16": self.fp16_bytes / self.file_bytes if self.file_bytes else None,
            "record_bytes": sum(m.nbytes for m in self.modules),
            "rel_error": math.sqrt(err2 / energy) if energy else 0.0,
            "max_rel_error": max((m.rel_error for m in sel), default=0.0),
            "mean_bits": _mean_bits(sel),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (COMMON vocabulary: ``modules`` with ``name``, ``total``, ``notes``)."""
        return {
            "budget": self.budget,
            "weighting": self.weighting,
            "objective": self.objective,
            "bits": list(self.bits),
            "group_size": self.group_size,
            "codec": self.codec,
            "rounds": self.rounds,
            "allocation_budget": self.allocation_budget,
            "total": self.total,
            "modules": [m.as_dict() for m in self.modules],
            "notes": list(self.notes),
        }


def _mean_bits(mods: list[ModuleResult]) -> float | None:
    b = [x for m in mods for x in m.bits]
    return float(np.mean(b)) if b else None


@dataclass
class _Work:
    module: Module
    u: np.ndarray  # [out, k]
    s: np.ndarray  # [k]
    vt: np.ndarray  # [k, in]
    width: int  # out + in
    fp16: int
    table: Any  # qsvd.ComponentTable
    choices: Choices
    old_rank: int


def fp16_factor_bytes(adapter: Adapter, names: list[str] | None = None) -> int:
    """2 bytes per parameter of the modules' factors (``names``; default all): what their fp16 PEFT
    file holds without its header, the reference of ``budget_ratio``."""
    total = 0
    for m in adapter:
        if names is None or m.name in names:
            f = m.factors()
            total += 2 * (int(f.A.size) + int(f.B.size))
    return total


def _is_real(x: object) -> bool:
    """A finite real number (int, float or a numpy scalar of one; not a bool, not a string)."""
    ok = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
    return ok and (isinstance(x, (int, np.integer)) or math.isfinite(x))  # type: ignore[arg-type]


def _whole_bytes(budget: object) -> int:
    """A budget as whole bytes (a finite float is floored); anything else a ConversionError, not a numpy TypeError."""
    if not _is_real(budget) or budget < 0:  # type: ignore[operator]
        raise ConversionError(f"budget must be a finite number of bytes >= 0, got {budget!r}")
    return int(budget)  # type: ignore[call-overload]


def _integer(x: object, what: str) -> int:
    """An int option (a numpy integer too); a float or a string is refused, not truncated."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ConversionError(f"{what} must be an integer, got {x!r}")
    return int(x)


def _check_bits(q: ModuleType, bits: tuple[int, ...] | None) -> tuple[int, ...]:
    allowed = (*tuple(q.BITS), q.FLOAT)
    if bits is None:
        return allowed
    bits = tuple(sorted(set(_integer(b, "bits") for b in bits)))
    bad = [b for b in bits if b not in allowed]
    if not bits or bad:
        allowed_text = ", ".join(map(str, allowed))
        raise ConversionError(f"bits must be a non-empty subset of {allowed_text} ({q.FLOAT}: float); got {list(bits)}")
    return bits


def _distortion(name: str, s: np.ndarray, table: Any, importance: Importance | None) -> tuple[np.ndarray, np.ndarray]:
    """(weighted err [k, C], cut [k + 1]) of one module under the objective."""
    k = s.size
    err = np.asarray(table.err, dtype=np.float64)
    cut_err = np.asarray(table.cut_err, dtype=np.float64)
    if importance is None:
        cut = np.append(np.cumsum(cut_err[::-1])[::-1], 0.0) if k else np.zeros(1)
        return err, cut
    cut = importance.cut_costs(name, s)  # refuses another adapter's importance
    f = importance.fisher[name]
    diag = (f if f.ndim == 1 else np.diagonal(f))[:k]
    return 0.5 * diag[:, None] * err, cut


def _level_picks(works: list[_Work], level: float) -> list[int]:
    out = []
    for w in works:
        i = int(np.searchsorted(w.choices.nbytes, level * w.width, side="right")) - 1
        out.append(max(i, 0))
    return out


def _balanced_floors(works: list[_Work], budget: int) -> list[int]:
    """Per module, the index of its floor choice: the largest within ¾ of the bytes the uniform level affords it.

    The uniform level λ is the largest number of bytes per (out + in) such that every module at its
    largest choice within λ·(out + in) bytes fits the budget (bisection); the floors cost no more than
    that, so they fit too."""

    def cost(level: float) -> int:
        return sum(int(w.choices.nbytes[i]) for w, i in zip(works, _level_picks(works, level)))

    lo, hi = 0.0, max(float(w.choices.nbytes[-1]) / max(w.width, 1) for w in works) + 1.0
    if cost(hi) <= budget:
        lo = hi
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            if cost(mid) <= budget:
                lo = mid
            else:
                hi = mid
    return _level_picks(works, BALANCED_FLOOR * lo)


def _solve(works: list[_Work], budget: int, weighting: str, method: str) -> list[int]:
    costs = [w.choices.nbytes for w in works]
    if weighting == "balanced":
        floors = _balanced_floors(works, budget)
        values = [-np.power(np.maximum(w.choices.dist, 0.0), BALANCED_POWER) for w in works]
    else:
        floors = [0] * len(works)
        values = [-w.choices.dist for w in works]
    costs = [c[f:] for c, f in zip(costs, floors)]
    values = [v[f:] for v, f in zip(values, floors)]
    solve = allocate.choice_dp if method == "dp" else allocate.choice_greedy
    picks = solve(costs, values, budget)
    return [p + f for p, f in zip(picks, floors)]


def compress(
    adapter: Adapter,
    budget: int | None = None,
    *,
    budget_ratio: float | None = None,
    importance: Importance | None = None,
    bits: tuple[int, ...] | list[int] | None = None,
    group_size: int | None = None,
    weighting: str | None = None,
    method: str = "dp",
    min_rank: int = 1,
    max_rank: int | None = None,
    modules: str | None = None,
    codec: str = "raw",
    cache: dict[Any, Any] | None = None,
) -> tuple[Adapter, CompressReport]:
    """``adapter`` as qsvd records whose whole .apack file (written with ``codec``) fits ``budget`` bytes.

    Give ``budget`` (bytes of the whole file) or ``budget_ratio`` (of :func:`fp16_factor_bytes` of the
    compressed modules). ``bits``: the widths offered (default: every qsvd width and float);
    ``importance``: the measured objective (weighting ``absolute`` unless ``balanced`` is asked for);
    ``modules``: a regular expression (``re.search``), others (and DoRA modules) are kept as they are,
    inside the budget. ``cache``: a dict kept between calls (e.g. one adapter at several budgets): component
    tables and encoded records are reused for modules with the same singular values, widths and group size.
    Returns the new adapter and a :class:`CompressReport` with the exact relative ΔW error of every module.
    """
    q = _qsvd()
    if (budget is None) == (budget_ratio is None):
        raise ConversionError("give exactly one of budget (bytes of the whole file) and budget_ratio (of the fp16 factors)")
    if budget is not None:
        budget = _whole_bytes(budget)
    if budget_ratio is not None and not (_is_real(budget_ratio) and 0 < budget_ratio <= 1):
        raise ConversionError(f"budget_ratio must be a number in (0, 1], got {budget_ratio!r}")
    weighting = weighting or ("absolute" if importance is not None else "balanced")
    if weighting not in WEIGHTINGS:
        raise ConversionError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if method not in ("dp", "greedy"):
        raise ConversionError(f"method must be dp or greedy, got {method!r}")
    min_rank = _integer(min_rank, "min_rank")
    max_rank = None if max_rank is None else _integer(max_rank, "max_rank")
    if min_rank < 0 or (max_rank is not None and max_rank < min_rank):
        raise ConversionError(f"need 0 <= min_rank <= max_rank, got {min_rank} and {max_rank}")
    widths = _check_bits(q, tuple(bits) if bits is not None else None)
    group = _integer(q.DEFAULT_GROUP_SIZE if group_size is None else group_size, "group_size")
    if group < 1:
        raise ConversionError(f"group_size must be >= 1, got {group}")
    try:
        pattern = re.compile(modules) if modules else None
    except re.error as e:
        raise ConversionError(f"modules: {modules!r} is not a regular expression ({e})") from None

    if (why := base_init_problem(adapter)) is not None:  # as merge and the exporters refuse it
        raise ConversionError(f"{why}; compressing would quantize scale·B·A, which is not its ΔW")

    notes: list[str] = []
    works: dict[str, _Work] = {}
    for m in progress.track(list(adapter), "compress: quantizing components", unit="modules"):
        if pattern is not None and pattern.search(m.name) is None:
            continue
        if m.params.get("dora", False):
            notes.append(f"{m.name}: DoRA (its magnitude needs the base weight): kept as is")
            continue
        where = f"adapter {adapter.name!r} module {m.name!r}"
        sp, f = spectrum_with_factors(m, where=where, dtype="float32")
        k = int(np.count_nonzero(sp.S > 0))
        u, vt = sp.vectors(k)
        s = np.asarray(sp.S[:k], dtype=np.float64)
        key = (m.name, hashlib.sha256(s.tobytes()).hexdigest(), sp.shape, widths, group)
        table = cache.get(("table", *key)) if cache is not None else None
        if table is None:
            table = q.component_table(u, s, vt, widths, group)
            if cache is not None:
                cache[("table", *key)] = table
        err, cut = _distortion(m.name, s, table, importance)
        choices = module_choices(table.nbytes, err, cut, fixed=int(table.fixed_nbytes), min_rank=min_rank, max_rank=max_rank)
        works[m.name] = _Work(
            m, u, s, vt, sp.shape[0] + sp.shape[1], 2 * (int(f.A.size) + int(f.B.size)), table, choices,
            int(m.summary().get("rank", 0)),
        )  # fmt: skip
    if not works:
        dora = sum(1 for m in adapter if m.params.get("dora", False) and (pattern is None or pattern.search(m.name)))
        why = f": {dora} DoRA module(s) are kept as they are (the magnitude needs the base weight)" if dora else ""
        raise ConversionError("no module to compress" + (f" matches {modules!r}" if pattern else "") + why)
    fp16 = sum(w.fp16 for w in works.values())
    if budget is None:
        budget = int(fp16 * float(budget_ratio))  # type: ignore[arg-type]
        notes.append(f"budget {budget:,} B = {budget_ratio} × {fp16:,} B, the compressed modules' factors in fp16")

    order = list(works)
    wl = [works[n] for n in order]
    records: dict[Any, Module] = cache if cache is not None else {}

    def record(w: _Work, cols: tuple[int, ...]) -> Module:
        key = ("record", w.module.name, hashlib.sha256(w.s.tobytes()).hexdigest(), tuple(w.module.base_shape),
               json.dumps(w.module.params, sort_keys=True, default=str), group, tuple(widths[c] for c in cols))  # fmt: skip
        if key not in records:
            records[key] = q.encode_qsvd(w.u, w.s, w.vt, [widths[c] for c in cols], group, template=w.module)
        return records[key]

    largest = sum(int(w.choices.nbytes[-1]) for w in wl)

    def plan(b: int) -> tuple[list[int], Adapter]:
        picks = _solve(wl, min(b, largest), weighting, method)  # more than every largest choice buys nothing more
        mods = dict(adapter.modules)
        for w, i in zip(wl, picks):
            mods[w.module.name] = record(w, w.choices.columns[i])
        return picks, adapter.derived(mods)

    smallest = sum(int(w.choices.nbytes[0]) for w in wl)

    def spent(p: tuple[list[int], Adapter]) -> int:
        return sum(int(w.choices.nbytes[i]) for w, i in zip(wl, p[0]))

    try:
        fitted = fit_to_file(plan, lambda p: apack_file_size([p[1]], codec), budget, floor=smallest, cost=spent)
    except ConversionError as e:
        kept = sum(m.decoded_bytes for m in adapter if m.name not in works) + sum(map(decoded_bytes, adapter.tensors.values()))
        if not kept:
            raise
        raise ConversionError(
            f"{e}; {kept:,} B of tensors (decoded, before the codec) are kept as they are (pass-through tensors such as "
            "modules_to_save, and modules not compressed)"
        ) from None
    picks, out = fitted.plan

    results: list[ModuleResult] = []
    for m in adapter:
        w = works.get(m.name)
        if w is None:
            results.append(ModuleResult(m.name, False, int(m.summary().get("rank", 0)), int(m.summary().get("rank", 0)), [],
                                        m.decoded_bytes, 0.0, 0.0, 0.0))  # fmt: skip
            continue
        i = picks[order.index(m.name)]
        cols = w.choices.columns[i]
        rec = out.modules[m.name]
        energy = float(np.sum(w.s**2))
        rel = float(q.relative_error(rec, w.u, w.s, w.vt)) if energy > 0 else 0.0
        r = ModuleResult(m.name, True, w.old_rank, len(cols), [widths[c] for c in cols], rec.decoded_bytes, energy, rel,
                         float(w.choices.dist[i]))  # fmt: skip
        if w.s.size == 0:
            r.notes.append("ΔW is zero: rank 0")
        results.append(r)
    report = CompressReport(
        budget=budget, fp16_bytes=fp16, file_bytes=fitted.file_bytes, weighting=weighting,
        objective="importance" if importance is not None else "data-free", bits=widths, group_size=group, codec=codec,
        rounds=fitted.rounds, allocation_budget=fitted.allocation_budget, modules=results, notes=notes,
    )  # fmt: skip
    return out, report


@dataclass
class CompressResult:
    """What :func:`compress_file` did."""

    src: Path
    dst: Path | None
    report: CompressReport
    src_bytes: int
    dst_bytes: int | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "ok": True,
            "src": str(self.src),
            "dst": None if self.dst is None else str(self.dst),
            "src_bytes": self.src_bytes,
            "dst_bytes": self.dst_bytes,
            "seconds": self.seconds,
            **self.report.as_dict(),
        }


def compress_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    *,
    force: bool = False,
    adapter: str | None = None,
    base: str | os.PathLike[str] | None = None,
    **options: Any,
) -> CompressResult:
    """Compress ``src`` (any format :func:`adapterpack.open` reads) into the .apack ``dst`` (``None``: plan only).

    ``base``: for a GGUF ``src``, the base model's GGUF file or config.json (the head counts that put
    llama.cpp's q/k rows back in order). ``options`` are :func:`compress`'s. The file written is exactly
    the size the report gives."""
    from adapterpack.container.writer import write_apack
    from adapterpack.ops.convert import check_destination, infer_target, load_source

    start = time.perf_counter()
    src = Path(src)
    if dst is not None:
        dst = Path(dst)
        if infer_target(dst) != "apack":
            raise ConversionError(f"compress writes .apack files ({dst}); convert it to other formats afterwards")
        check_destination(src, dst, "apack", force)
    source = load_source(src, adapter, base=base)
    try:
        if len(source.adapters) != 1:
            names = ", ".join(a.name for a in source.adapters)
            raise ConversionError(f"{src} holds {len(source.adapters)} adapters ({names}); pick one with --adapter")
        out, report = compress(source.adapters[0], **options)
        if dst is not None:
            # the planner is the writer's own, so a mismatch is a bug: refused before anything is written
            write_apack(dst, out, codec=report.codec, overwrite=force, expected_size=report.file_bytes)
    finally:
        source.close()
    return CompressResult(
        src=src,
        dst=dst,
        report=report,
        src_bytes=footprint(src),
        dst_bytes=footprint(dst) if dst is not None else None,
        seconds=time.perf_counter() - start,
    )
