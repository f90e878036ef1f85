"""Re-ranking: rules, budgets, outputs (svd / lora / PEFT / kohya), notes, bad input, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.formats.kohya import read_kohya
from adapterpack.formats.peft import read_peft
from adapterpack.ops.rerank import RerankPolicy, rerank, rerank_file
from tools import make_vectors

EXAMPLE = example_path()


@pytest.fixture(scope="module")
def real() -> Adapter:
    return adapterpack.open(EXAMPLE)


def dense(m: Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    f = m.factors()
    d = f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return d, u, s, vt


def test_uniform_rank_is_the_dense_truncation(tmp_path: Path, real: Adapter) -> None:
    out, report = rerank(real, RerankPolicy(rank=3))
    names = list(real.modules)[::17]
    for p in report.modules:
        assert (p.old_rank, p.new_rank, out.module(p.name).encoding) == (8, 3, "svd")
    for name in names:
        d, u, s, vt = dense(real.module(name))
        p = next(p for p in report.modules if p.name == name)
        assert p.retained == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s**2), rel=1e-10)
        assert p.rel_error == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2)), rel=1e-9)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(out.delta(name), best, rtol=0, atol=1e-6 * np.abs(d).max())
    path = tmp_path / "r3.apack"
    adapterpack.save(out, path, codec="raw")
    back = adapterpack.open(path)
    assert back.module(names[0]).params["rank"] == 3
    # bytes after: rank·(out+in)·4 + 4·rank for S, as the report says, and as the file holds
    assert sum(p.bytes_after for p in report.modules) == back.decoded_bytes


def test_budget_beats_uniform_rank_at_equal_bytes(real: Adapter) -> None:
    _, uniform = rerank(real, RerankPolicy(rank=4))
    spent = uniform.total["bytes_after"]
    _, budget = rerank(real, RerankPolicy(budget=spent))
    assert budget.total["bytes_after"] <= spent
    kept = sum(p.energy * p.retained for p in budget.modules)
    assert kept >= sum(p.energy * p.retained for p in uniform.modules)
    assert len({p.new_rank for p in budget.modules}) > 1  # it does spend bytes unevenly
    _, rel = rerank(real, RerankPolicy(budget=spent, weighting="relative"))
    assert rel.total["bytes_after"] <= spent and rel.total["min_retained"] >= budget.total["min_retained"]
    _, ratio = rerank(real, RerankPolicy(budget_ratio=0.25))
    assert ratio.total["bytes_after"] <= 0.25 * ratio.total["bytes_before"]


def test_energy_and_sv_ratio_rules(real: Adapter) -> None:
    _, report = rerank(real, RerankPolicy(energy=0.9))
    for p in report.modules:
        assert p.retained >= 0.9 * (1 - 1e-12)
        _, _, s, _ = dense(real.module(p.name)) if p.name.endswith("layers.3.self_attn.q_proj") else (0, 0, None, 0)
        if s is not None:
            assert p.new_rank == int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.9 - 1e-12)) + 1
    _, sv = rerank(real, RerankPolicy(sv_ratio=2.0))
    name = "model.layers.5.self_attn.v_proj"
    _, _, s, _ = dense(real.module(name))
    assert next(p for p in sv.modules if p.name == name).new_rank == int(np.sum(s >= s[0] / 2.0 * (1 - 1e-12)))


def test_outputs_peft_and_kohya_keep_delta(tmp_path: Path, real: Adapter) -> None:
    res = rerank_file(EXAMPLE, tmp_path / "peft", RerankPolicy(energy=0.95, encoding="lora"), to="peft")
    back = read_peft(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    ranks = {p.name: p.new_rank for p in res.report.modules}
    for name in list(real.modules)[::23]:
        d, u, s, vt = dense(real.module(name))
        r = ranks[name]
        assert back.module(name).params["rank"] == r
        np.testing.assert_allclose(back.delta(name), (u[:, :r] * s[:r]) @ vt[:r], rtol=0, atol=1e-6 * np.abs(d).max())
    rerank_file(EXAMPLE, tmp_path / "k.safetensors", RerankPolicy(rank=2, encoding="lora"), to="kohya")
    k = read_kohya(tmp_path / "k.safetensors")
    name = "model.layers.9.self_attn.o_proj"
    d, u, s, vt = dense(real.module(name))
    np.testing.assert_allclose(k.delta(name), (u[:, :2] * s[:2]) @ vt[:2], rtol=0, atol=1e-6 * np.abs(d).max())


def test_notes_padding_zero_modules_dora_and_module_filter() -> None:
    features = make_vectors.features()
    out, report = rerank(features, RerankPolicy(rank=50))
    by = {p.name: p for p in report.modules}
    assert any("DoRA" in n for n in report.notes)
    dora = next(n for n, m in features.modules.items() if m.params.get("dora"))
    assert not by[dora].selected and out.module(dora) is features.module(dora)
    assert all("kept" in " ".join(p.notes) for p in report.modules if p.selected)  # rank 50 > every rank: kept as is

    zero = Adapter(
        modules={
            "z": Module(
                "z",
                "lora",
                (6, 5),
                {"rank": 2, "alpha": 2.0},
                {"A": np.zeros((2, 5), np.float32), "B": np.ones((6, 2), np.float32)},
            )
        }
    )
    zout, zrep = rerank(zero, RerankPolicy(rank=1))
    assert zout.module("z").params["rank"] == 0 and "ΔW is zero" in zrep.modules[0].notes[0]
    lout, _ = rerank(zero, RerankPolicy(rank=1, encoding="lora"))
    assert lout.module("z").params["rank"] == 1 and not lout.module("z").array("B").any()

    real = adapterpack.open(EXAMPLE)
    padded, prep = rerank(real, RerankPolicy(rank=3, round_to=(1, 16), encoding="lora"))
    m = padded.module("model.layers.0.self_attn.q_proj")
    assert m.params["rank"] == 16 and not m.array("A")[8:].any()  # 8 singular values, zero-padded to 16
    assert "padded with zeros" in prep.modules[0].notes[0]

    only_q, qrep = rerank(real, RerankPolicy(rank=1, modules=r"q_proj$"))
    assert {p.name for p in qrep.modules if p.selected} == {n for n in real.modules if n.endswith("q_proj")}
    assert only_q.module("model.layers.0.self_attn.k_proj") is real.module("model.layers.0.self_attn.k_proj")


def test_bad_policies_and_inputs() -> None:
    real = adapterpack.open(EXAMPLE)
    for policy, match in [
        (RerankPolicy(), "exactly one"),
        (RerankPolicy(rank=2, energy=0.5), "exactly one"),
        (RerankPolicy(energy=1.5), "energy must be in"),
        (RerankPolicy(budget=1), "budget 1 B is below"),
        (RerankPolicy(rank=2, modules="("), "not a regular expression"),
        (RerankPolicy(rank=2, modules="nothing-matches"), "no module to re-rank"),
        (RerankPolicy(rank=2, min_rank=3, max_rank=2), "min_rank <= max_rank"),
    ]:
        with pytest.raises(ConversionError, match=match):
            rerank(real, policy)
    a = np.ones((2, 5), np.float32)
    a[0, 0] = np.inf
    bad = Adapter(modules={"x": Module("x", "lora", (6, 5), {"rank": 2, "alpha": 2.0}, {"A": a, "B": np.ones((6, 2), np.float32)})})
    with pytest.raises(ConversionError, match="'x': A holds non-finite"):
        rerank(bad, RerankPolicy(rank=1))


def test_cli(tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["rerank", str(EXAMPLE), str(tmp_path / "o.apack"), "--budget-ratio", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    # the budget is the whole file's (byteplanes may let the factors themselves exceed it)
    assert doc["dst_bytes"] == doc["file_bytes"] <= doc["budget"] == int(0.5 * doc["total"]["bytes_before"])
    assert doc["dst_format"] == "apack"
    assert adapterpack.open(tmp_path / "o.apack").module("model.layers.0.self_attn.q_proj").encoding == "svd"

    r = run(main, ["rerank", str(EXAMPLE), str(tmp_path / "dry.apack"), "--rank", "2", "--dry-run", "--summary"])
    assert r.exit_code == 0 and "120 of 120 modules re-ranked" in r.output and not (tmp_path / "dry.apack").exists()

    r = run(main, ["rerank", str(tmp_path / "o.apack"), str(tmp_path / "p"), "--rank", "1", "--to", "peft"])
    assert r.exit_code == 0, r.output
    assert read_peft(tmp_path / "p").module("model.layers.0.self_attn.q_proj").params["rank"] == 1

    # contradictory or malformed options: click refuses (exit 2) before reading anything (SRC does not exist)
    missing = str(tmp_path / "nope")
    for args in (
        ["--rank", "2", "--energy", "0.5"],
        [],
        ["--round-to", "1,x", "--rank", "2"],
        ["--budget", "lots"],
        ["--energy", "0"],
        ["--rank", "2", "--min-rank", "4", "--max-rank", "3"],
    ):
        r = run(main, ["rerank", missing, str(tmp_path / "z.apack"), *args])
        assert r.exit_code == 2, (args, r.output)
    r = run(main, ["rerank", str(EXAMPLE), str(tmp_path / "o.apack"), "--rank", "2"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = run(main, ["rerank", str(EXAMPLE), str(tmp_path / "b.apack"), "--budget", "10"])
    assert r.exit_code == 1 and "below" in r.output and not (tmp_path / "b.apack").exists()


def test_budget_holds_for_float64_output(real: Adapter) -> None:
    """S is written in float64 next to float64 vectors: the budget charges what is written."""
    out, report = rerank(real, RerankPolicy(budget_ratio=0.3, dtype="float64"))
    written = sum(out.module(p.name).decoded_bytes for p in report.modules)
    assert written == report.total["bytes_after"] <= int(0.3 * report.total["bytes_before"])


def test_cli_budget_must_be_finite(tmp_path: Path) -> None:
    for bad in ("inf", "nan", "-5"):
        r = CliRunner().invoke(main, ["rerank", str(EXAMPLE), str(tmp_path / "o.apack"), "--budget", bad])
        assert r.exit_code == 2 and "budget" in r.output, (bad, r.output)
