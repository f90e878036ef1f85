"""Review round: hostile ``pco`` blobs (spec/format.md §5.4) built from the bundled example saved with ``codec="pco"``.

Every failure must be a CodecError (pcodec raises RuntimeError, and a Rust panic is pyo3's PanicException, a
BaseException), memory stays bounded by the index's length (pcodec's own allocations are invisible to tracemalloc,
so those checks run in a subprocess and read ru_maxrss), and a damaged blob in a file is never returned when verifying.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pcodec
import pytest

import adapterpack
from adapterpack import codecs
from adapterpack.codecs import pco
from adapterpack.container import ApackReader
from adapterpack.container.writer import write_apack
from adapterpack.errors import AdapterpackError, ChecksumError, CodecError
from adapterpack.examples import example_path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pco") / "example.apack"
    write_apack(path, adapterpack.open(example_path()), codec="pco")
    return path


def _blob(path: Path, i: int) -> tuple[bytes, bytes, int]:
    """Stored bytes, decoded bytes and itemsize of blob ``i`` of a file."""
    with ApackReader(path) as r:
        b = r.blobs[i]
        raw = path.read_bytes()
        stored = raw[r.data_start + b.offset : r.data_start + b.offset + b.stored_length]
        return stored, r.read_blob(i).tobytes(), np.dtype(r.read_blob(i).dtype).itemsize


def _largest(path: Path) -> int:
    with ApackReader(path) as r:
        assert {b.codec["id"] for b in r.blobs} == {"pco"}
        return max(range(len(r.blobs)), key=lambda i: r.blobs[i].stored_length)


def _mutate(rng: random.Random, stored: bytes) -> bytes:
    bad = bytearray(stored)
    op = rng.random()
    if op < 0.5:  # flips and overwrites, half of them in the header and first chunk metadata
        limit = 64 if rng.random() < 0.5 else len(bad)
        for _ in range(rng.randint(1, 3)):
            p = rng.randrange(min(limit, len(bad)))
            if rng.random() < 0.5:
                bad[p] ^= 1 << rng.randrange(8)
            else:
                bad[p] = rng.randrange(256)
    elif op < 0.7:
        bad = bad[: rng.randrange(len(bad))]
    elif op < 0.8:
        bad += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op < 0.9:
        p = rng.randrange(len(bad))
        bad[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        p = rng.randrange(len(bad))
        del bad[p : p + rng.randint(1, 8)]
    return bytes(bad)


def test_thousands_of_random_edits_of_a_real_pco_blob_are_codec_errors(saved: Path) -> None:
    """3,000 seeded edits of the example's largest pco blob (float32) and of the same values in bfloat16, some read
    against a lying element count: each is refused with CodecError or decodes (the blob CRC then judges it)."""
    stored32, decoded32, k = _blob(saved, _largest(saved))
    assert k == 4
    x16 = np.frombuffer(decoded32, np.float32).astype(ml_dtypes.bfloat16)
    stored16 = codecs.get_codec("pco").encode(memoryview(x16.tobytes()), 2)
    cases = [(stored32, decoded32, 4), (stored16, x16.tobytes(), 2)]
    c = codecs.get_codec("pco")
    rng = random.Random(2026)
    outcomes = {"refused": 0, "same": 0, "other": 0}
    start = time.perf_counter()
    for it in range(3000):
        stored, decoded, itemsize = cases[it % 2]
        bad = _mutate(rng, stored)
        n = len(decoded) // itemsize
        length = len(decoded) if rng.random() < 0.8 else itemsize * rng.choice([1, 255, 256, 257, n - 1, n + 1, 2 * n])
        try:
            out = c.decode_new(memoryview(bad), length, itemsize)
        except CodecError:
            outcomes["refused"] += 1
            continue
        except BaseException as e:  # any other escape is the failure this test is for
            pytest.fail(f"edit {it}: {type(e).__name__}: {e}")
        assert len(out) == length
        outcomes["same" if bytes(out) == decoded else "other"] += 1
    assert outcomes["refused"] > 2000, outcomes
    assert time.perf_counter() - start < 60  # (a few seconds here; a loop in the decoder would blow this)


def test_damaged_pco_blob_in_a_file_is_never_returned_when_verifying(saved: Path, tmp_path: Path) -> None:
    """Flipped bits inside a pco blob of a file: reading it raises CodecError or ChecksumError, never other bytes."""
    i = _largest(saved)
    raw = saved.read_bytes()
    with ApackReader(saved) as r:
        start, size, good = r.data_start + r.blobs[i].offset, r.blobs[i].stored_length, r.read_blob(i).tobytes()
    rng = random.Random(7)
    seen = set()
    for _ in range(150):
        bad = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            bad[start + rng.randrange(size)] ^= 1 << rng.randrange(8)
        path = tmp_path / "bad.apack"
        path.write_bytes(bytes(bad))
        with ApackReader(path) as r:
            try:
                got = r.read_blob(i).tobytes()
            except (CodecError, ChecksumError) as e:
                seen.add(type(e).__name__)
                continue
            assert got == good  # a flip Pco never reads (padding bits of the last byte) changes nothing
    assert seen == {"CodecError", "ChecksumError"}


def _compress(r: np.ndarray, mode: object, delta: object) -> tuple[bytes, bytes, bytes]:
    fc = pcodec.wrapped.FileCompressor()
    header = fc.write_header()
    cfg = pcodec.ChunkConfig(
        compression_level=8, mode_spec=mode, delta_spec=delta, paging_spec=pcodec.PagingSpec.exact_page_sizes([len(r)])
    )
    cc = fc.chunk_compressor(r, cfg)
    return header, cc.write_meta(), cc.write_page(0)


def _values(saved: Path) -> np.ndarray:
    x = np.frombuffer(_blob(saved, _largest(saved))[1], np.float32).copy()
    x[::3] = x[0]  # a repeated value: something for the dict mode and the lookback delta to find
    return x


MODES = {
    "dict": (pcodec.ModeSpec.try_dict(), pcodec.DeltaSpec.no_op()),
    "int_mult": (pcodec.ModeSpec.try_int_mult(2), pcodec.DeltaSpec.no_op()),
    "lookback": (pcodec.ModeSpec.classic(), pcodec.DeltaSpec.try_lookback()),
    "consecutive": (pcodec.ModeSpec.classic(), pcodec.DeltaSpec.try_consecutive(3)),
    "conv1": (pcodec.ModeSpec.classic(), pcodec.DeltaSpec.try_conv1(4)),
    "auto": (pcodec.ModeSpec.auto(), pcodec.DeltaSpec.auto()),
}


@pytest.mark.parametrize("name", list(MODES))
def test_any_pco_mode_and_delta_is_read(saved: Path, name: str) -> None:
    """Odd but legal (§5.4: any Pco mode and delta encoding valid for the number type): another writer's choices."""
    x = _values(saved)
    header, meta, page = _compress(pco.rotate(x.view("<u4")), *MODES[name])
    got = codecs.get_codec("pco").decode_new(memoryview(header + meta + page), x.nbytes, 4)
    assert bytes(got) == x.tobytes()


def _set_bits(data: bytes, start: int, width: int, value: int) -> bytes:
    """``data`` with bits ``[start, start + width)`` (LSB first, Pco's bit order) set to ``value``."""
    v = int.from_bytes(data, "little")
    v = (v & ~(((1 << width) - 1) << start)) | (value << start)
    return v.to_bytes(len(data), "little")


def _hostile_metas(saved: Path) -> dict[str, tuple[bytes, int]]:
    """Stored bytes (header, metadata with one field rewritten, page) and the decoded length they are read against."""
    x = _values(saved)
    r = pco.rotate(x.view("<u4"))
    out: dict[str, tuple[bytes, int]] = {}
    h, m, p = _compress(r, *MODES["lookback"])
    # chunk metadata: mode (4 bits), delta variant (4), lookback window_n_log - 1 (5), state_n_log (4)
    assert m[0] >> 4 == 2
    out["lookback window 2^32"] = (h + _set_bits(m, 8, 5, 31) + p, x.nbytes)
    out["lookback state past window"] = (h + _set_bits(_set_bits(m, 8, 5, 0), 13, 4, 15) + p, x.nbytes)
    h, m, p = _compress(r, *MODES["dict"])
    # dict mode: mode variant 4, then the dictionary length in 25 bits
    assert m[0] & 15 == 4
    out["dict of 2^25 - 1 entries"] = (h + _set_bits(m, 4, 25, (1 << 25) - 1) + p, x.nbytes)
    h, m, p = _compress(r, *MODES["consecutive"])
    out["consecutive order 0"] = (h + _set_bits(m, 8, 3, 0) + p, x.nbytes)
    h, m, p = _compress(r, pcodec.ModeSpec.classic(), pcodec.DeltaSpec.no_op())
    # classic, no delta: byte 1 on is the primary latent: ans_size_log (4 bits), n_bins (15), then the bins
    out["2^15 - 1 bins"] = (h + _set_bits(m, 12, 15, (1 << 15) - 1) + p, x.nbytes)
    out["ans size log 15"] = (h + _set_bits(m, 8, 4, 15) + p, x.nbytes)
    out["no bins"] = (h + _set_bits(m, 12, 15, 0) + p, x.nbytes)
    out["page read as 2^22 elements"] = (h + m + p, 4 << 22)  # the index asks for more than the page holds
    return out


def test_hostile_chunk_metadata_is_refused_with_bounded_memory(saved: Path, tmp_path: Path) -> None:
    """Metadata declaring huge windows, dictionaries or bin counts on a 15 KB blob: CodecError, and the process's peak
    RSS stays within the output buffer plus a few MiB (pcodec allocates outside tracemalloc's view)."""
    cases = _hostile_metas(saved)
    small = {k: v for k, v in cases.items() if v[1] < 1 << 20}
    script = """
import json, resource, sys
from adapterpack.codecs import get_codec
from adapterpack.errors import CodecError
cases = json.load(open(sys.argv[1]))
c = get_codec("pco")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = {}
for name, (stored, length) in cases.items():
    try:
        c.decode_new(memoryview(bytes.fromhex(stored)), length, 4)
        result[name] = "decoded"
    except CodecError as e:
        result[name] = "CodecError"
    except BaseException as e:
        result[name] = type(e).__name__ + ": " + str(e)[:200]
result["grew_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024
print(json.dumps(result))
"""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({k: (s.hex(), n) for k, (s, n) in small.items()}))
    run = subprocess.run([sys.executable, "-c", script, str(spec)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    grew = result.pop("grew_mib")
    assert result == dict.fromkeys(small, "CodecError"), result
    assert grew < 64, grew
    # a page of the file's 4,608 elements read as 2^22: refused (the output buffer is the index's, nothing more)
    stored, length = cases["page read as 2^22 elements"]
    with pytest.raises(CodecError, match=r"chunk 0 page"):
        codecs.get_codec("pco").decode(memoryview(stored), memoryview(bytearray(length)), 4)


def test_more_chunks_or_fewer_than_the_index_implies(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream cut into chunks of another size than §5.4's is refused whichever way it differs."""
    x = _values(saved)
    c = codecs.get_codec("pco")
    monkeypatch.setattr(pco, "CHUNK", 1000)
    five = c.encode(memoryview(x.tobytes()), 4)  # 4,608 elements: 5 chunks of 1,000 and 608
    monkeypatch.setattr(pco, "CHUNK", 1 << 22)
    one = c.encode(memoryview(x.tobytes()), 4)
    with pytest.raises(CodecError, match=r"^pco: "):
        c.decode_new(memoryview(five), x.nbytes, 4)
    monkeypatch.setattr(pco, "CHUNK", 1000)
    with pytest.raises(CodecError, match=r"^pco: "):
        c.decode_new(memoryview(one), x.nbytes, 4)
    assert bytes(c.decode_new(memoryview(five), x.nbytes, 4)) == x.tobytes()
    with pytest.raises(CodecError, match=r"trailing bytes|chunk 4"):
        c.decode_new(memoryview(five), 4 * 4000, 4)  # the index implies 4 chunks: the fifth is left over


def test_errors_are_adapterpack_errors_through_the_reader(saved: Path, tmp_path: Path) -> None:
    """A pco blob replaced by garbage of the same length (index untouched): the reader names the blob, CodecError."""
    i = _largest(saved)
    raw = bytearray(saved.read_bytes())
    with ApackReader(saved) as r:
        start, size = r.data_start + r.blobs[i].offset, r.blobs[i].stored_length
    raw[start : start + size] = random.Random(1).randbytes(size)
    path = tmp_path / "garbage.apack"
    path.write_bytes(bytes(raw))
    with ApackReader(path) as r:
        with pytest.raises(CodecError, match=rf"blob {i}: pco: "):
            r.read_blob(i)
        report = r.verify()
    assert not report.ok and any(f"blob {i}" in p for p in report.problems)
    ad = adapterpack.open(path)  # opening reads no blob; loading every tensor reaches the garbage
    with pytest.raises(AdapterpackError):
        for m in ad.modules.values():
            for t in m.tensors.values():
                t.load()


def test_out_of_memory_while_decoding_is_not_reported_as_corruption(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError under pco (the page copy, or pcodec's own allocation) is not 'corrupt': decode_new reports it as
    a SizeLimitError naming the sizes; the file may be fine."""
    from adapterpack.errors import SizeLimitError

    stored, decoded, _ = _blob(saved, _largest(saved))

    class Starved:
        @staticmethod
        def new(src: bytes) -> None:
            raise MemoryError

    monkeypatch.setattr(pco._lib().wrapped, "FileDecompressor", Starved)
    with pytest.raises(SizeLimitError, match=rf"out of memory decoding a pco blob of {len(decoded)} bytes"):
        codecs.get_codec("pco").decode_new(memoryview(stored), len(decoded), 4)


@pytest.mark.parametrize("level", [True, False, 13, -1, 2.0, "3"])
def test_a_level_pco_does_not_have_is_recorded_as_the_default(level: object) -> None:
    """The index records the level actually used: a bool (an int to Python) was recorded as JSON true/false."""
    assert codecs.get_codec({"id": "pco", "level": level}).get_config() == {"id": "pco", "level": pco.DEFAULT_LEVEL}
    assert pco.Pco(level=level).get_config()["level"] == pco.DEFAULT_LEVEL  # type: ignore[arg-type]
