"""Review of ``inspect --spectrum`` (ops.spectrum) on odd inputs: an svd record whose stored singular values are finite
but whose energy overflows binary64 (legal to store, format.md §3), and 1×N / N×1 / conv / embedding modules."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.errors import ConversionError
from adapterpack.ops.spectrum import adapter_spectra


def _svd(s: float) -> Module:
    ut = np.zeros((1, 4))
    ut[0, 0] = 1.0
    vt = np.zeros((1, 3))
    vt[0, 1] = 1.0
    return Module("m", "svd", (4, 3), {"rank": 1}, {"S": np.array([s]), "Ut": ut, "Vt": vt})


def test_spectrum_refuses_an_svd_record_whose_energy_overflows(tmp_path: Path) -> None:
    """S = [1e200] (float64): ``inspect --spectrum`` printed numpy's overflow warnings, a norm of inf and NaN energy
    curves (exit 0), where rerank, diff and the spectra of other encodings refuse such a ΔW naming the module."""
    path = tmp_path / "huge.apack"
    adapterpack.save(Adapter(name="x", modules={"m": _svd(1e200)}), path)
    with adapterpack.open(path) as a, warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConversionError, match="'m'"):
            adapter_spectra(a)
    r = CliRunner().invoke(main, ["inspect", str(path), "--spectrum"])
    assert r.exit_code == 1 and "too large" in r.output and "Warning" not in r.output


def test_spectra_of_odd_shapes_match_dense_svd() -> None:
    """Held up: 1×N, N×1, conv (4-D), embedding and fan_in_fan_out modules, rank above min(out, in)."""
    rng = np.random.default_rng(0)

    def lora(name: str, base: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...], **params: object) -> Module:
        p = {"rank": a[0], "alpha": 2.0 * a[0], **params}
        tensors = {"A": rng.standard_normal(a).astype(np.float32), "B": rng.standard_normal(b).astype(np.float32)}
        return Module(name, "lora", base, p, tensors)

    mods = [
        lora("row", (1, 9), (1, 9), (1, 1)),
        lora("col", (9, 1), (2, 1), (9, 2)),
        lora("conv", (6, 3, 3, 3), (2, 3, 3, 3), (6, 2, 1, 1), layout="conv"),
        lora("emb", (11, 4), (2, 11), (4, 2), layout="embedding"),
        lora("fifo", (5, 7), (2, 5), (7, 2), fan_in_fan_out=True),
        lora("wide", (3, 4), (5, 4), (3, 5)),
    ]
    ad = Adapter(name="x", modules={m.name: m for m in mods})
    for s in adapter_spectra(ad):
        d = ad.delta(s.module).astype(np.float64)
        dense = np.linalg.svd(d.reshape(d.shape[0], -1), compute_uv=False)
        k = min(s.singular_values.size, dense.size)
        np.testing.assert_allclose(s.singular_values[:k], dense[:k], rtol=1e-5, atol=1e-5 * dense[0])
        assert np.all(s.singular_values[k:] <= 1e-5 * dense[0])
