"""Malformed .apack files: each case starts from a valid file and breaks exactly one thing.

Modelled on llama.cpp's test-gguf.cpp. Every refusal must be the EXACT adapterpack error
class (never a numpy/json/struct traceback) with a message that names the problem and the
file. Cases that a reader must accept (higher minor, optional unknown records) are tested
for what they yield.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.checksum import crc32c
from adapterpack.container import ApackReader
from adapterpack.container.preamble import MAX_INDEX_LENGTH
from adapterpack.container.writer import write_apack
from adapterpack.errors import (
    AdapterpackError,
    BadMagicError,
    ChecksumError,
    CodecError,
    DuplicateNameError,
    IndexFormatError,
    IndexTooLargeError,
    LayoutError,
    LengthMismatchError,
    RankError,
    RecordError,
    SizeLimitError,
    TruncatedFileError,
    UnknownCodecError,
    UnknownDTypeError,
    UnknownEncodingError,
    UnsupportedVersionError,
)
from tests.apack_builders import (
    Parts,
    assemble,
    byteplanes,
    compressible_adapter,
    edited,
    load_everything,
    lora_module,
    lying_frame,
    nola_module,
    preamble,
    small_adapter,
    split,
    valid_parts,
    write,
    zstd_frame,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One corruption: ``make`` turns a valid file (taken apart) into the broken bytes."""

    id: str
    make: Callable[[Parts], bytes]
    error: type[AdapterpackError]
    match: str


def edit(fn: Callable[[Parts], object]) -> Callable[[Parts], bytes]:
    """A ``make`` that mutates a copy of the parts, then builds with CRC and padding recomputed."""

    def make(p: Parts) -> bytes:
        q = p.copy()
        fn(q)
        return q.build()

    return make


def blob(i: int, **changes: object) -> Callable[[Parts], bytes]:
    """Set fields of blob ``i`` in the index."""
    return edit(lambda p: p.index["blobs"][i].update(changes))


def module(k: int, **changes: object) -> Callable[[Parts], bytes]:
    """Set fields of module ``k`` of the first adapter."""
    return edit(lambda p: p.index["adapters"][0]["modules"][k].update(changes))


def params(k: int, **changes: object) -> Callable[[Parts], bytes]:
    """Set params of module ``k`` of the first adapter."""
    return edit(lambda p: p.index["adapters"][0]["modules"][k]["params"].update(changes))


def text_edit(old: str, new: str) -> Callable[[Parts], bytes]:
    """Replace text in the serialized index (for things a dict cannot hold: NaN, duplicate keys)."""

    def make(p: Parts) -> bytes:
        text = json.dumps(p.index, separators=(",", ":"))
        assert old in text
        return assemble(text.replace(old, new, 1), p.data)

    return make


def stored_blob(i: int, stored: bytes | Callable[[Parts], bytes], codec: str) -> Callable[[Parts], bytes]:
    """Give blob ``i`` these stored bytes under ``codec`` (re-laying the data section; length and CRC kept)."""

    def fn(p: Parts) -> None:
        p.index["blobs"][i]["codec"] = {"id": codec, "level": 3}
        p.set_blob(i, stored(p) if callable(stored) else stored)

    return edit(fn)


def _a0(p: Parts) -> bytes:
    """Decoded bytes of blob 0 (module 0's A: float32 [2, 6]) in the small adapter."""
    return small_adapter().modules["layers.0.q_proj"].tensors["A"].tobytes()


def _dup_adapter(p: Parts) -> None:
    second = json.loads(json.dumps(p.index["adapters"][0]))
    p.index["adapters"].append(second)


def _dup_module(p: Parts) -> None:
    mods = p.index["adapters"][0]["modules"]
    mods[1]["name"] = mods[0]["name"]


def _dup_tensor(p: Parts) -> None:
    p.index["adapters"][0]["tensors"].append(dict(p.index["adapters"][0]["tensors"][0]))


def _unreferenced(p: Parts) -> None:
    p.index["blobs"].append(dict(p.index["blobs"][4]))
    p.set_blobs([p.blob(i) for i in range(5)] + [p.blob(4)])


def _b_as_float16(p: Parts) -> None:
    b16 = small_adapter().modules["layers.0.q_proj"].tensors["B"].astype(np.float16).tobytes()
    p.index["blobs"][1]["dtype"] = "float16"
    p.set_blob(1, b16, b16)


def _rank_too_big(p: Parts) -> None:
    p.index["adapters"][0]["modules"][0]["params"]["rank"] = 3


def _no_content_size(p: Parts) -> bytes:
    return zstd_frame(_a0(p), content_size=False)


def _size_differs(p: Parts) -> bytes:
    return zstd_frame(_a0(p) + b"\0" * 8)


def _corrupt_zstd(p: Parts) -> bytes:
    frame = zstd_frame(_a0(p), level=19)
    header = 6  # magic, descriptor, 1-byte content size
    return frame[:header] + bytes([frame[header] | 0x06]) + frame[header + 1 :]  # block type 3 is reserved


def _yields_more(p: Parts) -> bytes:
    return lying_frame(48, block=b"\x01", block_len=4096)  # header says 48, its one RLE block makes 4096


def _trailing_skippable(p: Parts) -> bytes:
    return zstd_frame(_a0(p)) + struct.pack("<II", 0x184D2A50, 4) + b"hide"


def _planes_table(p: Parts) -> bytes:
    stored = bytearray(byteplanes(_a0(p), 4))
    stored[0] += 1  # plane 0's frame length one byte too many; the table no longer sums to the blob
    return bytes(stored)


def _planes_huge(p: Parts) -> bytes:
    stored = bytearray(byteplanes(_a0(p), 4))
    stored[0:8] = struct.pack("<Q", 2**64 - 1)
    return bytes(stored)


def _plane_short(p: Parts) -> bytes:
    data = _a0(p)
    frames = [zstd_frame(data[j::4]) for j in range(4)]
    frames[2] = zstd_frame(data[2::4][:-1])  # plane 2 decodes to N-1 bytes
    return byteplanes(data, 4, frames=frames)


def _byteplanes_uint8(p: Parts) -> None:
    p.index["blobs"][4].update(dtype="uint8", shape=[48], codec={"id": "byteplanes", "level": 3})
    p.set_blob(4, byteplanes(bytes(48), 1, frames=[zstd_frame(bytes(48))]))


def _ratio(p: Parts) -> None:
    p.index["blobs"][0].update(shape=[2, 2**30], length=2**33, codec={"id": "zstd", "level": 3})


def _magnitude_wrong_length(p: Parts) -> None:
    """Module 0 (B is [4, 2]) gets a 1-D float32 magnitude of 12 elements: blob 4 (the [3, 4] head) seen as [12]."""
    p.index["blobs"][4]["shape"] = [12]
    m = p.index["adapters"][0]["modules"][0]
    m["params"]["dora"] = True
    m["tensors"]["magnitude"] = 4


def _unknown_optional_codec_required(p: Parts) -> None:
    p.index["blobs"][0]["codec"] = {"id": "x-future-codec", "must_understand": True}


def _cut_index(raw: bytes) -> bytes:
    """The file cut in the middle of its (stored) index."""
    return raw[: 32 + int.from_bytes(raw[16:24], "little") // 2]


CASES = [
    # --- preamble --------------------------------------------------------------------------------
    Case("empty-file", lambda p: b"", TruncatedFileError, r"file is 0 bytes, shorter than the 32-byte preamble"),
    Case("truncated-preamble", lambda p: p.build()[:20], TruncatedFileError, r"20 bytes, shorter than the 32-byte preamble"),
    Case("wrong-magic", lambda p: b"PK\x03\x04" + p.build()[4:], BadMagicError, r"not an \.apack file \(magic b'PK\\x03\\x04"),
    Case("text-mode-magic", lambda p: p.build().replace(b"\r\n", b"\n", 1), BadMagicError, r"not an \.apack file"),
    Case("short-garbage", lambda p: b"hello", BadMagicError, r"not an \.apack file"),
    Case("future-major", lambda p: p.build(major=2), UnsupportedVersionError, r"version 2\.\d+: written by a newer adapterpack"),
    Case("major-zero", lambda p: p.build(major=0), UnsupportedVersionError, r"version 0\.\d+"),
    Case("must-understand-flag", lambda p: p.build(flags=0x0010), UnsupportedVersionError, r"must-understand flag bits 0x0010"),
    Case("must-understand-flag-15", lambda p: p.build(flags=0x8000), UnsupportedVersionError, r"flag bits 0x8000"),
    Case("nonzero-reserved", lambda p: p.build(reserved=7), IndexFormatError, r"reserved preamble field is 7"),
    Case("index-length-1", lambda p: p.build(index_length=1), IndexFormatError, r"index length 1 is too small"),
    Case("index-crc", lambda p: p.build(index_crc=0xDEADBEEF), ChecksumError, r"index checksum mismatch"),
    Case("truncated-index", lambda p: _cut_index(p.build()), TruncatedFileError, r"index ends at byte"),
    # --- index JSON ------------------------------------------------------------------------------
    Case("index-not-utf8", lambda p: assemble(b'{"x":"\xff\xfe"}'), IndexFormatError, r"index is not UTF-8"),
    Case(
        "index-bom",
        lambda p: assemble(b"\xef\xbb\xbf" + json.dumps(p.index).encode(), p.data),
        IndexFormatError,
        r"not valid JSON.*BOM",
    ),
    Case("index-bad-json", lambda p: assemble(b'{"adapters": [}', p.data), IndexFormatError, r"index is not valid JSON"),
    Case("index-deep-json", lambda p: assemble("[" * 200_000 + "]" * 200_000), IndexFormatError, r"nested too deeply"),
    Case("index-deep-object", lambda p: assemble('{"a":' * 100_000 + "1" + "}" * 100_000), IndexFormatError, r"nested too deeply"),
    Case("index-not-object", lambda p: assemble(b"[1, 2, 3]", p.data), IndexFormatError, r"must be a JSON object, got list"),
    Case("index-string", lambda p: assemble(b'"adapters"'), IndexFormatError, r"must be a JSON object, got str"),
    Case("index-nan", text_edit('"alpha":4.0', '"alpha":NaN'), IndexFormatError, r"contains NaN"),
    Case("index-infinity", text_edit('"alpha":4.0', '"alpha":-Infinity'), IndexFormatError, r"contains -Infinity"),
    Case("index-overflowing-number", text_edit('"alpha":4.0', '"alpha":1e400'), IndexFormatError, r"1e400 overflows"),
    Case("index-duplicate-key", text_edit('"rank":2,', '"rank":2,"rank":3,'), DuplicateNameError, r"key 'rank' twice"),
    Case("index-duplicate-top-key", text_edit('{"writer":', '{"blobs":[],"writer":'), DuplicateNameError, r"key 'blobs' twice"),
    Case("no-blobs-key", edit(lambda p: p.index.pop("blobs")), IndexFormatError, r"index: missing 'blobs'"),
    Case("no-adapters", edit(lambda p: p.index.update(adapters=[])), IndexFormatError, r"lists no adapters"),
    Case(
        "adapter-name-too-long",
        edit(lambda p: p.index["adapters"][0].update(name="x" * 257)),
        IndexFormatError,
        r"1–256 characters",
    ),
    Case("adapter-not-object", edit(lambda p: p.index["adapters"].append(3)), IndexFormatError, r"adapter 1: must be an object"),
    Case("metadata-not-strings", edit(lambda p: p.index["adapters"][0].update(metadata={"k": 1})), IndexFormatError, r"metadata"),
    # --- names -----------------------------------------------------------------------------------
    Case("duplicate-adapter", edit(_dup_adapter), DuplicateNameError, r"two adapters are named 'default'"),
    Case("duplicate-module", edit(_dup_module), DuplicateNameError, r"two modules are named 'layers\.0\.q_proj'"),
    Case("duplicate-tensor", edit(_dup_tensor), DuplicateNameError, r"two tensors are named 'lm_head\.weight'"),
    Case("module-name-empty", module(0, name=""), IndexFormatError, r"'name' must be 1–1024 characters"),
    # --- blob table ------------------------------------------------------------------------------
    Case("offset-out-of-range", blob(4, offset=1 << 40), LayoutError, r"blob 4: offset 1099511627776 leaves a gap"),
    Case("offset-negative", blob(2, offset=-8), IndexFormatError, r"blob 2: 'offset' = -8 is out of range"),
    Case("offset-not-int", blob(2, offset=8.0), IndexFormatError, r"blob 2: 'offset' must be int"),
    Case("offset-overlap", blob(1, offset=40), LayoutError, r"blob 1: offset 40 overlaps the previous blob"),
    Case("offset-misaligned", blob(1, offset=52), LayoutError, r"blob 1: offset 52 is not aligned to 8 bytes"),
    Case("offset-gap", blob(1, offset=56), LayoutError, r"blob 1: offset 56 leaves a gap beyond padding"),
    Case("truncated-blobs", lambda p: p.build()[:-10], TruncatedFileError, r"past the end of the .*-byte file \(truncated\)"),
    Case("trailing-bytes", lambda p: p.build() + b"\0" * 8, LayoutError, r"8 bytes after the last blob"),
    Case(
        "length-mismatch", blob(0, length=44), LengthMismatchError, r"blob 0: length 44 != 48 \(shape \[2, 6\] × 4-byte float32\)"
    ),
    Case("shape-mismatch", blob(0, shape=[2, 5]), LengthMismatchError, r"blob 0: length 48 != 40"),
    Case("raw-stored-length", blob(0, stored_length=40), LengthMismatchError, r"raw blob stores 40 bytes, decodes to 48"),
    Case("too-many-dims", blob(0, shape=[1] * 9), IndexFormatError, r"9 dimensions exceed the limit of 8"),
    Case("shape-negative", blob(0, shape=[-2, -6]), IndexFormatError, r"non-negative integers"),
    Case("shape-bool", blob(0, shape=[True, 6]), IndexFormatError, r"non-negative integers"),
    Case("empty-shape-too-large", blob(0, shape=[2**52, 2**10, 0], length=0, stored_length=0), IndexFormatError, r"too large"),
    Case("crc-not-32-bit", blob(0, crc32c=2**32), IndexFormatError, r"crc32c 4294967296 is not a 32-bit value"),
    Case("blob-not-object", edit(lambda p: p.index["blobs"].__setitem__(0, [])), IndexFormatError, r"blob 0: must be an object"),
    Case(
        "too-many-blobs",
        edit(lambda p: p.index.update(blobs=[0] * 1_000_001)),
        IndexFormatError,
        r"index lists 1000001 blobs, over the limit of 1000000",
    ),
    Case(
        "unknown-dtype",
        blob(0, dtype="float8_e4m3"),
        UnknownDTypeError,
        r"blob 0: unknown dtype 'float8_e4m3' \(known: float64, float32",
    ),
    Case("dtype-alias", blob(0, dtype="fp32"), UnknownDTypeError, r"unknown dtype 'fp32' \(the spec name is 'float32'\)"),
    Case("codec-not-object", blob(0, codec="raw"), IndexFormatError, r"'codec' must be dict"),
    Case("codec-no-id", blob(0, codec={"level": 3}), IndexFormatError, r"codec: missing 'id'"),
    Case("unknown-codec", blob(0, codec={"id": "x-future-codec"}), UnknownCodecError, r"unknown codec 'x-future-codec'"),
    Case(
        "unknown-codec-marked",
        edit(_unknown_optional_codec_required),
        UnknownCodecError,
        r"'x-future-codec' marked must_understand",
    ),
    Case("unreferenced-blob", edit(_unreferenced), IndexFormatError, r"blob 5 is not referenced by any record"),
    Case(
        "blob-ref-out-of-range",
        edit(lambda p: p.index["adapters"][0]["tensors"][0].update(blob=5)),
        IndexFormatError,
        r"blob reference 5",
    ),
    Case("blob-ref-negative", module(0, tensors={"A": -1, "B": 1}), IndexFormatError, r"blob reference -1 is not a blob index"),
    Case("blob-ref-bool", module(0, tensors={"A": True, "B": 1}), IndexFormatError, r"blob reference True is not a blob index"),
    # --- records ---------------------------------------------------------------------------------
    Case("unknown-encoding", module(0, encoding="x-future-enc"), UnknownEncodingError, r"unknown encoding 'x-future-enc'"),
    Case("rank-mismatch", edit(_rank_too_big), RankError, r"rank 3 does not fit A \[2, 6\] and B \[4, 2\]"),
    Case("rank-zero", params(0, rank=0), RankError, r"rank must be an integer >= 1"),
    Case("base-shape", module(0, base_shape=[6, 4]), RecordError, r"base_shape \[6, 4\] disagrees"),
    Case("base-shape-fan-in-fan-out", params(0, fan_in_fan_out=True), RecordError, r"base_shape \[4, 6\] disagrees"),
    Case("ab-dtype", edit(_b_as_float16), RecordError, r"A and B must share one float dtype, got float32 and float16"),
    Case("ab-int", blob(0, dtype="int32"), RecordError, r"A and B must share one float dtype, got int32"),
    # an integer literal past binary64 is refused as JSON (spec §2), before any record is read
    Case("alpha-huge-int", params(0, alpha=10**400), IndexFormatError, r"\(401 digits\) overflows a binary64"),
    Case("alpha-string", params(0, alpha="4"), RecordError, r"alpha must be a finite number"),
    Case("layout-unknown", params(0, layout="diagonal"), RecordError, r"layout must be one of"),
    Case("dora-without-magnitude", params(0, dora=True), RecordError, r"dora is True but the magnitude tensor is absent"),
    Case("missing-slot", module(0, tensors={"A": 0, "C": 1}), RecordError, r"missing \[.B.\], unknown \[.C.\]"),
    Case(
        "dora-magnitude-length",
        edit(_magnitude_wrong_length),
        RecordError,
        r"magnitude must be a float vector of B's 4 rows, got float32 \[12\]",
    ),
    Case(
        "fan-in-fan-out-embedding",
        params(0, layout="embedding", fan_in_fan_out=True),
        RecordError,
        r"embedding lora needs 2-D A and B and no fan_in_fan_out",
    ),
    Case("params-not-object", module(0, params=[2]), IndexFormatError, r"'params' must be dict"),
    # --- zstd ------------------------------------------------------------------------------------
    Case(
        "zstd-no-content-size",
        stored_blob(0, _no_content_size, "zstd"),
        CodecError,
        r"blob 0: zstd frame: frame does not declare its content size",
    ),
    Case(
        "zstd-size-differs",
        stored_blob(0, _size_differs, "zstd"),
        CodecError,
        r"blob 0: zstd frame: frame declares 56 bytes, index says 48",
    ),
    Case(
        "zstd-claims-16gib", stored_blob(0, lying_frame(16 << 30), "zstd"), CodecError, r"declares 17179869184 bytes, index says 48"
    ),
    Case("zstd-yields-more", stored_blob(0, _yields_more, "zstd"), CodecError, r"corrupt|differs"),
    Case("zstd-corrupt", stored_blob(0, _corrupt_zstd, "zstd"), CodecError, r"corrupt \(reserved block type\)"),
    Case("zstd-garbage", stored_blob(0, b"\x00" * 40, "zstd"), CodecError, r"not a zstd frame"),
    Case(
        "zstd-trailing-frame", stored_blob(0, lambda p: zstd_frame(_a0(p)) + zstd_frame(b"x"), "zstd"), CodecError, r"followed by"
    ),
    Case("zstd-trailing-skippable", stored_blob(0, _trailing_skippable, "zstd"), CodecError, r"followed by 12 more bytes"),
    Case("zstd-ratio", edit(_ratio), LengthMismatchError, r"claims 8589934592 decoded bytes .* cannot expand that much"),
    # --- byteplanes ------------------------------------------------------------------------------
    Case(
        "planes-table",
        stored_blob(0, _planes_table, "byteplanes"),
        CodecError,
        r"blob 0: byteplanes: plane table sums to 117 bytes, blob has 116",
    ),
    Case("planes-table-huge", stored_blob(0, _planes_huge, "byteplanes"), CodecError, r"plane table sums to"),
    Case("planes-table-short", stored_blob(0, b"\x01" * 20, "byteplanes"), CodecError, r"shorter than the plane table"),
    Case(
        "planes-plane-short",
        stored_blob(0, _plane_short, "byteplanes"),
        CodecError,
        r"blob 0: byteplanes plane 2: frame declares 11 bytes, index says 12",
    ),
    Case("planes-1-byte-dtype", edit(_byteplanes_uint8), IndexFormatError, r"byteplanes cannot hold uint8"),
    Case(
        "codec-must-understand-string-raw",
        blob(0, codec={"id": "raw", "must_understand": "yes"}),
        IndexFormatError,
        r"blob 0 codec: 'must_understand' must be bool, got 'yes'",
    ),
    Case(
        "codec-must-understand-int-zstd",
        blob(0, codec={"id": "zstd", "level": 3, "must_understand": 1}),
        IndexFormatError,
        r"blob 0 codec: 'must_understand' must be bool, got 1",
    ),
    # --- integers are written without fraction or exponent (§2) -----------------------------------
    Case("rank-as-float", params(0, rank=2.0), RankError, r"rank must be an integer >= 1, got 2.0"),
    Case("shape-int-as-float", blob(0, shape=[2.0, 6]), IndexFormatError, r"'shape' must be non-negative integers"),
    Case("offset-exponent", text_edit('"offset":48', '"offset":4.8e1'), IndexFormatError, r"'offset' must be int"),
]


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Parts:
    """The small adapter written raw and taken apart: blobs A0 [2,6], B0 [4,2], A1, B1 (float32), head [3,4]."""
    return valid_parts(tmp_path_factory.mktemp("valid"), "raw")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Parts]:
    """A compressible adapter written with each codec, taken apart."""
    tmp = tmp_path_factory.mktemp("compressed")
    return {c: valid_parts(tmp, c, compressible_adapter()) for c in ("raw", "zstd", "byteplanes")}


def test_valid_files_load(valid: Parts, compressed: dict[str, Parts], tmp_path: Path) -> None:
    """The starting points are valid (so each case's failure is its own corruption)."""
    (ad,) = load_everything(write(tmp_path / "raw.apack", valid.build()))
    assert ApackReader(tmp_path / "raw.apack").verify().ok
    assert [b["offset"] for b in valid.index["blobs"]] == [0, 48, 80, 128, 160]
    assert ad.module("layers.0.q_proj").array("A").tobytes() == _a0(valid)
    for codec, parts in compressed.items():
        assert {b["codec"]["id"] for b in parts.index["blobs"]} == {codec}
        path = write(tmp_path / f"{codec}.apack", parts.build())
        (ad,) = load_everything(path)
        assert ApackReader(path).verify().ok
        assert ad.tensors["lm_head.weight"].load().tobytes() == compressible_adapter().tensors["lm_head.weight"].tobytes()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed(case: Case, valid: Parts, tmp_path: Path) -> None:
    path = write(tmp_path / "bad.apack", case.make(valid))
    with pytest.raises(AdapterpackError) as info:
        load_everything(path)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None  # no chained numpy/json traceback
    assert info.value.args and "\n" not in str(info.value)
    assert re.search(case.match, str(info.value)), str(info.value)


def test_case_ids_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


# --- cases a reader must accept ---------------------------------------------------------------------


def test_higher_minor_with_unknown_optional_keys_reads(valid: Parts, tmp_path: Path) -> None:
    p = valid.copy()
    p.index["x-added-in-1.7"] = {"anything": [1, 2, 3]}
    p.index["adapters"][0]["x-adapter-key"] = True
    p.index["adapters"][0]["modules"][0]["x-module-key"] = "hello"
    p.index["blobs"][0]["x-blob-key"] = 1.5
    p.index["blobs"][1]["codec"]["x-codec-key"] = {}
    path = write(tmp_path / "minor.apack", p.build(minor=7, flags=0x0001_0000))  # bit 16: informational
    reader = ApackReader(path)
    assert reader.version == "1.7"
    (ad,) = load_everything(path)
    ref = small_adapter()
    for name, m in ref.modules.items():
        for slot in ("A", "B"):
            assert ad.module(name).array(slot).tobytes() == m.tensors[slot].tobytes()
    assert ad.skipped == []
    report = reader.verify()
    assert report.ok and report.version == "1.7", report.problems


def test_unknown_optional_codec_skips_module_and_tensor(valid: Parts, tmp_path: Path) -> None:
    p = valid.copy()
    p.index["blobs"][2]["codec"] = {"id": "x-future-codec", "must_understand": False}  # module 1's A
    p.index["blobs"][4]["codec"] = {"id": "x-future-codec", "must_understand": False, "level": 9}  # the pass-through tensor
    path = write(tmp_path / "optcodec.apack", p.build(minor=3))
    (ad,) = load_everything(path)
    assert list(ad.modules) == ["layers.0.q_proj"]
    assert ad.tensors == {}
    assert ad.skipped == [
        "module 'layers.0.v_proj': codec 'x-future-codec' not understood, skipped",
        "tensor 'lm_head.weight': codec 'x-future-codec' not understood, skipped",
    ]
    report = ApackReader(path).verify()
    assert report.ok, report.problems
    assert "blob 2 (module 'layers.0.v_proj' A): codec 'x-future-codec' not understood, not checked" in report.skipped
    assert "module 'layers.0.v_proj': codec 'x-future-codec' not understood, skipped" in report.skipped
    assert report.bytes_checked == 48 + 32 + 32  # blobs 0, 1 and 3
    with pytest.raises(UnknownCodecError, match="x-future-codec"):
        ApackReader(path).read_blob(2)


def test_unknown_optional_encoding_is_skipped(valid: Parts, tmp_path: Path) -> None:
    p = valid.copy()
    m = p.index["adapters"][0]["modules"][1]
    m.update(encoding="x-future-enc", must_understand=False, params={"whatever": [1]})
    path = write(tmp_path / "optenc.apack", p.build(minor=1))
    (ad,) = load_everything(path)
    assert list(ad.modules) == ["layers.0.q_proj"]
    assert ad.skipped == ["module 'layers.0.v_proj': encoding 'x-future-enc' not understood, skipped"]
    assert "lm_head.weight" in ad.tensors
    report = ApackReader(path).verify()
    assert report.ok and report.skipped == ad.skipped, report
    # the same record marked must_understand is refused, naming the id
    m["must_understand"] = True
    with pytest.raises(UnknownEncodingError, match=r"unknown encoding 'x-future-enc' marked must_understand") as info:
        adapterpack.open(write(tmp_path / "reqenc.apack", p.build(minor=1)))
    assert type(info.value) is UnknownEncodingError


def test_must_understand_must_be_bool(valid: Parts, tmp_path: Path) -> None:
    p = valid.copy()
    p.index["adapters"][0]["modules"][0]["must_understand"] = "false"
    with pytest.raises(IndexFormatError, match="'must_understand' must be bool") as info:
        load_everything(write(tmp_path / "mu.apack", p.build()))
    assert type(info.value) is IndexFormatError


# --- checksums and padding: refused on read, reported by verify -----------------------------------


@pytest.mark.parametrize("codec", ["raw", "zstd", "byteplanes"])
def test_blob_checksum_mismatch(compressed: dict[str, Parts], tmp_path: Path, codec: str) -> None:
    p = compressed[codec].copy()
    p.index["blobs"][3]["crc32c"] ^= 1  # module 1's B: the stored CRC no longer matches the decoded bytes
    path = write(tmp_path / "crc.apack", p.build())
    reader = ApackReader(path)
    ad = reader.adapter()
    ad.module("layers.0.q_proj").array("A")  # other blobs still read
    with pytest.raises(ChecksumError, match=r"blob 3: checksum mismatch") as info:
        ad.module("layers.0.v_proj").delta()
    assert type(info.value) is ChecksumError
    report = ApackReader(path).verify()
    assert not report.ok
    assert report.problems == ["blob 3 (module 'layers.0.v_proj' B): checksum mismatch (decoded bytes are corrupt)"]
    # verify=False trusts the bytes: the read succeeds and returns them unchanged
    got = ApackReader(path, verify=False).adapter().module("layers.0.v_proj").array("B")
    assert got.tobytes() == compressible_adapter().modules["layers.0.v_proj"].tensors["B"].tobytes()


def test_flipped_data_byte_is_a_checksum_error(valid: Parts, tmp_path: Path) -> None:
    p = valid.copy()
    data = bytearray(p.data)
    data[p.index["blobs"][2]["offset"] + 5] ^= 0x40
    p.data = bytes(data)
    path = write(tmp_path / "flip.apack", p.build())
    with pytest.raises(ChecksumError, match="blob 2: checksum mismatch"):
        load_everything(path)
    problems = ApackReader(path).verify().problems
    assert problems == ["blob 2 (module 'layers.0.v_proj' A): checksum mismatch (decoded bytes are corrupt)"]


def _odd_adapter() -> Adapter:
    """A tensor of 3 bytes, so the next blob is preceded by 5 bytes of padding."""
    m = lora_module("proj")
    return Adapter(modules={"proj": m}, tensors={"bits": np.array([1, 2, 3], dtype=np.uint8), "w": np.ones(2, np.float32)})


def test_nonzero_padding_is_a_verify_problem(tmp_path: Path) -> None:
    p = valid_parts(tmp_path, "raw", _odd_adapter())
    offsets = [b["offset"] for b in p.index["blobs"]]
    assert offsets[3] == offsets[2] + 8  # 3 bytes + 5 of padding
    clean = write(tmp_path / "clean.apack", p.build())
    assert ApackReader(clean).verify().ok

    data = bytearray(p.data)
    data[offsets[2] + 4] = 0xAA
    p.data = bytes(data)
    path = write(tmp_path / "pad.apack", p.build())
    load_everything(path)  # reading does not look at padding
    assert ApackReader(path).verify().problems == ["padding before blob 3 is not zero (blob holds tensor 'w')"]

    index_pad = write(tmp_path / "ipad.apack", valid_parts(tmp_path, "raw").build(pad=None))
    raw = bytearray(index_pad.read_bytes())
    length = struct.unpack_from("<Q", raw, 16)[0]
    assert (32 + length) % 256  # there is padding after the index
    raw[32 + length] = 1
    index_pad.write_bytes(bytes(raw))
    assert ApackReader(index_pad).verify().problems == ["padding after the index is not zero"]


# --- resource bounds ---------------------------------------------------------------------------------


def test_index_too_large_is_refused_from_the_preamble_alone(tmp_path: Path) -> None:
    for length in (MAX_INDEX_LENGTH + 1, 2**64 - 1):
        path = write(tmp_path / "big.apack", preamble(length, 0))  # 32 bytes: the claimed index does not exist
        tracemalloc.start()
        try:
            with pytest.raises(IndexTooLargeError, match=rf"index length {length} exceeds the 67108864-byte limit") as info:
                adapterpack.open(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert type(info.value) is IndexTooLargeError
        assert peak < 1 << 20
    # exactly at the limit is not "too large": it is a truncated file here
    with pytest.raises(TruncatedFileError, match="index ends at byte 67108896"):
        adapterpack.open(write(tmp_path / "max.apack", preamble(MAX_INDEX_LENGTH, 0)))


BOUNDED_MEMORY_SCRIPT = """
import resource, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from adapterpack.container import ApackReader
from adapterpack.errors import AdapterpackError
from tests.apack_builders import lying_frame, valid_parts
tmp = Path(sys.argv[1])
p = valid_parts(tmp, "raw")
p.index["blobs"][0]["codec"] = {{"id": "zstd", "level": 3}}
p.set_blob(0, lying_frame(16 << 30))  # a 17-byte frame whose header claims 16 GiB
variants = {{"index-honest": p.build()}}
p.index["blobs"][0].update(shape=[2, 2**31], length=16 << 30)  # and an index that believes it
variants["index-believes"] = p.build()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, raw in variants.items():
    path = tmp / (name + ".apack")
    path.write_bytes(raw)
    try:
        r = ApackReader(path)
        r.read_blob(0)
        print(name, "OK")
    except AdapterpackError as e:
        print(name, type(e).__name__, e)
    try:
        ApackReader(path, verify=False).verify()
    except AdapterpackError:
        pass
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("GROWTH_KB", after - before)
"""


def test_zstd_size_claim_fails_fast_with_bounded_memory(tmp_path: Path) -> None:
    script = BOUNDED_MEMORY_SCRIPT.format(repo=str(REPO))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("index-honest CodecError ") and "declares 17179869184 bytes, index says 48" in lines[0]
    assert lines[1].startswith("index-believes LengthMismatchError ") and "cannot expand that much" in lines[1]
    growth_kb = int(lines[2].split()[1])
    assert growth_kb < 100 * 1024, f"max RSS grew by {growth_kb} KiB"


def test_zstd_frame_yielding_more_than_declared_stays_bounded(tmp_path: Path) -> None:
    """A frame whose blocks make more than its header says is refused, decoding only into the index's buffer."""
    p = valid_parts(tmp_path, "raw")
    p.index["blobs"][0]["codec"] = {"id": "zstd", "level": 3}
    p.set_blob(0, lying_frame(48, block=b"\x07", block_len=1 << 17))
    path = write(tmp_path / "more.apack", p.build())
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            ApackReader(path).read_blob(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("codec", ["zstd", "byteplanes"])
def test_header_is_checked_before_the_output_is_allocated(tmp_path: Path, codec: str) -> None:
    """A 16 KiB blob whose index claims 512 MiB (within the 32768x bound) but whose frame declares 48 bytes.

    The index alone cannot refuse it; the codec must compare the frame header with the
    claim before allocating the 512 MiB (spec §5.1), so tracemalloc's peak stays small.
    """
    p = valid_parts(tmp_path, "raw")
    decoded = _a0(p)  # 12 float32
    frames = [zstd_frame(decoded)] if codec == "zstd" else [zstd_frame(decoded[j::4]) for j in range(4)]
    frames[-1] += b"\0" * ((1 << 14) - 8 * (len(frames) > 1) * len(frames) - sum(map(len, frames)))  # 16 KiB stored
    stored = frames[0] if codec == "zstd" else byteplanes(decoded, 4, frames=frames)
    assert len(stored) == 1 << 14
    p.index["blobs"][0].update(shape=[2, 1 << 26], length=1 << 29, codec={"id": codec, "level": 3})
    p.set_blob(0, stored)
    reader = ApackReader(write(tmp_path / "claim.apack", p.build()))
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"declares (48|12) bytes, index says (536870912|134217728)") as info:
            reader.read_blob(0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(info.value) is CodecError
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_zero_size_blobs(tmp_path: Path) -> None:
    """Zero-element tensors (including a last blob ending exactly at the end of the file) read back."""
    mod = Module(
        "m", "lora", (0, 6), {"rank": 2, "alpha": 1.0}, {"A": np.zeros((2, 6), np.float16), "B": np.zeros((0, 2), np.float16)}
    )
    ad = Adapter(modules={"m": mod}, tensors={"empty": np.zeros((3, 0, 2), np.int64)})
    for codec in ("raw", "zstd", "byteplanes"):
        path = tmp_path / f"z-{codec}.apack"
        adapterpack.save(ad, path, codec=codec)
        (got,) = load_everything(path)
        assert got.tensors["empty"].load().shape == (3, 0, 2)
        assert got.module("m").delta().shape == (0, 6)
        assert ApackReader(path).verify().ok
    # an index-only file: one adapter, no blobs at all, ends exactly at D
    path = write(tmp_path / "noblobs.apack", assemble({"adapters": [{"name": "x", "modules": []}], "blobs": []}))
    assert path.stat().st_size % 256 == 0
    (got,) = load_everything(path)
    assert len(got) == 0 and ApackReader(path).verify().ok


def test_truncation_at_every_length_is_refused(compressed: dict[str, Parts], tmp_path: Path) -> None:
    """Every proper prefix of a valid file is refused as truncated (or, under 8 bytes, possibly as not an .apack)."""
    raw = compressed["zstd"].build()
    path = write(tmp_path / "t.apack", raw)
    for n in reversed(range(len(raw))):
        os.truncate(path, n)
        with pytest.raises((TruncatedFileError, BadMagicError)) as info:
            ApackReader(path)
        assert n < 8 or type(info.value) is TruncatedFileError


def test_index_crc_covers_exactly_the_index(valid: Parts, tmp_path: Path) -> None:
    raw = bytearray(valid.build())
    length = struct.unpack_from("<Q", raw, 16)[0]
    assert struct.unpack_from("<I", raw, 24)[0] == crc32c(bytes(raw[32 : 32 + length]))
    raw[32 + length - 2] ^= 0x20  # inside the index
    with pytest.raises(ChecksumError, match="index checksum mismatch"):
        ApackReader(write(tmp_path / "i.apack", bytes(raw)))


def test_builders_reproduce_the_writer(tmp_path: Path) -> None:
    """split + build gives back the writer's bytes exactly (so each corruption above is the only defect)."""
    for codec in ("raw", "zstd", "byteplanes"):
        path = tmp_path / f"{codec}.apack"
        write_apack(path, compressible_adapter(), codec=codec)
        assert split(path.read_bytes()).build() == path.read_bytes()


# --- limits of spec §7: sizes no bytes back ----------------------------------------------------------------

BIG = 2**29 - 1  # the size bomb: a [2^29-1, 2^29-1] weight
WIDE = 1 << 16  # a WIDE x WIDE weight is 2^32 elements, over the dense-ΔW limit, from 2^16-element factors


def _written(module: Module) -> Callable[[Path], Path]:
    """``module`` written as it is (zstd): an honest record whose factors are small and whose ΔW is not."""

    def make(tmp: Path) -> Path:
        path = tmp / "big.apack"
        adapterpack.save(Adapter(modules={module.name: module}), path, codec="zstd")
        return path

    return make


def _zeros(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


SIZE_CASES = [
    # the nola factor and generator bombs are in test_limits.py (in a memory-capped child)
    (
        "nola-rank",
        lambda tmp: edited(tmp, nola_module("n", 6, 10), [6, 10], rank=7),
        RankError,
        r"rank 7 exceeds min\(out, in\) = 6",
    ),
    (
        "lora-delta",
        _written(Module("m", "lora", (WIDE, WIDE), {"rank": 1, "alpha": 1.0}, {"A": _zeros(1, WIDE), "B": _zeros(WIDE, 1)})),
        SizeLimitError,
        r"module 'm': a dense ΔW of shape \[65536, 65536\] holds 4294967296 elements",
    ),
    (
        "svd-rank0-delta",
        _written(Module("m", "svd", (BIG, BIG), {"rank": 0}, {"S": _zeros(0), "Ut": _zeros(0, BIG), "Vt": _zeros(0, BIG)})),
        SizeLimitError,
        r"holds 288230375077969921 elements",
    ),
    (
        "shared-delta",
        _written(
            Module(
                "m",
                "shared",
                (WIDE, WIDE),
                {"rank": 1, "form": "diagonal"},
                {"U": _zeros(WIDE, 1), "V": _zeros(WIDE, 1), "S": _zeros(1)},
            )
        ),
        SizeLimitError,
        r"over the limit of 2147483648 elements",
    ),
    (
        "nola-delta",
        lambda tmp: edited(tmp, nola_module("n", 6, 10), [WIDE, WIDE]),
        SizeLimitError,
        r"a dense ΔW of shape \[65536, 65536\]",
    ),
]


@pytest.mark.parametrize(("make", "error", "match"), [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES])
def test_size_bombs_are_refused_before_allocating(make: Callable[[Path], Path], error: type, match: str, tmp_path: Path) -> None:
    """Records whose sizes no bytes back (spec §7): refused on open, or when their ΔW is asked for, with tracemalloc's
    peak far below what they claim."""
    path = make(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(AdapterpackError) as info:
            for ad in load_everything(path):
                for m in ad:
                    m.delta()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(match, str(info.value)), str(info.value)
    assert info.value.__cause__ is None and "\n" not in str(info.value)
    assert peak < 16 << 20, f"peak {peak} bytes"
    if error is SizeLimitError:  # the file itself is valid: the fuzz target's ΔW pass expects exactly this refusal
        load_everything(path, delta_limit=1 << 16)
