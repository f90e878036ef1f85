"""Review of format 1.5 (spec/format.md §1.1–§1.3, §2.1, §7, §10): the implied flag (bit 2: BLOB ``offset`` and
``length`` may be left out), the unaligned flag (bit 3: ``D = 32 + L``, no raw blob), ``writer.store_index`` /
``writer.plan_layout`` and the bank writer that now shares them, and the ``bank list`` error-metadata fix.

The first tests fail on the code under review (each names the spec rule it checks); the rest pin behaviours that
were checked and found right but had no test of their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, as_array
from adapterpack.checksum import crc32c
from adapterpack.container import ApackReader, writer
from adapterpack.container import index as idx
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, FLAG_UNALIGNED, PREAMBLE_SIZE
from adapterpack.container.writer import write_apack
from adapterpack.errors import IndexFormatError, LayoutError, LengthMismatchError, TruncatedFileError
from tests.apack_builders import assemble, compressible_adapter, load_everything, split, write

# --- helpers ---------------------------------------------------------------------------------------------------------


def _one_tensor_index(blob: dict[str, Any], n_blobs: int = 1) -> dict[str, Any]:
    """An index of one adapter whose pass-through tensors reference blobs 0..n_blobs-1."""
    tensors = [{"name": f"t{i}", "blob": i} for i in range(n_blobs)]
    return {"adapters": [{"name": "a", "modules": [], "tensors": tensors}], "blobs": [dict(blob) for _ in range(n_blobs)]}


def _text_and_layout(path: Path) -> tuple[bytes, int, int, tuple[bool, bool, bool]]:
    """(the index's JSON text, D, file size, (packed, implied, unaligned)) of a file the reader opens."""
    with ApackReader(path) as r:
        pre = r.preamble
        return r.index._data, r.data_start, r.file_size, (pre.packed, pre.implied, pre.unaligned)


def _slow(data: bytes, start: int, size: int, flags: tuple[bool, bool, bool]) -> idx.Index:
    index = idx.parse_index(idx.loads(data), start, size, *flags)
    idx.check_references(index)
    return index


# === findings: these fail on the code under review ===================================================================


def test_an_implied_length_past_2_53_is_refused_as_a_written_one_is(tmp_path: Path) -> None:
    """§2.1 'Sizes without overflow' + §1.3: under the implied flag an absent ``length`` is ``prod(shape) * itemsize``,
    the value a reader computes *to check it*. Left out or written in must not change whether a file is valid: written
    in, any ``length`` (< 2^53, §2) differs from a product past 2^53, so the blob is refused (LengthMismatchError, the
    rule 'once the running product exceeds 2^53 it cannot equal a length'). Left out, the reader takes the product
    (here 2^82) as the length and accepts the file: a blob of a codec it skips (``must_understand: false``) is never
    bounded by its stored bytes, and a reader with 64-bit integers cannot even hold that length."""
    blob = {"dtype": "float32", "shape": [2**40, 2**40], "codec": {"id": "x-future", "must_understand": False},
            "stored_length": 4, "crc32c": crc32c(b"abcd")}  # fmt: skip
    flags = FLAG_PACKED | FLAG_UNALIGNED
    written = _one_tensor_index(blob | {"offset": 0, "length": 2**53 - 1})
    with pytest.raises(LengthMismatchError):  # the same blob with its length written in: refused
        ApackReader(write(tmp_path / "written.apack", assemble(written, b"abcd", flags=flags, minor=5)))
    implied = _one_tensor_index(blob)
    path = write(tmp_path / "implied.apack", assemble(implied, b"abcd", flags=flags | FLAG_IMPLIED, minor=5))
    data = json.dumps(implied, separators=(",", ":")).encode()
    start, size = PREAMBLE_SIZE + len(data), path.stat().st_size
    with pytest.raises(LengthMismatchError, match=r"blob 0"):
        ApackReader(path)
    assert idx._fast_index(data, start, size, True, True, True) is None  # the fast path must not accept it either


def test_bank_list_with_an_error_metadata_integer_too_large_for_a_float(tmp_path: Path) -> None:
    """The 1.5-cycle fix 'a member's error metadata that is not the bank writer's JSON lists as unknown' (metadata is
    free-form, spec §2) still ends ``bank list`` in an OverflowError on a JSON integer past the float range:
    ``_error_stats`` calls ``math.isfinite`` on it, which raises instead of answering False."""
    from adapterpack.bank.ops import bank_listing
    from adapterpack.bank.store import META_ERROR, Bank, BankMember, BankModule, write_bank

    u, v = np.tile([0.5, 1.0], (16, 1)), np.tile([0.25, 3.0], (12, 1))
    huge = "1" + "0" * 400
    members = [
        BankMember("ok", {"q": np.array([1.0, 2.0])}, metadata={META_ERROR: '{"mean": 0.5, "max": 1.0}'}),
        BankMember("odd", {"q": np.array([3.0, 4.0])}, metadata={META_ERROR: f'{{"mean": {huge}, "max": 1}}'}),
    ]
    path = tmp_path / "bank.apack"
    write_bank(path, Bank({"q": BankModule("q", u, v, "diagonal")}, members), codec="zstd")
    listed = {m["name"]: m for m in bank_listing(path)["members"]}
    assert listed["ok"]["rel_error_mean"] == 0.5
    assert listed["odd"]["rel_error_mean"] is None and listed["odd"]["rel_error_max"] == 1.0


def test_the_writer_checks_the_index_limit_on_the_text_it_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """§7: the index-length limit bounds the stored ``L`` and the declared size of a compressed index's text. Under the
    implied flag that text is the *short* one (no offsets, no lengths), but ``store_index`` checks the full text
    first, so it refuses an index whose stored frame and declared text are both within the limit (with the real limit,
    64 MiB: a file of roughly 260k–300k tensors). The limit is lowered here to sit between the two texts."""
    ad = compressible_adapter()
    seen: dict[str, int] = {}
    real = writer.store_index

    def spy(index: dict[str, Any], compress: bool) -> tuple[bytes, bytes, int]:
        stored, text, flags = real(index, compress)
        seen.update(full=len(idx.dumps(index)), text=len(text), flags=flags)
        return stored, text, flags

    monkeypatch.setattr(writer, "store_index", spy)
    write_apack(tmp_path / "probe.apack", ad, codec="zstd")
    assert seen["flags"] & FLAG_IMPLIED and seen["text"] < seen["full"]
    monkeypatch.setattr(writer, "store_index", real)
    monkeypatch.setattr(writer, "MAX_INDEX_LENGTH", seen["text"] + 8)  # the text stored fits, the full one would not
    path = tmp_path / "fits.apack"
    write_apack(path, ad, codec="zstd")
    load_everything(path)


# === checked and right: behaviours without a test of their own =====================================================


def test_a_failed_fast_path_leaves_no_filled_values_for_the_fallback(tmp_path: Path) -> None:
    """``_blobs_fit`` fills ``offset``/``length`` of the msgspec BlobEntry objects as it goes and may then step aside;
    the fallback parses the text afresh, so it reports the defect §10.2 names, not one the filled values would hide."""
    path = tmp_path / "c.apack"
    write_apack(path, compressible_adapter(), codec="zstd")
    data, start, size, flags = _text_and_layout(path)
    assert flags == (True, True, True)
    obj = json.loads(data)
    assert all("offset" not in b and "length" not in b for b in obj["blobs"])
    filled = json.loads(data)
    idx.fill_implied(filled["blobs"], True)
    # blob 0 left out (the fast path fills it), blob 1 present and one byte off: LayoutError naming blob 1
    obj["blobs"][1]["offset"] = filled["blobs"][1]["offset"] + 1
    bad = json.dumps(obj, separators=(",", ":")).encode()
    assert idx._fast_index(bad, start, size, *flags) is None
    with pytest.raises(LayoutError, match=r"^blob 1: offset"):
        idx.read_index(bad, start, size, *flags)
    # the sound text read as a file without the implied flag: every key is required, blob 0's offset first
    with pytest.raises(IndexFormatError, match=r"blob 0: missing 'offset'"):
        idx.read_index(data, start, size, True, False, True)
    # after both, the sound text still reads, with the planned values
    index = idx.read_index(data, start, size, *flags)
    assert [b.offset for b in index.blobs] == [b["offset"] for b in filled["blobs"]]
    assert [b.length for b in index.blobs] == [b["length"] for b in filled["blobs"]]


def test_a_raw_blob_under_the_unaligned_flag_on_both_paths(tmp_path: Path) -> None:
    """§1.2/§10.1: a ``raw`` blob in a file with the unaligned flag is a LayoutError; the fast path steps aside and the
    fallback names it (even with its offset and length left out, and with its stored length equal to its length)."""
    path = tmp_path / "c.apack"
    write_apack(path, compressible_adapter(), codec="zstd")
    data, start, size, flags = _text_and_layout(path)
    obj = json.loads(data)
    b = obj["blobs"][0]
    # blob 0 becomes a raw uint8 blob of its stored length: its layout and lengths stay sound, only its codec is raw now
    b["codec"], b["dtype"], b["shape"] = {"id": "raw"}, "uint8", [b["stored_length"]]
    text = json.dumps(obj, separators=(",", ":")).encode()
    assert idx._fast_index(text, start, size, *flags) is None
    with pytest.raises(LayoutError, match=r"blob 0: a raw blob"):
        _slow(text, start, size, flags)


def test_a_file_without_blobs_under_the_new_flags(tmp_path: Path) -> None:
    """Zero blobs with the implied and unaligned flags: the file ends at ``D = 32 + L`` (§1.2), one byte more is a
    LayoutError; the same index without the unaligned flag needs the padding to ``align_up(32 + L, 256)``."""
    index = {"adapters": [{"name": "a", "modules": []}], "blobs": []}
    flags = FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED
    raw = assemble(index, b"", flags=flags, minor=5)
    path = write(tmp_path / "empty.apack", raw)
    with ApackReader(path) as r:
        assert r.data_start == PREAMBLE_SIZE + r.preamble.index_length == r.file_size
        assert r.verify().problems == []
    with pytest.raises(LayoutError, match=r"after the last blob"):
        ApackReader(write(tmp_path / "tail.apack", raw + b"\0"))
    aligned = assemble(index, b"", flags=FLAG_IMPLIED, minor=5)
    with ApackReader(write(tmp_path / "aligned.apack", aligned)) as r:
        assert r.data_start % 256 == 0 and r.file_size == r.data_start


def test_keys_present_and_right_under_the_implied_flag_are_read(tmp_path: Path) -> None:
    """§1.3: under the flag either key MAY be present (then checked). ``Parts.build`` of tests/apack_builders leaves out
    a key equal to the derived value, so test_implied_index's 'present and right is valid' line never stores one: here
    the index is stored with every key written in, compressed, under the file's own flags."""
    raw = write_apack(tmp_path / "c.apack", compressible_adapter(), codec="zstd").path.read_bytes()
    p = split(raw)  # fills offset and length in
    assert p.flags & FLAG_IMPLIED and all("offset" in b and "length" in b for b in p.index["blobs"])
    full = assemble(p.index, p.data, flags=p.flags, major=p.major, minor=p.minor)
    path = write(tmp_path / "full.apack", full)
    got = load_everything(path)
    with adapterpack.open(tmp_path / "c.apack") as want:
        assert [(m.name, {s: np.asarray(m.array(s)).tobytes() for s in m.tensors}) for m in want] == [
            (m.name, {s: np.asarray(m.array(s)).tobytes() for s in m.tensors}) for m in got[0]
        ]
    data, start, size, flags = _text_and_layout(path)
    assert idx._fast_index(data, start, size, *flags) is not None  # both paths accept it, with the same blobs
    assert idx._fast_index(data, start, size, *flags).blobs == _slow(data, start, size, flags).blobs


@pytest.mark.parametrize("codec", ["raw", "zstd", "byteplanes", "pco"])
def test_empty_tensors_round_trip_with_every_codec(tmp_path: Path, codec: str) -> None:
    """A zero-length tensor is stored raw (compression cannot shrink 0 bytes): the file keeps an aligned data section
    (no unaligned flag: it holds a raw blob, §1.2), the empty blob is mapped at the end of the file, and it reads back."""
    ad = compressible_adapter()
    ad.tensors["empty"] = np.zeros((0, 4), np.float32)
    path = tmp_path / f"{codec}.apack"
    write_apack(path, ad, codec=codec)
    with ApackReader(path) as r:
        assert not r.preamble.unaligned and r.data_start % 256 == 0
        empty = [b for b in r.blobs if b.length == 0]
        assert len(empty) == 1 and empty[0].codec_id == "raw"
        assert r.verify().problems == []
    with adapterpack.open(path) as back:
        assert as_array(back.tensors["empty"]).shape == (0, 4)
        assert np.array_equal(as_array(back.tensors["lm_head.weight"]), ad.tensors["lm_head.weight"])


def test_implied_offsets_summing_past_the_file_are_a_truncation(tmp_path: Path) -> None:
    """Under the implied flag there is no written offset for the plan to disagree with, so the planned offsets of
    hostile stored lengths sum past 2^53 (here 2^54: spec §1.2's 'never sums past 2^54 + 256' holds only where offsets
    are written). The reader still refuses the file cleanly, as truncated."""
    blob = {"dtype": "uint8", "shape": [4], "codec": {"id": "x-future", "must_understand": False},
            "stored_length": 2**52, "crc32c": 0}  # fmt: skip
    index = _one_tensor_index(blob, n_blobs=4)
    path = write(tmp_path / "sum.apack", assemble(index, b"", flags=FLAG_PACKED | FLAG_IMPLIED | FLAG_UNALIGNED, minor=5))
    with pytest.raises(TruncatedFileError, match=r"past the end"):
        ApackReader(path)


def test_the_bank_writer_lays_out_a_mix_of_raw_and_compressed_blobs_as_the_plan_says(tmp_path: Path) -> None:
    """The bank writer copies spooled blobs back to back with the padding ``plan_layout`` asks for: with a blob left
    raw (random S) beside compressed bases, the file is packed, implied and aligned (no unaligned flag), every raw
    blob sits on its alignment, and the offsets are those ``fill_implied`` derives from the index alone."""
    from adapterpack.bank.store import Bank, BankMember, BankModule, open_bank, write_bank

    rng = np.random.default_rng(5)
    u, v = np.tile([0.5, 1.0, -2.0], (600, 1)), np.tile([0.25, 3.0, 1.5], (500, 1))  # compress well, >= 4096 B
    members = [BankMember(f"m{j}", {"q": rng.standard_normal(3)}, tensors={"noise": rng.standard_normal((40, 40))})
               for j in range(2)]  # fmt: skip
    path = tmp_path / "bank.apack"
    write_bank(path, Bank({"q": BankModule("q", u, v, "diagonal")}, members), codec="zstd")
    raw = path.read_bytes()
    p = split(raw)
    assert p.flags == FLAG_INDEX_ZSTD | FLAG_PACKED | FLAG_IMPLIED
    with ApackReader(path) as r:
        ids = [b.codec_id for b in r.blobs]
        assert "raw" in ids and any(i != "raw" for i in ids)
        assert [b.offset for b in r.blobs] == [b["offset"] for b in p.index["blobs"]]
        for i, b in enumerate(r.blobs):
            if b.codec_id == "raw":
                assert r.blob_offset(i) % idx.blob_alignment(b.stored_length) == 0
        assert r.verify().problems == []
    with open_bank(path) as bank:
        assert np.array_equal(bank.modules["q"].U, u) and np.array_equal(bank.members[1].S["q"], members[1].S["q"])
        assert np.array_equal(as_array(bank.members[0].tensors["noise"]), members[0].tensors["noise"])


def test_write_apack_and_bank_plan_are_one_function() -> None:
    """``plan_layout`` decides offsets and flags for both writers: raw only (or not compact) -> the 1.2 layout, flags 0;
    a compressed blob beside a raw one -> packed; compressed only -> packed and unaligned."""
    raw = {"codec": {"id": "raw"}, "stored_length": 10}
    comp = {"codec": {"id": "zstd"}, "stored_length": 5}
    assert writer.plan_layout([raw, raw]) == ([0, 16], 0)
    assert writer.plan_layout([comp, raw], compact=False) == ([0, 8], 0)
    assert writer.plan_layout([comp, raw, comp]) == ([0, 8, 18], FLAG_PACKED)
    assert writer.plan_layout([comp, comp]) == ([0, 5], FLAG_PACKED | FLAG_UNALIGNED)
    assert writer.plan_layout([]) == ([], 0)


def test_adapter_with_no_blobs_writes_the_old_layout(tmp_path: Path) -> None:
    """No blobs: no flag (§1.2: the unaligned flag is for files that hold blobs), the file ends at the aligned D."""
    path = tmp_path / "none.apack"
    write_apack(path, Adapter(name="x", modules={}, tensors={}), codec="zstd")
    with ApackReader(path) as r:
        assert r.preamble.flags == 0 and r.file_size == r.data_start and r.data_start % 256 == 0
