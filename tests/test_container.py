"""The container: checksum, preamble, alignment and padding accounting, zero-copy reads, atomic writes."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack import atomic
from adapterpack.adapter import Adapter, Module
from adapterpack.checksum import crc32c
from adapterpack.container import ApackReader
from adapterpack.container.index import blob_alignment, index_text, plan_offsets
from adapterpack.container.index import dumps as index_dumps
from adapterpack.container.preamble import (
    DATA_ALIGNMENT,
    FLAG_IMPLIED,
    FLAG_INDEX_ZSTD,
    FLAG_PACKED,
    MAGIC,
    MINOR,
    PREAMBLE_SIZE,
    Preamble,
    align_up,
    parse_preamble,
)
from adapterpack.container.reader import VerifyReport
from adapterpack.container.writer import write_apack
from adapterpack.errors import AdapterpackError, DuplicateNameError, IndexFormatError, RankError, RecordError
from tests.apack_builders import compressible_adapter, lora_module, small_adapter, split


def test_crc32c_known_answers() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # spec §8, the Castagnoli check value
    assert crc32c(b"") == 0
    assert crc32c(memoryview(b"123456789")) == 0xE3069283
    assert crc32c(b"\0" * 32) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xFF


def test_preamble_pack_parse() -> None:
    pre = Preamble(1, 0, 0x00010000, 1234, 0xCAFEBABE)
    raw = pre.pack()
    assert len(raw) == PREAMBLE_SIZE == 32
    assert raw[:8] == MAGIC == b"\x89APK\r\n\x1a\n"
    assert struct.unpack("<HHIQII", raw[8:]) == (1, 0, 0x00010000, 1234, 0xCAFEBABE, 0)
    assert parse_preamble(raw, 32 + 1234) == pre
    assert pre.data_start == align_up(32 + 1234, 256) == 1280


@pytest.mark.parametrize(
    ("x", "a", "want"), [(0, 256, 0), (1, 256, 256), (256, 256, 256), (257, 8, 264), (4095, 8, 4096), (9, 1, 9)]
)
def test_align_up(x: int, a: int, want: int) -> None:
    assert align_up(x, a) == want


def test_alignment_rule() -> None:
    assert [blob_alignment(n) for n in (0, 1, 4095, 4096, 1 << 30)] == [8, 8, 8, 256, 256]
    # 3 bytes; 5000 (large: 256-aligned); 10 (small: 8-aligned); 0; 4096 (large)
    assert plan_offsets([3, 5000, 10, 0, 4096]) == [0, 256, 5256, 5272, 5376]
    assert plan_offsets([]) == []
    assert plan_offsets([4096, 1]) == [0, 4096]


def _mixed_adapter() -> Adapter:
    """Blobs of 3 bytes, 8 KiB, 12 bytes, 0 bytes and 4 KiB: every alignment case."""
    rng = np.random.default_rng(5)
    m = Module(
        "big",
        "lora",
        (32, 64),
        {"rank": 32, "alpha": 8.0},
        {"A": rng.standard_normal((32, 64)).astype(np.float32), "B": rng.standard_normal((32, 32)).astype(np.float32)},
    )
    tensors = {
        "bytes3": np.array([1, 2, 3], np.uint8),
        "big": rng.standard_normal((32, 64)).astype(np.float32),
        "three": np.array([1.0, -0.0, np.nan], np.float32),
        "empty": np.zeros((0, 7), np.float64),
        "page": rng.standard_normal(1024).astype(np.float32),
    }
    return Adapter(modules={"big": m}, tensors=tensors)


@pytest.mark.parametrize("compact", [True, False], ids=["1.3", "1.2-layout"])
@pytest.mark.parametrize("codec", ["raw", "zstd", "byteplanes"])
def test_layout_alignment_and_padding_accounting(tmp_path: Path, codec: str, compact: bool) -> None:
    """spec §1.2: raw blobs aligned (256, or 8 under 4096 bytes); compressed blobs packed in a compact (1.3) file,
    aligned like raw ones without ``compact``; the index compressed where compressed blobs are (never in a raw-only file)."""
    path = tmp_path / "mixed.apack"
    result = write_apack(path, _mixed_adapter(), codec=codec, compact=compact)
    raw = path.read_bytes()
    parts = split(raw)
    length = struct.unpack_from("<Q", raw, 16)[0]
    flags = struct.unpack_from("<I", raw, 12)[0]
    data_start = align_up(32 + length, DATA_ALIGNMENT)
    blobs = parts.index["blobs"]
    packed = compact and any(b["codec"]["id"] != "raw" for b in blobs)
    assert flags == (FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED if packed else 0)  # raw blobs only: plain index, 1.2 layout
    assert raw[32:36] == (b"\x28\xb5\x2f\xfd" if packed else b'{"wr')
    assert result.index_text_length == len(index_text(raw[32 : 32 + length], packed))

    assert result.file_size == len(raw) == data_start + blobs[-1]["offset"] + blobs[-1]["stored_length"]
    assert result.index_length == length and result.blobs == len(blobs) == 7
    assert result.stored_bytes == sum(b["stored_length"] for b in blobs)
    assert result.decoded_bytes == sum(b["length"] for b in blobs)
    assert result.padding == len(raw) - 32 - length - result.stored_bytes
    assert raw[32 + length : data_start] == b"\0" * (data_start - 32 - length)

    end = 0
    for b in blobs:
        a = 256 if b["stored_length"] >= 4096 else 8
        if packed and b["codec"]["id"] != "raw":
            a = 1
        assert b["offset"] == align_up(end, a)  # exactly the padding alignment requires
        assert parts.data[end : b["offset"]] == b"\0" * (b["offset"] - end)
        end = b["offset"] + b["stored_length"]
    is_raw = [b["codec"]["id"] == "raw" for b in blobs]
    assert [b["offset"] for b in blobs] == plan_offsets([b["stored_length"] for b in blobs], is_raw if packed else None)
    if packed:
        assert result.padding < sum(blob_alignment(b["stored_length"]) for b in blobs if b["codec"]["id"] == "raw") + 256

    reader = ApackReader(path)
    assert reader.data_start == data_start and reader.file_size == len(raw)
    assert reader.version == f"1.{MINOR}" and reader.preamble.packed == packed
    assert reader.verify().ok
    for i, b in enumerate(reader.blobs):
        arr = reader.read_blob(i)
        if b.codec_id == "raw":  # raw views into the mmap are aligned to their blob's alignment
            assert arr.ctypes.data % blob_alignment(b.stored_length) == 0 or arr.size == 0


def test_raw_reads_are_zero_copy_and_read_only(tmp_path: Path) -> None:
    path = tmp_path / "raw.apack"
    write_apack(path, _mixed_adapter(), codec="raw")
    reader = ApackReader(path)
    whole = np.frombuffer(reader._mm, dtype=np.uint8)
    big = reader.read_blob(0)
    assert np.shares_memory(big, whole)
    assert not big.flags.writeable and not big.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        big[0, 0] = 1.0
    again = reader.read_blob(0)
    assert again.ctypes.data == big.ctypes.data  # the same bytes of the map, not a copy
    ad = reader.adapter()
    assert np.shares_memory(ad.module("big").array("A"), whole)
    # compressed blobs decode into their own buffer
    zpath = tmp_path / "z.apack"
    write_apack(zpath, _mixed_adapter(), codec="zstd")
    zr = ApackReader(zpath)
    assert zr.blobs[0].codec_id == "zstd"
    assert not np.shares_memory(zr.read_blob(0), np.frombuffer(zr._mm, dtype=np.uint8))


def test_views_outlive_close(tmp_path: Path) -> None:
    path = tmp_path / "raw.apack"
    write_apack(path, small_adapter(), codec="raw")
    reader = ApackReader(path)
    a = reader.read_blob(0)
    reader.close()
    assert a.tobytes() == small_adapter().modules["layers.0.q_proj"].tensors["A"].tobytes()
    with pytest.raises(AdapterpackError, match="file is closed"):
        reader.read_blob(1)
    with pytest.raises(AdapterpackError, match="file is closed"):
        reader.verify()


def test_writing_is_deterministic(tmp_path: Path) -> None:
    for codec in ("raw", "zstd", "byteplanes"):
        write_apack(tmp_path / "1.apack", compressible_adapter(), codec=codec)
        write_apack(tmp_path / "2.apack", compressible_adapter(), codec=codec)
        assert (tmp_path / "1.apack").read_bytes() == (tmp_path / "2.apack").read_bytes()


def test_adapter_without_blobs_ends_at_the_data_section(tmp_path: Path) -> None:
    path = tmp_path / "empty.apack"
    result = write_apack(path, Adapter(name="empty", metadata={"note": "nothing yet"}))
    assert result.blobs == 0 and result.file_size == path.stat().st_size
    assert result.file_size % 256 == 0 and result.file_size == align_up(32 + result.index_length, 256)
    got = adapterpack.open(path)
    assert got.name == "empty" and len(got) == 0 and got.metadata == {"note": "nothing yet"}


# --- atomic writes -----------------------------------------------------------------------------------


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_leaves_only_the_destination(tmp_path: Path) -> None:
    write_apack(tmp_path / "out.apack", small_adapter())
    assert _listing(tmp_path) == ["out.apack"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_crash_mid_write_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    """An exception after some blobs were encoded (from the progress callback): no file, no temp."""
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise exc

    with pytest.raises(type(exc)):
        write_apack(tmp_path / "out.apack", compressible_adapter(), progress=progress)
    assert _listing(tmp_path) == []


def test_crash_at_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out.apack"
    write_apack(dest, small_adapter())
    before = dest.read_bytes()
    seen: list[tuple[str, str]] = []

    def failing_replace(src: str, dst: str) -> None:
        seen.append((str(src), str(dst)))
        assert Path(src).stat().st_size > 0  # the new file was fully written before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_apack(dest, compressible_adapter(), codec="zstd")
    monkeypatch.undo()
    assert seen and seen[0][1] == str(dest) and Path(seen[0][0]).parent == tmp_path
    assert dest.read_bytes() == before  # untouched
    assert _listing(tmp_path) == ["out.apack"]  # temp removed
    assert ApackReader(dest).verify().ok


def test_crash_mid_write_keeps_an_existing_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.apack"
    write_apack(dest, small_adapter())
    before = dest.read_bytes()

    def progress(n: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_apack(dest, compressible_adapter(), progress=progress)
    assert dest.read_bytes() == before and _listing(tmp_path) == ["out.apack"]


def test_invalid_record_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    bad = lora_module("m")
    bad.params["rank"] = 5
    with pytest.raises(RankError, match="rank 5 does not fit"):
        write_apack(tmp_path / "bad.apack", Adapter(modules={"m": bad}))
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("unnamed", [True, False])
def test_temp_file_lives_beside_the_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool) -> None:
    """The temp file is created in the destination's folder (unnamed with O_TMPFILE, else under a temp
    name), so the final link or rename never crosses filesystems."""
    if unnamed and not atomic._TMPFILE:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(atomic, "_TMPFILE", unnamed)
    sub = tmp_path / "sub"
    sub.mkdir()
    made: list[Path] = []
    real_open = atomic.os.open

    def spy(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):  # written (the unnamed file is also read where it must be copied)
            made.append(Path(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "open", spy)
    write_apack(sub / "x.apack", small_adapter())
    assert made == [sub] if unnamed else (len(made) == 1 and made[0].parent == sub)
    assert _listing(sub) == ["x.apack"]


def test_written_file_gets_the_usual_mode(tmp_path: Path) -> None:
    """Not mkstemp's 0o600: a saved adapter is as readable as any file the user creates."""
    old = os.umask(0o027)
    try:
        write_apack(tmp_path / "m.apack", small_adapter())
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    assert (tmp_path / "m.apack").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o640


def test_big_endian_and_strided_inputs_are_stored_little_endian_c_order(tmp_path: Path) -> None:
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    b = np.arange(8, dtype=">i8")[::2]
    c = np.arange(12, dtype=np.float16).reshape(3, 4).T
    adapterpack.save(Adapter(tensors={"a": a, "b": b, "c": c}), tmp_path / "x.apack", codec="raw")
    got = adapterpack.open(tmp_path / "x.apack")
    for name, want in (("a", a), ("b", b), ("c", c)):
        arr = got.tensors[name].load()
        assert arr.dtype.byteorder in ("<", "=", "|") and arr.dtype == want.dtype.newbyteorder("<")
        np.testing.assert_array_equal(arr, want)


# --- the writer refuses what the reader would refuse (spec §2: a writer MUST NOT write such an index) ---


def _one(mod: Module | None = None, **adapter: object) -> Adapter:
    mod = mod or lora_module("m")
    return Adapter(**({"modules": {mod.name: mod}} | adapter))  # type: ignore[arg-type]


def _dora(length: int) -> Module:
    m = lora_module("m", out_f=4)
    m.params["dora"] = True
    m.tensors["magnitude"] = np.ones(length, np.float32)
    return m


WRITE_REFUSALS = [
    ("module-name-1025", lambda: _one(lora_module("x" * 1025)), IndexFormatError, r"'name' must be 1–1024 characters"),
    ("module-name-empty", lambda: _one(lora_module("")), IndexFormatError, r"'name' must be 1–1024 characters"),
    ("adapter-name-empty", lambda: _one(name=""), IndexFormatError, r"adapter 0: 'name' must be 1–256 characters"),
    ("adapter-name-257", lambda: _one(name="é" * 257), IndexFormatError, r"adapter 0: 'name' must be 1–256 characters"),
    ("tensor-name-empty", lambda: _one(tensors={"": np.zeros(2, np.float32)}), IndexFormatError, r"tensor 0: 'name' must be"),
    (
        "tensor-9-dims",
        lambda: _one(tensors={"t": np.zeros((1,) * 9, np.float32)}),
        IndexFormatError,
        r"blob 2: 9 dimensions exceed the limit of 8",
    ),
    ("dora-magnitude-length", lambda: _one(_dora(5)), RecordError, r"magnitude must be a float vector of B's 4 rows"),
    ("source-object", lambda: _one(source={"k": [1, object()]}), IndexFormatError, r"adapters\[0\]\.source\.k\[1\] is a object"),
    ("source-nan", lambda: _one(source={"x": float("nan")}), IndexFormatError, r"index\.adapters\[0\]\.source\.x = nan"),
    ("source-array", lambda: _one(source={"a": np.zeros(2)}), IndexFormatError, r"source\.a is a ndarray"),
    (
        "source-key-collision",
        lambda: _one(source={1: "a", "1": "b"}),  # JSON turns the int key into "1": two "1" keys
        DuplicateNameError,
        r"key '1' twice",
    ),
]


@pytest.mark.parametrize(("make", "error", "match"), [c[1:] for c in WRITE_REFUSALS], ids=[c[0] for c in WRITE_REFUSALS])
def test_writer_refuses_what_the_reader_refuses(tmp_path: Path, make: Any, error: type, match: str) -> None:
    with pytest.raises(AdapterpackError) as info:
        write_apack(tmp_path / "w.apack", make())
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(match, str(info.value)), str(info.value)
    assert _listing(tmp_path) == []


def test_writer_accepts_the_limits_in_code_points(tmp_path: Path) -> None:
    """1024- and 256-code-point names of 2-byte characters (2048 and 512 UTF-8 bytes) are within the limits."""
    ad = _one(lora_module("é" * 1024), name="ü" * 256, tensors={"ß" * 1024: np.zeros(1, np.float32)})
    write_apack(tmp_path / "w.apack", ad)
    back = adapterpack.open(tmp_path / "w.apack")
    assert back.name == "ü" * 256 and list(back.modules) == ["é" * 1024] and list(back.tensors) == ["ß" * 1024]


def test_numpy_scalars_are_written_as_json_numbers(tmp_path: Path) -> None:
    """np.int64 shapes and numpy scalars in params/source become plain JSON ints, floats and bools."""
    m = lora_module("m")
    m.base_shape = tuple(np.int64(d) for d in m.base_shape)
    m.params.update(rank=np.int64(2), alpha=np.float32(4.0), rslora=np.bool_(False))
    ad = _one(m, source={"n": np.int32(7), "f": np.float64(0.5), "b": np.bool_(True), "l": [np.uint8(3)]})
    write_apack(tmp_path / "w.apack", ad)
    index = split((tmp_path / "w.apack").read_bytes()).index
    entry = index["adapters"][0]
    assert entry["modules"][0]["base_shape"] == [4, 6]
    assert entry["modules"][0]["params"] == {"rank": 2, "alpha": 4.0, "rslora": False}
    assert entry["source"] == {"n": 7, "f": 0.5, "b": True, "l": [3]}
    assert type(entry["source"]["n"]) is int and type(entry["source"]["b"]) is bool
    back = adapterpack.open(tmp_path / "w.apack")
    assert np.array_equal(back.delta("m"), m.delta())


def test_dumps_names_the_key_of_a_value_json_cannot_hold() -> None:
    with pytest.raises(IndexFormatError, match=r"cannot write index: index\.a\.b\[0\] is a set") as info:
        index_dumps({"a": {"b": [{1, 2}]}})
    assert type(info.value) is IndexFormatError
    assert index_dumps({"x": [np.int16(-3), np.float16(0.5), np.bool_(False)]}) == b'{"x":[-3,0.5,false]}'


def test_verify_report_ok_follows_its_problems() -> None:
    report = VerifyReport(path="p")
    assert report.ok and report.as_dict()["ok"] is True
    report.problems.append("padding before blob 1 is not zero")
    assert not report.ok and report.as_dict() == {
        "path": "p",
        "ok": False,
        "problems": ["padding before blob 1 is not zero"],
        "blobs": 0,
        "bytes_checked": 0,
        "skipped": [],
        "version": "",
    }


def test_import_does_not_load_crc32c() -> None:
    """The crc32c package costs ~17 ms to import (importlib.metadata, its CLI); it loads on the first checksum."""
    code = "import sys, adapterpack; assert 'crc32c' not in sys.modules; from adapterpack.checksum import crc32c; "
    code += "assert crc32c(b'123456789') == 0xE3069283 and 'crc32c' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
