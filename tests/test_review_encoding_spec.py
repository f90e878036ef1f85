"""The encoding pages made exact (spec/svd.md, shared.md, nola.md, qsvd.md §1; format.md §6.1, §8.1, §10.1, §10.2): each
encoding's stage-7 checks in the order its page gives, value checks when ΔW is computed, and reads at a rank.

Each record here has two defects whose classes differ, so only the order the page gives names the error; adapterpack
and the clean-room reader (tools/vectors/_container_reference.py, from the spec alone) must both raise it. The last
tests pin two library defects found while doing so, now fixed (each failed on the code before the fix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack import dtypes, errors
from adapterpack.adapter import Adapter, Module
from adapterpack.checksum import crc32c
from tests.apack_builders import Parts, load_everything
from tools.vectors import _container_reference as ref

F32 = np.float32
NOLA = {"generator": "philox4x32-10", "generator_version": 1, "seed": 0, "stream": 0, "rank": 2, "k_A": 3, "k_B": 3, "scale": 1.0}


def _z(*shape: int) -> np.ndarray:
    return np.zeros(shape, F32)


def _build(enc: str, base: list[int], params: dict[str, Any], tensors: dict[str, np.ndarray], bad_crc: str = "") -> bytes:
    """A 1.5 file holding one record exactly as given (raw blobs, any params), as a hostile writer can write it; the
    slot ``bad_crc`` gets a wrong ``crc32c``."""
    blobs, stored, refs = [], [], {}
    for slot, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        raw = dtypes.as_bytes(arr).tobytes()
        refs[slot] = len(blobs)
        blobs.append({"dtype": dtypes.of_array(arr).name, "shape": list(arr.shape), "codec": {"id": "raw"},
                      "length": len(raw), "crc32c": crc32c(raw) ^ (slot == bad_crc)})  # fmt: skip
        stored.append(raw)
    module = {"name": "m", "encoding": enc, "base_shape": base, "params": params, "tensors": refs}
    parts = Parts(index={"adapters": [{"name": "default", "modules": [module]}], "blobs": blobs}, data=b"", minor=5)
    parts.set_blobs(stored)
    return parts.build()


def _library(path: Path) -> str | None:
    """The class adapterpack raises reading every tensor and ΔW (the refusal vectors' reading), or None."""
    try:
        load_everything(path, delta_limit=1 << 24)
    except errors.AdapterpackError as e:
        return type(e).__name__
    return None


def _reference(data: bytes, rank: int | None = None) -> str | None:
    try:
        ref.read(data, rank=rank)
    except ref.FormatError as e:
        return type(e).__name__
    return None


QSVD_OK = {"rank": 1, "bits": [16], "group_size": 1}

# (id, encoding, base_shape, params, tensors, the class the page's order gives)
CASES = [
    # qsvd.md §1: rank (2) before layout (5); bits (3) before rank against the shape (7); rank against the shape (7)
    # and the factors limit (8) before data's length (9); conv needs 3 dimensions
    ("qsvd_rank_before_layout", "qsvd", [4, 4], {**QSVD_OK, "rank": "x", "layout": "zz"}, {"data": np.zeros(20, np.uint8)},
     "RankError"),
    ("qsvd_bits_before_rank_bound", "qsvd", [4, 4], {**QSVD_OK, "rank": 5}, {"data": np.zeros(20, np.uint8)}, "RecordError"),
    ("qsvd_rank_bound_before_data", "qsvd", [4, 4], {**QSVD_OK, "rank": 5, "bits": [16] * 5}, {"data": np.zeros(20, np.uint8)},
     "RankError"),
    ("qsvd_layout_before_rank_bound", "qsvd", [4, 4, 1, 1], {**QSVD_OK, "rank": 5, "bits": [16] * 5},
     {"data": np.zeros(20, np.uint8)}, "RecordError"),
    ("qsvd_conv_2d", "qsvd", [4, 4], {**QSVD_OK, "layout": "conv"}, {"data": np.zeros(20, np.uint8)}, "RecordError"),
    ("qsvd_slots_first", "qsvd", [4, 4], {**QSVD_OK, "rank": "x"}, {"codes": np.zeros(20, np.uint8)}, "RecordError"),
    # svd.md §1: rank's type (2) before layout (3); k <= min(out, n) (7) before base_shape (8); conv needs 3 dimensions
    ("svd_rank_before_layout", "svd", [6, 5], {"rank": "x", "layout": "zz"}, {"S": _z(1), "Ut": _z(1, 6), "Vt": _z(1, 5)},
     "RankError"),
    ("svd_rank_bound_before_base", "svd", [9, 9], {"rank": 3}, {"S": _z(3), "Ut": _z(3, 2), "Vt": _z(3, 4)}, "RankError"),
    ("svd_conv_2d", "svd", [2, 4], {"rank": 1, "layout": "conv"}, {"S": _z(1), "Ut": _z(1, 2), "Vt": _z(1, 4)}, "RecordError"),
    # shared.md §1 step 7: an S of the other form's number of dimensions does not fit the rank
    ("shared_full_s_1d", "shared", [4, 5], {"rank": 3, "form": "full"}, {"U": _z(4, 3), "V": _z(5, 3), "S": _z(3)}, "RankError"),
    ("shared_diagonal_s_2d", "shared", [4, 5], {"rank": 3, "form": "diagonal"}, {"U": _z(4, 3), "V": _z(5, 3), "S": _z(3, 3)},
     "RankError"),
    ("shared_form_before_rank_fit", "shared", [4, 5], {"rank": 2, "form": "x"}, {"U": _z(4, 3), "V": _z(5, 3), "S": _z(3)},
     "RecordError"),
    # nola.md §1: generator (1) and rank (3) before the slots (5); rank against the shape (7) before the slots' shapes (9)
    ("nola_generator_before_slots", "nola", [4, 4], {**NOLA, "generator": "x"}, {"beta": _z(3)}, "GeneratorError"),
    ("nola_rank_before_slots", "nola", [4, 4], {**NOLA, "rank": 0}, {"beta": _z(3)}, "RankError"),
    ("nola_base_not_2d", "nola", [4, 4, 1], NOLA, {"alpha": _z(3), "beta": _z(3)}, "RecordError"),
    ("nola_rank_bound_before_lengths", "nola", [4, 4], {**NOLA, "rank": 5}, {"alpha": _z(2), "beta": _z(3)}, "RankError"),
    ("nola_stored_a0_shape", "nola", [4, 4], {**NOLA, "A0": "stored"}, {"alpha": _z(3), "beta": _z(3), "A0": _z(3, 4)},
     "RecordError"),
    # format.md §6.1: A's and B's rank (5) before the layout's dimensions (6)
    ("lora_rank_before_linear_dims", "lora", [3, 4], {"rank": 2, "alpha": 1.0}, {"A": _z(3, 4, 1), "B": _z(3, 2)}, "RankError"),
    ("lora_rank_before_embedding_fifo", "lora", [4, 3], {"rank": 2, "alpha": 1.0, "layout": "embedding", "fan_in_fan_out": True},
     {"A": _z(3, 4), "B": _z(3, 2)}, "RankError"),
]  # fmt: skip


@pytest.mark.parametrize(("enc", "base", "params", "tensors", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stage_7_order(tmp_path: Path, enc: str, base: list[int], params: dict[str, Any], tensors: dict[str, np.ndarray],
                       error: str) -> None:  # fmt: skip
    data = _build(enc, base, params, tensors)
    path = tmp_path / "x.apack"
    path.write_bytes(data)
    assert (_library(path), _reference(data)) == (error, error)


def test_shared_rank_is_not_bounded_by_the_shape(tmp_path: Path) -> None:
    """shared.md §1: R may exceed min(out, in) (U and V are stored; a diagonal bank grows past it)."""
    one = np.ones((2, 3), F32)
    data = _build("shared", [2, 2], {"rank": 3, "form": "diagonal"}, {"U": one, "V": one, "S": np.ones(3, F32)})
    path = tmp_path / "x.apack"
    path.write_bytes(data)
    assert (_library(path), _reference(data)) == (None, None)


def _svd_s(tmp_path: Path, s: list[float], bad_crc: str = "") -> tuple[Path, bytes]:
    rng = np.random.default_rng(0)
    ut = np.linalg.qr(rng.standard_normal((6, 4)))[0].T.astype(F32)
    vt = np.linalg.qr(rng.standard_normal((5, 4)))[0].T.astype(F32)
    data = _build("svd", [6, 5], {"rank": 4}, {"S": np.array(s, F32), "Ut": ut, "Vt": vt}, bad_crc)
    path = tmp_path / "s.apack"
    path.write_bytes(data)
    return path, data


def _at_rank(path: Path, j: int) -> str | None:
    try:
        with adapterpack.open(path, rank=j) as a:
            for m in a:
                m.delta()
    except errors.AdapterpackError as e:
        return type(e).__name__
    return None


def test_svd_s_is_checked_over_the_truncation_only(tmp_path: Path) -> None:
    """svd.md §3: at rank j the value checks see S's first j values; j > k is the whole record."""
    path, data = _svd_s(tmp_path, [3, 2, 1, 5])
    for j, error in ((0, None), (2, None), (3, None), (4, "RecordError"), (99, "RecordError")):
        assert (_at_rank(path, j), _reference(data, j)) == (error, error), j
    assert (_library(path), _reference(data)) == ("RecordError", "RecordError")


def test_a_rank_above_k_is_the_record_itself(tmp_path: Path) -> None:
    path, _ = _svd_s(tmp_path, [4, 3, 2, 1])
    with adapterpack.open(path) as whole, adapterpack.open(path, rank=99) as cut:
        assert cut.modules["m"].params == whole.modules["m"].params
        assert np.array_equal(cut.modules["m"].delta(), whole.modules["m"].delta())


def test_crc_defects_of_a_record_before_its_value_defects(tmp_path: Path) -> None:
    """format.md §10.2 stage 8: reading a record's tensors, then its ΔW (the refusal vectors' reading), meets a CRC
    defect of Ut before the value defect of S listed before it."""
    path, data = _svd_s(tmp_path, [1, 2, 3, 4], bad_crc="Ut")
    assert (_library(path), _reference(data)) == ("ChecksumError", "ChecksumError")


# --- library defects, fixed --------------------------------------------------------------------------------------------


def test_lora_conv_without_kernel_dims_opens_at_a_lower_rank(tmp_path: Path) -> None:
    """Was a defect: format.md §6.1 allows a `conv` lora record without kernel dimensions (A [r, in], B [out, r]), and
    adapterpack reads it whole; opened at a rank below r, `at_rank` turns it into an `svd` record with that 2-D conv
    base_shape, which svd.md §2 (and `svd_base_shape`) refuse: a valid file raises RecordError when opened at a rank.
    Fixed: an svd or qsvd record of such factors is written `linear` (`Factors.record_params`): its ΔW is the same
    [out, in] matrix."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5)).astype(F32), rng.standard_normal((6, 3)).astype(F32)
    module = Module("c", "lora", (6, 5), {"rank": 3, "alpha": 3.0, "layout": "conv"}, {"A": a, "B": b})
    path = tmp_path / "c.apack"
    adapterpack.save(Adapter(name="default", modules={"c": module}), path, codec="raw")
    assert _at_rank(path, 3) is None
    assert _at_rank(path, 1) is None
    from adapterpack.encodings import lower, qsvd

    for record in (lower.as_svd(module), qsvd.from_factors("c", module.factors(), [16, 16, 16])):  # convert --to svd/qsvd
        record.implementation.validate(record)
        assert "layout" not in record.params
        np.testing.assert_allclose(record.delta(), module.delta(), atol=2e-3 * np.abs(module.delta()).max())


def test_rank_zero_reads_nothing_of_a_compressed_blob(tmp_path: Path) -> None:
    """Was a defect: format.md §8.1 (and svd.md §3): "`j = 0` returns no bytes and checks nothing". adapterpack's
    `ApackReader.read_rows` returns nothing of a raw blob at 0 rows, but decodes and checks a compressed blob whole
    (`read_blob(i)[:0]`), so a rank-0 read of an svd record with a damaged zstd Ut raises CodecError, where the
    reference reader (and the spec) read it. Fixed: `read_rows` returns an empty `(0, *shape[1:])` array before the
    codec test."""
    eye = np.eye(4, 256, dtype=F32)
    module = Module("s", "svd", (256, 256), {"rank": 4}, {"S": np.array([4, 3, 2, 1], F32), "Ut": eye, "Vt": eye})
    path = tmp_path / "z.apack"
    adapterpack.save(Adapter(name="default", modules={"s": module}), path, codec="zstd")
    with adapterpack.container.ApackReader(path) as r:
        (b,) = (b for b in r.index.blobs if b.shape == (4, 256))  # Ut and Vt: one blob, the writer shares equal ones
        assert b.codec_id == "zstd"
        at = r.data_start + b.offset + b.stored_length - 1
    data = bytearray(path.read_bytes())
    data[at] ^= 0x55
    path.write_bytes(bytes(data))
    assert _reference(bytes(data), 0) is None
    assert _at_rank(path, 0) is None
