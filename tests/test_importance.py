"""Measured importance (Fisher information of each singular component) and budgets weighted by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.errors import ConversionError, InputError
from adapterpack.linalg import allocate
from adapterpack.ops.importance import Importance, load_importance
from adapterpack.ops.rerank import RerankPolicy, plan_rerank, spectrum_with_factors
from adapterpack.torch.fit.fisher import component_fisher

V, D, H = 11, 6, 8


class Tiny(nn.Module):
    """Embedding → l1 → tanh → head: two linear layers to adapt, logits per position."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.l1 = nn.Linear(D, H)
        self.head = nn.Linear(H, V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.l1(self.emb(ids))))


def tiny_adapter(seed: int = 1) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = {}
    for name, (out, inp, r) in {"l1": (H, D, 3), "head": (V, H, 2)}.items():
        a = rng.standard_normal((r, inp)).astype(np.float32)
        b = rng.standard_normal((out, r)).astype(np.float32) * 0.5
        mods[name] = Module(name, "lora", (out, inp), {"rank": r, "alpha": 2.0 * r}, {"A": a, "B": b})
    return Adapter(modules=mods)


def batches(n: int = 3, b: int = 4, t: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, V, (b, t), generator=g) for _ in range(n)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def reference_fisher(model: Tiny, ad: Adapter, data: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """F = E[∇c ∇cᵀ] by brute force: W = W0 + Σ c_l u_l v_lᵀ with the coefficients c as leaves, one autograd per sequence."""
    svd = {}
    for m in ad:
        u, s, vt = np.linalg.svd(m.delta().astype(np.float64), full_matrices=False)
        k = int(m.params["rank"])
        svd[m.name] = (torch.tensor(u[:, :k]), torch.tensor(s[:k]), torch.tensor(vt[:k]))
    out = {n: np.zeros((svd[n][1].numel(),) * 2) for n in svd}
    count = 0
    for ids in data:
        for seq in ids:
            c = {n: svd[n][1].clone().requires_grad_(True) for n in svd}
            w = {n: getattr(model, n).weight.double() + (svd[n][0] * c[n]) @ svd[n][2] for n in svd}
            h = torch.tanh(model.emb(seq[None]).double() @ w["l1"].T + model.l1.bias.double())
            lg = (h @ w["head"].T + model.head.bias.double())[0, :-1]
            loss = torch.nn.functional.cross_entropy(lg, seq[1:], reduction="sum")
            grads = torch.autograd.grad(loss, [c[n] for n in svd])
            for n, g in zip(svd, grads, strict=True):
                out[n] += np.outer(g.numpy(), g.numpy())
            count += 1
    return {n: v / count for n, v in out.items()}


def test_fisher_matches_brute_force_autograd_and_restores_the_model() -> None:
    model, ad, data = Tiny(), tiny_adapter(), batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imp = component_fisher(model, ad, data, labels="data", logits=logits)
    ref = reference_fisher(model, ad, data)
    for name in ("l1", "head"):
        np.testing.assert_allclose(imp.fisher[name], ref[name], rtol=2e-4, atol=1e-6 * ref[name].max())
        assert np.abs(ref[name] - np.diag(np.diag(ref[name]))).max() > 1e-3 * ref[name].max()  # cross terms matter
        sp, _ = spectrum_with_factors(ad.module(name))
        np.testing.assert_array_equal(imp.singular_values[name], sp.S)
    assert imp.info["sequences"] == "12" and imp.info["tokens"] == str(12 * 6)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_per_token_statistics_for_the_estimator_comparison() -> None:
    """``component_statistics``: ``sequence`` is what component_fisher keeps; ``input`` is the second
    moment of Vᵀx over every position the module saw (l1's input is the embedding, known exactly)."""
    from adapterpack.torch.fit.fisher import STATISTICS, component_statistics

    model, ad, data = Tiny(), tiny_adapter(), batches()
    stats, _, _ = component_statistics(model, ad, data, labels="data", logits=logits, statistics=STATISTICS)
    fisher = component_fisher(model, ad, data, labels="data", logits=logits).fisher
    _, vt = spectrum_with_factors(ad.module("l1"))[0].vectors()
    with torch.no_grad():
        x = torch.cat([model.emb(ids).reshape(-1, D) for ids in data]).double().numpy() @ vt.T
    np.testing.assert_allclose(stats["l1"]["input"], x.T @ x / x.shape[0], rtol=1e-5)
    for n in ("l1", "head"):
        assert set(stats[n]) == set(STATISTICS)
        np.testing.assert_array_equal(stats[n]["sequence"], fisher[n])
        for key in ("token", "grad"):  # PSD second moments of every position's share
            assert np.linalg.eigvalsh(stats[n][key]).min() > -1e-9 * np.abs(stats[n][key]).max()
    with pytest.raises(ConversionError, match="must include 'sequence'"):
        component_statistics(model, ad, data, logits=logits, statistics=("token",))


def test_sampled_labels_are_seeded() -> None:
    model, ad, data = Tiny(), tiny_adapter(), batches()
    a = component_fisher(model, ad, data, logits=logits, seed=3)
    b = component_fisher(model, ad, data, logits=logits, seed=3)
    c = component_fisher(model, ad, data, logits=logits, seed=4)
    assert a.info["labels"] == "sample"
    for n in a.fisher:
        np.testing.assert_array_equal(a.fisher[n], b.fisher[n])
        assert np.all(np.diag(a.fisher[n]) > 0)
    assert any(not np.array_equal(a.fisher[n], c.fisher[n]) for n in a.fisher)


def test_bad_calibration_input() -> None:
    model, ad = Tiny(), tiny_adapter()
    with pytest.raises(ConversionError, match="labels must be one of"):
        component_fisher(model, ad, batches(), labels="gold", logits=logits)
    with pytest.raises(ConversionError, match="tokens >= 2"):
        component_fisher(model, ad, [torch.zeros(3, dtype=torch.long)], logits=logits)
    with pytest.raises(ConversionError, match="no calibration batches"):
        component_fisher(model, ad, [], logits=logits)


def test_text_blocks_are_evenly_spaced_whole_blocks() -> None:
    from adapterpack.torch.fit.fisher import text_blocks

    ids = list(range(100))
    got = text_blocks(ids, 3, 10)  # 10 whole blocks: the first, the middle (4.5 rounds to even) and the last
    assert got.tolist() == [list(range(0, 10)), list(range(40, 50)), list(range(90, 100))]
    assert text_blocks(ids, 50, 10).shape == (10, 10)  # fewer than asked: all of them
    with pytest.raises(ConversionError, match="fewer than one block of 128"):
        text_blocks(ids, 4, 128)


def test_budget_weighted_by_importance_is_the_dp_on_weighted_energy(tmp_path: Path) -> None:
    ad = tiny_adapter()
    spectra = {m.name: spectrum_with_factors(m)[0].S for m in ad}
    # make the smaller module far more important than its energy says
    fisher = {"l1": np.full(3, 1e-3), "head": np.full(2, 10.0)}
    imp = Importance(fisher, spectra)
    budget = (6 + 8) * 4 + 2 * (8 + 11) * 4  # l1 at rank 1, head at rank 2 (float32 lora output)
    plain, _ = plan_rerank(ad, RerankPolicy(budget=budget, encoding="lora"))
    weighted, _ = plan_rerank(ad, RerankPolicy(budget=budget, encoding="lora", importance=imp))
    items = [
        allocate.Item(n, spectra[n] ** 2 * fisher[n], (ad.module(n).base_shape[0] + ad.module(n).base_shape[1]) * 4,
                      allocate.choices_for(spectra[n].size, min_rank=1))
        for n in ("l1", "head")
    ]
    expect = allocate.budget_dp(items, budget, "absolute")
    assert {p.name: p.new_rank for p in weighted.modules} == expect == {"l1": 1, "head": 2}
    assert {p.name: p.new_rank for p in plain.modules} != expect  # energy alone picks otherwise
    # the file round trip is exact, and the CLI takes it
    path = imp.save(tmp_path / "imp.safetensors")
    back = load_importance(path)
    for n in fisher:
        np.testing.assert_array_equal(back.fisher[n], fisher[n])
        np.testing.assert_array_equal(back.singular_values[n], spectra[n])
    src = tmp_path / "a.apack"
    adapterpack.save(ad, src)
    # the CLI's budget is the whole file's: the file of the expected ranks is what it takes
    from adapterpack.ops.budget import apack_file_size
    from adapterpack.ops.rerank import rerank

    whole = apack_file_size([rerank(ad, RerankPolicy(budget=budget, encoding="lora", importance=imp))[0]], "byteplanes")
    args = ["rerank", str(src), "--budget", str(whole), "--importance", str(path), "--encoding", "lora", "--codec", "byteplanes"]
    args += ["--dry-run", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    import json

    rep = json.loads(r.output)
    got = {m["name"]: m["new_rank"] for m in rep["modules"]}
    assert rep["file_bytes"] <= whole and got == allocate.budget_dp(items, rep["allocation_budget"], "absolute") == expect


def test_cut_costs_are_the_quadratic_form_of_the_cut_tail_and_version_1_files_read(tmp_path: Path) -> None:
    """cost[j] = ½·σ_{≥j}ᵀ F_{≥j,≥j} σ_{≥j}, by the definition (a loop) for a full F with negative cross
    terms and for a diagonal one; the budget's per-component values add up to it over any kept prefix."""
    rng = np.random.default_rng(5)
    s = np.array([3.0, 2.0, 1.0, 0.5])
    x = rng.standard_normal((4, 6))
    f = x @ x.T  # PSD, off-diagonal of both signs
    imp = Importance({"m": f}, {"m": s})
    want = [0.5 * s[j:] @ f[j:, j:] @ s[j:] for j in range(4)] + [0.0]
    np.testing.assert_allclose(imp.cut_costs("m", s), want, rtol=1e-13)
    v = imp.values("m", s)
    np.testing.assert_allclose(want[0] - np.cumsum(np.append(0.0, v)), want, rtol=0, atol=1e-12 * want[0])
    diag = Importance({"m": np.diag(f).copy()}, {"m": s})
    np.testing.assert_allclose(diag.cut_costs("m", s), [0.5 * np.sum(np.diag(f)[j:] * s[j:] ** 2) for j in range(5)], rtol=1e-13)
    from safetensors.numpy import save_file

    save_file({"m.fisher": np.diag(f).copy(), "m.S": s}, str(tmp_path / "v1.safetensors"), metadata={"adapterpack.importance": "1"})
    np.testing.assert_array_equal(load_importance(tmp_path / "v1.safetensors").cut_costs("m", s), diag.cut_costs("m", s))
    save_file({"m.fisher": f, "m.S": s}, str(tmp_path / "v1m.safetensors"), metadata={"adapterpack.importance": "1"})
    with pytest.raises(InputError, match="version 1 importance file holds Fisher diagonals"):
        load_importance(tmp_path / "v1m.safetensors")
    save_file({"m.fisher": f, "m.S": s}, str(tmp_path / "v9.safetensors"), metadata={"adapterpack.importance": "9"})
    with pytest.raises(InputError, match="'9', expected one of 1, 2"):
        load_importance(tmp_path / "v9.safetensors")


def test_a_fisher_matrix_with_cross_terms_drives_the_budget_dp_end_to_end() -> None:
    """k×k F through plan_rerank, weightings absolute and balanced: the ranks are the brute-force
    minimum of Σ_i cost_i(j_i) (absolute) and of Σ_i cost_i(j_i)^0.75 over the floored choices
    (balanced), and the cross terms change the answer against F's diagonal alone."""
    import itertools

    ad = tiny_adapter()
    spectra = {m.name: spectrum_with_factors(m)[0].S for m in ad}
    l1 = (np.full((3, 3), 0.9) + 0.1 * np.eye(3)) * 0.5  # its components' cuts add coherently
    head = np.array([[0.2, -0.4], [-0.4, 1.0]])  # cuts partly cancel: cutting both costs less than the last alone
    full = Importance({"l1": l1, "head": head}, spectra)
    assert np.any(full.values("head", spectra["head"]) < 0)
    per_rank = {n: (ad.module(n).base_shape[0] + ad.module(n).base_shape[1]) * 4 for n in spectra}
    budget = 1 * per_rank["l1"] + 2 * per_rank["head"]  # (l1 1, head 2) or (l1 2, head 1)
    for weighting, power in (("absolute", 1.0), ("balanced", 0.75)):
        plan, _ = plan_rerank(ad, RerankPolicy(budget=budget, encoding="lora", importance=full, weighting=weighting))
        got = {p.name: p.new_rank for p in plan.modules}
        best = min(  # min_rank 1; balanced's floor ⌈¾·1⌉ (the uniform rank the budget affords) is 1 too
            (sum(full.cut_costs(n, spectra[n])[j] ** power for n, j in zip(("l1", "head"), js, strict=True)), js)
            for js in itertools.product(range(1, 4), range(1, 3))
            if js[0] * per_rank["l1"] + js[1] * per_rank["head"] <= budget
        )[1]
        assert (got["l1"], got["head"]) == best, weighting
    diag = Importance({"l1": np.diag(l1).copy(), "head": np.diag(head).copy()}, spectra)
    plan_d, _ = plan_rerank(ad, RerankPolicy(budget=budget, encoding="lora", importance=diag))
    plan_f, _ = plan_rerank(ad, RerankPolicy(budget=budget, encoding="lora", importance=full))
    assert {p.name: p.new_rank for p in plan_f.modules} == {"l1": 2, "head": 1}  # l1's coherent tail kept
    assert {p.name: p.new_rank for p in plan_d.modules} == {"l1": 1, "head": 2}  # the diagonal misses it


def test_importance_refusals(tmp_path: Path) -> None:
    ad, other = tiny_adapter(1), tiny_adapter(2)
    imp = Importance({m.name: np.ones(int(m.params["rank"])) for m in ad}, {m.name: spectrum_with_factors(m)[0].S for m in ad})
    with pytest.raises(ConversionError, match="measured for other singular values"):
        plan_rerank(other, RerankPolicy(budget=10_000, importance=imp))
    with pytest.raises(ConversionError, match="does not apply to rank"):
        RerankPolicy(rank=1, importance=imp).rule()
    partial = Importance({"l1": imp.fisher["l1"]}, {"l1": imp.singular_values["l1"]})
    with pytest.raises(ConversionError, match="no values for module 'head'"):
        plan_rerank(ad, RerankPolicy(budget=10_000, importance=partial))
    with pytest.raises(ConversionError, match="F's diagonal non-negative"):
        Importance({"l1": -imp.fisher["l1"]}, {"l1": imp.singular_values["l1"]})
    with pytest.raises(ConversionError, match="must be symmetric"):
        Importance({"l1": np.triu(np.ones((3, 3)))}, {"l1": imp.singular_values["l1"]})
    with pytest.raises(ConversionError, match="positive semi-definite"):  # would make a module look free to cut
        Importance({"l1": np.array([[0.0, -5.0, 0.0], [-5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])}, {"l1": imp.singular_values["l1"]})
    with pytest.raises(ConversionError, match="must be float arrays"):
        Importance({"l1": "abc"}, {"l1": imp.singular_values["l1"]})
    with pytest.raises(ConversionError, match=r"must be \[k\] or \[k, k\]"):
        Importance({"l1": np.ones((3, 2))}, {"l1": imp.singular_values["l1"]})
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not an adapterpack importance file"):
        load_importance(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(InputError, match="cannot read safetensors file"):
        load_importance(tmp_path / "junk.safetensors")


def test_cli_measures_the_bundled_adapter_on_smollm2_and_rerank_uses_it(tmp_path: Path) -> None:
    """Real model, real adapter, real text: `adapterpack importance` writes a file whose values are the
    library's for the same blocks and seed, and `rerank --importance` spends a budget by it."""
    import json

    from adapterpack.examples import example_path
    from adapterpack.torch.fit.fisher import causal_lm_importance
    from tools.fixtures import smollm2

    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(smollm2.pydoc_texts("train")[:40]), encoding="utf-8")
    out = tmp_path / "imp.safetensors"
    args = ["importance", str(example_path()), str(smollm2.model_dir()), str(out), "--text", str(text)]
    args += ["--blocks", "2", "--block-tokens", "64"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "from     2 blocks, 126 tokens, labels sample" in r.output
    imp = load_importance(out)
    ad = adapterpack.open(example_path())
    assert sorted(imp.fisher) == sorted(ad.modules) and all(np.all(np.diag(f) > 0) for f in imp.fisher.values())
    again = causal_lm_importance(ad, smollm2.model_dir(), text.read_text(encoding="utf-8"), blocks=2, block_tokens=64)
    for n in imp.fisher:
        np.testing.assert_allclose(imp.fisher[n], again.fisher[n], rtol=1e-5)
    budget = 4 * sum((m.base_shape[0] + m.base_shape[1]) * 4 for m in ad)  # uniform rank 4's bytes (fp32 lora)
    res = {}
    for extra in ([], ["--importance", str(out)]):
        r = CliRunner().invoke(main, ["rerank", str(example_path()), "--budget", str(budget), "--encoding", "lora",
                                      "--dry-run", "--json", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        rep = json.loads(r.output)
        assert rep["file_bytes"] <= budget  # the whole file (byteplanes: the factors may exceed it)
        res[bool(extra)] = {m["name"]: m["new_rank"] for m in rep["modules"]}
    assert res[True] != res[False]
    assert CliRunner().invoke(main, args).exit_code == 1  # OUT exists: refused without --force


class Twice(nn.Module):
    """l1 applied twice (a shared block), plus a layer whose output never reaches the logits."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.emb = nn.Embedding(V, H)
        self.l1 = nn.Linear(H, H)
        self.side = nn.Linear(H, H)
        self.head = nn.Linear(H, V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        self.side(h)  # computed, unused
        return self.head(torch.tanh(self.l1(torch.tanh(self.l1(h)))))


def test_a_module_called_twice_sums_both_calls_and_an_unused_one_gets_zero() -> None:
    rng = np.random.default_rng(3)
    mods = {}
    for name in ("l1", "side"):
        a, b = rng.standard_normal((2, H)).astype(np.float32), rng.standard_normal((H, 2)).astype(np.float32) * 0.5
        mods[name] = Module(name, "lora", (H, H), {"rank": 2, "alpha": 2.0}, {"A": a, "B": b})
    ad, model, data = Adapter(modules=mods), Twice(), batches()
    imp = component_fisher(model, ad, data, labels="data", logits=logits)
    assert "1 modules got no gradient" in imp.info["note"] and not np.any(imp.fisher["side"])
    u, s, vt = np.linalg.svd(ad.module("l1").delta().astype(np.float64))
    u, s, vt = torch.tensor(u[:, :2]), torch.tensor(s[:2]), torch.tensor(vt[:2])
    ref, count = np.zeros((2, 2)), 0
    for ids in data:
        for seq in ids:
            c = s.clone().requires_grad_(True)
            w = model.l1.weight.double() + (u * c) @ vt
            h = model.emb(seq[None]).double()
            for _ in range(2):
                h = torch.tanh(h @ w.T + model.l1.bias.double())
            lg = (h @ model.head.weight.double().T + model.head.bias.double())[0, :-1]
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(lg, seq[1:], reduction="sum"), [c])
            ref += np.outer(g.numpy(), g.numpy())
            count += 1
    np.testing.assert_allclose(imp.fisher["l1"], ref / count, rtol=2e-4, atol=1e-6 * ref.max() / count)
    with pytest.raises(ConversionError, match="no adapted module influenced the logits"):
        component_fisher(model, Adapter(modules={"side": mods["side"]}), data, labels="data", logits=logits)


def test_importance_needs_absolute_dp_and_hostile_info_is_dropped(tmp_path: Path) -> None:
    ad = tiny_adapter()
    imp = Importance({m.name: np.ones(int(m.params["rank"])) for m in ad}, {m.name: spectrum_with_factors(m)[0].S for m in ad})
    assert RerankPolicy(budget=1).effective_weighting == "balanced"  # the data-free default
    assert RerankPolicy(budget=1, importance=imp).effective_weighting == "absolute"  # importance's own objective
    RerankPolicy(budget=10_000, importance=imp, weighting="balanced").rule()  # weighted errors, floored
    for kw in ({"weighting": "relative"}, {"method": "greedy"}):
        with pytest.raises(ConversionError, match="weighting 'absolute' or 'balanced' and method 'dp' only"):
            RerankPolicy(budget=10_000, importance=imp, **kw).rule()
    from safetensors.numpy import save_file

    t = {f"{n}.fisher": imp.fisher[n] for n in imp.fisher} | {f"{n}.S": imp.singular_values[n] for n in imp.fisher}
    meta = {"adapterpack.importance": "1", "adapterpack.importance.info": "[" * 100_000}
    save_file(t, str(tmp_path / "deep.safetensors"), metadata=meta)
    assert load_importance(tmp_path / "deep.safetensors").info == {}


def test_cli_refuses_text_that_is_not_utf8(tmp_path: Path) -> None:
    from adapterpack.examples import example_path

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not text")
    model = tmp_path / "model"
    model.mkdir()
    r = CliRunner().invoke(main, ["importance", str(example_path()), str(model), str(tmp_path / "o.st"), "--text", str(bad)])
    assert r.exit_code == 1 and "not UTF-8 text" in r.output and not (tmp_path / "o.st").exists()
