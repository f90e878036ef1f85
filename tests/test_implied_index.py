"""Format 1.5 (spec/format.md §1.2, §1.3, §2.1): a compressed index leaves out every BLOB offset and length (the
implied flag, bit 2), and a file with no raw blob starts its data section right after the index (the unaligned flag,
bit 3).

The writer sets the implied flag exactly where it compresses the index; readers derive both values (the planned
offset, ``prod(shape) * itemsize``) and still check any that are present. The point is size: on small real adapters
the cumulative offsets, and the padding that aligned a data section nothing maps, were the margin between the whole
file and the best float compressor's payload.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pcodec
import pytest

import adapterpack
from adapterpack.adapter import as_array
from adapterpack.container import ApackReader
from adapterpack.container.index import fill_implied, index_text
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, FLAG_UNALIGNED, PREAMBLE_SIZE
from adapterpack.container.writer import compress_index, write_apack
from adapterpack.errors import IndexFormatError, LayoutError, LengthMismatchError
from adapterpack.ops.convert import convert
from adapterpack.ops.rerank import RerankPolicy, rerank_file
from tests.apack_builders import compressible_adapter, load_everything, small_adapter, split, write
from tools.bench import common


def _index(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    flags, length = struct.unpack_from("<IQ", raw, 12)
    return flags, json.loads(index_text(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length], bool(flags & FLAG_INDEX_ZSTD)))


def _arrays(ad: adapterpack.Adapter) -> dict[str, np.ndarray]:
    """Every module slot and pass-through tensor, decoded."""
    out = {f"{m.name}.{s}": np.asarray(m.array(s)) for m in ad for s in m.tensors}
    return out | {n: as_array(t) for n, t in ad.tensors.items()}


@pytest.mark.parametrize("codec", ["zstd", "byteplanes", "pco"])
def test_a_compressed_index_leaves_offsets_and_lengths_out(tmp_path: Path, codec: str) -> None:
    src = compressible_adapter()
    path = tmp_path / "c.apack"
    write_apack(path, src, codec=codec)
    flags, index = _index(path)
    assert flags == FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED  # no blob stayed raw
    assert index["blobs"] and all("offset" not in b and "length" not in b for b in index["blobs"])
    with adapterpack.open(path) as back:
        got = _arrays(back)
        assert back.closer.__self__.version == "1.5"  # type: ignore[union-attr]
    want = {f"{m.name}.{s}": np.asarray(t) for m in src.modules.values() for s, t in m.tensors.items()}
    want |= {n: np.asarray(t) for n, t in src.tensors.items()}
    assert got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)
    with ApackReader(path) as r:  # the reader derived exactly what the plan gives
        assert r.verify().problems == []
        assert sorted(b.length for b in r.blobs) == sorted(a.nbytes for a in got.values())
        offsets = [r.blob_offset(i) - r.data_start for i in range(len(r.blobs))]
    filled = [dict(b) for b in index["blobs"]]
    fill_implied(filled, packed=True)
    assert offsets == [b["offset"] for b in filled]


def test_a_plain_index_keeps_every_key_and_no_new_flag(tmp_path: Path) -> None:
    """Files of raw blobs keep a plain index with offsets and lengths, flags 0: 1.0–1.4 readers still read them."""
    path = tmp_path / "r.apack"
    write_apack(path, small_adapter(), codec="raw")
    flags, index = _index(path)
    assert flags == 0
    assert all("offset" in b and "length" in b for b in index["blobs"])


def test_keys_present_under_the_flag_are_checked(tmp_path: Path) -> None:
    p = split(write_apack(tmp_path / "c.apack", compressible_adapter(), codec="zstd").path.read_bytes())
    assert p.flags & FLAG_IMPLIED
    load_everything(write(tmp_path / "same.apack", p.build()))  # split wrote them in: present and right is valid
    wrong = p.copy()
    wrong.index["blobs"][1]["offset"] += 1
    with pytest.raises(LayoutError, match=r"blob 1: offset"):
        load_everything(write(tmp_path / "off.apack", wrong.build()))
    wrong = p.copy()
    wrong.index["blobs"][0]["length"] += 4
    with pytest.raises(LengthMismatchError, match=r"blob 0: length"):
        load_everything(write(tmp_path / "len.apack", wrong.build()))


def test_keys_left_out_without_the_flag_are_refused(tmp_path: Path) -> None:
    raw = write_apack(tmp_path / "c.apack", compressible_adapter(), codec="zstd").path.read_bytes()
    flags = struct.unpack_from("<I", raw, 12)[0] & ~FLAG_IMPLIED
    bad = raw[:12] + struct.pack("<I", flags) + raw[16:]  # the same index, as a 1.4 file would claim it
    with pytest.raises(IndexFormatError, match=r"blob 0: missing 'offset'"):
        load_everything(write(tmp_path / "noflag.apack", bad))


@pytest.fixture(scope="module")
def rank1_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example re-ranked to rank 1 by its SVD, cast to fp16, as a PEFT folder: a small real adapter."""
    work = tmp_path_factory.mktemp("rank1")
    rerank_file(common.example_dir(), work / "r1", RerankPolicy(rank=1), to="peft", force=True)
    return common.cast_peft(work / "r1", work / "r1-fp16", "fp16")


def test_leaving_them_out_shrinks_the_frame_on_a_real_adapter(rank1_fp16: Path, tmp_path: Path) -> None:
    """About 4 bytes a blob of the compressed index were cumulative offsets and derivable lengths."""
    path = tmp_path / "r1.apack"
    convert(rank1_fp16, path, force=True)
    flags, index = _index(path)
    n = len(index["blobs"])
    with ApackReader(path) as r:
        short = r.preamble.index_length
    fill_implied(index["blobs"], bool(flags & FLAG_PACKED))
    full = len(compress_index(json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode()))
    assert n == 240 and full - short >= 3 * n, (full, short)


def test_a_small_real_adapter_is_below_pcodecs_payload(rank1_fp16: Path, tmp_path: Path) -> None:
    """Issue 15's size aim where it is tightest (rank 1, fp16: 21 B of payload margin a tensor): the whole default
    .apack against pcodec's payload alone (each tensor compressed on its own, headers not counted)."""
    path = tmp_path / "r1.apack"
    convert(rank1_fp16, path, force=True)
    arrs = [np.asarray(m.array(s)) for m in adapterpack.open(rank1_fp16) for s in m.tensors]
    assert {a.dtype for a in arrs} == {np.dtype(np.float16)}
    peer = sum(len(pcodec.standalone.simple_compress(a.reshape(-1), pcodec.ChunkConfig())) for a in arrs)
    assert path.stat().st_size < peer, (path.stat().st_size, peer)


def test_the_bank_writer_writes_the_compact_layout_too(tmp_path: Path) -> None:
    """``write_bank`` (bank build/add/refit) packs compressed blobs and stores the 1.5 index as ``write_apack`` does; the
    bank reads back the same and each shared base is stored once."""
    from adapterpack.bank.store import Bank, BankMember, BankModule, open_bank, write_bank

    rng = np.random.default_rng(3)
    u, v = np.tile([0.5, 1.0, -2.0], (200, 1)), np.tile([0.25, 3.0, 1.5], (150, 1))
    members = [BankMember(f"m{j}", {"q": rng.standard_normal(3)}, tensors={"head": np.arange(40.0).reshape(8, 5)})
               for j in range(3)]
    bank_path = tmp_path / "bank.apack"
    write_bank(bank_path, Bank({"q": BankModule("q", u, v, "diagonal")}, members), codec="zstd")
    flags, index = _index(bank_path)
    assert flags == FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED
    assert all("offset" not in b and "length" not in b for b in index["blobs"])
    with open_bank(bank_path) as bank:  # the sharing checks pass: U and V once, every member referencing them
        assert [m.name for m in bank.members] == ["m0", "m1", "m2"]
        assert np.array_equal(bank.modules["q"].U, u) and np.array_equal(bank.members[2].S["q"], members[2].S["q"])
    with adapterpack.open(bank_path, adapter="m1") as ad:
        again = tmp_path / "again.apack"
        write_apack(again, ad, codec="zstd")  # one member through the general writer: the same layout rules
        assert _index(again)[0] == flags
    with ApackReader(bank_path) as r:
        assert r.verify().problems == []
        assert r.index.refs[:2] == [3, 3]  # U and V first, each referenced by the three members
    raw_bank = tmp_path / "raw-bank.apack"
    write_bank(raw_bank, Bank({"q": BankModule("q", u, v, "diagonal")}, members), codec="raw")
    assert _index(raw_bank)[0] == 0  # raw blobs only: the plain index and 1.2 layout, as write_apack writes them


def test_a_file_of_compressed_blobs_has_no_padding_after_its_index(tmp_path: Path) -> None:
    path = tmp_path / "c.apack"
    res = write_apack(path, compressible_adapter(), codec="zstd")
    with ApackReader(path) as r:
        assert r.preamble.unaligned and r.data_start == PREAMBLE_SIZE + res.index_length
        assert all(b.codec_id != "raw" for b in r.blobs) and r.verify().problems == []
    assert res.padding == 0  # packed blobs, and no pad after the index


def test_a_raw_blob_keeps_the_data_section_aligned(tmp_path: Path) -> None:
    """One blob that compression does not shrink stays raw, and mapped: the data section stays aligned, and so does it."""
    ad = compressible_adapter()
    ad.tensors["noise"] = np.frombuffer(np.random.default_rng(0).bytes(4096), np.uint8).reshape(64, 64)
    path = tmp_path / "m.apack"
    write_apack(path, ad, codec="zstd")
    with ApackReader(path) as r:
        flags = r.preamble.flags
        raw = [i for i, b in enumerate(r.blobs) if b.codec_id == "raw"]
        assert raw and not r.preamble.unaligned and flags & FLAG_PACKED and r.data_start % 256 == 0
        assert all(r.blob_offset(i) % 8 == 0 for i in raw)
    with adapterpack.open(path) as back:
        assert np.array_equal(as_array(back.tensors["noise"]), ad.tensors["noise"])
