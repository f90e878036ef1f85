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


def frame_length(frame: memoryview, has_checksum: bool, what: str = "zstd frame") -> int:
    """Bytes of the zstd frame at the start of ``frame``, walking its block headers (RFC 8878 §3.1.1).

    The decoder skips skippable frames after the first, so trailing data is caught here.
    """
    pos = zstandard.frame_header_size(frame)
    while True:
        if pos + 3 > len(frame):
            raise CodecError(f"{what}: truncated (block header past the end)")
        header = int.from_bytes(frame[pos : pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            raise CodecError(f"{what}: corrupt (reserved block type)")
        pos += 3 + (1 if kind == 1 else size)
        if header & 1:
            return pos + 4 * has_checksum


def decompress_into(frame: memoryview, out: memoryview, what: str = "zstd frame") -> None:
    """Decode exactly one frame into ``out``; refuse size lies and trailing data."""
    if bytes(frame[:4]) != zstandard.FRAME_HEADER:
        raise CodecError(f"{what}: not a zstd frame (no zstd magic number)")
    try:
        declared = zstandard.frame_content_size(frame)
        params = zstandard.get_frame_parameters(frame)
        window = params.window_size
        end = frame_length(frame, params.has_checksum, what)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: not a zstd frame ({e})") from None
    if end != len(frame):
        more = f"followed by {len(frame) - end} more bytes" if end < len(frame) else f"{end - len(frame)} bytes short"
        raise CodecError(f"{what}: one frame is {end} bytes, blob has {len(frame)} ({more})")
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
