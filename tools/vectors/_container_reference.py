"""A reader of `.apack` bytes written from spec/format.md and the encoding pages alone: the second implementation.

It must not share code with the library it checks, so it imports only the standard library, numpy, ml_dtypes,
zstandard, pcodec and crc32c (``tests/test_container_reference.py`` checks that, statically and in a fresh
interpreter). It is a reference, not a fast path: it reads the whole file into memory, checks the stages of
spec/format.md §10.2 in their order and raises the §10.1 class of the first defect it meets.

Scope: the container (§1, §2, §3, §4, §5, §7, §8), the generic record checks of stage 7 (encoding id,
``must_understand``, slot names), every encoding's own record rules (stage 7: format.md §6.1 ``lora``, svd.md §1–2,
shared.md §1, nola.md §1, qsvd.md §1) and the value checks of stage 8 (svd S, nola coefficients, qsvd S, scales and
binary16 vectors), and reads at a rank (format.md §8.1, svd.md §3, qsvd.md §3). ΔW is not computed:
``tools/vectors/_reference.py`` computes it from the decoded tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
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
    prefix: list[int] | None  # prefix_crc32c (§8.1)


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
    return _Blob(dtype, tuple(shape), cid, known, b.get("offset", -1), stored, length, b["crc32c"], b.get("prefix_crc32c"))


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


def _named(items: list[Any], limit: int, what: str) -> Iterator[dict[str, Any]]:
    """Each of ``items`` in turn, once it is checked to be an object with a unique name of 1 to ``limit`` code points."""
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or not is_name(item.get("name"), limit):
            raise IndexFormatError(f"{what} is not an object with a name of 1-{limit} code points")
        if item["name"] in seen:
            raise DuplicateNameError(f"two {what}s named {item['name']!r}")
        seen.add(item["name"])
        yield item


def _references(doc: dict[str, Any], n_blobs: int) -> list[dict[str, Any]]:
    adapters = doc.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        raise IndexFormatError("adapters missing, not an array, or empty")
    for _ in _named(adapters, MAX_ADAPTER_NAME, "adapter"):
        pass  # every adapter's name first, then each adapter's contents (§10.2 stage 6)
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
        for m in _named(modules, MAX_NAME, "module"):
            if not isinstance(m.get("tensors"), dict):
                raise IndexFormatError("module tensors missing or not an object")
            for v in m["tensors"].values():
                ref(v)
        tensors = a.get("tensors", [])
        if not isinstance(tensors, list):
            raise IndexFormatError("adapter tensors is not an array")
        for t in _named(tensors, MAX_NAME, "tensor"):
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
    if enc != "nola":  # the encoding's first check (§6.1, svd.md §1, shared.md §1, qsvd.md §1); nola's comes after its params
        _slots(enc, m, SLOTS[enc])
    RULES[enc](m, blobs)
    return True


def _slots(enc: str, m: dict[str, Any], slots: dict[str, bool]) -> None:
    """A required slot missing, or a slot the encoding does not have (RecordError)."""
    for slot in m["tensors"]:
        if slot not in slots:
            raise RecordError(f"{enc} record with unknown slot {slot!r}")
    for slot, required in slots.items():
        if required and slot not in m["tensors"]:
            raise RecordError(f"{enc} record without slot {slot!r}")


def _lora(m: dict[str, Any], blobs: list[_Blob]) -> None:
    """§6.1's rules, from params and shapes alone, in §6.1's order (the slots checked before)."""
    p, t, base = m["params"], m["tensors"], m["base_shape"]
    if "rank" not in p or not is_int(p["rank"]) or p["rank"] < 1:
        raise RankError("lora rank missing or not an int >= 1")
    r = p["rank"]
    alpha = p.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise RecordError("lora alpha missing or not a finite number")
    layout = p.get("layout", "linear")
    if layout not in ("linear", "embedding", "conv"):
        raise RecordError(f"lora layout {layout!r}")
    for key in ("fan_in_fan_out", "rslora", "dora"):
        if not isinstance(p.get(key, False), bool):
            raise RecordError(f"lora {key} is not a bool")
    a, b = blobs[t["A"]], blobs[t["B"]]
    if a.dtype != b.dtype or a.dtype not in FLOAT_DTYPES:
        raise RecordError("lora A and B dtypes differ or are not floating")
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise RecordError("lora A or B has fewer than 2 dimensions")
    if a.shape[0] != r or b.shape[1] != r:
        raise RankError(f"lora rank {r} does not match A {list(a.shape)} and B {list(b.shape)}")
    if p.get("fan_in_fan_out", False) and layout != "linear":
        raise RecordError("fan_in_fan_out with a layout other than linear")
    if layout != "conv" and (len(a.shape) != 2 or len(b.shape) != 2):
        raise RecordError(f"{layout} lora needs 2-D A and B")
    if layout == "conv" and (len(b.shape) != len(a.shape) or any(d != 1 for d in b.shape[2:])):
        raise RecordError("conv B is not [out, r, 1, ..] with as many dimensions as A")
    out, n = b.shape[0], a.shape[1]
    want = {
        "linear": [n, out] if p.get("fan_in_fan_out", False) else [out, n],
        "embedding": [n, out],
        "conv": [out, n, *a.shape[2:]],
    }[layout]
    if list(base) != want:
        raise RecordError(f"lora base_shape {base} does not fit A and B (expected {want})")
    if p.get("dora", False) != ("magnitude" in t):
        raise RecordError("dora must be true exactly when magnitude is present")
    if "magnitude" in t:
        mag = blobs[t["magnitude"]]
        if mag.dtype not in FLOAT_DTYPES or mag.shape != (out,):
            raise RecordError("lora magnitude is not a floating [out] vector")


def _number(v: Any) -> bool:
    """A JSON number (never ``true``/``false``)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _layout_of(enc: str, p: dict[str, Any], layouts: tuple[str, ...]) -> tuple[str, bool]:
    """``layout`` (default ``linear``) and ``fan_in_fan_out`` (a bool, default false, only with ``linear``)."""
    layout = p.get("layout", "linear")
    if not isinstance(layout, str) or layout not in layouts:
        raise RecordError(f"{enc} layout {layout!r}")
    fifo = p.get("fan_in_fan_out", False)
    if not isinstance(fifo, bool):
        raise RecordError(f"{enc} fan_in_fan_out is not a bool")
    if fifo and layout != "linear":
        raise RecordError(f"{enc} fan_in_fan_out with layout {layout}")
    return layout, fifo


def _matrix(enc: str, base: list[int], layout: str, fifo: bool, conv_ndim: int) -> tuple[int, int]:
    """(out, n) of the 2-D product from ``base_shape`` (svd.md §2, qsvd.md §1): ``linear`` ``[out, n]`` (``[n, out]``
    with ``fan_in_fan_out``), ``embedding`` ``[n, out]``, ``conv`` ``[out, in, *kernel]`` with ``n = in·Πkernel``."""
    if layout == "conv":
        if len(base) < conv_ndim:
            raise RecordError(f"{enc} conv base_shape {base} has fewer than {conv_ndim} dimensions")
        return base[0], math.prod(base[1:])
    if len(base) != 2:
        raise RecordError(f"{enc} {layout} base_shape {base} is not 2-D")
    return (base[1], base[0]) if fifo or layout == "embedding" else (base[0], base[1])


def _svd(m: dict[str, Any], blobs: list[_Blob]) -> None:
    """svd.md §1 (params, slots' dtypes and shapes) and §2 (``base_shape``), from params and shapes alone, in §1's order."""
    p, t = m["params"], m["tensors"]
    k = p.get("rank")
    if not is_int(k):  # k >= 0 (format.md §2: a missing rank is a RankError)
        raise RankError("svd rank missing or not an int")
    layout, fifo = _layout_of("svd", p, ("linear", "embedding", "conv"))
    s, ut, vt = blobs[t["S"]], blobs[t["Ut"]], blobs[t["Vt"]]
    if not {s.dtype, ut.dtype, vt.dtype} <= FLOAT_DTYPES or ut.dtype != vt.dtype:
        raise RecordError("svd S, Ut, Vt not floating, or Ut and Vt dtypes differ")
    if len(s.shape) != 1 or len(ut.shape) != 2 or len(vt.shape) != 2:
        raise RecordError("svd S is not [k], or Ut, Vt are not [k, out], [k, n]")
    if not s.shape[0] == ut.shape[0] == vt.shape[0] == k:
        raise RankError(f"svd rank {k} does not match S {list(s.shape)}, Ut {list(ut.shape)}, Vt {list(vt.shape)}")
    out, n = ut.shape[1], vt.shape[1]
    if k > min(out, n):
        raise RankError(f"svd rank {k} above min(out, n) = {min(out, n)}")
    if _matrix("svd", m["base_shape"], layout, fifo, 3) != (out, n):
        raise RecordError(f"svd base_shape {m['base_shape']} does not fit Ut and Vt ({layout})")


def _shared(m: dict[str, Any], blobs: list[_Blob]) -> None:
    """shared.md §1: rank, form, layout; U, V, S of one floating dtype fitting them and ``base_shape``."""
    p, t = m["params"], m["tensors"]
    r = p.get("rank")
    if not is_int(r) or r < 1:
        raise RankError("shared rank missing or not an int >= 1")
    form = p.get("form")
    if form not in ("full", "diagonal"):
        raise RecordError(f"shared form {form!r} (required: full or diagonal)")
    layout, fifo = _layout_of("shared", p, ("linear", "embedding"))
    u, v, s = blobs[t["U"]], blobs[t["V"]], blobs[t["S"]]
    if u.dtype not in FLOAT_DTYPES or not u.dtype == v.dtype == s.dtype:
        raise RecordError("shared U, V, S not of one floating dtype")
    if len(u.shape) != 2 or len(v.shape) != 2:
        raise RecordError("shared U, V not 2-D")
    if u.shape[1] != r or v.shape[1] != r or s.shape != ((r, r) if form == "full" else (r,)):
        raise RankError(f"shared rank {r} does not fit U {list(u.shape)}, V {list(v.shape)}, S {list(s.shape)} ({form})")
    out, n = u.shape[0], v.shape[0]
    if list(m["base_shape"]) != ([n, out] if fifo or layout == "embedding" else [out, n]):
        raise RecordError(f"shared base_shape {m['base_shape']} does not fit U and V ({layout})")


def _nola(m: dict[str, Any], blobs: list[_Blob]) -> None:
    """nola.md §1's order: params (in its table's order), the slots, ``base_shape``, the limits of format.md §7, then the
    slots' dtypes and shapes."""
    p, t = m["params"], m["tensors"]
    if p.get("generator") != "philox4x32-10":
        raise GeneratorError(f"nola generator {p.get('generator')!r}")
    if not is_int(p.get("generator_version")) or p["generator_version"] != 1:
        raise GeneratorError(f"nola generator philox4x32-10 version {p.get('generator_version')!r}")
    for key, bound in (("seed", INT_LIMIT), ("stream", 2**32)):
        if not is_int(p.get(key)) or p[key] >= bound:
            raise RecordError(f"nola {key} missing or not an int below {bound}")
    r = p.get("rank")
    if not is_int(r) or r < 1:
        raise RankError("nola rank missing or not an int >= 1")
    for key in ("k_A", "k_B"):
        if not is_int(p.get(key)) or p[key] >= 2**32:
            raise RecordError(f"nola {key} missing or not an int below 2^32")
    if not _number(p.get("scale")) or not math.isfinite(p["scale"]):
        raise RecordError("nola scale missing or not a finite number")
    for key, default in (("A0", "generated"), ("B0", "zero")):
        if p.get(key, default) not in ("generated", "zero", "stored"):
            raise RecordError(f"nola {key} {p[key]!r}")
    if not isinstance(p.get("fan_in_fan_out", False), bool):
        raise RecordError("nola fan_in_fan_out is not a bool")
    stored = {key: p.get(key, default) == "stored" for key, default in (("A0", "generated"), ("B0", "zero"))}
    _slots("nola", m, {"alpha": True, "beta": True} | stored)
    base = m["base_shape"]
    if len(base) != 2:
        raise RecordError(f"nola base_shape {base} is not 2-D")
    out, n = (base[1], base[0]) if p.get("fan_in_fan_out", False) else (base[0], base[1])
    # Limits, before generating anything (nola.md §1, format.md §7). They imply nola.md §1's `r·in, r·out <= 2^34`.
    if r > min(out, n) or r * (out + n) > 2**30:
        raise RankError(f"nola rank {r} above min(out, in) or its factors over 2^30 elements")
    if r * (p["k_A"] * n + p["k_B"] * out) > 2**30:
        raise RecordError("nola decode would generate more than 2^30 random values")
    want = {"alpha": (p["k_A"],), "beta": (p["k_B"],), "A0": (r, n), "B0": (out, r)}
    for slot in ("alpha", "beta", "A0", "B0"):
        b = blobs[t[slot]] if slot in t else None
        if b is not None and (b.dtype not in FLOAT_DTYPES or b.shape != want[slot]):
            raise RecordError(f"nola {slot} is {b.dtype} {list(b.shape)}, not floating {list(want[slot])}")


def _qsvd_bytes(w: int, out: int, n: int, g: int) -> int:
    """qsvd.md §1: ``b(w)``, the bytes of one component."""
    if w == 16:
        return 4 + 2 * out + 2 * n
    return 4 + 2 * (-(-out // g) + -(-n // g)) + -(-out * w // 8) + -(-n * w // 8)


def _qsvd(m: dict[str, Any], blobs: list[_Blob]) -> None:
    """qsvd.md §1's order: rank, bits, group_size, layout and ``base_shape``, rank against the shape and the factors
    limit (RankError), then ``data`` (the slots checked before)."""
    p = m["params"]
    k = p.get("rank")
    if not is_int(k):
        raise RankError(f"qsvd rank {k!r} not an int >= 0")
    bits = p.get("bits")
    if not isinstance(bits, list) or len(bits) != k or not all(is_int(w) and (1 <= w <= 8 or w == 16) for w in bits):
        raise RecordError(f"qsvd bits {bits!r} is not {k} widths of 1-8 or 16")
    g = p.get("group_size")
    if not is_int(g) or not 1 <= g <= 2**30:
        raise RecordError(f"qsvd group_size {g!r} not an int in [1, 2^30]")
    layout, fifo = _layout_of("qsvd", p, ("linear", "embedding", "conv"))
    out, n = _matrix("qsvd", m["base_shape"], layout, fifo, 3)
    if k > min(out, n):
        raise RankError(f"qsvd rank {k} above min(out, n) = {min(out, n)}")
    if k * (out + n) > 2**30:  # format.md §7; checked before `data`'s length, which such a shape cannot match
        raise RankError(f"qsvd factors rank·(out + n) = {k * (out + n)} over 2^30")
    data, total = blobs[m["tensors"]["data"]], sum(_qsvd_bytes(w, out, n, g) for w in bits)
    if data.dtype != "uint8" or data.shape != (total,):
        raise RecordError(f"qsvd data is {data.dtype} {list(data.shape)}, not uint8 [{total}]")


#: encoding id → its stage-7 rules, from params and shapes alone.
RULES = {"lora": _lora, "svd": _svd, "shared": _shared, "nola": _nola, "qsvd": _qsvd}


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
    return _array(raw, b.dtype, b.shape)


def _array(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decoded bytes as an array; bool bytes other than 0 and 1 refused (§3)."""
    arr = np.frombuffer(raw, DTYPES[dtype]).reshape(shape)
    if dtype == "bool":
        if arr.size and arr.max() > 1:
            raise CodecError("bool element other than 0 or 1")
        arr = arr.view(np.bool_)
    return arr


def _rows(data: bytes, data_start: int, b: _Blob, j: int) -> np.ndarray:
    """The first ``j`` rows of a blob (§8.1): none for ``j = 0`` (nothing checked); from a raw blob's rows up to the
    least checkpoint ``c >= j``, checked against ``prefix_crc32c[log2 c]``; else the whole blob, checked, then cut."""
    if j == 0:
        return np.empty((0, *b.shape[1:]), DTYPES[b.dtype])
    m = (j - 1).bit_length()  # c = 2^m = 2^ceil(log2 j)
    if b.codec != "raw" or b.prefix is None or 1 << m >= b.shape[0]:
        return _decode(data, data_start, b)[:j]
    row = b.length // b.shape[0]
    raw = data[data_start + b.offset : data_start + b.offset + (row << m)]
    if crc32c(raw) != b.prefix[m]:
        raise ChecksumError(f"CRC-32C of the first {1 << m} rows differs from prefix_crc32c[{m}]")
    return _array(raw[: j * row], b.dtype, (j, *b.shape[1:]))


#: per encoding, the slots whose values stage 8 checks when ΔW is computed, in the order it checks them.
VALUE_SLOTS = {"svd": ("S",), "nola": ("alpha", "beta"), "qsvd": ("data",)}


def _values(enc: str, slot: str, arr: np.ndarray, m: dict[str, Any], p: dict[str, Any]) -> None:
    """Stage 8's value checks, when ΔW or factors are computed (§3, §10.1): ``svd`` S (svd.md §2), ``nola``
    coefficients (nola.md §1), ``qsvd`` S, scales and binary16 vectors (qsvd.md §2). ``p``: the params read."""
    if enc == "svd" and slot == "S":
        s = arr.astype(np.float64)
        if not np.isfinite(s).all() or (s < 0).any() or (s[1:] > s[:-1]).any():  # -0.0 == 0.0 (IEEE comparison)
            raise RecordError("svd S not finite, negative or increasing")
    elif enc == "nola" and slot in ("alpha", "beta"):
        if not np.isfinite(arr.astype(np.float64)).all():
            raise RecordError(f"nola coefficients {slot} not finite")
    elif enc == "qsvd":
        layout, fifo = _layout_of("qsvd", p, ("linear", "embedding", "conv"))
        _qsvd_values(arr.tobytes(), p["bits"], *_matrix("qsvd", m["base_shape"], layout, fifo, 3), p["group_size"])


def _qsvd_values(data: bytes, bits: list[int], out: int, n: int, g: int) -> None:
    """qsvd.md §2: each component's S_j and scales finite and not negative, its binary16 vectors finite."""
    at = 0
    for j, w in enumerate(bits):
        (s,) = struct.unpack_from("<f", data, at)
        if not math.isfinite(s) or s < 0:
            raise RecordError(f"qsvd S_{j} = {s} not finite or negative")
        count = out + n if w == 16 else -(-out // g) + -(-n // g)  # binary16 vector values, or scales
        f16 = np.frombuffer(data, "<f2", count, at + 4).astype(np.float64)
        if not np.isfinite(f16).all() or (w != 16 and (f16 < 0).any()):
            what = "a binary16 vector value not finite" if w == 16 else "a scale not finite or negative"
            raise RecordError(f"qsvd component {j}: {what}")
        at += _qsvd_bytes(w, out, n, g)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def read(data: bytes, rank: int | None = None) -> Apack:
    """Read a whole `.apack` file from its bytes: stages 1-6 (open), then 7 and 8 per adapter (§10.2).

    With ``rank`` j, open it at rank j (format.md §8.1): every ``svd`` and ``qsvd`` record is read as its rank-min(j, k)
    truncation (svd.md §3, qsvd.md §3), its params' ``rank`` (and ``bits``) cut to it, reading only the rows a
    checkpoint covers; records of the other encodings have no truncation and are read whole.
    """
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
    decoded: dict[tuple[int, int | None], np.ndarray] = {}

    def get(i: int, rows: int | None = None) -> np.ndarray:
        """Blob ``i`` whole, or its first ``rows`` rows; each decoded once (§7: a bank's U and V)."""
        if (i, rows) not in decoded:
            b = blobs[i]
            decoded[i, rows] = _decode(data, data_start, b) if rows is None else _rows(data, data_start, b, rows)
        return decoded[i, rows]

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
            ad.modules.append(_module(m, rank, get))
        for t in a.get("tensors", []):
            if blobs[t["blob"]].known:
                ad.tensors[t["name"]] = get(t["blob"])
            else:
                ad.skipped_tensors.append(t["name"])
        out.append(ad)
    return Apack((major, minor), flags, out, _padding_problems(data, index_end, data_start, blobs))


def _module(m: dict[str, Any], rank: int | None, get: Callable[[int, int | None], np.ndarray]) -> Module:
    """Stage 8 for one record: its slots in the order its ``tensors`` lists them, each decoded and checked, then (as
    computing its ΔW does) the values its encoding refuses: ``svd`` S, ``nola`` α then β, ``qsvd`` ``data``.

    At rank j an ``svd`` record's S, Ut and Vt are read as their first j rows (svd.md §3: S, without checkpoints, whole
    and cut; nothing at j = 0); a ``qsvd`` record's ``data`` as its first ``Σ_{i<j} b(w_i)`` bytes, its rows (qsvd.md
    §3)."""
    enc, p = m["encoding"], dict(m["params"])
    rows: int | None = None
    if rank is not None and enc in ("svd", "qsvd"):
        p["rank"] = rows = min(rank, p["rank"])
        if enc == "qsvd":
            p["bits"] = p["bits"][:rows]
            layout, fifo = _layout_of("qsvd", p, ("linear", "embedding", "conv"))
            out, n = _matrix("qsvd", m["base_shape"], layout, fifo, 3)
            rows = sum(_qsvd_bytes(w, out, n, p["group_size"]) for w in p["bits"])
    tensors = {slot: get(i, rows) for slot, i in m["tensors"].items()}
    for slot in VALUE_SLOTS.get(enc, ()):
        _values(enc, slot, tensors[slot], m, p)
    return Module(m["name"], enc, m["base_shape"], p if rank is not None else m["params"], tensors)
