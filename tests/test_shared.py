"""The ``shared`` encoding: record checks, ΔW against a float64 reference, blob sharing, one-member reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Module
from adapterpack.container.reader import ApackReader
from adapterpack.encodings import get_encoding
from adapterpack.errors import RankError, RecordError
from tools.vectors import shared as vec

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"


def _rec(U: np.ndarray, V: np.ndarray, S: np.ndarray, **params: object) -> Module:
    p = {"rank": U.shape[1], "form": "full" if S.ndim == 2 else "diagonal"} | params
    fifo = bool(params.get("fan_in_fan_out")) or params.get("layout") == "embedding"
    base = (V.shape[0], U.shape[0]) if fifo else (U.shape[0], V.shape[0])
    return Module("m", "shared", base, p, {"U": U, "V": V, "S": S})


@pytest.mark.parametrize("form", ["full", "diagonal"])
@pytest.mark.parametrize("transposed", [{}, {"fan_in_fan_out": True}, {"layout": "embedding"}])
def test_delta_matches_float64_reference(form: str, transposed: dict) -> None:
    rng = np.random.default_rng(0)
    U, V = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    S = rng.standard_normal((3, 3) if form == "full" else (3,)).astype(np.float32)
    m = _rec(U, V, S, **transposed)
    get_encoding("shared").validate(m)
    S64 = S.astype(np.float64) if form == "full" else np.diag(S.astype(np.float64))
    ref = U.astype(np.float64) @ S64 @ V.astype(np.float64).T
    if transposed:
        ref = ref.T
    got = m.delta()
    assert got.shape == m.base_shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    f = m.factors()
    assert f.scale == 1.0 and f.transpose == bool(transposed)


@pytest.mark.parametrize(
    ("change", "error", "text"),
    [
        (lambda m: m.params.update(rank=4), RankError, "rank 4 does not fit"),
        (lambda m: m.tensors.update(S=np.zeros((3,), np.float32)), RankError, "full S the shape [3, 3]"),
        (lambda m: m.params.update(form="block"), RecordError, "form must be one of"),
        (lambda m: m.tensors.update(V=np.zeros((5, 3), np.float16)), RecordError, "share one float dtype"),
        (lambda m: setattr(m, "base_shape", (5, 7)), RecordError, "base_shape [5, 7] disagrees"),
        (lambda m: m.params.update(layout="embedding", fan_in_fan_out=True), RecordError, "only with layout linear"),
        (lambda m: m.tensors.pop("S"), RecordError, "missing ['S']"),
    ],
)
def test_bad_records_are_refused(change, error: type, text: str) -> None:
    rng = np.random.default_rng(1)
    m = _rec(rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32),
             rng.standard_normal((3, 3)).astype(np.float32))
    change(m)
    with pytest.raises(error) as info:
        get_encoding("shared").validate(m)
    assert text in str(info.value)


def test_vector_records_share_their_bases() -> None:
    """Both members of the full-form vector reference one U and one V blob for the module they share."""
    with ApackReader(VECTORS / "shared_full_raw.apack") as r:
        en, de = r.index.adapters
        q = "model.layers.0.self_attn.q_proj"
        t_en = next(m for m in en["modules"] if m["name"] == q)["tensors"]
        t_de = next(m for m in de["modules"] if m["name"] == q)["tensors"]
        assert (t_en["U"], t_en["V"]) == (t_de["U"], t_de["V"])
        assert t_en["S"] != t_de["S"]
        # U and V once per module, one S per record, en's pass-through tensor: nothing is duplicated
        assert [t["name"] for t in en["tensors"]] == ["model.norm.weight"] and de["tensors"] == []
        assert len(r.index.blobs) == 2 * 2 + 3 + 1


def test_opening_one_member_reads_only_its_blobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """adapterpack.open(bank, adapter=name) then delta(): reads the shared U, V and that member's S, nothing else."""
    path = VECTORS / "shared_diagonal_raw.apack"
    read: list[int] = []
    orig = ApackReader.read_blob

    def spy(self: ApackReader, i: int) -> np.ndarray:
        read.append(i)
        return orig(self, i)

    monkeypatch.setattr(ApackReader, "read_blob", spy)
    with adapterpack.open(path, adapter="task1") as a:
        (m,) = list(a)
        d = m.delta()
    with ApackReader(path) as r:
        raw = r.index.adapters[1]["modules"][0]["tensors"]
    assert sorted(set(read)) == sorted({raw["U"], raw["V"], raw["S"]})
    bank = vec.diagonal_bank()
    b = bank.modules["transformer.h.0.attn.c_attn"]
    ref = (b.U.astype(np.float64) * bank.members[1].S[b.name].astype(np.float64)) @ b.V.astype(np.float64).T
    np.testing.assert_allclose(d, ref.T, rtol=1e-12, atol=1e-12)
