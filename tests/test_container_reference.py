"""tools/vectors/_container_reference.py, a reader of `.apack` bytes written from spec/format.md alone, against the
golden vectors (spec/vectors/ and its version folders) and against files adapterpack itself writes.

What the container reader does not do, and so what these tests skip:
- the rules of the encodings specified outside format.md (svd.md, shared.md, nola.md, qsvd.md: ranks, params,
  generator ids, ordered or finite S, coefficients, scales, code lengths). The refusal vectors of those rules
  (``ENCODING_RULES`` below) must read cleanly as containers: their defect is in what the records mean, which
  tools/vectors/_reference.py and the library check, not in the container;
- ΔW (``delta``): the reader decodes tensors, which are checked bit for bit against the JSON's ``values``; ΔW is then
  _reference.py's maths on those same values, which tests/test_vectors.py already checks;
- reads at a rank (``"rank": j``, format.md §8.1): the reader reads every blob whole, so it checks ``crc32c``
  (which such a vector also breaks: its ``error`` holds for a whole read) and never needs a prefix checkpoint.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.vectors import _container_reference as ref
from tools.vectors._reference import array as json_array

REPO = Path(__file__).resolve().parents[1]
VECTORS = REPO / "spec" / "vectors"
CASES = sorted(p.relative_to(VECTORS).with_suffix("").as_posix() for p in VECTORS.rglob("*.json"))

#: Refusal vectors whose defect is a rule of an encoding's own spec (svd.md, shared.md, nola.md, qsvd.md).
ENCODING_RULES = {
    "nola_coefficient_not_finite", "nola_count_mismatch", "nola_generated_over_limit", "nola_rank_too_large",
    "nola_unknown_generator", "nola_unknown_generator_version", "qsvd_bits_count", "qsvd_bits_invalid",
    "qsvd_codes_short", "qsvd_group_size_zero", "qsvd_huge_shape", "qsvd_s_negative", "qsvd_scale_not_finite",
    "shared_rank_mismatch", "svd_rank_mismatch", "svd_s_increasing", "svd_s_not_finite",
}  # fmt: skip
#: Old vectors whose defect a later version defines (format.md §9): their JSON keeps the error of their own version.
SUPERSEDED = {"v1.2/preamble_must_understand_flag": "IndexFormatError"}  # bit 0: now the compressed-index flag
NOW_READABLE = {"v1.4/preamble_must_understand_flag"}  # bit 2: now the implied flag, and both keys are present

ALLOWED_IMPORTS = {
    "__future__", "json", "math", "struct", "dataclasses", "typing",
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
    name = case.rsplit("/", 1)[-1]
    error = SUPERSEDED.get(case, d.get("error"))
    if case in NOW_READABLE:
        error = None
    if name in ENCODING_RULES:
        assert error and name.split("_")[0] in ("nola", "qsvd", "shared", "svd")
        ref.read(data)  # a valid container: its defect is in an encoding's own rules
        return
    if error:
        with pytest.raises(ref.AdapterpackError) as caught:
            ref.read(data)
        assert type(caught.value).__name__ == error, (caught.value, error)
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
    tree = ast.parse((REPO / "tools" / "vectors" / "_container_reference.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
    code = (
        "import pathlib, sys\n"
        "from tools.vectors import _container_reference as ref\n"
        "n = 0\n"
        "for p in sorted(pathlib.Path('spec/vectors').rglob('*.apack')):\n"
        "    try:\n"
        "        ref.read(p.read_bytes()); n += 1\n"
        "    except ref.AdapterpackError:\n"
        "        pass\n"
        "print(n, sorted(m for m in sys.modules if m.split('.')[0] == 'adapterpack'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert int(out[0]) > 0 and out[1].strip() == "[]", out


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
