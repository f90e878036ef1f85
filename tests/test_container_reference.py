"""tools/vectors/_container_reference.py, a reader of `.apack` bytes written from spec/format.md and the encoding pages
(svd.md, shared.md, nola.md, qsvd.md) alone, against the golden vectors (spec/vectors/ and its version folders) and
against files adapterpack itself writes.

Every vector is checked fully: a refusal vector is refused with exactly its ``error``, also when opened at its
``rank`` (format.md §8.1); a readable one decodes bit for bit to its JSON's tensors, whole and at every rank. What the
reader does not do is compute ΔW (``delta``): it decodes the tensors, checked bit for bit against the JSON's
``values``; ΔW is then _reference.py's maths on those same values, which tests/test_vectors.py already checks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.independence import assert_independent
from tools.vectors import _container_reference as ref
from tools.vectors._reference import array as json_array

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "spec" / "vectors"
CASES = sorted(p.relative_to(VECTORS).with_suffix("").as_posix() for p in VECTORS.rglob("*.json"))

#: Old vectors whose defect a later version defines (format.md §9): their JSON keeps the error of their own version.
SUPERSEDED = {"v1.2/preamble_must_understand_flag": "IndexFormatError"}  # bit 0: now the compressed-index flag
NOW_READABLE = {"v1.4/preamble_must_understand_flag"}  # bit 2: now the implied flag, and both keys are present

ALLOWED_IMPORTS = {
    "__future__", "json", "math", "struct", "dataclasses", "typing", "collections.abc",
    "numpy", "ml_dtypes", "zstandard", "pcodec.wrapped", "crc32c",
}  # fmt: skip


def _doc(case: str) -> dict[str, Any]:
    return json.loads((VECTORS / f"{case}.json").read_text(encoding="utf-8"))


def _check_array(got: np.ndarray, t: dict[str, Any], where: str) -> None:
    """spec/vectors.md §4: dtype, shape, SHA-256 of the decoded bytes, and the values bit for bit."""
    want = json_array(t)
    assert got.dtype == want.dtype and list(got.shape) == t["shape"], (where, got.dtype, got.shape)
    assert got.tobytes() == want.tobytes(), where
    assert hashlib.sha256(np.ascontiguousarray(got).tobytes()).hexdigest() == t["sha256"], where


@pytest.mark.parametrize("case", CASES)
def test_vector(case: str) -> None:
    d = _doc(case)
    data = (VECTORS / f"{case}.apack").read_bytes()
    assert hashlib.sha256(data).hexdigest() == d["sha256"]
    error = SUPERSEDED.get(case, d.get("error"))
    if case in NOW_READABLE:
        error = None
    if error:
        for rank in (None, d["rank"]) if "rank" in d else (None,):  # whole, then opened at rank j (vectors.md §1)
            with pytest.raises(ref.AdapterpackError) as caught:
                ref.read(data, rank=rank)
            assert type(caught.value).__name__ == error, (rank, caught.value, error)
            assert type(caught.value) is getattr(ref, error)
        return
    apack = ref.read(data)
    assert "{}.{}".format(*apack.version) == d["version"]
    problems = d.get("verify_problems", [])
    assert len(apack.padding_problems) == len(problems)
    assert all(want in got for want, got in zip(problems, apack.padding_problems)), apack.padding_problems
    if case in NOW_READABLE:
        return
    assert [a.name for a in apack.adapters] == [a["name"] for a in d["adapters"]]
    for got, want in zip(apack.adapters, d["adapters"]):
        assert (got.base_model, got.base_architecture) == (want["base_model"], want["base_architecture"])
        assert (got.metadata, got.source) == (want["metadata"], want["source"])
        assert got.skipped_modules == want["skipped_modules"]
        assert got.skipped_tensors == want.get("skipped_tensors", [])
        assert [m.name for m in got.modules] == [m["name"] for m in want["modules"]]
        for m, wm in zip(got.modules, want["modules"]):
            assert (m.encoding, m.base_shape, m.params) == (wm["encoding"], wm["base_shape"], wm["params"]), m.name
            assert sorted(m.tensors) == sorted(wm["tensors"]), m.name
            for slot, t in wm["tensors"].items():
                _check_array(m.tensors[slot], t, f"{got.name} {m.name} {slot}")
        assert list(got.tensors) == [t["name"] for t in want["tensors"]]
        for t in want["tensors"]:
            _check_array(got.tensors[t["name"]], t, f"{got.name} {t['name']}")


READABLE = [c for c in CASES if "error" not in _doc(c)]


@pytest.mark.parametrize("case", READABLE)
def test_a_rank_read_is_the_truncation(case: str) -> None:
    """Opened at rank j (format.md §8.1), every svd and qsvd record is its rank-min(j, k) truncation (svd.md §3,
    qsvd.md §3): S, Ut, Vt cut to j rows, ``data`` to its first j components' bytes; every other record reads whole."""
    if case in NOW_READABLE:
        return
    data = (VECTORS / f"{case}.apack").read_bytes()
    whole = ref.read(data)
    ranks = [m.params["rank"] for a in whole.adapters for m in a.modules if m.encoding in ("svd", "qsvd")]
    for j in range(max(ranks, default=0) + 2) if ranks else (1,):
        got = ref.read(data, rank=j)
        for a, wa in zip(got.adapters, whole.adapters, strict=True):
            assert a.tensors.keys() == wa.tensors.keys()
            for m, wm in zip(a.modules, wa.modules, strict=True):
                k = wm.params["rank"]
                if m.encoding not in ("svd", "qsvd"):
                    assert m.params == wm.params and all(m.tensors[s].tobytes() == wm.tensors[s].tobytes() for s in wm.tensors)
                    continue
                cut = {"rank": min(j, k)} | ({"bits": wm.params["bits"][:j]} if "bits" in wm.params else {})
                assert m.params == wm.params | cut
                for slot, arr in m.tensors.items():
                    if slot == "data":  # the first components' bytes: a prefix, whole at j >= k
                        assert wm.tensors[slot].tobytes().startswith(arr.tobytes()) and (j < k or arr.size == wm.tensors[slot].size)
                    else:
                        assert arr.shape[0] == min(j, k) and arr.tobytes() == wm.tensors[slot][: min(j, k)].tobytes(), slot


def _blob_start(data: bytes, module: str, slot: str) -> tuple[int, int]:
    """Where a module's raw blob starts in the file, and its stored length (the reader's own stages 1-5)."""
    _, _, flags, length, crc = ref._preamble(data)
    doc = ref._parse_json(ref._index_text(data[32 : 32 + length], flags, crc))
    blobs = [ref._blob(b, flags) for b in doc["blobs"]]
    start = 32 + length if flags & ref.FLAG_UNALIGNED else ref.align_up(32 + length, 256)
    ref._layout(blobs, flags, start, len(data))
    (i,) = (m["tensors"][slot] for m in doc["adapters"][0]["modules"] if m["name"] == module)
    return start + blobs[i].offset, blobs[i].stored_length


@pytest.mark.parametrize(
    ("case", "slot", "reads"),
    [
        # Vt [4, 96], checkpoints 1, 2: ranks 0-2 read at most 2 rows; rank 3 needs c = 4 >= R, the whole blob
        ("svd_raw", "Vt", {0, 1, 2}),
        # data [1236], components of 324, 184, 164, 144, 124, 104, 84, 64, 44 bytes: rank 5's prefix (940 bytes) is
        # checked by the 1024-byte checkpoint, rank 6's (1044) would need 2048 >= R, the whole blob
        ("qsvd_raw", "data", {0, 1, 2, 3, 4, 5}),
    ],
)  # fmt: skip
def test_a_rank_read_checks_only_what_it_reads(case: str, slot: str, reads: set[int]) -> None:
    """§8.1: a rank-j read of a raw blob reads and checks only the rows up to its checkpoint, so a flipped bit in the
    blob's last byte is not met below the rank whose checkpoint covers it; a whole read meets it (``crc32c``)."""
    module = "model.layers.0.self_attn.q_proj"
    data = bytearray((VECTORS / f"{case}.apack").read_bytes())
    start, length = _blob_start(bytes(data), module, slot)
    data[start + length - 1] ^= 1
    (k,) = (m["params"]["rank"] for m in _doc(case)["adapters"][0]["modules"] if m["name"] == module)
    for j in [*range(k + 2), None]:
        if j in reads:
            ref.read(bytes(data), rank=j)
        else:
            with pytest.raises(ref.ChecksumError):
                ref.read(bytes(data), rank=j)


def test_every_error_class_is_the_spec_hierarchy() -> None:
    """§10.1's classes and parents, and every refusal vector names one of them."""
    parents = {
        "FormatError": "AdapterpackError", "TruncatedFileError": "FormatError", "BadMagicError": "FormatError",
        "UnsupportedVersionError": "FormatError", "IndexTooLargeError": "FormatError", "IndexFormatError": "FormatError",
        "DuplicateNameError": "IndexFormatError", "LayoutError": "FormatError", "LengthMismatchError": "FormatError",
        "ChecksumError": "FormatError", "UnknownDTypeError": "FormatError", "UnknownCodecError": "FormatError",
        "UnknownEncodingError": "FormatError", "CodecError": "FormatError", "RecordError": "FormatError",
        "RankError": "RecordError", "GeneratorError": "RecordError",
    }  # fmt: skip
    for name, parent in parents.items():
        assert getattr(ref, name).__bases__ == (getattr(ref, parent),), name
    assert {_doc(c)["error"] for c in CASES if "error" in _doc(c)} <= set(parents)


def test_reference_reader_does_not_import_the_library() -> None:
    """As for _reference.py (tests/test_vectors.py): statically, and in a fresh interpreter that reads every vector."""
    assert_independent(
        "_container_reference",
        ALLOWED_IMPORTS,
        "for p in sorted(pathlib.Path('spec/vectors').rglob('*.apack')):\n"
        "    try:\n"
        "        mod.read(p.read_bytes()); n += 1\n"
        "    except mod.AdapterpackError:\n"
        "        pass\n",
    )


# ---------------------------------------------------------------------------------------------------------------
# Differential: files adapterpack writes from its bundled example, through its public API and CLI only


def _cli(*args: str) -> None:
    """The installed `adapterpack` console script, run in this process (a subprocess would re-import for seconds)."""
    (entry,) = (e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "adapterpack")
    main = entry.load()
    try:
        main(list(args), standalone_mode=False)
    except SystemExit as e:  # pragma: no cover - a failing command
        assert not e.code, args


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import adapterpack
    from adapterpack.examples import __file__ as examples_init

    example = Path(examples_init).parent / "smollm2-pydoc-lora"
    out = tmp_path_factory.mktemp("written")
    files = {}
    ad = adapterpack.open(example)
    for codec in ("raw", "zstd", "byteplanes", "pco"):
        files[f"fp32-{codec}"] = out / f"fp32-{codec}.apack"
        adapterpack.save(ad, files[f"fp32-{codec}"], codec=codec)
    for dtype, codec in (("fp16", "pco"), ("bf16", "byteplanes"), ("bf16", "pco"), ("fp16", "raw")):
        files[f"{dtype}-{codec}"] = out / f"{dtype}-{codec}.apack"
        _cli("convert", str(files["fp32-raw"]), str(files[f"{dtype}-{codec}"]), "--dtype", dtype, "--codec", codec, "--no-progress")
    files["bank"] = out / "bank.apack"
    _cli("bank", "build", str(files["bank"]), str(files["fp32-raw"]), str(files["bf16-pco"]), "--name", "a", "--name", "b",
         "-r", "2", "--max-iter", "1", "--dtype", "bfloat16", "--no-progress")  # fmt: skip
    return files


@pytest.mark.parametrize("kind", ["fp32-raw", "fp32-zstd", "fp32-byteplanes", "fp32-pco", "fp16-pco", "bf16-byteplanes",
                                  "bf16-pco", "fp16-raw", "bank"])  # fmt: skip
def test_reads_what_adapterpack_writes(written: dict[str, Path], kind: str) -> None:
    import adapterpack

    apack = ref.read(written[kind].read_bytes())
    assert len(apack.adapters) == (2 if kind == "bank" else 1)
    assert not apack.padding_problems
    dtypes = set()
    for got in apack.adapters:
        with adapterpack.open(written[kind], adapter=got.name) as want:
            assert (got.name, got.base_model, got.base_architecture) == (want.name, want.base_model, want.base_architecture)
            assert (got.metadata, got.source) == (dict(want.metadata), dict(want.source))
            assert not got.skipped_modules and not want.skipped
            assert [m.name for m in got.modules] == [m.name for m in want]
            for m in got.modules:
                wm = want.module(m.name)
                assert (m.encoding, list(m.base_shape)) == (wm.encoding, list(wm.base_shape))
                assert {k: v for k, v in wm.params.items() if k in m.params} == m.params
                assert sorted(m.tensors) == sorted(wm.tensors), m.name
                for slot, arr in m.tensors.items():
                    lib = np.asarray(wm.array(slot))
                    assert arr.dtype == lib.dtype and arr.shape == lib.shape, (m.name, slot)
                    assert arr.tobytes() == lib.tobytes(), (m.name, slot)
                    dtypes.add(arr.dtype.name)
            assert sorted(got.tensors) == sorted(want.tensors)
            for name, arr in got.tensors.items():
                assert arr.tobytes() == np.asarray(want.tensors[name].load()).tobytes(), name
    expected = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "bank": "bfloat16"}[kind.split("-")[0]]
    assert expected in dtypes, dtypes
