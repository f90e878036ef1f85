"""The golden vectors in spec/vectors/: each file decodes to its JSON (or raises the named error),
and tools/make_vectors.py regenerates them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import zstandard

import adapterpack
from adapterpack import dtypes, errors
from adapterpack.adapter import StoredTensor, as_array
from adapterpack.container import ApackReader
from tests.apack_builders import load_everything
from tools import make_vectors
from tools.vectors import reference_deltas

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))
REFERENCE = reference_deltas()
ZSTD_VERSION = ".".join(map(str, zstandard.ZSTD_VERSION))


def _doc(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))


def expected_array(t: dict[str, Any]) -> np.ndarray:
    """The array a tensor entry describes (bf16 from its hex bit patterns)."""
    shape = tuple(t["shape"])
    if t["dtype"] == "bfloat16":
        bits = np.array([int(h, 16) for h in np.array(t["values"], dtype=object).reshape(-1)], np.uint16)
        return bits.view(ml_dtypes.bfloat16).reshape(shape)
    return np.array(t["values"], dtype=dtypes.by_name(t["dtype"]).numpy).reshape(shape)


def check_tensor(got: Any, t: dict[str, Any], where: str) -> None:
    assert isinstance(got, StoredTensor), where
    assert (got.dtype, list(got.shape), got.codec) == (t["dtype"], t["shape"], t["codec"]), where
    arr = as_array(got)
    raw = dtypes.as_bytes(arr).tobytes()
    assert hashlib.sha256(raw).hexdigest() == t["sha256"], where
    want = expected_array(t)
    assert hashlib.sha256(want.tobytes()).hexdigest() == t["sha256"], f"{where}: JSON values disagree with its own sha256"
    assert arr.dtype == want.dtype and arr.tobytes() == want.tobytes(), where


def reference_delta(m: dict[str, Any]) -> np.ndarray:
    """ΔW straight from the spec, in float64, from the JSON alone (encodings after 1.0: tools/vectors/)."""
    if m["encoding"] != "lora":
        return REFERENCE[m["encoding"]](m, expected_array)
    p = m["params"]
    a = expected_array(m["tensors"]["A"]).astype(np.float64)
    b = expected_array(m["tensors"]["B"]).astype(np.float64)
    r = p["rank"]
    s = p["alpha"] / (math.sqrt(r) if p.get("rslora", False) else r)
    prod = s * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))
    if p.get("layout", "linear") == "embedding" or p.get("fan_in_fan_out", False):
        prod = prod.T
    return prod.reshape(m["base_shape"])


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_its_json(name: str) -> None:
    doc = _doc(name)
    path = VECTORS / doc["file"]
    assert path.name == f"{name}.apack"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == doc["sha256"]

    if "error" in doc:
        cls = getattr(errors, doc["error"])
        assert issubclass(cls, errors.AdapterpackError)
        with pytest.raises(errors.AdapterpackError) as info:
            load_everything(path, delta_limit=1 << 24)  # factors too: some refusals (svd S order) need the values
        assert type(info.value) is cls, str(info.value)
        if "rank" in doc:  # refused when read at that rank too (spec/format.md §8.1)
            with pytest.raises(errors.AdapterpackError) as info, adapterpack.open(path, rank=doc["rank"]) as at_rank:
                for m in at_rank:
                    m.delta()
            assert type(info.value) is cls, str(info.value)
        return

    reader = ApackReader(path)
    assert reader.version == doc["version"]
    assert reader.adapter_names == [a["name"] for a in doc["adapters"]]
    for want in doc["adapters"]:
        got = reader.adapter(want["name"])
        aw = f"{name}: adapter {want['name']!r}"
        assert (got.base_model, got.base_architecture) == (want["base_model"], want["base_architecture"]), aw
        assert got.metadata == want["metadata"] and got.source == want["source"], aw
        assert list(got.modules) == [m["name"] for m in want["modules"]], aw
        for m in want["modules"]:
            g = got.modules[m["name"]]
            mw = f"{aw} module {m['name']!r}"
            assert (g.encoding, list(g.base_shape), g.params) == (m["encoding"], m["base_shape"], m["params"]), mw
            assert list(g.tensors) == list(m["tensors"]), mw
            for slot, t in m["tensors"].items():
                check_tensor(g.tensors[slot], t, f"{mw} slot {slot}")
            np.testing.assert_allclose(g.delta(), reference_delta(m), rtol=1e-6, atol=1e-6, err_msg=mw)
        assert list(got.tensors) == [t["name"] for t in want["tensors"]], aw
        for t in want["tensors"]:
            check_tensor(got.tensors[t["name"]], t, f"{aw} tensor {t['name']!r}")
        assert len(got.skipped) == len(want["skipped_modules"]), got.skipped
        for skipped in want["skipped_modules"]:
            assert skipped not in got.modules
            assert sum(f"'{skipped}'" in msg for msg in got.skipped) == 1, got.skipped
    report = reader.verify()
    assert report.ok, report.problems


def test_vectors_cover_the_spec() -> None:
    """Every codec, float dtype, layout and option, and the refusals, appear somewhere."""
    docs = [_doc(n) for n in NAMES]
    errors_ = {d["error"] for d in docs if "error" in d}
    assert {"UnsupportedVersionError", "UnknownEncodingError", "UnknownCodecError"} <= errors_
    assert {d["adapters"][0]["modules"][0]["encoding"] for d in docs if "adapters" in d and d["adapters"][0]["modules"]} >= {
        "lora",
        *REFERENCE,
    }, "every encoding with vectors has a readable one"
    tensors, params = [], []
    for d in docs:
        for a in d.get("adapters", []):
            tensors += [t for m in a["modules"] for t in m["tensors"].values()] + a["tensors"]
            params += [m["params"] for m in a["modules"]]
    assert {t["codec"] for t in tensors} == {"raw", "zstd", "byteplanes"}
    assert {"float32", "float16", "bfloat16", "float64", "int64", "uint8", "bool"} <= {t["dtype"] for t in tensors}
    assert {p.get("layout", "linear") for p in params} == {"linear", "embedding", "conv"}
    for option in ("fan_in_fan_out", "dora", "rslora"):
        assert any(p.get(option) for p in params), option
    assert any(d.get("version") == "1.2" and d["adapters"][0]["skipped_modules"] for d in docs if "adapters" in d)
    raw_256 = [t for t in tensors if t["codec"] == "raw" and math.prod(t["shape"]) * dtypes.by_name(t["dtype"]).itemsize >= 4096]
    assert raw_256, "no 256-aligned blob"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    make_vectors.build(out)
    return out


def test_regenerating_gives_the_same_vectors(regenerated: Path) -> None:
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(p.name for p in VECTORS.iterdir())
    for name in NAMES:
        committed, fresh = _doc(name), json.loads((regenerated / f"{name}.json").read_text(encoding="utf-8"))
        old_bytes, new_bytes = (VECTORS / f"{name}.apack").read_bytes(), (regenerated / f"{name}.apack").read_bytes()
        if "zstd_version" not in committed:
            # raw blobs only: the writer's output is fully determined by the spec and the seeds
            assert new_bytes == old_bytes, name
            assert (regenerated / f"{name}.json").read_bytes() == (VECTORS / f"{name}.json").read_bytes(), name
            continue
        # zstd frames: another libzstd version may choose other matches and so write other (equally valid) bytes;
        # the decoded content must still be identical, and the bytes too when the libzstd versions are the same.
        if committed["zstd_version"] == ZSTD_VERSION:
            assert new_bytes == old_bytes, name
            assert fresh == committed, name
        else:
            for doc in (committed, fresh):
                doc.pop("sha256")
                doc.pop("zstd_version")
                for a in doc["adapters"]:
                    for t in [*(t for m in a["modules"] for t in m["tensors"].values()), *a["tensors"]]:
                        t.pop("codec")
            assert fresh == committed, name


def test_generator_writes_byte_identical_output_twice(regenerated: Path, tmp_path: Path) -> None:
    make_vectors.build(tmp_path)
    for p in regenerated.iterdir():
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name


def test_vectors_do_not_follow_the_library_default_levels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_vectors pins each codec's level, so changing a default cannot silently change the golden bytes."""
    from adapterpack.codecs import byteplanes, zstd

    monkeypatch.setattr(zstd, "DEFAULT_LEVEL", 19)
    monkeypatch.setattr(byteplanes, "DEFAULT_LEVEL", 19)
    make_vectors.build(tmp_path)
    for name in ("lora_zstd", "lora_byteplanes", "features_byteplanes", "multi_adapter_zstd"):
        levels = {b["codec"].get("level") for b in ApackReader(tmp_path / f"{name}.apack").index.raw["blobs"]} - {None}
        assert levels and levels <= {make_vectors.LEVELS["zstd"], make_vectors.LEVELS["byteplanes"]}, (name, levels)
        if _doc(name).get("zstd_version") == ZSTD_VERSION:
            assert (tmp_path / f"{name}.apack").read_bytes() == (VECTORS / f"{name}.apack").read_bytes(), name
