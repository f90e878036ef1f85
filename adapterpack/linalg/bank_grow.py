"""Adding an adapter to fitted shared bases: project, measure the exact error, grow the bases if needed.

Full form: the new columns are the leading left singular vectors of (I − UUᵀ)·ΔW and the leading
right singular vectors of ΔW·(I − VVᵀ), computed through QR of the factors (never forming ΔW);
with as many columns as the adapter's rank the grown bases contain ΔW's row and column spaces, so
the error can always be brought to ~0. Diagonal form: the new (u, v) pairs are the leading singular
pairs of the residual ΔW − U·diag(σ)·Vᵀ, then σ is re-solved. The old columns are kept bit-exact, so
old members' Σ padded with zeros reconstruct exactly what they did before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapterpack.factors import Factors
from adapterpack.linalg.bank_fit import _f64, diag_sigma, project, sq_error, sq_norm


def _lowrank_svd(B: np.ndarray, A: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U [m,k], S [k], Vt [k,n]) of s·B·A via QR of B and Aᵀ and an SVD of the small core."""
    qb, rb = np.linalg.qr(B)
    qa, ra = np.linalg.qr(A.T)
    uc, sv, vct = np.linalg.svd(s * (rb @ ra.T), full_matrices=False)
    return qb @ uc, sv, vct @ qa.T


def _extend(U: np.ndarray, new: np.ndarray) -> np.ndarray:
    """[U, new'] with new' orthonormalized against U (twice, for float safety) and itself."""
    for _ in range(2):
        new = new - U @ (U.T @ new)
    q, _ = np.linalg.qr(new)
    return np.hstack([U, q])


@dataclass
class Placement:
    """How a new adapter lands on a module's bases: its S, the exact relative error, columns added."""

    S: np.ndarray
    rel_error: float
    added: int
    U: np.ndarray
    V: np.ndarray


def place(f: Factors, U: np.ndarray, V: np.ndarray, form: str, threshold: float | None) -> Placement:
    """Project ``f`` onto (U, V); when its relative squared error exceeds ``threshold`` (None: never
    grow), add the fewest residual directions that bring it to ``threshold`` or below, up to min(out, in)
    columns in all (full form) or out·in (diagonal: rank-one terms spanning every out×in matrix)."""
    norm2 = sq_norm(f)

    def solve(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float]:
        S = project(f, u, v) if form == "full" else diag_sigma(f, u, v, (u.T @ u) * (v.T @ v))[0]
        return S, (sq_error(f, u, v, S, norm2) / norm2 if norm2 > 0 else 0.0)

    S, err = solve(U, V)
    # full form: orthonormal bases have at most min(out, in) columns (past that, new columns cannot be orthonormal
    # and the projection Uᵀ·ΔW·V double-counts); min(out, in) columns on both sides already hold any ΔW
    room = min(U.shape[0], V.shape[0]) - U.shape[1] if form == "full" else U.shape[0] * V.shape[0] - U.shape[1]
    if threshold is None or err <= threshold or norm2 == 0.0 or room <= 0:
        return Placement(S, err, 0, U, V)
    a, b, s = _f64(f)
    if form == "full":
        left, _, _ = _lowrank_svd(b - U @ (U.T @ b), a, s)
        _, _, right_t = _lowrank_svd(b, a - (a @ V) @ V.T, s)
        cand_u, cand_v = left, right_t.T
    else:
        bs = np.hstack([s * b, -(U * S[None, :])])
        as_ = np.vstack([a, V.T])
        cand_u, _, vt = _lowrank_svd(bs, as_, 1.0)
        cand_v = vt.T
    best = None
    for k in range(1, min(cand_u.shape[1], room) + 1):
        if form == "full":
            u2, v2 = _extend(U, cand_u[:, :k]), _extend(V, cand_v[:, :k])
        else:
            u2, v2 = np.hstack([U, cand_u[:, :k]]), np.hstack([V, cand_v[:, :k]])
        S2, e2 = solve(u2, v2)
        best = Placement(S2, e2, k, u2, v2)
        if e2 <= threshold:
            break
    assert best is not None
    return best


def pad(S: np.ndarray, rank: int) -> np.ndarray:
    """An old member's S padded with zeros to ``rank`` (same dtype): U'·S'·V'ᵀ equals U·S·Vᵀ exactly."""
    if S.ndim == 1:
        out = np.zeros((rank,), S.dtype)
        out[: S.shape[0]] = S
    else:
        out = np.zeros((rank, rank), S.dtype)
        out[: S.shape[0], : S.shape[1]] = S
    return out
