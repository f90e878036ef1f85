"""The torch nola decoder: bases generated on the device equal numpy's, decoded factors agree with
the numpy decoder and the spec reference, shared bases, budget tiling, refusals, ``load``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import adapterpack
import adapterpack.torch as apt
from adapterpack import errors
from adapterpack.adapter import Adapter
from adapterpack.encodings.nola import decode_many as numpy_decode_many
from adapterpack.torch.decoders import decode, get_torch_decoder
from adapterpack.torch.decoders.nola import combine, decode_many, decode_nola
from tests.test_nola import nola_module, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_nola_has_its_own_torch_decoder() -> None:
    assert get_torch_decoder("nola") is decode_nola


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [{}, {"A0": "stored", "B0": "stored"}, {"fan_in_fan_out": True, "B0": "generated"}, {"k_a": 0}])
def test_torch_decode_matches_numpy_and_the_spec(device: str, params: dict) -> None:
    m = nola_module(**params)
    f = decode(m, torch.device(device), None)
    g = m.factors()
    assert f.A.device.type == device and f.A.dtype == torch.float32
    np.testing.assert_allclose(f.A.cpu().numpy(), g.A, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f.B.cpu().numpy(), g.B, rtol=1e-6, atol=1e-6)
    assert (f.scale, f.base_shape, f.transpose) == (g.scale, g.base_shape, g.transpose)
    d = f.scale * (f.B.double() @ f.A.double()).cpu().numpy()
    want = reference(m)
    got = d.T if f.transpose else d
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_dtype_is_applied_after_summing() -> None:
    m = nola_module()
    f = decode(m, torch.device("cpu"), torch.bfloat16)
    ref = decode(m, torch.device("cpu"), None)
    assert f.A.dtype == torch.bfloat16 and torch.equal(f.A, ref.A.to(torch.bfloat16))


def test_shared_bases_match_separate_decodes() -> None:
    mods = [nola_module(f"m{i}", k_a=2 + i, out=6 if i % 2 else 4) for i in range(4)]
    together = decode_many(mods, "cpu")
    np_together = numpy_decode_many(mods)
    for m in mods:
        alone = decode_nola(m, torch.device("cpu"), None)
        torch.testing.assert_close(together[m.name].A, alone.A, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(together[m.name].B, alone.B, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(together[m.name].A.numpy(), np_together[m.name].A, rtol=1e-6, atol=1e-6)


def test_budget_tiling_gives_the_same_sums() -> None:
    coef = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 30)))
    whole = combine(1, 2, 0, coef, 999)
    tiled = combine(1, 2, 0, coef, 999, budget=28 * 12 * 2)  # 12 elements x 2 bases at a time
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-12)


def test_non_finite_coefficients_are_refused() -> None:
    m = nola_module()
    m.tensors["alpha"][0] = np.nan
    with pytest.raises(errors.RecordError, match="alpha coefficients are not finite"):
        decode(m, torch.device("cpu"), None)


def test_unknown_generator_is_refused_by_the_torch_decoder() -> None:
    m = nola_module(generator="xorshift")
    with pytest.raises(errors.GeneratorError, match="'xorshift'"):
        decode(m, torch.device("cpu"), None)


def test_load_decodes_nola_files(tmp_path: Path) -> None:
    mods = [nola_module("x"), nola_module("y", A0="stored")]
    path = tmp_path / "n.apack"
    adapterpack.save(Adapter(modules={m.name: m for m in mods}), path, codec="raw")
    loaded = apt.load(path)
    for m in mods:
        t = loaded[m.name]
        np.testing.assert_allclose((t.scale * t.B @ t.A).numpy(), m.delta(), rtol=1e-5, atol=1e-6)


def test_load_generates_shared_bases_once_for_all_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load`` hands every nola record to the bulk decoder: four same-shape modules sharing a seed
    cost one generation per factor kind (2), not one per module and factor (8). Values agree with
    decoding each alone up to float32 summation order (a batched product may block differently)."""
    import adapterpack.torch.decoders.nola as tn

    mods = [nola_module(f"layers.{i}.q") for i in range(4)]
    path = tmp_path / "n.apack"
    adapterpack.save(Adapter(modules={m.name: m for m in mods}), path, codec="raw")
    calls = []
    real_combine = tn.combine
    monkeypatch.setattr(tn, "combine", lambda *a, **k: calls.append(a[:4]) or real_combine(*a, **k))
    loaded = apt.load(path)
    assert len(calls) == 2
    assert list(loaded) == [m.name for m in mods]
    for m in mods:
        alone = decode_nola(m, torch.device("cpu"), None)
        torch.testing.assert_close(loaded[m.name].A, alone.A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(loaded[m.name].B, alone.B, rtol=1e-6, atol=1e-7)
    assert torch.equal(apt.load(path)["layers.2.q"].A, loaded["layers.2.q"].A)  # the same file decodes the same


def test_bulk_decoding_keeps_each_records_own_dtype() -> None:
    """A float32 record decoded beside a float64 one sharing its basis comes back float32, as alone."""
    m32 = nola_module("a")
    m64 = nola_module("b")
    m64.tensors = {k: v.astype(np.float64) for k, v in m64.tensors.items()}
    together = decode_many([m32, m64], "cpu")
    alone = decode_nola(m32, torch.device("cpu"), None)
    assert together["a"].A.dtype == alone.A.dtype == torch.float32 and together["b"].A.dtype == torch.float64
    torch.testing.assert_close(together["a"].A, alone.A, rtol=1e-6, atol=1e-7)
