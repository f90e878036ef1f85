"""Joint fit of many adapters on shared bases: ΔWᵢ ≈ U·Σᵢ·Vᵀ per module, from factors only.

``full``: U [m, R], V [n, R] orthonormal, Σᵢ = Uᵀ·ΔWᵢ·V (R×R). U and V come from alternating
(simultaneous) subspace iterations on the weighted operators Σᵢ wᵢ ΔWᵢ V Vᵀ ΔWᵢᵀ and
Σᵢ wᵢ ΔWᵢᵀ U Uᵀ ΔWᵢ, each applied through the factors ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` (cost O((m+n)·r·R) per
adapter; no m×n matrix is ever formed). ``diagonal``: Σᵢ = diag(σᵢ), fitted by alternating least
squares over U, V and the σᵢ.

Weights: ``norm`` gives adapter i the weight 1/‖ΔWᵢ‖² per module, so the objective is the sum of
relative errors and a large adapter cannot drown a small one; ``uniform`` weighs absolute errors.

Streaming and scale-out: every pass reads the adapters one at a time through :class:`Source`
objects and reduces per-adapter terms into per-module accumulators (O(R·(m+n)) each). Adapters are
grouped into fixed chunks; a chunk's terms are summed in adapter order and the chunks' sums in
chunk order, whatever runs them (:class:`SerialExecutor` here, a Dask cluster through
:class:`DaskExecutor`), so a distributed fit gives bit-identical results to the in-process one.

Errors are exact: ‖ΔWᵢ − U·Σᵢ·Vᵀ‖² = ‖ΔWᵢ‖² − 2⟨ΔWᵢ, UΣᵢVᵀ⟩ + tr(Σᵢᵀ UᵀU Σᵢ VᵀV), each term from
r×r or R×R Gram matrices, with U, V, Σᵢ as stored (rounded to the bank's dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from adapterpack import dtypes, progress
from adapterpack.errors import BankError
from adapterpack.factors import Factors
from adapterpack.linalg.finite import check_product

FORMS = ("full", "diagonal")
WEIGHTS = ("norm", "uniform")
DEFAULT_CHUNK = 8


class Source(Protocol):
    """One adapter of a collection: a name, and its modules' factors on demand (picklable for Dask)."""

    name: str

    def load(self) -> dict[str, Factors]:
        """Module name → 2-D factors (read when called; the caller drops them after use)."""
        ...


@dataclass(frozen=True)
class ModuleShape:
    """A banked module: name and the m×n product ``B·A`` its adapters share."""

    name: str
    m: int
    n: int


# --- per-adapter kernels -------------------------------------------------------------------------


def _f64(f: Factors) -> tuple[np.ndarray, np.ndarray, float]:
    """(A [r, n], B [m, r], s) in float64."""
    return np.asarray(f.A, np.float64), np.asarray(f.B, np.float64), float(f.scale)


def sq_norm(f: Factors) -> float:
    """‖s·B·A‖²_F from the r×r Gram matrices (exact in binary64 up to rounding)."""
    a, b, s = _f64(f)
    return float(s * s * np.sum((b.T @ b) * (a @ a.T)))


def _weight(norm2: float, weights: str) -> float:
    if norm2 <= 0.0:
        return 0.0
    return 1.0 / norm2 if weights == "norm" else 1.0


def project(f: Factors, U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Uᵀ·(s·B·A)·V, [R, R], float64."""
    a, b, s = _f64(f)
    return s * ((U.T @ b) @ (a @ V))


def sq_error(f: Factors, U: np.ndarray, V: np.ndarray, S: np.ndarray, norm2: float | None = None) -> float:
    """‖s·B·A − U·S·Vᵀ‖²_F exactly (S [R, R] or the diagonal [R]; U, V need not be orthonormal)."""
    a, b, s = _f64(f)
    S = np.diag(S) if S.ndim == 1 else S
    if norm2 is None:
        norm2 = sq_norm(f)
    inner = float(np.sum(S * (s * ((U.T @ b) @ (a @ V)))))
    recon = float(np.sum((S.T @ (U.T @ U)) * ((S @ (V.T @ V)).T)))  # tr(Sᵀ GU S GV)
    return max(norm2 - 2.0 * inner + recon, 0.0)


def diag_sigma(f: Factors, U: np.ndarray, V: np.ndarray, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares σ for ΔW ≈ U diag(σ) Vᵀ: solve G σ = b with G = (UᵀU)∘(VᵀV), b_k = u_kᵀ ΔW v_k."""
    a, b_, s = _f64(f)
    rhs = s * np.einsum("kr,rk->k", U.T @ b_, a @ V)
    sigma = np.linalg.lstsq(G, rhs, rcond=None)[0]
    return sigma, rhs


def _full_terms(f: Factors, U: np.ndarray, V: np.ndarray, weights: str) -> dict[str, Any]:
    """One adapter's share of a full-form pass: GU = w ΔW V Σᵀ, GV = w ΔWᵀ U Σ, captured and total energy."""
    a, b, s = _f64(f)
    norm2 = sq_norm(f)
    w = _weight(norm2, weights)
    av = a @ V  # [r, R]
    ub = U.T @ b  # [R, r]
    sig = s * (ub @ av)  # [R, R]
    return {
        "GU": b @ ((w * s) * (av @ sig.T)),
        "GV": a.T @ ((w * s) * (ub.T @ sig)),
        "captured": w * float(np.sum(sig * sig)),
        "total": w * norm2,
    }


def _init_terms(f: Factors, Om: np.ndarray, On: np.ndarray, weights: str) -> dict[str, Any]:
    """Sketch terms for the starting bases: w ΔW ΔWᵀ Ωm and w ΔWᵀ ΔW Ωn."""
    a, b, s = _f64(f)
    w = _weight(sq_norm(f), weights)
    aat, btb = a @ a.T, b.T @ b
    return {"GU": b @ ((w * s * s) * (aat @ (b.T @ Om))), "GV": a.T @ ((w * s * s) * (btb @ (a @ On)))}


def _diag_terms(f: Factors, U: np.ndarray, V: np.ndarray, weights: str, side: str) -> dict[str, Any]:
    """One adapter's share of an ALS half-step: the normal equations for U (side "U") or V."""
    a, b, s = _f64(f)
    norm2 = sq_norm(f)
    w = _weight(norm2, weights)
    G = (U.T @ U) * (V.T @ V)
    sigma, rhs = diag_sigma(f, U, V, G)
    err = max(norm2 - 2.0 * float(sigma @ rhs) + float(sigma @ G @ sigma), 0.0)
    if side == "U":  # U (Σ w D VᵀV D) = Σ w ΔW V D
        num = b @ ((w * s) * ((a @ V) * sigma[None, :]))
        gram = w * (sigma[:, None] * (V.T @ V) * sigma[None, :])
    else:  # V (Σ w D UᵀU D) = Σ w ΔWᵀ U D
        num = a.T @ ((w * s) * ((b.T @ U) * sigma[None, :]))
        gram = w * (sigma[:, None] * (U.T @ U) * sigma[None, :])
    return {"num": num, "gram": gram, "captured": w * (norm2 - err), "total": w * norm2}


# --- passes: map over chunks of adapters, reduce in a fixed order -----------------------------------------


def _add(acc: dict[str, dict[str, Any]], part: dict[str, dict[str, Any]]) -> None:
    for mod, terms in part.items():
        if mod not in acc:
            acc[mod] = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in terms.items()}
        else:
            for k, v in terms.items():
                acc[mod][k] = acc[mod][k] + v


def chunk_pass(sources: Sequence[Source], kind: str, state: dict[str, Any], weights: str) -> dict[str, dict[str, Any]]:
    """Sum one pass's per-adapter terms over ``sources`` (in order); each adapter is loaded, used and dropped."""
    acc: dict[str, dict[str, Any]] = {}
    for src in sources:
        facs = src.load()
        part: dict[str, dict[str, Any]] = {}
        for mod, st in state.items():
            if mod not in facs:  # a bank member may lack a module (spec/shared.md §2): it has no share in its fit
                continue
            f = facs[mod]
            if kind == "init":  # the first pass: one bad member would poison the shared bases of all
                check_product(f.A, f.B, f.scale, where=f"adapter {src.name!r} module {mod!r}")
                part[mod] = _init_terms(f, st[0], st[1], weights)
            elif kind == "full":
                part[mod] = _full_terms(f, st[0], st[1], weights)
            else:
                part[mod] = _diag_terms(f, st[0], st[1], weights, side=kind[-1])
        del facs
        _add(acc, part)
    return acc


def chunk_members(sources: Sequence[Source], state: dict[str, Any], form: str, dtype: str,
                  keep_raw: bool = False) -> list[dict[str, Any]]:
    """Per adapter: Σᵢ (rounded to ``dtype``) and exact errors against the stored bases, per module
    (and the unrounded float64 Σᵢ as ``raw`` when ``keep_raw``: rank choice needs it, the bank does not)."""
    np_dt = dtypes.by_name(dtype).numpy
    out = []
    for src in sources:
        facs = src.load()
        mods = {}
        for mod, (U, V) in state.items():
            if mod not in facs:
                continue
            f = facs[mod]
            norm2 = sq_norm(f)
            if form == "full":
                raw = project(f, U, V)
            else:
                raw = diag_sigma(f, U, V, (U.T @ U) * (V.T @ V))[0]
            stored = raw.astype(np_dt)
            err = sq_error(f, U, V, stored.astype(np.float64), norm2)
            mods[mod] = {"S": stored, "norm2": norm2, "sq_error": err} | ({"raw": raw} if keep_raw else {})
        out.append({"name": src.name, "modules": mods})
    return out


class SerialExecutor:
    """Runs a pass's chunks one after another in this process."""

    def map_ordered(self, fn: Callable[..., Any], chunks: Sequence[Any], **shared: Any) -> Iterator[Any]:
        for c in chunks:
            yield fn(c, **shared)

    def close(self) -> None:
        """Nothing to release."""


class DaskExecutor:
    """Runs a pass's chunks on Dask: local threads (``address`` None) or the cluster at ``address``.

    The shared state (current bases) is scattered once per pass; results are gathered in chunk
    order and each released as soon as it has been added, so the driver holds one chunk result
    at a time beyond what workers have finished.
    """

    def __init__(self, address: str | Any | None = None, threads: int | None = None) -> None:
        try:
            from distributed import Client  # dask: optional (the dask extra), only for scale-out fits
        except ImportError:
            raise BankError("scale-out needs Dask: pip install 'adapterpack[dask]'") from None
        if address is None:
            self.client = Client(processes=False, n_workers=1, threads_per_worker=threads, dashboard_address=None)
            self._own = True
        elif isinstance(address, str):
            self.client = Client(address)
            self._own = True
        else:  # an existing Client
            self.client = address
            self._own = False

    def map_ordered(self, fn: Callable[..., Any], chunks: Sequence[Any], **shared: Any) -> Iterator[Any]:
        # hash=False: a content-hashed key could be released by the previous pass while this one uses it
        scattered = {k: (self.client.scatter([v], broadcast=True, hash=False)[0] if isinstance(v, dict) else v)
                     for k, v in shared.items()}
        futures = self.client.map(fn, list(chunks), pure=False, **scattered)
        for fut in futures:
            yield fut.result()
            fut.release()

    def close(self) -> None:
        """Shut the local cluster down (a cluster reached by address is only disconnected)."""
        if self._own:
            self.client.close()


def _chunks(sources: Sequence[Source], size: int) -> list[list[Source]]:
    return [list(sources[i : i + size]) for i in range(0, len(sources), size)]


def _reduce(executor: Any, chunks: list[list[Source]], kind: str, state: dict[str, Any], weights: str) -> dict[str, dict[str, Any]]:
    acc: dict[str, dict[str, Any]] = {}
    for part in executor.map_ordered(chunk_pass, chunks, kind=kind, state=state, weights=weights):
        _add(acc, part)
    return acc


# --- the fit ----------------------------------------------------------------------------------------


def _orth(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis of x's columns (Householder QR; signs fixed so results are reproducible)."""
    q, r = np.linalg.qr(x)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d[None, :]


def _normalize_columns(U: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(U, axis=0)
    n[n == 0] = 1.0
    return U / n[None, :]


@dataclass
class ModuleFit:
    """One module's fit: bases (float64 until stored), rank, iterations and convergence."""

    name: str
    U: np.ndarray
    V: np.ndarray
    rank: int
    iterations: int = 0
    converged: bool = False
    captured: float = 0.0  # weighted captured fraction at the last pass (1 - weighted mean error)
    history: list[float] = field(default_factory=list)


@dataclass
class FitOptions:
    """How to fit: form, weights, iteration limits, chunking; the convergence test is
    |f_t − f_{t−1}| <= tol·f_t on the weighted captured fraction f."""

    form: str = "full"
    weights: str = "norm"
    max_iter: int = 50
    tol: float = 1e-7
    chunk: int = DEFAULT_CHUNK
    seed: int = 0


def check_options(opts: FitOptions) -> None:
    """Refuse unknown forms/weights and nonsensical limits with one-line errors."""
    if opts.form not in FORMS:
        raise BankError(f"form must be one of {FORMS}, got {opts.form!r}")
    if opts.weights not in WEIGHTS:
        raise BankError(f"weights must be one of {WEIGHTS}, got {opts.weights!r}")
    if opts.max_iter < 0 or opts.chunk < 1 or not opts.tol >= 0:
        raise BankError("max_iter and tol must be >= 0 and chunk >= 1")


def initial_bases(shapes: Sequence[ModuleShape], ranks: dict[str, int], sources: Sequence[Source], executor: Any,
                  opts: FitOptions) -> dict[str, ModuleFit]:
    """Starting bases from one sketch pass: orth(Σ w ΔW ΔWᵀ Ω) and orth(Σ w ΔWᵀ ΔW Ω'), seeded Gaussian Ω."""
    state = {}
    for k, sh in enumerate(shapes):
        rng = np.random.default_rng([opts.seed, k])
        R = ranks[sh.name]
        state[sh.name] = (rng.standard_normal((sh.m, R)), rng.standard_normal((sh.n, R)))
    acc = _reduce(executor, _chunks(sources, opts.chunk), "init", state, opts.weights)
    return {sh.name: ModuleFit(sh.name, _orth(acc[sh.name]["GU"]), _orth(acc[sh.name]["GV"]), ranks[sh.name]) for sh in shapes}


def iterate(fits: dict[str, ModuleFit], sources: Sequence[Source], executor: Any, opts: FitOptions,
            max_iter: int | None = None, progress_fn: Callable[[int, float], None] | None = None) -> None:
    """Run full-form subspace iterations (or diagonal ALS) on every module until each converges (``progress_fn(it, least
    captured)`` after each pass; :mod:`adapterpack.progress` shows them too)."""
    chunks = _chunks(sources, opts.chunk)
    limit = opts.max_iter if max_iter is None else max_iter
    for f in fits.values():
        f.converged = False
    active = set(fits)
    with progress.task("bank fit", total=limit, unit="iterations") as bar:
        _iterate(fits, active, chunks, executor, opts, limit, progress_fn, bar)


def _iterate(fits: dict[str, ModuleFit], active: set[str], chunks: Any, executor: Any, opts: FitOptions, limit: int,
             progress_fn: Callable[[int, float], None] | None, bar: progress.Task) -> None:
    for it in range(limit):
        if not active:
            break
        state = {k: (fits[k].U, fits[k].V) for k in sorted(active)}
        if opts.form == "full":
            acc = _reduce(executor, chunks, "full", state, opts.weights)
            updates = {k: (_orth(acc[k]["GU"]), _orth(acc[k]["GV"])) for k in state}
        else:
            acc_u = _reduce(executor, chunks, "diag_U", state, opts.weights)
            new_u = {k: _normalize_columns(_solve_right(acc_u[k]["num"], acc_u[k]["gram"])) for k in state}
            state_v = {k: (new_u[k], fits[k].V) for k in state}
            acc = _reduce(executor, chunks, "diag_V", state_v, opts.weights)
            updates = {k: (new_u[k], _normalize_columns(_solve_right(acc[k]["num"], acc[k]["gram"]))) for k in state}
        for k in state:
            f = fits[k]
            total = acc[k]["total"]
            cap = acc[k]["captured"] / total if total > 0 else 1.0
            prev = f.history[-1] if f.history else None
            f.history.append(cap)
            f.captured = cap
            f.iterations += 1
            if prev is not None and abs(cap - prev) <= opts.tol * max(abs(cap), 1e-300):
                f.converged = True  # the bases of the pass that measured no change are kept
                active.discard(k)
                continue
            f.U, f.V = updates[k]
        bar.advance(note=f"{len(active)} modules still moving, least captured {min(fits[k].captured for k in fits):.4g}")
        if progress_fn is not None:
            progress_fn(it + 1, min(fits[k].captured for k in fits))


def _solve_right(num: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """X with X·gram = num (least squares when gram is singular)."""
    return np.linalg.lstsq(gram.T, num.T, rcond=None)[0].T


def members(fits: dict[str, ModuleFit], sources: Sequence[Source], executor: Any, opts: FitOptions,
            dtype: str, keep_raw: bool = False) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[dict[str, Any]]]:
    """Final pass: bases rounded to ``dtype``, then every adapter's Σᵢ and exact errors against them."""
    np_dt = dtypes.by_name(dtype).numpy
    stored = {k: (f.U.astype(np_dt), f.V.astype(np_dt)) for k, f in fits.items()}
    state = {k: (u.astype(np.float64), v.astype(np.float64)) for k, (u, v) in stored.items()}
    out: list[dict[str, Any]] = []
    for part in executor.map_ordered(chunk_members, _chunks(sources, opts.chunk), state=state, form=opts.form, dtype=dtype,
                                     keep_raw=keep_raw):
        out.extend(part)
    return stored, out


# --- rank choice ------------------------------------------------------------------------------------


def _rotate_full(fit: ModuleFit, sigmas: list[np.ndarray], w: list[float]) -> list[np.ndarray]:
    """Rotate U, V so leading columns carry the most weighted energy; returns the rotated Σᵢ."""
    R = fit.rank
    cu = np.zeros((R, R))
    cv = np.zeros((R, R))
    for s, wi in zip(sigmas, w):
        cu += wi * (s @ s.T)
        cv += wi * (s.T @ s)
    pu = np.linalg.eigh(cu)[1]
    pv = np.linalg.eigh(cv)[1]
    pu, pv = pu[:, ::-1], pv[:, ::-1]
    fit.U = fit.U @ pu
    fit.V = fit.V @ pv
    return [pu.T @ s @ pv for s in sigmas]


def error_curves(fit: ModuleFit, member_rows: list[dict[str, Any]], form: str, weights: str) -> np.ndarray:
    """[N, R+1] relative squared error of each adapter when the module keeps its leading k columns.

    Reorders the bases by weighted energy first. Full form: truncating orthonormal bases gives
    exactly the projected error ‖ΔW‖² − ‖Σ[:k,:k]‖². Diagonal: the truncated σ's exact error.
    """
    member_rows = [r for r in member_rows if fit.name in r["modules"]]  # members that have the module
    norms = [r["modules"][fit.name]["norm2"] for r in member_rows]
    w = [_weight(n, weights) for n in norms]
    R = fit.rank
    curves = np.zeros((len(norms), R + 1))
    if form == "full":
        sig = _rotate_full(fit, [r["modules"][fit.name]["raw"] for r in member_rows], w)
        for i, (s, n2) in enumerate(zip(sig, norms)):
            cum = np.array([float(np.sum(s[:k, :k] ** 2)) for k in range(R + 1)])
            curves[i] = np.maximum(n2 - cum, 0.0) / n2 if n2 > 0 else 0.0
        return curves
    sig = np.array([r["modules"][fit.name]["raw"] for r in member_rows])  # [N, R]
    G = (fit.U.T @ fit.U) * (fit.V.T @ fit.V)
    order = np.argsort(-(np.array(w)[:, None] * sig**2 * np.diag(G)[None, :]).sum(axis=0), kind="stable")
    fit.U, fit.V, sig, G = fit.U[:, order], fit.V[:, order], sig[:, order], G[np.ix_(order, order)]
    for i, n2 in enumerate(norms):
        s = sig[i]
        rhs = G @ s  # at the LS optimum b = Gσ; the curve uses the truncated σ against the same b
        for k in range(R + 1):
            e = n2 - 2.0 * float(s[:k] @ rhs[:k]) + float(s[:k] @ G[:k, :k] @ s[:k])
            curves[i, k] = max(e, 0.0) / n2 if n2 > 0 else 0.0
    return curves


def module_bytes(sh: ModuleShape, rank: int, n_adapters: int, form: str, itemsize: int) -> int:
    """Stored bytes (uncompressed) of one module of a bank: U, V and every adapter's S."""
    per = rank * rank if form == "full" else rank
    return itemsize * (rank * (sh.m + sh.n) + n_adapters * per)


def choose_ranks(curves: dict[str, np.ndarray], shapes: Sequence[ModuleShape], n_adapters: int, form: str, itemsize: int,
                 target: float | None = None, budget: int | None = None) -> dict[str, int]:
    """Per-module rank: the least k whose mean relative error is <= ``target``, or greedy allocation
    of ``budget`` bytes (each step buys the rank with the largest mean-error drop per byte)."""
    if target is not None:
        out = {}
        for sh in shapes:
            mean = curves[sh.name].mean(axis=0)
            ok = np.nonzero(mean <= target)[0]
            out[sh.name] = int(ok[0]) if ok.size else int(mean.size - 1)
            out[sh.name] = max(out[sh.name], 1)
        return out
    assert budget is not None
    ranks = {sh.name: 1 for sh in shapes}
    by = {sh.name: sh for sh in shapes}
    used = sum(module_bytes(sh, 1, n_adapters, form, itemsize) for sh in shapes)
    if used > budget:
        raise BankError(f"a byte budget of {budget} cannot hold even rank 1 on every module ({used} bytes)")
    while True:
        best, best_gain = None, 0.0
        for name, k in ranks.items():
            c = curves[name]
            if k + 1 >= c.shape[1]:
                continue
            sh = by[name]
            extra = module_bytes(sh, k + 1, n_adapters, form, itemsize) - module_bytes(sh, k, n_adapters, form, itemsize)
            if used + extra > budget:
                continue
            gain = (c[:, k].mean() - c[:, k + 1].mean()) / extra
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return ranks
        used += module_bytes(by[best], ranks[best] + 1, n_adapters, form, itemsize) - module_bytes(
            by[best], ranks[best], n_adapters, form, itemsize)
        ranks[best] += 1


# --- one call -----------------------------------------------------------------------------------


@dataclass
class BankFitResult:
    """The fitted bank: stored bases per module, every member's Σᵢ and exact errors, and the fit's facts."""

    form: str
    dtype: str
    bases: dict[str, tuple[np.ndarray, np.ndarray]]
    members: list[dict[str, Any]]
    fits: dict[str, ModuleFit]

    def rel_errors(self) -> np.ndarray:
        """[N, modules] relative squared errors ‖ΔWᵢ − UΣᵢVᵀ‖²/‖ΔWᵢ‖² (0 where ΔWᵢ = 0, NaN where adapter i
        lacks the module, as a bank's member may)."""
        names = list(self.bases)
        out = np.full((len(self.members), len(names)), np.nan)
        for i, m in enumerate(self.members):
            for j, k in enumerate(names):
                if k not in m["modules"]:
                    continue
                row = m["modules"][k]
                out[i, j] = row["sq_error"] / row["norm2"] if row["norm2"] > 0 else 0.0
        return out

    def report(self) -> dict[str, Any]:
        """Mean, max and quantiles of the relative errors; ranks, iterations and convergence per module."""
        e = self.rel_errors()
        e = e[~np.isnan(e)]
        flat = e.reshape(-1) if e.size else np.zeros(1)
        return {
            "form": self.form,
            "adapters": len(self.members),
            "modules": len(self.bases),
            "rel_error": {"mean": float(flat.mean()), "max": float(flat.max()),
                          "quantiles": {q: float(np.quantile(flat, float(q))) for q in ("0.5", "0.9", "0.99")}},
            "ranks": {k: f.rank for k, f in self.fits.items()},
            "iterations": {k: f.iterations for k, f in self.fits.items()},
            "converged": {k: f.converged for k, f in self.fits.items()},
        }


def fit_bank(shapes: Sequence[ModuleShape], sources: Sequence[Source], *, rank: int | dict[str, int] = 16,
             target_error: float | None = None, budget: int | None = None, opts: FitOptions | None = None,
             dtype: str = "float32", executor: Any = None,
             progress: Callable[[int, float], None] | None = None) -> BankFitResult:
    """Fit shared bases for ``sources`` on every module of ``shapes``.

    ``rank`` is R per module (or the most R may reach when ``target_error`` — mean relative squared
    error per module — or ``budget`` — total uncompressed bytes of the bank's tensors — chooses it).
    """
    opts = opts or FitOptions()
    check_options(opts)
    if not sources:
        raise BankError("a bank needs at least one adapter")
    if target_error is not None and budget is not None:
        raise BankError("give a target error or a byte budget, not both")
    executor = executor or SerialExecutor()
    ranks = {sh.name: (rank[sh.name] if isinstance(rank, dict) else rank) for sh in shapes}
    for sh in shapes:
        if not isinstance(ranks[sh.name], (int, np.integer)) or ranks[sh.name] < 1:
            raise BankError(f"module {sh.name!r}: rank must be an integer >= 1, got {ranks[sh.name]!r}")
        ranks[sh.name] = int(min(ranks[sh.name], sh.m, sh.n))
    fits = initial_bases(shapes, ranks, sources, executor, opts)
    iterate(fits, sources, executor, opts, progress_fn=progress)
    if target_error is not None or budget is not None:
        _, rows = members(fits, sources, executor, opts, "float64", keep_raw=True)
        curves = {sh.name: error_curves(fits[sh.name], rows, opts.form, opts.weights) for sh in shapes}
        chosen = choose_ranks(curves, shapes, len(sources), opts.form, dtypes.by_name(dtype).itemsize, target_error, budget)
        for sh in shapes:
            f = fits[sh.name]
            k = chosen[sh.name]
            f.U, f.V, f.rank = f.U[:, :k], f.V[:, :k], k
            f.history.append(math.nan)  # marks the truncation in the history
        iterate(fits, sources, executor, opts, progress_fn=progress)
    bases, rows = members(fits, sources, executor, opts, dtype)
    return BankFitResult(opts.form, dtype, bases, rows, fits)


def factors_sources(named: Iterable[tuple[str, dict[str, Factors]]]) -> list[Source]:
    """In-memory sources (for tests and small collections)."""
    return [MemorySource(n, f) for n, f in named]


@dataclass
class MemorySource:
    """An adapter already in memory."""

    name: str
    factors: dict[str, Factors]

    def load(self) -> dict[str, Factors]:
        return self.factors
