"""Fit NOLA coefficients to a low-rank ΔW: alternating exact least squares, never forming out×in.

Target ``T = s_t·B_t·A_t`` (rank q); model ``s·B·A`` with ``A = A0 + Σ αᵢ Âᵢ`` and
``B = B0 + Σ βⱼ B̂ⱼ`` (``Âᵢ = Aᵢ/√k_A``, ``B̂ⱼ = Bⱼ/√k_B``: spec/nola.md). With B fixed the
error is quadratic in α, and the normal equations need only r×r and r×in products:

    G_ij = s²·⟨Âᵢ, (BᵀB)·Âⱼ⟩,    g_i = s·⟨Âᵢ, BᵀT − s·(BᵀB)·A0⟩,    BᵀT = s_t·(BᵀB_t)·A_t

(the same with A fixed for β, using A·Aᵀ and T·Aᵀ). Each half step is the exact minimiser, so
the error never increases. A starts from the least-squares projection of the target's top-r
right factor √Σ·Vᵀ onto the A basis. The error reported is that of the record as stored
(coefficients rounded to their dtype, bases regenerated), computed exactly from factors:
``‖P·Q‖_F = ‖R_P·R_Qᵀ‖_F`` (thin QRs) for ``X = P·Q``.

A random basis cannot represent an arbitrary trained LoRA with few coefficients: the error
falls slowly with k and reaches 0 only near ``k_A = r·in``, ``k_B = r·out`` (the bases then
span everything). Cost per iteration: about ``2·k²·r·(in + out)`` flops, plus generating the
bases (held in memory: ``4·k·r·(in + out)`` bytes).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from adapterpack import progress
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings.nola import decode_many, nola_shape
from adapterpack.errors import ConversionError
from adapterpack.factors import Factors
from adapterpack.linalg.finite import check_product
from adapterpack.linalg.lowrank import factors_svd
from adapterpack.rng.basis import DEFAULT_BUDGET, GENERATOR_ID, GENERATOR_VERSION, KIND_A, KIND_A0, KIND_B, basis_range, chunk_bases


@dataclass
class NolaFit:
    """One fitted record and how well it fits: ``error`` is ‖ΔW_nola − ΔW‖_F / ‖ΔW‖_F of the record as stored."""

    module: Module
    error: float
    iterations: int
    history: list[float] = field(default_factory=list)
    #: A target-error search cut short by the time bound (the error is the best reached so far).
    stopped: bool = False

    @property
    def num_params(self) -> int:
        """Stored coefficients (k_A + k_B)."""
        return int(self.module.params["k_A"]) + int(self.module.params["k_B"])


#: The dtype of the coefficients a fit stores, and so of the factors its records decode to.
DTYPE = "float32"

#: Largest float64 bases a fit holds at once (bytes): ``k`` beyond this is refused, and a target-error
#: search stops there (the achieved error is reported either way).
FIT_MEMORY = 2 << 30


def _bases(seed: int, stream: int, kind: int, k: int, n: int, budget: int) -> np.ndarray:
    """All k bases of one kind, float64 ``[k, n]``, divided by √k (generated in budget-sized chunks)."""
    out = np.empty((k, n), np.float64)
    step = chunk_bases(n, budget)
    for i0 in range(0, k, step):
        i1 = min(k, i0 + step)
        out[i0:i1] = basis_range(seed, stream, kind, i0, i1, 0, n)
    return out / math.sqrt(k) if k else out


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Least-squares solution of the normal equations (a tiny ridge keeps a singular Gram solvable)."""
    if gram.size == 0:
        return np.zeros(0)
    ridge = 1e-12 * max(float(np.trace(gram)) / gram.shape[0], 1e-300)
    try:
        with warnings.catch_warnings():  # an ill-conditioned Gram: solve it properly below instead of warning
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            return scipy.linalg.solve(gram + ridge * np.eye(gram.shape[0]), rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError, scipy.linalg.LinAlgWarning):
        return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def _step(
    basis: np.ndarray, shape: tuple[int, int], fixed: np.ndarray, weight: np.ndarray, cross: np.ndarray, s: float, left: bool
) -> np.ndarray:
    """Coefficients minimising ‖s·B·A − T‖ over one factor's coefficients, the other factor fixed.

    For A (``left=False``): ``weight = BᵀB`` [r, r], ``cross = BᵀT`` [r, in]; the factor is
    ``fixed + Σ cᵢ basisᵢ``. For B (``left=True``): ``weight = A·Aᵀ``, ``cross = T·Aᵀ`` [out, r].
    """
    k = basis.shape[0]
    mats = basis.reshape(k, *shape)
    weighted = mats @ weight if left else np.einsum("rs,ksn->krn", weight, mats)
    gram = (s * s) * (basis @ weighted.reshape(k, -1).T)
    target = s * cross - (s * s) * ((fixed @ weight) if left else (weight @ fixed))
    rhs = basis @ target.reshape(-1)
    return _solve(gram, rhs)


def lowrank_norm(p: np.ndarray, q: np.ndarray) -> float:
    """‖P·Q‖_F for P ``[m, t]``, Q ``[t, n]`` without forming P·Q: ‖R_p·R_qᵀ‖_F from thin QRs of P
    and Qᵀ (stable where the trace formula would cancel)."""
    rp = np.linalg.qr(p, mode="r")
    rq = np.linalg.qr(q.T, mode="r")
    return float(np.linalg.norm(rp @ rq.T))


def _rel_error(f: Factors, target: Factors, norm: float) -> float:
    p = np.hstack([f.scale * f.B.astype(np.float64), -target.scale * target.B.astype(np.float64)])
    q = np.vstack([f.A.astype(np.float64), target.A.astype(np.float64)])
    return lowrank_norm(p, q) / norm if norm > 0 else 0.0


def fit_nola(
    target: Factors,
    *,
    name: str = "module",
    k_A: int,
    k_B: int,
    rank: int | None = None,
    seed: int = 0,
    stream: int = 0,
    scale: float = 1.0,
    a0: str = "zero",
    iterations: int = 10,
    tol: float = 1e-4,
    dtype: Any = DTYPE,
    budget: int = DEFAULT_BUDGET,
) -> NolaFit:
    """A ``nola`` record approximating ``target`` (2-D ΔW = s·B·A; the layout is kept) with k_A + k_B coefficients.

    ``rank`` defaults to the target's rank; ``a0`` is ``zero`` or ``generated`` (B0 is zero);
    iterations stop early when the error improves by less than ``tol`` (relative). The bases
    are held in memory as float64: ``8·(k_A·r·in + k_B·r·out)`` bytes.
    """
    layout = getattr(target, "layout", "linear")
    if target.A.ndim != 2 or target.B.ndim != 2 or len(target.base_shape) != 2 or layout != "linear":
        raise ConversionError(f"{name}: nola fits linear modules only, got layout {layout}, base_shape {list(target.base_shape)}")
    if a0 not in ("zero", "generated"):
        raise ConversionError(f"{name}: a0 must be 'zero' or 'generated' for a fit, got {a0!r}")
    out, inp = target.B.shape[0], target.A.shape[1]
    r = int(rank or target.rank or 1)
    spec = factors_svd(target.A, target.B, target.scale, where=name)
    norm = math.sqrt(spec.energy)
    params: dict[str, Any] = {
        "generator": GENERATOR_ID,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "stream": int(stream),
    }
    params |= {"rank": r, "k_A": int(k_A), "k_B": int(k_B), "scale": float(scale), "A0": a0, "B0": "zero"}
    if target.transpose:
        params["fan_in_fan_out"] = True
    probe = Module(name, "nola", tuple(target.base_shape), params, {"alpha": np.zeros(k_A, dtype), "beta": np.zeros(k_B, dtype)})
    nola_shape(probe)  # validates the params before any work
    need = 8 * (k_A * r * inp + k_B * r * out)
    if need > FIT_MEMORY:
        raise ConversionError(
            f"{name}: fitting k_A={k_A}, k_B={k_B} at rank {r} holds {need / 2**30:.1f} GiB of float64 bases "
            f"(limit {FIT_MEMORY / 2**30:.0f} GiB); use a smaller k"
        )
    ba = _bases(seed, stream, KIND_A, k_A, r * inp, budget)
    bb = _bases(seed, stream, KIND_B, k_B, r * out, budget)
    a_fixed = np.zeros((r, inp))
    if a0 == "generated":
        a_fixed = basis_range(seed, stream, KIND_A0, 0, 1, 0, r * inp).astype(np.float64).reshape(r, inp) / math.sqrt(inp)
    b_fixed = np.zeros((out, r))
    # start: A ≈ √Σ·Vᵀ (top r), projected onto the A basis
    j = min(r, spec.S.size)
    a_star = np.zeros((r, inp))
    a_star[:j] = np.sqrt(spec.S[:j])[:, None] * spec.vectors(j)[1]
    alpha = _solve(ba @ ba.T, ba @ (a_star - a_fixed).reshape(-1)) if k_A else np.zeros(0)
    beta = np.zeros(k_B)
    t_a = target.A.astype(np.float64)
    t_b = target.scale * target.B.astype(np.float64)
    history: list[float] = []
    for _ in range(iterations):
        a = a_fixed + (alpha @ ba).reshape(r, inp) if k_A else a_fixed
        beta = _step(bb, (out, r), b_fixed, a @ a.T, t_b @ (t_a @ a.T), scale, left=True) if k_B else beta
        b = b_fixed + (beta @ bb).reshape(out, r) if k_B else b_fixed
        alpha = _step(ba, (r, inp), a_fixed, b.T @ b, (b.T @ t_b) @ t_a, scale, left=False) if k_A else alpha
        a = a_fixed + (alpha @ ba).reshape(r, inp) if k_A else a_fixed
        err = _rel_error(Factors(a, b, scale, target.base_shape, target.transpose), target, norm)
        history.append(err)
        if len(history) > 1 and history[-2] - err <= tol * max(history[-2], 1e-300):
            break
    module = Module(name, "nola", tuple(target.base_shape), params, {"alpha": alpha.astype(dtype), "beta": beta.astype(dtype)})
    stored = decode_many([module], budget)[name]
    return NolaFit(module=module, error=_rel_error(stored, target, norm), iterations=len(history), history=history)


def fit_adapter(
    adapter: Adapter,
    *,
    k: int | None = None,
    target_error: float | None = None,
    seed: int = 0,
    shared_basis: bool = False,
    rank: int | None = None,
    iterations: int = 10,
    k_max: int | None = None,
    max_seconds: float | None = None,
) -> tuple[Adapter, dict[str, NolaFit]]:
    """Every 2-D module of ``adapter`` as a ``nola`` record: ``convert --to nola --k N / --target-error E``.

    With ``k``: k_A = k_B = k. With ``target_error`` (relative Frobenius, per module): k doubles
    from 16 until the stored record's error is at most ``target_error`` or k reaches ``k_max``
    (default ``r·max(in, out)``, where the bases span every factor); the achieved error is
    reported either way, never rounded to the target. ``max_seconds`` bounds a target-error search: once
    that much time has passed, no k is doubled any more (the module being searched keeps its best fit,
    the modules left are fitted once at the first k) and those fits say ``stopped``. Streams number the modules 0, 1, …
    (independent bases) unless ``shared_basis`` (stream 0 for all: bases generated once per
    matrix size when decoding). Returns the new adapter and each module's fit. Non-finite factors, or a
    ΔW too large for the records' :data:`DTYPE` (in which they decode), are refused before any fit
    (:func:`~adapterpack.linalg.finite.check_product`, the rule rerank and bank fits follow).
    """
    if (k is None) == (target_error is None):
        raise ConversionError("give exactly one of k (coefficients per factor) or target_error (relative Frobenius error)")
    if k is not None and k < 0:
        raise ConversionError(f"k must be >= 0, got {k}")
    if target_error is not None and not (0.0 <= target_error < 1.0):
        raise ConversionError(f"target_error must be in [0, 1), got {target_error}")
    fits: dict[str, NolaFit] = {}
    modules: dict[str, Module] = {}
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    with progress.task("nola fit", total=len(adapter.modules), unit="modules") as bar:
        for index, (mname, m) in enumerate(adapter.modules.items()):
            if m.params.get("dora", False):
                raise ConversionError(f"module {mname!r} is DoRA: its magnitude rescaling has no nola form; keep it as lora")
            f = m.factors()
            check_product(f.A, f.B, f.scale, where=f"adapter {adapter.name!r} module {mname!r}", dtype=DTYPE)
            stream = 0 if shared_basis else index
            r = int(rank or f.rank or 1)
            kw = {"name": mname, "rank": r, "seed": seed, "stream": stream, "iterations": iterations}
            if k is not None:
                fit = fit_nola(f, k_A=k, k_B=k, **kw)
            else:
                limit = k_max or r * max(f.A.shape[1], f.B.shape[0])
                limit = max(1, min(limit, FIT_MEMORY // (8 * r * (f.A.shape[1] + f.B.shape[0]))))  # bases must fit in memory
                kk = min(16, limit)
                while True:
                    fit = fit_nola(f, k_A=kk, k_B=kk, **kw)
                    if fit.error <= target_error or kk >= limit:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        fit.stopped = True
                        break
                    kk = min(2 * kk, limit)
            fits[mname] = fit
            modules[mname] = fit.module
            bar.advance(note=f"{mname}: k {fit.module.params['k_A']}, error {fit.error:.3g}")
    return adapter.derived(modules), fits
