"""The tables marked *(checked)* in spec/format.md agree with the code, in both directions.

If a row is added to the spec without code, or code without a spec row, one of these fails.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from adapterpack import codecs, dtypes, encodings, errors, limits
from adapterpack.adapter import Module
from adapterpack.codecs import zstd
from adapterpack.container import index, preamble
from adapterpack.encodings.svd import singular_values

SPEC = Path(__file__).resolve().parents[1] / "spec" / "format.md"


def _sections() -> dict[str, list[str]]:
    """Heading text → the lines under it (up to the next heading)."""
    out: dict[str, list[str]] = {}
    current = ""
    for line in SPEC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            current = line.lstrip("#").strip()
            out[current] = []
        else:
            out.setdefault(current, []).append(line)
    return out


def _cell(text: str) -> str:
    return text.strip().replace("`", "").strip()


def table(heading_prefix: str) -> list[dict[str, str]]:
    """The first table under the heading starting with ``heading_prefix``, as dicts by column name."""
    matches = [h for h in _sections() if h.startswith(heading_prefix)]
    assert len(matches) == 1, f"spec heading {heading_prefix!r} not found once: {matches}"
    lines: list[str] = []
    for ln in _sections()[matches[0]]:
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break  # the first table only
    assert len(lines) >= 3, f"no table under {matches[0]!r}"
    rows = [[_cell(c) for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]] for ln in lines]
    header, sep, body = rows[0], rows[1], rows[2:]
    assert all(set(c) <= set("-: ") for c in sep)
    return [dict(zip(header, r, strict=True)) for r in body]


def test_checked_tables_are_the_ones_tested() -> None:
    """A new *(checked)* mark in the spec needs a test here."""
    checked = sorted(h for h in _sections() if "*(checked)*" in h)
    assert checked == [
        "1.1 Preamble *(checked)*",
        "10.1 Error classes *(checked)*",
        "10.3 Other adapterpack errors *(checked)*",
        "3. Element types *(checked)*",
        "5. Codecs *(checked)*",
        "6. Encodings *(checked)*",
    ]


# --- §1.1 preamble ------------------------------------------------------------------------------------


def test_preamble_table() -> None:
    rows = table("1.1 Preamble")
    fields = [r["field"].split()[0] for r in rows]
    assert fields == ["magic", "major", "minor", "flags", "index_length", "index_crc32c", "reserved"]
    offsets = [int(r["offset"]) for r in rows]
    sizes = [int(r["size"]) for r in rows]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]  # contiguous, in order
    assert sum(sizes) == preamble.PREAMBLE_SIZE == 32

    # the code's struct has exactly these field sizes, little-endian
    fmt = preamble._STRUCT.format
    assert fmt.startswith("<")
    assert [struct.calcsize("<" + f) for f in re.findall(r"\d*[a-zA-Z]", fmt[1:])] == sizes

    # Preamble's fields are the table's, less the constant magic and reserved (both directions)
    assert [f.name for f in dataclasses.fields(preamble.Preamble)] == [f for f in fields if f not in ("magic", "reserved")]

    by = {f: r for f, r in zip(fields, rows)}
    assert bytes.fromhex(by["magic"]["value"].split("(")[0]) == preamble.MAGIC
    assert by["magic"]["value"].split("(")[1].rstrip(")") == r"\x89APK\r\n\x1a\n"
    assert int(by["major"]["value"]) == preamble.MAJOR
    assert int(by["minor"]["value"]) == preamble.MINOR
    assert int(by["reserved"]["value"]) == 0
    low, high = re.fullmatch(r"(\d+) <= L <= (\d+) \(64 MiB\)", by["index_length"]["value"]).groups()  # type: ignore[union-attr]
    assert (int(low), int(high)) == (preamble.MIN_INDEX_LENGTH, preamble.MAX_INDEX_LENGTH) == (2, 64 << 20)
    assert "bits 0–15 must-understand" in by["flags"]["value"] and "bits 0 and 1 defined" in by["flags"]["value"]
    assert "and bits 2 and 3 (since 1.5)" in by["flags"]["value"]
    # the flag table (since 1.3) lists exactly the bits the code knows, with the code's masks
    text = "\n".join(_sections()["1.1 Preamble *(checked)*"])
    bits = {int(b): int(m, 16) for b, m in re.findall(r"^\| (\d+) +\| `(0x[0-9a-f]{4})` \|", text, re.M)}
    assert bits == {0: preamble.FLAG_INDEX_ZSTD, 1: preamble.FLAG_PACKED, 2: preamble.FLAG_IMPLIED, 3: preamble.FLAG_UNALIGNED}
    assert all(m == 1 << b for b, m in bits.items())
    assert sum(bits.values()) == preamble.KNOWN_MUST_UNDERSTAND_FLAGS

    # and the packed bytes put each field at its offset
    pre = preamble.Preamble(0x0102, 0x0304, 0x05060708, 0x1112131415161718, 0x21222324)
    raw = pre.pack()
    layout = dict(zip(fields, zip(offsets, sizes)))
    for name, value in (("major", 0x0102), ("minor", 0x0304), ("flags", 0x05060708), ("index_length", 0x1112131415161718)):
        off, size = layout[name]
        assert int.from_bytes(raw[off : off + size], "little") == value
    off, size = layout["index_crc32c"]
    assert int.from_bytes(raw[off : off + size], "little") == 0x21222324
    off, size = layout["reserved"]
    assert raw[off : off + size] == b"\0" * size
    assert raw[: layout["magic"][1]] == preamble.MAGIC


# --- §3 element types ----------------------------------------------------------------------------------


def test_dtype_table() -> None:
    rows = table("3. Element types")
    spec = {r["dtype"]: (int(r["itemsize"]), r["safetensors"]) for r in rows}
    code = {name: (d.itemsize, d.safetensors) for name, d in dtypes.DTYPES.items()}
    assert spec == code
    assert [r["dtype"] for r in rows] == list(dtypes.DTYPES)  # same order too
    for name, (itemsize, st) in spec.items():
        assert dtypes.by_safetensors(st).name == name
        assert dtypes.DTYPES[name].numpy.itemsize == itemsize
        assert dtypes.DTYPES[name].numpy.byteorder in ("<", "|")  # little-endian (or single byte)


# --- §5 codecs -----------------------------------------------------------------------------------------


def test_codec_table() -> None:
    rows = table("5. Codecs")
    spec = {r["id"]: r for r in rows}
    assert set(spec) == set(codecs.codec_ids())
    for codec_id, row in spec.items():
        keys = set() if row["config keys"] == "—" else set(re.findall(r"(\w+) \(int\)", row["config keys"]))
        assert keys or row["config keys"] == "—", row
        config = codecs.get_codec(codec_id).get_config()
        assert config["id"] == codec_id
        assert set(config) - {"id"} == keys, codec_id
        assert all(isinstance(config[k], int) for k in keys)


def test_byteplanes_itemsizes_match_spec() -> None:
    """§5.2: k in 2, 4, 8; the index refuses byteplanes for other itemsizes."""
    text = "\n".join(_sections()["5.2 byteplanes"])
    assert "`k` in 2, 4, 8" in text
    allowed = {d.itemsize for d in dtypes.DTYPES.values()} & {2, 4, 8}
    assert allowed == {2, 4, 8}
    for d in dtypes.DTYPES.values():
        obj = {"dtype": d.name, "shape": [1], "codec": {"id": "byteplanes"}, "offset": 0, "stored_length": 8 * d.itemsize + 40}
        obj |= {"length": d.itemsize, "crc32c": 0}
        if d.itemsize in (2, 4, 8):
            index.parse_blob(0, obj)
        else:
            with pytest.raises(Exception, match="byteplanes cannot hold"):
                index.parse_blob(0, obj)


# --- §6 encodings --------------------------------------------------------------------------------------


def test_encoding_table() -> None:
    rows = table("6. Encodings")
    assert {r["id"] for r in rows} == set(encodings.encoding_ids())
    for r in rows:
        major, minor = (int(x) for x in r["since"].split("."))
        assert (major, minor) <= (preamble.MAJOR, preamble.MINOR)


def test_lora_slots_table() -> None:
    rows = table("6.1 `lora`")
    spec = {r["slot"]: r["required"] == "yes" for r in rows}
    assert spec == encodings.get_encoding("lora").slots


# --- §7 limits: every row's value is its constant in adapterpack/limits.py, every constant has a row -------


def _limit_value(text: str) -> list[int]:
    """The numbers a value cell states: ``64 MiB``, ``1,000,000``, ``2^28``, ``1,024 code points (adapters: 256)``."""
    out = []
    for num, power, unit in re.findall(r"([\d,]+)(?:\^(\d+))?(?: (MiB))?", text):
        value = int(num.replace(",", ""))
        out.append(value ** int(power) if power else value << 20 if unit else value)
    return out


@pytest.mark.parametrize("heading", ["7. Limits", "7.1 Limits of adapterpack's importers"])
def test_limits_table(heading: str) -> None:
    rows = table(heading)
    assert {r["rule"] for r in rows} <= {"MUST", "MAY"}
    assert {r["rule"] for r in rows if r["stage"] == "ΔW"} <= {"MAY"}  # a request refused, not an invalid file
    for r in rows:
        assert issubclass(getattr(errors, r["error"]), errors.AdapterpackError), r
        if not r["constant"]:
            assert r["value"] == "content size + 1"  # zstd blocks: a bound per frame, checked in codecs/zstd.py
            continue
        constants = [getattr(limits, c.strip()) for c in r["constant"].split(",")]
        assert _limit_value(r["value"])[: len(constants)] == constants, r
    assert table("7. Limits")[0]["error"] == "IndexTooLargeError" and preamble.MAX_INDEX_LENGTH is limits.MAX_INDEX_LENGTH
    assert (index.MAX_BLOBS, index.MAX_NDIM, zstd.MAX_WINDOW, zstd.MAX_RATIO) == (
        limits.MAX_BLOBS,
        limits.MAX_NDIM,
        limits.MAX_ZSTD_WINDOW,
        limits.MAX_ZSTD_RATIO,
    )


def test_writers_are_bound_by_open_and_read_limits_only() -> None:
    """§7: a writer MUST NOT exceed the open- and read-stage limits; a ΔW-stage limit does not make a file invalid."""
    text = " ".join(" ".join(_sections()["7. Limits"]).split())
    assert "A writer MUST NOT write a file that exceeds a limit of stage **open** or **read** below." in text
    assert "A limit of stage ΔW does not make the file invalid" in text
    assert {r["stage"] for r in table("7. Limits")} == {"open", "read", "ΔW"}


def test_every_limit_is_in_the_spec() -> None:
    named = {
        c.strip()
        for h in ("7. Limits", "7.1 Limits of adapterpack's importers")
        for r in table(h)
        for c in r["constant"].split(",")
    }
    assert {k for k in vars(limits) if k.startswith("MAX_")} == named - {""}


# --- §10 errors ----------------------------------------------------------------------------------------


def _format_errors() -> dict[str, type]:
    """FormatError and every class below it in adapterpack/errors.py."""
    return {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.FormatError) and cls.__module__ == errors.__name__
    }


def test_error_table_is_the_error_hierarchy() -> None:
    """§10.1 lists exactly the file-format error classes, each under its real parent, in both directions."""
    rows = table("10.1 Error classes")
    spec = {r["error class"]: r["parent"] for r in rows}
    code = _format_errors()
    assert set(spec) == set(code)
    for name, parent in spec.items():
        assert code[name].__bases__ == (getattr(errors, parent),), name
        assert next(r for r in rows if r["error class"] == name)["raised when"], name


def test_error_tables_name_every_class_of_errors_py() -> None:
    """§10.1 and §10.3 together list every class in adapterpack/errors.py once, each under its real parent."""
    rows = table("10.1 Error classes") + table("10.3 Other adapterpack errors")
    names = [r["error class"] for r in rows]
    code = {n: c for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.AdapterpackError)}
    assert sorted(names) == sorted(code)
    for r in rows:
        cls = code[r["error class"]]
        parents = [] if r["parent"] == "—" else r["parent"].split(", ")  # OutputWriteError is an OSError too
        want = tuple(code[p] if p in code else getattr(builtins, p) for p in parents) or (Exception,)
        assert cls.__bases__ == want, r
        assert r["raised when"], r


def test_every_refusal_vector_names_a_table_error_and_every_error_has_one() -> None:
    """The vectors' expected errors are §10.1's classes, and each class but the parent is some vector's error."""
    from tools.vectors._check import doc, names

    named = {doc(n)["error"] for n in names() if "error" in doc(n)}
    classes = {r["error class"] for r in table("10.1 Error classes")}
    assert named <= classes
    assert classes - named == {"FormatError"}, classes - named


def test_json_rules_match_the_code() -> None:
    """§2's nesting limit and §1.1's must-understand flag rule are the code's."""
    text = "\n".join(_sections()["2. Index"])
    depth = re.search(r"nesting deeper than (\d+): the top-level object is depth 1", text)
    assert depth is not None and int(depth[1]) == limits.MAX_JSON_DEPTH
    assert index.json_depth(b"{}") == 1 and index.json_depth(b'{"a":[{}]}') == 3
    # brackets inside strings do not count, whatever escaped quotes and backslashes surround them
    assert index.json_depth(rb'{"[[\"[":"]]\\","b":[["{\\\"}"]]}') == 3
    deepest = b'{"a":' + b"[" * (limits.MAX_JSON_DEPTH - 1) + b"]" * (limits.MAX_JSON_DEPTH - 1) + b"}"
    assert index.loads(deepest) and index.json_depth(deepest) == limits.MAX_JSON_DEPTH
    with pytest.raises(errors.IndexFormatError, match="nested too deeply"):
        index.loads(b'{"a":[' + deepest + b"]}")
    flags = "\n".join(_sections()["1.1 Preamble *(checked)*"])
    assert (
        "must-understand flag bit it does not know (bits 4–15; a 1.0–1.2 reader knows none, a 1.3–1.4 reader bits 0 and 1): "
        "`UnsupportedVersionError`" in flags
    )
    for bit in range(4, 16):
        with pytest.raises(errors.UnsupportedVersionError):
            preamble.parse_preamble(preamble.Preamble(1, 1, 1 << bit, 2, 0).pack(), 64)
    for known in range(1, 16):
        assert preamble.parse_preamble(preamble.Preamble(1, 3, known, 2, 0).pack(), 64).flags == known
    preamble.parse_preamble(preamble.Preamble(1, 1, 1 << 16, 2, 0).pack(), 64)  # informational bits are ignored


def test_negative_zero_singular_values_are_zeros() -> None:
    """spec/svd.md §2: -0.0 in S is neither negative nor out of order next to 0.0."""
    for s in ([1.0, 0.0, -0.0], [1.0, -0.0, 0.0], [-0.0]):
        m = Module("m", "svd", (3, 3), {"rank": len(s)}, {"S": np.array(s, np.float32)})
        assert singular_values(m).tolist() == s
