"""``byteplanes``: each byte position of the elements is its own zstd frame (spec §5.2).

Float exponent/sign bytes repeat far more than mantissa bytes; compressing the planes
apart lets zstd see that (the idea behind ZipNN; sizes against plain zstd in BENCHMARKS.md).
"""

from __future__ import annotations

import struct

import numpy as np

from adapterpack.codecs.base import Codec, register_codec
from adapterpack.codecs.zstd import MAX_RATIO, check_frame, compress, decode_checked
from adapterpack.errors import CodecError, LengthMismatchError

#: Level 1 beats 3 in both size and speed on float planes: the exponent planes are runs that
#: fast matching finds as well (bundled example in bf16: 1,374,379 vs 1,395,797 bytes;
#: ``python -m tools.bench.bench_codecs`` with and without ``--level 3``, BENCHMARKS.md).
DEFAULT_LEVEL = 1


@register_codec
class BytePlanes(Codec):
    """Split k-byte elements into k planes, zstd each."""

    codec_id = "byteplanes"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        if itemsize not in (2, 4, 8):
            raise ValueError(f"byteplanes needs itemsize 2, 4 or 8, got {itemsize}")
        grid = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)
        frames = [compress(np.ascontiguousarray(grid[:, j]).data, self.level) for j in range(itemsize)]
        header = struct.pack(f"<{itemsize}Q", *(len(f) for f in frames))
        return b"".join([header, *frames])  # one copy of the frames, not two

    def _planes(self, stored: memoryview, length: int, itemsize: int) -> list[memoryview]:
        """The k plane frames, after checking the plane table against the stored length (§5.2)."""
        if itemsize not in (2, 4, 8):
            raise CodecError(f"byteplanes cannot hold elements of {itemsize} byte(s)")
        if length % itemsize:
            raise LengthMismatchError(f"byteplanes: {length} bytes is not a whole number of elements")
        head = 8 * itemsize
        if len(stored) < head:
            raise CodecError("byteplanes: stored bytes shorter than the plane table")
        lengths = struct.unpack_from(f"<{itemsize}Q", stored)
        if head + sum(lengths) != len(stored):
            raise CodecError(f"byteplanes: plane table sums to {head + sum(lengths)} bytes, blob has {len(stored)}")
        frames, pos = [], head
        for n in lengths:
            frames.append(stored[pos : pos + n])
            pos += n
        return frames

    def check(self, stored: memoryview, length: int, itemsize: int) -> None:
        n = length // itemsize if itemsize in (2, 4, 8) else 0
        for j, frame in enumerate(self._planes(stored, length, itemsize)):
            check_frame(frame, n, f"byteplanes plane {j}")

    def decode_into(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        frames = self._planes(stored, len(out), itemsize)
        n = len(out) // itemsize
        grid = np.frombuffer(out, dtype=np.uint8).reshape(n, itemsize)
        plane = np.empty(n, dtype=np.uint8)
        for j, frame in enumerate(frames):
            decode_checked(frame, plane.data, f"byteplanes plane {j}")
            grid[:, j] = plane

    def max_expansion(self) -> int:
        return MAX_RATIO
