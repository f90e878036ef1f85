"""The fixed 32-byte preamble (spec/format.md §1.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from adapterpack.errors import BadMagicError, IndexFormatError, IndexTooLargeError, TruncatedFileError, UnsupportedVersionError
from adapterpack.limits import MAX_INDEX_LENGTH

MAGIC = b"\x89APK\r\n\x1a\n"
MAJOR = 1
MINOR = 4
PREAMBLE_SIZE = 32
MIN_INDEX_LENGTH = 2
#: Flag bits 0–15 are must-understand; 1.0 defines none.
KNOWN_MUST_UNDERSTAND_FLAGS = 0
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
    def data_start(self) -> int:
        """Absolute offset of the data section: align_up(32 + L, 256)."""
        return align_up(PREAMBLE_SIZE + self.index_length, DATA_ALIGNMENT)


def align_up(x: int, a: int) -> int:
    """Least multiple of ``a`` that is >= ``x``."""
    return -(-x // a) * a


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
