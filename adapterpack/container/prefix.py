"""Prefix checkpoints: CRC-32Cs of row prefixes of a blob, so a rank-j read is checked (spec/format.md §2.1, §8).

A blob of ``R >= 2`` rows (axis 0) may carry ``prefix_crc32c``: the CRC-32C of its first ``2**m``
rows' decoded bytes for every power of two ``2**m < R``, in order. A read of the first ``j`` rows
reads up to the least checkpoint ``>= j`` (``R`` itself, the whole blob, when none is smaller), at
most about ``2j`` rows, and checks that checkpoint's CRC. ``R`` rows have ``(R - 1).bit_length()``
checkpoints, so the index grows by a logarithmic number of integers per blob.
"""

from __future__ import annotations

from adapterpack.checksum import crc32c

#: The optional BLOB key holding the checkpoints' CRC-32Cs.
KEY = "prefix_crc32c"


def count(rows: int) -> int:
    """How many checkpoints a blob of ``rows`` rows has: the powers of two below ``rows``."""
    return (rows - 1).bit_length() if rows > 1 else 0


def checkpoint(total: int, rows: int) -> int:
    """Rows a checked read of the first ``rows`` of ``total`` reads: the least checkpoint ``>= rows``, else ``total``."""
    if rows <= 0:
        return 0
    power = 1 << (rows - 1).bit_length()
    return power if power < total else total


def prefix_crcs(data: bytes | memoryview, rows: int) -> list[int]:
    """The checkpoints' CRC-32Cs of a blob's decoded bytes ``data`` holding ``rows`` rows."""
    row_bytes = len(data) // rows if rows else 0
    return [crc32c(data[: (1 << m) * row_bytes]) for m in range(count(rows))]
