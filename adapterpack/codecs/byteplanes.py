"""``byteplanes``: each byte position of the elements is its own zstd frame (spec §5.2).

Float exponent/sign bytes repeat far more than mantissa bytes; compressing the planes
apart lets zstd see that (ZipNN's observation: ≈1.5× on bf16 weights vs ≈1.3× plain).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ..errors import CodecError, LengthMismatchError
from .base import Codec, register_codec
from .zstd import MAX_RATIO, compress, decompress_into

#: Level 1 beats 3 here in both size and speed (bundled example: fp32 1.174x vs 1.165x, bf16
#: 1.430x vs 1.406x): the exponent planes are runs that fast matching finds as well.
DEFAULT_LEVEL = 1


@register_codec
class BytePlanes(Codec):
    """Split k-byte elements into k planes, zstd each."""

    codec_id = "byteplanes"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BytePlanes:
        level = config.get("level", DEFAULT_LEVEL)
        return cls(level if isinstance(level, int) else DEFAULT_LEVEL)

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        if itemsize not in (2, 4, 8):
            raise ValueError(f"byteplanes needs itemsize 2, 4 or 8, got {itemsize}")
        grid = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)
        frames = [compress(np.ascontiguousarray(grid[:, j]).data, self.level) for j in range(itemsize)]
        header = struct.pack(f"<{itemsize}Q", *(len(f) for f in frames))
        return header + b"".join(frames)

    def decode(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        if itemsize not in (2, 4, 8):
            raise CodecError(f"byteplanes cannot hold elements of {itemsize} byte(s)")
        if len(out) % itemsize:
            raise LengthMismatchError(f"byteplanes: {len(out)} bytes is not a whole number of elements")
        head = 8 * itemsize
        if len(stored) < head:
            raise CodecError("byteplanes: stored bytes shorter than the plane table")
        lengths = struct.unpack_from(f"<{itemsize}Q", stored)
        if head + sum(lengths) != len(stored):
            raise CodecError(f"byteplanes: plane table sums to {head + sum(lengths)} bytes, blob has {len(stored)}")
        n = len(out) // itemsize
        grid = np.frombuffer(out, dtype=np.uint8).reshape(n, itemsize)
        plane = np.empty(n, dtype=np.uint8)
        pos = head
        for j, length in enumerate(lengths):
            decompress_into(stored[pos : pos + length], plane.data, f"byteplanes plane {j}")
            grid[:, j] = plane
            pos += length

    def max_expansion(self) -> int:
        return MAX_RATIO
