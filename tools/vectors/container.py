"""Golden vectors of the container (spec/format.md §1, §2, §5, §10): one defect per file, each named by its error.

Every file starts as a valid one written by adapterpack and has exactly one thing broken (the
precedence vectors two, in different stages of §10.2, to show which error wins). The JSON and
preamble are re-serialised with correct lengths and CRCs unless the defect is that length or CRC.
Also readable files that exercise what a reader must accept: informational flag bits, unknown
object keys at every level (and JSON nested exactly as deep as §2 allows), and nonzero padding,
which opening does not check and ``verify`` reports (§1.2).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from adapterpack.adapter import Adapter
from adapterpack.checksum import crc32c
from adapterpack.container.index import dumps, fill_implied, index_text, plan_offsets
from adapterpack.container.preamble import (
    FLAG_IMPLIED,
    FLAG_INDEX_ZSTD,
    FLAG_PACKED,
    MAGIC,
    MAX_INDEX_LENGTH,
    PREAMBLE_SIZE,
    data_start,
)
from adapterpack.container.writer import compress_index
from adapterpack.limits import MAX_JSON_DEPTH

_PREAMBLE = struct.Struct("<8sHHIQII")
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"


@dataclass
class Parts:
    """A valid file taken apart: preamble fields, index (dict or exact text), stored blobs; :meth:`pack` rebuilds it."""

    index: dict[str, Any]
    blobs: list[bytes]
    magic: bytes = MAGIC
    major: int = 1
    minor: int = 1
    flags: int = 0  # with the compressed-index bit, the index text is stored as one zstd frame (format.md §1.3)
    reserved: int = 0
    text: bytes | None = None  # index JSON text to write instead of dumps(index)
    stored: bytes | None = None  # stored index bytes to write as they are (a hand-made frame)
    index_length: int | None = None  # a lie about L
    index_crc: int | None = None  # a lie about the index CRC
    index_pad: bytes | None = None  # instead of the zero padding after the index
    blob_pad: bytes = b"\0"  # the byte blob padding is made of
    tail: bytes = b""  # bytes after the last blob

    @classmethod
    def read(cls, path: Path) -> Parts:
        raw = path.read_bytes()
        _, major, minor, flags, length, _, reserved = _PREAMBLE.unpack_from(raw)
        index = json.loads(index_text(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length], bool(flags & FLAG_INDEX_ZSTD)))
        if flags & FLAG_IMPLIED:  # written in: the vectors are edited as plain JSON indexes
            fill_implied(index["blobs"], bool(flags & FLAG_PACKED))
        data = data_start(length, flags)
        blobs = [raw[data + b["offset"] : data + b["offset"] + b["stored_length"]] for b in index["blobs"]]
        return cls(index, blobs, major=major, minor=minor, flags=flags, reserved=reserved)

    def set_blob(self, i: int, stored: bytes, codec: dict[str, Any] | None = None) -> None:
        """Blob ``i`` stores ``stored`` (with ``codec``); its decoded length and CRC stay as the index says."""
        self.blobs[i] = stored
        if codec is not None:
            self.index["blobs"][i]["codec"] = codec

    def lay_out(self) -> bytes:
        """The data section; blob offsets and stored lengths follow the alignment rule (§1.2) the flags select."""
        out = bytearray()
        raw = [b["codec"]["id"] == "raw" for b in self.index["blobs"]] if self.flags & FLAG_PACKED else None
        offsets = plan_offsets([len(s) for s in self.blobs], raw)
        for b, stored, off in zip(self.index["blobs"], self.blobs, offsets, strict=True):
            out += self.blob_pad * (off - len(out))
            out += stored
            b["offset"], b["stored_length"] = off, len(stored)
        return bytes(out)

    def stored_index(self) -> bytes:
        """The index bytes after the preamble: the JSON text, compressed as the writer does under the flag."""
        if self.stored is not None:
            return self.stored
        text = dumps(self.index) if self.text is None else self.text
        return compress_index(text) if self.flags & FLAG_INDEX_ZSTD else text

    def pack(self, data: bytes | None = None) -> bytes:
        data = self.lay_out() if data is None else data
        text = self.stored_index()
        length = len(text) if self.index_length is None else self.index_length
        crc = crc32c(text) if self.index_crc is None else self.index_crc
        pad = self.index_pad
        if pad is None:
            pad = b"\0" * (data_start(len(text), self.flags) - PREAMBLE_SIZE - len(text))
        pre = _PREAMBLE.pack(self.magic, self.major, self.minor, self.flags, length, crc, self.reserved)
        return pre + text + pad + data + self.tail


Edit = Callable[[Parts], bytes | None]


def _edited(edit: Edit) -> Callable[[Path], None]:
    """A craft step: take the written file apart, let ``edit`` break one thing, write it back."""

    def craft(path: Path) -> None:
        parts = Parts.read(path)
        raw = edit(parts)
        path.write_bytes(parts.pack() if raw is None else raw)

    return craft


def _text(old: bytes, new: bytes) -> Edit:
    """Replace ``old`` (once, it must be there) in the serialised index: what a dict cannot hold."""

    def edit(p: Parts) -> None:
        p.lay_out()
        text = dumps(p.index)
        assert text.count(old) >= 1, (old, text[:200])
        p.text = text.replace(old, new, 1)

    return edit


def _set(**fields: Any) -> Edit:
    def edit(p: Parts) -> None:
        for k, v in fields.items():
            setattr(p, k, v)

    return edit


def _index(change: Callable[[dict[str, Any]], None]) -> Edit:
    def edit(p: Parts) -> None:
        change(p.index)

    return edit


def _frame(data: bytes, **kw: Any) -> bytes:
    return zstandard.ZstdCompressor(level=3, **{"write_content_size": True} | kw).compress(data)


def _with_dict_id(frame: bytes) -> bytes:
    """``frame`` with a 1-byte Dictionary_ID (7) in its header (RFC 8878 §3.1.1.1.1): a frame that needs a dictionary."""
    fhd = frame[4]
    assert fhd & 3 == 0
    at = 5 + (0 if fhd & 0x20 else 1)  # after the window descriptor, absent for single-segment frames
    return frame[:4] + bytes([fhd | 1]) + frame[5:at] + b"\x07" + frame[at:]


def _zstd_blob(make: Callable[[bytes], bytes]) -> Edit:
    """Blob 0 (float32 A) stored as the zstd frame ``make(decoded bytes)``."""

    def edit(p: Parts) -> None:
        p.set_blob(0, make(p.blobs[0]), {"id": "zstd", "level": 3})

    return edit


def _byteplanes_blob(table_extra: int = 0, plane_extra: int = 0) -> Edit:
    """Blob 0 (float32 A) as byteplanes; the plane table or plane 0's frame may lie by a few bytes."""

    def edit(p: Parts) -> None:
        grid = np.frombuffer(p.blobs[0], np.uint8).reshape(-1, 4)
        planes = [grid[:, j].tobytes() for j in range(4)]
        frames = [_frame(pl + b"\0" * (plane_extra if j == 0 else 0)) for j, pl in enumerate(planes)]
        lengths = [len(f) + (table_extra if j == 0 else 0) for j, f in enumerate(frames)]
        p.set_blob(0, struct.pack("<4Q", *lengths) + b"".join(frames), {"id": "byteplanes", "level": 1})

    return edit


def _bad_checksum(frame: bytes) -> bytes:
    """``frame`` (written with a content checksum) with one bit of that checksum flipped."""
    return frame[:-1] + bytes([frame[-1] ^ 1])


def _skippable(payload: bytes = b"apack") -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def _nested(depth: int) -> Any:
    """A JSON value nested ``depth`` arrays deep."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _deep_key(levels: int) -> Edit:
    """An unknown top-level key whose value makes the index ``levels`` deep in all (the top object is level 1)."""
    return _index(lambda index: index.__setitem__("x-deep", _nested(levels - 1)))


def _padding_after_index(p: Parts) -> None:
    text = p.stored_index()
    pad = data_start(len(text), p.flags) - PREAMBLE_SIZE - len(text)
    assert pad > 0
    p.index_pad = b"\0" * (pad - 1) + b"\x01"


def _unknown_keys(index: dict[str, Any]) -> None:
    index["x-unknown"] = {"added_in": "1.9", "values": [1, 2.5, None, True]}
    a = index["adapters"][0]
    a["x-unknown"] = "adapter"
    a["modules"][0]["x-unknown"] = ["module"]
    a["tensors"][0]["x-unknown"] = {"tensor": 1}
    for b in index["blobs"]:
        b["x-unknown"] = 0
        b["codec"]["x-unknown"] = False
    index["x-deep"] = _nested(MAX_JSON_DEPTH - 1)


def _with_unknown_param(adapter: Adapter) -> Adapter:
    for m in adapter.modules.values():
        m.params["x-unknown"] = "param"
    return adapter


def _bool_byte(p: Parts) -> None:
    """The bool blob holds the byte 2 (CRC updated, so the value is the only defect)."""
    i = p.index["adapters"][0]["tensors"][0]["blob"]
    p.blobs[i] = b"\x01\x02"
    p.index["blobs"][i]["crc32c"] = crc32c(p.blobs[i])


def _overlap(p: Parts) -> bytes:
    data = p.lay_out()
    p.index["blobs"][1]["offset"] -= 8
    return p.pack(data)


def _gap(p: Parts) -> bytes:
    """Blob 1 moved 8 bytes on (still aligned), the 8 bytes zero: more padding than alignment requires."""
    data = p.lay_out()
    b = p.index["blobs"][1]
    data = data[: b["offset"]] + b"\0" * 8 + data[b["offset"] :]
    b["offset"] += 8
    return p.pack(data)


def _unreferenced(p: Parts) -> None:
    p.index["blobs"].append({"dtype": "uint8", "shape": [4], "codec": {"id": "raw"}, "offset": 0, "stored_length": 4,
                             "length": 4, "crc32c": crc32c(b"hide")})  # fmt: skip
    p.blobs.append(b"hide")


def _two_defects(first: Edit, second: Edit) -> Edit:
    def edit(p: Parts) -> bytes | None:
        second(p)
        return first(p)

    return edit


def _unknown_required_encoding(index: dict[str, Any]) -> None:
    index["adapters"][0]["modules"][0]["encoding"] = "x-future-encoding"


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """Preamble, index CRC, JSON, blob table, layout, padding, codec and value vectors."""
    from tools.make_vectors import small, small_padded

    def no(name: str, what: str, error: str, edit: Edit, adapters: list[Adapter] | None = None) -> None:
        refused(name, what, adapters or [small()], error, _edited(edit))

    # §1.1 preamble, in the order §10.2 checks its fields
    no(
        "preamble_truncated",
        "the first 20 bytes of a valid file (shorter than the preamble)",
        "TruncatedFileError",
        lambda p: p.pack()[:20],
    )
    no("preamble_bad_magic", "the magic's first byte is 0x88 instead of 0x89", "BadMagicError", _set(magic=b"\x88" + MAGIC[1:]))
    no("preamble_major_0", "major version 0", "UnsupportedVersionError", _set(major=0))
    no(
        "preamble_must_understand_flag",
        "flag bit 4 (must-understand, not defined) is set",
        "UnsupportedVersionError",
        lambda p: setattr(p, "flags", p.flags | 16),
    )
    no("preamble_reserved_nonzero", "the reserved preamble field is 1", "IndexFormatError", _set(reserved=1))
    no(
        "preamble_index_length_too_large",
        "index_length is 64 MiB + 1",
        "IndexTooLargeError",
        _set(index_length=MAX_INDEX_LENGTH + 1),
    )
    no("preamble_index_length_too_small", "index_length is 1", "IndexFormatError", _set(index_length=1))
    no("preamble_index_past_end", "index_length runs past the end of the file", "TruncatedFileError", _set(index_length=1 << 20))
    no("index_crc_mismatch", "index_crc32c differs from the index's CRC-32C by one bit", "ChecksumError", _crc_lie)
    readable(
        "preamble_informational_flag",
        "flag bit 16 (informational) is set: readers ignore it",
        [small()],
        "raw",
        craft=_edited(lambda p: setattr(p, "flags", p.flags | 1 << 16)),
    )

    # §2 JSON text
    no(
        "json_duplicate_key",
        "a module's params hold the key 'rank' twice (with the same value)",
        "DuplicateNameError",
        _text(b'"rank":2,', b'"rank":2,"rank":2,'),
    )
    no("json_nan", "a module's alpha is NaN", "IndexFormatError", _text(b'"alpha":4.0', b'"alpha":NaN'))
    no("json_overflow", "a module's alpha is 1e999, beyond binary64", "IndexFormatError", _text(b'"alpha":4.0', b'"alpha":1e999'))
    # an integer literal overflows too once it rounds to infinity (from 2^1024 - 2^970), wherever it stands
    largest = b"17976931348623158" + b"0" * 292  # 309 digits, just below the rounding threshold: binary64's largest
    no(
        "json_integer_overflow",
        "an unknown top-level key holds 2^1024 written as a 309-digit integer: it overflows binary64 like 1e999",
        "IndexFormatError",
        _text(b"{", b'{"x-big":%d,' % 2**1024),
    )
    readable(
        "json_integer_largest",
        "an unknown top-level key holds a 309-digit integer that rounds to binary64's largest finite number: readers "
        "ignore the key, but must parse the number",
        [small()],
        "raw",
        craft=_edited(_text(b"{", b'{"x-big":' + largest + b",")),
    )
    no(
        "json_too_deep",
        f"an unknown top-level key nests the index {MAX_JSON_DEPTH + 1} levels deep",
        "IndexFormatError",
        _deep_key(MAX_JSON_DEPTH + 1),
    )
    no(
        "json_bom",
        "the index starts with a UTF-8 byte-order mark",
        "IndexFormatError",
        lambda p: setattr(p, "text", b"\xef\xbb\xbf" + dumps(p.index)),
    )
    no(
        "json_not_utf8",
        "the adapter's name holds the byte 0xFF",
        "IndexFormatError",
        _text(b'"name":"default"', b'"name":"def\xffault"'),
    )
    no(
        "json_lone_surrogate",
        "the adapter's name holds a lone surrogate escape \\ud800",
        "IndexFormatError",
        _text(b'"name":"default"', b'"name":"\\ud800default"'),
    )
    no(
        "json_float_offset",
        "blob 0's offset is written 0.0, not an integer",
        "IndexFormatError",
        _text(b'"offset":0,', b'"offset":0.0,'),
    )
    readable(
        "unknown_keys",
        f"unknown keys in every object (top level, adapter, module, params, tensor entry, blob, codec), "
        f"one of them nesting the index exactly {MAX_JSON_DEPTH} levels deep: readers ignore them",
        [_with_unknown_param(small(tensor=True))],
        "raw",
        craft=_edited(_index(_unknown_keys)),
    )

    # §2.1 blob table and §1.2 layout
    no(
        "blob_unknown_dtype",
        "blob 0's dtype is 'float8'",
        "UnknownDTypeError",
        _index(lambda i: i["blobs"][0].update(dtype="float8")),
    )
    no(
        "blob_length_mismatch",
        "blob 0's length is 47, not shape × itemsize = 48",
        "LengthMismatchError",
        _index(lambda i: i["blobs"][0].update(length=47)),
    )
    no(
        "blob_crc_out_of_range",
        "blob 0's crc32c is its CRC + 2^32",
        "IndexFormatError",
        _index(lambda i: i["blobs"][0].update(crc32c=i["blobs"][0]["crc32c"] + (1 << 32))),
    )
    no("layout_overlap", "blob 1 starts 8 bytes before blob 0 ends", "LayoutError", _overlap)
    no("layout_gap", "8 bytes of padding more than alignment requires before blob 1", "LayoutError", _gap)
    no("layout_trailing_bytes", "8 zero bytes after the last blob", "LayoutError", _set(tail=b"\0" * 8))
    no("layout_truncated", "the last byte of the last blob is missing", "TruncatedFileError", lambda p: p.pack()[:-1])
    no("blob_unreferenced", "a third blob that no record or tensor entry references", "IndexFormatError", _unreferenced)
    readable(
        "padding_after_index_nonzero",
        "the last padding byte before the data section is 1: open accepts the file, verify reports it",
        [small()],
        "raw",
        craft=_edited(_padding_after_index),
        verify_problems=["padding after the index is not zero"],
    )
    readable(
        "padding_between_blobs_nonzero",
        "the padding bytes between blob 0 (12 bytes) and blob 1 are 1: open accepts the file, verify reports it",
        [small_padded()],
        "raw",
        craft=_edited(_set(blob_pad=b"\x01")),
        verify_problems=["padding before blob 1 is not zero"],
    )

    # §2.3 records
    no(
        "record_unknown_slot",
        "a lora record with an unknown tensor slot 'C'",
        "RecordError",
        _index(lambda i: i["adapters"][0]["modules"][0]["tensors"].update(C=0)),
    )

    # §5 codecs and §8 checksums: read when the tensor is
    no(
        "blob_crc_mismatch",
        "blob 0's crc32c differs from its bytes' CRC-32C",
        "ChecksumError",
        _index(lambda i: i["blobs"][0].update(crc32c=i["blobs"][0]["crc32c"] ^ 1)),
    )
    no(
        "zstd_size_lie",
        "a zstd frame declaring 52 content bytes where the index says 48",
        "CodecError",
        _zstd_blob(lambda d: _frame(d + b"\0" * 4)),
    )
    no(
        "zstd_no_content_size",
        "a zstd frame that does not declare its content size",
        "CodecError",
        _zstd_blob(lambda d: _frame(d, write_content_size=False)),
    )
    no(
        "zstd_trailing_data",
        "a zstd blob holding a skippable frame after the frame",
        "CodecError",
        _zstd_blob(lambda d: _frame(d) + _skippable()),
    )
    no(
        "zstd_skippable_first",
        "a zstd blob starting with a skippable frame",
        "CodecError",
        _zstd_blob(lambda d: _skippable() + _frame(d)),
    )
    no(
        "zstd_bad_checksum",
        "a zstd frame whose content checksum is wrong (its decoded bytes are right)",
        "CodecError",
        _zstd_blob(lambda d: _bad_checksum(_frame(d, write_checksum=True))),
    )
    no("zstd_dictionary_id", "a zstd frame naming dictionary 7", "CodecError", _zstd_blob(lambda d: _with_dict_id(_frame(d))))
    no(
        "byteplanes_table_lie",
        "a byteplanes plane table whose lengths sum to 1 byte more than the blob holds",
        "CodecError",
        _byteplanes_blob(table_extra=1),
    )
    no(
        "byteplanes_plane_size_lie",
        "a byteplanes plane frame declaring 13 bytes where the blob has 12 elements",
        "CodecError",
        _byteplanes_blob(plane_extra=1),
    )
    no(
        "bool_not_0_or_1",
        "a bool pass-through tensor holding the byte 2 (CRC matching)",
        "CodecError",
        _bool_byte,
        [small(tensor=True)],
    )

    # §10.2 precedence: two defects in different stages (or fields of the preamble), the earlier one's error wins
    no(
        "precedence_magic_over_version",
        "a wrong magic and major version 2: the magic is checked first",
        "BadMagicError",
        _set(magic=b"\x88" + MAGIC[1:], major=2),
    )
    no(
        "precedence_reserved_over_index_length",
        "a nonzero reserved field and index_length above 64 MiB: the reserved field is checked first",
        "IndexFormatError",
        _set(reserved=1, index_length=MAX_INDEX_LENGTH + 1),
    )
    no(
        "precedence_references_over_records",
        "a blob referenced by nothing and a record of an unknown must-understand encoding: references are checked "
        "when the file is opened, records when the adapter is read",
        "IndexFormatError",
        _two_defects(_unreferenced, _index(_unknown_required_encoding)),
    )
    no(
        "precedence_records_over_contents",
        "a lora record with an unknown slot and a blob whose CRC-32C is wrong: records are checked before any tensor is read",
        "RecordError",
        _two_defects(
            _index(lambda i: i["blobs"][0].update(crc32c=i["blobs"][0]["crc32c"] ^ 1)),
            _index(lambda i: i["adapters"][0]["modules"][0]["tensors"].update(C=1)),
        ),
    )
    no(
        "precedence_crc_over_json",
        "a NaN in the index and a wrong index CRC: the CRC is checked first",
        "ChecksumError",
        _two_defects(_crc_lie, _text(b'"alpha":4.0', b'"alpha":NaN')),
    )
    no(
        "precedence_blob_table_over_layout",
        "an unknown dtype in blob 1 and blob 1 overlapping blob 0: the blob table is checked before the layout",
        "UnknownDTypeError",
        _two_defects(_overlap, _index(lambda i: i["blobs"][1].update(dtype="float8"))),
    )
    no(
        "precedence_layout_over_records",
        "blob 1 overlapping blob 0 and a record of an unknown must-understand encoding: the layout is checked before the records",
        "LayoutError",
        _two_defects(_overlap, _index(_unknown_required_encoding)),
    )


def _crc_lie(p: Parts) -> bytes:
    p.lay_out()
    p.index_crc = crc32c(p.stored_index()) ^ 1
    return p.pack()
