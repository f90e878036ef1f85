"""RerankPolicy values that are not numbers of the right kind are ConversionErrors (review round), not numpy/Python errors."""

from __future__ import annotations

import numpy as np
import pytest

from adapterpack.adapter import Adapter
from adapterpack.errors import ConversionError
from adapterpack.ops.rerank import RerankPolicy, rerank
from tests.factories import qv_modules


def _adapter() -> Adapter:
    rng = np.random.default_rng(0)
    mods = qv_modules(rng, layers=1, rank=4, in_features=64, q_out=64, v_out=32, b_scale=0.05)
    return Adapter("a", "b", "LlamaForCausalLM", mods)


@pytest.mark.parametrize(
    "kw",
    [
        {"budget": float("nan")},  # was ValueError: cannot convert float NaN to integer
        {"budget": float("inf")},
        {"budget": "5000"},  # was TypeError
        {"rank": 2.5},  # was accepted
        {"rank": True},  # was accepted as rank 1
        {"rank": "2"},
        {"sv_ratio": float("nan")},
        {"rank": 2, "min_rank": 1.5},
        {"rank": 2, "max_rank": "3"},
    ],
)
def test_policy_values_of_the_wrong_kind(kw: dict[str, object]) -> None:
    with pytest.raises(ConversionError):
        rerank(_adapter(), RerankPolicy(**kw))  # type: ignore[arg-type]


FINE = [{"rank": np.int64(2)}, {"budget": 20000.9}, {"budget": np.float64(20000)}, {"energy": np.float32(0.9)}, {"budget": 10**400}]


@pytest.mark.parametrize("kw", FINE)
def test_policy_numpy_numbers_and_float_budgets_are_fine(kw: dict[str, object]) -> None:
    out, _report = rerank(_adapter(), RerankPolicy(**kw))  # type: ignore[arg-type]
    assert out.modules
