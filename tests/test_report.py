"""adapterpack.ops.report: inspect data equals what the file actually holds."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack import Adapter, Module
from adapterpack.checksum import crc32c
from adapterpack.container.index import index_text
from adapterpack.container.preamble import FLAG_INDEX_ZSTD, MINOR, data_start
from adapterpack.container.reader import ApackReader
from adapterpack.errors import AdapterNotFoundError, UnrecognizedInputError
from adapterpack.ops.report import footprint, inspect_path
from tests.factories import qv_modules


def toy(seed: int = 0, name: str = "default") -> Adapter:
    rng = np.random.default_rng(seed)
    mods = qv_modules(rng, layers=3, rank=4, in_features=48, q_out=64, v_out=32, b_scale=0.01, b_grid=np.float16)
    mods["model.layers.3.mlp.down_proj"] = Module(
        "model.layers.3.mlp.down_proj",
        "lora",
        (48, 96),
        {"rank": 2, "alpha": 2.0, "dora": True},
        {
            "A": rng.standard_normal((2, 96)).astype(np.float16),
            "B": np.zeros((48, 2), np.float16),
            "magnitude": np.ones(48, np.float32),
        },
    )
    tensors = {"lm_head.weight": rng.standard_normal((10, 48)).astype(np.float32), "counter": np.arange(3, dtype=np.int64)}
    return Adapter(name=name, base_model="toy/base", modules=mods, tensors=tensors, source={"format": "test", "notes": ["hi"]})


def numel(shape: Any) -> int:
    return math.prod(shape)


def test_apack_totals_equal_sums_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.apack"
    adapterpack.save(toy(), path)
    rep = inspect_path(path)
    reader = ApackReader(path)
    blobs = reader.blobs
    raw = reader.index.raw["adapters"][0]
    (a,) = rep["adapters"]
    t = a["totals"]
    assert t["stored_bytes"] == sum(b.stored_length for b in blobs)
    assert t["decoded_bytes"] == sum(b.length for b in blobs)
    assert t["parameters"] == sum(numel(b.shape) for b in blobs)
    assert t["compression_ratio"] == t["decoded_bytes"] / t["stored_bytes"]
    assert (t["modules"], t["tensors"]) == (7, 2)
    assert rep["totals"] == t
    f = rep["file"]
    size = path.stat().st_size
    assert f["file_size"] == size
    assert f["index_bytes"] == struct.unpack_from("<Q", path.read_bytes(), 16)[0]
    assert f["padding_bytes"] == size - 32 - f["index_bytes"] - t["stored_bytes"]
    ends = [0] + [b.offset + b.stored_length for b in blobs[:-1]]
    gaps = sum(b.offset - end for b, end in zip(blobs, ends))  # padding between blobs (raw ones are aligned)
    assert f["padding_bytes"] == reader.data_start - 32 - f["index_bytes"] + gaps
    assert reader.preamble.unaligned == all(b.codec_id != "raw" for b in blobs)
    assert f["format_version"] == f"1.{MINOR}"
    assert f["index_compressed"] and f["packed"]
    assert f["index_json_bytes"] == len(reader.index._data) > f["index_bytes"]
    assert f["index_bytes_per_tensor"] == f["index_bytes"] / len(blobs)
    assert f["padding_bytes_per_tensor"] == f["padding_bytes"] / len(blobs)
    assert f["codecs"] == {c: sum(b.codec_id == c for b in blobs) for c in {b.codec_id for b in blobs}}
    assert f["blobs"] == len(blobs)
    # per row: the stored bytes of exactly the blobs that record references
    rows = {r["module"]: r for r in a["rows"]}
    for m in raw["modules"]:
        assert rows[m["name"]]["stored_bytes"] == sum(blobs[i].stored_length for i in m["tensors"].values())
        assert rows[m["name"]]["base_shape"] == m["base_shape"]
    for tt in raw["tensors"]:
        assert rows[tt["name"]]["stored_bytes"] == blobs[tt["blob"]].stored_length
        assert rows[tt["name"]]["kind"] == "tensor"
    assert sum(r["share"] for r in a["rows"]) == pytest.approx(100.0)
    dora = rows["model.layers.3.mlp.down_proj"]
    assert (dora["rank"], dora["dtype"], dora["summary"]["dora"]) == (2, "float16/float32", True)
    assert a["notes"] == ["hi"] and a["skipped"] == []
    json.dumps(rep)  # plain data


def test_multi_adapter_report_and_selection(tmp_path: Path) -> None:
    path = tmp_path / "two.apack"
    adapterpack.save([toy(0, "one"), toy(1, "two")], path, codec="raw")
    rep = inspect_path(path)
    assert [a["name"] for a in rep["adapters"]] == ["one", "two"]
    assert rep["totals"]["stored_bytes"] == sum(b.stored_length for b in ApackReader(path).blobs)
    assert rep["totals"]["compression_ratio"] == 1.0
    assert rep["file"]["codecs"] == {"raw": 2 * (6 * 2 + 3 + 2)}
    only = inspect_path(path, adapter="two")
    assert [a["name"] for a in only["adapters"]] == ["two"]
    with pytest.raises(AdapterNotFoundError):
        inspect_path(path, adapter="three")


def rewrite_index(path: Path, edit: Any) -> None:
    """Rewrite an .apack's index through ``edit(dict)`` and re-lay the file per the spec."""
    data = path.read_bytes()
    n = struct.unpack_from("<Q", data, 16)[0]
    flags = struct.unpack_from("<I", data, 12)[0]
    old_start = data_start(n, flags)
    index = json.loads(index_text(data[32 : 32 + n], bool(flags & FLAG_INDEX_ZSTD)))
    edit(index)
    new = json.dumps(index, separators=(",", ":")).encode()  # written as plain JSON: the compressed-index flag cleared
    head = data[:12] + struct.pack("<IQII", flags & ~FLAG_INDEX_ZSTD, len(new), crc32c(new), 0)
    start = data_start(len(new), flags)
    path.write_bytes(head + new + b"\0" * (start - 32 - len(new)) + data[old_start:])


def test_skipped_records_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "future.apack"
    adapterpack.save(toy(), path)

    def edit(index: dict[str, Any]) -> None:
        m = index["adapters"][0]["modules"][0]
        m["encoding"] = "from-the-future"
        m["must_understand"] = False

    rewrite_index(path, edit)
    (a,) = inspect_path(path)["adapters"]
    assert len(a["skipped"]) == 1 and "from-the-future" in a["skipped"][0]
    assert a["totals"]["modules"] == 6


def test_peft_folder_report(tmp_path: Path) -> None:
    from adapterpack.ops.convert import convert

    src = tmp_path / "a.apack"
    adapter = toy()
    del adapter.modules["model.layers.3.mlp.down_proj"]
    adapter.tensors.clear()
    adapterpack.save(adapter, src)
    convert(src, tmp_path / "peft")
    (tmp_path / "peft" / "README.md").write_text("not counted")
    rep = inspect_path(tmp_path / "peft")
    assert rep["format"] == "peft"
    (a,) = rep["adapters"]
    assert a["source_format"] == "peft"
    assert a["totals"]["modules"] == 6
    assert a["totals"]["decoded_bytes"] == sum(r["decoded_bytes"] for r in inspect_path(src)["adapters"][0]["rows"])
    st = tmp_path / "peft" / "adapter_model.safetensors"
    cfg = tmp_path / "peft" / "adapter_config.json"
    assert rep["file"]["file_size"] == footprint(tmp_path / "peft") == st.stat().st_size + cfg.stat().st_size


def test_unrecognized_input(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UnrecognizedInputError):
        inspect_path(tmp_path / "x.txt")
    with pytest.raises(UnrecognizedInputError):
        inspect_path(tmp_path / "missing.apack")


def test_source_notes_of_the_wrong_type_are_reported_not_raised(tmp_path: Path) -> None:
    adapter = toy()
    adapter.source = {"format": ["not", "a", "string"], "notes": 5}
    adapterpack.save(adapter, tmp_path / "a.apack")
    (a,) = inspect_path(tmp_path / "a.apack")["adapters"]
    assert a["notes"] == ["source['notes'] ignored: not a list of strings (5)"]
    assert a["source_format"] is None


def test_rows_are_in_natural_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = ["layers.10.q", "layers.2.q", "layers.1.q", "embed"]
    mods = {
        n: Module(n, "lora", (4, 4), {"rank": 1, "alpha": 1.0}, {"A": rng.standard_normal((1, 4)), "B": np.zeros((4, 1))})
        for n in names
    }
    tensors = {"t.10": np.zeros(1), "t.9": np.zeros(1)}
    adapterpack.save(Adapter(modules=mods, tensors=tensors), tmp_path / "a.apack")
    (a,) = inspect_path(tmp_path / "a.apack")["adapters"]
    assert [r["module"] for r in a["rows"]] == ["embed", "layers.1.q", "layers.2.q", "layers.10.q", "t.9", "t.10"]


def test_peft_and_kohya_inputs_refuse_other_adapter_names(tmp_path: Path) -> None:
    from adapterpack.ops.convert import convert

    adapter = toy()
    del adapter.modules["model.layers.3.mlp.down_proj"]
    adapter.tensors.clear()
    adapterpack.save(adapter, tmp_path / "a.apack")
    convert(tmp_path / "a.apack", tmp_path / "peft")
    convert(tmp_path / "a.apack", tmp_path / "k.safetensors")
    for path in (tmp_path / "peft", tmp_path / "k.safetensors"):
        assert inspect_path(path, adapter="default")["adapters"][0]["name"] == "default"
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            inspect_path(path, adapter="nope")
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            adapterpack.open(path, adapter="nope")
        with pytest.raises(AdapterNotFoundError, match="'nope'"):
            convert(path, tmp_path / "x.apack", adapter="nope")


def test_bank_totals_count_shared_bases_once(tmp_path: Path) -> None:
    """A bank's members all reference the same U, V blobs: the file totals count each blob once."""
    from adapterpack.bank import build_bank
    from adapterpack.container.reader import ApackReader

    data = Path(__file__).resolve().parent / "data" / "bank_loras.apack"
    inputs = []
    for name in ("lora00", "lora01", "lora02"):
        with adapterpack.open(data, adapter=name) as a:
            a.name = "default"
            adapterpack.save(a, tmp_path / f"{name}.apack")
        inputs.append(tmp_path / f"{name}.apack")
    bank = tmp_path / "bank.apack"
    build_bank(bank, inputs, rank=8, max_iter=5)
    rep = inspect_path(bank)
    with ApackReader(bank) as reader:
        blobs = reader.blobs
        assert rep["totals"]["stored_bytes"] == sum(b.stored_length for b in blobs)
        assert rep["totals"]["decoded_bytes"] == sum(b.length for b in blobs)
    per_member = sum(a["totals"]["stored_bytes"] for a in rep["adapters"])
    assert len(rep["adapters"]) == 3 and per_member > rep["totals"]["stored_bytes"]
