"""numpy ``to_factors`` of lora / svd / shared records validates an in-memory record first: a malformed one built in
Python is the adapterpack error a file's would be, not a numpy IndexError / ValueError (or, for a rank that does not
fit A, a silently wrong scale). Records a reader built from a file were validated by it and are not validated again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.encodings import qsvd as Q
from adapterpack.encodings.base import get_encoding
from adapterpack.errors import RankError, RecordError
from adapterpack.factors import Factors
from adapterpack.ops.rerank import RerankPolicy, rerank


def _f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _lora(params: dict, a: tuple[int, ...] = (2, 6), b: tuple[int, ...] = (8, 2)) -> Module:
    return Module("m", "lora", (8, 6), params, {"A": _f32(*a), "B": _f32(*b, seed=1)})


MALFORMED = {
    # old: IndexError (b.shape[1]) in to_factors
    "lora B 1-D": (_lora({"rank": 2, "alpha": 2.0}, b=(8,)), RecordError),
    # old: KeyError 'alpha' in scale()
    "lora without alpha": (_lora({"rank": 2}), RecordError),
    # old: no error at all, the scale alpha/4 of a rank-2 record
    "lora rank not A's rows": (_lora({"rank": 4, "alpha": 2.0}), RankError),
    # old: ValueError (operands could not be broadcast) in to_factors
    "svd Vt rows not rank": (
        Module("m", "svd", (8, 6), {"rank": 2}, {"S": np.array([2.0, 1.0], np.float32), "Ut": _f32(2, 8), "Vt": _f32(3, 6)}),
        RankError,
    ),
    # old: ValueError (matmul shapes) in to_factors
    "shared S 3x3 for rank 2": (
        Module("m", "shared", (8, 6), {"rank": 2, "form": "full"}, {"U": _f32(8, 2), "V": _f32(6, 2), "S": _f32(3, 3)}),
        RankError,
    ),
    # old: ValueError (operands could not be broadcast: U·diag(S))
    "shared diagonal S of 3 for rank 2": (
        Module("m", "shared", (8, 6), {"rank": 2, "form": "diagonal"}, {"U": _f32(8, 2), "V": _f32(6, 2), "S": _f32(3)}),
        RankError,
    ),
    # old: ValueError from numpy's reshape (a base_shape the factors do not make)
    "lora base_shape not the factors'": (
        Module("m", "lora", (9, 6), {"rank": 2, "alpha": 2.0}, {"A": _f32(2, 6), "B": _f32(8, 2)}),
        RecordError,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_in_memory_record_is_an_adapterpack_error(case: str) -> None:
    module, error = MALFORMED[case]
    with pytest.raises(error) as e:
        module.factors()
    assert type(e.value) is error and "module 'm'" in str(e.value)
    with pytest.raises(error):
        get_encoding(module.encoding).to_factors(module)
    with pytest.raises(error):
        module.delta()


def test_rerank_of_a_malformed_in_memory_record_says_so() -> None:
    """An op reading factors (rerank) gets the record error too, instead of re-ranking a wrongly scaled ΔW."""
    ad = Adapter(modules={"m": _lora({"rank": 4, "alpha": 2.0})})
    with pytest.raises(RankError, match="rank 4 does not fit A"):
        rerank(ad, RerankPolicy(rank=1))


def test_well_formed_records_decode_as_before() -> None:
    m = _lora({"rank": 2, "alpha": 3.0})
    f = m.factors()
    assert f.scale == 1.5 and np.array_equal(f.A, m.array("A")) and np.array_equal(f.B, m.array("B"))
    svd = Module("m", "svd", (8, 6), {"rank": 2}, {"S": np.array([2.0, 1.0], np.float32), "Ut": _f32(2, 8), "Vt": _f32(2, 6)})
    np.testing.assert_allclose(svd.delta(), (svd.array("Ut").T * [2.0, 1.0]) @ svd.array("Vt"), rtol=1e-6)


def _count_validations(monkeypatch: pytest.MonkeyPatch, encoding: str) -> list[str]:
    enc = type(get_encoding(encoding))
    calls: list[str] = []
    original = enc.validate

    def counted(self: object, module: Module) -> None:
        calls.append(module.name)
        original(self, module)  # type: ignore[arg-type]

    monkeypatch.setattr(enc, "validate", counted)
    return calls


@pytest.mark.parametrize("encoding", ["lora", "svd", "qsvd"])
def test_file_records_are_not_validated_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str) -> None:
    """The reader validated every record when it built it: factors() of a file record does not validate again (file loads
    cost what they did), an in-memory record's does, once per call."""
    mods = {}
    for i in range(3):
        lo = _lora({"rank": 2, "alpha": 2.0})
        f = Factors(A=lo.array("A"), B=lo.array("B") * (i + 1), scale=1.0, base_shape=(8, 6))
        if encoding == "lora":
            m = Module(f"l{i}", "lora", (8, 6), lo.params, {"A": f.A, "B": f.B})
        elif encoding == "svd":
            from adapterpack.encodings.svd import from_spectrum
            from adapterpack.linalg.lowrank import spectrum_of

            m = from_spectrum(f"l{i}", spectrum_of(f), f)
        else:
            m = Q.from_factors(f"l{i}", f, [8, 8])
        mods[m.name] = m
    path = tmp_path / "a.apack"
    adapterpack.save(Adapter(modules=mods), path)
    calls = _count_validations(monkeypatch, encoding)
    with adapterpack.open(path) as ad:
        assert all(isinstance(t, StoredTensor) for m in ad for t in m.tensors.values())
        opened = len(calls)  # the reader's own validation
        got = {m.name: m.factors() for m in ad}
        assert len(calls) == opened
    for name, m in mods.items():
        before = len(calls)
        want = m.factors()
        assert calls[before:] == [name]
        assert np.array_equal(got[name].A, want.A) and np.array_equal(got[name].B, want.B)
