"""The public API: open/save round trip, lazy per-module reads, multi-adapter files."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader
from adapterpack.errors import AdapterNotFoundError, AdapterpackError, DuplicateNameError


def _adapter(name: str = "default", seed: int = 0, n: int = 4) -> Adapter:
    rng = np.random.default_rng(seed)
    mods = {}
    for i in range(n):
        dt = [np.float32, np.float16, ml_dtypes.bfloat16, np.float32][i % 4]
        a = rng.standard_normal((4, 48)).astype(dt)
        b = rng.standard_normal((32, 4)).astype(dt)
        mods[f"layers.{i}.proj"] = Module(f"layers.{i}.proj", "lora", (32, 48), {"rank": 4, "alpha": 8.0}, {"A": a, "B": b})
    return Adapter(name=name, base_model="tiny/base", modules=mods)


@pytest.mark.parametrize("codec", ["raw", "zstd", "byteplanes"])
def test_save_open_bit_exact_and_delta(tmp_path: Path, codec: str) -> None:
    src = _adapter()
    path = tmp_path / "a.apack"
    adapterpack.save(src, path, codec=codec)
    with adapterpack.open(path) as got:
        assert got.base_model == "tiny/base"
        assert list(got.modules) == list(src.modules)
        for name, m in src.modules.items():
            for slot in ("A", "B"):
                x, y = m.tensors[slot], got.module(name).array(slot)
                assert y.dtype == x.dtype and y.shape == x.shape and y.tobytes() == x.tobytes()
            a = m.tensors["A"].astype(np.float64)
            b = m.tensors["B"].astype(np.float64)
            np.testing.assert_allclose(got.delta(name), 2.0 * (b @ a), rtol=1e-5, atol=1e-5)


def test_open_reads_only_the_modules_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(n=8), path, codec="zstd")
    reads: list[int] = []
    original = ApackReader.read_blob

    def counting(self: ApackReader, i: int) -> np.ndarray:
        reads.append(i)
        return original(self, i)

    monkeypatch.setattr(ApackReader, "read_blob", counting)
    ad = adapterpack.open(path)
    assert reads == []  # opening reads the index only
    ad.delta("layers.5.proj")
    assert sorted(reads) == [10, 11]  # module 5's A and B, nothing else


def test_multi_adapter_file(tmp_path: Path) -> None:
    path = tmp_path / "two.apack"
    adapterpack.save([_adapter("x", 1), _adapter("y", 2)], path)
    with pytest.raises(AdapterNotFoundError, match="holds 2 adapters"):
        adapterpack.open(path)
    y = adapterpack.open(path, adapter="y")
    ref = _adapter("y", 2).modules["layers.1.proj"].tensors["A"]
    assert y.module("layers.1.proj").array("A").tobytes() == ref.tobytes()
    with pytest.raises(AdapterNotFoundError, match="no adapter 'z'"):
        adapterpack.open(path, adapter="z")
    with pytest.raises(DuplicateNameError):
        adapterpack.save([_adapter("x"), _adapter("x")], tmp_path / "dup.apack")


def test_missing_module_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "a.apack"
    adapterpack.save(_adapter(), path)
    with pytest.raises(AdapterNotFoundError, match="no module 'nope'"):
        adapterpack.open(path).delta("nope")


def test_closing_one_adapter_keeps_its_siblings_readable(tmp_path: Path) -> None:
    """Adapters from one reader share its mmap: it closes with the last of them, not the first."""
    en, de = _adapter("en", 1, 1), _adapter("de", 2, 1)
    adapterpack.save([en, de], tmp_path / "two.apack", codec="zstd")
    reader = ApackReader(tmp_path / "two.apack")
    got_en, got_de = reader.adapter("en"), reader.adapter("de")
    got_en.close()
    got_en.close()  # twice: still counts once
    assert got_de.module("layers.0.proj").array("A").tobytes() == de.modules["layers.0.proj"].tensors["A"].tobytes()
    got_de.close()
    with pytest.raises(AdapterpackError, match="file is closed") as info:
        reader.read_blob(0)
    assert type(info.value) is AdapterpackError


def test_dora_delta_is_the_direction_update(tmp_path: Path) -> None:
    """Module.delta() of a DoRA record is s·B·A (PEFT's get_delta_weight), magnitude not applied."""
    ad = _adapter(n=1)
    m = ad.modules["layers.0.proj"]
    m.params["dora"] = True
    m.tensors["magnitude"] = np.full(32, 3.0, np.float32)
    adapterpack.save(ad, tmp_path / "d.apack")
    back = adapterpack.open(tmp_path / "d.apack")
    a, b = (m.tensors[s].astype(np.float32) for s in ("A", "B"))
    np.testing.assert_allclose(back.delta("layers.0.proj"), 2.0 * (b @ a), rtol=1e-5, atol=1e-5)
