"""The dtype table (adapterpack.dtypes): bfloat16 as bits without ml_dtypes, bit-exact with ml_dtypes; the table's facts."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from adapterpack import dtypes
from adapterpack.errors import ConversionError, UnknownDTypeError

BF16 = np.dtype(ml_dtypes.bfloat16)


def _ml_round(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # ml_dtypes warns on NaN and on overflow
        return np.asarray(x, np.float32).astype(BF16).view(np.uint16)


def test_widening_matches_ml_dtypes_on_every_bf16_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = dtypes.bf16_to_float32(bits).view(np.uint32)
    theirs = bits.view(BF16).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(ours, theirs)  # NaN payloads, ±0, subnormals, ±inf included
    np.testing.assert_array_equal(dtypes.bf16_to_float32(bits.view(np.int16)).view(np.uint32), theirs)


def _edge_float32_bits() -> np.ndarray:
    """Every bf16 pattern shifted up, with each low half that decides rounding: 0, 1, just below, at and above
    the tie, all ones — over all 65536 high halves (NaN, inf, ±0, subnormals, the largest finite values)."""
    high = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000], np.uint32)
    return (high[:, None] | lows[None, :]).ravel()


def test_rounding_matches_ml_dtypes_on_edge_patterns() -> None:
    u = _edge_float32_bits()
    x = u.view(np.float32)
    np.testing.assert_array_equal(dtypes.bf16_from_float32(x), _ml_round(x))


def test_rounding_matches_ml_dtypes_on_random_patterns() -> None:
    u = np.random.default_rng(0).integers(0, 1 << 32, 4_000_000, dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    np.testing.assert_array_equal(dtypes.bf16_from_float32(x), _ml_round(x))


def test_rounding_cases_by_hand() -> None:
    """Ties go to even, overflow past the largest bf16 goes to inf, NaN stays NaN (quiet, signed), -0 stays -0."""
    cases = {
        0x3F808000: 0x3F80,  # 1 + 2^-8: tie, 1.0 is even
        0x3F818000: 0x3F82,  # tie, rounds up to even
        0x3F808001: 0x3F81,  # just above the tie
        0x7F7FFFFF: 0x7F80,  # float32 max → inf
        0x7F7F7FFF: 0x7F7F,  # largest bf16 kept
        0x80000000: 0x8000,  # -0
        0x00000001: 0x0000,  # smallest float32 subnormal → +0
        0x00008000: 0x0000,  # tie at the smallest subnormal: to even (0)
        0x00018000: 0x0002,  # tie: to even
        0x7F800001: 0x7FC0,  # signalling NaN → quiet NaN, never inf
        0xFFFFFFFF: 0xFFC0,  # negative NaN keeps its sign
        0xFF800000: 0xFF80,  # -inf
    }
    u = np.array(list(cases), np.uint32)
    np.testing.assert_array_equal(dtypes.bf16_from_float32(u.view(np.float32)), np.array(list(cases.values()), np.uint16))


def test_round_trip_of_every_bf16_value() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = dtypes.bf16_from_float32(dtypes.bf16_to_float32(bits))
    nan = (bits & 0x7FFF) > 0x7F80
    np.testing.assert_array_equal(back[~nan], bits[~nan])
    assert np.all((back[nan] & 0x7FC0) == 0x7FC0)


def test_shapes_are_kept() -> None:
    for x in (np.float32(np.nan), np.float32(1.5), np.ones((3, 4), np.float32)[:, ::2]):
        b = dtypes.bf16_from_float32(x)
        assert b.shape == np.shape(x) and b.dtype == np.uint16
        assert dtypes.bf16_to_float32(b).shape == np.shape(x)
    assert dtypes.bf16_from_float32(np.float32(np.nan)) == 0x7FC0


def test_widening_refuses_other_widths() -> None:
    with pytest.raises(ConversionError, match="16-bit"):
        dtypes.bf16_to_float32(np.zeros(3, np.float32))


# --- the table -------------------------------------------------------------------------------------


def test_table_facts_match_numpy_and_ml_dtypes() -> None:
    import torch

    for name, d in dtypes.DTYPES.items():
        assert d.numpy.itemsize == d.itemsize == d.bits.itemsize
        assert d.numpy.kind == ("V" if name == "bfloat16" else d.kind)  # ml_dtypes' bfloat16 is numpy kind V
        assert d.bits.kind in "fiub" and d.bits.byteorder in "<|"
        assert getattr(torch, d.torch).itemsize == d.itemsize
        assert str(getattr(torch, d.torch)) == f"torch.{name}"
        if d.is_float:
            assert d.max == float(ml_dtypes.finfo(d.numpy).max)
        else:
            assert d.max is None
    assert dtypes.FLOATS == ("float64", "float32", "float16", "bfloat16")


def test_of_array_knows_bf16_and_refuses_others() -> None:
    assert dtypes.of_array(np.zeros(2, BF16)).name == "bfloat16"
    assert dtypes.of_array(np.zeros(2, ">f4")).name == "float32"
    for dt in (ml_dtypes.float8_e4m3fn, np.complex64, np.uint16):
        with pytest.raises(UnknownDTypeError):
            dtypes.of_array(np.zeros(2, dt))


def test_gguf_names() -> None:
    assert [dtypes.by_gguf(c).name for c in ("f32", "f16", "bf16")] == ["float32", "float16", "bfloat16"]
    with pytest.raises(UnknownDTypeError):
        dtypes.by_gguf("q4_0")
