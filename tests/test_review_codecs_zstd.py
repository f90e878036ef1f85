"""Review round: hostile zstd / byteplanes blobs and compressed indexes, and the zstd codecs' own options."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from adapterpack import codecs
from adapterpack.adapter import Adapter, Module
from adapterpack.codecs.zstd import check_frame, decompress_into
from adapterpack.container.writer import write_apack
from adapterpack.errors import AdapterpackError, CodecError, OptionError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _header(content: int) -> bytes:
    """Frame header: single segment, 8-byte content size, no checksum, no dictionary."""
    return ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", content)


def _block(kind: int, size: int, last: bool, body: bytes = b"") -> bytes:
    return ((size << 3) | (kind << 1) | int(last)).to_bytes(3, "little") + body


def _adapter() -> Adapter:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 64)).astype(np.float32), rng.standard_normal((64, 4)).astype(np.float32)
    return Adapter(modules={"m": Module("m", "lora", (64, 64), {"rank": 4, "alpha": 4.0}, {"A": a, "B": b})})


@pytest.mark.parametrize("codec", ["zstd", "byteplanes"])
@pytest.mark.parametrize("level", [23, 100, 1 << 70, -(1 << 40)])
def test_a_level_zstd_cannot_use_is_an_option_error_and_nothing_is_written(codec: str, level: object, tmp_path: Path) -> None:
    """zstandard's own ValueError / OverflowError must not escape the writer (an API caller's bad option)."""
    out = tmp_path / "a.apack"
    with pytest.raises(OptionError, match=r"level"):
        write_apack(out, _adapter(), codec=codec, level=level)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("codec", ["zstd", "byteplanes"])
@pytest.mark.parametrize("level", [-5, 1, 3, 22])
def test_every_zstd_level_still_encodes_and_reads_back(codec: str, level: int) -> None:
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    c = codecs.get_codec({"id": codec, "level": level})
    stored = c.encode(memoryview(x.tobytes()), 4)
    assert bytes(c.decode_new(memoryview(stored), x.nbytes, 4)) == x.tobytes()


def test_a_file_with_any_recorded_level_is_still_read() -> None:
    """The level is informational on read (spec §5): a file recording a level no writer accepts still decodes."""
    x = np.arange(300, dtype=np.float32)
    stored = codecs.get_codec("zstd").encode(memoryview(x.tobytes()), 4)
    for level in (23, -(1 << 40), 1 << 60):
        c = codecs.get_codec({"id": "zstd", "level": level})
        assert bytes(c.decode_new(memoryview(stored), x.nbytes, 4)) == x.tobytes()


# --- hostile frames ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "length", "match"),
    [
        # content size says 4, the RLE blocks produce 2 x 128 KiB: refused while decoding, into the 4-byte buffer
        (_header(4) + _block(1, 128 << 10, False, b"\0") + _block(1, 128 << 10, True, b"\0"), 4, "corrupt"),
        # one RLE block producing more than declared
        (_header(4) + _block(1, 128 << 10, True, b"\0"), 4, "corrupt|differs"),
        # fewer bytes than declared
        (_header(1 << 20) + _block(1, 16, True, b"\0"), 1 << 20, "corrupt|differs"),
        # reserved block type
        (_header(4) + _block(3, 4, True, b"\0\0\0\0"), 4, "reserved"),
        # no content size in the header (descriptor 0x00: window byte follows)
        (ZSTD_MAGIC + b"\x00\x50" + _block(1, 4, True, b"\0"), 4, "does not declare"),
        # a raw block claiming more bytes than the blob holds
        (_header(4) + _block(0, 1 << 20, True, b"abcd"), 4, "short|truncated"),
        # empty raw blocks past the declared size + 1
        (_header(2) + _block(0, 0, False) * 3 + _block(0, 2, True, b"ab"), 2, "more than 3 blocks"),
    ],
)
def test_lying_frames_are_codec_errors(frame: bytes, length: int, match: str) -> None:
    out = bytearray(length)
    with pytest.raises(CodecError, match=match):
        decompress_into(memoryview(frame), memoryview(out))


def test_random_damage_to_zstd_and_byteplanes_blobs_is_a_codec_error() -> None:
    """Every outcome of flipped, cut or extended stored bytes is a CodecError or the decoded bytes (which the CRC then
    judges); nothing else escapes."""
    import random

    x = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    rng = random.Random(20)
    for cid in ("zstd", "byteplanes"):
        c = codecs.get_codec(cid)
        stored = c.encode(memoryview(x.tobytes()), 4)
        refused = 0
        for _ in range(600):
            bad = bytearray(stored)
            r = rng.random()
            if r < 0.6:
                for _ in range(rng.randint(1, 3)):
                    bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            elif r < 0.8:
                bad = bad[: rng.randrange(len(bad))]
            else:
                bad += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            try:
                c.decode_new(memoryview(bytes(bad)), x.nbytes, 4)
            except CodecError:
                refused += 1
            except AdapterpackError as e:  # pragma: no cover - the failure the test is for
                pytest.fail(f"{cid}: {type(e).__name__}: {e}")
        assert refused > 100  # the rest decode (zstd without a checksum): the blob's CRC-32C judges them


def test_check_frame_refuses_without_allocating_the_claimed_size() -> None:
    """A 16-byte frame claiming 2^40 bytes is refused against a small index length before any buffer exists."""
    import tracemalloc

    frame = _header(1 << 40) + _block(1, 1, True, b"\0")
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="declares"):
            check_frame(memoryview(frame), 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10
    assert zstandard.frame_content_size(frame) == 1 << 40


# --- a legal blob too large for the process -----------------------------------------------------------


def _rle_bomb(blocks: int) -> bytes:
    """A valid zstd frame of ``blocks`` RLE blocks of 128 KiB of zeros (4 bytes each: the §7 ratio at its limit), not
    single-segment (a 128 KiB window), declaring its true content size."""
    content = blocks * (128 << 10)
    header = ZSTD_MAGIC + bytes([0xC0, 0x38]) + struct.pack("<Q", content)
    return header + b"".join(_block(1, 128 << 10, k == blocks - 1, b"\0") for k in range(blocks))


def test_a_blob_the_process_cannot_allocate_is_a_size_limit_error(tmp_path: Path) -> None:
    """A 64 KiB frame decodes, legally, to 2 GiB (32768 times): in a process capped below that, decoding it raised
    a bare MemoryError with an empty message (the CLI printed "out of memory ()"); now a SizeLimitError naming the
    decoded and stored sizes, through the reader with the file and blob named."""
    from tests.apack_builders import valid_parts, write
    from tests.test_memory_bounds import capped

    frame = _rle_bomb(1 << 14)
    content = (1 << 14) * (128 << 10)
    parts = valid_parts(tmp_path, "zstd")
    parts.set_blob(0, frame)
    parts.index["blobs"][0].update(dtype="float32", shape=[content // 4], length=content, codec={"id": "zstd"})
    path = write(tmp_path / "big.apack", parts.build())
    res = capped(
        """
        from adapterpack import codecs
        from adapterpack.container import ApackReader
        frame = open(sys.argv[2], "rb").read()
        for what, call in (
            ("codec", lambda: codecs.get_codec("zstd").decode_new(memoryview(frame), int(sys.argv[3]), 4)),
            ("reader", lambda: ApackReader(sys.argv[1]).read_blob(0)),
        ):
            try:
                call()
                print(what, "decoded")
            except BaseException as e:
                print(what, type(e).__name__, e)
        """,
        str(path),
        str(tmp_path / "frame.zst") if (tmp_path / "frame.zst").write_bytes(frame) else "",
        str(content),
        headroom_mib=512,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith(f"codec SizeLimitError out of memory decoding a zstd blob of {content} bytes"), lines
    assert lines[0].endswith(f"stored in {len(frame)} bytes)"), lines
    assert lines[1].startswith(f"reader SizeLimitError {path}: blob 0: out of memory decoding a zstd blob"), lines
