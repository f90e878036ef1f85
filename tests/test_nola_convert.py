"""nola → lora / svd / PEFT (exact, through Factors) and lora → nola fits (honest errors, exact at full k)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack import errors
from adapterpack.adapter import Adapter
from adapterpack.encodings.lower import as_lora, as_svd, lora_from_factors
from adapterpack.encodings.nola_fit import fit_adapter, fit_nola, lowrank_norm
from adapterpack.factors import Factors
from adapterpack.formats.peft import read_peft, write_peft
from tests.test_nola import nola_module
from tools.bench.common import example_dir


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("params", [{}, {"fan_in_fan_out": True, "B0": "generated"}, {"A0": "stored"}])
def test_nola_lowers_to_lora_and_svd_exactly(params: dict) -> None:
    m = nola_module(**params)
    want = m.delta().astype(np.float64)
    lora = as_lora(m)
    assert lora.encoding == "lora" and lora.params["rank"] == m.params["rank"]
    assert _rel(lora.delta(), want) < 1e-6
    svd = as_svd(m)
    assert svd.encoding == "svd" and _rel(svd.delta(), want) < 1e-6


def test_nola_adapter_exports_to_peft(tmp_path: Path) -> None:
    mods = [nola_module("model.layers.0.self_attn.q_proj"), nola_module("model.layers.0.self_attn.v_proj", out=4)]
    ad = Adapter(base_model="test/tiny", modules={m.name: m for m in mods})
    write_peft(ad, tmp_path / "peft")
    back = read_peft(tmp_path / "peft")
    for m in mods:
        assert back.module(m.name).encoding == "lora"
        assert _rel(back.delta(m.name), m.delta()) < 1e-6


def _target(seed: int = 0, out: int = 12, inp: int = 16, r: int = 2) -> Factors:
    rng = np.random.default_rng(seed)
    return Factors(
        rng.standard_normal((r, inp)).astype(np.float32), rng.standard_normal((out, r)).astype(np.float32), 0.5, (out, inp)
    )


def test_fit_is_exact_when_the_bases_span_every_factor() -> None:
    t = _target()
    fit = fit_nola(t, k_A=2 * 16, k_B=2 * 12, dtype=np.float64, iterations=20)
    assert fit.error < 1e-7
    assert _rel(fit.module.delta(), t.delta()) < 1e-6


def test_fit_error_is_honest_and_never_increases() -> None:
    t = _target(1)
    fit = fit_nola(t, k_A=12, k_B=9, iterations=15, tol=0.0)
    dense = _rel(fit.module.delta(), t.delta())  # the stored (float32) record, decoded, against dense ΔW
    assert abs(fit.error - dense) < 1e-6
    assert 0.05 < fit.error < 1.0
    assert all(b <= a * (1 + 1e-9) for a, b in zip(fit.history, fit.history[1:]))
    assert fit.num_params == 21 and fit.module.params["k_A"] == 12


def test_more_coefficients_fit_better() -> None:
    t = _target(2)
    errs = [fit_nola(t, k_A=k, k_B=k, iterations=10).error for k in (4, 12, 20)]
    assert errs[0] > errs[1] > errs[2]


def test_fit_keeps_fan_in_fan_out() -> None:
    t = _target(3)
    t = Factors(t.A, t.B, t.scale, (16, 12), transpose=True)
    fit = fit_nola(t, k_A=32, k_B=24, dtype=np.float64)
    assert fit.module.params["fan_in_fan_out"] is True and fit.module.base_shape == (16, 12)
    assert _rel(fit.module.delta(), t.delta()) < 1e-6


def test_lowrank_norm_matches_dense() -> None:
    rng = np.random.default_rng(4)
    p, q = rng.standard_normal((30, 5)), rng.standard_normal((5, 20))
    assert abs(lowrank_norm(p, q) - np.linalg.norm(p @ q)) < 1e-12 * np.linalg.norm(p @ q)


def test_fit_adapter_on_the_real_example(tmp_path: Path) -> None:
    """Two modules of the bundled SmolLM2 adapter at k = 32: a random basis leaves most of ΔW
    unexplained (the honest error says so), the file round-trips and decodes to what was reported."""
    with adapterpack.open(example_dir()) as src:
        names = list(src.modules)[:2]
        small = Adapter(name=src.name, base_model=src.base_model, modules={n: src.modules[n] for n in names})
        out, fits = fit_adapter(small, k=32, seed=5)
        assert [m.params["stream"] for m in out] == [0, 1]
        for n in names:
            f = fits[n]
            assert 0.9 < f.error < 1.0  # 64 numbers cannot carry a rank-8 576-wide LoRA
            assert abs(_rel(out.module(n).delta(), src.delta(n)) - f.error) < 1e-5
        path = tmp_path / "nola.apack"
        adapterpack.save(out, path)
        with adapterpack.open(path) as back:
            for n in names:
                assert np.array_equal(back.module(n).array("alpha"), out.module(n).array("alpha"))
                assert back.module(n).num_params == 64


def test_target_error_mode_doubles_k_until_reached() -> None:
    t = _target(5)
    ad = Adapter(modules={"m": lora_from_factors("m", t, dtype="float32")})
    out, fits = fit_adapter(ad, target_error=1e-4, iterations=20)
    k = out.module("m").params["k_A"]
    assert fits["m"].error <= 1e-4 and k == 32  # 16 was not enough; 32 = r·max(in, out) spans every factor
    loose, fits = fit_adapter(ad, target_error=0.999, iterations=5)
    assert loose.module("m").params["k_A"] == 16 and fits["m"].error <= 0.999
    capped, fits = fit_adapter(ad, target_error=1e-9, k_max=8)
    assert capped.module("m").params["k_A"] == 8 and fits["m"].error > 1e-9  # reported, not rounded to the target


def test_fit_arguments_are_checked() -> None:
    ad = Adapter(modules={"m": nola_module("m")})
    with pytest.raises(errors.ConversionError, match="exactly one"):
        fit_adapter(ad, k=4, target_error=0.1)
    with pytest.raises(errors.ConversionError, match="exactly one"):
        fit_adapter(ad)
    with pytest.raises(errors.ConversionError, match="target_error"):
        fit_adapter(ad, target_error=1.5)
    with pytest.raises(errors.ConversionError, match="a0"):
        fit_nola(_target(), k_A=2, k_B=2, a0="stored")


def test_embeddings_and_dora_are_not_fitted() -> None:
    t = _target(6)
    emb = Factors(t.A, t.B, t.scale, (16, 12), transpose=True, layout="embedding")
    with pytest.raises(errors.ConversionError, match="linear modules only"):
        fit_nola(emb, k_A=4, k_B=4)
    dora = lora_from_factors("d", t, dtype="float32")
    dora.params["dora"] = True
    dora.tensors["magnitude"] = np.ones(12, np.float32)
    with pytest.raises(errors.ConversionError, match="DoRA"):
        fit_adapter(Adapter(modules={"d": dora}), k=4)
