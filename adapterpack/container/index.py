"""The JSON index: parsing with duplicate-key detection, schema checks, limits, layout.

Everything here works from the index alone (no blob bytes), so a hostile file is refused
before anything is allocated or read (spec/format.md §1.2, §2, §7).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np
import zstandard
from msgspec import UNSET, Meta, Struct, UnsetType

from adapterpack import codecs, dtypes
from adapterpack.codecs import zstd as _zstd
from adapterpack.container import prefix
from adapterpack.container.preamble import align_up
from adapterpack.errors import (
    AdapterpackError,
    CodecError,
    DuplicateNameError,
    IndexFormatError,
    IndexTooLargeError,
    LayoutError,
    LengthMismatchError,
    TruncatedFileError,
    UnknownCodecError,
    UnknownDTypeError,
)
from adapterpack.limits import (
    MAX_ADAPTER_NAME,
    MAX_BLOBS,
    MAX_INDEX_LENGTH,
    MAX_INDEX_RATIO,
    MAX_JSON_CONTAINERS,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    MAX_NAME,
    MAX_NDIM,
    MAX_ZSTD_WINDOW,
)
from adapterpack.names import name_problem

_ITEMSIZES = {name: d.itemsize for name, d in dtypes.DTYPES.items()}

MAX_INT = 2**53
SMALL_BLOB = 4096
SMALL_ALIGNMENT = 8
LARGE_ALIGNMENT = 256


def blob_alignment(stored_length: int, raw: bool = True) -> int:
    """Required alignment of a blob (spec §1.2): a raw blob 256 bytes, or 8 under 4096 bytes; a compressed blob
    1 in a packed file (``raw`` False: nothing maps it, so padding would be waste)."""
    if not raw:
        return 1
    return LARGE_ALIGNMENT if stored_length >= SMALL_BLOB else SMALL_ALIGNMENT


def plan_offsets(stored_lengths: list[int], raw: list[bool] | None = None) -> list[int]:
    """Offsets (relative to the data section) of blobs of these stored lengths, in order.

    ``raw`` None is the layout of 1.0–1.2 (and of 1.3 files without the packed flag): every blob
    aligned. Given, it says which blobs are raw, and only those are aligned (the packed layout)."""
    offsets, end = [], 0
    for i, n in enumerate(stored_lengths):
        start = align_up(end, blob_alignment(n, True if raw is None else raw[i]))
        offsets.append(start)
        end = start + n
    return offsets


def fill_implied(blobs: list[dict[str, Any]], packed: bool) -> None:
    """Set the ``offset`` and ``length`` a 1.5 index left out (the implied flag, spec §2.1) in BLOB objects of a file
    whose index is otherwise sound, in place: for tools that edit an index as JSON. Values present are kept."""
    raw = [b["codec"]["id"] == "raw" for b in blobs] if packed else None
    for b, off in zip(blobs, plan_offsets([b["stored_length"] for b in blobs], raw), strict=True):
        b.setdefault("offset", off)
        b.setdefault("length", math.prod(b["shape"]) * dtypes.by_name(b["dtype"]).itemsize)


_local = threading.local()


def index_text(stored: bytes, compressed: bool) -> bytes:
    """The JSON text of an index whose stored bytes are ``stored`` (spec §1.3): as they are, or, with the
    compressed-index flag, the one Zstandard frame they hold, decoded with its declared size checked first.

    The declared size is bounded by the index-length limit before anything of that size is allocated, and
    the frame must be exactly one frame of exactly that size (the rules of spec §5.1 and §5.3)."""
    if not compressed:
        return stored
    frame = memoryview(stored)
    if bytes(frame[:4]) != zstandard.FRAME_HEADER:
        raise IndexFormatError("compressed index: not a zstd frame (no zstd magic number)")
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise IndexFormatError(f"compressed index: not a zstd frame ({e})") from None
    if declared < 0:
        raise IndexFormatError("compressed index: the frame does not declare its content size")
    if declared > MAX_INDEX_LENGTH:
        raise IndexTooLargeError(f"compressed index declares {declared} bytes of JSON, over the {MAX_INDEX_LENGTH}-byte limit")
    if declared < 2:
        raise IndexFormatError(f"compressed index declares {declared} bytes, too few for a JSON object")
    if declared > MAX_INDEX_RATIO * len(frame):
        raise IndexTooLargeError(
            f"compressed index declares {declared} bytes of JSON from {len(frame)} stored bytes, over the {MAX_INDEX_RATIO}x limit"
        )
    try:
        _zstd.check_frame(frame, declared, "compressed index")
    except CodecError as e:
        raise IndexFormatError(str(e)) from None
    # one frame, no trailing bytes, a declared size within the limit: a one-shot decode allocates exactly that size
    dctx = _local.__dict__.get("dctx")
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)  # creating one costs as much as decoding
    try:
        text = dctx.decompress(stored)
    except zstandard.ZstdError as e:
        raise IndexFormatError(f"compressed index: corrupt ({e})") from None
    if len(text) != declared:
        raise IndexFormatError(f"compressed index: decoded {len(text)} bytes, the frame declares {declared}")
    return text


#: A JSON integer the spec calls ``int``: written without fraction or exponent, in [0, 2**53).
_Int = Annotated[int, Meta(ge=0, lt=MAX_INT)]
_Crc = Annotated[int, Meta(ge=0, lt=2**32)]
_Shape = Annotated[tuple[_Int, ...], Meta(max_length=MAX_NDIM)]
_Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]


class BlobEntry(Struct, dict=True, omit_defaults=True):
    """One blob as the index describes it (spec §2.1).

    Decoded straight from the index JSON by msgspec, which checks the types and ranges in C;
    ``known_codec`` is set by the validation beside the fields (``dict=True``), never read from the file.
    """

    dtype: str
    shape: _Shape
    codec: dict[str, Any]
    stored_length: _Int
    crc32c: _Crc
    #: Start relative to the data section. Left out of the index of a file with the implied flag (1.5, spec §2.1); the
    #: validation sets it to the planned offset, so a validated entry always holds an int.
    offset: _Int | UnsetType = UNSET
    #: Decoded bytes; left out under the implied flag like ``offset``, set by the validation to ``prod(shape) * itemsize``.
    length: _Int | UnsetType = UNSET
    #: CRC-32Cs of the row-prefix checkpoints (spec §2.1 ``prefix_crc32c``); empty when the blob has none.
    prefix_crc32c: tuple[_Crc, ...] = ()

    #: Whether this reader implements the codec: set by the validation beside the fields (only where it is False on
    #: the fast path, which saves a store per blob), never read from the file.
    known_codec: ClassVar[bool] = True

    @property
    def codec_id(self) -> str:
        """The codec's id."""
        return self.codec["id"]

    def describe(self) -> dict[str, Any]:
        """The index object for this blob."""
        out = {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "codec": self.codec,
            "offset": self.offset,
            "stored_length": self.stored_length,
            "length": self.length,
            "crc32c": self.crc32c,
        }
        return out | ({prefix.KEY: list(self.prefix_crc32c)} if self.prefix_crc32c else {})


def _blob_entry(
    dtype: str,
    shape: tuple[int, ...],
    codec: dict[str, Any],
    offset: int,
    stored_length: int,
    length: int,
    crc: int,
    known: bool,
    checkpoints: tuple[int, ...],
) -> BlobEntry:
    b = BlobEntry(dtype, shape, codec, stored_length, crc, offset, length, checkpoints)
    b.known_codec = known
    return b


class ModuleRecord(Struct, gc=False):  # gc=False: JSON trees hold no reference cycles; faster to decode
    """A MODULE object of the index (spec §2.3). Keys the file left out are ``UNSET`` (defaults are
    applied where the record is built, :func:`adapterpack.container.records.build_adapter`)."""

    name: _Name
    encoding: str
    tensors: dict[str, _Int]
    must_understand: bool | UnsetType = UNSET
    base_shape: _Shape | UnsetType = UNSET
    params: dict[str, Any] | UnsetType = UNSET


class TensorRecord(Struct, gc=False):
    """A pass-through tensor entry of an ADAPTER (spec §2.2)."""

    name: _Name
    blob: _Int


class AdapterRecord(Struct, gc=False):
    """An ADAPTER object of the index (spec §2.2); keys the file left out are ``UNSET``."""

    name: Annotated[str, Meta(min_length=1, max_length=MAX_ADAPTER_NAME)]
    modules: list[ModuleRecord]
    tensors: list[TensorRecord] | UnsetType = UNSET
    base_model: str | UnsetType | None = UNSET
    base_architecture: str | UnsetType | None = UNSET
    source: dict[str, Any] | UnsetType = UNSET
    metadata: dict[str, str] | UnsetType = UNSET

    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> AdapterRecord:
        """The record of an ADAPTER object parsed by :func:`loads`, values as they are (checked where they are used)."""
        return cls(
            name=raw["name"],
            modules=[
                ModuleRecord(
                    m["name"],
                    m.get("encoding", UNSET),
                    m["tensors"],
                    m.get("must_understand", UNSET),
                    m.get("base_shape", UNSET),
                    m.get("params", UNSET),
                )
                for m in raw["modules"]
            ],
            tensors=[TensorRecord(t["name"], t["blob"]) for t in raw["tensors"]] if "tensors" in raw else UNSET,
            base_model=raw.get("base_model", UNSET),
            base_architecture=raw.get("base_architecture", UNSET),
            source=raw.get("source", UNSET),
            metadata=raw.get("metadata", UNSET),
        )


class _IndexWire(Struct, gc=False):
    """The whole index, as msgspec decodes it on the fast path (:func:`read_index`)."""

    adapters: Annotated[list[AdapterRecord], Meta(min_length=1)]
    blobs: Annotated[list[BlobEntry], Meta(max_length=MAX_BLOBS)]
    writer: Any = UNSET


class Index:
    """A validated index: the blob table, the adapter records, and (parsed on first use) the raw JSON object."""

    def __init__(
        self,
        raw: dict[str, Any] | None,
        blobs: list[BlobEntry],
        *,
        data: bytes | None = None,
        records: list[AdapterRecord] | None = None,
        refs: list[int] | None = None,
    ) -> None:
        self._raw = raw
        self._data = data
        self.blobs = blobs
        self._records = records
        #: How many records and tensor entries reference each blob (set once references are checked).
        self.refs = refs

    @property
    def raw(self) -> dict[str, Any]:
        """The index as a JSON object (parsed from the index bytes on first use when the fast path validated them)."""
        if self._raw is None:
            self._raw = json.loads(self._data)  # type: ignore[arg-type]  # bytes validated by read_index
        return self._raw

    @property
    def adapters(self) -> list[dict[str, Any]]:
        """The ADAPTER objects as JSON objects (see :attr:`records` for the typed, validated form)."""
        return self.raw["adapters"]

    @property
    def records(self) -> list[AdapterRecord]:
        """The ADAPTER objects as records (after the references were checked)."""
        if self._records is None:
            self._records = [AdapterRecord.from_raw(a) for a in self.raw["adapters"]]
        return self._records

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names, in order."""
        return [a.name for a in self.records]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; a shorter dict means a key came twice (runs for every JSON object)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateNameError(f"index has the key {k!r:.200} twice in one object")
            seen.add(k)
    return out


def _reject_constant(name: str) -> None:
    raise IndexFormatError(f"index contains {name}, which JSON does not allow")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise IndexFormatError(f"index number {text:.40} overflows a binary64")
    return value


#: Digits of the smallest integer literal that overflows binary64 (it rounds to infinity from 2^1024 − 2^970,
#: about 1.8e308); every shorter one is a binary64 number, however long a reader's integers are.
_OVERFLOW_DIGITS = 309


def _exact_int(text: str) -> int:
    """An integer literal of the index, refused where it overflows binary64 like ``1e999`` (spec §2): every reader
    can hold every number of a valid index, free-form values included."""
    digits = len(text) - (text[0] == "-")
    if digits > _OVERFLOW_DIGITS or (digits == _OVERFLOW_DIGITS and _overflows(int(text))):
        raise IndexFormatError(f"index number {text:.40}... ({digits} digits) overflows a binary64")
    return int(text)  # below Python's int-string limit (4300 digits) here


def _overflows(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return True
    return False


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{},')
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_CHUNK = 1 << 20
_BACKSLASHES = re.compile(rb"\\*")


@dataclass
class JsonShape:
    """How deep JSON text nests and how many containers and values it holds, counted from its bytes."""

    depth: int = 0
    containers: int = 0
    #: containers plus commas: at least the number of values other than the top-level one
    values: int = 0


def json_shape(data: bytes) -> JsonShape:
    """Nesting depth (the top level is 1), containers and values of JSON ``data``, in memory independent of its size.

    The bytes are scanned in chunks of about a MiB, carrying depth and string state across them; a
    chunk never ends inside a run of backslashes nor before the byte they escape. In each chunk,
    escaped backslashes and quotes are removed, so every remaining quote opens or closes a string,
    and everything but quotes, brackets and commas is dropped (C-speed ``bytes`` methods); what is
    inside strings does not count. For text that is not JSON the figures are only approximate.
    """
    shape, level, in_string, start = JsonShape(), 0, 0, 0
    while start < len(data):
        end = min(start + _CHUNK, len(data))
        if data[end - 1] == ord("\\"):
            end = min(_BACKSLASHES.match(data, end).end() + 1, len(data))
        chunk = data[start:end].replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
        start = end
        marks = np.frombuffer(chunk, np.uint8)
        quotes = np.cumsum(marks == ord('"'), dtype=np.int32)
        outside = ((quotes + in_string) & 1) == 0
        step = _STEP[marks]
        levels = np.cumsum(step * outside, dtype=np.int32)
        opened = int(np.count_nonzero((step > 0) & outside))
        shape.depth = max(shape.depth, level + int(levels.max(initial=0)))
        shape.containers += opened
        shape.values += opened + int(np.count_nonzero((marks == ord(",")) & outside))
        level += int(levels[-1]) if len(levels) else 0
        in_string = (in_string + int(quotes[-1]) if len(quotes) else in_string) & 1
    return shape


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays and objects in JSON ``data`` (the top level is 1)."""
    return json_shape(data).depth


def _check_unicode(obj: dict[str, Any], data: bytes) -> None:
    """Refuse a string holding a lone surrogate (``\\ud800`` without its pair): not Unicode text (spec §2).

    Raw UTF-8 cannot encode surrogates (the strict decode refuses them), so only an escape can
    make one; the full check runs only when the bytes hold such an escape.
    """
    if _SURROGATE_ESCAPE.search(data) is None:
        return
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise IndexFormatError("index holds a string with a lone UTF-16 surrogate escape (not Unicode text)") from None


def _check_shape(data: bytes) -> None:
    """Refuse JSON nested too deeply or holding too many containers or values, from its bytes, before it is parsed:
    a parsed container or value takes tens to hundreds of bytes, far more than its text (spec §7)."""
    shape = json_shape(data)
    if shape.depth > MAX_JSON_DEPTH:
        raise IndexFormatError(f"index JSON is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    if shape.containers > MAX_JSON_CONTAINERS:
        raise IndexFormatError(f"index JSON holds {shape.containers} arrays and objects, over the limit of {MAX_JSON_CONTAINERS}")
    if shape.values > MAX_JSON_VALUES:
        raise IndexFormatError(f"index JSON holds over {shape.values} values, over the limit of {MAX_JSON_VALUES}")


def loads(data: bytes) -> dict[str, Any]:
    """Parse index bytes: strict UTF-8 JSON object, unique keys, no NaN/Infinity (nor numbers that overflow to it),
    nested at most :data:`~adapterpack.limits.MAX_JSON_DEPTH` deep, at most :data:`~adapterpack.limits.MAX_JSON_CONTAINERS`
    arrays and objects and :data:`~adapterpack.limits.MAX_JSON_VALUES` values, no lone surrogates."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IndexFormatError(f"index is not UTF-8 ({e.reason} at byte {e.start})") from None
    _check_shape(data)
    try:
        obj = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite, parse_int=_exact_int
        )
    except AdapterpackError:
        raise
    except RecursionError:
        raise IndexFormatError("index JSON is nested too deeply") from None
    except ValueError as e:
        raise IndexFormatError(f"index is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise IndexFormatError(f"index must be a JSON object, got {type(obj).__name__}")
    _check_unicode(obj, data)
    return obj


def _json_default(value: Any) -> Any:
    """numpy scalars as the JSON numbers and booleans they stand for; anything else is refused."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _find_bad(obj: Any, path: str) -> str | None:
    """Where in ``obj`` a value JSON cannot hold sits (a non-finite float, an unknown type), as a key path."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{path}: key {k!r:.40} ({type(k).__name__})"
            found = _find_bad(v, f"{path}.{k}")
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _find_bad(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(obj, (float, np.floating)):
        return None if math.isfinite(obj) else f"{path} = {obj!r} (JSON has no NaN or infinity)"
    if obj is None or isinstance(obj, (str, int, np.integer, np.bool_)):
        return None
    return f"{path} is a {type(obj).__name__}"


def dumps(obj: dict[str, Any]) -> bytes:
    """Serialize an index compactly and deterministically.

    numpy scalars are written as the numbers they hold (``np.int64(3)`` as ``3``); a value
    JSON cannot hold is an IndexFormatError naming its key path, never a TypeError.
    """
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        where = _find_bad(obj, "index")
        raise IndexFormatError(f"cannot write index: {where or e}") from None


_MISSING = object()


def get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """``obj[key]`` checked to be of ``kind`` (bool is never an int here).

    JSON decoding yields exact builtin types, so ``type(value) is kind`` settles the usual
    case in one step; this runs for every field of every record on every open.
    """
    value = obj.get(key, _MISSING)
    if type(value) is kind:
        return value
    if value is _MISSING:
        if default is ...:
            raise IndexFormatError(f"{where}: missing {key!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise IndexFormatError(f"{where}: {key!r} must be {names}, got {value!r:.80}")
    return value


def get_int(obj: dict[str, Any], key: str, where: str) -> int:
    """A non-negative JSON integer below 2**53."""
    value = get(obj, key, int, where)
    if not 0 <= value < MAX_INT:
        raise IndexFormatError(f"{where}: {key!r} = {value} is out of range")
    return value


def get_name(obj: dict[str, Any], key: str, where: str, limit: int = MAX_NAME) -> str:
    """A name: a string following the rule of :mod:`adapterpack.names` (1–``limit`` code points, no lone surrogate)."""
    value = get(obj, key, str, where)
    problem = name_problem(value, limit)
    if problem is not None:
        raise IndexFormatError(f"{where}: {key!r} {problem}")
    return value


def get_shape(obj: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    """A list of at most 8 non-negative integers."""
    shape = get(obj, key, list, where)
    if len(shape) <= MAX_NDIM and all(type(d) is int and 0 <= d < MAX_INT for d in shape):
        return tuple(shape)
    if len(shape) > MAX_NDIM:
        raise IndexFormatError(f"{where}: {len(shape)} dimensions exceed the limit of {MAX_NDIM}")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < MAX_INT:
            raise IndexFormatError(f"{where}: {key!r} must be non-negative integers, got {shape!r:.80}")
    return tuple(shape)


_BLOB_INTS = ("offset", "stored_length", "length", "crc32c")
#: The BLOB keys a file with the implied flag may leave out (spec §2.1): a reader derives both.
IMPLIED_KEYS = ("offset", "length")


def parse_blob(i: int, obj: Any, bounds: dict[str, int | None] | None = None, implied: bool = False) -> BlobEntry:
    """Validate one BLOB object (spec §2.1).

    Written for speed (it runs once per tensor on every open): exact type checks, no
    per-field helper calls on the good path. ``bounds`` caches each codec's expansion
    bound across the blobs of one index. ``implied`` (the file's flag bit 2, since 1.5): ``offset`` and
    ``length`` may be absent; an absent ``length`` is the shape's, an absent ``offset`` is left UNSET for
    :func:`check_layout` to set to the planned one.
    """
    where = f"blob {i}"
    if type(obj) is not dict:
        raise IndexFormatError(f"{where}: must be an object")
    dtype_name = obj.get("dtype")
    dtype = dtypes.DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        dtype_name = get(obj, "dtype", str, where)
        alias = dtypes.ALIASES.get(dtype_name)
        hint = f"the spec name is {alias!r}" if alias else f"known: {', '.join(dtypes.DTYPES)}"
        raise UnknownDTypeError(f"{where}: unknown dtype {dtype_name!r} ({hint})")
    shape = get_shape(obj, "shape", where)
    codec = obj.get("codec")
    codec_id = codec.get("id") if type(codec) is dict else None
    if type(codec_id) is not str:
        codec_id = get(get(obj, "codec", dict, where), "id", str, f"{where} codec")
    keys = [k for k in _BLOB_INTS if k in obj or k not in IMPLIED_KEYS] if implied else _BLOB_INTS
    ints = [obj.get(k) for k in keys]
    if not all(type(v) is int and 0 <= v < MAX_INT for v in ints):
        ints = [get_int(obj, k, where) for k in keys]
    got = dict(zip(keys, ints, strict=True))
    offset, stored_length, crc = got.get("offset", UNSET), got["stored_length"], got["crc32c"]
    known = codecs.base.is_known(codec_id)
    must = codec.get("must_understand", True)
    if type(must) is not bool:
        raise IndexFormatError(f"{where} codec: 'must_understand' must be bool, got {must!r:.80}")
    if not known and must:
        raise UnknownCodecError(f"{where}: unknown codec {codec_id!r} marked must_understand")
    itemsize = dtype.itemsize
    expected = math.prod(shape) * itemsize
    length = got.get("length", expected)
    if length != expected:
        raise LengthMismatchError(f"{where}: length {length} != {expected} (shape {list(shape)} × {itemsize}-byte {dtype.name})")
    if expected >= MAX_INT:  # only a left-out length gets here (a written one is < 2^53): no length can be that large
        raise LengthMismatchError(f"{where}: shape {list(shape)} × {itemsize}-byte {dtype.name} is {expected} bytes, past 2^53")
    if not expected and math.prod(d for d in shape if d) * itemsize >= MAX_INT:  # numpy refuses such shapes even when empty
        raise IndexFormatError(f"{where}: shape {list(shape)} is too large")
    if crc >= 2**32:
        raise IndexFormatError(f"{where}: crc32c {crc} is not a 32-bit value")
    checkpoints = _prefix_crcs(obj[prefix.KEY], shape, where) if prefix.KEY in obj else ()
    if known:
        bounds = {} if bounds is None else bounds
        if codec_id not in bounds:
            bounds[codec_id] = codecs.get_codec(codec).max_expansion()
        bound = bounds[codec_id]
        if bound is None and stored_length != length:
            raise LengthMismatchError(f"{where}: {codec_id} blob stores {stored_length} bytes, decodes to {length}")
        if bound is not None and length > bound * stored_length + 64:
            raise LengthMismatchError(
                f"{where}: claims {length} decoded bytes from {stored_length} stored; {codec_id} cannot expand that much"
            )
        if codec_id == "byteplanes" and itemsize not in (2, 4, 8):
            raise IndexFormatError(f"{where}: byteplanes cannot hold {dtype.name} elements")
    return _blob_entry(dtype.name, shape, codec, offset, stored_length, length, crc, known, checkpoints)


def _prefix_crcs(value: Any, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """A blob's ``prefix_crc32c``: one 32-bit int per power of two below its row count, on a blob of >= 2 rows."""
    key = f"{where}: {prefix.KEY!r}"
    if not shape or shape[0] < 2:
        raise IndexFormatError(f"{key} needs a blob of at least 2 rows (axis 0), shape is {list(shape)}")
    want = prefix.count(shape[0])
    if type(value) is not list or len(value) != want:
        raise IndexFormatError(f"{key} must be a list of {want} CRC-32Cs for {shape[0]} rows, got {value!r:.80}")
    if not all(type(v) is int and 0 <= v < 2**32 for v in value):
        raise IndexFormatError(f"{key} must hold 32-bit unsigned integers, got {value!r:.80}")
    return tuple(value)


def check_layout(blobs: list[BlobEntry], data_start: int, file_size: int, packed: bool = False, unaligned: bool = False) -> None:
    """Offsets exactly as the alignment rule places them (the packed rule with ``packed``), and the file ending at the last blob;
    with ``unaligned`` (the data section right after the index, spec §1.2), no raw blob.

    A blob whose index left its offset out (the implied flag, spec §2.1) is given the planned one."""
    raw = [b.codec.get("id") == "raw" for b in blobs] if packed else [True] * len(blobs)
    expected = plan_offsets([b.stored_length for b in blobs], raw)
    for i, (b, off) in enumerate(zip(blobs, expected, strict=True)):
        if unaligned and b.codec.get("id") == "raw":
            raise LayoutError(f"blob {i}: a raw blob in a file whose data section is not aligned (flag bit 3): it cannot be mapped")
        if b.offset is UNSET:
            b.offset = off
        elif b.offset != off:
            what = "overlaps the previous blob" if b.offset < off else "leaves a gap beyond padding or is misaligned"
            align = blob_alignment(b.stored_length, raw[i])
            if b.offset % align:
                what = f"is not aligned to {align} bytes"
            raise LayoutError(f"blob {i}: offset {b.offset} {what} (expected {off})")
    end = data_start + (expected[-1] + blobs[-1].stored_length if blobs else 0)
    if end > file_size:
        raise TruncatedFileError(f"blobs end at byte {end}, past the end of the {file_size}-byte file (truncated)")
    if end < file_size:
        raise LayoutError(f"file has {file_size - end} bytes after the last blob")


def parse_index(
    raw: dict[str, Any], data_start: int, file_size: int, packed: bool = False, implied: bool = False, unaligned: bool = False
) -> Index:
    """Validate the top level, blobs and layout (the packed layout with ``packed``; BLOB offsets and lengths optional
    with ``implied``; no raw blob with ``unaligned``); adapters are checked by the reader."""
    blobs_raw = get(raw, "blobs", list, "index")
    if len(blobs_raw) > MAX_BLOBS:
        raise IndexFormatError(f"index lists {len(blobs_raw)} blobs, over the limit of {MAX_BLOBS}")
    bounds: dict[str, int | None] = {}
    blobs = [parse_blob(i, b, bounds, implied) for i, b in enumerate(blobs_raw)]
    check_layout(blobs, data_start, file_size, packed, unaligned)
    adapters = get(raw, "adapters", list, "index")
    if not adapters:
        raise IndexFormatError("index lists no adapters")
    names: set[str] = set()
    for j, a in enumerate(adapters):
        if not isinstance(a, dict):
            raise IndexFormatError(f"adapter {j}: must be an object")
        name = get_name(a, "name", f"adapter {j}", MAX_ADAPTER_NAME)
        if name in names:
            raise DuplicateNameError(f"two adapters are named {name!r}")
        names.add(name)
    return Index(raw, blobs)


# --- references (stage 6 of spec §10.2): on the JSON objects --------------------------------------------


def _blob_ref(value: Any, n_blobs: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_blobs:
        raise IndexFormatError(f"{where}: blob reference {value!r:.200} is not a blob index")
    return value


def _named_entries(entries: list[Any], kind: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, entry) of a list of objects that must each have a unique ``name``."""
    seen: set[str] = set()
    out = []
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise IndexFormatError(f"{where} {kind} {k}: must be an object")
        name = get_name(e, "name", f"{where} {kind} {k}")
        if name in seen:
            raise DuplicateNameError(f"{where}: two {kind}s are named {name!r}")
        seen.add(name)
        out.append((name, e))
    return out


def check_references(index: Index) -> Counter[int]:
    """Module and tensor entries well formed, uniquely named, referencing existing blobs; every blob referenced.

    Returns how many records and tensor entries reference each blob (a bank's U and V: one per member).
    """
    n_blobs = len(index.blobs)
    used: Counter[int] = Counter()
    for a in index.adapters:
        aw = f"adapter {a['name']!r}"
        for name, m in _named_entries(get(a, "modules", list, aw), "module", aw):
            for slot, ref in get(m, "tensors", dict, f"{aw} module {name!r}").items():
                used[_blob_ref(ref, n_blobs, f"{aw} module {name!r} tensor {slot!r}")] += 1
        for name, t in _named_entries(get(a, "tensors", list, aw, []), "tensor", aw):
            used[_blob_ref(t.get("blob"), n_blobs, f"{aw} tensor {name!r}")] += 1
    unused = set(range(n_blobs)) - set(used)
    if unused:
        raise IndexFormatError(f"blob {min(unused)} is not referenced by any record ({len(unused)} unreferenced)")
    index.refs = [used[i] for i in range(n_blobs)]
    return used


# --- the fast path: stages 3 to 6 of spec §10.2 in compiled code ----------------------------------------
#
# msgspec decodes the index straight into the records above, checking every type and range in C
# (an int written 2.0, a bool where an int goes, a name of the wrong length, a shape of 9 dimensions,
# NaN, Infinity, 1e999, a lone surrogate, a byte-order mark, bad UTF-8 are all refused there). What
# msgspec does not check is done here in a few operations per blob and per record. The fast path
# only ever ACCEPTS: on anything it does not accept it steps aside and the checks in Python above
# run from the start, so every refusal keeps its class, its message and the order of spec §10.2.

#: At most this many index bytes cannot exceed the JSON count limits: a container takes at least 2 bytes
#: and a comma 1, so containers <= len/2 and values (containers + commas) <= len.
_COUNTS_UNREACHABLE = min(2 * MAX_JSON_CONTAINERS, MAX_JSON_VALUES)
_CONTAINERS = frozenset((dict, list))
_DECODER = msgspec.json.Decoder(_IndexWire)
_ENCODER = msgspec.json.Encoder()


def _too_deep(value: Any, level: int) -> bool:
    """Whether ``value``, a JSON value at nesting level ``level``, nests deeper than the limit."""
    t = type(value)
    if t is dict:
        items = value.values()
    elif t is list:
        items = value
    else:
        return False
    if level > MAX_JSON_DEPTH:
        return True
    return not _CONTAINERS.isdisjoint(map(type, items)) and any(_too_deep(v, level + 1) for v in items)


def _no_duplicate_keys(data: bytes, wire: _IndexWire) -> bool:
    """Whether the JSON text ``data`` (which msgspec decoded to ``wire``) names no key twice in one object, nor
    holds a key the records do not keep (both make the fast path step aside).

    msgspec keeps the last of two equal keys silently. Every object member of the text has one ``:`` outside
    strings; re-encoding what was decoded gives one per member kept, plus the colons of the kept strings, which
    the text holds literally or as a ``\\u003a`` escape. Counting every ``\\u003a`` as one (an escaped backslash
    before ``u003a`` is counted too) can only make a sound index step aside, never let a duplicate through: a
    dropped member takes its ``:`` with it.
    """
    text = np.frombuffer(data, np.uint8)
    return _colons(np.frombuffer(_ENCODER.encode(wire), np.uint8)) == _colons(text) + _escaped_colons(data, text)


def _colons(text: np.ndarray) -> int:
    return int(np.count_nonzero(text == _COLON))  # faster than bytes.count


_COLON = ord(":")
_BACKSLASH = ord("\\")
#: ``u003a`` / ``u003A`` (what follows the backslash of an escaped colon) as little-endian integers of 5 bytes
_U003A = tuple(int.from_bytes(t, "little") for t in (b"u003a", b"u003A"))


def _escaped_colons(data: bytes, text: np.ndarray) -> int:
    """How many times ``\\u003a`` or ``\\u003A`` occurs in ``data`` (``text``: its bytes as uint8): the backslashes
    found at once, then the five bytes after each compared as one integer (two ``bytes.count`` scans cost more)."""
    if b"\\" not in data:
        return 0
    at = np.flatnonzero(text[:-5] == _BACKSLASH) if len(text) > 5 else np.empty(0, np.intp)
    if not at.size:
        return 0
    after = np.zeros(at.size, np.uint64)
    for k in range(5):
        after |= text[at + 1 + k].astype(np.uint64) << np.uint64(8 * k)
    return int(np.count_nonzero((after == _U003A[0]) | (after == _U003A[1])))


def _blobs_fit(
    blobs: list[BlobEntry], data_start: int, file_size: int, packed: bool = False, implied: bool = False, unaligned: bool = False
) -> bool:
    """Stage 4 (what msgspec left: dtype, length, codec, prefix CRCs) and stage 5 (layout) on decoded blobs; with
    ``implied``, an offset or length the index left out is set to the planned one; with ``unaligned``, no raw blob."""
    itemsizes = _ITEMSIZES
    prod = math.prod
    #: codec id -> (known, expansion bound): looked up once per id, on its first blob's codec object, as the loop in
    #: parse_blob does
    ids: dict[str, tuple[bool, int | None]] = {}
    end = 0
    for b in blobs:
        size = itemsizes.get(b.dtype)
        if size is None:
            return False
        shape = b.shape
        n = shape[0] * shape[1] * size if len(shape) == 2 else prod(shape) * size  # 2-D factors: most blobs
        length = b.length
        if length is UNSET and implied:
            length = b.length = n
        if length != n or n >= MAX_INT or (not n and prod(d for d in shape if d) * size >= MAX_INT):
            return False
        codec = b.codec
        cid = codec.get("id")
        if type(cid) is not str:
            return False
        must = True
        if len(codec) > 1 and not (len(codec) == 2 and type(codec.get("level")) is int):  # {"id", "level"}: the usual
            must = codec.get("must_understand", True)
            if type(must) is not bool or (not _CONTAINERS.isdisjoint(map(type, codec.values())) and _too_deep(codec, 4)):
                return False
        info = ids.get(cid)
        if info is None:
            known = codecs.base.is_known(cid)
            bound = None
            if known:
                try:
                    bound = codecs.get_codec(codec).max_expansion()
                except AdapterpackError:
                    return False
            info = ids[cid] = (known, bound)
        known, bound = info
        stored = b.stored_length
        if known:
            if (stored != length) if bound is None else (length > bound * stored + 64):
                return False
            if cid == "byteplanes" and size not in (2, 4, 8):
                return False
        elif must:
            return False
        # an explicit empty prefix_crc32c decodes to () like an absent one, and is never valid: the re-encoding
        # omits it, so _no_duplicate_keys has already sent such an index to the checks in Python
        if b.prefix_crc32c and (len(shape) < 1 or shape[0] < 2 or len(b.prefix_crc32c) != prefix.count(shape[0])):
            return False
        if not known:
            b.known_codec = False
        if unaligned and cid == "raw":
            return False
        if packed and cid != "raw":
            start = end
        else:
            align = LARGE_ALIGNMENT if stored >= SMALL_BLOB else SMALL_ALIGNMENT
            start = -(-end // align) * align
        if b.offset != start:
            if b.offset is not UNSET or not implied:
                return False
            b.offset = start
        end = start + stored
    return data_start + end == file_size


def _references_fit(adapters: list[AdapterRecord], n_blobs: int) -> list[int] | None:
    """Stage 6 on decoded records (names unique, references in range, every blob referenced), and the nesting
    depth of the free-form values (params, source); the reference count of every blob, or None."""
    used = [0] * n_blobs
    names = {a.name for a in adapters}
    if len(names) != len(adapters):
        return None
    for a in adapters:
        mods = a.modules
        if len({m.name for m in mods}) != len(mods):
            return None
        for m in mods:
            for r in m.tensors.values():
                if r >= n_blobs:
                    return None
                used[r] += 1
            p = m.params
            if p is not UNSET and not _CONTAINERS.isdisjoint(map(type, p.values())) and _too_deep(p, 6):
                return None
        if a.tensors is not UNSET:
            if len({t.name for t in a.tensors}) != len(a.tensors):
                return None
            for t in a.tensors:
                if t.blob >= n_blobs:
                    return None
                used[t.blob] += 1
        if a.source is not UNSET and _too_deep(a.source, 4):
            return None
    return None if 0 in used else used


#: Every run of :data:`_OVERFLOW_DIGITS` bytes holds a whole block of this many aligned to it (2 · 154 − 1 <= 309).
_DIGIT_BLOCK = 154
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % _OVERFLOW_DIGITS)
_ZERO = ord("0")


def _may_overflow(data: bytes) -> bool:
    """Whether ``data`` holds :data:`_OVERFLOW_DIGITS` digits in a row, which an integer literal that overflows binary64
    needs (msgspec decodes one in a free-form value to a Python int and would let it through; the fast path steps aside,
    and :func:`_exact_int` judges it). Blocks of digits only, then the tail a run may reach past the last whole block:
    a regular expression over the whole index costs many times more."""
    text = np.frombuffer(data, np.uint8)
    n = len(text) // _DIGIT_BLOCK * _DIGIT_BLOCK
    if n and bool(((text[:n] - _ZERO) < 10).reshape(-1, _DIGIT_BLOCK).all(axis=1).any()):
        return True
    return _LONG_DIGITS.search(data, max(0, n - _OVERFLOW_DIGITS)) is not None


def _fast_index(data: bytes, data_start: int, file_size: int, packed: bool, implied: bool, unaligned: bool = False) -> Index | None:
    if len(data) > _COUNTS_UNREACHABLE:
        try:
            _check_shape(data)
        except IndexFormatError:
            return None
    if _may_overflow(data):
        return None
    try:
        wire = _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not _no_duplicate_keys(data, wire) or _too_deep(wire.writer, 2):
        return None
    if not _blobs_fit(wire.blobs, data_start, file_size, packed, implied, unaligned):
        return None
    refs = _references_fit(wire.adapters, len(wire.blobs))
    if refs is None:
        return None
    return Index(None, wire.blobs, data=data, records=wire.adapters, refs=refs)


def read_index(
    data: bytes, data_start: int, file_size: int, packed: bool = False, implied: bool = False, unaligned: bool = False
) -> Index:
    """Validate index bytes (the JSON text) through stage 6 of spec §10.2 (JSON, blob table, layout, adapters and
    references); ``packed``: the file's preamble sets the packed-layout flag (spec §1.2); ``implied``: it sets the
    implied flag (BLOB offsets and lengths may be left out, spec §2.1); ``unaligned``: the unaligned flag (§1.2).

    The fast path (msgspec, above) accepts a sound index; anything else goes through :func:`loads`,
    :func:`parse_index` and :func:`check_references`, which raise the error spec §10.2 names.
    """
    index = _fast_index(data, data_start, file_size, packed, implied, unaligned)
    if index is None:
        index = parse_index(loads(data), data_start, file_size, packed, implied, unaligned)
        check_references(index)
        if index._data is None:
            index._data = data
    return index
