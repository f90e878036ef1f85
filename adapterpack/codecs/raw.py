"""``raw``: the decoded bytes as they are (mmap-able, zero-copy)."""

from __future__ import annotations

from ..errors import LengthMismatchError
from .base import Codec, register_codec


@register_codec
class Raw(Codec):
    """Identity codec."""

    codec_id = "raw"

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        return bytes(data)

    def decode(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        if len(stored) != len(out):
            raise LengthMismatchError(f"raw blob stores {len(stored)} bytes, index says {len(out)}")
        out[:] = stored
