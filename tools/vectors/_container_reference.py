"""A reader of `.apack` bytes written from spec/format.md alone: the container's second implementation.

It must not share code with the library it checks, so it imports only the standard library, numpy, ml_dtypes,
zstandard, pcodec and crc32c (``tests/test_container_reference.py`` checks that, statically and in a fresh
interpreter). It is a reference, not a fast path: it reads the whole file into memory, checks the stages of
spec/format.md §10.2 in their order and raises the §10.1 class of the first defect it meets.

Scope: the container (§1, §2, §3, §4, §5, §7, §8) and the generic record checks of stage 7 (encoding id,
``must_understand``, slot names); of the encodings' own rules only ``lora``'s (§6.1), which this page defines.
The rules of svd.md, shared.md, nola.md and qsvd.md (ranks, params, value checks such as ordered S) and ΔW are
not implemented: ``tools/vectors/_reference.py`` computes ΔW from the decoded tensors.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import ml_dtypes
import numpy as np
import pcodec.wrapped
import zstandard

# ---------------------------------------------------------------------------------------------------------------
# §10.1 error classes (named exactly as the table names them)


class AdapterpackError(Exception):
    """Root of every refusal (§10.1)."""


class FormatError(AdapterpackError):
    """Parent of everything about an `.apack` file (§10.1)."""


class TruncatedFileError(FormatError):
    pass


class BadMagicError(FormatError):
    pass


class UnsupportedVersionError(FormatError):
    pass


class IndexTooLargeError(FormatError):
    pass


class IndexFormatError(FormatError):
    pass


class DuplicateNameError(IndexFormatError):
    pass


class LayoutError(FormatError):
    pass


class LengthMismatchError(FormatError):
    pass


class ChecksumError(FormatError):
    pass


class UnknownDTypeError(FormatError):
    pass


class UnknownCodecError(FormatError):
    pass


class UnknownEncodingError(FormatError):
    pass


class CodecError(FormatError):
    pass


class RecordError(FormatError):
    pass


class RankError(RecordError):
    pass


class GeneratorError(RecordError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Constants (§1.1, §3, §5, §7)

MAGIC = b"\x89APK\r\n\x1a\n"
KNOWN_FLAGS = 0x000F  # bits 0-3 (§1.1); bits 4-15 are must-understand and unknown, 16-31 informational
FLAG_COMPRESSED_INDEX, FLAG_PACKED, FLAG_IMPLIED, FLAG_UNALIGNED = 1, 2, 4, 8
MAX_INDEX_LENGTH = 64 * 1024 * 1024
MAX_INDEX_RATIO = 256
MAX_BLOBS = 1_000_000
MAX_NDIM = 8
MAX_JSON_DEPTH = 64
MAX_JSON_CONTAINERS = 2**22
MAX_JSON_VALUES = 2**23
MAX_NAME, MAX_ADAPTER_NAME = 1024, 256
MAX_ZSTD_RATIO = 32768
MAX_ZSTD_WINDOW = 128 * 1024 * 1024
INT_LIMIT = 2**53
PCO_CHUNK = 2**22

#: dtype name → (numpy dtype, itemsize) (§3), little-endian.
DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("u1"),  # checked 0/1, then viewed as numpy bool (§3)
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16"}
CODECS = {"raw", "zstd", "byteplanes", "pco"}
#: slot name → required, per encoding (§6.1, svd.md, shared.md, nola.md, qsvd.md). nola's A0/B0 depend on params.
SLOTS: dict[str, dict[str, bool]] = {
    "lora": {"A": True, "B": True, "magnitude": False},
    "svd": {"S": True, "Ut": True, "Vt": True},
    "shared": {"U": True, "V": True, "S": True},
    "nola": {"alpha": True, "beta": True, "A0": False, "B0": False},
    "qsvd": {"data": True},
}


# ---------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class Module:
    """A decoded MODULE record (§2.3): params as in the index (no defaults filled in)."""

    name: str
    encoding: str
    base_shape: list[int]
    params: dict[str, Any]
    tensors: dict[str, np.ndarray]


@dataclass
class Adapter:
    """A decoded ADAPTER (§2.2), defaults applied; what §4 says was skipped."""

    name: str
    base_model: str | None
    base_architecture: str | None
    metadata: dict[str, str]
    source: dict[str, Any]
    modules: list[Module] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    skipped_modules: list[str] = field(default_factory=list)
    skipped_tensors: list[str] = field(default_factory=list)


@dataclass
class Apack:
    """The whole file: version, flags, adapters, and the padding problems `verify` would report (§1.2)."""

    version: tuple[int, int]
    flags: int
    adapters: list[Adapter]
    padding_problems: list[str]


@dataclass
class _Blob:
    dtype: str
    shape: tuple[int, ...]
    codec: str
    known: bool  # codec implemented (False: must_understand false, skipped, §4)
    offset: int
    stored_length: int
    length: int
    crc: int


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) (§8)."""
    return _crc32c.crc32c(data)


def align_up(x: int, a: int) -> int:
    """Least multiple of ``a`` that is ``>= x`` (§1)."""
    return -(-x // a) * a


def is_int(v: Any) -> bool:
    """An `int` of §2: a JSON number without fraction or exponent, in ``[0, 2^53)`` (never ``true``)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < INT_LIMIT


def is_name(v: Any, limit: int) -> bool:
    """A non-empty string of at most ``limit`` code points (§2, §7)."""
    return isinstance(v, str) and 1 <= len(v) <= limit


def is_int_array(v: Any) -> bool:
    return isinstance(v, list) and all(is_int(x) for x in v)


# ---------------------------------------------------------------------------------------------------------------
# Zstandard frames (§1.3, §5.1, §5.3; RFC 8878 §3.1.1)


@dataclass
class _Frame:
    content_size: int | None
    dictionary_id: int
    window_size: int
    checksum: bool
    header_end: int


def _frame_header(data: bytes, err: type[FormatError]) -> _Frame:
    """Parse one Zstandard frame header at the start of ``data`` (skippable frames refused)."""
    if len(data) < 5 or data[:4] != b"\x28\xb5\x2f\xfd":
        raise err("not a Zstandard frame (bad magic or a skippable frame)")
    fhd = data[4]
    fcs_flag, single, reserved, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, (fhd >> 2) & 1, fhd & 3
    if reserved:
        raise err("zstd frame header reserved bit set")
    pos = 5
    window = 0
    if not single:
        if len(data) < pos + 1:
            raise err("zstd frame header truncated")
        wd = data[pos]
        exponent, mantissa = wd >> 3, wd & 7
        base = 1 << (10 + exponent)
        window = base + (base // 8) * mantissa
        pos += 1
    did_size = (0, 1, 2, 4)[did_flag]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if len(data) < pos + did_size + fcs_size:
        raise err("zstd frame header truncated")
    did = int.from_bytes(data[pos : pos + did_size], "little")
    pos += did_size
    fcs: int | None = None
    if fcs_size:
        fcs = int.from_bytes(data[pos : pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        pos += fcs_size
    if single:
        window = fcs or 0
    return _Frame(fcs, did, window, bool(checksum), pos)


def _frame_end(data: bytes, frame: _Frame, err: type[FormatError]) -> int:
    """Walk the block headers to the frame's end (blocks limited to content size + 1, §7)."""
    pos, blocks = frame.header_end, 0
    limit = (frame.content_size or 0) + 1
    while True:
        if len(data) < pos + 3:
            raise err("zstd frame truncated")
        header = int.from_bytes(data[pos : pos + 3], "little")
        last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
        pos += 3
        if btype == 3:
            raise err("zstd reserved block type")
        pos += 1 if btype == 1 else bsize
        blocks += 1
        if blocks > limit:
            raise err("zstd frame has more blocks than its content size allows")
        if pos > len(data):
            raise err("zstd frame truncated")
        if last:
            break
    if frame.checksum:
        pos += 4
        if pos > len(data):
            raise err("zstd frame truncated")
    return pos


def _check_frame_rest(data: bytes, frame: _Frame, err: type[FormatError]) -> None:
    """§5.3's frame rules after the content size: no dictionary, window limit, one frame and nothing after it."""
    if frame.dictionary_id:
        raise err("zstd frame names a dictionary")
    if frame.window_size > MAX_ZSTD_WINDOW:
        raise err("zstd window over the limit")
    if _frame_end(data, frame, err) != len(data):
        raise err("zstd frame followed by further data")


def _zstd_decode(data: bytes, size: int, err: type[FormatError]) -> bytes:
    """Decode one validated frame to exactly ``size`` bytes (libzstd verifies a content checksum)."""
    try:
        out = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except zstandard.ZstdError as e:
        raise err(f"corrupt zstd frame: {e}") from None
    if len(out) != size:
        raise err(f"zstd frame decodes to {len(out)} bytes, not {size}")
    return out


def _zstd_blob(data: bytes, size: int) -> bytes:
    """`zstd` codec (§5.1, §5.3): one frame declaring exactly ``size`` bytes."""
    frame = _frame_header(data, CodecError)
    if frame.content_size is None:
        raise CodecError("zstd frame declares no content size")
    if frame.content_size != size:
        raise CodecError(f"zstd frame declares {frame.content_size} bytes, the index {size}")
    _check_frame_rest(data, frame, CodecError)
    return _zstd_decode(data, size, CodecError)


def _byteplanes_blob(data: bytes, n: int, k: int) -> bytes:
    """`byteplanes` (§5.2): a u64 table of k frame lengths, then k frames of n bytes each; all checked first."""
    if len(data) < 8 * k:
        raise CodecError("byteplanes table truncated")
    lengths = struct.unpack_from(f"<{k}Q", data, 0)
    total, budget = 0, len(data) - 8 * k
    for ln in lengths:
        total += ln
        if total > budget:
            raise CodecError("byteplanes table adds up to more than the stored bytes")
    if total != budget:
        raise CodecError("byteplanes table does not add up to the stored bytes")
    frames, pos = [], 8 * k
    for ln in lengths:
        frames.append(data[pos : pos + ln])
        pos += ln
    for f in frames:  # every plane's declared size before the output exists
        fr = _frame_header(f, CodecError)
        if fr.content_size is None or fr.content_size != n:
            raise CodecError("byteplanes plane frame declares another size")
        _check_frame_rest(f, fr, CodecError)
    planes = np.empty((k, n), np.uint8)
    for j, f in enumerate(frames):
        planes[j] = np.frombuffer(_zstd_decode(f, n, CodecError), np.uint8)
    return planes.T.tobytes()


def _pco_blob(data: bytes, n: int, k: int) -> bytes:
    """`pco` (§5.4): Pco wrapped header, then per chunk of 2^22 elements its metadata and one page; sign rotation."""
    if k == 1:
        raise CodecError("pco blob of 1-byte elements")
    chunks = [min(PCO_CHUNK, n - s) for s in range(0, n, PCO_CHUNK)]
    if len(data) < 1 + 2 * len(chunks):
        raise CodecError("pco blob too short for its chunks")
    utype = np.dtype(f"<u{k}")
    out = np.empty(n, utype)
    try:
        fd, pos = pcodec.wrapped.FileDecompressor.new(data)
        start = 0
        for c in chunks:
            cd, used = fd.chunk_decompressor(data[pos:], f"u{8 * k}")
            pos += used
            dst = np.empty(c, utype)
            progress, used = cd.read_page_into(data[pos:], c, dst)
            pos += used
            if progress.n_processed != c or not progress.finished:
                raise CodecError("pco page holds fewer numbers than the index implies")
            out[start : start + c] = dst
            start += c
    except (RuntimeError, TypeError, ValueError) as e:
        raise CodecError(f"pco: {e}") from None
    if pos != len(data):
        raise CodecError("pco blob has bytes after its last page")
    b = 8 * k
    x = (out >> utype.type(1)) | ((out & utype.type(1)) << utype.type(b - 1))
    return x.astype(utype).tobytes()


# ---------------------------------------------------------------------------------------------------------------
# JSON (§2, §7)


def _parse_json(raw: bytes) -> dict[str, Any]:
    """Stage 3 (§10.2): UTF-8, the grammar (BOM, duplicates, NaN, overflow), an object, depth, lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IndexFormatError("index is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise IndexFormatError("index has a byte-order mark")
    _count_containers(text)

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key, value in kv:
            if key in d:
                raise DuplicateNameError(f"JSON key {key!r} twice in one object")
            d[key] = value
        return d

    def constant(name: str) -> Any:
        raise IndexFormatError(f"{name} in the index")

    def number(s: str) -> float:
        v = float(s)
        if math.isinf(v):
            raise IndexFormatError(f"number {s} overflows binary64")
        return v

    def integer(s: str) -> int:
        try:
            v = int(s)
            float(v)  # an integer literal is a number too: it must not overflow binary64 either
        except (ValueError, OverflowError):
            raise IndexFormatError(f"number {s[:20]}… overflows binary64") from None
        return v

    try:
        doc = json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_float=number, parse_int=integer)
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"index is not JSON: {e}") from None
    except (RecursionError, ValueError) as e:
        raise IndexFormatError(f"index is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise IndexFormatError("index is not a JSON object")
    _check_depth_and_strings(doc)
    return doc


def _count_containers(text: str) -> None:
    """§7 MAY limits: arrays and objects, and values (arrays, objects and commas), outside strings."""
    containers = values = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            containers += 1
            values += 1
        elif ch == ",":
            values += 1
    if containers > MAX_JSON_CONTAINERS or values > MAX_JSON_VALUES:
        raise IndexFormatError("index holds too many JSON containers or values")


def _check_depth_and_strings(doc: Any) -> None:
    """Nesting ≤ 64 (top-level object depth 1), then no lone surrogate in any key or string (§2)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    strings: list[str] = []
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise IndexFormatError("JSON nesting deeper than 64")
        if isinstance(v, dict):
            strings.extend(v)
            stack.extend((x, depth + 1) for x in v.values() if isinstance(x, (dict, list)))
            strings.extend(x for x in v.values() if isinstance(x, str))
        else:
            stack.extend((x, depth + 1) for x in v if isinstance(x, (dict, list)))
            strings.extend(x for x in v if isinstance(x, str))
    for s in strings:
        if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
            raise IndexFormatError("lone surrogate in a JSON string")


# ---------------------------------------------------------------------------------------------------------------
# Stages 1-2: preamble, index bytes (§1.1, §1.3)


def _preamble(data: bytes) -> tuple[int, int, int, int, int]:
    """Stage 1: returns (major, minor, flags, L, index_crc)."""
    if len(data) < 32:
        if data[:8] != MAGIC[: min(len(data), 8)]:
            raise BadMagicError("file shorter than the preamble, and not starting with the magic")
        raise TruncatedFileError("file shorter than the 32-byte preamble")
    if data[:8] != MAGIC:
        raise BadMagicError("wrong magic")
    major, minor, flags, length, crc, reserved = struct.unpack_from("<HHIQII", data, 8)
    if major != 1:
        raise UnsupportedVersionError(f"major version {major}")
    if flags & 0xFFFF & ~KNOWN_FLAGS:
        raise UnsupportedVersionError(f"unknown must-understand flag bits {flags & 0xFFFF & ~KNOWN_FLAGS:#x}")
    if reserved:
        raise IndexFormatError("nonzero reserved field")
    if length > MAX_INDEX_LENGTH:
        raise IndexTooLargeError(f"index_length {length}")
    if length < 2:
        raise IndexFormatError(f"index_length {length}")
    if len(data) < 32 + length:
        raise TruncatedFileError("file ends inside the index")
    return major, minor, flags, length, crc


def _index_text(stored: bytes, flags: int, crc: int) -> bytes:
    """Stage 2: the index CRC, then the compressed index's frame (§1.3)."""
    if crc32c(stored) != crc:
        raise ChecksumError("index CRC-32C differs")
    if not flags & FLAG_COMPRESSED_INDEX:
        return stored
    frame = _frame_header(stored, IndexFormatError)
    size = frame.content_size
    if size is None:
        raise IndexFormatError("compressed index declares no content size")
    if size > MAX_INDEX_LENGTH:
        raise IndexTooLargeError(f"compressed index declares {size} bytes")
    if size < 2:
        raise IndexFormatError(f"compressed index declares {size} bytes")
    if size > MAX_INDEX_RATIO * len(stored):
        raise IndexTooLargeError(f"compressed index declares more than {MAX_INDEX_RATIO} times its stored bytes")
    _check_frame_rest(stored, frame, IndexFormatError)
    return _zstd_decode(stored, size, IndexFormatError)


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: blob table (§2.1)


def _blob(b: Any, flags: int) -> _Blob:
    """One BLOB's checks, in §10.2 stage 4's order."""
    if not isinstance(b, dict):
        raise IndexFormatError("blob is not an object")
    dtype = b.get("dtype")
    if not isinstance(dtype, str):
        raise IndexFormatError("blob dtype missing or not a string")
    if dtype not in DTYPES:
        raise UnknownDTypeError(f"dtype {dtype!r}")
    shape = b.get("shape")
    if not is_int_array(shape) or len(shape) > MAX_NDIM:
        raise IndexFormatError("blob shape is not an int array of at most 8 dimensions")
    codec = b.get("codec")
    if not isinstance(codec, dict) or not isinstance(codec.get("id"), str):
        raise IndexFormatError("blob codec is not an object with a string id")
    implied = bool(flags & FLAG_IMPLIED)
    for key in ("offset", "stored_length", "length", "crc32c"):
        if key not in b:
            if implied and key in ("offset", "length"):
                continue
            raise IndexFormatError(f"blob {key} missing")
        if not is_int(b[key]):
            raise IndexFormatError(f"blob {key} is not an int")
    must = codec.get("must_understand", True)
    if not isinstance(must, bool):
        raise IndexFormatError("codec must_understand is not a bool")
    cid = codec["id"]
    known = cid in CODECS
    if not known and must:
        raise UnknownCodecError(f"codec {cid!r}")
    itemsize = DTYPES[dtype].itemsize
    product = math.prod(shape) * itemsize
    length = b.get("length", product)
    if length != product:
        raise LengthMismatchError(f"length {length} != prod(shape) * itemsize = {product}")
    if product >= INT_LIMIT:  # only a left-out length gets here: it would not be an int of the index (§2.1)
        raise LengthMismatchError(f"prod(shape) * itemsize = {product} is not below 2^53")
    if product == 0 and math.prod(d for d in shape if d) * itemsize >= INT_LIMIT:
        raise IndexFormatError("zero-size shape whose other dimensions overflow")
    if b["crc32c"] >= 2**32:
        raise IndexFormatError("crc32c >= 2^32")
    if "prefix_crc32c" in b:
        _prefix(b["prefix_crc32c"], shape)
    stored = b["stored_length"]
    if cid == "raw" and stored != length:
        raise LengthMismatchError("raw blob whose stored_length differs from its length")
    if known and cid != "raw" and length > MAX_ZSTD_RATIO * stored + 64:
        raise LengthMismatchError("decoded size beyond the codec's expansion limit")
    if cid == "byteplanes" and itemsize == 1:
        raise IndexFormatError("byteplanes for 1-byte elements")
    return _Blob(dtype, tuple(shape), cid, known, b.get("offset", -1), stored, length, b["crc32c"])


def _prefix(p: Any, shape: list[int]) -> None:
    """§8.1: an array of exactly M = ceil(log2 R) ints below 2^32, only on blobs with at least 2 rows."""
    if not isinstance(p, list):
        raise IndexFormatError("prefix_crc32c is not an array")
    if not shape or shape[0] < 2:
        raise IndexFormatError("prefix_crc32c on a blob with fewer than 2 rows")
    if len(p) != (shape[0] - 1).bit_length():
        raise IndexFormatError("prefix_crc32c holds the wrong number of entries")
    if not all(is_int(x) and x < 2**32 for x in p):
        raise IndexFormatError("prefix_crc32c entry is not an int below 2^32")


# ---------------------------------------------------------------------------------------------------------------
# Stage 5: layout (§1.2)


def _layout(blobs: list[_Blob], flags: int, data_start: int, file_size: int) -> None:
    """Every offset against the plan the flags select, then the file's end; fills in implied offsets."""
    end = 0
    for i, b in enumerate(blobs):
        if flags & FLAG_UNALIGNED and b.codec == "raw":
            raise LayoutError(f"raw blob {i} under the unaligned flag")
        a = 256 if b.stored_length >= 4096 else 8
        if flags & FLAG_PACKED and b.codec != "raw":
            a = 1
        planned = align_up(end, a) if i else 0
        if b.offset == -1:
            b.offset = planned
        elif b.offset != planned:
            raise LayoutError(f"blob {i} at offset {b.offset}, planned {planned}")
        end = planned + b.stored_length
    if file_size < data_start + end:
        raise TruncatedFileError("file ends before the last blob")
    if file_size > data_start + end:
        raise LayoutError("bytes after the last blob")


def _padding_problems(data: bytes, index_end: int, data_start: int, blobs: list[_Blob]) -> list[str]:
    """What `verify` adds (§1.2): nonzero padding after the index and between blobs."""
    problems = []
    if any(data[index_end:data_start]):
        problems.append("padding after the index is not zero")
    pos = 0
    for i, b in enumerate(blobs):
        if any(data[data_start + pos : data_start + b.offset]):
            problems.append(f"padding before blob {i} is not zero")
        pos = b.offset + b.stored_length
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Stage 6: adapters and references (§2.2, §2.3)


def _references(doc: dict[str, Any], n_blobs: int) -> list[dict[str, Any]]:
    adapters = doc.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        raise IndexFormatError("adapters missing, not an array, or empty")
    names: set[str] = set()
    for a in adapters:
        if not isinstance(a, dict) or not is_name(a.get("name"), MAX_ADAPTER_NAME):
            raise IndexFormatError("adapter is not an object with a name of 1-256 code points")
        if a["name"] in names:
            raise DuplicateNameError(f"two adapters named {a['name']!r}")
        names.add(a["name"])
    referenced = set()

    def ref(v: Any) -> int:
        if not is_int(v) or v >= n_blobs:
            raise IndexFormatError(f"blob reference {v!r} out of range")
        referenced.add(v)
        return v

    for a in adapters:
        modules = a.get("modules")
        if not isinstance(modules, list):
            raise IndexFormatError("adapter modules missing or not an array")
        seen: set[str] = set()
        for m in modules:
            if not isinstance(m, dict) or not is_name(m.get("name"), MAX_NAME):
                raise IndexFormatError("module is not an object with a name of 1-1024 code points")
            if m["name"] in seen:
                raise DuplicateNameError(f"two modules named {m['name']!r}")
            seen.add(m["name"])
            if not isinstance(m.get("tensors"), dict):
                raise IndexFormatError("module tensors missing or not an object")
            for v in m["tensors"].values():
                ref(v)
        tensors = a.get("tensors", [])
        if not isinstance(tensors, list):
            raise IndexFormatError("adapter tensors is not an array")
        seen = set()
        for t in tensors:
            if not isinstance(t, dict) or not is_name(t.get("name"), MAX_NAME):
                raise IndexFormatError("tensor entry is not an object with a name of 1-1024 code points")
            if t["name"] in seen:
                raise DuplicateNameError(f"two tensors named {t['name']!r}")
            seen.add(t["name"])
            ref(t.get("blob"))
    if len(referenced) != n_blobs:
        raise IndexFormatError(f"blob {min(set(range(n_blobs)) - referenced)} referenced by nothing")
    return adapters


# ---------------------------------------------------------------------------------------------------------------
# Stage 7: records (§2.2, §2.3, §4, §6.1)


def _adapter_keys(a: dict[str, Any]) -> None:
    for key in ("base_model", "base_architecture"):
        if not (a.get(key) is None or isinstance(a[key], str)):
            raise IndexFormatError(f"adapter {key} is not a string or null")
    if not isinstance(a.get("source", {}), dict):
        raise IndexFormatError("adapter source is not an object")
    metadata = a.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise IndexFormatError("adapter metadata is not an object of strings")


def _record(m: dict[str, Any], blobs: list[_Blob]) -> bool:
    """Stage 7 for one module; False when §4 says to skip it."""
    enc = m.get("encoding")
    if not isinstance(enc, str):
        raise IndexFormatError("module encoding missing or not a string")
    must = m.get("must_understand", True)
    if not isinstance(must, bool):
        raise IndexFormatError("module must_understand is not a bool")
    if enc not in SLOTS:
        if must:
            raise UnknownEncodingError(f"encoding {enc!r}")
        return False
    if any(not blobs[i].known for i in m["tensors"].values()):
        return False  # a blob of an unknown codec with must_understand false (§4)
    if not is_int_array(m.get("base_shape")) or len(m["base_shape"]) > MAX_NDIM:
        raise IndexFormatError("module base_shape missing or not an int array of at most 8 dimensions")
    if not isinstance(m.get("params"), dict):
        raise IndexFormatError("module params missing or not an object")
    slots = dict(SLOTS[enc])
    if enc == "nola":
        for key, default in (("A0", "generated"), ("B0", "zero")):
            slots[key] = m["params"].get(key, default) == "stored"
    for slot in m["tensors"]:
        if slot not in slots:
            raise RecordError(f"{enc} record with unknown slot {slot!r}")
    for slot, required in slots.items():
        if required and slot not in m["tensors"]:
            raise RecordError(f"{enc} record without slot {slot!r}")
    if enc == "lora":
        _lora(m, blobs)
    return True


def _lora(m: dict[str, Any], blobs: list[_Blob]) -> None:
    """§6.1's rules, from params and shapes alone."""
    p, t, base = m["params"], m["tensors"], m["base_shape"]
    if "rank" not in p or not is_int(p["rank"]) or p["rank"] < 1:
        raise RankError("lora rank missing or not an int >= 1")
    r = p["rank"]
    alpha = p.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise RecordError("lora alpha missing or not a finite number")
    for key in ("rslora", "fan_in_fan_out", "dora"):
        if not isinstance(p.get(key, False), bool):
            raise RecordError(f"lora {key} is not a bool")
    layout = p.get("layout", "linear")
    if layout not in ("linear", "embedding", "conv"):
        raise RecordError(f"lora layout {layout!r}")
    if p.get("fan_in_fan_out", False) and layout != "linear":
        raise RecordError("fan_in_fan_out with a layout other than linear")
    if p.get("dora", False) != ("magnitude" in t):
        raise RecordError("dora must be true exactly when magnitude is present")
    a, b = blobs[t["A"]], blobs[t["B"]]
    if a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES:
        raise RecordError("lora A and B dtypes differ or are not floating")
    conv = layout == "conv"
    if len(a.shape) < 2 or (not conv and len(a.shape) != 2) or len(b.shape) != len(a.shape) or len(b.shape) < 2:
        raise RecordError("lora A/B dimensions do not fit the layout")
    if any(d != 1 for d in b.shape[2:]):
        raise RecordError("conv B is not [out, r, 1, ..]")
    if a.shape[0] != r or b.shape[1] != r:
        raise RankError(f"lora rank {r} does not match A {list(a.shape)} and B {list(b.shape)}")
    out, n = b.shape[0], a.shape[1]
    want = {
        "linear": [n, out] if p.get("fan_in_fan_out", False) else [out, n],
        "embedding": [n, out],
        "conv": [out, n, *a.shape[2:]],
    }[layout]
    if list(base) != want:
        raise RecordError(f"lora base_shape {base} does not fit A and B (expected {want})")
    if "magnitude" in t:
        mag = blobs[t["magnitude"]]
        if mag.dtype not in FLOAT_DTYPES or mag.shape != (out,):
            raise RecordError("lora magnitude is not a floating [out] vector")


# ---------------------------------------------------------------------------------------------------------------
# Stage 8: blob contents (§5, §8, §3)


def _decode(data: bytes, data_start: int, b: _Blob) -> np.ndarray:
    """Codec decoding, then the CRC-32C, then bool values; the array in the blob's dtype and shape."""
    stored = data[data_start + b.offset : data_start + b.offset + b.stored_length]
    k = DTYPES[b.dtype].itemsize
    n = b.length // k
    if b.codec == "raw":
        raw = stored
    elif b.codec == "zstd":
        raw = _zstd_blob(stored, b.length)
    elif b.codec == "byteplanes":
        raw = _byteplanes_blob(stored, n, k)
    else:
        raw = _pco_blob(stored, n, k)
    if crc32c(raw) != b.crc:
        raise ChecksumError("blob CRC-32C differs")
    arr = np.frombuffer(raw, DTYPES[b.dtype]).reshape(b.shape)
    if b.dtype == "bool":
        if arr.size and arr.max() > 1:
            raise CodecError("bool element other than 0 or 1")
        arr = arr.view(np.bool_)
    return arr


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def read(data: bytes) -> Apack:
    """Read a whole `.apack` file from its bytes: stages 1-6 (open), then 7 and 8 per adapter (§10.2)."""
    major, minor, flags, length, crc = _preamble(data)
    doc = _parse_json(_index_text(data[32 : 32 + length], flags, crc))
    raw_blobs = doc.get("blobs")
    if not isinstance(raw_blobs, list) or len(raw_blobs) > MAX_BLOBS:
        raise IndexFormatError("blobs missing, not an array, or more than 1,000,000")
    blobs = [_blob(b, flags) for b in raw_blobs]
    index_end = 32 + length
    data_start = index_end if flags & FLAG_UNALIGNED else align_up(index_end, 256)
    _layout(blobs, flags, data_start, len(data))
    adapters = _references(doc, len(blobs))
    decoded: dict[int, np.ndarray] = {}

    def get(i: int) -> np.ndarray:
        if i not in decoded:
            decoded[i] = _decode(data, data_start, blobs[i])
        return decoded[i]

    out = []
    for a in adapters:
        _adapter_keys(a)
        ad = Adapter(a["name"], a.get("base_model"), a.get("base_architecture"), a.get("metadata", {}), a.get("source", {}))
        kept = []
        for m in a["modules"]:
            if _record(m, blobs):
                kept.append(m)
            else:
                ad.skipped_modules.append(m["name"])
        for m in kept:
            tensors = {slot: get(i) for slot, i in m["tensors"].items()}
            ad.modules.append(Module(m["name"], m["encoding"], m["base_shape"], m["params"], tensors))
        for t in a.get("tensors", []):
            if blobs[t["blob"]].known:
                ad.tensors[t["name"]] = get(t["blob"])
            else:
                ad.skipped_tensors.append(t["name"])
        out.append(ad)
    return Apack((major, minor), flags, out, _padding_problems(data, index_end, data_start, blobs))
