"""Spectra (``inspect --spectrum``, ``--plot``) against dense numpy SVDs of the real bundled adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import adapterpack
from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.cli import main
from adapterpack.encodings.lower import as_svd
from adapterpack.errors import MissingDependencyError
from adapterpack.examples import example_path
from adapterpack.ops.spectrum import ENERGY_LEVELS, ModuleSpectrum, adapter_spectra, module_spectrum, plot_spectra

EXAMPLE = example_path()


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def dense_singular_values(m: Module) -> np.ndarray:
    """Singular values of the dense float64 ΔW, the slow way (what the spectra must agree with)."""
    return np.linalg.svd(_dense(m), compute_uv=False)


def _dense(m: Module) -> np.ndarray:
    f = m.factors()
    return f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """Smallest k with Σ_{i<k} σᵢ² ≥ fraction·Σ σᵢ², counted directly."""
    e = s.astype(np.float64) ** 2
    for k in range(len(e) + 1):
        if e[:k].sum() >= fraction * e.sum() * (1 - 1e-12):
            return k
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def real() -> Adapter:
    return adapterpack.open(EXAMPLE)


@pytest.fixture(scope="module")
def sample(real: Adapter) -> list[Module]:
    """q, k, v and o of a few layers (dense SVDs are what costs)."""
    names = [
        f"model.layers.{i}.self_attn.{p}" for i, p in ((0, "q_proj"), (7, "k_proj"), (16, "v_proj"), (29, "o_proj"), (29, "v_proj"))
    ]
    return [real.module(n) for n in names]


@pytest.fixture(scope="module")
def dense(sample: list[Module]) -> dict[str, np.ndarray]:
    """Singular values of each sampled module's dense float64 ΔW, computed once."""
    return {m.name: dense_singular_values(m) for m in sample}


def test_spectra_equal_dense_svds_of_real_modules(sample: list[Module], dense: dict[str, np.ndarray]) -> None:
    for m in sample:
        s, d = dense[m.name], _dense(m)
        ms = ModuleSpectrum.of(m)
        assert ms.shape == d.shape
        np.testing.assert_allclose(ms.singular_values, s[: ms.singular_values.size], rtol=0, atol=1e-12 * s[0])
        assert ms.numerical_rank == int(np.sum(s > max(d.shape) * np.finfo(np.float64).eps * s[0])) == 8  # matrix_rank's rule
        for f in ENERGY_LEVELS:
            assert ms.rank_for_energy(f) == energy_rank(s, f), (m.name, f)
        curve = np.cumsum(s[:8] ** 2) / np.sum(s**2)
        np.testing.assert_allclose(ms.energy_curve, curve, rtol=1e-10)
        assert ms.energy == pytest.approx(float(np.sum(d**2)), rel=1e-10)


def test_the_real_ranks_are_not_all_the_same(real: Adapter) -> None:
    """The 99% ranks of the trained adapter spread over 1..8: a test that they are computed, not constant."""
    r99 = {s.rank_for_energy(0.99) for s in adapter_spectra(real)}
    assert min(r99) <= 2 and max(r99) == 8


def _exploding(dtype: str, shape: tuple[int, ...]) -> StoredTensor:
    def boom() -> np.ndarray:
        raise AssertionError("singular vectors were read")

    return StoredTensor(dtype, shape, 0, "raw", boom)


def test_svd_records_read_only_their_singular_values(real: Adapter, dense: dict[str, np.ndarray]) -> None:
    m = real.module("model.layers.29.self_attn.o_proj")
    rec = as_svd(m)
    lazy = Module(
        rec.name,
        "svd",
        rec.base_shape,
        rec.params,
        {
            "S": rec.array("S"),
            "Ut": _exploding("float32", rec.array("Ut").shape),
            "Vt": _exploding("float32", rec.array("Vt").shape),
        },
    )
    got = ModuleSpectrum.of(lazy)
    want = dense[m.name]
    assert got.encoding == "svd" and got.shape == (576, 576)
    np.testing.assert_allclose(got.singular_values, want[:8], rtol=1e-6)  # S is stored in float32
    assert got.rank_for_energy(0.99) == energy_rank(want, 0.99)


def test_zero_module_is_rank_zero() -> None:
    m = Module(
        "z", "lora", (6, 5), {"rank": 2, "alpha": 2.0}, {"A": np.zeros((2, 5), np.float32), "B": np.zeros((6, 2), np.float32)}
    )
    ms = ModuleSpectrum.of(m)
    assert ms.numerical_rank == 0 and ms.energy == 0.0
    assert [ms.rank_for_energy(f) for f in ENERGY_LEVELS] == [0, 0, 0]
    assert ms.energy_curve.tolist() == [0.0, 0.0]


def test_spectrum_of_non_finite_factors_is_a_clear_error() -> None:
    from adapterpack.errors import ConversionError

    a = np.ones((2, 5), np.float32)
    a[0, 0] = np.nan
    m = Module("bad", "lora", (6, 5), {"rank": 2, "alpha": 2.0}, {"A": a, "B": np.ones((6, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"'bad'.*non-finite"):
        module_spectrum(m)


# --- CLI ---------------------------------------------------------------------------------------------


def test_inspect_spectrum_json(real: Adapter, sample: list[Module], dense: dict[str, np.ndarray]) -> None:
    r = run("inspect", EXAMPLE, "--spectrum", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    (a,) = report["adapters"]
    assert a["modules"] and len(a["spectrum"]["modules"]) == len(real) == 120
    by_name = {m["name"]: m for m in a["spectrum"]["modules"]}
    for m in sample:
        got, s = by_name[m.name], dense[m.name]
        assert set(got) == {
            "name", "encoding", "rank", "shape", "dora", "norm", "numerical_rank",
            "rank_90", "rank_95", "rank_99", "singular_values", "energy_curve",
        }  # fmt: skip
        assert got["rank"] == 8 and len(got["singular_values"]) == len(got["energy_curve"]) == 8
        np.testing.assert_allclose(got["singular_values"], s[:8], rtol=0, atol=1e-12 * s[0])
        assert got["rank_99"] == energy_rank(s, 0.99) and got["rank_90"] == energy_rank(s, 0.90)
        assert got["energy_curve"][-1] == pytest.approx(1.0, abs=1e-12)
    summary = a["spectrum"]["summary"]
    r99 = sorted(m["rank_99"] for m in by_name.values())
    assert summary["rank_99"] == {"min": r99[0], "median": r99[59], "max": r99[-1]}
    assert summary["rank"] == {"min": 8, "median": 8, "max": 8}


def test_inspect_spectrum_table(real: Adapter) -> None:
    r = run("inspect", EXAMPLE, "--spectrum")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    spectra = {s.module: s for s in adapter_spectra(real)}
    row = next(line for line in lines if line.startswith("model.layers.0.self_attn.q_proj "))
    cells = row.split()
    s = spectra["model.layers.0.self_attn.q_proj"]
    assert cells[1:6] == [str(x) for x in (8, s.numerical_rank, *(s.rank_for_energy(f) for f in ENERGY_LEVELS))]
    assert sum(line.startswith("model.layers.") for line in lines) == 120
    assert any(line.startswith("ranks ") and "99% " in line for line in lines)


def test_inspect_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the test extra installs it; this guards only a bare checkout
    png = tmp_path / "spectra.png"
    r = run("inspect", EXAMPLE, "--plot", png)
    assert r.exit_code == 0, r.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert f"plot     {png}" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["spectra.png"]  # no temp file left beside it


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'adapterpack\[plot\]'"):
        plot_spectra([], tmp_path / "x.png")
    r = CliRunner().invoke(main, ["inspect", str(EXAMPLE), "--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip() == "adapterpack: --plot needs matplotlib: pip install 'adapterpack[plot]'"
    assert not any(tmp_path.iterdir())


def test_plot_caps_the_adapters_drawn(real: Adapter, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image  # matplotlib depends on pillow

    from adapterpack.ops.spectrum import MAX_PLOT_ADAPTERS

    mods = [s.as_dict() for s in adapter_spectra(real)][:4]
    one, many = tmp_path / "one.png", tmp_path / "many.png"
    plot_spectra([("a", mods)], one)
    plot_spectra([(f"a{i}", mods) for i in range(MAX_PLOT_ADAPTERS + 5)], many)
    h1, hn = Image.open(one).size[1], Image.open(many).size[1]
    assert hn == pytest.approx(MAX_PLOT_ADAPTERS * h1, rel=0.05)  # one row per adapter, no more than the cap
