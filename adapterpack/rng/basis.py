"""NOLA's random bases from Philox4x32-10: the counter layout and value mapping of spec/nola.md.

Every basis value is a pure function of (seed, stream, kind, basis index, element index):

- key ``(k0, k1) = (seed mod 2^32, seed >> 32)``;
- counter ``(c0, c1, c2, c3) = (e // 4, index, stream, kind)`` where ``e`` is the element's
  row-major position in its matrix, and the value uses output word ``e mod 4``;
- value ``u = float32(x >> 8) · 2^-23 − 1`` in binary32: exact, uniform on [-1, 1) with
  step 2^-23.

``kind`` says which matrix: :data:`KIND_A` / :data:`KIND_B` (basis matrices ``A_i [r, in]``,
``B_j [out, r]``), :data:`KIND_A0` / :data:`KIND_B0` (generated fixed parts, index 0).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from adapterpack.errors import RecordError
from adapterpack.rng.philox import BLOCK_CHUNK, philox_rounds, round_keys

GENERATOR_ID = "philox4x32-10"
GENERATOR_VERSION = 1
KIND_A, KIND_B, KIND_A0, KIND_B0 = 0, 1, 2, 3
KINDS = {"A": KIND_A, "B": KIND_B, "A0": KIND_A0, "B0": KIND_B0}
#: Elements one matrix may have: the block index c0 is one 32-bit word.
MAX_ELEMENTS = 4 << 32
MAX_SEED = 1 << 53
MAX_U32 = 1 << 32
#: Default working-memory budget of generated values in bytes (float32), per call.
DEFAULT_BUDGET = 64 << 20
_STEP = np.float32(2.0**-23)


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a record seed: low and high 32-bit words."""
    if not 0 <= seed < MAX_SEED:
        raise RecordError(f"seed {seed} is outside [0, 2^53)")
    return seed & 0xFFFFFFFF, seed >> 32


def uniform(bits: np.ndarray) -> np.ndarray:
    """uint32 words → float32 on [-1, 1): ``(x >> 8) · 2^-23 − 1``, exact in binary32."""
    top = np.right_shift(bits, np.uint32(8)).astype(np.float32)
    top *= _STEP
    top -= np.float32(1.0)
    return top


def _check(kind: int, stream: int, start: int, stop: int, n: int) -> None:
    if kind not in KINDS.values():
        raise RecordError(f"basis kind {kind} is not one of {sorted(KINDS.values())}")
    if not 0 <= stream < MAX_U32:
        raise RecordError(f"stream {stream} is outside [0, 2^32)")
    if not 0 <= start <= stop <= MAX_U32:
        raise RecordError(f"basis indices [{start}, {stop}) are outside [0, 2^32)")
    if not 0 <= n <= MAX_ELEMENTS:
        raise RecordError(f"a basis matrix of {n} elements exceeds the generator's 2^34")


def _generate(seed: int, stream: int, kind: int, start: int, stop: int, n: int, first: int, values: bool) -> np.ndarray:
    """Words (``values=False``) or float32 values of elements ``first..n-1`` of bases ``start..stop-1``.

    Counters are made and run ``BLOCK_CHUNK`` at a time straight into the result, so no
    counter or word array of the full size is ever held.
    """
    _check(kind, stream, start, stop, n)
    if not 0 <= first <= n:
        raise RecordError(f"element range [{first}, {n}) is empty or reversed")
    keys = round_keys(seed_key(seed))
    b0, b1 = first // 4, -(-n // 4)
    blocks = b1 - b0
    k = stop - start
    total = k * blocks
    out = np.empty((total, 4), np.float32 if values else np.uint32)
    words = np.empty((min(total, BLOCK_CHUNK), 4), np.uint32)
    for s in range(0, total, BLOCK_CHUNK):
        e = min(total, s + BLOCK_CHUNK)
        flat = np.arange(s, e, dtype=np.uint64)
        index = flat // np.uint64(blocks)
        c0 = (flat - index * np.uint64(blocks) + np.uint64(b0)).astype(np.uint32)
        c1 = (index + np.uint64(start)).astype(np.uint32)
        c2 = np.full(e - s, stream, np.uint32)
        c3 = np.full(e - s, kind, np.uint32)
        w = words[: e - s]
        philox_rounds(c0, c1, c2, c3, keys, w)
        out[s:e] = uniform(w) if values else w
    lead = first - 4 * b0
    return out.reshape(k, blocks * 4)[:, lead : lead + n - first]


def basis_bits(seed: int, stream: int, kind: int, start: int, stop: int, n: int, first: int = 0) -> np.ndarray:
    """Raw uint32 words of elements ``first..n-1`` of bases ``start..stop-1`` of one kind,
    ``[stop - start, n - first]``."""
    return _generate(seed, stream, kind, start, stop, n, first, values=False)


def basis(seed: int, stream: int, kind: int, start: int, stop: int, n: int) -> np.ndarray:
    """Values of bases ``start..stop-1``, float32 ``[stop - start, n]``, uniform on [-1, 1).

    Holds ``(stop - start) · n`` values at once; callers bound that with :func:`chunk_bases`.
    """
    return _generate(seed, stream, kind, start, stop, n, 0, values=True)


def basis_range(seed: int, stream: int, kind: int, start: int, stop: int, first: int, end: int) -> np.ndarray:
    """Values of elements ``first..end-1`` of bases ``start..stop-1``, float32 ``[stop - start, end - first]``
    (equal to the same columns of :func:`basis`; lets decoders tile huge matrices)."""
    return _generate(seed, stream, kind, start, stop, end, first, values=True)


def chunk_bases(n: int, budget: int = DEFAULT_BUDGET) -> int:
    """How many bases of ``n`` elements fit in ``budget`` bytes of generated values (fp32 plus
    the generator's uint32 words and counters, about 28 bytes per value); at least 1."""
    return max(1, int(budget // max(1, 28 * n)))


def iter_bases(seed: int, stream: int, kind: int, k: int, n: int, budget: int = DEFAULT_BUDGET) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, values [kc, n])`` covering bases ``0..k-1`` within ``budget`` bytes per chunk."""
    step = chunk_bases(n, budget)
    for start in range(0, k, step):
        stop = min(k, start + step)
        yield start, basis(seed, stream, kind, start, stop, n)
