"""Re-ranking without retraining: choose a rank per module from its exact spectrum and cut ΔW there.

Every module's SVD comes from its factors (:mod:`adapterpack.linalg.lowrank`), so nothing out×in
is formed; the truncation at rank j is the best rank-j approximation (Eckart–Young), and the
retained energy and relative error reported are exact. Ranks come from one rule
(:class:`RerankPolicy`): a fixed rank, an energy fraction, a singular-value ratio, or a global
byte budget solved as a multiple-choice knapsack (:mod:`adapterpack.linalg.allocate`).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes, progress
from adapterpack.adapter import Adapter, Module
from adapterpack.codecs import DEFAULT_CODEC
from adapterpack.encodings.lower import lora_from_factors, main_dtype
from adapterpack.encodings.svd import from_spectrum, s_dtype_for, singular_values
from adapterpack.errors import ConversionError, OptionError
from adapterpack.factors import Factors
from adapterpack.formats.source import base_init_problem
from adapterpack.formats.write import BASE_FORMATS, WriteOptions, check_write_options
from adapterpack.linalg import allocate
from adapterpack.linalg.finite import check_product
from adapterpack.linalg.lowrank import Spectrum, spectrum_of
from adapterpack.names import natural_key
from adapterpack.ops.budget import apack_file_size, fit_to_file
from adapterpack.ops.convert import check_destination, infer_target, load_source, write_adapters
from adapterpack.ops.importance import Importance
from adapterpack.ops.report import footprint

RULES = ("rank", "energy", "sv_ratio", "budget", "budget_ratio")
ENCODINGS = ("svd", "lora")
ROUND_MODES = ("up", "down")


def _is_int(x: object) -> bool:
    """An integer (a numpy one too), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: object) -> bool:
    """A finite real number (int, float or a numpy scalar of one), not a bool or a string."""
    ok = isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))
    return ok and (isinstance(x, (int, np.integer)) or math.isfinite(x))  # type: ignore[arg-type]


@dataclass(frozen=True)
class RerankPolicy:
    """How to choose ranks: exactly one of ``rank``, ``energy``, ``sv_ratio``, ``budget`` (bytes of
    factors after) or ``budget_ratio`` (of the factors' bytes before), plus optional limits.

    ``round_to`` moves each rank into an allowed set (e.g. vLLM's 1, 8, 16, 32, ...): ``up`` keeps
    more singular values (padding with zeros in lora output when the module has fewer), ``down``
    cuts; with a budget the allowed ranks are the only choices. ``modules`` is a regular expression
    (``re.search`` on the module name): other modules are copied unchanged and are outside the budget.
    ``min_rank`` defaults to 1 for budgets (a budget below rank 1 everywhere is refused; pass 0 to
    let it drop modules) and to 0 otherwise. ``weighting`` is what a budget optimises: ``balanced``
    (the default without importance: least Σ‖ΔW_i − ΔW_i,j‖_F^1.5 with every module at ≥ ¾ of the
    uniform rank the budget affords; lowest KL on the SmolLM2 adapters measured, see
    :func:`adapterpack.linalg.allocate.balanced_floor`), ``absolute`` (most Σ‖retained‖²) or
    ``relative`` (most kept fraction per module); ``method`` is ``dp`` (exact) or ``greedy``.
    ``importance`` (budgets only) replaces each module's energy by the second-order KL of its cut,
    ``½·σ_cutᵀ F σ_cut`` with F the measured Fisher matrix of its components (:mod:`adapterpack.ops.importance`;
    modules weighed independently of each other), so the budget minimises the KL the cuts cost
    instead of the energy they drop; it implies ``absolute`` weighting unless ``balanced`` is asked for
    (then those costs take the place of ‖ΔW_i − ΔW_i,j‖², floor included).
    """

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    budget: int | None = None
    budget_ratio: float | None = None
    max_rank: int | None = None
    min_rank: int | None = None
    round_to: tuple[int, ...] | None = None
    round_mode: str = "up"
    modules: str | None = None
    weighting: str | None = None  # None: balanced, or absolute with importance
    method: str = "dp"
    dtype: str | None = None
    encoding: str = "svd"
    importance: Importance | None = field(default=None, repr=False, compare=False)

    @property
    def effective_weighting(self) -> str:
        """``weighting``, or its default: ``absolute`` with importance (its own objective), else ``balanced``."""
        if self.weighting is not None:
            return self.weighting
        return "absolute" if self.importance is not None else "balanced"

    def rule(self) -> str:
        """The one rule set, after checking every value (ConversionError naming what is wrong)."""
        set_ = [r for r in RULES if getattr(self, r) is not None]
        if len(set_) != 1:
            raise ConversionError(f"give exactly one of {', '.join(RULES)} (got {', '.join(set_) or 'none'})")
        rule = set_[0]
        value = getattr(self, rule)
        kind_ok = _is_int(value) if rule == "rank" else _is_real(value)
        if not kind_ok:
            what = "an integer" if rule == "rank" else "a finite number"
            raise ConversionError(f"{rule} must be {what}, got {value!r:.40}")
        for name in ("min_rank", "max_rank"):
            limit = getattr(self, name)
            if limit is not None and not _is_int(limit):
                raise ConversionError(f"{name} must be an integer, got {limit!r:.40}")
        bad = {
            "rank": lambda v: v < 0,
            "energy": lambda v: not 0 < v <= 1,
            "sv_ratio": lambda v: not v >= 1,
            "budget": lambda v: v < 0,
            "budget_ratio": lambda v: not 0 < v <= 1,
        }[rule]
        if bad(value):
            why = {"rank": ">= 0", "energy": "in (0, 1]", "sv_ratio": ">= 1", "budget": ">= 0 bytes", "budget_ratio": "in (0, 1]"}
            raise ConversionError(f"{rule} must be {why[rule]}, got {value}")
        low = self.min_rank or 0
        if low < 0 or (self.max_rank is not None and self.max_rank < low):
            raise ConversionError(f"need 0 <= min_rank <= max_rank, got {self.min_rank} and {self.max_rank}")
        if self.round_to is not None and (not self.round_to or min(self.round_to) < 1):
            raise ConversionError(f"round_to needs ranks >= 1, got {list(self.round_to)}")
        if self.round_to and not any(low <= a <= (self.max_rank if self.max_rank is not None else a) for a in self.round_to):
            # rounding would break the limits (--max-rank 4 --round-to 8,16 wrote rank 8)
            hi = "" if self.max_rank is None else f", max_rank {self.max_rank}"
            raise OptionError(f"no rank of round_to {sorted(set(self.round_to))} is within min_rank {low}{hi}")
        for name, value_, allowed in (
            ("round_mode", self.round_mode, ROUND_MODES),
            ("weighting", self.effective_weighting, allocate.WEIGHTINGS),
            ("method", self.method, ("dp", "greedy")),
            ("encoding", self.encoding, ENCODINGS),
        ):
            if value_ not in allowed:
                raise ConversionError(f"{name} must be one of {', '.join(allowed)}, got {value_!r}")
        if self.importance is not None and rule not in ("budget", "budget_ratio"):
            raise ConversionError(f"importance weighs a budget's choices; it does not apply to {rule}")
        if self.importance is not None and (self.effective_weighting == "relative" or self.method != "dp"):
            # relative weighting would cancel F's scale across modules, which is what it carries; the
            # per-component costs are not decreasing (nor always positive), so greedy is not optimal
            raise ConversionError("importance works with weighting 'absolute' or 'balanced' and method 'dp' only")
        if self.dtype is not None and not dtypes.by_name(self.dtype).is_float:
            raise ConversionError(f"dtype must be a float dtype, got {self.dtype!r}")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as e:
                raise ConversionError(f"modules: {self.modules!r} is not a regular expression ({e})") from None
        return rule


@dataclass
class ModulePlan:
    """One module's re-ranking: ranks, exact retained energy fraction and relative Frobenius error of ΔW, bytes."""

    name: str
    old_rank: int
    new_rank: int
    stored_rank: int  # rank of the written record (new_rank plus zero padding in lora output)
    energy: float  # ‖ΔW‖²_F
    retained: float  # fraction of ‖ΔW‖²_F kept
    rel_error: float  # ‖ΔW − ΔW'‖_F / ‖ΔW‖_F
    bytes_before: int
    bytes_after: int
    selected: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class RerankReport:
    """Per-module plans and the totals."""

    rule: str
    policy: RerankPolicy
    modules: list[ModulePlan]
    notes: list[str] = field(default_factory=list)
    #: With a whole-file budget: the budget, the file's exact bytes and the factor budget that fits it.
    budget: int | None = None
    file_bytes: int | None = None
    allocation_budget: int | None = None

    @property
    def total(self) -> dict[str, Any]:
        """Bytes before/after, energy-weighted retained fraction, relative error of all ΔW stacked."""
        energy = sum(m.energy for m in self.modules)
        kept = sum(m.energy * m.retained for m in self.modules)
        before = sum(m.bytes_before for m in self.modules)
        after = sum(m.bytes_after for m in self.modules)
        return {
            "modules": len(self.modules),
            "reranked": sum(m.selected for m in self.modules),
            "bytes_before": before,
            "bytes_after": after,
            "ratio": before / after if after else None,
            "retained": kept / energy if energy else 1.0,
            "rel_error": float(np.sqrt(max(energy - kept, 0.0) / energy)) if energy else 0.0,
            "min_retained": min((m.retained for m in self.modules), default=1.0),
            "max_rel_error": max((m.rel_error for m in self.modules), default=0.0),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        policy = {k: v for k, v in self.policy.__dict__.items() if v is not None and k != "importance"}
        if self.policy.rule() in ("budget", "budget_ratio"):
            policy["weighting"] = self.policy.effective_weighting
        if self.policy.importance is not None:
            policy["importance"] = dict(self.policy.importance.info)
        return {
            "rule": self.rule,
            "policy": policy,
            "total": self.total,
            "modules": [m.__dict__ for m in self.modules],
            "notes": self.notes,
            "budget": self.budget,
            "file_bytes": self.file_bytes,
            "allocation_budget": self.allocation_budget,
        }


def spectrum_with_factors(module: Module, *, where: str | None = None, dtype: str | None = None) -> tuple[Spectrum, Factors]:
    """The exact SVD of a module's ΔW (read from an svd record, computed from factors otherwise).

    Factors a fit cannot use (non-finite, or too large for binary64 or for ``dtype``, the float dtype
    its singular values are written in) are refused first, naming ``where`` (default: the module)."""
    f = module.factors()
    where = where or f"module {module.name!r}"
    check_product(f.A, f.B, f.scale, where=where, dtype=dtype)
    if module.encoding == "svd":
        s = singular_values(module)
        return Spectrum.from_vectors(np.asarray(module.array("Ut"), np.float64).T, s, np.asarray(module.array("Vt"), np.float64)), f
    return spectrum_of(f, where=where), f


def _cost_per_rank(f: Factors, dtype: str, encoding: str) -> int:
    m, n = f.B.shape[0], f.A.shape[1]
    s_bytes = dtypes.by_name(s_dtype_for(dtype)).itemsize if encoding == "svd" else 0
    return (m + n) * dtypes.by_name(dtype).itemsize + s_bytes


def _rule_rank(policy: RerankPolicy, rule: str, sp: Spectrum) -> int:
    if rule == "rank":
        return int(policy.rank)  # type: ignore[arg-type]
    if rule == "energy":
        return sp.rank_for_energy(float(policy.energy))  # type: ignore[arg-type]
    return allocate.rank_for_sv_ratio(sp.S, float(policy.sv_ratio))  # type: ignore[arg-type]


@dataclass
class _Work:
    module: Module
    spectrum: Spectrum
    factors: Factors
    dtype: str
    k: int  # nonzero singular values
    cost: int


def _prepare(adapter: Adapter, policy: RerankPolicy) -> tuple[str, list[ModulePlan], dict[str, _Work], list[str]]:
    """The rule, a plan per module (ranks not chosen yet), the selected modules' exact spectra, notes."""
    rule = policy.rule()
    if (why := base_init_problem(adapter)) is not None:  # as merge and the exporters refuse it
        raise ConversionError(f"{why}; re-ranking would cut scale·B·A, which is not its ΔW")
    pattern = re.compile(policy.modules) if policy.modules else None
    work: dict[str, _Work] = {}
    plans: list[ModulePlan] = []
    notes: list[str] = []
    for m in progress.track(adapter, "re-ranking", total=len(adapter), unit="modules"):
        old = int(m.summary().get("rank", 0))
        selected = pattern is None or pattern.search(m.name) is not None
        if selected and m.params.get("dora", False):
            notes.append(f"{m.name}: DoRA (its magnitude needs the base weight): kept as is")
            selected = False
        if not selected:
            b = m.decoded_bytes
            plans.append(ModulePlan(m.name, old, old, old, 0.0, 1.0, 0.0, b, b, selected=False))
            continue
        dtype = dtypes.by_name(policy.dtype).name if policy.dtype else main_dtype(m)
        sp, f = spectrum_with_factors(m, where=f"adapter {adapter.name!r} module {m.name!r}", dtype=s_dtype_for(dtype))
        k = int(np.count_nonzero(sp.S > 0))
        work[m.name] = _Work(m, sp, f, dtype, k, _cost_per_rank(f, dtype, policy.encoding))
        plans.append(ModulePlan(m.name, old, 0, 0, sp.energy, 1.0, 0.0, m.decoded_bytes, 0))
    if not work:
        raise ConversionError("no module to re-rank" + (f" matches {policy.modules!r}" if pattern else ""))
    return rule, plans, work, notes


def _assign(policy: RerankPolicy, plans: list[ModulePlan], work: dict[str, _Work], ranks: dict[str, int]) -> None:
    """Fill every selected plan's ranks, exact retained energy and error, and bytes from ``ranks``."""
    for p in plans:
        if not p.selected:
            continue
        p.notes = []
        w = work[p.name]
        r = ranks[p.name]
        stored = r
        if r > w.k and w.k > 0:
            if policy.encoding == "lora" and policy.round_to is not None:
                p.notes.append(f"rank {r} above its {w.k} nonzero singular values: padded with zeros")
            else:
                p.notes.append(f"rank {r} asked, the module has {w.k} nonzero singular values: kept {w.k}")
                stored = w.k
            r = min(r, w.k)
        if w.k == 0:
            r = 0
            p.notes.append(
                "ΔW is zero: rank 0"
                + (" (written as rank 1 zero factors: LoRA has no rank 0)" if policy.encoding == "lora" else "")
            )
            stored = 1 if policy.encoding == "lora" else 0
        elif stored == 0 and policy.encoding == "lora":
            p.notes.append("cut to rank 0: written as rank 1 zero factors (LoRA has no rank 0)")
            stored = 1
        p.new_rank, p.stored_rank = r, stored
        p.retained = w.spectrum.retained(r) / w.spectrum.energy if w.spectrum.energy else 1.0
        p.rel_error = w.spectrum.rel_error(r)
        p.bytes_after = stored * w.cost
    plans.sort(key=lambda p: natural_key(p.name))  # layers.2 before layers.10, as inspect lists them


def plan_rerank(adapter: Adapter, policy: RerankPolicy) -> tuple[RerankReport, dict[str, _Work]]:
    """Choose every module's rank under ``policy`` (reads factors, computes exact spectra); a budget counts
    the bytes of the re-ranked factors (:func:`rerank` with ``file_size`` fits a whole file instead)."""
    rule, plans, work, notes = _prepare(adapter, policy)
    ranks = _choose(policy, rule, work, notes)
    _assign(policy, plans, work, ranks)
    return RerankReport(rule, policy, plans, notes), work


def _allowed(policy: RerankPolicy) -> tuple[int, ...] | None:
    return tuple(sorted(set(policy.round_to))) if policy.round_to else None


def _values(policy: RerankPolicy, name: str, w: _Work) -> np.ndarray:
    """What keeping each of a module's components is worth to a budget: σ², or with measured importance
    the second-order KL each one's cut adds (:meth:`~adapterpack.ops.importance.Importance.values`)."""
    if policy.importance is None:
        return w.spectrum.S[: w.k] ** 2
    return policy.importance.values(name, w.spectrum.S[: w.k])


def _items(policy: RerankPolicy, work: dict[str, _Work]) -> list[allocate.Item]:
    allowed = _allowed(policy)
    return [
        allocate.Item(
            name,
            _values(policy, name, w),
            w.cost,
            allocate.choices_for(
                w.k, min_rank=1 if policy.min_rank is None else policy.min_rank, max_rank=policy.max_rank, allowed=allowed
            ),
        )
        for name, w in work.items()
    ]


def _budget(policy: RerankPolicy, rule: str, work: dict[str, _Work], notes: list[str]) -> int:
    if rule == "budget":
        return int(policy.budget)  # type: ignore[arg-type]
    before = sum(w.module.decoded_bytes for w in work.values())
    budget = int(before * float(policy.budget_ratio))  # type: ignore[arg-type]
    notes.append(f"budget {budget:,} B = {policy.budget_ratio} × {before:,} B of the re-ranked modules' tensors")
    return budget


def _choose(policy: RerankPolicy, rule: str, work: dict[str, _Work], notes: list[str], budget: int | None = None) -> dict[str, int]:
    allowed = _allowed(policy)
    if rule in ("budget", "budget_ratio"):
        items = _items(policy, work)
        if budget is None:
            budget = _budget(policy, rule, work, notes)
        solve = allocate.budget_dp if policy.method == "dp" else allocate.budget_greedy
        return solve(items, budget, policy.effective_weighting)
    if allowed:  # round within the limits (rule() made sure some allowed rank is there)
        low, high = policy.min_rank or 0, policy.max_rank
        allowed = tuple(a for a in allowed if low <= a and (high is None or a <= high))
    out = {}
    for name, w in work.items():
        r = _rule_rank(policy, rule, w.spectrum)
        r = max(r, policy.min_rank or 0)
        if policy.max_rank is not None:
            r = min(r, policy.max_rank)
        if allowed:
            r = allocate.round_rank(r, allowed, policy.round_mode)
        out[name] = r
    return out


def _record(p: ModulePlan, w: _Work, encoding: str) -> Module:
    if encoding == "svd":
        return from_spectrum(p.name, w.spectrum, w.factors, rank=p.stored_rank, dtype=w.dtype)
    r, sp = p.new_rank, w.spectrum
    root = np.sqrt(sp.S[:r])
    u, vt = sp.vectors(r)
    a = np.zeros((p.stored_rank, sp.shape[1]))
    b = np.zeros((sp.shape[0], p.stored_rank))
    a[:r] = root[:, None] * vt
    b[:, :r] = u * root[None, :]
    f = Factors(A=a, B=b, scale=1.0, base_shape=w.factors.base_shape, transpose=w.factors.transpose, layout=w.factors.layout)
    return lora_from_factors(p.name, f, dtype=w.dtype)


def _build(adapter: Adapter, plans: list[ModulePlan], work: dict[str, _Work], encoding: str) -> Adapter:
    modules = {}
    for p in plans:
        modules[p.name] = _record(p, work[p.name], encoding) if p.selected else adapter.module(p.name)
    return adapter.derived(modules)


def rerank(
    adapter: Adapter, policy: RerankPolicy, *, file_size: Callable[[Adapter], int] | None = None
) -> tuple[Adapter, RerankReport]:
    """``adapter`` re-ranked under ``policy`` (svd or lora records) and the report.

    A budget counts the re-ranked factors' bytes, unless ``file_size`` is given (the exact bytes of
    the file an adapter would be written as, e.g. :func:`adapterpack.ops.budget.apack_file_size`):
    then the whole file fits the budget (:func:`adapterpack.ops.budget.fit_to_file`), and the report
    gives its size and the factor budget that got there."""
    rule = policy.rule()
    if file_size is None or rule not in ("budget", "budget_ratio"):
        report, work = plan_rerank(adapter, policy)
        return _build(adapter, report.modules, work, policy.encoding), report
    rule, plans0, work, notes = _prepare(adapter, policy)
    budget = _budget(policy, rule, work, notes)
    items = _items(policy, work)

    def solve(b: int) -> tuple[list[ModulePlan], Adapter]:
        plans = [replace(p, notes=list(p.notes)) for p in plans0]
        _assign(policy, plans, work, _choose(policy, rule, work, [], budget=b))
        return plans, _build(adapter, plans, work, policy.encoding)

    def spent(plan: tuple[list[ModulePlan], Adapter]) -> int:
        return sum(p.bytes_after for p in plan[0] if p.selected)

    fitted = fit_to_file(solve, lambda plan: file_size(plan[1]), budget, floor=allocate.min_cost(items), cost=spent)
    plans, out = fitted.plan
    notes.append(
        f"whole file {fitted.file_bytes:,} B within the budget {budget:,} B (index and padding included): "
        f"factors within {fitted.allocation_budget:,} B"
    )
    report = RerankReport(rule, policy, plans, notes, budget=budget, file_bytes=fitted.file_bytes,
                          allocation_budget=fitted.allocation_budget)  # fmt: skip
    return out, report


@dataclass
class RerankResult:
    """What :func:`rerank_file` did."""

    src: Path
    dst: Path | None
    dst_format: str | None
    report: RerankReport
    src_bytes: int
    dst_bytes: int | None
    notes: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "src": str(self.src),
            "dst": None if self.dst is None else str(self.dst),
            "dst_format": self.dst_format,
            "src_bytes": self.src_bytes,
            "dst_bytes": self.dst_bytes,
            "seconds": self.seconds,
            "export_notes": self.notes,
            **self.report.as_dict(),
        }


def _file_size(dst: Path | None, target: str | None, kwargs: dict[str, Any]) -> Callable[[Adapter], int]:
    """The exact bytes ``dst`` would take: the writer's planner for .apack (and for a plan only), else a
    trial export (``kwargs``: :func:`write_adapters`'s) into a temporary folder beside ``dst``, measured and removed."""
    if dst is None or target in (None, "apack"):
        return lambda a: apack_file_size([a], kwargs["codec"], kwargs["level"])

    def exported(a: Adapter) -> int:
        with tempfile.TemporaryDirectory(prefix=".rerank-size-", dir=dst.parent if dst.parent.is_dir() else None) as tmp:
            trial = Path(tmp) / dst.name
            write_adapters([a], trial, target, **{**kwargs, "progress": None})
            return footprint(trial)

    return exported


def rerank_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    policy: RerankPolicy,
    *,
    to: str | None = None,
    codec: str = DEFAULT_CODEC,
    level: int | None = None,
    force: bool = False,
    adapter: str | None = None,
    drop_tensors: bool = False,
    component: str | None = None,
    options: WriteOptions | None = None,
) -> RerankResult:
    """Re-rank ``src`` (any format) into ``dst`` (.apack, PEFT folder, kohya, diffusers or gguf file; ``None``: plan only);
    ``component``: the diffusers component for modules whose names carry none. ``options`` (the CLI's shared output
    options) replaces ``codec``, ``level``, ``force``, ``drop_tensors`` and ``component`` and adds the rest
    (``serve_for`` / ``max_lora_rank``, ``base`` for gguf and diffusers output)."""
    start = time.perf_counter()
    src = Path(src)
    policy.rule()
    if options is None:
        options = WriteOptions(codec=codec, level=level, force=force, drop_tensors=drop_tensors, component=component)
    options = replace(options, codec=options.codec or DEFAULT_CODEC)
    target = None
    if dst is not None:
        dst = Path(dst)
        target = to or infer_target(dst)
        o = options
        check_write_options(
            target, dst, drop_tensors=o.drop_tensors, serve_for=o.serve_for, component=o.component, base=o.base, src=src
        )
        check_destination(src, dst, target, options.force)
    kwargs = options.writer_kwargs()
    if target not in BASE_FORMATS:
        kwargs["base"] = None  # it was for reading a .gguf input
    source = load_source(src, adapter, base=options.base)
    try:
        if len(source.adapters) != 1:
            names = ", ".join(a.name for a in source.adapters)
            raise ConversionError(f"{src} holds {len(source.adapters)} adapters ({names}); pick one with --adapter")
        out, report = rerank(source.adapters[0], policy, file_size=_file_size(dst, target, kwargs))
        notes: list[str] = []
        if dst is not None and target is not None:
            notes = write_adapters([out], dst, target, **kwargs)
    finally:
        source.close()
    return RerankResult(
        src=src,
        dst=dst,
        dst_format=target,
        report=report,
        src_bytes=footprint(src),
        dst_bytes=footprint(dst) if dst is not None else None,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
