"""The svd encoding: exact low-rank SVD against dense float64 SVDs, progressive rank, lowering to lora."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.container.reader import ApackReader
from adapterpack.encodings.lower import as_lora, as_svd, at_rank
from adapterpack.errors import ConversionError, RankError, RecordError
from adapterpack.examples import example_path
from adapterpack.formats.kohya import read_kohya, write_kohya
from adapterpack.formats.peft import read_peft, write_peft
from adapterpack.linalg.lowrank import factors_svd
from tools import make_vectors

EXAMPLE = example_path()


def exact_delta(m: Module) -> np.ndarray:
    """ΔW of a record in float64 from its factors (the record's own delta() rounds to float32)."""
    f = m.factors()
    return replace(f, A=f.A.astype(np.float64), B=f.B.astype(np.float64)).delta()


def dense_svd(m: Module) -> tuple[np.ndarray, np.ndarray]:
    """(ΔW as 2-D float64 in the factors' orientation, its singular values) the slow way."""
    f = m.factors()
    d = f.scale * (f.B.astype(np.float64) @ f.A.astype(np.float64))
    return d, np.linalg.svd(d, compute_uv=False)


@pytest.fixture(scope="module")
def real() -> Adapter:
    return adapterpack.open(EXAMPLE)


# --- the exact low-rank SVD -----------------------------------------------------------------------


def test_factors_svd_matches_dense_svd_on_real_modules(real: Adapter) -> None:
    for m in list(real)[::10]:  # q/k/v/o of several layers; the dense SVDs are what costs
        d, s = dense_svd(m)
        f = m.factors()
        sp = factors_svd(f.A, f.B, f.scale)
        assert sp.S.shape == (8,)
        np.testing.assert_allclose(sp.S, s[:8], rtol=0, atol=1e-12 * s[0])
        np.testing.assert_allclose(sp.U * sp.S @ sp.Vt, d, rtol=0, atol=1e-12 * s[0])
        np.testing.assert_allclose(sp.U.T @ sp.U, np.eye(8), atol=1e-12)
        np.testing.assert_allclose(sp.Vt @ sp.Vt.T, np.eye(8), atol=1e-12)
        assert sp.rel_error(8) == 0.0 and sp.rel_error(0) == 1.0
        # Eckart–Young: the truncation error is the tail of the spectrum, as the dense SVD says
        assert sp.rel_error(3) == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2)), rel=1e-9)


@pytest.mark.parametrize(("m", "n", "r"), [(5, 7, 9), (3, 40, 8), (40, 3, 8), (1, 1, 1)])
def test_factors_svd_rank_above_a_dimension(m: int, n: int, r: int) -> None:
    rng = np.random.default_rng(m * 100 + n)
    a, b = rng.standard_normal((r, n)), rng.standard_normal((m, r))
    sp = factors_svd(a, b, 0.25)
    s = np.linalg.svd(0.25 * b @ a, compute_uv=False)
    assert sp.S.shape == (min(m, n, r),)
    np.testing.assert_allclose(sp.S, s[: sp.S.size], rtol=1e-12, atol=1e-14)
    u, vt = sp.vectors()  # r >= m or n: geqrf's last reflector is the identity (τ = 0)
    np.testing.assert_allclose(u * sp.S @ vt, 0.25 * b @ a, rtol=0, atol=1e-12 * s[0])
    np.testing.assert_allclose(u.T @ u, np.eye(sp.S.size), atol=1e-13)


def test_rank_deficient_and_zero_factors() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 30))
    a[3:] = a[:3]  # rank 3 in a rank-6 LoRA
    b = rng.standard_normal((20, 6))
    sp = factors_svd(a, b)
    assert sp.numerical_rank() == 3
    np.testing.assert_allclose(sp.S[3:], 0, atol=1e-12 * sp.S[0])
    zero = factors_svd(np.zeros((4, 10)), np.zeros((8, 4)))
    assert zero.energy == 0.0 and zero.numerical_rank() == 0 and zero.rank_for_energy(0.99) == 0 and zero.rel_error(0) == 0.0


@pytest.mark.parametrize("cond", [1e4, 1e12])
def test_vectors_stay_orthonormal_and_exact_for_ill_conditioned_and_zero_columns(cond: float) -> None:
    """The reflector product (Q never formed) keeps U, V orthonormal whatever B's condition; a column
    of B that is exactly zero (LAPACK's τ = 0: an identity reflector) is handled too."""
    rng = np.random.default_rng(7)
    m, n, r = 300, 120, 16
    qu, _ = np.linalg.qr(rng.standard_normal((m, r)))
    b = (qu * np.logspace(0, -np.log10(cond), r)) @ np.linalg.qr(rng.standard_normal((r, r)))[0]
    a = rng.standard_normal((r, n))
    for bb, aa in ((b, a), (np.concatenate([np.zeros((m, 1)), b[:, 1:]], axis=1), a)):
        sp = factors_svd(aa, bb, 0.5)
        d = 0.5 * bb @ aa
        s = np.linalg.svd(d, compute_uv=False)
        np.testing.assert_allclose(sp.S, s[:r], rtol=0, atol=1e-12 * s[0])
        u, vt = sp.vectors()
        np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-13)
        np.testing.assert_allclose(vt @ vt.T, np.eye(r), atol=1e-13)
        np.testing.assert_allclose(u * sp.S @ vt, d, rtol=0, atol=1e-12 * s[0])
        u3, vt3 = sp.vectors(3)  # a leading rank is the first columns of the full set (to rounding)
        assert u3.shape == (m, 3) and vt3.shape == (3, n)
        np.testing.assert_allclose(u3, u[:, :3], rtol=0, atol=1e-14)
        np.testing.assert_allclose(vt3, vt[:3], rtol=0, atol=1e-14)


def _count_reflected(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the reflector route (the fallback of ``_ThinQ.times``)."""
    from adapterpack.linalg import lowrank

    calls: list[int] = []
    orig = lowrank._ThinQ._reflected

    def counted(self: lowrank._ThinQ, c: np.ndarray) -> np.ndarray:
        calls.append(c.shape[1])
        return orig(self, c)

    monkeypatch.setattr(lowrank._ThinQ, "_reflected", counted)
    return calls


def test_trained_factors_take_the_fast_route_and_stay_orthonormal(real: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    """X·R⁻¹·c is used when its columns come out orthonormal to 1e-14 (trained factors: always here);
    the check itself is what keeps it exact, so it must hold on what it returns."""
    calls = _count_reflected(monkeypatch)
    for m in real:
        f = m.factors()
        u, vt = factors_svd(f.A, f.B, f.scale).vectors()
        assert np.abs(u.T @ u - np.eye(u.shape[1])).max() <= 1e-14
        assert np.abs(vt @ vt.T - np.eye(vt.shape[0])).max() <= 1e-14
    assert calls == []


def test_ill_conditioned_factors_fall_back_to_the_reflectors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_reflected(monkeypatch)
    rng = np.random.default_rng(3)
    qu, _ = np.linalg.qr(rng.standard_normal((200, 8)))
    b = (qu * np.logspace(0, -12, 8)) @ np.linalg.qr(rng.standard_normal((8, 8)))[0]  # κ(B) = 1e12, columns mixed
    a = rng.standard_normal((8, 50))
    u, _ = factors_svd(a, b).vectors()
    assert calls == [8]  # B fell back, Aᵀ (well conditioned) did not
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-14)
    with np.errstate(all="ignore"):  # what the fast route alone would have given: far from orthonormal
        fast = b @ np.linalg.solve(np.linalg.qr(b, mode="r"), np.eye(8))
    assert np.abs(fast.T @ fast - np.eye(8)).max() > 1e-6


def test_a_spectrum_keeps_no_float64_copies_of_its_factors() -> None:
    """Re-ranking holds one spectrum per module until every rank is chosen: it must not hold binary64
    copies of the factors (4x a float32 adapter), only the r×r R factors, the core SVD and the factors
    in their own dtype: copied when the caller could change them, referenced when read-only (mapped)."""
    import tracemalloc

    rng = np.random.default_rng(4)
    a = rng.standard_normal((64, 4096)).astype(np.float32)
    b = rng.standard_normal((4096, 64)).astype(np.float32)
    small = 4 * 64 * 64 * 8 + 64 * 1024  # R_b, R_a, U_c, V_c and change; one float64 copy is 2 MiB
    held = {}
    for writeable in (True, False):
        a.flags.writeable = b.flags.writeable = writeable
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            sp = factors_svd(a, b)
            held[writeable] = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert held[False] < small and a.nbytes + b.nbytes <= held[True] < a.nbytes + b.nbytes + small
    u, vt = sp.vectors(8)  # still right: Uᵀ (B A) V = diag(S) on the leading 8 (B A never formed)
    proj = (u.T @ b.astype(np.float64)) @ (a.astype(np.float64) @ vt.T)
    np.testing.assert_allclose(proj, np.diag(sp.S[:8]), rtol=0, atol=1e-12 * sp.S[0])


def test_changing_the_factors_afterwards_does_not_change_the_vectors() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    sp = factors_svd(a, b)
    u0, vt0 = sp.vectors(3)
    b[:] = rng.standard_normal(b.shape)
    a[:] = 0.0
    u1, vt1 = sp.vectors(3)
    np.testing.assert_array_equal(u0, u1)
    np.testing.assert_array_equal(vt0, vt1)


def test_low_precision_inputs_are_decomposed_in_float64() -> None:
    rng = np.random.default_rng(2)
    for dt in (np.float16, ml_dtypes.bfloat16):
        a = rng.standard_normal((4, 50)).astype(dt)
        b = rng.standard_normal((30, 4)).astype(dt)
        sp = factors_svd(a, b, 2.0)
        s = np.linalg.svd(2.0 * b.astype(np.float64) @ a.astype(np.float64), compute_uv=False)
        assert sp.S.dtype == np.float64
        np.testing.assert_allclose(sp.S, s[:4], rtol=1e-12)


def test_non_finite_factors_are_refused() -> None:
    a, b = np.ones((2, 5)), np.ones((3, 2))
    a[1, 2] = np.nan
    with pytest.raises(ConversionError, match="q_proj: A holds non-finite"):
        factors_svd(a, b, where="q_proj")
    with pytest.raises(ConversionError, match="do not multiply"):
        factors_svd(np.ones((2, 5)), np.ones((3, 4)))


def test_rank_for_energy() -> None:
    sp = factors_svd(np.diag([4.0, 2.0, 1.0]), np.eye(3))  # energies 16, 4, 1 of 21
    assert [sp.rank_for_energy(f) for f in (0.5, 16 / 21, 0.77, 20 / 21, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]


# --- lora <-> svd records -------------------------------------------------------------------------------


def _layouts() -> Adapter:
    return make_vectors.features()  # embedding, fan_in_fan_out, rsLoRA + DoRA, conv, in the base weight's layout


def test_every_layout_survives_lora_to_svd_to_lora() -> None:
    for m in _layouts():
        if m.params.get("dora"):
            with pytest.raises(ConversionError, match="DoRA"):
                as_svd(m)
            continue
        s = as_svd(m, dtype="float64")
        s.implementation.validate(s)
        assert (s.encoding, s.base_shape, s.params.get("layout", "linear")) == (
            "svd",
            m.base_shape,
            m.params.get("layout", "linear"),
        )
        want = exact_delta(m)
        np.testing.assert_allclose(s.delta(), want, rtol=0, atol=1e-12 * np.abs(want).max())
        back = as_lora(s)
        back.implementation.validate(back)
        assert back.params["alpha"] == back.params["rank"] and not back.params.get("rslora", False)
        np.testing.assert_allclose(back.delta(), want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_svd_file_round_trip_and_progressive_rank(tmp_path: Path, real: Adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    svd = Adapter(name="default", base_model=real.base_model, modules={m.name: as_svd(m, dtype="float32") for m in real})
    path = tmp_path / "real_svd.apack"
    adapterpack.save(svd, path, codec="raw")
    name = "model.layers.7.self_attn.q_proj"
    d, s = dense_svd(real.module(name))
    full = adapterpack.open(path)
    np.testing.assert_allclose(full.delta(name), d, rtol=0, atol=2e-6 * np.abs(d).max())

    # rank 3 reads Ut and Vt only up to their 4-row checkpoint: read_blob (whole blob) is called for S alone
    real_read = ApackReader.read_blob

    def whole_blob(self: ApackReader, i: int) -> np.ndarray:
        if len(self.blobs[i].shape) != 1:
            raise AssertionError("a truncated raw read touched the whole blob")
        return real_read(self, i)

    monkeypatch.setattr(ApackReader, "read_blob", whole_blob)
    with adapterpack.open(path, rank=3) as three:
        m = three.module(name)
        assert m.params["rank"] == 3 and [m.tensors[k].shape[0] for k in ("S", "Ut", "Vt")] == [3, 3, 3]
        ut = m.array("Ut")
        assert not ut.flags.owndata and ut.base is not None  # a view of the mapping, not a copy
        got = m.delta().astype(np.float64)
    monkeypatch.undo()
    u, sv, vt = np.linalg.svd(d)
    best3 = (u[:, :3] * sv[:3]) @ vt[:3]
    np.testing.assert_allclose(got, best3, rtol=0, atol=2e-6 * np.abs(d).max())
    err = np.linalg.norm(got - d) / np.linalg.norm(d)
    assert err == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2)), rel=1e-4)
    with adapterpack.open(path, rank=100) as same:  # above the stored rank: all of it
        assert same.module(name).params["rank"] == 8


def test_open_lora_file_at_a_rank_uses_the_exact_svd(real: Adapter) -> None:
    with adapterpack.open(EXAMPLE, rank=2) as two:
        name = "model.layers.0.self_attn.v_proj"
        m = two.module(name)
        assert (m.encoding, m.params["rank"]) == ("svd", 2)
        d, s = dense_svd(real.module(name))
        err = np.linalg.norm(m.delta().astype(np.float64) - d) / np.linalg.norm(d)
        assert err == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2)), rel=1e-4)
    with pytest.raises(ConversionError, match="rank must be >= 0"):
        adapterpack.open(EXAMPLE, rank=-1)


def test_compressed_svd_blobs_truncate_too(tmp_path: Path) -> None:
    path = tmp_path / "v.apack"
    adapterpack.save(make_vectors_svd(), path, codec="byteplanes")
    with adapterpack.open(path, rank=1) as one:
        m = one.module("model.layers.0.self_attn.q_proj")
        assert m.array("S").tolist() == [2.0] and m.array("Ut").shape == (1, 64)
        assert one.module("model.layers.0.self_attn.v_proj").params["rank"] == 0


def make_vectors_svd() -> Adapter:
    from tools.vectors import svd

    return svd.adapter()


def test_svd_exports_to_peft_and_kohya_with_the_same_delta(tmp_path: Path, real: Adapter) -> None:
    svd = Adapter(
        name="default", base_model=real.base_model, modules={m.name: at_rank(m, r) for m, r in zip(real, [8, 4, 2, 1] * 30)}
    )
    folder = write_peft(svd, tmp_path / "peft")
    back = read_peft(folder)
    kohya = read_kohya(write_kohya(svd, tmp_path / "k.safetensors"))
    for m in svd:
        want = m.delta().astype(np.float64)
        tol = 1e-6 * np.abs(want).max()
        assert back.module(m.name).params["rank"] == m.params["rank"]
        np.testing.assert_allclose(back.delta(m.name), want, rtol=0, atol=tol)
        np.testing.assert_allclose(kohya.delta(m.name), want, rtol=0, atol=tol)


def test_bad_svd_records() -> None:
    good = as_svd(next(iter(make_vectors.basic())), dtype="float32")
    s = good.tensors["S"]
    bad = Module(good.name, "svd", good.base_shape, dict(good.params), {**good.tensors, "S": s[::-1].copy()})
    with pytest.raises(RecordError, match="descending"):
        bad.delta()
    too_big = Module(good.name, "svd", good.base_shape, {"rank": 3}, dict(good.tensors))
    with pytest.raises(RankError, match="rank 3 must equal"):
        too_big.implementation.validate(too_big)
    wrong_base = Module(good.name, "svd", (1, 2), dict(good.params), dict(good.tensors))
    with pytest.raises(RecordError, match="base_shape"):
        wrong_base.implementation.validate(wrong_base)


def test_convert_rank_option(tmp_path: Path, real: Adapter) -> None:
    from click.testing import CliRunner

    from adapterpack.cli import main

    run = CliRunner().invoke
    r = run(main, ["convert", str(EXAMPLE), str(tmp_path / "r2.apack"), "--rank", "2"])
    assert r.exit_code == 0, r.output
    r2 = adapterpack.open(tmp_path / "r2.apack")
    name = "model.layers.4.self_attn.k_proj"
    d, s = dense_svd(real.module(name))
    assert (r2.module(name).encoding, r2.module(name).params["rank"]) == ("svd", 2)
    err = np.linalg.norm(r2.delta(name) - d) / np.linalg.norm(d)
    assert err == pytest.approx(np.sqrt(np.sum(s[2:] ** 2) / np.sum(s**2)), rel=1e-4)
    r = run(main, ["convert", str(tmp_path / "r2.apack"), str(tmp_path / "r1"), "--rank", "1", "--to", "peft"])
    assert r.exit_code == 0, r.output
    assert read_peft(tmp_path / "r1").module(name).params["rank"] == 1
    assert run(main, ["convert", str(EXAMPLE), str(tmp_path / "x.apack"), "--rank", "-1"]).exit_code == 2


def test_open_at_a_rank_keeps_dora_modules() -> None:
    features = make_vectors.features()
    cut = {m.name: at_rank(m, 1) for m in features}
    for m in features:
        if m.params.get("dora"):
            assert cut[m.name] is m  # its magnitude needs the base weight: no SVD of its own, kept whole
        else:
            assert cut[m.name].params["rank"] == min(1, m.params["rank"])


def test_every_reader_of_s_refuses_bad_singular_values() -> None:
    from adapterpack.ops.rerank import spectrum_with_factors as rerank_spectrum
    from adapterpack.ops.spectrum import module_spectrum

    good = as_svd(next(iter(make_vectors.basic())), dtype="float32")
    for s in ([-1.0, 2.0], [1.0, 2.0], [np.nan, 1.0]):
        bad = Module(good.name, "svd", good.base_shape, dict(good.params), {**good.tensors, "S": np.array(s, np.float32)})
        for read in (lambda m: m.delta(), module_spectrum, rerank_spectrum):
            with pytest.raises(RecordError, match="descending"):
                read(bad)
