"""The index's fast path (msgspec) accepts exactly what the checks in Python accept, and only that.

``read_index`` tries :func:`adapterpack.container.index._fast_index` first and falls back to
``loads`` + ``parse_index`` + ``check_references`` on anything it does not accept. So every refusal
keeps its class as long as the fast path never accepts an index the Python checks refuse, and
gives the same blobs and records when both accept. These tests feed both hundreds of indexes,
sound and broken one way at a time, and compare.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

import adapterpack
from adapterpack.adapter import Adapter, Module
from adapterpack.container import ApackReader
from adapterpack.container import index as idx
from adapterpack.container.preamble import FLAG_IMPLIED, FLAG_INDEX_ZSTD, FLAG_PACKED, FLAG_UNALIGNED, PREAMBLE_SIZE, data_start
from adapterpack.errors import AdapterpackError, DuplicateNameError, IndexFormatError
from adapterpack.limits import MAX_JSON_DEPTH

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"


def _index_of(path: Path) -> tuple[bytes, int, int]:
    """The index's JSON text (decompressed), the data section's start and the file size."""
    with ApackReader(path) as r:
        return r.index._data, r.data_start, r.file_size


def _slow(
    data: bytes, start: int, size: int, packed: bool = False, implied: bool = False, unaligned: bool = False
) -> idx.Index | AdapterpackError:
    try:
        index = idx.parse_index(idx.loads(data), start, size, packed, implied, unaligned)
        idx.check_references(index)
        return index
    except AdapterpackError as e:
        return e


def _same(fast: idx.Index, slow: idx.Index) -> None:
    assert fast.blobs == slow.blobs
    assert [b.known_codec for b in fast.blobs] == [b.known_codec for b in slow.blobs]
    assert msgspec.json.decode(msgspec.json.encode(fast.records)) == msgspec.json.decode(msgspec.json.encode(slow.records))
    assert fast.refs == slow.refs
    assert fast.raw == slow.raw


def agree(data: bytes, start: int, size: int, packed: bool = False, implied: bool = False, unaligned: bool = False) -> bool:
    """Both paths on one index: the fast one never accepts what the slow one refuses; returns whether it accepted.
    ``packed`` / ``implied``: the file's preamble has that flag (the sound file below has both: it holds zstd blobs, so
    its index is compressed and leaves BLOB offsets and lengths out)."""
    fast = idx._fast_index(data, start, size, packed, implied, unaligned)
    slow = _slow(data, start, size, packed, implied, unaligned)
    if fast is not None:
        assert not isinstance(slow, AdapterpackError), f"fast path accepted an index refused with {slow!r}"
        _same(fast, slow)
    return fast is not None


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], int, int, Path]:
    """A file with two adapters, pass-through tensors, a compressed blob, prefix CRCs, nested source."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("fast") / "a.apack"

    def lora(out: int, inp: int, r: int) -> Module:
        return Module(
            f"m{out}x{inp}",
            "lora",
            (out, inp),
            {"rank": r, "alpha": 2.5, "layout": "linear"},
            {"A": rng.standard_normal((r, inp)).astype(np.float32), "B": rng.standard_normal((out, r)).astype(np.float32)},
        )

    a = Adapter(name="one", base_model="base", modules={m.name: m for m in (lora(8, 6, 2), lora(300, 20, 4))})
    a.source = {"format": "peft", "target_modules": ["q", "v"], "nested": {"x": [1, [2, {"y": None}]]}}
    a.metadata = {"k": "v:w"}
    a.tensors = {"extra": np.arange(12, dtype=np.int32).reshape(3, 4)}
    b = Adapter(name="two", modules={"m": lora(8, 6, 2)})
    adapterpack.save([a, b], path, codec="zstd")
    data, start, size = _index_of(path)
    assert ApackReader(path).preamble.packed and ApackReader(path).preamble.implied
    return json.loads(data), start, size, path


def test_every_vector_agrees() -> None:
    """Every golden vector, sound or refusal: the fast path accepts the sound ones, and refuses every refused one."""
    accepted = 0
    for path in sorted(VECTORS.glob("*.apack")):
        raw = path.read_bytes()
        length = int.from_bytes(raw[16:24], "little")
        if len(raw) < PREAMBLE_SIZE or length > len(raw):
            continue
        flags = int.from_bytes(raw[12:16], "little")
        try:
            data = idx.index_text(raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length], bool(flags & FLAG_INDEX_ZSTD))
        except AdapterpackError:
            continue  # a hostile compressed index: refused before any JSON is parsed
        start = data_start(length, flags)
        layout = (bool(flags & FLAG_PACKED), bool(flags & FLAG_IMPLIED), bool(flags & FLAG_UNALIGNED))
        accepted += agree(data, start, len(raw), *layout)
    assert accepted > 10


def test_sound_files_take_the_fast_path(sound: tuple[dict[str, Any], int, int, Path]) -> None:
    _, start, size, path = sound
    data, _, _ = _index_of(path)
    assert agree(data, start, size, True, True)
    assert idx.read_index(data, start, size, True, True)._raw is None  # the JSON object is not built unless asked for


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*path, i))


def _nested(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


REPLACEMENTS: list[Any] = [None, True, False, 0, 1, -1, 2.0, 2**53, 2**32, 2**64, "", "x", "raw", "float32"]
REPLACEMENTS += [[], [1], [2, 3], {}, {"id": "raw"}]
DELETE = object()


def _mutations(raw: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for path in _paths(raw):
        if not path:
            continue
        for new in [*REPLACEMENTS, DELETE]:
            obj = copy.deepcopy(raw)
            parent = obj
            for k in path[:-1]:
                parent = parent[k]
            if new is DELETE:
                if isinstance(parent, dict):
                    del parent[path[-1]]
                else:
                    parent.pop(path[-1])
            else:
                parent[path[-1]] = new
            yield obj
        if isinstance(raw, dict):
            obj = copy.deepcopy(raw)
            parent = obj
            for k in path[:-1]:
                parent = parent[k]
            if isinstance(parent, dict):
                parent["unknown_key"] = 1  # ignored by the spec: the fast path steps aside, the slow one accepts
                yield obj


def test_every_single_field_change_agrees(sound: tuple[dict[str, Any], int, int, Path]) -> None:
    raw, start, size, _ = sound
    n = accepted = 0
    for obj in _mutations(raw):
        data = json.dumps(obj, separators=(",", ":")).encode()
        accepted += agree(data, start, size, True, True)
        n += 1
    assert n > 500 and 0 < accepted < n


@pytest.mark.parametrize(
    "where",
    ['{"writer":', '"blobs":[{"dtype":', '"codec":{"id":', '"params":{"rank":', '"metadata":{"k":', '"source":{"format":'],
)
def test_duplicate_keys_are_never_accepted(sound: tuple[dict[str, Any], int, int, Path], where: str) -> None:
    raw, start, size, _ = sound
    text = json.dumps(raw, separators=(",", ":"))
    at = text.index(where) + where.rfind('"', 0, len(where) - 2)  # the last key of ``where``
    key = where[where.rfind('"', 0, len(where) - 2) : -1]
    for value in ['"x"', "1", '"a\\u003ab"', "[]", "{}"]:  # escaped colons must not hide the dropped member
        dup = text[:at] + f"{key}:{value}," + text[at:]
        data = dup.encode()
        assert not agree(data, start, size, True, True)
        with pytest.raises(DuplicateNameError):
            idx.read_index(data, start, size, True, True)


def test_escaped_colons_and_backslashes_are_accepted(sound: tuple[dict[str, Any], int, int, Path]) -> None:
    raw, start, size, _ = sound
    text = json.dumps(raw, separators=(",", ":")).replace('"v:w"', '"v\\u003aw"')
    assert agree(text.encode(), start, size, True, True)
    text = json.dumps(raw, separators=(",", ":")).replace('"v:w"', '"v\\\\u003aw\\\\"')  # literal backslashes
    assert not agree(text.encode(), start, size, True, True)  # counted as escapes: steps aside, the slow path accepts
    assert not isinstance(_slow(text.encode(), start, size, True, True), AdapterpackError)


@pytest.mark.parametrize("field", ["params", "source", "codec", "writer"])
def test_depth_limit_in_free_form_values(sound: tuple[dict[str, Any], int, int, Path], field: str) -> None:
    raw, start, size, _ = sound
    for extra in range(0, 4):
        obj = copy.deepcopy(raw)
        # levels: top 1, adapters 2, adapter 3, modules 4, module 5, params 6; blobs 2, blob 3, codec 4; source 4
        base = {"params": 6, "source": 4, "codec": 4, "writer": 1}[field]
        deep = _nested(MAX_JSON_DEPTH - base + extra)
        if field == "params":
            obj["adapters"][0]["modules"][0]["params"]["deep"] = deep
        elif field == "source":
            obj["adapters"][0]["source"]["deep"] = deep
        elif field == "codec":
            obj["blobs"][0]["codec"]["deep"] = deep
        else:
            obj["writer"] = deep
        data = json.dumps(obj, separators=(",", ":")).encode()
        assert idx.json_depth(data) == MAX_JSON_DEPTH + extra
        agree(data, start, size, True, True)
        if extra:
            with pytest.raises(IndexFormatError, match="nested too deeply"):
                idx.read_index(data, start, size, True, True)
        else:
            idx.read_index(data, start, size, True, True)


def test_random_byte_edits_agree(sound: tuple[dict[str, Any], int, int, Path]) -> None:
    raw, start, size, _ = sound
    text = json.dumps(raw, separators=(",", ":")).encode()
    rng = np.random.default_rng(1)
    alphabet = b'{}[]",:\\0129aeflnrstu.-+E '
    for _ in range(3000):
        data = bytearray(text)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(data)))
            op = rng.integers(0, 3)
            ch = alphabet[int(rng.integers(0, len(alphabet)))]
            if op == 0:
                data[at] = ch
            elif op == 1:
                data.insert(at, ch)
            else:
                del data[at]
        agree(bytes(data), start, size, True, True)


def test_escaped_colon_count_is_bytes_count() -> None:
    """The vectorised count of ``\\u003a`` / ``\\u003A`` equals two ``bytes.count`` scans on any text, ends included."""
    rng = np.random.default_rng(13)
    alphabet = np.frombuffer(b'\\u003aA:"x', np.uint8)
    texts = [b"", b"\\", b"\\u003", b"\\u003a", b"x\\u003A", b"\\\\u003a\\u003a", b"\\u003a" * 3 + b"\\"]
    texts += [alphabet[rng.integers(0, alphabet.size, int(rng.integers(0, 80)))].tobytes() for _ in range(2000)]
    for data in texts:
        want = data.count(b"\\u003a") + data.count(b"\\u003A")
        assert idx._escaped_colons(data, np.frombuffer(data, np.uint8)) == want, data


#: 2^1024 overflows binary64; the largest 309-digit literal that rounds to a finite binary64 (its largest number)
_OVERFLOWING = 2**1024
_LARGEST = int("17976931348623158" + "0" * 292)


@pytest.mark.parametrize("field", ["params", "source", "codec", "writer"])
def test_integers_past_binary64_in_free_form_values(sound: tuple[dict[str, Any], int, int, Path], field: str) -> None:
    """msgspec decodes a huge integer literal in a free-form value to a Python int; the fast path must step aside for
    one wherever its digits fall against the blocks it scans (every padding below moves them by one byte), and both
    paths refuse one that overflows binary64 (spec §2) and accept binary64's largest number written out."""
    raw, start, size, _ = sound
    for value, ok in ((_OVERFLOWING, False), (-_OVERFLOWING, False), (_LARGEST, True), (10**308, True)):
        for pad in range(0, 160, 1 if not ok else 31):
            obj = copy.deepcopy(raw)
            obj["x-pad"] = "a" * pad
            holder = {"params": obj["adapters"][0]["modules"][0]["params"], "source": obj["adapters"][0]["source"],
                      "codec": obj["blobs"][0]["codec"], "writer": obj}[field]  # fmt: skip
            holder["writer" if field == "writer" else "x-big"] = value
            data = json.dumps(obj, separators=(",", ":")).encode()
            assert idx._may_overflow(data)
            agree(data, start, size, True, True)
            if ok:
                idx.read_index(data, start, size, True, True)
            else:
                with pytest.raises(IndexFormatError, match=r"\(309 digits\) overflows a binary64"):
                    idx.read_index(data, start, size, True, True)


def test_digit_runs_the_fast_path_scans_for() -> None:
    """A run of 309 digits anywhere (also reaching the last bytes) is found; runs below 154 digits never step aside."""
    for n in range(300, 800, 37):
        for at in [*range(0, n - 309 + 1, 13), n - 309]:
            text = bytearray(b"a" * n)
            text[at : at + 309] = b"7" * 309
            assert idx._may_overflow(bytes(text)), (n, at)
    assert not idx._may_overflow((b"1" * 153 + b",") * 50)
    assert not idx._may_overflow(b"")
