"""The exact SVD of a low-rank product ``s·B·A`` without forming it (O((m+n)·r²), float64).

``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR), so ``s·B·A = Q_b (s·R_b R_aᵀ) Q_aᵀ``; the SVD of
the r×r core ``s·R_b R_aᵀ = U_c Σ V_cᵀ`` gives ``U = Q_b U_c`` and ``Vᵀ = V_cᵀ Q_aᵀ``. Only the
core is decomposed, so a 4096×4096 rank-16 product costs milliseconds instead of the seconds a
dense SVD takes. Everything is computed in binary64, whatever the factors' dtype: singular values
agree with a dense float64 SVD of ΔW to ~1e-15 relative to σ₁ (tests check against ``np.linalg.svd``).

Q_b and Q_a are never formed: the singular vectors of a rank-j truncation are ``X·R⁻¹·c`` for the
first j columns c of U_c (O(m·r·j)), checked orthonormal, else products of LAPACK's Householder
reflectors with c (see :class:`_ThinQ`). Choosing ranks needs only S, so re-ranking r=64 to 8 pays for 8
vectors, not 64 (forming Q as ``np.linalg.qr`` does was two thirds of a re-rank's time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adapterpack.errors import ConversionError
from adapterpack.linalg.finite import check_product

Vectors = Callable[[int], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Spectrum:
    """ΔW = U · diag(S) · Vt of an m×n matrix, singular values descending (k = min(r, m, n), zeros
    kept); the singular vectors of any leading rank come from :meth:`vectors` on demand."""

    S: np.ndarray  # [k] descending, >= 0
    shape: tuple[int, int]  # (m, n) of ΔW
    _vectors: Vectors | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_vectors(cls, U: np.ndarray, S: np.ndarray, Vt: np.ndarray) -> Spectrum:
        """A spectrum whose vectors are already known (an svd record's, or a dense SVD's)."""
        return cls(S=S, shape=(int(U.shape[0]), int(Vt.shape[1])), _vectors=lambda j: (U[:, :j], Vt[:j]))

    @classmethod
    def values_only(cls, S: np.ndarray, shape: tuple[int, int]) -> Spectrum:
        """Singular values without vectors (``vectors`` raises): enough for every rank rule."""
        return cls(S=S, shape=(int(shape[0]), int(shape[1])))

    def vectors(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(U [m, j], Vt [j, n])`` of the leading ``j = min(rank, k)`` triplets (all k by default)."""
        if self._vectors is None:
            raise ConversionError("this spectrum holds singular values only, not vectors")
        k = int(self.S.size)
        return self._vectors(k if rank is None else max(0, min(int(rank), k)))

    @property
    def U(self) -> np.ndarray:
        """All k left singular vectors ``[m, k]`` (prefer :meth:`vectors` with the rank you keep)."""
        return self.vectors()[0]

    @property
    def Vt(self) -> np.ndarray:
        """All k right singular vectors ``[k, n]``."""
        return self.vectors()[1]

    @property
    def energy(self) -> float:
        """‖ΔW‖²_F = Σ σᵢ²."""
        return float(np.sum(self.S**2))

    def retained(self, rank: int) -> float:
        """Σ_{i<rank} σᵢ²: the energy the rank-``rank`` truncation keeps (Eckart–Young: the most any rank-``rank`` matrix can)."""
        return float(np.sum(self.S[:rank] ** 2))

    def rel_error(self, rank: int) -> float:
        """‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F (0 for a zero matrix)."""
        total = self.energy
        if total == 0.0:
            return 0.0
        return float(np.sqrt(max(total - self.retained(rank), 0.0) / total))

    def numerical_rank(self, rtol: float | None = None) -> int:
        """Singular values above ``rtol·σ₁`` (default: k·eps64, numpy's matrix_rank rule); 0 for a zero matrix."""
        if self.S.size == 0 or self.S[0] == 0.0:
            return 0
        tol = (rtol if rtol is not None else max(self.shape) * np.finfo(np.float64).eps) * self.S[0]
        return int(np.count_nonzero(self.S > tol))

    def rank_for_energy(self, fraction: float) -> int:
        """Smallest rank whose truncation keeps at least ``fraction`` of ‖ΔW‖² (0 for a zero matrix)."""
        total = self.energy
        if total == 0.0:
            return 0
        cum = np.cumsum(self.S**2)
        # exact comparison on the cumulative sum; the tolerance absorbs rounding of fraction·total at 1.0
        need = fraction * total * (1.0 - 4 * np.finfo(np.float64).eps)
        return int(min(np.searchsorted(cum, need, side="left") + 1, self.S.size))


class _ThinQ:
    """The thin QR ``X = Q R`` of an [m, r] matrix (any float dtype, computed in binary64); Q is never formed.

    ``np.linalg.qr(mode="raw")`` is LAPACK's geqrf (given X in Fortran order, which halves its time
    against numpy's C-order copy): R, plus Q as Householder reflectors. ``Q @ c`` then has two
    routes:

    - fast: ``X @ (R⁻¹ c)``, one r×r solve and one m×r×j product. For a full-rank X its columns
      lose orthogonality only by about ε·κ(X) (Householder's R), and trained LoRA factors are well
      conditioned (κ(B) ≤ 178, κ(Aᵀ) ≤ 5 on the real r=64 adapter: ``tools/bench/bench_lowrank.py``), so
      the result is checked:
      ``‖(Qc)ᵀ(Qc) − cᵀc‖_max ≤ ORTHO_TOL·max‖c_i‖²`` or it is thrown away (X·R⁻¹ = Q·T with T
      upper triangular, so an orthonormal result also means T ≈ I: the check bounds the error too);
    - exact whatever X's condition (the fallback, and the only route when m < r or R is
      singular): the reflectors' product ``Q = I − V T Vᵀ`` with ``T⁻¹ = striu(VᵀV) + diag(1/τ)``
      (the compact WY / UT form; ``τ_i = 2/‖v_i‖²``). A reflector with ``τ_i = 0`` is the identity
      (geqrf returns one for an exactly zero column below the diagonal, e.g. an untrained zero B,
      and for the last column when m ≤ r): its ``v_i`` is zeroed and ``τ_i`` set to 1, which leaves
      the identity and keeps T invertible.
    """

    ORTHO_TOL = 1e-14

    def __init__(self, x: np.ndarray) -> None:
        """``x``: [m, r], any float dtype. Only R (r×r) and ``x`` in its own dtype are kept, not the
        binary64 copies the QR works on: a spectrum per module stays alive until a re-rank has
        chosen every rank, and holding those was 4× the adapter's float32 size in memory. ``x`` is
        copied unless it is read-only (a mapped file's view), so a caller changing its array later
        cannot change the vectors."""
        m, r = x.shape
        self.m, self.p = m, min(m, r)
        self._x = x.copy() if x.flags.writeable else x
        if self.p == 0:
            self.R = np.zeros((0, r))
            return
        h, _ = self._geqrf()
        self.R = np.triu(h[:, : self.p].T)  # [p, r]

    def _geqrf(self) -> tuple[np.ndarray, np.ndarray]:
        # h: geqrf's [m, r] output, transposed; Fortran order halves geqrf's time against numpy's C-order copy
        return np.linalg.qr(np.asarray(self._x, dtype=np.float64, order="F"), mode="raw")

    def times(self, c: np.ndarray) -> np.ndarray:
        """``Q @ c`` for ``c`` [p, j]: [m, j], without forming Q."""
        if c.shape[1] == 0 or self.p == 0:
            return np.zeros((self.m, c.shape[1]))
        if self.p == self.R.shape[1]:  # square R: try X R⁻¹ c
            with np.errstate(all="ignore"):
                try:
                    out = np.asarray(self._x, dtype=np.float64) @ np.linalg.solve(self.R, c)
                except np.linalg.LinAlgError:  # exactly singular R
                    out = None
                if out is not None:
                    cc = c.T @ c
                    if np.all(np.abs(out.T @ out - cc) <= self.ORTHO_TOL * np.max(np.diagonal(cc))):
                        return out
        return self._reflected(c)

    def _reflected(self, c: np.ndarray) -> np.ndarray:
        h, tau = self._geqrf()  # the rare route: the reflectors are recomputed rather than kept
        v = np.tril(h.T[:, : self.p], -1)
        v[np.arange(self.p), np.arange(self.p)] = 1.0
        identity = tau == 0.0
        v[:, identity] = 0.0
        t_inv = np.triu(v.T @ v, 1) + np.diag(1.0 / np.where(identity, 1.0, tau))
        out = np.zeros((self.m, c.shape[1]))
        out[: self.p] = c
        out -= v @ np.linalg.solve(t_inv, v[: self.p].T @ c)
        return out


def factors_svd(A: np.ndarray, B: np.ndarray, scale: float = 1.0, *, where: str = "module") -> Spectrum:
    """Exact thin SVD of ``scale · B · A`` (A ``[r, n]``, B ``[m, r]``, any float dtype) in binary64.

    Never forms the m×n product. Zero and rank-deficient factors are fine (their singular values
    are 0); non-finite values, or a product too large for binary64, raise
    :class:`~adapterpack.errors.ConversionError` naming ``where`` (:func:`~adapterpack.linalg.finite.check_product`).
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ConversionError(f"{where}: factors A {list(A.shape)} and B {list(B.shape)} do not multiply")
    check_product(A, B, scale, where=where)
    qb = _ThinQ(B)  # R: [p, r]   p = min(m, r)
    qa = _ThinQ(A.T)  # R: [q, r]  q = min(n, r)
    core = float(scale) * (qb.R @ qa.R.T)  # [p, q]
    uc, s, vct = np.linalg.svd(core, full_matrices=False)

    def vectors(j: int) -> tuple[np.ndarray, np.ndarray]:
        return qb.times(uc[:, :j]), qa.times(vct[:j].T).T

    return Spectrum(S=s, shape=(int(B.shape[0]), int(A.shape[1])), _vectors=vectors)


def spectrum_of(factors: object, *, where: str = "module") -> Spectrum:
    """:func:`factors_svd` of a :class:`~adapterpack.encodings.Factors` (its 2-D ``scale·B·A``)."""
    f = factors
    return factors_svd(f.A, f.B, f.scale, where=where)  # type: ignore[attr-defined]
