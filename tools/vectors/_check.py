"""Check the library against one golden vector (spec/vectors.md): what ``tests/test_vectors.py`` runs.

:func:`check` opens ``NAME.apack`` with adapterpack and compares what it decodes with ``NAME.json``:
every tensor bit for bit, every module's ΔW (numpy ``Module.delta`` and, when torch is installed,
the torch decoders through ``adapterpack.torch.load`` + ``materialize``) against the JSON's
``delta`` within :data:`DELTA_TOLERANCE`, and for a refusal vector the exact error class. Any
disagreement is an ``AssertionError`` naming the vector, adapter, module and slot.
``tools/hostile/wrong_delta.py`` runs it against a deliberately wrong library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack import dtypes, errors
from adapterpack.adapter import StoredTensor, as_array
from adapterpack.container import ApackReader
from tools.fuzz_open import load_everything
from tools.vectors._reference import array

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
#: spec/vectors.md: a reader's ΔW agrees with ``delta`` when max|got − delta| ≤ 1e-5 · max(1, max|delta|), per module.
DELTA_TOLERANCE = 1e-5
HAS_TORCH = importlib.util.find_spec("torch") is not None


def names(folder: Path = VECTORS) -> list[str]:
    """The vectors in ``folder``, sorted."""
    return sorted(p.stem for p in folder.glob("*.json"))


def doc(name: str, folder: Path = VECTORS) -> dict[str, Any]:
    """A vector's JSON."""
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def delta_of(m: dict[str, Any]) -> np.ndarray:
    """A module entry's ``delta`` as a float64 array of its ``base_shape``."""
    return np.array(m["delta"], dtype=np.float64).reshape(m["base_shape"])  # "NaN", "Infinity", "-Infinity" too


def check_delta(got: Any, want: np.ndarray, where: str) -> None:
    """``got`` agrees with the vector's ΔW ``want`` (float64) in shape and within the stated tolerance."""
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, f"{where}: ΔW shape {list(got.shape)}, vector says {list(want.shape)}"
    for kind, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        assert np.array_equal(test(got), test(want)), f"{where}: ΔW has {kind} elsewhere than the vector's delta"
    finite = np.isfinite(want)
    bound = DELTA_TOLERANCE * max(1.0, float(np.abs(want[finite]).max(initial=0.0)))
    err = float(np.abs(got[finite] - want[finite]).max(initial=0.0))
    assert err <= bound, f"{where}: ΔW differs from the vector's delta by {err:.3g} (tolerance {bound:.3g})"


def check_tensor(got: Any, t: dict[str, Any], where: str) -> None:
    """A decoded tensor is the entry's dtype, shape and codec, and its bytes are the entry's values and SHA-256."""
    assert isinstance(got, StoredTensor), where
    assert (got.dtype, list(got.shape), got.codec) == (t["dtype"], t["shape"], t["codec"]), where
    arr = as_array(got)
    raw = dtypes.as_bytes(arr).tobytes()
    assert hashlib.sha256(raw).hexdigest() == t["sha256"], where
    want = array(t)
    assert hashlib.sha256(want.tobytes()).hexdigest() == t["sha256"], f"{where}: JSON values disagree with its own sha256"
    assert arr.dtype == want.dtype and arr.tobytes() == want.tobytes(), where


def check_refused(path: Path, d: dict[str, Any]) -> None:
    """Reading everything in the file raises exactly the vector's error class."""
    cls = getattr(errors, d["error"])
    assert isinstance(cls, type) and issubclass(cls, errors.AdapterpackError), d["error"]
    try:
        load_everything(path, delta_limit=1 << 24)  # factors too: some refusals (svd S order) need the values
    except errors.AdapterpackError as e:
        assert type(e) is cls, f"{path.name}: raised {type(e).__name__} ({e}), vector says {d['error']}"
    else:
        raise AssertionError(f"{path.name}: read without error, vector says {d['error']}")
    if "rank" in d:  # refused when read at that rank too (spec/format.md §8.1)
        try:
            with adapterpack.open(path, rank=d["rank"]) as at_rank:
                for m in at_rank:
                    m.delta()
        except errors.AdapterpackError as e:
            assert type(e) is cls, f"{path.name} at rank {d['rank']}: raised {type(e).__name__} ({e}), vector says {d['error']}"
        else:
            raise AssertionError(f"{path.name}: read at rank {d['rank']} without error, vector says {d['error']}")


def check_torch(path: Path, d: dict[str, Any]) -> None:
    """The torch decoders' ΔW (``adapterpack.torch.load`` + ``materialize``) agrees with every module's ``delta``."""
    from adapterpack.torch import load, materialize

    for want in d["adapters"]:
        loaded = load(path, adapter=want["name"])
        assert sorted(loaded) == sorted(m["name"] for m in want["modules"]), f"{path.name}: adapter {want['name']!r} (torch)"
        for m in want["modules"]:
            where = f"{path.name}: adapter {want['name']!r} module {m['name']!r} (torch)"
            check_delta(materialize(loaded[m["name"]]).numpy(), delta_of(m), where)


def check(name: str, folder: Path = VECTORS, torch: bool = HAS_TORCH) -> None:
    """The library decodes vector ``name`` to its JSON, or refuses it with the JSON's error."""
    d = doc(name, folder)
    path = folder / d["file"]
    assert path.name == f"{name}.apack"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == d["sha256"], f"{name}: file differs from its JSON's sha256"
    if "error" in d:
        check_refused(path, d)
        return
    reader = ApackReader(path)
    assert reader.version == d["version"]
    assert reader.adapter_names == [a["name"] for a in d["adapters"]]
    for want in d["adapters"]:
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
            with np.errstate(invalid="ignore", over="ignore"):  # non_finite_values: NaN and inf are the expected ΔW
                got_delta = g.delta()
            check_delta(got_delta, delta_of(m), mw)
        assert list(got.tensors) == [t["name"] for t in want["tensors"]], aw
        for t in want["tensors"]:
            check_tensor(got.tensors[t["name"]], t, f"{aw} tensor {t['name']!r}")
        skipped_tensors = want.get("skipped_tensors", [])
        assert len(got.skipped) == len(want["skipped_modules"]) + len(skipped_tensors), got.skipped
        for skipped in want["skipped_modules"]:
            assert skipped not in got.modules
            assert sum(f"module '{skipped}'" in msg for msg in got.skipped) == 1, got.skipped
        for skipped in skipped_tensors:
            assert skipped not in got.tensors
            assert sum(f"tensor '{skipped}'" in msg for msg in got.skipped) == 1, got.skipped
    report = reader.verify()
    want_problems = d.get("verify_problems", [])
    assert len(report.problems) == len(want_problems), f"{name}: verify found {report.problems}, vector says {want_problems}"
    for problem, expected in zip(report.problems, want_problems, strict=True):
        assert expected in problem, f"{name}: verify found {problem!r}, vector says {expected!r}"
    if torch:
        check_torch(path, d)
