"""The ``nola`` encoding: validation and refusals, decoding against the spec's plain-Python
reference in float64, shared bases, chunking, and file round trips."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import adapterpack
from adapterpack import errors
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings import get_encoding
from adapterpack.encodings.nola import combine, decode_many
from adapterpack.rng import basis, basis_bits
from adapterpack.torch import rng as torch_rng
from tools.vectors import nola as spec_ref

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"


def nola_module(
    name: str = "q", out: int = 6, inp: int = 10, r: int = 2, k_a: int = 5, k_b: int = 7, seed: int = 3, **params: Any
) -> Module:
    rng = np.random.default_rng([zlib.crc32(name.encode()), out, inp, r, k_a, k_b, seed])
    p = {
        "generator": "philox4x32-10",
        "generator_version": 1,
        "seed": seed,
        "stream": 1,
        "rank": r,
        "k_A": k_a,
        "k_B": k_b,
        "scale": 0.5,
    }
    p |= params
    tensors: dict[str, Any] = {
        "alpha": rng.standard_normal(k_a).astype(np.float32),
        "beta": rng.standard_normal(k_b).astype(np.float32),
    }
    if p.get("A0") == "stored":
        tensors["A0"] = rng.standard_normal((r, inp)).astype(np.float32)
    if p.get("B0") == "stored":
        tensors["B0"] = rng.standard_normal((out, r)).astype(np.float32)
    base = (inp, out) if p.get("fan_in_fan_out") else (out, inp)
    return Module(name, "nola", base, p, tensors)


def as_json(m: Module) -> dict[str, Any]:
    return {"params": m.params, "base_shape": list(m.base_shape), "tensors": dict(m.tensors)}


def reference(m: Module) -> np.ndarray:
    """ΔW straight from spec/nola.md in float64 with the one-counter-at-a-time Philox."""
    return spec_ref.reference_delta(as_json(m), lambda t: np.asarray(t))


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"A0": "zero", "B0": "generated"},
        {"A0": "stored", "B0": "stored"},
        {"fan_in_fan_out": True},
        {"k_a": 0},
        {"seed": 2**52 + 9},
    ],
)
def test_delta_matches_the_spec_reference(params: dict[str, Any]) -> None:
    m = nola_module(**params)
    get_encoding("nola").validate(m)
    got = m.delta()
    want = reference(m)
    assert got.shape == want.shape == tuple(m.base_shape)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_float64_coefficients_decode_in_float64() -> None:
    m = nola_module()
    m.tensors = {k: v.astype(np.float64) for k, v in m.tensors.items()}
    got = m.delta()
    assert got.dtype == np.float64
    assert np.abs(got - reference(m)).max() <= 1e-13 * np.abs(got).max()


def test_vector_basis_values_match_both_generators() -> None:
    doc = json.loads((VECTORS / "nola_raw.json").read_text(encoding="utf-8"))
    picks = json.loads(doc["adapters"][0]["metadata"]["nola.basis_values"])
    assert len(picks) >= 5 and picks[0]["words"][:4] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    for p in picks:
        n = len(p["words"])
        words = basis_bits(p["seed"], p["stream"], p["kind"], p["index"], p["index"] + 1, p["first"] + n, p["first"])[0]
        assert [f"{int(w):08x}" for w in words] == p["words"]
        want = np.array(p["values"], np.float32)
        vals = basis(p["seed"], p["stream"], p["kind"], p["index"], p["index"] + 1, p["first"] + n)[0, p["first"] :]
        assert np.array_equal(vals.view(np.uint32), want.view(np.uint32))
        tv = torch_rng.basis(p["seed"], p["stream"], p["kind"], p["index"], p["index"] + 1, p["first"] + n)[0, p["first"] :]
        assert np.array_equal(tv.numpy().view(np.uint32), want.view(np.uint32))


def test_shared_bases_decode_together_as_separately() -> None:
    """Same seed and stream: one product for all; equal to decoding each record alone up to float32
    rounding (the product's summation order may differ) and to the spec."""
    mods = [nola_module(f"m{i}", k_a=3 + i, k_b=7, out=6 if i < 3 else 4) for i in range(4)]
    together = decode_many(mods)
    for m in mods:
        alone = m.factors()
        f = together[m.name]
        np.testing.assert_allclose(f.A, alone.A, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(f.B, alone.B, rtol=1e-6, atol=1e-6)
        assert np.abs(f.delta() - reference(m)).max() <= 1e-6 * np.abs(reference(m)).max()


def test_chunking_over_bases_and_elements_changes_nothing_but_rounding() -> None:
    coef = np.random.default_rng(0).standard_normal((3, 40))
    big = combine(5, 0, 0, coef, 1001)  # float64 coefficients: float64 accumulation
    tiny = combine(5, 0, 0, coef, 1001, budget=28 * 8 * 3)  # 8 elements x 3 bases per chunk
    dense = coef @ basis(5, 0, 0, 0, 40, 1001).astype(np.float64)
    assert np.abs(big - dense).max() < 1e-12 and np.abs(tiny - dense).max() < 1e-12


def test_apack_round_trip(tmp_path: Path) -> None:
    mods = [nola_module("a", A0="stored"), nola_module("b", fan_in_fan_out=True, B0="generated")]
    ad = Adapter(name="default", modules={m.name: m for m in mods})
    path = tmp_path / "n.apack"
    adapterpack.save(ad, path, codec="raw")
    with adapterpack.open(path) as back:
        for m in mods:
            g = back.module(m.name)
            assert g.encoding == "nola" and g.params == m.params
            for slot, arr in m.tensors.items():
                assert np.array_equal(g.array(slot), arr)
            assert np.array_equal(g.delta(), m.delta())


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "error", "words"),
    [
        (lambda m: m.params.update(generator="mt19937"), errors.GeneratorError, "'mt19937'"),
        (lambda m: m.params.update(generator_version=2), errors.GeneratorError, "version 2"),
        (lambda m: m.params.pop("generator"), errors.GeneratorError, "None"),
        (lambda m: m.params.update(k_A=6), errors.RecordError, "k = 6"),
        (lambda m: m.params.update(k_B=True), errors.RecordError, "k_B"),
        (lambda m: m.params.update(seed=2**53), errors.RecordError, "seed"),
        (lambda m: m.params.update(stream=-1), errors.RecordError, "stream"),
        (lambda m: m.params.update(rank=0), errors.RankError, "rank"),
        (lambda m: m.params.update(scale=float("nan")), errors.RecordError, "scale"),
        (lambda m: m.params.update(A0="random"), errors.RecordError, "A0"),
        (lambda m: m.params.update(A0="stored"), errors.RecordError, "missing ['A0']"),
        (lambda m: m.tensors.update(B0=np.zeros((6, 2), np.float32)), errors.RecordError, "unexpected ['B0']"),
        (lambda m: m.tensors.update(alpha=np.zeros(5, np.int32)), errors.RecordError, "float"),
        (lambda m: setattr(m, "base_shape", (6, 10, 1)), errors.RecordError, "2-D"),
        (lambda m: m.params.update(rank=2**31), errors.RankError, "exceeds min(out, in)"),
    ],
)
def test_bad_records_are_refused_with_their_class(edit: Any, error: type, words: str) -> None:
    m = nola_module()
    edit(m)
    with pytest.raises(errors.AdapterpackError) as info:
        get_encoding("nola").validate(m)
    assert type(info.value) is error
    assert words in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_coefficients_are_refused_on_decode(bad: float) -> None:
    m = nola_module()
    m.tensors["beta"][3] = bad
    get_encoding("nola").validate(m)  # validation reads no data
    with pytest.raises(errors.RecordError, match="1 of 7 beta coefficients are not finite"):
        m.delta()


def test_refused_vectors_name_the_generator() -> None:
    for name, words in (("nola_unknown_generator", "'mt19937'"), ("nola_unknown_generator_version", "version 2")):
        with pytest.raises(errors.GeneratorError, match=words):
            adapterpack.open(VECTORS / f"{name}.apack").close()


def test_factor_scaling_follows_the_spec() -> None:
    """One basis each, unit coefficients, zero A0: A = A_0/√1, B = B_0, ΔW = s·B·A exactly as generated."""
    m = nola_module(k_a=1, k_b=1, A0="zero", scale=1.0)
    m.tensors = {"alpha": np.ones(1, np.float32), "beta": np.full(1, 2.0, np.float32)}
    f = m.factors()
    assert np.array_equal(f.A, basis(3, 1, 0, 0, 1, 20).reshape(2, 10))
    assert np.array_equal(f.B, 2 * basis(3, 1, 1, 0, 1, 12).reshape(6, 2))
    assert math.isclose(f.scale, 1.0)


def test_torch_generator_matches_on_a_record_basis() -> None:
    m = nola_module()
    want = basis(3, 1, 0, 0, 5, 20)
    assert torch.equal(torch_rng.basis(3, 1, 0, 0, 5, 20), torch.from_numpy(want))
    assert m.params["k_A"] == want.shape[0]


def test_decoding_memory_stays_within_the_budget() -> None:
    """k = 256 bases of 16×1024 would be 16 MiB of float32 at once; with a 1 MiB budget the peak
    of numpy allocations stays a few MiB (the budget, the generator's chunk, the factors)."""
    import tracemalloc

    m = nola_module(out=64, inp=1024, r=16, k_a=256, k_b=8)
    tracemalloc.start()
    try:
        decode_many([m], budget=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
