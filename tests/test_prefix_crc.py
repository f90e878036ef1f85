"""Rank-prefix reads are checked: prefix CRC checkpoints on raw svd blobs (spec/format.md §2.1, §8; spec/svd.md §3).

Every route that opens a file at a rank (``adapterpack.open(rank=j)``, ``convert --rank j``,
``adapterpack.torch.load(rank=j)``) must refuse a damaged byte among the rows it uses, never
return a changed ΔW; files without checkpoints (1.1) are read whole at a rank, their CRC checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.cli import main
from adapterpack.container import ApackReader
from adapterpack.container import reader as reader_module
from adapterpack.container.preamble import MINOR
from adapterpack.container.prefix import KEY, prefix_crcs
from adapterpack.encodings.lower import adapter_at_rank
from adapterpack.errors import AdapterpackError, ChecksumError, IndexFormatError
from adapterpack.ops.convert import convert
from tools.make_vectors import _craft

NAME = "model.layers.0.self_attn.q_proj"
OUT, IN, K = 16, 24, 8
RANK = 3  # its checkpoint is 4 rows


def svd_adapter() -> Adapter:
    """One float32 svd record of rank 8 on a 16×24 weight."""
    rng = np.random.default_rng(5)
    ut = np.linalg.qr(rng.standard_normal((OUT, K)))[0].T.astype(np.float32)
    vt = np.linalg.qr(rng.standard_normal((IN, K)))[0].T.astype(np.float32)
    s = np.linspace(2.0, 0.25, K).astype(np.float32)
    return Adapter("default", modules={NAME: Module(NAME, "svd", (OUT, IN), {"rank": K}, {"S": s, "Ut": ut, "Vt": vt})})


@pytest.fixture
def svd_file(tmp_path: Path) -> Path:
    path = tmp_path / "svd.apack"
    adapterpack.save(svd_adapter(), path, codec="raw")
    return path


def slots(path: Path) -> dict[str, tuple[int, int, int]]:
    """slot -> (blob index, absolute offset, bytes per row) of the svd record."""
    with ApackReader(path) as r:
        refs = r.index.adapters[0]["modules"][0]["tensors"]
        return {s: (i, r.data_start + r.blobs[i].offset, r.blobs[i].length // r.blobs[i].shape[0]) for s, i in refs.items()}


def flip(path: Path, pos: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _open(path: Path, scratch: Path) -> np.ndarray:
    with adapterpack.open(path, rank=RANK) as ad:
        return np.array(ad.delta(NAME))


def _convert(path: Path, scratch: Path) -> np.ndarray:
    out = scratch / "out.apack"
    convert(path, out, rank=RANK, codec="raw", force=True)
    with adapterpack.open(out) as ad:
        return np.array(ad.delta(NAME))


def _torch(path: Path, scratch: Path) -> np.ndarray:
    at = pytest.importorskip("adapterpack.torch")
    return at.materialize(at.load(path, rank=RANK)[NAME]).numpy()


ROUTES: dict[str, Callable[[Path, Path], np.ndarray]] = {"open": _open, "convert": _convert, "torch": _torch}


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_flip_in_the_rows_a_rank_read_uses_is_refused(svd_file: Path, tmp_path: Path, route: str) -> None:
    """Bits of S[:j] and the first j rows of Ut and Vt (a dense sample: every 5th bit, all 8 bit positions)."""
    read = ROUTES[route]
    clean = read(svd_file, tmp_path)
    np.testing.assert_allclose(clean, _best_rank(RANK), rtol=0, atol=1e-5)
    original = svd_file.read_bytes()
    positions = [(start + b // 8, b % 8) for _, start, row in slots(svd_file).values() for b in range(0, RANK * row * 8, 5)]
    assert len(positions) > 700
    outcomes: dict[str, int] = {"refused": 0, "other error": 0, "unchanged": 0, "silent change": 0}
    for pos, bit in positions:
        flip(svd_file, pos, bit)
        try:
            got = read(svd_file, tmp_path)
        except AdapterpackError as e:
            outcomes["refused" if type(e) is ChecksumError else "other error"] += 1
        else:
            outcomes["unchanged" if got.tobytes() == clean.tobytes() else "silent change"] += 1
        svd_file.write_bytes(original)
    assert outcomes == {"refused": len(positions), "other error": 0, "unchanged": 0, "silent change": 0}


def _best_rank(j: int) -> np.ndarray:
    m = svd_adapter().modules[NAME]
    t = {k: v.astype(np.float64) for k, v in m.tensors.items()}
    return (t["Ut"][:j].T * t["S"][:j]) @ t["Vt"][:j]


def test_convert_cli_refuses_a_damaged_prefix(svd_file: Path, tmp_path: Path) -> None:
    _, start, _ = slots(svd_file)["Vt"]
    flip(svd_file, start + 5, 3)
    dst = tmp_path / "cut.apack"
    r = CliRunner().invoke(main, ["convert", str(svd_file), str(dst), "--rank", str(RANK)])
    assert r.exit_code == 1 and "checksum mismatch" in r.output, r.output
    assert not dst.exists()


def _recorder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Lengths of every buffer the reader computes a CRC-32C of."""
    seen: list[int] = []
    real = reader_module.crc32c

    def crc(data: Any) -> int:
        seen.append(memoryview(data).nbytes)
        return real(data)

    monkeypatch.setattr(reader_module, "crc32c", crc)
    return seen


@pytest.mark.parametrize(("rank", "rows"), [(1, 1), (2, 2), (3, 4), (4, 4)])
def test_a_prefix_read_touches_only_its_checkpoint(svd_file: Path, monkeypatch: pytest.MonkeyPatch, rank: int, rows: int) -> None:
    """Ut and Vt are checked over their first ``rows`` rows and never read whole; S (k numbers) is read whole."""
    s = slots(svd_file)
    reader = ApackReader(svd_file)
    whole: list[int] = []
    real_read = ApackReader.read_blob
    monkeypatch.setattr(ApackReader, "read_blob", lambda self, i: whole.append(i) or real_read(self, i))
    seen = _recorder(monkeypatch)
    m = adapter_at_rank(reader.adapter(), rank).module(NAME)
    np.testing.assert_allclose(m.delta(), _best_rank(rank), rtol=0, atol=1e-5)
    assert whole == [s["S"][0]]
    assert sorted(seen) == sorted([K * 4, rows * s["Ut"][2], rows * s["Vt"][2]])
    assert reader._verified_rows == {s["Ut"][0]: rows, s["Vt"][0]: rows}
    assert reader._verified == {s["S"][0]}
    m.delta()  # a second read checks nothing again
    assert len(seen) == 3


def test_a_rank_past_the_last_checkpoint_reads_the_whole_blob(svd_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = slots(svd_file)
    with adapterpack.open(svd_file, rank=5) as ad:  # next power of two is 8 = k: the whole-blob CRC
        seen = _recorder(monkeypatch)
        np.testing.assert_allclose(ad.delta(NAME), _best_rank(5), rtol=0, atol=1e-5)
    assert sorted(seen) == sorted([K * 4, K * s["Ut"][2], K * s["Vt"][2]])


def test_writer_gives_checkpoints_to_raw_ut_vt_only(svd_file: Path, tmp_path: Path) -> None:
    s = slots(svd_file)
    data = svd_file.read_bytes()
    with ApackReader(svd_file) as r:
        assert r.version == f"1.{MINOR}"
        assert r.blobs[s["S"][0]].prefix_crc32c == ()
        for slot in ("Ut", "Vt"):
            b = r.blobs[s[slot][0]]
            _, start, row = s[slot]
            assert len(b.prefix_crc32c) == 3  # rows 1, 2, 4 of 8
            assert [reader_module.crc32c(data[start : start + (1 << m) * row]) for m in range(3)] == list(b.prefix_crc32c)
        assert r.verify().ok
    packed = tmp_path / "packed.apack"
    sparse = {"S": np.ones(K, np.float32), "Ut": np.eye(K, OUT, dtype=np.float32), "Vt": np.eye(K, IN, dtype=np.float32)}
    adapterpack.save(Adapter("default", modules={NAME: Module(NAME, "svd", (OUT, IN), {"rank": K}, sparse)}), packed, codec="zstd")
    with ApackReader(packed) as r:
        assert {b.codec_id for b in r.blobs if b.shape[0] == K and len(b.shape) == 2} == {"zstd"}
        assert all(b.prefix_crc32c == () for b in r.blobs)  # compressed blobs are decoded whole on a prefix read


def _strip_checkpoints(index: dict[str, Any]) -> None:
    for b in index["blobs"]:
        b.pop(KEY, None)


def test_a_1_1_file_opens_at_a_rank_with_the_whole_blob_crc(svd_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without checkpoints: a rank-j read reads each blob whole and checks its CRC (even a damaged unused row is refused)."""
    _craft(svd_file, _strip_checkpoints, minor=1)
    s = slots(svd_file)
    with adapterpack.open(svd_file, rank=RANK) as ad:
        seen = _recorder(monkeypatch)
        assert ad.module(NAME).params["rank"] == RANK
        np.testing.assert_allclose(ad.delta(NAME), _best_rank(RANK), rtol=0, atol=1e-5)
    assert sorted(seen) == sorted([K * 4, K * s["Ut"][2], K * s["Vt"][2]])
    monkeypatch.undo()
    with ApackReader(svd_file) as r:
        assert r.version == "1.1" and all(b.prefix_crc32c == () for b in r.blobs)
    _, start, row = s["Ut"]
    flip(svd_file, start + (K - 1) * row, 0)  # last row: outside any rank-3 prefix
    with pytest.raises(ChecksumError), adapterpack.open(svd_file, rank=RANK) as ad:
        ad.delta(NAME)


def test_a_wrong_checkpoint_crc_is_refused_at_a_rank_and_reported_by_verify(svd_file: Path) -> None:
    ut = slots(svd_file)["Ut"][0]

    def edit(index: dict[str, Any]) -> None:
        index["blobs"][ut][KEY][2] ^= 1

    _craft(svd_file, edit, minor=2)
    with adapterpack.open(svd_file) as ad:  # whole reads check the whole-blob CRC, which still holds
        np.testing.assert_allclose(ad.delta(NAME), _best_rank(K), rtol=0, atol=1e-5)
    with adapterpack.open(svd_file, rank=2) as ad:  # checkpoint 2 is intact
        ad.delta(NAME)
    with pytest.raises(ChecksumError, match="first 4 rows"), adapterpack.open(svd_file, rank=RANK) as ad:
        ad.delta(NAME)
    with ApackReader(svd_file) as r:
        problems = r.verify().problems
    assert problems == [f"blob {ut}: prefix_crc32c does not match its rows (index or prefix checkpoints corrupt)"]


MALFORMED: dict[str, Callable[[dict[str, Any], dict[str, int]], None]] = {
    "too few": lambda x, s: x["blobs"][s["Ut"]][KEY].pop(),
    "too many": lambda x, s: x["blobs"][s["Ut"]][KEY].append(0),
    "empty": lambda x, s: x["blobs"][s["Vt"]].__setitem__(KEY, []),
    "null": lambda x, s: x["blobs"][s["Vt"]].__setitem__(KEY, None),
    "string": lambda x, s: x["blobs"][s["Vt"]].__setitem__(KEY, "AAAAAAAAAAAAAAAA"),
    "int": lambda x, s: x["blobs"][s["Vt"]].__setitem__(KEY, 7),
    "bool element": lambda x, s: x["blobs"][s["Ut"]][KEY].__setitem__(0, True),
    "float element": lambda x, s: x["blobs"][s["Ut"]][KEY].__setitem__(0, 1.0),
    "negative": lambda x, s: x["blobs"][s["Ut"]][KEY].__setitem__(0, -1),
    "33 bits": lambda x, s: x["blobs"][s["Ut"]][KEY].__setitem__(0, 2**32),
    "on a 0-d blob": lambda x, s: x["blobs"][s["S"]].update(shape=[], length=4, stored_length=4, **{KEY: []}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_key_is_refused(svd_file: Path, case: str) -> None:
    refs = {k: v[0] for k, v in slots(svd_file).items()}
    _craft(svd_file, lambda index: MALFORMED[case](index, refs), minor=2)
    with pytest.raises(IndexFormatError, match=KEY):
        ApackReader(svd_file)


@pytest.mark.parametrize("rows", [0, 1])
def test_the_key_is_refused_on_a_blob_of_fewer_than_two_rows(tmp_path: Path, rows: int) -> None:
    path = tmp_path / "small.apack"
    m = svd_adapter().modules[NAME]
    cut = Module(NAME, "svd", (OUT, IN), {"rank": rows}, {k: v[:rows].copy() for k, v in m.tensors.items()})
    adapterpack.save(Adapter("default", modules={NAME: cut}), path, codec="raw")
    refs = {k: v[0] for k, v in slots(path).items()} if rows else None
    ut = refs["Ut"] if refs else 1

    def edit(index: dict[str, Any]) -> None:
        assert all(KEY not in b for b in index["blobs"])  # nothing to checkpoint below 2 rows
        index["blobs"][ut][KEY] = []

    _craft(path, edit, minor=2)
    with pytest.raises(IndexFormatError, match="at least 2 rows"):
        ApackReader(path)


def test_checkpoints_on_a_compressed_blob_are_checked_by_verify(tmp_path: Path) -> None:
    """The key covers decoded bytes, so it is valid on any codec; a prefix read of a compressed blob decodes it whole."""
    path = tmp_path / "packed.apack"
    sparse = {"S": np.ones(K, np.float32), "Ut": np.eye(K, OUT, dtype=np.float32), "Vt": np.eye(K, IN, dtype=np.float32)}
    adapterpack.save(Adapter("default", modules={NAME: Module(NAME, "svd", (OUT, IN), {"rank": K}, sparse)}), path, codec="zstd")
    ut = slots(path)["Ut"][0]
    good = prefix_crcs(memoryview(sparse["Ut"].tobytes()), K)

    def edit(index: dict[str, Any]) -> None:
        assert index["blobs"][ut]["codec"]["id"] == "zstd"
        index["blobs"][ut][KEY] = good

    _craft(path, edit, minor=2)
    with ApackReader(path) as r:
        assert r.blobs[ut].prefix_crc32c == tuple(good) and r.verify().ok
    with adapterpack.open(path, rank=RANK) as ad:
        np.testing.assert_array_equal(ad.module(NAME).array("Ut"), sparse["Ut"][:RANK])
    _craft(path, lambda index: index["blobs"][ut][KEY].__setitem__(0, good[0] ^ 1), minor=2)
    with ApackReader(path) as r:
        assert r.verify().problems == [f"blob {ut}: prefix_crc32c does not match its rows (index or prefix checkpoints corrupt)"]
