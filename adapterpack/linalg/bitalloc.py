"""Rank × bits per component: each module's choice set, the lower convex hull of (bytes, distortion).

A module with k singular components keeps a prefix of them (rank j; a rank-j read is a prefix) and
stores each kept component l at one of a few widths c (a column of a component table): it costs
``fixed + Σ_{l<j} nbytes[l, c_l]`` bytes and has distortion ``cut(j) + Σ_{l<j} w_l·err[l, c_l]`` (``cut(j)``:
what dropping components j.. costs; ``w_l·err``: what quantizing component l costs, in the same
unit). For a fixed rank the components are independent, so the lower convex hull of all
``len(columns)^j`` widths is the Minkowski sum of the components' own hulls: their hull segments
merged by slope, steepest first (exact, O(S log S) for S segments instead of a DP over bytes). The
module's choice set is the lower hull of the union over ranks, decreasing part only (a choice that
costs more and distorts no less is never worth taking). Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapterpack.errors import ConversionError


@dataclass(frozen=True)
class Choices:
    """A module's choices on its hull: ``nbytes`` ascending, ``dist`` descending, and per choice the
    column (width index) of each kept component (``len(columns[i])`` is its rank)."""

    nbytes: np.ndarray  # int64 [c]
    dist: np.ndarray  # float64 [c]
    columns: tuple[tuple[int, ...], ...]

    def rank(self, i: int) -> int:
        """Rank of choice ``i``."""
        return len(self.columns[i])


def lower_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the vertices of the lower convex hull of points (x, y), x ascending, cut where y
    stops decreasing (the Pareto part: least x first, then each vertex strictly cheaper in y)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((y, x))  # by x, ties by y
    # only points strictly below every cheaper point can be hull vertices of the decreasing part: drop the rest first
    ys = y[order]
    prior = np.concatenate([[np.inf], np.minimum.accumulate(ys)[:-1]])
    order = order[ys < prior]
    hull: list[int] = []
    for i in order:
        if hull and x[hull[-1]] == x[i]:
            continue  # same x, larger y: never on the lower hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> i
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(int(i))
    out = [hull[0]]
    for i in hull[1:]:
        if y[i] < y[out[-1]]:
            out.append(i)
        else:
            break
    return np.asarray(out, dtype=np.int64)


def module_choices(
    nbytes: np.ndarray,
    err: np.ndarray,
    cut: np.ndarray,
    *,
    fixed: int = 0,
    min_rank: int = 0,
    max_rank: int | None = None,
) -> Choices:
    """The hull of a module's rank × width choices.

    ``nbytes`` [k, C] int and ``err`` [k, C] float: bytes and (weighted) distortion of component l at
    column c; ``cut`` [k + 1]: distortion of cutting to rank j (``cut[k]`` usually 0); ``fixed``: bytes
    that do not depend on the choice. Ranks outside ``[min_rank, max_rank]`` are not offered.
    """
    nbytes = np.asarray(nbytes, dtype=np.int64)
    err = np.asarray(err, dtype=np.float64)
    cut = np.asarray(cut, dtype=np.float64)
    if nbytes.ndim != 2 or err.shape != nbytes.shape or cut.shape != (nbytes.shape[0] + 1,):
        raise ConversionError(f"component table shapes disagree: nbytes {nbytes.shape}, err {err.shape}, cut {cut.shape}")
    if not (np.all(np.isfinite(err)) and np.all(np.isfinite(cut))) or np.any(nbytes < 0):
        raise ConversionError("component table: distortions must be finite and bytes >= 0")
    k = nbytes.shape[0]
    hi = k if max_rank is None else min(k, max_rank)
    lo = min(max(min_rank, 0), hi)
    # each component's own hull: its start column and its segments (dx, dy, column reached)
    starts: list[int] = []
    segs: list[tuple[float, int, int, int, float, int]] = []  # (slope, component, segment, dx, dy, column)
    start_x = np.zeros(k + 1, dtype=np.int64)
    start_y = np.zeros(k + 1)
    per_comp: list[list[tuple[float, int, int, int, float, int]]] = []
    for comp in range(k):
        h = lower_hull(nbytes[comp], err[comp])
        starts.append(int(h[0]))
        start_x[comp + 1] = start_x[comp] + nbytes[comp, h[0]]
        start_y[comp + 1] = start_y[comp] + err[comp, h[0]]
        own = []
        for s in range(1, len(h)):
            dx = int(nbytes[comp, h[s]] - nbytes[comp, h[s - 1]])
            dy = float(err[comp, h[s]] - err[comp, h[s - 1]])
            own.append((dy / dx, comp, s, dx, dy, int(h[s])))
        per_comp.append(own)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ranks: list[np.ndarray] = []  # rank j of each candidate
    for own in per_comp[: max(lo - 1, 0)]:  # components below the first rank offered: the loop adds the rest
        segs.extend(own)
    for j in range(lo, hi + 1):
        if j > 0:
            segs.extend(per_comp[j - 1])
        segs.sort(key=_order)  # slopes of one component increase: its segments stay in order
        dx = np.fromiter((t[3] for t in segs), dtype=np.int64, count=len(segs))
        dy = np.fromiter((t[4] for t in segs), dtype=np.float64, count=len(segs))
        xs.append(fixed + start_x[j] + np.concatenate([[0], np.cumsum(dx)]))
        ys.append(cut[j] + start_y[j] + np.concatenate([[0.0], np.cumsum(dy)]))
        ranks.append(np.full(len(segs) + 1, j))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    rank_of = np.concatenate(ranks)
    first = np.concatenate([[0], np.cumsum([a.size for a in xs])])  # index of (j, t = 0)
    picked = lower_hull(x, y)
    columns: list[tuple[int, ...]] = [()] * len(picked)
    by_rank: dict[int, list[tuple[int, int]]] = {}
    for pos, i in enumerate(picked):
        j = int(rank_of[i])
        by_rank.setdefault(j, []).append((int(i - first[j - lo]), pos))
    for j, wanted in by_rank.items():  # replay each needed rank's merged segments once
        run = sorted((seg for own in per_comp[:j] for seg in own), key=_order)
        cols = list(starts[:j])
        taken = 0
        for t, pos in sorted(wanted):
            while taken < t:
                seg = run[taken]
                cols[seg[1]] = seg[5]
                taken += 1
            columns[pos] = tuple(cols)
    return Choices(nbytes=x[picked].astype(np.int64), dist=y[picked].astype(np.float64), columns=tuple(columns))


def _order(seg: tuple[float, int, int, int, float, int]) -> tuple[float, int, int]:
    """Merge order of hull segments: steepest descent first, ties by component then segment."""
    return (seg[0], seg[1], seg[2])


def configuration_cost(
    nbytes: np.ndarray, err: np.ndarray, cut: np.ndarray, columns: tuple[int, ...], fixed: int = 0
) -> tuple[int, float]:
    """(bytes, distortion) of one configuration: kept components' columns, the rest cut (brute-force reference)."""
    j = len(columns)
    b = fixed + sum(int(nbytes[i, c]) for i, c in enumerate(columns))
    d = float(cut[j]) + sum(float(err[i, c]) for i, c in enumerate(columns))
    return b, d
