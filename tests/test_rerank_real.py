"""Re-ranking the bundled real adapter (SmolLM2-135M, r=8 on q/k/v/o), checked against dense float64 SVDs.

Every module's ΔW is formed densely in binary64 and decomposed with ``np.linalg.svd``; the ranks each
rule should pick, the retained energy and the relative Frobenius error are derived from those
singular values alone, and the written records are multiplied out and compared with ΔW.
"""

from __future__ import annotations

import numpy as np
import pytest

import adapterpack
from adapterpack.examples import example_path
from adapterpack.ops.rerank import RerankPolicy, rerank, rerank_file

TOL = 2e-6  # fp32 factors: retained fractions and errors agree with binary64 to ~1e-7


def _dense(module: adapterpack.adapter.Module) -> np.ndarray:
    f = module.factors()
    return float(f.scale) * (f.B.astype(np.float64) @ f.A.astype(np.float64))


@pytest.fixture(scope="module")
def example() -> adapterpack.Adapter:
    ad = adapterpack.open(example_path())
    yield ad
    ad.close()


@pytest.fixture(scope="module")
def reference(example: adapterpack.Adapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module: dense float64 ΔW (2-D, as s·B·A) and its singular values from np.linalg.svd."""
    out = {}
    for m in example:
        d = _dense(m)
        out[m.name] = (d, np.linalg.svd(d, compute_uv=False))
    return out


def _fraction(s: np.ndarray, j: int) -> float:
    e = s**2
    return float(e[:j].sum() / e.sum())


def _check_against_dense(out: adapterpack.Adapter, report, reference, spectra: int = 0) -> None:
    """Each plan's retained/rel_error is the optimum for its rank, and the written record achieves it;
    for every ``spectra``-th module (0: none) the written ΔW' is decomposed too."""
    plans = {p.name: p for p in report.modules}
    assert set(plans) == set(reference)
    for i, (name, (d, s)) in enumerate(reference.items()):
        p = plans[name]
        best = _fraction(s, p.new_rank)
        assert p.retained == pytest.approx(best, abs=TOL), name
        assert p.rel_error == pytest.approx(np.sqrt(max(1.0 - best, 0.0)), abs=1e-5), name
        got = _dense(out.module(name))
        err = np.linalg.norm(d - got) / np.linalg.norm(d)
        assert err == pytest.approx(p.rel_error, abs=1e-5), name
        if not spectra or i % spectra:
            continue
        # the written ΔW' has exactly new_rank nonzero singular values, the leading ones of ΔW
        s2 = np.linalg.svd(got, compute_uv=False)
        assert np.count_nonzero(s2 > 1e-6 * s[0]) == p.new_rank, name
        np.testing.assert_allclose(s2[: p.new_rank], s[: p.new_rank], rtol=1e-5, atol=1e-7 * s[0])


@pytest.mark.parametrize("encoding", ["svd", "lora"])
def test_uniform_rank_is_the_dense_truncation(example, reference, encoding):
    out, report = rerank(example, RerankPolicy(rank=3, encoding=encoding))
    assert {p.new_rank for p in report.modules} == {3}
    assert {m.encoding for m in out} == {encoding}
    _check_against_dense(out, report, reference, spectra=4)
    energy = sum(float((s**2).sum()) for _, s in reference.values())
    kept = sum(float((s[:3] ** 2).sum()) for _, s in reference.values())
    assert report.total["retained"] == pytest.approx(kept / energy, abs=TOL)


def test_energy_rule_picks_the_smallest_sufficient_rank(example, reference):
    out, report = rerank(example, RerankPolicy(energy=0.9))
    for p in report.modules:
        s = reference[p.name][1]
        cum = np.cumsum(s**2) / np.sum(s**2)
        assert p.new_rank == int(np.argmax(cum >= 0.9 * (1 - 1e-12))) + 1, p.name
    _check_against_dense(out, report, reference)
    assert min(p.retained for p in report.modules) >= 0.9 - TOL
    assert len({p.new_rank for p in report.modules}) > 1  # a real adapter's modules differ


def test_sv_ratio_rule_counts_singular_values(example, reference):
    out, report = rerank(example, RerankPolicy(sv_ratio=3.0))
    for p in report.modules:
        s = reference[p.name][1]
        assert p.new_rank == int(np.count_nonzero(s >= s[0] / 3.0)), p.name
    _check_against_dense(out, report, reference)


@pytest.mark.parametrize("weighting", ["absolute", "relative"])
@pytest.mark.parametrize("method", ["dp", "greedy"])
def test_budget_never_exceeds_and_dp_is_at_least_greedy(example, reference, weighting, method):
    per_rank = {m.name: (m.base_shape[0] + m.base_shape[1]) * 4 for m in example}  # lora fp32 bytes per rank
    full = sum(8 * c for c in per_rank.values())
    for fraction in (0.13, 0.37):
        budget = int(full * fraction)
        out, report = rerank(example, RerankPolicy(budget=budget, weighting=weighting, method=method, encoding="lora"))
        ranks = {p.name: p.new_rank for p in report.modules}
        assert sum(ranks[n] * per_rank[n] for n in ranks) <= budget
        assert report.total["bytes_after"] <= budget
        written = sum(m.array("A").nbytes + m.array("B").nbytes for m in out if np.any(m.array("A")))
        assert written <= budget
        if method == "greedy":
            continue
        _, greedy = rerank(example, RerankPolicy(budget=budget, weighting=weighting, method="greedy", encoding="lora"))

        def value(rep) -> float:
            tot = 0.0
            for p in rep.modules:
                s = reference[p.name][1]
                e = s**2
                tot += e[: p.new_rank].sum() / (e.sum() if weighting == "relative" else 1.0)
            return tot

        assert value(report) >= value(greedy) - 1e-12 * max(value(greedy), 1.0)
        _check_against_dense(out, report, reference)
        # nearly all of the budget is used: one more rank anywhere would not fit or add nothing
        spare = budget - sum(ranks[n] * per_rank[n] for n in ranks)
        room = [n for n in ranks if ranks[n] < 8 and per_rank[n] <= spare]
        assert not room or all(reference[n][1][ranks[n]] ** 2 < 1e-12 for n in room)


def test_budget_below_rank_one_everywhere_names_the_minimum(example):
    from adapterpack.errors import ConversionError

    need = sum((m.base_shape[0] + m.base_shape[1]) * 4 for m in example)
    with pytest.raises(ConversionError, match=f"{need:,}"):
        rerank(example, RerankPolicy(budget=need - 1, min_rank=1, encoding="lora"))


def test_svd_file_opened_at_lower_rank_equals_rerank_at_that_rank(example, reference, tmp_path):
    dst = tmp_path / "r8.apack"
    res = rerank_file(example_path(), dst, RerankPolicy(rank=8), codec="raw")
    assert res.report.total["retained"] == pytest.approx(1.0, abs=TOL)
    low, _ = rerank(example, RerankPolicy(rank=2, encoding="svd"))
    with adapterpack.open(dst, rank=2) as prog:
        for m in prog:
            assert m.encoding == "svd" and m.summary()["rank"] == 2
            np.testing.assert_allclose(_dense(m), _dense(low.module(m.name)), rtol=0, atol=1e-6 * reference[m.name][1][0])
