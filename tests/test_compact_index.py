"""Format 1.3's container (spec/format.md §1.2, §1.3): the zstd-compressed index and the packed layout.

Hostile compressed indexes are refused with the named error and bounded memory (the declared size is
checked against the index-length limit before anything of that size is allocated); the packed layout
is accepted exactly under its flag, the 1.2 layout exactly without it; 1.2-layout files still read.
"""

from __future__ import annotations

import re
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from adapterpack.checksum import crc32c
from adapterpack.container import ApackReader
from adapterpack.container.index import blob_alignment, index_text
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, FLAG_UNALIGNED, MAX_INDEX_LENGTH
from adapterpack.container.writer import compress_index, write_apack
from adapterpack.errors import (
    AdapterpackError,
    ChecksumError,
    IndexFormatError,
    IndexTooLargeError,
    LayoutError,
    UnsupportedVersionError,
)
from tests.apack_builders import (
    Parts,
    assemble,
    compressible_adapter,
    index_bytes,
    lying_frame,
    small_adapter,
    split,
    write,
    zstd_frame,
)
from tools.fuzz_open import load_everything

SKIPPABLE = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"junk"


def _with_dict_id(frame: bytes) -> bytes:
    """``frame`` with a 1-byte Dictionary_ID in its header (RFC 8878 §3.1.1.1.1)."""
    fhd = frame[4]
    at = 5 + (0 if fhd & 0x20 else 1)
    return frame[:4] + bytes([fhd | 1]) + frame[5:at] + b"\x07" + frame[at:]


def _corrupt(frame: bytes) -> bytes:
    body = bytearray(frame)
    for k in range(len(body) // 2, len(body) - 4):
        body[k] ^= 0x5A
    return bytes(body)


#: (id, how the index's JSON text becomes the stored index, error, message)
HOSTILE: list[tuple[str, Callable[[bytes], bytes], type, str]] = [
    ("plain-json-under-the-flag", lambda t: t, IndexFormatError, r"compressed index: not a zstd frame"),
    ("no-content-size", lambda t: zstd_frame(t, content_size=False), IndexFormatError, r"does not declare its content size"),
    ("claims-64-mib-plus-1", lambda t: lying_frame(MAX_INDEX_LENGTH + 1), IndexTooLargeError, r"declares 67108865 bytes"),
    ("claims-16-gib", lambda t: lying_frame(1 << 34), IndexTooLargeError, r"over the 67108864-byte limit"),
    ("claims-1-byte", lambda t: lying_frame(1), IndexFormatError, r"declares 1 bytes, too few"),
    ("claims-more-than-it-holds", lambda t: lying_frame(4096), IndexFormatError, r"compressed index"),
    ("expands-over-256x", lambda t: lying_frame(1 << 20), IndexTooLargeError, r"from 17 stored bytes, over the 256x limit"),
    ("real-frame-over-256x", lambda t: zstd_frame(t[:-1] + b" " * 300_000 + b"}"), IndexTooLargeError, r"over the 256x limit"),
    ("size-lie-smaller", lambda t: zstd_frame(t)[:5] + b"\x02" + zstd_frame(t)[6:], IndexFormatError, r"compressed index"),
    ("trailing-bytes", lambda t: zstd_frame(t) + b"\0\0\0\0", IndexFormatError, r"followed by 4 more bytes"),
    ("second-frame", lambda t: zstd_frame(t) + zstd_frame(b"{}"), IndexFormatError, r"compressed index: one frame is"),
    ("skippable-frame-first", lambda t: SKIPPABLE + zstd_frame(t), IndexFormatError, r"not a zstd frame"),
    ("skippable-frame-after", lambda t: zstd_frame(t) + SKIPPABLE, IndexFormatError, r"compressed index: one frame is"),
    ("dictionary", lambda t: _with_dict_id(zstd_frame(t)), IndexFormatError, r"dictionary"),
    ("corrupt-blocks", lambda t: _corrupt(zstd_frame(t, level=1)), IndexFormatError, r"compressed index"),
    ("bad-checksum", lambda t: zstd_frame(t, checksum=True)[:-1] + b"\xff", IndexFormatError, r"compressed index"),
    ("frame-of-non-json", lambda t: zstd_frame(b"[1, 2, 3]"), IndexFormatError, r"must be a JSON object"),
    ("frame-of-bom", lambda t: zstd_frame(b"\xef\xbb\xbf" + t), IndexFormatError, r"index is not valid JSON"),
    ("frame-of-bad-utf8", lambda t: zstd_frame(b'{"x":"\xff"}'), IndexFormatError, r"not UTF-8"),
]


@pytest.fixture(scope="module")
def raw_parts(tmp_path_factory: pytest.TempPathFactory) -> Parts:
    path = tmp_path_factory.mktemp("compact") / "raw.apack"
    write_apack(path, small_adapter(), codec="raw")
    return split(path.read_bytes())


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_compressed_index_is_refused_with_bounded_memory(
    case: tuple[str, Callable[[bytes], bytes], type, str], raw_parts: Parts, tmp_path: Path
) -> None:
    _, make, error, match = case
    stored = make(index_bytes(raw_parts.index))
    path = write(tmp_path / "bad.apack", assemble(stored, raw_parts.data, minor=3, flags=FLAG_INDEX_ZSTD, compress=False))
    tracemalloc.start()
    try:
        with pytest.raises(AdapterpackError) as info:
            load_everything(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(match, str(info.value)), str(info.value)
    assert info.value.__cause__ is None and str(path) in str(info.value)
    assert peak < 1 << 20, f"peak {peak} bytes"  # no case allocates its declared text (within 256x: 4 KiB at most)


def test_index_crc_covers_the_stored_frame(raw_parts: Parts, tmp_path: Path) -> None:
    """The preamble's CRC is over the stored (compressed) bytes: checked before the frame is decoded (§10.2)."""
    stored = _corrupt(zstd_frame(index_bytes(raw_parts.index)))
    path = write(tmp_path / "crc.apack", assemble(stored, raw_parts.data, minor=3, flags=FLAG_INDEX_ZSTD, compress=False,
                                                  index_crc=0))  # fmt: skip
    with pytest.raises(ChecksumError, match="index checksum"):
        ApackReader(path)


@pytest.mark.parametrize(("known", "unknown"), [(0, "0x000f"), (FLAG_INDEX_ZSTD | FLAG_PACKED, "0x000c")], ids=["1.2", "1.4"])
def test_older_readers_refuse_compact_files_by_their_flags(tmp_path: Path, known: int, unknown: str) -> None:
    """The 1.3 features and 1.5's implied offsets and unaligned data section are must-understand flag bits: a reader
    without them (1.0–1.2: none; 1.3–1.4: bits 0 and 1) refuses with UnsupportedVersionError rather than misreading."""
    from adapterpack.container import preamble

    path = tmp_path / "z.apack"
    write_apack(path, compressible_adapter(), codec="byteplanes")
    assert struct.unpack_from("<I", path.read_bytes(), 12)[0] == FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED
    saved = preamble.KNOWN_MUST_UNDERSTAND_FLAGS
    preamble.KNOWN_MUST_UNDERSTAND_FLAGS = known
    try:
        with pytest.raises(UnsupportedVersionError, match=f"must-understand flag bits {unknown}"):
            ApackReader(path)
    finally:
        preamble.KNOWN_MUST_UNDERSTAND_FLAGS = saved


@pytest.mark.parametrize("codec", ["zstd", "byteplanes"])
def test_layout_follows_the_packed_flag(codec: str, tmp_path: Path) -> None:
    """A packed file with its flag cleared, or a 1.2-layout file with the flag set, is a LayoutError."""
    path = tmp_path / "p.apack"
    write_apack(path, compressible_adapter(), codec=codec)
    packed = split(path.read_bytes())
    assert packed.flags == FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED
    offsets = [b["offset"] for b in packed.index["blobs"]]
    assert any(o % 8 for o in offsets), offsets  # some compressed blob sits where the 1.2 rule would not put it
    load_everything(write(tmp_path / "ok.apack", packed.build()))
    with pytest.raises(LayoutError, match=r"blob \d+: offset \d+"):
        load_everything(write(tmp_path / "noflag.apack", packed.build(flags=FLAG_INDEX_ZSTD)))

    aligned = tmp_path / "a.apack"
    write_apack(aligned, compressible_adapter(), codec=codec, compact=False)
    old = split(aligned.read_bytes())
    assert old.flags == 0
    assert [b["stored_length"] for b in old.index["blobs"]] == [b["stored_length"] for b in packed.index["blobs"]]
    load_everything(aligned)  # a file of the 1.2 layout (minor 3, no flags) reads
    with pytest.raises(LayoutError):
        load_everything(write(tmp_path / "flag.apack", old.build(flags=FLAG_PACKED)))


def test_raw_blobs_stay_aligned_in_a_packed_file(tmp_path: Path) -> None:
    """A raw blob after a packed compressed one is still aligned; placing it right after is a LayoutError naming the alignment."""
    p = split(write_apack(tmp_path / "m.apack", compressible_adapter(), codec="zstd").path.read_bytes())
    blobs = p.index["blobs"]
    stored = [p.blob(i) for i in range(len(blobs))]
    blobs[1]["codec"], stored[1] = {"id": "raw"}, bytes(blobs[1]["length"])  # a raw blob right after a zstd one
    blobs[1]["crc32c"] = crc32c(stored[1])
    if len(stored[0]) % 8 == 0:
        stored[0] += b"\0"  # trailing data after blob 0's frame does not matter here: only the layout is read
    p.flags &= ~FLAG_UNALIGNED  # a file holding a raw blob has an aligned data section
    p.set_blobs(stored)
    align = blob_alignment(len(stored[1]))
    assert blobs[1]["offset"] % align == 0 and blobs[1]["offset"] > blobs[0]["offset"] + blobs[0]["stored_length"]
    ApackReader(write(tmp_path / "ok.apack", p.build()))
    bad = p.copy()
    bad.index["blobs"][1]["offset"] = blobs[0]["offset"] + blobs[0]["stored_length"]
    with pytest.raises(LayoutError, match=rf"blob 1: offset \d+ is not aligned to {align} bytes"):
        ApackReader(write(tmp_path / "bad.apack", bad.build()))


def test_compressed_index_round_trip_and_sizes(tmp_path: Path) -> None:
    """The writer stores the index as one zstd frame that the reader's bounded decoder turns back into its JSON."""
    path = tmp_path / "c.apack"
    res = write_apack(path, compressible_adapter(), codec="byteplanes")
    raw = path.read_bytes()
    stored = raw[32 : 32 + res.index_length]
    text = index_text(stored, True)
    assert stored == compress_index(text) and len(text) == res.index_text_length > res.index_length
    reader = ApackReader(path)
    assert reader.index_text_length == len(text) and reader.index._data == text


def test_a_tiny_index_that_would_not_shrink_is_stored_plain(tmp_path: Path) -> None:
    """Compression is used only where it makes the index smaller; the flag says which."""
    from adapterpack.adapter import Adapter

    path = tmp_path / "e.apack"
    res = write_apack(path, Adapter("e"), codec="raw")
    flags = struct.unpack_from("<I", path.read_bytes(), 12)[0]
    assert (flags & FLAG_INDEX_ZSTD) == (res.index_length < res.index_text_length)
    load_everything(path)


def test_an_index_that_compresses_over_256x_is_stored_plain(tmp_path: Path) -> None:
    """A reader refuses a compressed index whose text is over 256 times its frame (§1.3, §7), so the writer stores
    such an index (here: long repetitive metadata) as plain text, and the file reads."""
    from adapterpack.adapter import Adapter

    ad = compressible_adapter()
    ad = Adapter(ad.name, modules=ad.modules, metadata={"notes": "the same line again\n" * 50_000})
    path = tmp_path / "m.apack"
    res = write_apack(path, ad, codec="byteplanes")
    flags = struct.unpack_from("<I", path.read_bytes(), 12)[0]
    assert not flags & FLAG_INDEX_ZSTD and res.index_length == res.index_text_length
    assert res.index_text_length > 256 * len(compress_index(path.read_bytes()[32 : 32 + res.index_length]))
    assert ApackReader(path).adapter().metadata == ad.metadata
