"""``zstd``: one Zstandard frame, decoded safely into a buffer sized by the index.

python-zstandard's one-shot ``decompress`` trusts the frame header's content size (a
16-byte frame can claim 16 GiB), so decoding checks the header against the index first
and streams into the preallocated output.
"""

from __future__ import annotations

from typing import Any

import zstandard

from ..errors import CodecError
from .base import Codec, register_codec

#: Largest window a reader accepts (spec §5.1).
MAX_WINDOW = 128 << 20
#: Zstandard cannot expand more than this: an RLE block is 4 bytes for at most 128 KiB.
MAX_RATIO = 32768
DEFAULT_LEVEL = 3


def compress(data: memoryview | bytes, level: int) -> bytes:
    """One frame that declares its content size."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def decompress_into(frame: memoryview, out: memoryview, what: str = "zstd frame") -> None:
    """Decode exactly one frame into ``out``; refuse size lies and trailing data."""
    try:
        declared = zstandard.frame_content_size(frame)
        window = zstandard.get_frame_parameters(frame).window_size
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: not a zstd frame ({e})") from None
    if declared < 0:
        raise CodecError(f"{what}: frame does not declare its content size")
    if declared != len(out):
        raise CodecError(f"{what}: frame declares {declared} bytes, index says {len(out)}")
    if window > MAX_WINDOW:
        raise CodecError(f"{what}: window of {window} bytes exceeds the {MAX_WINDOW}-byte limit")
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    try:
        with dctx.stream_reader(frame, read_across_frames=True) as reader:
            filled = 0
            while filled < len(out):
                n = reader.readinto(out[filled:])
                if n == 0:
                    break
                filled += n
            extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: corrupt ({e})") from None
    if filled != len(out) or extra:
        raise CodecError(f"{what}: decoded size differs from the declared {len(out)} bytes")


@register_codec
class Zstd(Codec):
    """Zstandard, one frame per blob."""

    codec_id = "zstd"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Zstd:
        level = config.get("level", DEFAULT_LEVEL)
        return cls(level if isinstance(level, int) else DEFAULT_LEVEL)

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        return compress(data, self.level)

    def decode(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        decompress_into(stored, out)

    def max_expansion(self) -> int:
        return MAX_RATIO
