"""``zstd``: one Zstandard frame, decoded safely into a buffer sized by the index.

python-zstandard's one-shot ``decompress`` trusts the frame header's content size (a
16-byte frame can claim 16 GiB), so :func:`check_frame` compares the header with the
index before any output buffer exists, and decoding streams into that buffer.
"""

from __future__ import annotations

import operator
import threading

import zstandard

from adapterpack.codecs.base import Codec, register_codec
from adapterpack.errors import CodecError, OptionError
from adapterpack.limits import MAX_ZSTD_RATIO as MAX_RATIO  # Zstandard cannot expand more: an RLE block is 4 bytes for 128 KiB
from adapterpack.limits import MAX_ZSTD_WINDOW as MAX_WINDOW

DEFAULT_LEVEL = 3
#: Levels libzstd defines (ZSTD_minCLevel() to ZSTD_maxCLevel()); the level only steers encoding (a file may record any).
MIN_LEVEL, MAX_LEVEL = -(1 << 17), 22


_local = threading.local()


def _is_level(level: object) -> bool:
    try:
        return not isinstance(level, bool) and MIN_LEVEL <= operator.index(level) <= MAX_LEVEL  # type: ignore[arg-type]
    except TypeError:
        return False


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per level and thread: creating one costs about as much as compressing a small blob."""
    if not _is_level(level):  # zstandard's ValueError / OverflowError otherwise
        raise OptionError(f"zstd level must be an integer in [{MIN_LEVEL}, {MAX_LEVEL}], got {level!r:.40}")
    cache = _local.__dict__.setdefault("by_level", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def compress(data: memoryview | bytes, level: int) -> bytes:
    """One frame that declares its content size (the same bytes as a fresh compressor writes)."""
    return _compressor(level).compress(data)


def frame_length(frame: memoryview, has_checksum: bool, content_size: int, what: str = "zstd frame") -> int:
    """Bytes of the zstd frame at the start of ``frame``, walking its block headers (RFC 8878 §3.1.1).

    The decoder skips skippable frames after the first, so trailing data is caught here.
    Every block but the last decodes to at least one byte (libzstd writes no empty block
    before the last), so a frame declaring ``content_size`` bytes has at most
    ``content_size + 1`` blocks; more is refused (spec §5.1), which bounds this loop by the
    validated decoded size as well as by the stored size.
    """
    pos = zstandard.frame_header_size(frame)
    blocks, max_blocks = 0, content_size + 1
    while True:
        if pos + 3 > len(frame):
            raise CodecError(f"{what}: truncated (block header past the end)")
        if blocks == max_blocks:
            raise CodecError(f"{what}: more than {max_blocks} blocks for {content_size} declared bytes")
        header = int.from_bytes(frame[pos : pos + 3], "little")
        kind, size = (header >> 1) & 3, header >> 3
        if kind == 3:
            raise CodecError(f"{what}: corrupt (reserved block type)")
        pos += 3 + (1 if kind == 1 else size)
        blocks += 1
        if header & 1:
            return pos + 4 * has_checksum


def check_frame(frame: memoryview, size: int, what: str = "zstd frame") -> None:
    """Refuse a frame unless it is exactly one frame declaring ``size`` content bytes (spec §5.1); allocates nothing.

    The declared size is compared with the index before the blocks are walked, so the walk
    is bounded by a size the index already vouches for.
    """
    if bytes(frame[:4]) != zstandard.FRAME_HEADER:
        raise CodecError(f"{what}: not a zstd frame (no zstd magic number)")
    try:
        declared = zstandard.frame_content_size(frame)
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: not a zstd frame ({e})") from None
    if declared < 0:
        raise CodecError(f"{what}: frame does not declare its content size")
    if declared != size:
        raise CodecError(f"{what}: frame declares {declared} bytes, index says {size}")
    if params.window_size > MAX_WINDOW:
        raise CodecError(f"{what}: window of {params.window_size} bytes exceeds the {MAX_WINDOW}-byte limit")
    if params.dict_id:
        raise CodecError(f"{what}: frame needs zstd dictionary {params.dict_id}; .apack frames use none")
    try:
        end = frame_length(frame, params.has_checksum, declared, what)
    except zstandard.ZstdError as e:
        raise CodecError(f"{what}: not a zstd frame ({e})") from None
    if end != len(frame):
        more = f"followed by {len(frame) - end} more bytes" if end < len(frame) else f"{end - len(frame)} bytes short"
        raise CodecError(f"{what}: one frame is {end} bytes, blob has {len(frame)} ({more})")


def decode_checked(frame: memoryview, out: memoryview, what: str = "zstd frame") -> None:
    """Decode a frame that passed :func:`check_frame` for ``len(out)`` into ``out``; refuse a size that differs."""
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


def decompress_into(frame: memoryview, out: memoryview, what: str = "zstd frame") -> None:
    """Check, then decode exactly one frame into ``out``; refuse size lies and trailing data."""
    check_frame(frame, len(out), what)
    decode_checked(frame, out, what)


@register_codec
class Zstd(Codec):
    """Zstandard, one frame per blob."""

    codec_id = "zstd"

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level

    def encode(self, data: memoryview, itemsize: int) -> bytes:
        return compress(data, self.level)

    def check(self, stored: memoryview, length: int, itemsize: int) -> None:
        check_frame(stored, length)

    def decode_into(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        decode_checked(stored, out)

    def max_expansion(self) -> int:
        return MAX_RATIO
