"""Choosing ranks: per-module rules and a global byte budget (pure numpy, no I/O).

The budget problem: module i kept at rank j costs ``j·c_i`` bytes and has value ``v_i(j)``: the
energy it keeps (``absolute``: ``Σ_{l<j} σ_l²``; ``relative``: that divided by ‖ΔW_i‖²) or, with
``balanced``, minus its truncation error ``‖ΔW_i − ΔW_i,j‖_F^1.5`` with every module held at or
above ¾ of the uniform rank the budget affords (see :func:`balanced_floor` for why). Pick one rank
per module to maximise ``Σ v_i`` within the budget: a multiple-choice knapsack. Greedy on energy per byte is
optimal only up to the last step when modules cost different bytes per rank, so :func:`budget_dp`
solves it exactly by dynamic programming over bytes in units of the gcd of the per-rank costs
(≤ 2¹⁸ states; beyond that, coarser units with the bytes above each module's smallest choice
rounded up, so the budget still holds, and the greedy answer whenever it is better).
:func:`budget_greedy` is kept for comparison; tests check both against brute force.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from adapterpack.errors import ConversionError

#: DP states above which costs are rounded up to a coarser unit (memory: items × states bytes).
MAX_STATES = 1 << 18
WEIGHTINGS = ("absolute", "relative", "balanced")
#: ``balanced``: the exponent of the error norm it minimises, and the fraction of the uniform rank it keeps as a floor.
BALANCED_EXPONENT = 1.5
BALANCED_FLOOR = 0.75


@dataclass(frozen=True)
class Item:
    """One module in a budget: what keeping each component is worth (σ², descending; or, with measured
    importance, each component's share of the KL its cut costs), bytes per kept rank, and the ranks it may take."""

    name: str
    energies: np.ndarray
    cost_per_rank: int
    choices: tuple[int, ...]

    def value(self, rank: int, weighting: str = "absolute") -> float:
        """Value a rank-``rank`` truncation keeps, Σ of the first ``rank`` entries (energy, or KL with
        importance; ranks beyond the spectrum are zero padding); for ``balanced``, −(Σ of the rest)^0.75
        (without importance: −‖ΔW − ΔW_rank‖_F^1.5, the error left)."""
        if weighting == "balanced":
            left = max(float(np.sum(self.energies[rank:])), 0.0)  # importance values may round below 0
            return -(left ** (BALANCED_EXPONENT / 2))
        kept = float(np.sum(self.energies[:rank]))
        if weighting == "relative":
            total = float(np.sum(self.energies))
            return kept / total if total > 0 else 0.0
        return kept


def choices_for(
    k: int, *, min_rank: int = 0, max_rank: int | None = None, allowed: tuple[int, ...] | None = None
) -> tuple[int, ...]:
    """Ranks a module with ``k`` singular values may take: ``min_rank..min(k, max_rank)``, or the
    ``allowed`` ranks in that window plus, when ``allowed`` asks for more than k, the smallest allowed
    rank at or above k (zero padding)."""
    hi = k if max_rank is None else min(k, max_rank)
    lo = min(min_rank, hi)
    if allowed is None:
        return tuple(range(lo, hi + 1))
    cap = max_rank if max_rank is not None else max(allowed)
    picks = sorted({a for a in allowed if lo <= a <= hi})
    above = [a for a in sorted(allowed) if a >= k and a <= cap and a >= min_rank]
    if above and (not picks or picks[-1] < k):
        picks.append(above[0])
    if not picks:
        fallback = [a for a in sorted(allowed) if a <= cap]
        picks = [fallback[-1] if fallback else min(allowed)]
    return tuple(sorted(set(picks)))


def min_cost(items: list[Item]) -> int:
    """Bytes of every module at its smallest allowed rank."""
    return sum(it.choices[0] * it.cost_per_rank for it in items)


def _check_budget(items: list[Item], budget: int, weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ConversionError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    least = min_cost(items)
    if budget < least:
        raise ConversionError(f"budget {budget:,} B is below {least:,} B, what the smallest allowed rank of every module costs")


def _at_most(it: Item, rank: int) -> int:
    """The choice of ``it`` that uniform rank ``rank`` gives it: its largest choice ≤ rank (its smallest if none)."""
    below = [c for c in it.choices if c <= rank]
    return below[-1] if below else it.choices[0]


def uniform_rank(items: list[Item], budget: int) -> int:
    """The largest rank r such that every module at :func:`_at_most` r (its largest allowed rank ≤ r)
    fits ``budget`` bytes; 0 when even the smallest choices only just fit or do not."""
    top = max((it.choices[-1] for it in items), default=0)
    lo, hi = 0, top  # cost is monotone in r: bisect for the last r that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(_at_most(it, mid) * it.cost_per_rank for it in items) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def balanced_floor(items: list[Item], budget: int) -> list[Item]:
    """``items`` with the ranks below ⌈¾·r⌉ removed from their choices, r = :func:`uniform_rank`.

    Why (measured on SmolLM2-135M adapters, BENCHMARKS.md): KL(full‖re-ranked) is not additive
    over modules (cutting all seven module types at once costs ~3× the sum of cutting each type
    alone: the errors add coherently) and some modules matter far more per unit of ‖ΔW‖² than
    their spectra say (v_proj: ~6× q_proj per unit energy). A budget that maximises kept energy
    (absolute or relative) starves exactly those steep-spectrum modules and loses to uniform rank;
    minimising Σ‖E_i‖^1.5 (between the coherent Σ‖E_i‖ and the independent Σ‖E_i‖²) within a floor
    at ¾ of the uniform rank moves bytes where the spectra gain most without starving any module.
    The floor's ranks fit the budget (they cost no more than uniform r), so the DP stays feasible.
    """
    floor = math.ceil(BALANCED_FLOOR * uniform_rank(items, budget))
    out = []
    for it in items:
        lo = _at_most(it, floor)
        out.append(Item(it.name, it.energies, it.cost_per_rank, tuple(c for c in it.choices if c >= lo)))
    return out


def budget_dp(items: list[Item], budget: int, weighting: str = "absolute") -> dict[str, int]:
    """Exact multiple-choice knapsack: the ranks with the most value within ``budget`` bytes (for
    ``balanced``: exact over the choices at or above :func:`balanced_floor`'s floor)."""
    _check_budget(items, budget, weighting)
    if not items:
        return {}
    if weighting == "balanced":
        items = balanced_floor(items, budget)
    # the DP runs on bytes ABOVE every module's smallest choice, which are paid exactly: rounding the
    # increments up to the unit never makes the smallest choices (or balanced's floor) infeasible
    exact_unit = math.gcd(*(it.cost_per_rank for it in items if it.cost_per_rank > 0)) or 1
    base = min_cost(items)
    spare = budget - base
    if spare < 0:  # _check_budget and balanced_floor rule this out
        raise ConversionError(f"budget {budget:,} B is below {base:,} B, what the smallest allowed ranks cost")
    unit = max(exact_unit, -(-spare // MAX_STATES))
    states = spare // unit + 1
    dp = np.zeros(states)  # best value with cost <= b units, over the items so far
    width = np.uint8 if max(len(it.choices) for it in items) <= 255 else np.uint16
    picks = np.zeros((len(items), states), dtype=width)

    def units(it: Item, rank: int) -> int:  # rounded up: the rounded total never exceeds the budget
        return -(-(rank - it.choices[0]) * it.cost_per_rank // unit)

    for i, it in enumerate(items):
        new = np.full(states, -np.inf)
        for c, rank in enumerate(it.choices):
            w = units(it, rank)
            if w >= states:
                break
            cand = dp[: states - w] + it.value(rank, weighting)
            better = cand > new[w:]
            new[w:][better] = cand[better]
            picks[i, w:][better] = c
        dp = new
    b = states - 1
    if not np.isfinite(dp[b]):  # cannot happen after _check_budget unless rounding bit; say so clearly
        raise ConversionError(f"budget {budget:,} B cannot hold the smallest allowed ranks at {unit} B granularity")
    out: dict[str, int] = {}
    for i in range(len(items) - 1, -1, -1):
        it = items[i]
        rank = it.choices[picks[i, b]]
        out[it.name] = rank
        b -= units(it, rank)
    out = dict(reversed(list(out.items())))
    if unit != exact_unit:  # costs were rounded: the DP is near-optimal only; never return less than greedy
        greedy = budget_greedy(items, budget, weighting)
        if sum(it.value(greedy[it.name], weighting) for it in items) > sum(it.value(out[it.name], weighting) for it in items):
            return greedy
    return out


def budget_greedy(items: list[Item], budget: int, weighting: str = "absolute") -> dict[str, int]:
    """Greedy on energy per byte: repeatedly take the step to a module's next allowed rank with the
    highest gain per byte that still fits. Optimal up to the last step (fractional knapsack bound)
    for concave values (absolute, relative); ``balanced`` starts from :func:`balanced_floor`'s floor,
    and its values are not concave (a flat spectrum's steps gain more and more), so there greedy is a
    heuristic only: use the DP."""
    _check_budget(items, budget, weighting)
    if weighting == "balanced":
        items = balanced_floor(items, budget)
    state = {it.name: 0 for it in items}  # index into choices
    spent = min_cost(items)
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        it = items[i]
        c = state[it.name]
        if c + 1 < len(it.choices):
            a, b = it.choices[c], it.choices[c + 1]
            gain = it.value(b, weighting) - it.value(a, weighting)
            heapq.heappush(heap, (-gain / ((b - a) * it.cost_per_rank or 1), i))

    for i in range(len(items)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        it = items[i]
        c = state[it.name]
        extra = (it.choices[c + 1] - it.choices[c]) * it.cost_per_rank
        if spent + extra <= budget:
            spent += extra
            state[it.name] = c + 1
            push(i)
    return {it.name: it.choices[state[it.name]] for it in items}


def total_value(items: list[Item], ranks: dict[str, int], weighting: str = "absolute") -> float:
    """Σ v_i(rank_i) of a choice of ranks."""
    return sum(it.value(ranks[it.name], weighting) for it in items)


def total_cost(items: list[Item], ranks: dict[str, int]) -> int:
    """Bytes of a choice of ranks."""
    return sum(ranks[it.name] * it.cost_per_rank for it in items)


def rank_for_sv_ratio(singular_values: np.ndarray, ratio: float) -> int:
    """How many singular values are at least σ₁/ratio (0 for a zero matrix)."""
    if singular_values.size == 0 or singular_values[0] <= 0:
        return 0
    return int(np.count_nonzero(singular_values >= singular_values[0] / ratio))


def round_rank(rank: int, allowed: tuple[int, ...], mode: str) -> int:
    """``rank`` moved into ``allowed``: ``up`` to the smallest allowed ≥ rank (the largest allowed if
    none), ``down`` to the largest allowed ≤ rank (the smallest allowed if none). 0 stays 0."""
    if rank == 0:
        return 0
    ordered = sorted(allowed)
    if mode == "up":
        above = [a for a in ordered if a >= rank]
        return above[0] if above else ordered[-1]
    below = [a for a in ordered if a <= rank]
    return below[-1] if below else ordered[0]


#: ``choice_dp``: element operations (choices × states) it may spend; more choices mean coarser byte units.
CHOICE_WORK = 2_000_000_000


def choice_dp(
    costs: list[np.ndarray], values: list[np.ndarray], budget: int, *, max_states: int = MAX_STATES, work: int = CHOICE_WORK
) -> list[int]:
    """Exact multiple-choice knapsack over arbitrary choices: for each group g pick one index into
    ``costs[g]`` (int bytes) / ``values[g]`` so that Σ cost ≤ ``budget`` and Σ value is largest.

    Bytes above every group's cheapest choice are counted in units of their gcd (exact) or, beyond
    ``max_states`` states (or ``work`` element operations over all choices), in a coarser unit with
    each increment rounded up (the budget still holds; then the answer of :func:`choice_greedy` is
    taken instead whenever it is better)."""
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    values = [np.asarray(v, dtype=np.float64) for v in values]
    if any(c.size == 0 or c.shape != v.shape for c, v in zip(costs, values)):
        raise ConversionError("every group needs at least one choice, with one value per cost")
    if not costs:
        return []
    base = sum(int(c.min()) for c in costs)
    if budget < base:
        raise ConversionError(f"budget {budget:,} B is below {base:,} B, what the smallest choices cost")
    spare = budget - base
    incs = [c - c.min() for c in costs]
    exact_unit = math.gcd(*(int(x) for inc in incs for x in np.unique(inc) if x > 0)) or 1
    limit = max(1024, min(max_states, work // max(1, sum(c.size for c in costs))))
    unit = max(exact_unit, -(-spare // limit))
    states = spare // unit + 1
    dp = np.zeros(states)
    width = np.uint8 if max(c.size for c in costs) <= 255 else np.uint16
    picks = np.zeros((len(costs), states), dtype=width)
    units = [-(-inc // unit) for inc in incs]
    cand = np.empty(states)
    for g in range(len(costs)):
        new = np.full(states, -np.inf)
        for c in np.argsort(units[g], kind="stable"):
            w = int(units[g][c])
            if w >= states:
                break
            m = states - w
            np.add(dp[:m], values[g][c], out=cand[:m])
            better = cand[:m] > new[w:]
            new[w:][better] = cand[:m][better]
            picks[g, w:][better] = c
        dp = new
    b = states - 1
    if not np.isfinite(dp[b]):
        raise ConversionError(f"budget {budget:,} B cannot hold the smallest choices at {unit} B granularity")
    out = [0] * len(costs)
    for g in range(len(costs) - 1, -1, -1):
        c = int(picks[g, b])
        out[g] = c
        b -= int(units[g][c])
    if unit != exact_unit:
        greedy = choice_greedy(costs, values, budget)
        if sum(v[i] for v, i in zip(values, greedy)) > sum(v[i] for v, i in zip(values, out)):
            return greedy
    return out


def choice_greedy(costs: list[np.ndarray], values: list[np.ndarray], budget: int) -> list[int]:
    """Greedy over choices sorted by cost: repeatedly take the move to a costlier choice of one group with
    the best value gain per byte that fits (optimal up to the last step when each group's choices
    are a convex hull; a heuristic otherwise)."""
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    values = [np.asarray(v, dtype=np.float64) for v in values]
    orders = [np.argsort(c, kind="stable") for c in costs]
    pos = [0] * len(costs)
    spent = sum(int(c[o[0]]) for c, o in zip(costs, orders))
    if spent > budget:
        raise ConversionError(f"budget {budget:,} B is below {spent:,} B, what the smallest choices cost")
    heap: list[tuple[float, int, int, int]] = []
    version = [0] * len(costs)  # a group's entries from before its last move are stale

    def push(g: int) -> None:
        o = orders[g]
        cur = o[pos[g]]
        nxt = o[pos[g] + 1 :]  # the best gain per byte among the costlier choices that still fit
        if nxt.size == 0:
            return
        dx = costs[g][nxt] - costs[g][cur]
        gain = values[g][nxt] - values[g][cur]
        ok = (gain > 0) & (spent + dx <= budget)
        if not ok.any():
            return
        rate = np.where(ok, gain / np.maximum(dx, 1), -np.inf)
        n = int(np.argmax(rate))  # first among equals: the cheapest
        heapq.heappush(heap, (-float(rate[n]), g, pos[g] + 1 + n, version[g]))

    for g in range(len(costs)):
        push(g)
    while heap:
        _, g, n, ver = heapq.heappop(heap)
        if ver != version[g]:
            continue
        extra = int(costs[g][orders[g][n]] - costs[g][orders[g][pos[g]]])
        if spent + extra <= budget:
            spent += extra
            pos[g] = n
        version[g] += 1
        push(g)  # the next move, or (the budget having shrunk since) one that fits now
    return [int(o[p]) for o, p in zip(orders, pos)]
