"""Review (round 2): torch decoders on in-memory records that are hostile or odd — the same adapterpack error the
record's own ``validate`` gives, never a torch KeyError/RuntimeError; ``shared`` factors formed in float32/64 then cast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import adapterpack  # noqa: E402
import adapterpack.torch as apt  # noqa: E402
from adapterpack.adapter import Adapter, Module  # noqa: E402
from adapterpack.errors import RankError, RecordError  # noqa: E402
from adapterpack.torch.decoders import decode, decode_all  # noqa: E402

CPU = torch.device("cpu")


def _f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, *shape]).standard_normal(shape).astype(np.float32)


def _lora(**tensors: object) -> Module:
    t = {"A": _f32(2, 5), "B": _f32(3, 2)} | tensors
    return Module("m", "lora", (3, 5), {"rank": 2, "alpha": 4.0}, {k: v for k, v in t.items() if v is not None})


def _svd(**tensors: object) -> Module:
    t = {"S": np.array([3.0, 1.0], np.float32), "Ut": _f32(2, 3), "Vt": _f32(2, 5)} | tensors
    return Module("m", "svd", (3, 5), {"rank": 2}, {k: v for k, v in t.items() if v is not None})


def _shared(form: str = "diagonal", dt: type = np.float32, **tensors: object) -> Module:
    s = _f32(2, seed=1) if form == "diagonal" else _f32(2, 2, seed=1)
    t = {"U": _f32(3, 2).astype(dt), "V": _f32(5, 2).astype(dt), "S": s.astype(dt)} | tensors
    return Module("m", "shared", (3, 5), {"rank": 2, "form": form}, {k: v for k, v in t.items() if v is not None})


HOSTILE = [
    ("lora, no B", _lora(B=None), RecordError, "missing"),
    ("lora, A rows != rank", _lora(A=_f32(3, 5)), RankError, "rank 2"),
    ("lora, B cols != A rows", _lora(B=_f32(3, 4)), RankError, "rank 2"),
    ("lora, A 1-D", _lora(A=_f32(10)), RecordError, "at least 2 dimensions"),
    ("lora, magnitude without dora", _lora(magnitude=_f32(7)), RecordError, "dora"),
    ("svd, no S", _svd(S=None), RecordError, "missing"),
    ("svd, S 2-D", _svd(S=np.ones((2, 2), np.float32)), RecordError, "1-D"),
    ("svd, S longer than the rank", _svd(S=np.array([3, 2, 1], np.float32)), RankError, "rank 2"),
    ("svd, Ut of the wrong width", _svd(Ut=_f32(3, 3)), RankError, "rank 2"),
    ("shared, no S", _shared(S=None), RecordError, "missing"),
    ("shared, S too long", _shared(S=_f32(3)), RankError, "rank 2"),
    ("shared, V of the wrong rank", _shared(V=_f32(5, 3)), RankError, "rank 2"),
    ("shared, S 3-D", _shared(S=np.ones((2, 2, 2), np.float32)), RankError, "rank 2"),
]


@pytest.mark.parametrize(("what", "module", "error", "match"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_in_memory_records_get_the_validate_error(what: str, module: Module, error: type, match: str) -> None:
    """Before: KeyError ('B'), or torch's RuntimeError from a matmul / reshape / broadcast, or a silent decode."""
    with pytest.raises(error, match=match):
        decode(module, CPU, None)
    with pytest.raises(error, match=match):
        decode_all([module], CPU, torch.float16)
    with pytest.raises(error, match=match):
        apt.load(Adapter(modules={module.name: module}))


def test_staged_torch_slots_are_checked_too() -> None:
    """A record whose slots are already torch tensors (as the loader stages them) goes through the same checks."""
    m = _lora()
    m.tensors = {"A": torch.from_numpy(_f32(3, 5)), "B": torch.from_numpy(_f32(3, 2))}
    with pytest.raises(RankError, match="rank 2"):
        decode(m, CPU, None)
    ok = _lora()
    ok.tensors = {k: torch.from_numpy(v) for k, v in ok.tensors.items()}
    f = decode(ok, CPU, None)
    assert torch.equal(f.A, ok.tensors["A"]) and torch.equal(f.B, ok.tensors["B"])


@pytest.mark.parametrize("form", ["diagonal", "full"])
@pytest.mark.parametrize("stored", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("want", [torch.float16, torch.bfloat16, torch.float32])
def test_shared_dtype_is_applied_after_the_product(form: str, stored: type, want: torch.dtype) -> None:
    """The factors are formed in float32/64 (full form: B = U·S; diagonal form: ΔW's exact SVD in float64), then cast,
    as the docstring says: casting U and S to bf16 first rounded three times (errors ~1e-2, against one rounding of
    the product)."""
    m = _shared(form, stored)
    ref = decode(m, CPU, None)
    got = decode(m, CPU, want)
    assert got.B.dtype == want and torch.equal(got.B, ref.B.to(want))
    assert torch.equal(got.A, ref.A.to(want))
    f = m.factors()
    np.testing.assert_allclose((ref.B.double() @ ref.A.double()).numpy(), np.asarray(f.B, np.float64) @ np.asarray(f.A, np.float64),
                               rtol=1e-6, atol=1e-6)
    if form == "full":
        np.testing.assert_allclose(ref.B.double().numpy(), f.B, rtol=1e-6, atol=1e-6)


def test_an_ill_conditioned_diagonal_bank_member_keeps_its_delta_in_bf16() -> None:
    """A diagonal-form bank fitted to a tight error can hold nearly collinear columns of U with large σ of both signs:
    B = U·diag(σ) and Vᵀ cast to bf16 as they were lost ΔW to cancellation (relative error 49 on a real bank of
    four SmolLM2 LoRAs at rank 64); the decoder re-factors ΔW through its exact SVD first, as numpy's lowering does."""
    rng = np.random.default_rng(7)
    out, n, k = 24, 20, 6
    base = rng.standard_normal((out, 1))
    u = (base + 1e-4 * rng.standard_normal((out, k))).astype(np.float32)  # nearly collinear columns
    v = (rng.standard_normal((n, 1)) + 1e-4 * rng.standard_normal((n, k))).astype(np.float32)  # σ's signs cancel u·vᵀ
    s = (np.array([1, -1, 1, -1, 1, -1]) * 1e4).astype(np.float32)
    m = Module("x", "shared", (out, n), {"form": "diagonal", "rank": k}, {"U": u, "V": v, "S": s})
    dense = (u.astype(np.float64) * s.astype(np.float64)) @ v.T.astype(np.float64)
    for want, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        f = decode(m, CPU, want)
        got = f.scale * (f.B.double() @ f.A.double()).numpy()
        assert np.linalg.norm(got - dense) / np.linalg.norm(dense) < tol, want


def test_records_a_reader_built_are_not_validated_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader validates a file's records when it builds them; torch.load of the file does not validate them again
    (it cost ~45 % of a CPU load of the bundled adapter), while an in-memory Adapter's records are checked."""
    from adapterpack.examples import example_path
    from adapterpack.torch.decoders import base

    calls: list[str] = []
    check = base.check_record
    monkeypatch.setattr(base, "check_record", lambda m: (calls.append(m.name), check(m))[1])
    path = tmp_path / "ex.apack"
    adapterpack.save(adapterpack.open(example_path()), path, codec="raw")
    from_file = apt.load(path)
    assert calls == []
    ad = adapterpack.open(path)
    in_memory = Adapter(ad.name, modules={n: m for n, m in ad.modules.items()})
    from_memory = apt.load(in_memory)
    assert len(calls) == len(ad.modules) > 0
    assert all(torch.equal(from_file[n].A, from_memory[n].A) and torch.equal(from_file[n].B, from_memory[n].B) for n in from_file)
