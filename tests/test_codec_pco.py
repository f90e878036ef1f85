"""The ``pco`` codec (spec §5.4): bit-exact round trips, the stored layout, hostile stored bytes."""

from __future__ import annotations

import random
from pathlib import Path

import ml_dtypes
import numpy as np
import pcodec
import pytest

from adapterpack import codecs
from adapterpack.adapter import Adapter, Module
from adapterpack.codecs import pco
from adapterpack.container import ApackReader
from adapterpack.container.writer import encode_blob, write_apack
from adapterpack.errors import CodecError, LengthMismatchError

RNG = np.random.default_rng(15)


def _decode(stored: bytes, length: int, itemsize: int) -> bytes:
    out = bytearray(length)
    codecs.get_codec("pco").decode(memoryview(stored), memoryview(out), itemsize)
    return bytes(out)


def _float_data(dtype: object, n: int) -> np.ndarray:
    x = (RNG.standard_normal(n) * 0.01).astype(np.float32).astype(dtype)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -65504.0], np.float32).astype(dtype)
    x[: min(n, len(specials))] = specials[: min(n, len(specials))]
    return x


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 70_000])
def test_round_trip_is_bit_exact(dtype: object, n: int) -> None:
    x = _float_data(dtype, n)
    data = x.tobytes()
    stored = codecs.get_codec("pco").encode(memoryview(data), x.itemsize)
    assert _decode(stored, len(data), x.itemsize) == data


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_every_bit_pattern_round_trips(itemsize: int) -> None:
    """NaN payloads, signed zeros, subnormals: any unsigned integer survives (2-byte: all 65536 of them)."""
    dt = np.dtype(f"<u{itemsize}")
    x = np.arange(1 << 16, dtype=dt) if itemsize == 2 else RNG.integers(0, np.iinfo(dt).max, 50_000, dtype=dt, endpoint=True)
    x[:3] = [0, np.iinfo(dt).max, 1 << (8 * itemsize - 1)]
    stored = codecs.get_codec("pco").encode(memoryview(x.tobytes()), itemsize)
    assert _decode(stored, x.nbytes, itemsize) == x.tobytes()


def test_rotation_moves_the_sign_bit_to_the_bottom() -> None:
    x = np.array([0x8000, 0x0001, 0x3F80, 0xBF80], np.uint16)  # -0, smallest subnormal, bf16 1.0 and -1.0
    r = pco.rotate(x)
    assert r.tolist() == [0x0001, 0x0002, 0x7F00, 0x7F01]
    pco.unrotate_inplace(r)
    assert r.tolist() == x.tolist()


def test_stored_bytes_are_pcos_wrapped_format_of_rotated_integers() -> None:
    """Spec §5.4 from pcodec alone: header, then per chunk its metadata and one page of rotated values."""
    x = _float_data(ml_dtypes.bfloat16, 5000).view(np.uint16)
    stored = codecs.get_codec("pco").encode(memoryview(x.tobytes()), 2)
    fd, pos = pcodec.wrapped.FileDecompressor.new(stored)
    cd, used = fd.chunk_decompressor(stored[pos:], "u16")
    pos += used
    out = np.empty(5000, np.uint16)
    progress, used = cd.read_page_into(stored[pos:], 5000, out)
    assert pos + used == len(stored) and progress.n_processed == 5000
    assert out.tolist() == (((x << 1) | (x >> 15)) & 0xFFFF).tolist()


def test_chunks_of_the_spec_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pco, "CHUNK", 1000)
    assert pco.chunk_sizes(0) == [] and pco.chunk_sizes(1000) == [1000] and pco.chunk_sizes(2500) == [1000, 1000, 500]
    x = _float_data(np.float32, 2500)
    stored = codecs.get_codec("pco").encode(memoryview(x.tobytes()), 4)
    assert _decode(stored, x.nbytes, 4) == x.tobytes()
    monkeypatch.setattr(pco, "CHUNK", 2000)  # a reader cutting chunks differently refuses, never misreads
    with pytest.raises(CodecError, match=r"pco: "):
        _decode(stored, x.nbytes, 4)


def test_config_and_level_is_informational() -> None:
    c = codecs.get_codec({"id": "pco", "level": 3, "x-extra": 1})
    assert c.get_config() == {"id": "pco", "level": 3}
    assert codecs.get_codec("pco").get_config() == {"id": "pco", "level": pco.DEFAULT_LEVEL}
    x = _float_data(np.float16, 3000)
    assert codecs.get_codec({"id": "pco", "level": 22}).get_config()["level"] == pco.DEFAULT_LEVEL  # what was used
    for level in (0, 3, 12, 99, -1):  # out-of-range levels encode at the default; decoding never looks
        stored = codecs.get_codec({"id": "pco", "level": level}).encode(memoryview(x.tobytes()), 2)
        assert _decode(stored, x.nbytes, 2) == x.tobytes()


# --- hostile stored bytes ---------------------------------------------------------------------------


def _stored(n: int = 4000, dtype: object = np.float32) -> tuple[bytes, np.ndarray]:
    x = _float_data(dtype, n)
    return codecs.get_codec("pco").encode(memoryview(x.tobytes()), x.itemsize), x


def test_one_byte_items_and_partial_elements_are_refused() -> None:
    c = codecs.get_codec("pco")
    with pytest.raises(ValueError, match="itemsize 2, 4 or 8"):
        c.encode(memoryview(b"abcd"), 1)
    stored, x = _stored()
    with pytest.raises(CodecError, match=r"cannot hold elements of 1 byte"):
        c.decode_new(memoryview(stored), x.nbytes, 1)
    with pytest.raises(LengthMismatchError, match="not a whole number of elements"):
        c.decode_new(memoryview(stored), x.nbytes + 2, 4)


@pytest.mark.parametrize("claimed", [3999, 4001, 8000, 1 << 20])
def test_lying_element_count_is_refused(claimed: int) -> None:
    """The index's count is the only count: a stream holding more or fewer elements is refused."""
    stored, _ = _stored()
    with pytest.raises(CodecError, match=r"^pco: "):
        _decode(stored, 4 * claimed, 4)


def test_check_refuses_a_blob_too_short_for_its_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pco, "CHUNK", 10)
    c = codecs.get_codec("pco")
    with pytest.raises(CodecError, match=r"cannot hold 1000 elements' chunks"):
        c.check(memoryview(b"\x04\x01" + b"\0" * 100), 4000, 4)
    with pytest.raises(CodecError, match="no stored bytes"):
        c.check(memoryview(b""), 0, 4)


def test_truncated_and_trailing_bytes_are_refused() -> None:
    stored, x = _stored()
    for cut in (1, 2, 10, len(stored) // 2, len(stored) - 1):
        with pytest.raises(CodecError, match=r"^pco: "):
            _decode(stored[:cut], x.nbytes, 4)
    with pytest.raises(CodecError, match=r"trailing bytes"):
        _decode(stored + b"\0", x.nbytes, 4)


def test_garbage_header_and_table_are_refused() -> None:
    stored, x = _stored()
    with pytest.raises(CodecError, match=r"pco: corrupt header"):
        _decode(b"\xff" + stored[1:], x.nbytes, 4)  # an unknown Pco format version
    bad = bytearray(stored)
    bad[2] = 0xF7  # chunk metadata: a reserved mode
    with pytest.raises(CodecError, match=r"pco: corrupt chunk 0 metadata"):
        _decode(bytes(bad), x.nbytes, 4)


def test_random_damage_never_escapes_as_another_error() -> None:
    """Flipped bytes and cuts: a CodecError, or bytes the blob's CRC-32C then catches; never another exception."""
    stored, x = _stored(3000)
    rng = random.Random(15)
    outcomes = set()
    for _ in range(400):
        bad = bytearray(stored)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.3:
            bad = bad[: rng.randrange(len(bad))]
        try:
            _decode(bytes(bad), x.nbytes, 4)
            outcomes.add("decoded")
        except CodecError:
            outcomes.add("refused")
    assert "refused" in outcomes


def test_decode_needs_no_more_memory_than_the_index_states() -> None:
    """The output is allocated from the index's length before Pco runs: a stream holding more elements is refused
    while decoding into it, with nothing allocated for its true element count (only the one copy of the page)."""
    import tracemalloc

    stored, x = _stored(200_000)
    c = codecs.get_codec("pco")
    out = bytearray(x.nbytes // 2)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"holds|page|elements"):
            c.decode(memoryview(stored), memoryview(out), 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(stored) + (64 << 10) < x.nbytes, (peak, len(stored), x.nbytes)


def test_panics_become_codec_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    class PanicException(BaseException):  # pyo3's: a BaseException, named so
        pass

    class Boom:
        @staticmethod
        def new(src: bytes) -> None:
            raise PanicException("index out of bounds")

    monkeypatch.setattr(pco._lib().wrapped, "FileDecompressor", Boom)
    stored, x = _stored()
    with pytest.raises(CodecError, match=r"pco: corrupt header \(index out of bounds\)"):
        _decode(stored, x.nbytes, 4)


# --- the writer --------------------------------------------------------------------------------------


def test_writer_uses_pco_and_falls_back_for_one_byte_items_and_constant_data(tmp_path: Path) -> None:
    x = _float_data(ml_dtypes.bfloat16, 4096).reshape(8, 512)
    assert encode_blob(x, "pco")[1]["id"] == "pco"
    assert encode_blob(np.arange(100, dtype=np.int8) % 3, "pco")[1]["id"] == "zstd"  # §5.4: no 1-byte elements
    # 2M equal floats code to a few bytes in Pco, past §7's expansion limit: the writer stores zstd instead
    stored, cfg, _ = encode_blob(np.zeros((1024, 2048), np.float32), "pco")
    assert cfg["id"] == "zstd" and len(stored) * 32768 + 64 >= 8 << 20
    b = _float_data(ml_dtypes.bfloat16, 64).reshape(8, 8)
    m = Module("m", "lora", (8, 512), {"rank": 8, "alpha": 8.0}, {"A": x, "B": b})
    path = tmp_path / "a.apack"
    write_apack(path, Adapter(modules={"m": m}), codec="pco")
    r = ApackReader(path)
    assert [b.codec["id"] for b in r.blobs] == ["pco", "pco"]
    assert r.verify().ok
    got = r.adapter().modules["m"]
    assert got.tensors["A"].load().tobytes() == x.tobytes() and got.tensors["B"].load().tobytes() == b.tobytes()


def test_metadata_larger_than_the_parse_window_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Header and chunk metadata are parsed from a short window first; one that does not fit is read from the whole rest."""
    monkeypatch.setattr(pco, "_META_WINDOW", 3)
    stored, x = _stored(5000)
    assert _decode(stored, x.nbytes, 4) == x.tobytes()
    with pytest.raises(CodecError, match="trailing bytes"):
        _decode(stored + b"\0", x.nbytes, 4)


def test_a_blob_of_many_chunks_is_copied_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pco reads ``bytes`` only, so each page is copied out of the blob: a page's copy is bounded by its chunk (twice
    its raw size), not the rest of the blob, or a blob of c chunks would be copied about c/2 times (quadratic)."""
    import tracemalloc

    monkeypatch.setattr(pco, "CHUNK", 1 << 14)
    x = np.random.default_rng(3).standard_normal(1 << 20).astype(np.float32)
    stored = pco.Pco().encode(memoryview(x).cast("B"), 4)
    out = bytearray(x.nbytes)
    tracemalloc.start()
    try:
        pco.Pco().decode(memoryview(stored), memoryview(out), 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(out) == x.tobytes() and len(pco.chunk_sizes(len(x))) == 64
    # a chunk's window (132 KiB) and the un-rotation's block (256 KiB), not the rest of the blob (3.4 MB at first)
    assert peak < len(stored) // 4, (peak, len(stored))
