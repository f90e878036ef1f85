"""``pco``: elements as unsigned integers, sign bit rotated to the bottom, coded by Pco (spec §5.4).

Why this codec: float factors are close to i.i.d. draws from a smooth distribution, so the best
lossless model is one of the *value*, not of its bytes. Rotating the sign bit from the top to the
bottom makes the unsigned integer grow with ``|x|`` (exponent, then mantissa, then sign), and Pco
(pcodec, a maintained Rust codec for numeric columns) codes such integers as tANS-coded bins with
raw offset bits: exponent statistics and the skew of the top mantissa bits within a binade are
both modelled, with a table of a few dozen bytes. On the real adapters it beats per-plane zstd,
ZipNN and pcodec on the unrotated values (BENCHMARKS.md, ``python -m tools.bench.bench_codecs``),
and decodes at memory-ish speed. The stored bytes are Pco's *wrapped* format (no standalone
framing): the element count comes from the validated index, so chunk and page sizes need not be
stored; every byte is accounted for (trailing bytes are refused).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from adapterpack.codecs.base import Codec, register_codec
from adapterpack.errors import CodecError, LengthMismatchError
from adapterpack.limits import MAX_ZSTD_RATIO

#: Elements per Pco chunk (one page each); the last chunk holds the rest. Pco allows up to 2^24.
CHUNK = 1 << 22
#: Pco's compression level 0–12 (how many bins it may try); decoding does not depend on it. 8 (Pco's own default)
#: comes close to 12 in size at a fraction of its encode time (BENCHMARKS.md).
DEFAULT_LEVEL = 8
#: itemsize -> (Pco number type, numpy unsigned type)
_TYPES = {2: ("u16", np.dtype("<u2")), 4: ("u32", np.dtype("<u4")), 8: ("u64", np.dtype("<u8"))}

_pco: Any = None


def _lib() -> Any:
    """pcodec, imported on first use (it is only needed for pco blobs)."""
    global _pco
    if _pco is None:
        try:
            import pcodec
        except ImportError:  # pragma: no cover - pcodec is a dependency
            raise CodecError("the pco codec needs the pcodec package (pip install pcodec)") from None
        _pco = pcodec
    return _pco


def chunk_sizes(n: int) -> list[int]:
    """Element counts of the chunks a blob of ``n`` elements is cut into (spec §5.4)."""
    return [min(CHUNK, n - s) for s in range(0, n, CHUNK)]


def rotate(x: np.ndarray) -> np.ndarray:
    """Sign bit (top) moved to the bottom: ``(x << 1) | (x >> (bits - 1))``, a new array."""
    bits = 8 * x.dtype.itemsize
    r = np.left_shift(x, 1)
    r |= x >> (bits - 1)
    return r


#: Elements undone per step by :func:`unrotate_inplace`: its temporary stays small (decode memory is the output
#: plus one copy of a page, not a third full-size buffer).
_UNROTATE_BLOCK = 1 << 16


def unrotate_inplace(r: np.ndarray) -> None:
    """Inverse of :func:`rotate`, in place: three passes per block, one small temporary.

    The bottom bit goes back to the top by a wrapping multiply by 2^(bits-1) (numpy's integer multiply is
    vectorised; its left shift is not, and takes about twice as long: BENCHMARKS.md, "pco decode")."""
    top = r.dtype.type(1 << (8 * r.dtype.itemsize - 1))
    tmp = np.empty(min(len(r), _UNROTATE_BLOCK), r.dtype)
    for s in range(0, len(r), _UNROTATE_BLOCK):
        block = r[s : s + _UNROTATE_BLOCK]
        t = tmp[: len(block)]
        np.right_shift(block, 1, out=t)
        np.multiply(block, top, out=block)
        block |= t


#: Bytes handed to Pco to parse a header or chunk metadata before trying the whole rest (saves copying the page). The
#: metadata of real adapters' tensors fits well inside, and a small copy per blob decodes measurably faster than a 4 KiB
#: one (BENCHMARKS.md, "pco decode"); longer metadata takes the fallback, a copy of the rest.
_META_WINDOW = 512


def _parse(parse: Callable[[bytes], Any], stored: memoryview, pos: int, window: int | None = None) -> Any:
    """``parse(bytes from pos)`` for a header, chunk metadata or a page.

    Pco reads only ``bytes`` objects, so each one is a copy: a part is parsed from a window of ``window``
    bytes first, and from the whole rest only if it does not fit in it (so a blob of many chunks is copied
    about once, not once per chunk from there to its end).
    """
    window = _META_WINDOW if window is None else window  # looked up here, so a test can shrink it
    if len(stored) - pos > window:
        try:
            return parse(bytes(stored[pos : pos + window]))
        except Exception as e:
            if "InsufficientData" not in str(e):
                raise
    return parse(bytes(stored[pos:]))


def _is_pco_error(e: BaseException) -> bool:
    """pcodec raises RuntimeError/TypeError/ValueError, and a Rust panic surfaces as pyo3's PanicException
    (a BaseException): all mean the stored bytes are not a valid stream. A MemoryError does not (the caller
    reports it as such)."""
    return (isinstance(e, Exception) and not isinstance(e, MemoryError)) or type(e).__name__ == "PanicException"


@register_codec
class Pco(Codec):
    """Sign-rotated unsigned integers in Pco's wrapped format, one chunk and page per ``CHUNK`` elements."""

    codec_id = "pco"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        # Pco's levels are 0-12; any other one encodes at the default, and the index records what was used
        self.level = level if isinstance(level, int) and not isinstance(level, bool) and 0 <= level <= 12 else DEFAULT_LEVEL

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        if itemsize not in _TYPES:
            raise ValueError(f"pco needs itemsize 2, 4 or 8, got {itemsize}")
        pco = _lib()
        x = np.frombuffer(data, dtype=_TYPES[itemsize][1])
        r = rotate(x)
        fc = pco.wrapped.FileCompressor()
        parts = [fc.write_header()]
        start = 0
        for n in chunk_sizes(len(r)):
            cfg = pco.ChunkConfig(
                compression_level=self.level,
                mode_spec=pco.ModeSpec.classic(),
                delta_spec=pco.DeltaSpec.no_op(),
                paging_spec=pco.PagingSpec.exact_page_sizes([n]),
            )
            cc = fc.chunk_compressor(r[start : start + n], cfg)
            parts += [cc.write_meta(), cc.write_page(0)]
            start += n
        return b"".join(parts)

    def check(self, stored: memoryview, length: int, itemsize: int) -> None:
        if itemsize not in _TYPES:
            raise CodecError(f"pco cannot hold elements of {itemsize} byte(s)")
        if length % itemsize:
            raise LengthMismatchError(f"pco: {length} bytes is not a whole number of elements")
        if len(stored) < 1:
            raise CodecError("pco: no stored bytes (a Pco header is at least 1 byte)")
        # every chunk needs at least a 1-byte meta and, holding >= 1 element, a page of >= 1 byte
        if len(stored) < 1 + 2 * len(chunk_sizes(length // itemsize)):
            raise CodecError(f"pco: {len(stored)} stored bytes cannot hold {length // itemsize} elements' chunks")

    def decode_into(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        self.check(stored, len(out), itemsize)
        pco = _lib()
        kind, npdt = _TYPES[itemsize]
        dst = np.frombuffer(out, dtype=npdt)
        where = "header"
        try:
            fd, pos = _parse(pco.wrapped.FileDecompressor.new, stored, 0)
            start = 0
            for i, n in enumerate(chunk_sizes(len(dst))):
                where = f"chunk {i} metadata"
                cd, used = _parse(lambda b: fd.chunk_decompressor(b, kind), stored, pos)
                pos += used
                where = f"chunk {i} page"
                # the one copy of the page (Pco reads bytes objects only); a page the writer made is at most about
                # the chunk's raw size, so twice that bounds the copy unless the stream is odd (then: the rest)
                read = partial(cd.read_page_into, page_n=n, dst=dst[start : start + n])
                progress, used = _parse(read, stored, pos, 2 * n * itemsize + _META_WINDOW)
                pos += used
                if progress.n_processed != n or not progress.finished:
                    raise CodecError(f"pco: chunk {i} page holds {progress.n_processed} elements, expected {n}")
                start += n
        except CodecError:
            raise
        except BaseException as e:
            if not _is_pco_error(e):
                raise
            raise CodecError(f"pco: corrupt {where} ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        if pos != len(stored):
            raise CodecError(f"pco: the stream ends at byte {pos}, blob has {len(stored)} (trailing bytes)")
        unrotate_inplace(dst)

    def max_expansion(self) -> int:
        return MAX_ZSTD_RATIO
