"""The fixed 32-byte preamble (spec/format.md §1.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from adapterpack.errors import BadMagicError, IndexFormatError, IndexTooLargeError, TruncatedFileError, UnsupportedVersionError
from adapterpack.limits import MAX_INDEX_LENGTH

MAGIC = b"\x89APK\r\n\x1a\n"
MAJOR = 1
MINOR = 5
PREAMBLE_SIZE = 32
MIN_INDEX_LENGTH = 2
#: Must-understand flag bit 0 (since 1.3): the index is one Zstandard frame holding the JSON text (spec §1.3).
FLAG_INDEX_ZSTD = 0x1
#: Must-understand flag bit 1 (since 1.3): only raw blobs are aligned, compressed ones are packed (spec §1.2).
FLAG_PACKED = 0x2
#: Must-understand flag bit 2 (since 1.5): BLOB ``offset`` and ``length`` may be left out of the index; absent, they are
#: the planned offset and ``prod(shape) * itemsize`` (spec §2.1), values a reader computes anyway to check them.
FLAG_IMPLIED = 0x4
#: Must-understand flag bit 3 (since 1.5): the data section starts right after the index (D = 32 + L, not aligned);
#: no blob is raw (spec §1.2): a file of compressed blobs maps none, so aligning D would only add padding.
FLAG_UNALIGNED = 0x8
#: Flag bits 0–15 are must-understand; 1.0–1.2 define none, 1.3 bits 0 and 1, 1.5 bits 2 and 3.
KNOWN_MUST_UNDERSTAND_FLAGS = FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED
DATA_ALIGNMENT = 256

_STRUCT = struct.Struct("<8sHHIQII")


@dataclass(frozen=True)
class Preamble:
    """Decoded preamble fields."""

    major: int
    minor: int
    flags: int
    index_length: int
    index_crc32c: int

    def pack(self) -> bytes:
        """The 32 preamble bytes."""
        return _STRUCT.pack(MAGIC, self.major, self.minor, self.flags, self.index_length, self.index_crc32c, 0)

    @property
    def compressed_index(self) -> bool:
        """Whether the ``index_length`` bytes after the preamble are a Zstandard frame (flag bit 0)."""
        return bool(self.flags & FLAG_INDEX_ZSTD)

    @property
    def packed(self) -> bool:
        """Whether the file uses the 1.3 layout: compressed blobs unaligned (flag bit 1)."""
        return bool(self.flags & FLAG_PACKED)

    @property
    def implied(self) -> bool:
        """Whether BLOB ``offset`` and ``length`` may be absent from the index (flag bit 2, since 1.5)."""
        return bool(self.flags & FLAG_IMPLIED)

    @property
    def unaligned(self) -> bool:
        """Whether the data section starts right after the index and holds no raw blob (flag bit 3, since 1.5)."""
        return bool(self.flags & FLAG_UNALIGNED)

    @property
    def data_start(self) -> int:
        """Absolute offset of the data section (see :func:`data_start`)."""
        return data_start(self.index_length, self.flags)


def align_up(x: int, a: int) -> int:
    """Least multiple of ``a`` that is >= ``x``."""
    return -(-x // a) * a


def data_start(index_length: int, flags: int) -> int:
    """Where the data section of a file with this index length and these flags starts (spec §1.2): ``align_up(32 + L,
    256)``, or ``32 + L`` with the unaligned flag (bit 3)."""
    end = PREAMBLE_SIZE + index_length
    return end if flags & FLAG_UNALIGNED else align_up(end, DATA_ALIGNMENT)


def parse_preamble(head: bytes, file_size: int) -> Preamble:
    """Validate the first 32 bytes of a file of ``file_size`` bytes."""
    if file_size < PREAMBLE_SIZE or len(head) < PREAMBLE_SIZE:
        if head[: min(len(head), 8)] != MAGIC[: min(len(head), 8)]:
            raise BadMagicError("not an .apack file (wrong magic)")
        raise TruncatedFileError(f"file is {file_size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
    magic, major, minor, flags, index_length, crc, reserved = _STRUCT.unpack_from(head)
    if magic != MAGIC:
        raise BadMagicError(f"not an .apack file (magic {magic!r}, expected {MAGIC!r})")
    if major != MAJOR:
        newer = "written by a newer adapterpack: upgrade" if major > MAJOR else "not a version this reader knows"
        raise UnsupportedVersionError(f"format version {major}.{minor}: {newer} (this reader reads {MAJOR}.x)")
    unknown = flags & 0xFFFF & ~KNOWN_MUST_UNDERSTAND_FLAGS
    if unknown:
        raise UnsupportedVersionError(f"unknown must-understand flag bits 0x{unknown:04x}")
    if reserved != 0:
        raise IndexFormatError(f"reserved preamble field is {reserved}, must be 0")
    if index_length > MAX_INDEX_LENGTH:
        raise IndexTooLargeError(f"index length {index_length} exceeds the {MAX_INDEX_LENGTH}-byte limit")
    if index_length < MIN_INDEX_LENGTH:
        raise IndexFormatError(f"index length {index_length} is too small for a JSON object")
    if file_size < PREAMBLE_SIZE + index_length:
        raise TruncatedFileError(f"file is {file_size} bytes but its index ends at byte {PREAMBLE_SIZE + index_length}")
    return Preamble(major, minor, flags, index_length, crc)
