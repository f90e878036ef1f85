"""CRC-32C (Castagnoli), the spec's checksum (spec/format.md §8).

The ``crc32c`` package uses the CPU's CRC instruction (≈11 GB/s here, faster than a
memcpy; zlib's CRC-32 ran at ≈2.7 GB/s), so every blob can be verified on every read.
"""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of ``data`` as an unsigned 32-bit int."""
    return _crc32c.crc32c(data)
