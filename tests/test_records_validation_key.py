"""Records validated once per signature (records.build_adapter) still validate every record that differs in what
validation sees: a param of another JSON type (``0`` for ``false``, ``8.0`` for ``8``) is never let through by an
equal-looking record validated before it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.container import ApackReader
from adapterpack.container.records import build_adapter
from adapterpack.errors import AdapterpackError


@pytest.fixture()
def two_alike(tmp_path: Path) -> tuple[dict[str, Any], ApackReader]:
    """An adapter of two lora records that validation sees alike (same shapes, params and dtypes)."""
    rng = np.random.default_rng(0)

    def lora(name: str) -> Module:
        a = rng.standard_normal((2, 6)).astype(np.float32)
        b = rng.standard_normal((8, 2)).astype(np.float32)
        return Module(name, "lora", (8, 6), {"rank": 2, "alpha": 4, "rslora": False}, {"A": a, "B": b})

    path = tmp_path / "two.apack"
    adapterpack.save(Adapter(name="x", modules={m.name: m for m in (lora("one"), lora("two"))}), path, codec="raw")
    reader = ApackReader(path)
    return copy.deepcopy(reader.index.adapters[0]), reader


def _tensor(reader: ApackReader) -> Any:
    def tensor(i: int) -> StoredTensor:
        b = reader.blobs[i]
        return StoredTensor(b.dtype, b.shape, b.stored_length, b.codec_id, lambda: np.zeros(0))

    return tensor


def test_alike_records_build(two_alike: tuple[dict[str, Any], ApackReader]) -> None:
    raw, reader = two_alike
    assert set(build_adapter(raw, reader.blobs, _tensor(reader)).modules) == {"one", "two"}


@pytest.mark.parametrize(("key", "value"), [("rslora", 0), ("rank", 2.0), ("rank", True), ("alpha", "4")])
def test_a_param_of_another_type_is_validated(two_alike: tuple[dict[str, Any], ApackReader], key: str, value: Any) -> None:
    raw, reader = two_alike
    raw["modules"][1]["params"][key] = value  # equal in Python (0 == False, 2.0 == 2, True == 1) but another JSON value
    with pytest.raises(AdapterpackError, match="module 'two'"):
        build_adapter(raw, reader.blobs, _tensor(reader))
