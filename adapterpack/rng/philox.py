"""Philox4x32-10 (Salmon et al., SC'11; Random123 constants) in numpy, vectorized.

A counter-based generator: ``philox4x32_10(counter, key)`` maps a 128-bit counter (four
uint32 words) and a 64-bit key (two words) to four uint32 words, with no state. Any element
of any stream can be computed on its own, so the output cannot depend on how the work is
chunked, on the device or on the library version. Checked against Random123's
``tests/kat_vectors`` (:data:`KAT`).
"""

from __future__ import annotations

import numpy as np

#: Random123's multipliers and Weyl key increments for Philox4x32.
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF

#: Random123 ``tests/kat_vectors`` rows ``philox4x32 10``: (counter, key, output), 32-bit words.
KAT: tuple[tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int, int, int]], ...] = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
)

#: Blocks processed at once inside :func:`philox4x32_10` (keeps the working set in cache).
BLOCK_CHUNK = 1 << 14


def round_keys(key: tuple[int, int]) -> list[tuple[int, int]]:
    """The key used in each of the 10 rounds (the key is bumped by the Weyl constants between rounds)."""
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    out = []
    for _ in range(ROUNDS):
        out.append((k0, k1))
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return out


def philox_rounds(
    c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray, keys: list[tuple[int, int]], out: np.ndarray
) -> None:
    """Run the 10 rounds on counters given as four uint32 arrays of equal length into ``out`` [n, 4]
    (``keys`` from :func:`round_keys`); callers keep n near :data:`BLOCK_CHUNK` for cache locality.

    Products go into two pairs of uint64 buffers used alternately (a round's low words are the
    next round's inputs); high and low words are read as strided uint32 views, so a round costs
    two multiplies and four xors.
    """
    n = c0.shape[0]
    prods = [(np.empty(n, np.uint64), np.empty(n, np.uint64)) for _ in range(2)]
    x0, x2 = np.empty(n, np.uint32), np.empty(n, np.uint32)
    m0, m1 = np.uint64(M0), np.uint64(M1)
    a0, a1, a2, a3 = c0, c1, c2, c3
    for r, (k0, k1) in enumerate(keys):
        p0, p1 = prods[r & 1]
        np.multiply(a0, m0, out=p0)
        np.multiply(a2, m1, out=p1)
        w0 = p0.view(np.uint32).reshape(n, 2)  # little-endian words: [:, 0] low, [:, 1] high
        w1 = p1.view(np.uint32).reshape(n, 2)
        np.bitwise_xor(w1[:, 1], a1, out=x0)
        np.bitwise_xor(x0, np.uint32(k0), out=x0)
        np.bitwise_xor(w0[:, 1], a3, out=x2)
        np.bitwise_xor(x2, np.uint32(k1), out=x2)
        if r == ROUNDS - 1:
            out[:, 0], out[:, 1], out[:, 2], out[:, 3] = x0, w1[:, 0], x2, w0[:, 0]
            return
        # x0/x2 are consumed by the next round's multiplies before it overwrites them
        a0, a1, a2, a3 = x0, w1[:, 0], x2, w0[:, 0]


def philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of each counter: ``counter`` is uint32 ``[n, 4]``, the result uint32 ``[n, 4]``.

    ``key`` is two 32-bit words (k0, k1). Work is done ``BLOCK_CHUNK`` counters at a time,
    which changes nothing in the output.
    """
    ctr = np.ascontiguousarray(counter, dtype=np.uint32).reshape(-1, 4)
    n = ctr.shape[0]
    out = np.empty((n, 4), np.uint32)
    keys = round_keys(key)
    for s in range(0, n, BLOCK_CHUNK):
        e = min(n, s + BLOCK_CHUNK)
        part = ctr[s:e]
        philox_rounds(*(np.ascontiguousarray(part[:, j]) for j in range(4)), keys, out[s:e])
    return out
