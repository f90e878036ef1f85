"""``raw``: the decoded bytes as they are (mmap-able, zero-copy)."""

from __future__ import annotations

from adapterpack.codecs.base import Codec, register_codec
from adapterpack.errors import LengthMismatchError


@register_codec
class Raw(Codec):
    """Identity codec."""

    codec_id = "raw"

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        return bytes(data)

    def check(self, stored: memoryview, length: int, itemsize: int) -> None:
        if len(stored) != length:
            raise LengthMismatchError(f"raw blob stores {len(stored)} bytes, index says {length}")

    def decode_into(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        self.check(stored, len(out), itemsize)  # a memcpy's worth of checking: keep decode_into safe on its own
        out[:] = stored
