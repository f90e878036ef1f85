"""The writer stores a blob once when several slots hold it (spec §2.1: a blob may be referenced by several records).

Sharing is by identity: one blob of one open source file (a bank's U and V, read back and converted) or one numpy
array object; equal values in distinct arrays stay distinct blobs. The bank is built with the bank tools from the
real LoRAs of ``tests/data/bank_loras.apack`` (see tests/test_bank.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import adapterpack
from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.bank import bank_listing, build_bank
from adapterpack.cli import main
from adapterpack.container.reader import ApackReader
from adapterpack.container.writer import write_apack
from adapterpack.dtypes import as_bytes, cast_array
from adapterpack.errors import AdapterpackError
from adapterpack.ops.budget import apack_file_size
from adapterpack.ops.convert import adapter_differences, convert
from tests.test_bank import NAMES, _split


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bank")
    out = tmp / "bank.apack"
    build_bank(out, _split(tmp), rank=12)
    return out


def _table(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], list[int]]:
    """(dtype and shape of every blob, reference count of every blob)."""
    with ApackReader(path) as r:
        return [(b.dtype, tuple(b.shape)) for b in r.blobs], list(r.index.refs or ())


def _shared_refs(path: Path) -> tuple[set[int], set[int]]:
    """(blobs the U and V slots reference, blobs the S slots reference)."""
    with ApackReader(path) as r:
        slots = [(s, i) for a in r.index.adapters for m in a["modules"] for s, i in m["tensors"].items()]
    return {i for s, i in slots if s in ("U", "V")}, {i for s, i in slots if s == "S"}


@pytest.mark.parametrize("codec", ["zstd", "raw", "byteplanes"])
def test_converted_bank_keeps_one_blob_per_shared_base(bank: Path, tmp_path: Path, codec: str) -> None:
    out = tmp_path / "out.apack"
    res = convert(bank, out, codec=codec)
    src_table, src_refs = _table(bank)
    out_table, out_refs = _table(out)
    assert out_table == src_table and out_refs == src_refs  # same blobs, in the same order, referenced as often
    assert max(src_refs) == len(NAMES)  # U and V: one reference per member
    # one blob per reference made the file 4.9x the source with zstd; the codecs differ by a few percent here
    assert res.dst_bytes < 1.25 * res.src_bytes, (res.src_bytes, res.dst_bytes)
    bases, own = _shared_refs(out)
    assert max(bases) < min(own)  # spec/shared.md §2: the bases before the members' own blobs
    listing = bank_listing(out)
    assert [m["name"] for m in listing["members"]] == NAMES
    r = CliRunner().invoke(main, ["bank", "list", str(out)])
    assert r.exit_code == 0 and all(n in r.output for n in NAMES), r.output
    for name in NAMES:
        with adapterpack.open(bank, adapter=name) as a, adapterpack.open(out, adapter=name) as b:
            assert adapter_differences(a, b) == []  # every tensor bit for bit
            for m in a:
                assert np.array_equal(m.delta(), b.delta(m.name)) and m.delta().dtype == b.delta(m.name).dtype


def test_cast_bank_keeps_its_shared_bases(bank: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16.apack"
    res = convert(bank, out, dtype="bf16", codec="raw")
    src_table, src_refs = _table(bank)
    out_table, out_refs = _table(out)
    assert out_refs == src_refs
    assert out_table == [("bfloat16", shape) for _, shape in src_table]
    assert [c.adapter for c in res.casts] == NAMES and all(c.delta_rel_error < 1e-2 for c in res.casts)
    assert [m["name"] for m in bank_listing(out)["members"]] == NAMES
    for name in NAMES:  # what each member's own cast gives, bit for bit
        with adapterpack.open(bank, adapter=name) as a, adapterpack.open(out, adapter=name) as b:
            for m in a:
                for slot in m.tensors:
                    want, _ = cast_array(np.array(m.array(slot)), "bfloat16", slot)
                    got = b.module(m.name).array(slot)
                    assert got.dtype == want.dtype and as_bytes(got) == as_bytes(want)
    # raw bf16: half of the source's decoded f32 bytes, not one copy of U and V per member
    with ApackReader(bank) as r:
        decoded = sum(b.length for b in r.blobs)
    assert res.dst_bytes < decoded // 2 + 8192


def _lora(name: str, a: np.ndarray, b: np.ndarray) -> Module:
    return Module(name, "lora", (b.shape[0], a.shape[1]), {"rank": a.shape[0], "alpha": 8.0}, {"A": a, "B": b})


def test_one_array_object_is_one_blob_and_equal_values_are_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    b1, b2 = (rng.standard_normal((32, 4)).astype(np.float32) for _ in range(2))
    twin = a.copy()  # equal values, another object: its own blob (value deduplication is not this feature)
    first = Adapter("first", "toy/base", modules={"q": _lora("q", a, b1), "v": _lora("v", a, b2)}, tensors={"t": a})
    second = Adapter("second", "toy/base", modules={"q": _lora("q", a, b2), "k": _lora("k", twin, b1)})
    seen: list[int] = []
    res = write_apack(tmp_path / "x.apack", [first, second], codec="raw", progress=seen.append)
    _, refs = _table(tmp_path / "x.apack")
    # a (4 slots: 3 records and a tensor entry), b1 (2), b2 (2) first, in first-reference order; then twin
    assert refs == [4, 2, 2, 1] and res.blobs == 4
    assert sum(seen) == first.decoded_bytes + second.decoded_bytes  # progress still adds up to every slot
    assert apack_file_size([first, second]) == res.file_size == (tmp_path / "x.apack").stat().st_size
    with ApackReader(tmp_path / "x.apack") as r:
        assert r.index.adapters[0]["modules"][0]["tensors"] == {"A": 0, "B": 1}
        assert r.index.adapters[1]["modules"][1]["tensors"] == {"A": 3, "B": 1}
        for src in (first, second):
            assert adapter_differences(src, r.adapter(src.name)) == []


def test_a_blob_gets_prefix_checksums_when_any_reference_wants_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vt = rng.standard_normal((4, 64)).astype(np.float32)
    ut = rng.standard_normal((4, 32)).astype(np.float32)
    svd = Module("s", "svd", (32, 64), {"rank": 4}, {"S": np.array([4, 3, 2, 1], np.float32), "Ut": ut, "Vt": vt})
    lora = _lora("l", vt, rng.standard_normal((32, 4)).astype(np.float32))  # its A is the svd record's Vt
    write_apack(tmp_path / "p.apack", Adapter("p", "toy/base", modules={"l": lora, "s": svd}), codec="raw")
    with ApackReader(tmp_path / "p.apack") as r:
        (vt_blob,) = [i for i, n in enumerate(r.index.refs or ()) if n == 2]
        assert r.blobs[vt_blob].prefix_crc32c  # the lora slot came first and wants none; the svd slot does
        assert np.array_equal(r.adapter("p").module("s").tensors["Vt"].prefix(2).load(), vt[:2])


def test_a_failed_read_of_a_shared_blob_writes_nothing(bank: Path, tmp_path: Path) -> None:
    out = tmp_path / "never.apack"

    def fail() -> np.ndarray:
        raise AdapterpackError("disk gone")

    def broken(m: Module) -> Module:
        u = m.tensors["U"]
        assert isinstance(u, StoredTensor)
        failing = StoredTensor(u.dtype, u.shape, 0, "raw", fail)
        return Module(m.name, m.encoding, m.base_shape, m.params, {**m.tensors, "U": failing})

    with ApackReader(bank) as r:  # the last member's U fails to read: its blobs are shared, so the first member's too
        members = [r.adapter(n) for n in r.adapter_names]
        adapters = [a.derived({m.name: broken(m) if a is members[-1] else m for m in a}) for a in members]
        with pytest.raises(AdapterpackError, match="disk gone"):
            write_apack(out, adapters, codec="zstd")
    assert list(tmp_path.iterdir()) == []
