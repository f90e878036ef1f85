"""Group-wise symmetric quantization of vectors and its bit packing (the arithmetic of spec/qsvd.md §2–3).

A vector of ``N`` values at width ``b`` (1–8 bits) is cut into groups of ``g`` consecutive values
(the last may be shorter); each group has one binary16 scale ``d`` and each value a code
``c`` in ``[0, 2^b − 1]`` standing for ``d · (2c − (2^b − 1))``: the odd integers ``±1, ±3, …,
±(2^b − 1)`` times ``d`` (a mid-rise grid, symmetric, so 1 bit is sign times scale). Codes are
packed LSB first: bit ``t`` of a vector's bit stream is bit ``t mod 8`` of its byte ``t // 8``,
value ``i`` occupies bits ``[i·b, (i+1)·b)`` with its least significant bit first.

The scale of each group is chosen to minimise the group's squared error (a grid search over
fractions of the round-to-nearest scale, then least-squares refinement for the chosen codes,
each candidate judged after rounding the scale to binary16), not only set from the group's max.
Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Fractions of the max-based scale tried by the search (1.0 is round-to-nearest from the group's max).
SEARCH = np.linspace(0.25, 1.0, 31)
#: Least-squares (Lloyd) refinements of the best grid scale.
REFINE = 2
#: Codes unpacked and dequantized at a time by readers (a multiple of 8, so every block starts on a byte):
#: bounds a reader's temporaries whatever the vector's length.
CODE_BLOCK = 1 << 16
#: Blocks up to this many codes are unpacked bit by bit (faster for short vectors, temporaries still small).
SMALL_BLOCK = 1 << 10
_WEIGHTS = {b: (1 << np.arange(b)).astype(np.uint8) for b in range(1, 9)}


@dataclass(frozen=True)
class Quantized:
    """Vectors quantized (one per row): packed codes, per-group binary16 scales, and the values they decode to."""

    codes: np.ndarray  # uint8 [ceil(N·b/8)], or [R, ceil(N·b/8)] for rows: each row byte-padded on its own
    scales: np.ndarray  # float16 [ceil(N/g)] or [R, ceil(N/g)]
    values: np.ndarray  # float64 [N] or [R, N], exactly what a reader decodes (in binary32 arithmetic, exact)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (ints in ``[0, 2^bits)``) packed LSB first into ``ceil(N·bits/8)`` bytes (per row, for 2-D codes)."""
    c = np.asarray(codes, dtype=np.uint8)
    rows = c.reshape(-1, c.shape[-1]) if c.ndim else c.reshape(1, 1)
    planes = (rows[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
    packed = np.packbits(planes.reshape(rows.shape[0], -1), axis=1, bitorder="little")
    return packed if c.ndim == 2 else packed.reshape(-1)


def unpack_codes(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of width ``bits`` of packed bytes ``data`` (uint8 -> int32)."""
    return unpack_block(np.asarray(data, dtype=np.uint8), bits, 0, count).astype(np.int32)


def unpack_block(data: np.ndarray, bits: int, start: int, stop: int) -> np.ndarray:
    """Codes ``[start, stop)`` (``start`` a multiple of 8) of width ``bits`` of packed bytes ``data``, as uint8.

    Eight codes fill exactly ``bits`` bytes, so the block is read as rows of ``bits`` bytes and each of the
    eight code positions is cut from at most two bytes of its row: no per-bit expansion.
    """
    if start % 8:
        raise ValueError(f"block start {start} is not a multiple of 8")
    if bits == 8:
        return data[start:stop]
    first = start * bits // 8
    if stop - start <= SMALL_BLOCK:  # few codes: one bit per byte is small here, and fewer numpy calls
        count = stop - start
        planes = np.unpackbits(data[first : first + -(-count * bits // 8)], bitorder="little", count=count * bits)
        return planes.reshape(count, bits) @ _WEIGHTS[bits]
    rows_n = -(-(stop - start) // 8)
    chunk = data[first : first + rows_n * bits]
    if chunk.size < rows_n * bits:  # the last block of a vector: its final byte may be partly padding
        chunk = np.concatenate([chunk, np.zeros(rows_n * bits - chunk.size, np.uint8)])
    rows = chunk.reshape(rows_n, bits)
    mask = np.uint8((1 << bits) - 1)
    codes = np.empty((rows_n, 8), np.uint8)
    for k in range(8):
        byte, off = divmod(k * bits, 8)
        col = rows[:, byte] >> np.uint8(off)
        if off + bits > 8:
            col |= rows[:, byte + 1] << np.uint8(8 - off)
        np.bitwise_and(col, mask, out=codes[:, k])
    return codes.reshape(-1)[: stop - start]


def dequantize_into(out: np.ndarray, data: np.ndarray, scales: np.ndarray, bits: int, group_size: int, factor: np.float32) -> None:
    """``out[i] = factor · (scale · (2c_i − (2^b − 1)))`` for the ``len(out)`` packed codes of ``data``, in blocks.

    The same float32 bits as ``dequantize(unpack_codes(...)) * factor`` (the level times its scale is exact,
    times ``factor`` is one rounding), with temporaries bounded by the block instead of the vector.
    """
    count, g, top = out.shape[0], int(group_size), (1 << bits) - 1
    sc16 = np.asarray(scales, dtype=np.float16)
    for i0 in range(0, count, CODE_BLOCK):
        i1 = min(i0 + CODE_BLOCK, count)
        x = unpack_block(data, bits, i0, i1).astype(np.float32)
        x *= np.float32(2)
        x -= np.float32(top)
        x *= _block_scales(sc16, g, i0, i1)
        np.multiply(x, factor, out=out[i0:i1])


def _block_scales(scales: np.ndarray, group_size: int, start: int, stop: int) -> np.ndarray:
    """float32 scale of each value in ``[start, stop)``: value ``i`` has scale ``scales[i // group_size]``."""
    g0, g1 = start // group_size, (stop - 1) // group_size + 1
    sc = scales[g0:g1].astype(np.float32)
    if group_size < stop - start:  # many groups: repeat each, cut the partial ones at the ends (< 3 blocks)
        return np.repeat(sc, group_size)[start - g0 * group_size : stop - g0 * group_size]
    lo = np.maximum(np.arange(g0, g1, dtype=np.int64) * group_size, start)  # one or two groups
    hi = np.minimum(np.arange(g0 + 1, g1 + 1, dtype=np.int64) * group_size, stop)
    return np.repeat(sc, hi - lo)


def n_groups(n: int, group_size: int) -> int:
    """Groups of a vector of ``n`` values."""
    return -(-n // group_size)


def dequantize(codes: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """float32 values ``scale · (2c − (2^b − 1))`` of unpacked ``codes`` (exact in binary32: an at most 9-bit
    odd integer times a binary16 scale)."""
    levels = (2 * np.asarray(codes, dtype=np.int32) - ((1 << bits) - 1)).astype(np.float32)
    # a group larger than the vector is the whole vector: never repeat a scale more times than there are values
    per_value = np.repeat(np.asarray(scales, dtype=np.float16).astype(np.float32), min(group_size, levels.size))[: levels.size]
    return levels * per_value


def _codes_for(x: np.ndarray, d: np.ndarray, top: int) -> np.ndarray:
    """Nearest grid codes of groups ``x`` [G, g] at scales ``d`` [G, ...] (a group whose scale is not positive gets the
    codes of x = 0), as float64; one new array, the other steps in place (the scale search calls this per candidate)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = x / np.where(d > 0, d, np.inf)  # x / inf = ±0: the codes of 0, as for d == 0
    t += top
    t *= 0.5
    np.rint(t, out=t)
    return np.clip(t, 0, top, out=t)


def quantize(x: np.ndarray, bits: int, group_size: int, *, search: bool = True) -> Quantized:
    """``x`` (1-D, finite, |x| well inside binary16's range) at ``bits`` with one binary16 scale per group.

    ``search=False`` is plain round-to-nearest with the scale from each group's max |x|.
    """
    q = quantize_rows(np.asarray(x, dtype=np.float64).reshape(1, -1), bits, group_size, search=search)
    return Quantized(q.codes[0], q.scales[0], q.values[0])


def quantize_rows(x: np.ndarray, bits: int, group_size: int, *, search: bool = True) -> Quantized:
    """Each row of ``x`` [R, N] quantized as :func:`quantize` does (all rows at once)."""
    x = np.asarray(x, dtype=np.float64)
    r, n = x.shape
    g, top = int(group_size), (1 << bits) - 1
    gcount = n_groups(n, g)
    width = min(g, n) if gcount == 1 else g  # one group per row: no padding beyond the row
    pad = np.zeros((r, gcount * width))
    pad[:, :n] = x
    xs = pad.reshape(r * gcount, width)
    mask = None  # every value is a value: no padding to leave out of the errors
    if gcount * width != n:
        valid = (np.arange(gcount * width) < n).reshape(gcount, width)
        mask = np.broadcast_to(valid, (r, gcount, width)).reshape(r * gcount, width)
    base = np.max(np.abs(xs), axis=1) / top  # round-to-nearest scale
    if search:
        groups = xs.shape[0]
        cand = np.concatenate([base[:, None] * SEARCH[None, :], _ls_scales(xs, mask, base, top)[:, None]], axis=1)
        cand = cand.astype(np.float16).astype(np.float64)
        err = np.stack([_sse(xs, mask, cand[:, i], top) for i in range(cand.shape[1])], axis=1)
        pick = np.argmin(err, axis=1)
        d, best_err = cand[np.arange(groups), pick], err[np.arange(groups), pick]
        # Lloyd steps: the least-squares scale of the current codes, new codes, kept where the error drops
        for _ in range(REFINE):
            ref = _ls_scales(xs, mask, d, top).astype(np.float16).astype(np.float64)
            ref_err = _sse(xs, mask, ref, top)
            better = ref_err < best_err
            d, best_err = np.where(better, ref, d), np.where(better, ref_err, best_err)
    else:
        d = base.astype(np.float16).astype(np.float64)
    d = np.where(np.isfinite(d), d, 0.0)
    codes = _codes_for(xs, d[:, None], top).astype(np.uint8).reshape(r, gcount * width)[:, :n]
    scales = d.astype(np.float16).reshape(r, gcount)
    values = (2.0 * codes - top) * np.repeat(scales.astype(np.float64), width, axis=1)[:, :n]
    return Quantized(pack_codes(codes, bits), scales, values)


def _sse(xs: np.ndarray, mask: np.ndarray | None, d: np.ndarray, top: int) -> np.ndarray:
    """Per group, the squared error of ``xs`` at scales ``d`` (``mask``: the values that are not padding; None: all)."""
    e = _codes_for(xs, d[:, None], top)
    e *= 2
    e -= top
    e *= d[:, None]  # the decoded values
    np.subtract(xs, e, out=e)
    e *= e
    if mask is not None:
        e[~mask] = 0.0
    return np.sum(e, axis=1)


def _ls_scales(xs: np.ndarray, mask: np.ndarray | None, d: np.ndarray, top: int) -> np.ndarray:
    """Per group, the scale minimising the squared error for the codes ``d`` gives: <x, L> / <L, L>."""
    levels = _codes_for(xs, d[:, None], top)
    levels *= 2
    levels -= top
    if mask is not None:
        levels[~mask] = 0.0
    num, den = np.sum(xs * levels, axis=1), np.sum(levels * levels, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).clip(min=0.0)


def float16_vector(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to binary16 (the FLOAT width), as float16."""
    return np.asarray(x, dtype=np.float64).astype(np.float16)
