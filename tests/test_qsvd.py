"""The qsvd encoding: bit packing, the quantizer, exact error, progressive rank, file round trips, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings import qsvd as Q
from adapterpack.encodings.lower import as_lora, at_rank
from adapterpack.errors import ConversionError, RankError, RecordError
from adapterpack.examples import example_path
from adapterpack.linalg import quantize as qz
from adapterpack.linalg.lowrank import spectrum_of

EXAMPLE = example_path()


@pytest.fixture(scope="module")
def real() -> Adapter:
    return adapterpack.open(EXAMPLE)


def triplets(m: Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sp = spectrum_of(m.factors())
    u, vt = sp.vectors()
    return u, sp.S, vt


def dense(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> np.ndarray:
    return (u * s) @ vt


def mixed_bits(k: int) -> list[int]:
    cycle = [Q.FLOAT, 8, 6, 4, 3, 2, 1, 5, 7]
    return [cycle[j % len(cycle)] for j in range(k)]


# --- packing and the quantizer -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", Q.BITS)
def test_pack_unpack_round_trip_and_bit_order(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, 37)
    packed = qz.pack_codes(codes, bits)
    assert packed.size == -(-37 * bits // 8)
    np.testing.assert_array_equal(qz.unpack_codes(packed, bits, 37), codes)
    # LSB first: value 0 in the low bits of byte 0
    stream = int.from_bytes(packed.tobytes(), "little")
    assert [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(37)] == list(codes)


def test_one_bit_is_sign_times_mean_abs() -> None:
    x = np.random.default_rng(0).standard_normal(64)
    q = qz.quantize(x, 1, 64)
    np.testing.assert_array_equal(np.sign(q.values), np.sign(x))
    assert float(q.scales[0]) == pytest.approx(np.mean(np.abs(x)), rel=1e-3)  # the least-squares scale, in fp16


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_scale_search_never_worse_than_round_to_nearest(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for _ in range(5):
        x = rng.standard_normal(300) / 17
        e_rtn = np.sum((x - qz.quantize(x, bits, 64, search=False).values) ** 2)
        e_mse = np.sum((x - qz.quantize(x, bits, 64).values) ** 2)
        assert e_mse <= e_rtn


def test_dequantize_is_exact_in_float32() -> None:
    x = np.random.default_rng(1).standard_normal(200) / 10
    q = qz.quantize(x, 6, 32)
    codes = qz.unpack_codes(q.codes, 6, 200)
    exact = np.repeat(q.scales.astype(np.float64), 32)[:200] * (2 * codes - 63)
    np.testing.assert_array_equal(qz.dequantize(codes, q.scales, 6, 32).astype(np.float64), exact)


# --- encode, exact error, component table ---------------------------------------------------------------


def test_relative_error_matches_dense_on_real_modules(real: Adapter) -> None:
    for m in list(real)[::17]:
        u, s, vt = triplets(m)
        r = Q.encode_qsvd(u, s, vt, mixed_bits(s.size), template=m)
        w = dense(u, s, vt)
        f = r.factors()
        what = f.B.astype(np.float64) @ f.A.astype(np.float64)
        want = np.linalg.norm(w - what) / np.linalg.norm(w)
        assert Q.relative_error(r, u, s, vt) == pytest.approx(want, rel=1e-6)
        assert np.allclose(r.delta(), m.delta(), atol=0.2 * np.abs(m.delta()).max())


def test_refit_and_search_lower_the_error_on_the_real_adapter(real: Adapter) -> None:
    tot = {"rtn": 0.0, "search": 0.0, "refit": 0.0}
    for m in list(real)[::9]:
        u, s, vt = triplets(m)
        bits = [3] * s.size
        for key, kw in (
            ("rtn", {"search": False, "refit": False, "s_fit": "source"}),
            ("search", {"search": True, "refit": False, "s_fit": "source"}),
            ("refit", {"search": True, "refit": True, "s_fit": "ls"}),
        ):
            tot[key] += Q.relative_error(Q.encode_qsvd(u, s, vt, bits, template=m, **kw), u, s, vt) ** 2
    assert tot["refit"] < tot["search"] < tot["rtn"]


def test_component_table_bytes_are_exact_and_errors_track_the_encoder(real: Adapter) -> None:
    m = real.module("model.layers.3.self_attn.q_proj")
    u, s, vt = triplets(m)
    t = Q.component_table(u, s, vt, group_size=32)
    assert t.bits == (*Q.BITS, Q.FLOAT) and t.nbytes.shape == t.err.shape == (s.size, len(t.bits))
    np.testing.assert_array_equal(t.cut_err, s**2)
    assert np.all(np.diff(t.err, axis=1)[:, : len(Q.BITS) - 1] <= 0)  # more bits, less error
    rng = np.random.default_rng(0)
    for _ in range(4):
        cols = rng.integers(0, len(t.bits), s.size)
        bits = [t.bits[c] for c in cols]
        r = Q.encode_qsvd(u, s, vt, bits, 32, template=m)
        stored = sum(int(np.asarray(x).nbytes) for x in r.tensors.values())
        assert stored == t.fixed_nbytes + int(t.nbytes[np.arange(s.size), cols].sum())
        est = float(t.err[np.arange(s.size), cols].sum()) / float(s @ s)
        assert Q.relative_error(r, u, s, vt) ** 2 == pytest.approx(est, rel=0.5)


def test_encode_refuses_bad_widths_and_shapes(real: Adapter) -> None:
    m = real.module("model.layers.0.self_attn.q_proj")
    u, s, vt = triplets(m)
    for bad in ([0], [9], [True], [2.0], [32]):
        with pytest.raises(ConversionError, match="width"):
            Q.encode_qsvd(u, s, vt, bad, template=m)
    with pytest.raises(ConversionError, match="group_size"):
        Q.encode_qsvd(u, s, vt, [4], 0, template=m)
    with pytest.raises(ConversionError):
        Q.encode_qsvd(u[:5], s, vt, [4], template=m)


# --- files, progressive rank, lowering -----------------------------------------------------------------


def qsvd_adapter(real: Adapter, group_size: int = 64) -> Adapter:
    mods = {}
    for name in list(real.modules)[:6]:
        m = real.module(name)
        u, s, vt = triplets(m)
        mods[name] = Q.encode_qsvd(u, s, vt, mixed_bits(s.size), group_size, template=m)
    return real.derived(mods)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_file_round_trip_bit_exact(real: Adapter, tmp_path: Path, codec: str) -> None:
    ad = qsvd_adapter(real, 48)
    p = tmp_path / "q.apack"
    adapterpack.save(ad, p, codec=codec)
    back = adapterpack.open(p)
    for name, m in ad.modules.items():
        b = back.module(name)
        assert b.encoding == "qsvd" and b.params == m.params
        for slot in m.tensors:
            np.testing.assert_array_equal(b.array(slot), m.tensors[slot])
        np.testing.assert_array_equal(b.delta(), m.delta())
        assert b.summary()["bits"] == m.params["bits"]


def test_rank_j_read_is_the_prefix_record(real: Adapter, tmp_path: Path) -> None:
    ad = qsvd_adapter(real)
    p = tmp_path / "q.apack"
    adapterpack.save(ad, p, codec="raw")
    for j in (0, 1, 3, 8):
        low = adapterpack.open(p, rank=j)
        for name, m in ad.modules.items():
            lm = low.module(name)
            assert lm.params["rank"] == j and lm.params["bits"] == m.params["bits"][:j]
            f, full = lm.factors(), m.factors()
            np.testing.assert_array_equal(f.A, full.A[:j])
            np.testing.assert_array_equal(f.B, full.B[:, :j])
            assert at_rank(m, j).params["bits"] == m.params["bits"][:j]


def test_lowers_to_lora_exactly(real: Adapter) -> None:
    m = qsvd_adapter(real).module(next(iter(real.modules)))
    lo = as_lora(m)
    assert lo.encoding == "lora" and lo.params["rank"] == m.params["rank"]
    np.testing.assert_array_equal(lo.delta(), m.delta())


# --- refusals ------------------------------------------------------------------------------------------


def _rec(real: Adapter) -> Module:
    m = real.module("model.layers.0.self_attn.v_proj")
    u, s, vt = triplets(m)
    return Q.encode_qsvd(u, s, vt, [4, 2, 1], 64, template=m)


def _poke(r: Module, offset: int, value: np.ndarray) -> None:
    data = r.tensors["data"].copy()
    data[offset : offset + value.nbytes] = np.frombuffer(value.tobytes(), np.uint8)
    r.tensors["data"] = data


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda r: r.params.update(bits=[4, 2, 0]), RecordError, "width"),
        (lambda r: r.params.update(bits=[4, 2]), RecordError, "bits must be a list of 3"),
        (lambda r: r.params.update(group_size=0), RecordError, "group_size"),
        (lambda r: r.params.update(group_size=True), RecordError, "group_size"),
        (lambda r: r.params.update(rank=-1), RankError, "rank"),
        (lambda r: r.tensors.update(data=r.tensors["data"][:-1]), RecordError, "data as uint8"),
        (lambda r: r.tensors.update(data=r.tensors["data"].view(np.int8)), RecordError, "data as uint8"),
        (lambda r: r.tensors.update(S=r.tensors["data"]), RecordError, "unknown"),
        (lambda r: _poke(r, 0, np.array([-1.0], "<f4")), RecordError, "singular value must be finite and >= 0"),
        (lambda r: _poke(r, 4, np.array([np.inf], "<f2")), RecordError, "scales must be finite"),
        (lambda r: _poke(r, 4, np.array([-1.0], "<f2")), RecordError, "scales must be finite and >= 0"),
    ],
)
def test_hostile_records_are_refused(real: Adapter, change, error: type[Exception], match: str) -> None:
    r = _rec(real)
    change(r)
    with pytest.raises(error, match=match):
        r.implementation.validate(r)
        r.factors()


def test_huge_shapes_are_refused_before_reading(real: Adapter) -> None:
    r = _rec(real)
    r.base_shape = (1 << 40, 1 << 40)
    with pytest.raises(RankError, match="exceed"):
        r.implementation.validate(r)
    r.base_shape = (1 << 20, 1 << 20)  # within the factor limit, but the data does not back it
    with pytest.raises(RecordError, match="data"):
        r.implementation.validate(r)


# --- the command line on qsvd files ---------------------------------------------------------------------


def _cli(*args: str | Path) -> Any:
    from click.testing import CliRunner

    from adapterpack.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_inspect_convert_check_on_a_qsvd_file(real: Adapter, tmp_path: Path) -> None:
    ad = qsvd_adapter(real)
    p = tmp_path / "q.apack"
    adapterpack.save(ad, p)
    r = _cli("inspect", p)
    assert r.exit_code == 0 and "bits f16,8,6,4,3,2,1,5 g64" in r.output, r.output
    r = _cli("convert", p, tmp_path / "peft", "--to", "peft")
    assert r.exit_code == 0, r.output
    back = adapterpack.open(tmp_path / "peft")
    for name, m in ad.modules.items():
        np.testing.assert_allclose(back.module(name).delta(), m.delta(), rtol=0, atol=1e-6 * float(np.abs(m.delta()).max()))
    r = _cli("convert", p, tmp_path / "r2.apack", "--rank", "2")
    assert r.exit_code == 0, r.output
    with adapterpack.open(tmp_path / "r2.apack") as low:
        for name, m in ad.modules.items():
            assert low.module(name).encoding == "qsvd" and low.module(name).params["bits"] == m.params["bits"][:2]
    for target in ("peft", "vllm", "kohya"):
        r = _cli("check", p, "--target", target)
        assert r.exit_code == 0 and "qsvd" in r.output, (target, r.output)


def test_rank_j_read_reads_only_its_prefix(tmp_path: Path) -> None:
    """Damage past the first components' checkpoint: a rank-1 read never sees it, a whole read refuses it."""
    import json
    import struct

    from adapterpack.container.preamble import PREAMBLE_SIZE, align_up
    from adapterpack.errors import ChecksumError
    from tools.vectors import qsvd as vectors

    p = tmp_path / "q.apack"
    adapterpack.save(vectors.adapter(), p, codec="raw")
    raw = bytearray(p.read_bytes())
    length = struct.unpack_from("<Q", raw, 16)[0]
    index = json.loads(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length])
    blob = index["blobs"][index["adapters"][0]["modules"][0]["tensors"]["data"]]
    raw[align_up(PREAMBLE_SIZE + length, 256) + blob["offset"] + blob["length"] - 1] ^= 0x80  # the last component's byte
    p.write_bytes(bytes(raw))
    with adapterpack.open(p, rank=1) as low:
        low.module("model.layers.0.self_attn.q_proj").factors()
    with pytest.raises(ChecksumError), adapterpack.open(p) as whole:
        whole.module("model.layers.0.self_attn.q_proj").factors()


def test_negation_is_exact_at_every_width() -> None:
    x = np.random.default_rng(3).standard_normal(37) / 7
    for w in (*Q.BITS, Q.FLOAT):
        codes, _, values = Q._store_rows(x[None], [w], 8, True)
        neg = Q._negated(codes[0], w, 37)
        if w == Q.FLOAT:
            back = np.frombuffer(neg.tobytes(), "<f2").astype(np.float64)
        else:
            scales = Q._store_rows(x[None], [w], 8, True)[1][0]
            back = qz.dequantize(qz.unpack_codes(neg, w, 37), scales, w, 8).astype(np.float64)
        np.testing.assert_array_equal(back, -values[0])


def test_a_group_larger_than_any_vector_is_one_scale_per_vector(real: Adapter) -> None:
    m = real.module("model.layers.2.self_attn.v_proj")
    u, s, vt = triplets(m)
    huge = Q.encode_qsvd(u, s, vt, [3] * s.size, Q.MAX_GROUP_SIZE, template=m)
    whole = Q.encode_qsvd(u, s, vt, [3] * s.size, 576, template=m)
    np.testing.assert_array_equal(huge.tensors["data"], whole.tensors["data"])  # one scale per vector either way
    np.testing.assert_array_equal(huge.factors().A, whole.factors().A)  # decodes without a 2^30-element repeat


@pytest.mark.parametrize("s_fit", Q.S_FITS)
def test_s_fits_do_what_they_say_and_the_table_tracks_each(real: Adapter, s_fit: str) -> None:
    m = real.module("model.layers.5.self_attn.v_proj")
    u, s, vt = triplets(m)
    bits = [4, 3, 3, 2, 2, 2, 1, 1]
    r = Q.encode_qsvd(u, s, vt, bits, template=m, refit=False, s_fit=s_fit)
    f = r.factors()
    b, a = f.B.astype(np.float64), f.A.astype(np.float64)
    proj = np.einsum("ij,ij->j", u, b) * np.einsum("ji,ji->j", a, vt)  # ⟨u_j v_jᵀ, B[:, j] A[j]⟩
    if s_fit == "unbiased":
        np.testing.assert_allclose(proj, s, rtol=1e-5)
    if s_fit == "ls":  # no other S does better
        for other in ("unbiased", "source"):
            o = Q.encode_qsvd(u, s, vt, bits, template=m, refit=False, s_fit=other)
            assert Q.relative_error(r, u, s, vt) <= Q.relative_error(o, u, s, vt)
    t = Q.component_table(u, s, vt, group_size=Q.DEFAULT_GROUP_SIZE, s_fit=s_fit)
    est = sum(float(t.err[j, t.bits.index(w)]) for j, w in enumerate(bits)) / float(s @ s)
    assert Q.relative_error(r, u, s, vt) ** 2 == pytest.approx(est, rel=0.25)
    with pytest.raises(ConversionError, match="s_fit"):
        Q.encode_qsvd(u, s, vt, bits, template=m, s_fit="median")
