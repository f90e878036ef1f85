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
