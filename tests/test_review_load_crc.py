"""crc32c_combine and crc32c_of_zeros against the CRC-32C of the concatenation (review of the load path's CRC overlap)."""

from __future__ import annotations

import numpy as np
import pytest

from adapterpack import checksum
from adapterpack.checksum import crc32c, crc32c_combine, crc32c_of_zeros

MIB = 1 << 20


def _zeros_then(crc: int, n: int) -> int:
    """CRC-32C of (whatever gave ``crc``) + ``n`` zero bytes, fed 16 MiB at a time (no big allocation)."""
    from crc32c import crc32c as impl

    chunk = bytes(16 * MIB)
    while n >= len(chunk):
        crc = impl(chunk, value=crc)
        n -= len(chunk)
    return impl(bytes(n), value=crc)


def _x8n_reference(n: int) -> int:
    """x^(8n) modulo the polynomial by plain square-and-multiply of x^8 (no table of powers)."""
    result, base = 1 << 31, checksum._X2N[3]
    while n:
        if n & 1:
            result = checksum._multmodp(result, base)
        base = checksum._multmodp(base, base)
        n >>= 1
    return result


@pytest.mark.parametrize("n", [0, 1, 7, 8, 1 << 28, (1 << 29) - 1, 1 << 29, 1 << 30, (1 << 32) + 5, (1 << 40) + 1, (1 << 63) + 1])
def test_x8n_matches_square_and_multiply(n: int) -> None:
    """The powers x^(2^k) of CRC-32C's polynomial (x+1 times a primitive degree-31 factor) repeat every 31, not 32: a table
    indexed ``k & 31`` is wrong from 2^29 bytes on."""
    assert checksum._x8n(n) == _x8n_reference(n)


@pytest.mark.parametrize("n", [1 << 29, (1 << 29) + (1 << 20) + 3])
def test_combine_past_512_mib_equals_the_crc_of_the_concatenation(n: int) -> None:
    """A blob of 512 MiB or more (a big bank) in a span: combining its CRC must give the span's CRC, or every threaded
    check of it fails and re-reads each blob."""
    a = b"adapterpack"
    zeros = _zeros_then(0, n)
    assert crc32c_combine(crc32c(a), zeros, n) == _zeros_then(crc32c(a), n)
    assert crc32c_of_zeros(n) == zeros


def test_combine_zero_lengths_and_empty_parts() -> None:
    rng = np.random.default_rng(0)
    b = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert crc32c_combine(crc32c(b), crc32c(b""), 0) == crc32c(b)
    assert crc32c_combine(crc32c(b""), crc32c(b), len(b)) == crc32c(b)
    assert crc32c_combine(0, 0, 0) == 0
    assert crc32c_of_zeros(0) == 0


def test_combine_with_more_lengths_than_the_cache_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """More distinct lengths than the table cache keeps (per-module ranks: a reranked adapter): every answer stays the CRC
    of the concatenation, and a second pass over them builds nothing again. The cache was cleared when full, so a file
    of 259 lengths rebuilt every table on every threaded load (45 ms for a 97 MB file whose load takes 5 ms unchecked)."""
    monkeypatch.setattr(checksum, "_SHIFTS", {})
    monkeypatch.setattr(checksum, "_X8N", {}, raising=False)
    powers: list[int] = []
    real = checksum._x8n

    def counting(n: int) -> int:
        powers.append(n)
        return real(n)

    monkeypatch.setattr(checksum, "_x8n", counting)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 700, dtype=np.uint8).tobytes()
    a = data[:50]
    for _ in range(3):
        powers.clear()
        for n in range(600):
            b = data[50 : 50 + n]
            assert crc32c_combine(crc32c(a), crc32c(b), n) == crc32c(a + b), n
    assert powers == []  # the third pass computed no power of x, so built no table
    assert len(checksum._SHIFTS) <= 256


@pytest.mark.parametrize("n", [MIB - 1, MIB, MIB + 1, 3 * MIB + 17])
def test_crc_of_zeros_around_the_piece_size(n: int) -> None:
    assert crc32c_of_zeros(n) == crc32c(bytes(n))
