"""The golden vectors in spec/vectors/: each file decodes to its JSON (or raises the named error),
and tools/make_vectors.py regenerates them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import zstandard

from adapterpack import codecs, dtypes, encodings, errors
from adapterpack.container import ApackReader
from tests.independence import assert_independent
from tools import make_vectors
from tools.fuzz_open import load_everything
from tools.hostile import wrong_delta
from tools.vectors import _check, _reference
from tools.vectors._check import doc as _doc

REPO = Path(__file__).resolve().parents[1]
VECTORS = _check.VECTORS
NAMES = _check.names()
#: Vectors of earlier versions, kept as their writer made them (spec/format.md §9): still read as their JSON says.
OLD = {folder.name: _check.names(folder) for folder in sorted(VECTORS.glob("v*")) if folder.is_dir()}
OLD_CASES = [(version, name) for version, names in OLD.items() for name in names]
#: Old refusal vectors whose defect a later version defined: 1.2's "flag bit 0 set" is 1.3's compressed-index flag, so
#: a 1.3 reader takes the plain JSON after it for a zstd frame (the 1.3 vector of an unknown flag sets bit 2).
SUPERSEDED = {("v1.2", "preamble_must_understand_flag"): "IndexFormatError"}
#: 1.4's vector of an unknown must-understand flag sets bit 2, which 1.5 defines (implied offsets and lengths: optional
#: keys), so a 1.5 reader reads that file, whose plain index still holds both keys (the 1.5 vector sets bit 4).
NOW_READABLE = {("v1.4", "preamble_must_understand_flag")}
ZSTD_VERSION = ".".join(map(str, zstandard.ZSTD_VERSION))


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_its_json(name: str) -> None:
    """Tensors bit for bit, ΔW (numpy and torch decoders) within the stated tolerance, or the named error."""
    _check.check(name)


@pytest.mark.parametrize("case", OLD_CASES, ids=[f"{v}/{n}" for v, n in OLD_CASES])
def test_old_version_vector_still_reads(case: tuple[str, str]) -> None:
    """A vector of 1.2 (written before the compact index and the packed layout) decodes as its JSON says, or is refused
    with its error: files of earlier versions stay readable."""
    version, name = case
    folder = VECTORS / version
    d = _doc(name, folder)
    if (version, name) in SUPERSEDED:  # its defect is a feature now: refused for another reason
        d = d | {"error": SUPERSEDED[version, name]}
        _check.check_refused(folder / d["file"], d)
        return
    if (version, name) in NOW_READABLE:  # its defect is a feature now that changes nothing in this file
        load_everything(folder / d["file"])
        return
    minor = int(version.split(".")[1])
    assert "error" in d or d["version"] == f"1.{make_vectors.FUTURE_MINOR}" or int(d["version"].split(".")[1]) <= minor, (
        name,
        d["version"],
    )
    _check.check(name, folder, torch=False)


def test_old_versions_are_kept() -> None:
    """The 1.2 vectors are kept whole: every name of 1.2 is there (a vector may change, it may not vanish). Of 1.4's, the
    readable ones a 1.5 writer writes differently (a compressed index, now without BLOB offsets and lengths; a bank of
    compressed blobs, now packed) are kept, and the flag vector whose bit 1.5 defines."""
    assert "v1.2" in OLD and len(OLD["v1.2"]) >= 78
    assert {n for n in OLD["v1.2"] if n.startswith(("lora_", "features_", "multi_adapter"))} <= set(NAMES)
    kept = set(OLD["v1.4"])
    assert {"lora_zstd", "lora_byteplanes", "multi_adapter_zstd", "qsvd_raw", "svd_byteplanes", "features_byteplanes",
            "shared_full_byteplanes", "preamble_must_understand_flag"} <= kept
    assert kept <= set(NAMES)
    for name in kept - {"preamble_must_understand_flag"}:
        old = (VECTORS / "v1.4" / f"{name}.apack").read_bytes()
        assert old[10:12] == b"\x04\x00", name
        # more than the minor version differs from what this version's writer makes of the same adapters
        assert old[:10] + b"\x05\x00" + old[12:] != (VECTORS / f"{name}.apack").read_bytes(), name


@pytest.mark.parametrize("name", [n for n in NAMES if "error" not in _doc(n)])
def test_every_module_carries_the_spec_delta(name: str) -> None:
    """Each module's ``delta`` is what the spec's formulas give from the JSON's own values (not edited, not stale)."""
    for a in _doc(name)["adapters"]:
        for m in a["modules"]:
            assert "delta" in m, (name, m["name"])
            want = _reference.delta(m)
            np.testing.assert_array_equal(_check.delta_of(m), want, err_msg=f"{name} {a['name']} {m['name']}")  # NaN == NaN


def test_refusal_vectors_name_an_error_class_of_the_spec() -> None:
    refused = [_doc(n) for n in NAMES if "error" in _doc(n)]
    assert refused
    for d in refused:
        cls = getattr(errors, d["error"], None)
        assert isinstance(cls, type) and issubclass(cls, errors.AdapterpackError), d["file"]
        assert "adapters" not in d, d["file"]


REFERENCE_IMPORTS = {"__future__", "math", "collections.abc", "typing", "numpy", "ml_dtypes"}


def test_reference_delta_does_not_import_the_library() -> None:
    """tools/vectors/_reference.py, which computes every vector's ΔW, imports nothing of adapterpack (or tools)."""
    assert_independent(
        "_reference",
        REFERENCE_IMPORTS,
        "for p in sorted(pathlib.Path('spec/vectors').glob('*.json')):\n"
        "    for a in json.loads(p.read_text(encoding='utf-8')).get('adapters', []):\n"
        "        for m in a['modules']:\n"
        "            mod.delta(m); n += 1\n",
    )


@pytest.mark.parametrize("encoding", sorted(wrong_delta.PERTURBATIONS))
def test_a_wrong_delta_fails_every_vector_holding_it(encoding: str) -> None:
    """The auditor's experiment: a library whose ΔW is wrong for one encoding fails exactly the vectors holding it."""
    holders = wrong_delta.holders(encoding)
    assert holders, f"no vector holds a nonzero {encoding} module"
    assert sorted(wrong_delta.failures(encoding)) == sorted(holders)
    for name in holders:  # and the library itself, unperturbed, passes them
        _check.check(name, torch=False)


def test_the_delta_check_bites_below_the_tolerance_only() -> None:
    """A ΔW off by twice the tolerance fails; one off by half of it passes."""
    want = np.array([[0.5, -2.0], [0.0, 4.0]])
    bound = _check.DELTA_TOLERANCE * 4.0
    _check.check_delta(want + bound / 2, want, "half")
    with pytest.raises(AssertionError, match="differs"):
        _check.check_delta(want + 2 * bound, want, "twice")
    with pytest.raises(AssertionError, match="NaN elsewhere"):
        _check.check_delta(np.full_like(want, np.nan), want, "nan")
    with_inf = want.copy()
    with_inf[0, 0] = np.inf
    _check.check_delta(with_inf, with_inf.copy(), "same inf")
    with pytest.raises(AssertionError, match="inf elsewhere"):
        _check.check_delta(want, with_inf, "inf missing")


@pytest.mark.skipif(not _check.HAS_TORCH, reason="torch not installed")
def test_a_wrong_torch_decoder_fails_the_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch side of the check bites too: torch lora factors with a wrong scale fail lora_raw_4x6."""
    from adapterpack.torch import decoders

    entry = decoders.base._REGISTRY["lora"]
    wrong = lambda module, device, dtype: dataclasses.replace(entry.fn(module, device, dtype), scale=-1.0)  # noqa: E731
    monkeypatch.setitem(decoders.base._REGISTRY, "lora", dataclasses.replace(entry, fn=wrong))
    with pytest.raises(AssertionError, match="torch"):
        _check.check("lora_raw_4x6")


def test_vectors_cover_the_spec() -> None:
    """Every codec, float dtype, layout and option, and the refusals, appear somewhere."""
    docs = [_doc(n) for n in NAMES]
    errors_ = {d["error"] for d in docs if "error" in d}
    assert {"UnsupportedVersionError", "UnknownEncodingError", "UnknownCodecError"} <= errors_
    readable = {m["encoding"] for d in docs for a in d.get("adapters", []) for m in a["modules"]}
    assert readable == set(_reference.DELTAS) == set(encodings.encoding_ids()), "every encoding has a readable vector and a ΔW"
    tensors, params = [], []
    for d in docs:
        for a in d.get("adapters", []):
            tensors += [t for m in a["modules"] for t in m["tensors"].values()] + a["tensors"]
            params += [m["params"] for m in a["modules"]]
    assert {t["codec"] for t in tensors} == set(codecs.codec_ids())
    assert {"float32", "float16", "bfloat16", "float64", "int64", "uint8", "bool"} <= {t["dtype"] for t in tensors}
    assert {p.get("layout", "linear") for p in params} == {"linear", "embedding", "conv"}
    for option in ("fan_in_fan_out", "dora", "rslora"):
        assert any(p.get(option) for p in params), option
    newer = f"1.{make_vectors.FUTURE_MINOR}"  # a minor newer than this reader, with records it skips
    assert any(d.get("version") == newer and d["adapters"][0]["skipped_modules"] for d in docs if "adapters" in d)
    raw_256 = [t for t in tensors if t["codec"] == "raw" and math.prod(t["shape"]) * dtypes.by_name(t["dtype"]).itemsize >= 4096]
    assert raw_256, "no 256-aligned blob"
    # 1.3 (format.md §1.1–§1.3): readable files with each flag combination a writer makes, a compressed blob at an
    # offset the 1.2 rule would not allow, and refusals of hostile compressed indexes and of each layout under the other flag
    flags = {}
    for n in NAMES:
        raw = (VECTORS / f"{n}.apack").read_bytes()
        if len(raw) >= 32 and "error" not in _doc(n):
            flags[n] = int.from_bytes(raw[12:16], "little") & 0xFFFF
    assert {0, 1, 3} <= set(flags.values()), flags
    packed = ApackReader(VECTORS / "layout_packed_zstd.apack")
    assert any(b.codec_id != "raw" and b.offset % 8 for b in packed.blobs)
    refused = {_doc(n)["error"] for n in NAMES if n.startswith(("index_zstd", "layout_")) and "error" in _doc(n)}
    assert {"IndexTooLargeError", "IndexFormatError", "LayoutError"} <= refused


def test_vectors_are_distinct_and_hold_the_codec_they_name() -> None:
    """No two vectors are the same file, and one named for a codec stores blobs with it (compression paid)."""
    files = {(VECTORS / f"{n}.apack").read_bytes() for n in NAMES}
    assert len(files) == len(NAMES)
    for name in NAMES:
        codec = name.rsplit("_", 1)[-1]
        if codec in ("zstd", "byteplanes", "pco") and "error" not in _doc(name):
            used = {b["codec"]["id"] for b in ApackReader(VECTORS / f"{name}.apack").index.raw["blobs"]}
            assert codec in used, (name, used)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vectors")
    make_vectors.build(out)
    return out


def test_regenerating_gives_the_same_vectors(regenerated: Path) -> None:
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(p.name for p in VECTORS.iterdir() if p.is_file())
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


def test_writer_refuses_bool_bytes_the_reader_would_refuse(tmp_path: Path) -> None:
    """spec/format.md §3: writers write bool elements as 0 or 1 only, so they never write a file readers refuse."""
    from adapterpack.adapter import Adapter
    from adapterpack.container.writer import write_apack

    odd = np.array([1, 2], np.uint8).view(np.bool_)
    with pytest.raises(errors.CodecError, match="bool"):
        write_apack(tmp_path / "b.apack", Adapter("a", tensors={"mask": odd}), codec="raw")
    assert not (tmp_path / "b.apack").exists()


def test_vectors_md_documents_the_json_and_its_tolerance() -> None:
    """spec/vectors.md states the tolerance the check uses and every key the vectors' JSON holds."""
    text = (REPO / "spec" / "vectors.md").read_text(encoding="utf-8")
    assert "max |ΔW_reader − delta|  <=  1e-5 · max(1, max |delta|)" in text and _check.DELTA_TOLERANCE == 1e-5
    keys: set[str] = set()
    for name in NAMES:
        d = _doc(name)
        keys |= set(d)
        for a in d.get("adapters", []):
            keys |= set(a)
            for m in a["modules"]:
                keys |= set(m) | {k for t in m["tensors"].values() for k in t}
            keys |= {k for t in a["tensors"] for k in t}
    documented = {k.strip() for line in text.splitlines() if line.startswith("| ") for k in line.split("|")[1].split(",")}
    assert keys <= documented, keys - documented


def test_non_finite_factors_give_their_delta_without_a_warning() -> None:
    """NaN/inf factors are stored bit-exact (spec §3); reading their ΔW is IEEE arithmetic, not a RuntimeWarning."""
    import warnings

    import adapterpack

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with adapterpack.open(VECTORS / "non_finite_values.apack") as ad:
            assert any(np.isnan(m.delta()).any() for m in ad)
