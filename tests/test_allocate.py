"""Rank allocation: the exact knapsack DP against brute force, greedy against the DP, rounding rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from adapterpack.errors import ConversionError
from adapterpack.linalg import allocate
from adapterpack.linalg.allocate import Item, budget_dp, budget_greedy, choices_for, round_rank, total_cost, total_value


def _items(rng: np.random.Generator, n: int, k: int = 5) -> list[Item]:
    out = []
    for i in range(n):
        s = np.sort(rng.gamma(0.6, size=k))[::-1] * rng.uniform(0.1, 10)  # decaying, different scales per module
        cost = int(rng.choice([96, 160, 224, 352]))  # different bytes per rank, so greedy can miss
        out.append(Item(f"m{i}", s**2, cost, choices_for(k, min_rank=1)))
    return out


def brute_force(items: list[Item], budget: int, weighting: str) -> float:
    best = -np.inf
    for ranks in itertools.product(*(it.choices for it in items)):
        pick = {it.name: r for it, r in zip(items, ranks)}
        if total_cost(items, pick) <= budget:
            best = max(best, total_value(items, pick, weighting))
    return best


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("weighting", ["absolute", "relative"])
def test_dp_is_optimal_and_greedy_never_beats_it(seed: int, weighting: str) -> None:
    rng = np.random.default_rng(seed)
    items = _items(rng, 4)
    lo, hi = allocate.min_cost(items), sum(it.choices[-1] * it.cost_per_rank for it in items)
    for budget in np.linspace(lo, hi, 7).astype(int):
        dp = budget_dp(items, int(budget), weighting)
        greedy = budget_greedy(items, int(budget), weighting)
        assert total_cost(items, dp) <= budget and total_cost(items, greedy) <= budget
        want = brute_force(items, int(budget), weighting)
        assert total_value(items, dp, weighting) == pytest.approx(want, rel=1e-12)
        assert total_value(items, greedy, weighting) <= want * (1 + 1e-12)


def test_greedy_is_suboptimal_somewhere() -> None:
    """Why the DP ships: with different bytes per rank, greedy on energy per byte loses sometimes."""
    gaps = []
    for seed in range(40):
        items = _items(np.random.default_rng(seed), 4)
        budget = (allocate.min_cost(items) + sum(it.choices[-1] * it.cost_per_rank for it in items)) // 2
        gaps.append(total_value(items, budget_dp(items, budget)) - total_value(items, budget_greedy(items, budget)))
    assert min(gaps) >= -1e-9 and max(gaps) > 0


def test_coarse_units_still_respect_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocate, "MAX_STATES", 64)  # force rounding of costs to a coarse unit
    items = _items(np.random.default_rng(3), 5)
    budget = 3001
    got = budget_dp(items, budget)
    assert total_cost(items, got) <= budget
    assert total_value(items, got) <= brute_force(items, budget, "absolute") + 1e-12


def test_budget_below_the_minimum_names_it() -> None:
    items = [Item("a", np.array([4.0, 1.0]), 100, (1, 2)), Item("b", np.array([2.0]), 50, (1,))]
    with pytest.raises(ConversionError, match=r"budget 149 B is below 150 B"):
        budget_dp(items, 149)
    with pytest.raises(ConversionError, match="weighting"):
        budget_dp(items, 500, "loudest")
    assert budget_dp(items, 150) == {"a": 1, "b": 1} and budget_dp(items, 250) == {"a": 2, "b": 1}


def test_choices_and_rounding() -> None:
    assert choices_for(8) == tuple(range(9))
    assert choices_for(8, min_rank=2, max_rank=5) == (2, 3, 4, 5)
    assert choices_for(5, min_rank=1, allowed=(1, 8, 16)) == (1, 8)  # 8 > k: zero padding is a choice
    assert choices_for(0, min_rank=1) == (0,)  # a zero module stays rank 0
    assert [round_rank(r, (1, 8, 16, 32), "up") for r in (0, 1, 2, 9, 40)] == [0, 1, 8, 16, 32]
    assert [round_rank(r, (1, 8, 16, 32), "down") for r in (0, 1, 2, 9, 40)] == [0, 1, 1, 8, 32]
    assert allocate.rank_for_sv_ratio(np.array([8.0, 4.0, 2.0, 1.0]), 4) == 3
    assert allocate.rank_for_sv_ratio(np.zeros(3), 4) == 0


# --- balanced: −‖E‖^1.5 within a floor at ¾ of the uniform rank ------------------------------------


def _uniform_rank_by_scan(items: list[Item], budget: int) -> int:
    """The definition, scanned: the largest r whose 'largest choice ≤ r' per module fits."""
    best = 0
    for r in range(0, max(it.choices[-1] for it in items) + 1):
        cost = 0
        for it in items:
            below = [c for c in it.choices if c <= r]
            cost += (below[-1] if below else it.choices[0]) * it.cost_per_rank
        if cost <= budget:
            best = r
    return best


@pytest.mark.parametrize("seed", range(12))
def test_balanced_dp_is_optimal_within_its_floor(seed: int) -> None:
    rng = np.random.default_rng(seed)
    items = _items(rng, 4, k=6)
    lo, hi = allocate.min_cost(items), sum(it.choices[-1] * it.cost_per_rank for it in items)
    for budget in np.linspace(lo, hi, 7).astype(int):
        budget = int(budget)
        r = _uniform_rank_by_scan(items, budget)
        assert allocate.uniform_rank(items, budget) == r
        floor = -(-3 * r // 4)  # ⌈¾·r⌉ in integers
        best = -np.inf
        for ranks in itertools.product(*(it.choices for it in items)):
            pick = {it.name: x for it, x in zip(items, ranks)}
            if all(x >= min(floor, it.choices[-1]) for it, x in zip(items, ranks)) and total_cost(items, pick) <= budget:
                best = max(best, total_value(items, pick, "balanced"))
        dp = budget_dp(items, budget, "balanced")
        greedy = budget_greedy(items, budget, "balanced")
        for got in (dp, greedy):
            assert total_cost(items, got) <= budget
            assert all(got[it.name] >= min(floor, it.choices[-1]) for it in items)
        assert total_value(items, dp, "balanced") == pytest.approx(best, rel=1e-12)
        assert total_value(items, greedy, "balanced") <= best + 1e-12


def test_balanced_value_is_the_error_norm_to_the_1_5() -> None:
    """−‖ΔW − ΔW_j‖_F^1.5 against a dense float64 SVD truncation of a real ΔW (bundled example)."""
    import adapterpack
    from adapterpack.examples import example_path

    with adapterpack.open(example_path()) as ad:
        m = next(iter(ad))
        dw = np.asarray(m.delta(), np.float64)
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    it = Item(m.name, s[s > 0] ** 2, 1, choices_for(int(np.count_nonzero(s > 0))))
    for j in range(0, 9):
        err = np.linalg.norm(dw - (u[:, :j] * s[:j]) @ vt[:j])
        assert it.value(j, "balanced") == pytest.approx(-(err**1.5), rel=1e-9, abs=1e-12)


def test_balanced_on_a_real_adapter_never_cuts_below_its_floor_and_beats_uniform_on_its_objective() -> None:
    """Bundled example at the bytes of uniform rank 4: floor 3 everywhere, Σ‖E‖^1.5 no worse than uniform's."""
    import adapterpack
    from adapterpack.examples import example_path
    from adapterpack.ops.rerank import spectrum_with_factors

    items = []
    with adapterpack.open(example_path()) as ad:
        for m in ad:
            sp, f = spectrum_with_factors(m)
            k = int(np.count_nonzero(sp.S > 0))
            items.append(Item(m.name, sp.S[:k] ** 2, (f.A.shape[1] + f.B.shape[0]) * 4, choices_for(k, min_rank=1)))
    uniform = {it.name: min(4, it.choices[-1]) for it in items}
    budget = total_cost(items, uniform)
    assert allocate.uniform_rank(items, budget) == 4
    got = budget_dp(items, budget, "balanced")
    assert total_cost(items, got) <= budget
    assert min(got.values()) == 3 and got != uniform
    assert total_value(items, got, "balanced") > total_value(items, uniform, "balanced")


def test_coarse_units_keep_the_minimum_feasible_and_never_lose_to_greedy() -> None:
    """Budgets above 2**18 units round costs: the bytes above each module's smallest choice are what get
    rounded, so a budget of exactly the minimum (or balanced's floor) is feasible, and the DP's answer is
    never worse than greedy's (review: large SD-sized budgets)."""
    e = np.array([4.0, 2.0, 1.0, 0.5])
    floor_only = [Item("a", e, 1_000_003, (1, 2)), Item("b", e, 1_000_033, (1, 2))]
    low = allocate.min_cost(floor_only)
    assert budget_dp(floor_only, low, "absolute") == {"a": 1, "b": 1}
    wide = [Item("a", e, 1_000_003, choices_for(4)), Item("b", e, 1_000_033, choices_for(4))]
    assert budget_dp(wide, 2_000_036, "balanced") == {"a": 1, "b": 1}
    full = 4 * (1_000_003 + 1_000_033)  # rank 4 everywhere fits exactly
    for w in ("absolute", "balanced"):
        got = budget_dp(wide, full, w)
        assert got == {"a": 4, "b": 4} and total_cost(wide, got) <= full
