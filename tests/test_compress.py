"""ops/compress: rank × bits under a whole-file budget (hulls and knapsack checked by brute force; files measured)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.encodings import qsvd
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.linalg import allocate
from adapterpack.linalg.bitalloc import configuration_cost, lower_hull, module_choices
from adapterpack.ops import compress as comp
from adapterpack.ops.budget import apack_file_size, fit_to_file
from adapterpack.ops.report import footprint
from tests.factories import qv_modules


def _table(rng: np.random.Generator, k: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nb = np.sort(rng.integers(1, 40, size=(k, c)), axis=1)
    err = np.sort(rng.random((k, c)), axis=1)[:, ::-1] * np.linspace(3, 1, k)[:, None]
    cut = np.append(np.cumsum((err[:, 0] * 2)[::-1])[::-1], 0.0)
    return nb, err, cut


def _brute(nb: np.ndarray, err: np.ndarray, cut: np.ndarray, lo: int, hi: int) -> list[tuple[int, float]]:
    pts = []
    for j in range(lo, hi + 1):
        for cols in itertools.product(range(nb.shape[1]), repeat=j):
            pts.append(configuration_cost(nb, err, cut, cols))
    return pts


@pytest.mark.parametrize("seed", range(10))
def test_lower_hull_against_its_definition(seed: int) -> None:
    rng = np.random.default_rng(50 + seed)
    x = rng.integers(0, 30, 40).astype(float)
    y = rng.random(40) + 10.0 / (1 + x)
    h = lower_hull(x, y)
    hx, hy = x[h], y[h]
    assert np.all(np.diff(hx) > 0) and np.all(np.diff(hy) < 0)
    assert hx[0] == x.min() and hy[0] == y[x == x.min()].min() and hy[-1] == y.min()
    # every point on or above the chain over its span; the chain strictly convex
    inside = (x >= hx[0]) & (x <= hx[-1])
    assert np.all(y[inside] >= np.interp(x[inside], hx, hy) - 1e-12)
    slopes = np.diff(hy) / np.diff(hx)
    assert np.all(np.diff(slopes) > 0)


@pytest.mark.parametrize("seed", range(10))
def test_module_choices_is_the_lower_hull_of_every_configuration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, c = 4, 3
    nb, err, cut = _table(rng, k, c)
    lo = seed % 5  # min_rank 0 .. k: at 2 and more the components below it were left at their cheapest width
    ch = module_choices(nb, err, cut, fixed=5, min_rank=lo)
    pts = [(b + 5, d) for b, d in _brute(nb, err, cut, lo, k)]
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts])
    ref = lower_hull(x, y)
    # the same vertices (as points) as the hull of all configurations, each reached by its own columns
    assert sorted(zip(ch.nbytes.tolist(), np.round(ch.dist, 12).tolist())) == sorted(
        zip(x[ref].astype(int).tolist(), np.round(y[ref], 12).tolist())
    )
    for i, cols in enumerate(ch.columns):
        b, d = configuration_cost(nb, err, cut, cols, fixed=5)
        assert (b, d) == pytest.approx((int(ch.nbytes[i]), float(ch.dist[i])))
        assert len(cols) >= lo
    assert np.all(np.diff(ch.nbytes) > 0) and np.all(np.diff(ch.dist) < 0)


@pytest.mark.parametrize("seed", range(8))
def test_choice_dp_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    groups = int(rng.integers(2, 5))
    costs = [np.sort(rng.integers(0, 30, size=int(rng.integers(1, 5)))) for _ in range(groups)]
    values = [rng.standard_normal(c.size) for c in costs]
    base = sum(int(c.min()) for c in costs)
    for budget in (base, base + 7, base + 25, base + 200):
        picks = allocate.choice_dp(costs, values, budget)
        assert sum(int(c[p]) for c, p in zip(costs, picks)) <= budget
        best = max(
            sum(v[i] for v, i in zip(values, combo))
            for combo in itertools.product(*(range(c.size) for c in costs))
            if sum(int(c[i]) for c, i in zip(costs, combo)) <= budget
        )
        assert sum(v[p] for v, p in zip(values, picks)) == pytest.approx(best)
        g = allocate.choice_greedy(costs, values, budget)
        assert sum(int(c[p]) for c, p in zip(costs, g)) <= budget
    with pytest.raises(ConversionError, match="below"):
        allocate.choice_dp(costs, values, base - 1)


def test_choice_dp_coarse_units_keep_the_budget() -> None:
    rng = np.random.default_rng(7)
    costs = [np.sort(rng.integers(0, 10**6, size=6)) for _ in range(5)]
    values = [np.sort(rng.random(6)) for _ in range(5)]
    budget = sum(int(c.min()) for c in costs) + 1_234_567
    picks = allocate.choice_dp(costs, values, budget, max_states=1000)
    assert sum(int(c[p]) for c, p in zip(costs, picks)) <= budget


def test_fit_to_file_shrinks_until_it_fits() -> None:
    # a file costs 100 B of overhead plus 10 B per unit of allocation, allocation = b // 10
    fitted = fit_to_file(lambda b: b // 10, lambda units: 100 + 10 * units, 1000, floor=0)
    assert fitted.file_bytes <= 1000 and fitted.file_bytes >= 990
    with pytest.raises(ConversionError, match="below 150"):
        fit_to_file(lambda b: max(b // 10, 5), lambda units: 100 + 10 * units, 120, floor=50)


def _adapter(seed: int = 0, layers: int = 2) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = qv_modules(rng, layers=layers, rank=6, in_features=512, q_out=512, v_out=256, b_scale=0.05)
    # a steep spectrum, as trained adapters have: scale the rows of A
    for m in mods.values():
        m.tensors["A"] = (m.tensors["A"] * np.geomspace(1, 0.05, 6)[:, None]).astype(np.float32)
    return Adapter("a", "base/model", "LlamaForCausalLM", mods)


def _dense_rel_error(src: Adapter, out: Adapter, name: str) -> float:
    dw, dh = src.module(name).delta().astype(np.float64), out.module(name).delta().astype(np.float64)
    return float(np.linalg.norm(dw - dh) / np.linalg.norm(dw))


@pytest.mark.parametrize("ratio", [1 / 4, 1 / 8])
def test_compress_whole_file_fits_and_errors_are_exact(tmp_path, ratio: float) -> None:
    ad = _adapter()
    fp16 = comp.fp16_factor_bytes(ad)
    budget = int(fp16 * ratio)
    out, rep = comp.compress(ad, budget)
    assert rep.file_bytes == apack_file_size([out], "raw") <= budget
    assert rep.fp16_bytes == fp16
    dst = tmp_path / "c.apack"
    adapterpack.save(out, dst, codec="raw")
    assert footprint(dst) == rep.file_bytes
    back = adapterpack.open(dst)
    for m in rep.modules:
        assert m.rel_error == pytest.approx(_dense_rel_error(ad, back, m.name), rel=1e-6, abs=1e-9)
        rec = back.module(m.name)
        assert rec.params["bits"] == m.bits and len(m.bits) == m.rank >= 1
        assert m.nbytes == rec.decoded_bytes
    assert rep.total["record_bytes"] < budget


def test_more_bytes_less_error() -> None:
    ad = _adapter(1)
    errs = []
    for ratio in (1 / 8, 1 / 4, 1 / 2, 1.0):
        _, rep = comp.compress(ad, budget_ratio=ratio, weighting="absolute")
        errs.append(rep.total["rel_error"])
        assert rep.file_bytes <= rep.budget
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 4


def test_absolute_objective_is_optimal_over_the_hulls() -> None:
    # against a brute force over a 2-module adapter: no pick of hull choices within the same record bytes has less Σ E
    ad = _adapter(2, layers=1)
    works = []
    _, rep = comp.compress(ad, budget_ratio=0.2, weighting="absolute", bits=(2, 4))
    got = sum(m.distortion for m in rep.modules)
    spent = rep.total["record_bytes"]
    q = qsvd
    for m in ad:
        sp, _ = comp.spectrum_with_factors(m)
        u, vt = sp.vectors(6)
        t = q.component_table(u, sp.S[:6], vt, (2, 4), q.DEFAULT_GROUP_SIZE)
        works.append(module_choices(t.nbytes, t.err, np.append(np.cumsum(t.cut_err[::-1])[::-1], 0.0), min_rank=1))
    best = min(
        a + b
        for (ca, a), (cb, b) in itertools.product(zip(works[0].nbytes, works[0].dist), zip(works[1].nbytes, works[1].dist))
        if ca + cb <= spent
    )
    assert got == pytest.approx(best)


def test_compress_refusals() -> None:
    ad = _adapter()
    with pytest.raises(ConversionError, match="whole file"):
        comp.compress(ad, 300)
    with pytest.raises(ConversionError, match="exactly one"):
        comp.compress(ad)
    with pytest.raises(ConversionError, match="bits must be"):
        comp.compress(ad, budget_ratio=0.25, bits=(9,))
    with pytest.raises(ConversionError, match="no module"):
        comp.compress(ad, budget_ratio=0.25, modules="nothing_like_this")


def test_modules_outside_the_regex_are_kept_and_counted() -> None:
    ad = _adapter()
    kept = sum(m.decoded_bytes for m in ad if "v_proj" in m.name)
    budget = kept + comp.fp16_factor_bytes(ad, [m.name for m in ad if "q_proj" in m.name]) // 4 + 3000
    out, rep = comp.compress(ad, budget, modules=r"q_proj")
    assert out.module("model.layers.0.self_attn.v_proj").encoding == "lora"
    assert out.module("model.layers.0.self_attn.q_proj").encoding == "qsvd"
    assert rep.file_bytes == apack_file_size([out], "raw") <= rep.budget


def test_compress_file_writes_exactly_the_planned_size(tmp_path) -> None:
    src = tmp_path / "src.apack"
    adapterpack.save(_adapter(), src)
    res = comp.compress_file(src, tmp_path / "out.apack", budget_ratio=0.125)
    assert res.dst_bytes == res.report.file_bytes <= res.report.budget
    d = res.as_dict()
    assert d["ok"] and d["modules"][0]["name"] and "total" in d
    with pytest.raises(ConversionError, match=r"\.apack"):
        comp.compress_file(src, tmp_path / "out-peft", budget_ratio=0.125)


def test_a_planner_writer_mismatch_writes_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size check runs before the file is published: an existing DST (with --force) is left as it was."""
    src, dst = tmp_path / "src.apack", tmp_path / "out.apack"
    adapterpack.save(_adapter(), src)
    dst.write_bytes(b"the user's file")
    real = comp.apack_file_size
    monkeypatch.setattr(comp, "apack_file_size", lambda *a, **k: real(*a, **k) - 1)
    with pytest.raises(ConversionError, match="planned"):
        comp.compress_file(src, dst, budget_ratio=0.125, force=True)
    assert dst.read_bytes() == b"the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["out.apack", "src.apack"]


def test_cli_compress_json_and_table(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from adapterpack.cli import main

    src = tmp_path / "src.apack"
    adapterpack.save(_adapter(), src)
    dst = tmp_path / "out.apack"
    r = CliRunner().invoke(main, ["compress", str(src), str(dst), "--budget-ratio", "0.125", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["ok"] and footprint(dst) == data["dst_bytes"] == data["total"]["file_bytes"] <= data["budget"]
    assert {"name", "rank", "bits", "bytes", "rel_error"} <= set(data["modules"][0])
    r = CliRunner().invoke(main, ["compress", str(src), "--budget", "20KB", "--dry-run", "--bits", "2,4"])
    assert r.exit_code == 0, r.output
    assert "model.layers.0.self_attn.q_proj" in r.output and "within the budget 20" in r.output
    r = CliRunner().invoke(main, ["compress", str(src), str(dst), "--budget", "300", "--force"])
    assert r.exit_code == 1 and "whole file" in r.output
    r = CliRunner().invoke(main, ["compress", str(src), "--dry-run"])
    assert r.exit_code == 2 and "exactly one" in r.output


# --- the real bundled adapter (SmolLM2-135M, 120 modules of rank 8) ---------------------------------


def _bundled(modules: int | None = 8) -> Adapter:
    ad = adapterpack.open(example_path())
    names = list(ad.modules)[:modules] if modules else list(ad.modules)
    return ad.derived({n: ad.module(n) for n in names})


def test_bundled_adapter_subset_fits_uses_the_budget_and_beats_rank_only(tmp_path) -> None:
    from adapterpack.ops.rerank import RerankPolicy, rerank

    ad = _bundled()
    out, rep = comp.compress(ad, budget_ratio=1 / 4)
    dst = tmp_path / "c.apack"
    adapterpack.save(out, dst, codec="raw")
    assert footprint(dst) == rep.file_bytes <= rep.budget == comp.fp16_factor_bytes(ad) // 4
    assert rep.file_bytes > 0.97 * rep.budget  # the fit leaves little unused
    back = adapterpack.open(dst)
    for m in rep.modules:
        assert m.rel_error == pytest.approx(_dense_rel_error(ad, back, m.name), rel=1e-5)
        assert back.module(m.name).params["bits"] == m.bits
    # rank only, bf16, the same whole-file budget: a larger error
    _, rr = rerank(ad, RerankPolicy(budget=rep.budget, dtype="bf16"), file_size=lambda a: apack_file_size([a], "raw"))
    assert rr.file_bytes <= rep.budget
    assert rep.total["rel_error"] < 0.75 * rr.total["rel_error"]


@pytest.mark.slow
def test_bundled_adapter_at_one_eighth_of_fp16(tmp_path) -> None:
    src = example_path()
    res = comp.compress_file(src, tmp_path / "c8.apack", budget_ratio=0.125)
    assert res.dst_bytes == res.report.file_bytes <= res.report.budget == 1_843_200 // 8
    ad, back = adapterpack.open(src), adapterpack.open(tmp_path / "c8.apack")
    for m in res.report.modules[::17]:
        assert m.rel_error == pytest.approx(_dense_rel_error(ad, back, m.name), rel=1e-5)


def test_audit_compress8_column(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from adapterpack.cli import main
    from adapterpack.ops.audit import audit_input

    big, tiny = tmp_path / "big.apack", tmp_path / "tiny.apack"
    adapterpack.save(_adapter(), big)
    mods = qv_modules(np.random.default_rng(3), layers=1, rank=2, in_features=16, q_out=16, v_out=8, b_scale=0.1)
    adapterpack.save(Adapter("t", "base/model", "LlamaForCausalLM", mods), tiny)
    res = audit_input(big, measure=("compress8",))
    _, rep = comp.compress(adapterpack.open(big), budget_ratio=1 / 8)
    assert res.sizes["compress8"] == rep.file_bytes <= comp.fp16_factor_bytes(adapterpack.open(big)) // 8
    assert res.errors["compress8"] == pytest.approx(rep.total["rel_error"])
    r = CliRunner().invoke(main, ["audit", str(tmp_path), "--measure", "bf16,compress8", "--json", "-j", "1"])
    assert r.exit_code == 0, r.output
    rows = {Path(x["path"]).name: x for x in json.loads(r.output)["inputs"]}
    assert rows["big.apack"]["sizes"]["compress8"] == rep.file_bytes and "compress8" in rows["big.apack"]["errors"]
    # 1/8 of one small module's fp16 factors cannot hold its file: nothing saved, and the note says why
    t = rows["tiny.apack"]
    assert t["saved"]["compress8"] == 0 and "compress8" not in t["errors"] and "below" in t["notes"][0]
    r = CliRunner().invoke(main, ["audit", str(big), "--measure", "compress8", "-j", "1"])
    assert r.exit_code == 0 and "c/8" in r.output and "(err 0." in r.output


def test_importance_moves_bytes_to_the_sensitive_module() -> None:
    from adapterpack.ops.importance import Importance

    ad = _adapter(4, layers=1)  # q_proj 512x512 and v_proj 256x512, rank 6
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    spectra = {m.name: comp.spectrum_with_factors(m)[0].S for m in ad}
    plain = {m.name: m for m in comp.compress(ad, budget_ratio=1 / 4, weighting="absolute")[1].modules}
    for hot, cold in ((q, v), (v, q)):
        imp = Importance({hot: np.full(6, 100.0), cold: np.full(6, 1e-3)}, spectra)
        _, rep = comp.compress(ad, budget_ratio=1 / 4, importance=imp)
        got = {m.name: m for m in rep.modules}
        assert rep.objective == "importance" and rep.weighting == "absolute"
        assert got[hot].rel_error < plain[hot].rel_error and got[cold].rel_error > plain[cold].rel_error
        assert got[hot].nbytes > plain[hot].nbytes
    other = Importance({q: np.ones(6), v: np.ones(6)}, {q: spectra[q] * 2, v: spectra[v]})
    with pytest.raises(ConversionError, match="other singular values"):
        comp.compress(ad, budget_ratio=1 / 4, importance=other)


def test_cache_reuses_tables_and_records_with_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    ad = _adapter(5)
    cache: dict = {}
    _, first = comp.compress(ad, budget_ratio=1 / 4, cache=cache)
    calls = []
    real = qsvd.component_table
    monkeypatch.setattr(qsvd, "component_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, again = comp.compress(ad, budget_ratio=1 / 4, cache=cache)
    assert not calls and again.as_dict() == first.as_dict()
    _, other = comp.compress(ad, budget_ratio=1 / 8, cache=cache)
    assert not calls and other.file_bytes <= other.budget < first.budget
    _, fresh = comp.compress(ad, budget_ratio=1 / 8)
    assert fresh.as_dict() == other.as_dict() and calls


def test_a_budget_above_the_float_file_takes_every_component_in_float(monkeypatch: pytest.MonkeyPatch) -> None:
    ad = _adapter(6)
    rounds = []
    real = comp.fit_to_file
    monkeypatch.setattr(comp, "fit_to_file", lambda *a, **k: rounds.append(real(*a, **k)) or rounds[-1])
    _, rep = comp.compress(ad, 10**8)
    assert all(m.bits == [16] * 6 for m in rep.modules) and rep.file_bytes < 10**8
    assert rounds[0].rounds <= 3


def test_zero_module_and_pass_through_tensors_ride_along(tmp_path) -> None:
    ad = _adapter(7)
    name = "model.layers.1.self_attn.v_proj"
    m = ad.module(name)
    zero = type(m)(m.name, m.encoding, m.base_shape, m.params, {"A": m.tensors["A"], "B": np.zeros_like(m.tensors["B"])})
    head = np.ones((8, 4), np.float32)
    ad = ad.derived({**ad.modules, name: zero}, {"lm_head.weight": head})
    out, rep = comp.compress(ad, budget_ratio=1 / 4)
    got = {x.name: x for x in rep.modules}
    assert got[name].rank == 0 and got[name].rel_error == 0.0 and "zero" in got[name].notes[0]
    dst = tmp_path / "z.apack"
    adapterpack.save(out, dst, codec="raw")
    back = adapterpack.open(dst)
    assert footprint(dst) == rep.file_bytes <= rep.budget
    assert np.array_equal(back.tensors["lm_head.weight"].load(), head) and not np.any(back.module(name).delta())


def test_qsvd_file_has_a_compressed_index_raw_lora_file_does_not(tmp_path: Path) -> None:
    """A qsvd file is dequantized on every load, so its raw-only file still stores the index as a zstd frame
    (flag bit 0 alone, spec §1.3); a raw lora file keeps the plain index meant for zero-copy opens."""
    from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED
    from adapterpack.container.reader import ApackReader
    from adapterpack.ops.compress import compress

    src = adapterpack.open(example_path())
    out, report = compress(src, budget_ratio=0.125)
    q, plain = tmp_path / "q.apack", tmp_path / "l.apack"
    adapterpack.save(out, q, codec="raw")
    adapterpack.save(src, plain, codec="raw")
    assert q.stat().st_size == report.file_bytes <= report.budget
    with ApackReader(q) as r:
        assert r.preamble.flags == FLAG_INDEX_ZSTD | FLAG_IMPLIED and r.preamble.index_length < r.index_text_length / 3
    with ApackReader(plain) as r:
        assert r.preamble.flags & (FLAG_INDEX_ZSTD | FLAG_PACKED) == 0
    with adapterpack.open(q) as back:
        m = back.module("model.layers.0.self_attn.q_proj")
        assert np.array_equal(m.factors().B, out.modules["model.layers.0.self_attn.q_proj"].factors().B)
