"""Golden vectors of format 1.3's container (spec/format.md §1.1 flag bits, §1.2 packed layout, §1.3 compressed index).

Readable: a compressed index over raw blobs (flag bit 0 alone), compressed blobs packed under the packed flag,
and compressed blobs aligned without it (raw-only 1.3 files, flags 0, are the other vectors). Refused: hostile
compressed indexes (a declared size over the limit, none, a lie, trailing or skippable frames, a dictionary, a
bad checksum, corrupt blocks, plain JSON under the flag) and each layout under the other layout's flag.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from adapterpack.container.index import dumps
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, FLAG_UNALIGNED, MAX_INDEX_LENGTH
from tools.vectors.container import Edit, Parts, _bad_checksum, _edited, _frame, _skippable, _with_dict_id


def _lying_frame(claimed: int) -> bytes:
    """A frame whose header claims ``claimed`` content bytes (8-byte size field, single segment) and holds one RLE byte."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", claimed)
    return header + ((1 << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"{"


def _stored_index(make: Callable[[bytes], bytes]) -> Edit:
    """The compressed-index flag set and the stored index bytes ``make(JSON text)``."""

    def edit(p: Parts) -> None:
        p.lay_out()
        p.flags |= FLAG_INDEX_ZSTD
        p.stored = make(dumps(p.index))

    return edit


def _corrupt(frame: bytes) -> bytes:
    body = bytearray(frame)
    for k in range(len(body) // 2, len(body) - 4):
        body[k] ^= 0x5A
    return bytes(body)


def _two_zstd_blobs(p: Parts) -> None:
    """Blobs 0 and 1 (A and B of the one module) as zstd frames; blob 0's frame is not a multiple of 8 bytes long."""
    for i in (0, 1):
        p.set_blob(i, _frame(p.blobs[i]), {"id": "zstd", "level": 3})
    assert len(p.blobs[0]) % 8, len(p.blobs[0])


def _packed(p: Parts) -> None:
    _two_zstd_blobs(p)
    p.flags |= FLAG_PACKED | FLAG_INDEX_ZSTD


def _packed_without_flag(p: Parts) -> bytes:
    _packed(p)
    data = p.lay_out()
    p.flags &= ~FLAG_PACKED
    return p.pack(data)


def _aligned_with_flag(p: Parts) -> bytes:
    _two_zstd_blobs(p)
    p.flags &= ~FLAG_PACKED
    data = p.lay_out()
    p.flags |= FLAG_PACKED
    return p.pack(data)


def _implied(keep: tuple[str, ...] = (), change: Callable[[list[dict[str, Any]]], None] | None = None,
             flags: int = FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED) -> Edit:
    """The packed file of two zstd blobs with ``flags``; every BLOB ``offset`` and ``length`` left out but those named
    in ``keep``, then ``change`` applied to the blob table (1.5, §2.1)."""

    def edit(p: Parts) -> bytes:
        _two_zstd_blobs(p)
        p.flags |= FLAG_PACKED
        data = p.lay_out()
        p.flags = flags
        for b in p.index["blobs"]:
            for k in ("offset", "length"):
                if k not in keep:
                    del b[k]
        if change is not None:
            change(p.index["blobs"])
        return p.pack(data)

    return edit


def _bump(key: str, by: int) -> Callable[[list[dict[str, Any]]], None]:
    def change(blobs: list[dict[str, Any]]) -> None:
        blobs[1][key] += by

    return change


def _huge_implied_length(blobs: list[dict[str, Any]]) -> None:
    """Blob 1 of a codec a reader may skip (so no expansion bound applies), its shape 2^27 × 2^27: a left-out length
    would be 2^56 bytes, past every integer of the index (§2.1)."""
    blobs[1]["shape"] = [2**27, 2**27]
    blobs[1]["codec"] = {"id": "x-future", "must_understand": False}


def _huge_first_stored_length(blobs: list[dict[str, Any]]) -> None:
    """Blob 0 claims 2^53 − 1 stored bytes, so blob 1's planned (left-out) offset and the end lie far past the file."""
    blobs[0]["stored_length"] = 2**53 - 1


def _aligned(p: Parts) -> None:
    _two_zstd_blobs(p)
    p.flags = 0


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """The 1.3 container vectors."""
    from tools.make_vectors import small

    def no(name: str, what: str, error: str, edit: Edit) -> None:
        refused(name, what, [small()], error, _edited(edit))

    readable(
        "index_zstd_raw_blobs",
        "flag bit 0 alone: a compressed index in a file of raw blobs (adapterpack writes such files with a plain index)",
        [small()],
        "raw",
        craft=_edited(lambda p: setattr(p, "flags", FLAG_INDEX_ZSTD)),
    )
    readable(
        "layout_packed_zstd",
        "flag bits 0 and 1: a compressed index, and two zstd blobs packed with no padding between them (§1.2)",
        [small()],
        "raw",
        craft=_edited(_packed),
    )
    readable(
        "layout_aligned_zstd",
        "no flag bit: the same two zstd blobs aligned as in 1.0–1.2, with a plain index",
        [small()],
        "raw",
        craft=_edited(_aligned),
    )
    # 1.5: the implied flag (bit 2) lets a BLOB leave out offset and length, which a reader derives (§2.1)
    readable(
        "implied_keys_left_out",
        "flag bits 0, 1 and 2: two packed zstd blobs whose BLOB objects leave out offset and length (as adapterpack's "
        "writer writes a compressed index since 1.5)",
        [small()],
        "raw",
        craft=_edited(_implied()),
    )
    readable(
        "implied_keys_present",
        "flag bits 0, 1 and 2 with every BLOB offset and length still written: under the flag they are optional, and "
        "checked where present",
        [small()],
        "raw",
        craft=_edited(_implied(keep=("offset", "length"))),
    )
    no(
        "implied_offset_wrong",
        "implied flag: blob 1 keeps its offset, one byte past the planned one (present, it must equal the plan)",
        "LayoutError",
        _implied(keep=("offset",), change=_bump("offset", 1)),
    )
    no(
        "implied_length_wrong",
        "implied flag: blob 1 keeps its length, 4 more than its shape and dtype give",
        "LengthMismatchError",
        _implied(keep=("length",), change=_bump("length", 4)),
    )
    no(
        "implied_length_past_2_53",
        "implied flag: blob 1 (a codec a reader may skip) leaves out its length, and its shape gives 2^56 bytes: no "
        "length can be that large (a written one could not be either)",
        "LengthMismatchError",
        _implied(change=_huge_implied_length),
    )
    no(
        "implied_offsets_past_file",
        "implied flag: blob 0 claims 2^53 − 1 stored bytes; blob 1's offset is left out, so no written offset differs "
        "from the plan and the blobs end far past the end of the file",
        "TruncatedFileError",
        _implied(change=_huge_first_stored_length),
    )
    no(
        "offset_missing_without_flag",
        "blob offsets and lengths left out of a file without the implied flag (flags 0 and 1 only: a 1.3–1.4 file)",
        "IndexFormatError",
        _implied(flags=FLAG_INDEX_ZSTD | FLAG_PACKED),
    )
    # 1.5: the unaligned flag (bit 3): the data section right after the index, and no raw blob (§1.2)
    readable(
        "unaligned_data_start",
        "flag bits 0–3: two packed zstd blobs whose data section starts right after the index (no zero pad; as "
        "adapterpack's writers write files with no raw blob since 1.5)",
        [small()],
        "raw",
        craft=_edited(_implied(flags=FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED)),
    )
    no(
        "unaligned_raw_blob",
        "the unaligned flag on a file of raw blobs (their data section right after the index): a raw blob there could "
        "not be mapped aligned",
        "LayoutError",
        lambda p: setattr(p, "flags", p.flags | FLAG_UNALIGNED),
    )
    no("layout_packed_without_flag", "zstd blobs packed in a file without the packed flag", "LayoutError", _packed_without_flag)
    no("layout_aligned_with_flag", "zstd blobs padded to 8 bytes in a file with the packed flag", "LayoutError", _aligned_with_flag)

    # §1.3 compressed index, in the order §10.2 checks it
    no(
        "index_zstd_plain_json",
        "the compressed-index flag is set but the index is plain JSON text",
        "IndexFormatError",
        _stored_index(lambda text: text),
    )
    no(
        "index_zstd_skippable_first",
        "the compressed index starts with a skippable frame",
        "IndexFormatError",
        _stored_index(lambda text: _skippable() + _frame(text)),
    )
    no(
        "index_zstd_no_content_size",
        "the compressed index's frame does not declare its content size",
        "IndexFormatError",
        _stored_index(lambda text: _frame(text, write_content_size=False)),
    )
    no(
        "index_zstd_declares_too_much",
        "a 16-byte compressed index declaring 64 MiB + 1 of JSON text: refused before anything is allocated",
        "IndexTooLargeError",
        _stored_index(lambda text: _lying_frame(MAX_INDEX_LENGTH + 1)),
    )
    no(
        "index_zstd_expands_too_much",
        "a 17-byte compressed index declaring 4,353 bytes of JSON text (256 times its size, plus one): refused before "
        "anything is allocated, as a compressed index may expand at most 256 times (§1.3, §7)",
        "IndexTooLargeError",
        _stored_index(lambda text: _lying_frame(256 * len(_lying_frame(0)) + 1)),
    )
    no(
        "index_zstd_declares_one_byte",
        "a compressed index declaring 1 byte of JSON text (a JSON object needs 2)",
        "IndexFormatError",
        _stored_index(lambda text: _lying_frame(1)),
    )
    no(
        "index_zstd_size_lie",
        "a compressed index declaring 4096 bytes of JSON text and holding 1",
        "IndexFormatError",
        _stored_index(lambda text: _lying_frame(4096)),
    )
    no(
        "index_zstd_trailing_frame",
        "the compressed index's frame is followed by a skippable frame",
        "IndexFormatError",
        _stored_index(lambda text: _frame(text) + _skippable()),
    )
    no(
        "index_zstd_dictionary_id",
        "the compressed index's frame names dictionary 7",
        "IndexFormatError",
        _stored_index(lambda text: _with_dict_id(_frame(text))),
    )
    no(
        "index_zstd_bad_checksum",
        "the compressed index's frame has a wrong content checksum (its JSON text is right)",
        "IndexFormatError",
        _stored_index(lambda text: _bad_checksum(_frame(text, write_checksum=True))),
    )
    no(
        "index_zstd_corrupt",
        "the second half of the compressed index's frame is garbage (the index CRC matches it)",
        "IndexFormatError",
        _stored_index(lambda text: _corrupt(_frame(text))),
    )
