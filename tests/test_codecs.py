"""Codecs: the registry, exact stored-byte layouts from the spec (§5), and the writer's raw fallback."""

from __future__ import annotations

import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zstandard

from adapterpack import codecs, dtypes
from adapterpack.adapter import Adapter, Module
from adapterpack.codecs.zstd import MAX_RATIO, MAX_WINDOW, decompress_into
from adapterpack.container import ApackReader
from adapterpack.container.writer import encode_blob, write_apack
from adapterpack.errors import CodecError, IndexFormatError, LengthMismatchError, UnknownCodecError
from tests.apack_builders import byteplanes as byteplanes_by_hand
from tests.apack_builders import split, zstd_frame

RNG = np.random.default_rng(11)


def _decode(config: dict | str, stored: bytes, length: int, itemsize: int) -> bytes:
    out = bytearray(length)
    codecs.get_codec(config).decode(memoryview(stored), memoryview(out), itemsize)
    return bytes(out)


# --- registry ------------------------------------------------------------------------------------


def test_codec_ids() -> None:
    assert sorted(codecs.codec_ids()) == ["byteplanes", "pco", "raw", "zstd"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("raw", {"id": "raw"}),
        ({"id": "raw", "level": 3}, {"id": "raw"}),
        ({"id": "zstd"}, {"id": "zstd", "level": 3}),
        ({"id": "zstd", "level": 19}, {"id": "zstd", "level": 19}),
        ({"id": "zstd", "level": "high", "x-extra": 1}, {"id": "zstd", "level": 3}),
        ({"id": "byteplanes", "level": 5}, {"id": "byteplanes", "level": 5}),
        ({"id": "byteplanes", "must_understand": True}, {"id": "byteplanes", "level": 1}),
    ],
)
def test_get_config_from_config_round_trip(config: dict | str, expected: dict) -> None:
    codec = codecs.get_codec(config)
    assert codec.codec_id == expected["id"]
    assert codec.get_config() == expected
    again = type(codec).from_config(codec.get_config())
    assert again.get_config() == expected
    assert codecs.get_codec(expected).get_config() == expected


def test_unknown_codec_id() -> None:
    with pytest.raises(UnknownCodecError, match=r"unknown codec 'lz4' \(known: ") as info:
        codecs.get_codec({"id": "lz4"})
    assert type(info.value) is UnknownCodecError
    assert all(c in str(info.value) for c in ("raw", "zstd", "byteplanes"))
    with pytest.raises(UnknownCodecError, match="'brotli'"):
        codecs.get_codec("brotli")
    for bad in ({"level": 3}, {"id": 3}, ["zstd"]):
        with pytest.raises(IndexFormatError, match="codec must be an object with a string 'id'") as info2:
            codecs.get_codec(bad)  # type: ignore[arg-type]
        assert type(info2.value) is IndexFormatError


def test_register_codec_makes_an_id_known() -> None:
    from adapterpack.codecs import base

    @codecs.register_codec
    class Reverse(codecs.Codec):
        codec_id = "x-test-reverse"

        def encode(self, data: memoryview, itemsize: int) -> bytes:
            return bytes(data)[::-1]

        def decode(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
            out[:] = bytes(stored)[::-1]

    try:
        assert "x-test-reverse" in codecs.codec_ids()
        assert _decode("x-test-reverse", b"\x03\x02\x01", 3, 1) == b"\x01\x02\x03"
    finally:
        del base._REGISTRY["x-test-reverse"]
    assert "x-test-reverse" not in codecs.codec_ids()


def test_max_expansion() -> None:
    assert codecs.get_codec("raw").max_expansion() is None
    assert codecs.get_codec("zstd").max_expansion() == MAX_RATIO == 32768
    assert codecs.get_codec("byteplanes").max_expansion() == codecs.get_codec("pco").max_expansion() == MAX_RATIO
    assert MAX_WINDOW == 128 << 20


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("codec_id", ["raw", "zstd", "byteplanes"])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 70_000])
def test_encode_decode_round_trip(codec_id: str, itemsize: int, n: int) -> None:
    data = (RNG.integers(0, 4, n * itemsize, dtype=np.uint8) * 60).tobytes()  # compressible, all byte values varied
    codec = codecs.get_codec(codec_id)
    stored = codec.encode(memoryview(data), itemsize)
    assert _decode(codec.get_config(), stored, len(data), itemsize) == data


def test_multi_block_zstd_frame_with_checksum_decodes() -> None:
    """Frames from other writers: several 128 KiB blocks and a content checksum are fine."""
    data = RNG.integers(0, 3, 600_000, dtype=np.uint8).tobytes()
    frame = zstd_frame(data, checksum=True)
    assert zstandard.get_frame_parameters(frame).has_checksum
    assert _decode("zstd", frame, len(data), 1) == data


# --- stored bytes exactly as the spec says --------------------------------------------------------


def test_zstd_stores_one_frame_declaring_its_size() -> None:
    data = np.arange(1000, dtype=np.float32).tobytes()
    stored = codecs.get_codec({"id": "zstd", "level": 5}).encode(memoryview(data), 4)
    assert stored[:4] == b"\x28\xb5\x2f\xfd"
    assert zstandard.frame_content_size(stored) == len(data)
    assert zstandard.ZstdDecompressor().decompress(stored) == data


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_byteplanes_layout_matches_spec(dtype: type) -> None:
    """§5.2: u64 frame_length[k], then k frames; plane j holds byte j of every element (little-endian)."""
    arr = (RNG.standard_normal(3000) * 0.02).astype(dtype)
    k = arr.dtype.itemsize
    decoded = dtypes.as_bytes(arr).tobytes()
    stored = codecs.get_codec("byteplanes").encode(memoryview(decoded), k)

    lengths = struct.unpack_from(f"<{k}Q", stored)
    assert 8 * k + sum(lengths) == len(stored)
    pos = 8 * k
    for j, length in enumerate(lengths):
        frame = stored[pos : pos + length]
        assert zstandard.frame_content_size(frame) == arr.size
        plane = zstandard.ZstdDecompressor().decompress(frame)
        assert plane == bytes(decoded[e * k + j] for e in range(arr.size))  # plane_j[e] = decoded[e*k + j]
        pos += length
    # the sign/exponent plane (the last byte of a little-endian float) compresses best
    assert lengths[-1] == min(lengths)

    # and a reader decodes stored bytes built by hand from the spec
    assert _decode("byteplanes", byteplanes_by_hand(decoded, k), len(decoded), k) == decoded


def test_byteplanes_hand_example() -> None:
    """Two float16 elements 0x3C00 (1.0) and 0xC000 (-2.0): plane 0 = 00 00, plane 1 = 3C C0."""
    decoded = np.array([1.0, -2.0], np.float16).tobytes()
    assert decoded == b"\x00\x3c\x00\xc0"
    frames = [zstd_frame(b"\x00\x00"), zstd_frame(b"\x3c\xc0")]
    stored = struct.pack("<2Q", len(frames[0]), len(frames[1])) + frames[0] + frames[1]
    assert _decode("byteplanes", stored, 4, 2) == decoded
    swapped = struct.pack("<2Q", len(frames[1]), len(frames[0])) + frames[1] + frames[0]
    assert _decode("byteplanes", swapped, 4, 2) == b"\x3c\x00\xc0\x00"  # planes are positional


def test_byteplanes_refuses_one_byte_items() -> None:
    with pytest.raises(CodecError, match="byteplanes cannot hold elements of 1 byte"):
        _decode("byteplanes", b"", 4, 1)
    with pytest.raises(ValueError, match="itemsize 2, 4 or 8"):
        codecs.get_codec("byteplanes").encode(memoryview(b"abcd"), 1)


def test_byteplanes_length_not_whole_elements() -> None:
    with pytest.raises(LengthMismatchError, match="not a whole number of elements"):
        _decode("byteplanes", byteplanes_by_hand(b"\0" * 8, 4), 7, 4)


def test_raw_decode_length_mismatch() -> None:
    with pytest.raises(LengthMismatchError, match="raw blob stores 3 bytes, index says 4"):
        _decode("raw", b"abc", 4, 1)


def test_decompress_into_refuses_window_over_limit() -> None:
    """A valid frame of 64 bytes whose header asks for a 512 MiB window (spec §5.1 allows refusing it)."""
    rle = ((64 << 3) | (1 << 1) | 1).to_bytes(3, "little")  # last block, RLE, 64 bytes
    header = b"\x28\xb5\x2f\xfd" + bytes([0x80, 19 << 3]) + struct.pack("<I", 64)  # 4-byte content size; window 2**(10+19)
    frame = header + rle + b"\x01"
    assert zstandard.get_frame_parameters(frame).window_size == 512 << 20
    assert zstandard.ZstdDecompressor(max_window_size=1 << 30).decompress(frame) == b"\x01" * 64  # the frame itself is fine
    out = bytearray(64)
    with pytest.raises(CodecError, match=r"window of 536870912 bytes exceeds the 134217728-byte limit") as info:
        decompress_into(memoryview(frame), memoryview(out))
    assert type(info.value) is CodecError
    # the same block with an ordinary window decodes
    ok = b"\x28\xb5\x2f\xfd" + bytes([0x80, 0]) + struct.pack("<I", 64) + rle + b"\x01"
    decompress_into(memoryview(ok), memoryview(out))
    assert bytes(out) == b"\x01" * 64


# --- the writer stores raw when compression does not pay -------------------------------------------


def test_incompressible_blob_is_stored_raw() -> None:
    noise = RNG.integers(0, 256, 50_000, dtype=np.uint8)
    for codec in ("zstd", "byteplanes"):
        stored, cfg, _ = encode_blob(noise, codec, 3)
        assert cfg == {"id": "raw"} and bytes(stored) == noise.tobytes()
    bits = RNG.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32).view(np.float32)  # uniform bit patterns
    for codec in ("zstd", "byteplanes"):
        stored, cfg, _ = encode_blob(bits, codec, 3)
        assert cfg == {"id": "raw"} and len(stored) == bits.nbytes


def test_compressible_blob_is_compressed_and_small_blobs_stay_raw() -> None:
    zeros = np.zeros((64, 64), np.float32)
    for codec in ("zstd", "byteplanes"):
        stored, cfg, _ = encode_blob(zeros, codec, 3)
        assert cfg == {"id": codec, "level": 3} and len(stored) < zeros.nbytes // 20
    tiny = np.array([1.5], np.float32)  # a frame's header alone is larger than 4 bytes
    assert encode_blob(tiny, "zstd", 3)[1] == {"id": "raw"}
    # byteplanes on 1-byte elements falls back to zstd
    assert encode_blob(np.zeros(4096, np.int8), "byteplanes", 3)[1] == {"id": "zstd", "level": 3}


def test_writer_records_raw_fallback_in_the_index(tmp_path: Path) -> None:
    noise = RNG.integers(0, 2**32, (16, 256), dtype=np.uint64).astype(np.uint32).view(np.float32)
    a = np.zeros((2, 256), np.float32)
    m = Module("m", "lora", (16, 256), {"rank": 2, "alpha": 2.0}, {"A": a, "B": np.zeros((16, 2), np.float32)})
    ad = Adapter(modules={"m": m}, tensors={"noise": noise})
    path = tmp_path / "f.apack"
    write_apack(path, ad, codec="byteplanes")
    blobs = split(path.read_bytes()).index["blobs"]
    assert blobs[0]["codec"] == {"id": "byteplanes", "level": 1} and blobs[0]["stored_length"] < blobs[0]["length"]
    assert blobs[2]["codec"] == {"id": "raw"} and blobs[2]["stored_length"] == blobs[2]["length"] == noise.nbytes
    assert ApackReader(path).adapter().tensors["noise"].load().tobytes() == noise.tobytes()


def test_level_is_informational(tmp_path: Path) -> None:
    """Readers ignore ``level``: a file claiming any level (or a non-int) reads the same."""
    from tests.apack_builders import compressible_adapter, valid_parts, write

    p = valid_parts(tmp_path, "zstd", compressible_adapter())
    for level in (1, 22, -5, "max", None):
        q = p.copy()
        for b in q.index["blobs"]:
            b["codec"]["level"] = level
        path = write(tmp_path / "lvl.apack", q.build())
        r = ApackReader(path)
        assert r.verify().ok
        assert r.read_blob(0).tobytes() == compressible_adapter().modules["layers.0.q_proj"].tensors["A"].tobytes()


# --- block count bound (spec §5.1) -------------------------------------------------------------------


def _raw_block(data: bytes, last: bool) -> bytes:
    return ((len(data) << 3) | int(last)).to_bytes(3, "little") + data  # Block_Type 0 (raw)


def _frame(content_size: int, blocks: list[bytes]) -> bytes:
    """Single-segment frame with a 1-byte content size, then the given blocks."""
    return b"\x28\xb5\x2f\xfd" + bytes([0x20, content_size]) + b"".join(blocks)


def test_frame_with_more_blocks_than_bytes_plus_one_is_refused() -> None:
    """libzstd decodes empty non-last blocks, so a frame of many of them is valid zstd; the spec lets us refuse it."""
    frame = _frame(2, [_raw_block(b"", False), _raw_block(b"", False), _raw_block(b"a", False), _raw_block(b"b", True)])
    assert zstandard.ZstdDecompressor().decompress(frame) == b"ab"
    out = bytearray(2)
    with pytest.raises(CodecError, match=r"more than 3 blocks for 2 declared bytes") as info:
        decompress_into(memoryview(frame), memoryview(out))
    assert type(info.value) is CodecError
    ok = _frame(2, [_raw_block(b"a", False), _raw_block(b"b", False), _raw_block(b"", True)])  # content + 1 blocks
    decompress_into(memoryview(ok), memoryview(out))
    assert bytes(out) == b"ab"


def test_block_walk_is_bounded_by_the_declared_size() -> None:
    """1.5 MB of empty blocks before a 1-byte one: valid zstd, refused after 2 block headers instead of walking 500,000."""
    frame = _frame(1, [_raw_block(b"", False)] * 500_000 + [_raw_block(b"x", True)])
    assert zstandard.ZstdDecompressor().decompress(frame) == b"x"
    with pytest.raises(CodecError, match=r"more than 2 blocks for 1 declared bytes"):  # raised at the third header
        codecs.get_codec("zstd").check(memoryview(frame), 1, 1)


# --- check before allocating (spec §5.1) -----------------------------------------------------------


@pytest.mark.parametrize("codec_id", ["zstd", "byteplanes"])
def test_check_refuses_without_decoding(codec_id: str) -> None:
    """``check`` compares headers with the decoded length alone; ``decode_new`` never allocates when it fails."""
    data = np.arange(64, dtype=np.float32).tobytes()
    c = codecs.get_codec(codec_id)
    stored = memoryview(c.encode(memoryview(data), 4))
    c.check(stored, len(data), 4)
    assert bytes(c.decode_new(stored, len(data), 4)) == data
    with pytest.raises(CodecError, match=r"declares (256|64) bytes, index says (1073741824|268435456)"):
        c.check(stored, 1 << 30, 4)


def test_byteplanes_fallback_for_one_byte_items_uses_zstds_default_level() -> None:
    """Level None means each codec's own default: zstd's 3 for the fallback, not byteplanes' 1."""
    assert encode_blob(np.zeros(4096, np.int8), "byteplanes")[1] == {"id": "zstd", "level": 3}
    assert encode_blob(np.zeros(4096, np.float32), "byteplanes")[1] == {"id": "byteplanes", "level": 1}


def test_reused_compressor_writes_the_bytes_a_fresh_one_writes() -> None:
    """zstd.compress keeps one ZstdCompressor per level and thread; reuse must not change a byte."""
    import zstandard

    from adapterpack.codecs import zstd as zstd_codec

    rng = np.random.default_rng(5)
    for n in (7, 5000, 300_000, 5000):
        data = rng.integers(0, 50, n).astype(np.float32).tobytes()
        for level in (1, 3):
            fresh = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
            assert zstd_codec.compress(data, level) == fresh
