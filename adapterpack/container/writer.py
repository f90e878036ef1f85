"""Writing .apack files: encode blobs, lay them out per the alignment rule, write atomically."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import codecs, dtypes
from adapterpack.adapter import Adapter, StoredTensor, as_array
from adapterpack.atomic import atomic_file
from adapterpack.checksum import crc32c
from adapterpack.codecs import zstd as _zstd
from adapterpack.container import prefix
from adapterpack.container.index import IMPLIED_KEYS, blob_alignment, dumps, index_text, loads, parse_index, plan_offsets
from adapterpack.container.preamble import (
    FLAG_IMPLIED,
    FLAG_INDEX_ZSTD,
    FLAG_PACKED,
    FLAG_UNALIGNED,
    MAJOR,
    MAX_INDEX_LENGTH,
    MINOR,
    PREAMBLE_SIZE,
    Preamble,
    align_up,
)
from adapterpack.container.reader import BlobLoader
from adapterpack.container.records import build_adapter, check_references
from adapterpack.encodings import get_encoding, is_known
from adapterpack.errors import AdapterpackError, CodecError, ConversionError, DuplicateNameError, IndexTooLargeError
from adapterpack.limits import MAX_INDEX_RATIO
from adapterpack.version import __version__

#: zstd level of a compressed index up to :data:`INDEX_SMALL` bytes of JSON, and above (a writer's choice, not the spec's:
#: the small level costs tens of milliseconds on a few hundred KB and saves about a tenth of the frame).
INDEX_LEVEL_SMALL, INDEX_LEVEL_LARGE = 19, 9
INDEX_SMALL = 1 << 18


def compress_index(text: bytes) -> bytes:
    """The index JSON ``text`` as one Zstandard frame declaring its size (spec §1.3), deterministic for a libzstd version."""
    return _zstd.compress(text, INDEX_LEVEL_SMALL if len(text) <= INDEX_SMALL else INDEX_LEVEL_LARGE)


@dataclass
class WriteResult:
    """What was written: sizes for reports (``index_length`` as stored; ``index_text_length`` of its JSON)."""

    path: Path
    file_size: int
    index_length: int
    padding: int
    blobs: int
    decoded_bytes: int
    stored_bytes: int
    index_text_length: int = 0


def _writer_id() -> str:
    return f"adapterpack {__version__}"


def encode_blob(arr: np.ndarray, codec: str, level: int | None = None) -> tuple[bytes | memoryview, dict[str, Any], int]:
    """(stored bytes, codec object, crc32c) for one tensor; raw when compression does not pay.

    ``level`` None uses the codec's own default. byteplanes and pco cannot hold 1-byte elements
    (§5.2, §5.4): those get zstd, at ``level`` when one is given (zstd levels mean the same in
    both codecs) and at zstd's own default otherwise."""
    dt = dtypes.of_array(arr)
    arr = np.ascontiguousarray(arr, dtype=dt.numpy)
    data = dtypes.as_bytes(arr)
    if dt.name == "bool" and len(data) and np.frombuffer(data, np.uint8).max() > 1:
        raise CodecError(f"a bool tensor {list(arr.shape)} holds a byte other than 0 or 1 (spec §3)")
    crc = crc32c(data)
    if codec in ("byteplanes", "pco") and dt.itemsize not in (2, 4, 8):
        codec = "zstd"
    if codec != "raw" and len(data):
        c = codecs.get_codec({"id": codec} if level is None else {"id": codec, "level": level})
        stored = c.encode(data, dt.itemsize)
        bound = c.max_expansion()
        if bound is not None and len(data) > bound * len(stored) + 64:  # pco of constant data can beat §7's ratio limit
            c = codecs.get_codec("zstd")
            stored = c.encode(data, dt.itemsize)
        if len(stored) < len(data):
            return stored, c.get_config(), crc
    return data, {"id": "raw"}, crc


def _module_entry(m: Any, slot_refs: dict[str, int]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": m.name,
        "encoding": m.encoding,
        "base_shape": list(m.base_shape),
        "params": m.params,
        "tensors": slot_refs,
    }
    if not m.must_understand:
        entry["must_understand"] = False
    return entry


#: ``encode(array) -> (stored_length, codec config, CRC-32C of the decoded bytes)`` for one blob.
BlobEncoder = Callable[[np.ndarray], tuple[int, dict[str, Any], int]]


@dataclass
class ApackPlan:
    """The index of a file about to be written and where its blobs go (spec §1–§2)."""

    index: dict[str, Any]
    #: the index as stored after the preamble (a zstd frame when ``preamble.compressed_index``)
    index_bytes: bytes
    preamble: Preamble
    offsets: list[int]
    lengths: list[int]
    #: the index's JSON text
    index_text: bytes = b""

    @property
    def file_size(self) -> int:
        """Bytes of the whole file: the data section ends at the last blob (spec §1.2)."""
        return self.preamble.data_start + (self.offsets[-1] + self.lengths[-1] if self.lengths else 0)


def blob_identity(t: Any) -> tuple[Any, ...]:
    """What makes two tensor slots one blob in the file ``write_apack`` writes: the same blob of the same open
    ``.apack`` file (a :class:`StoredTensor` whose loader is a :class:`BlobLoader`: one reader, one blob index), or
    else the same object (a numpy array or stored tensor, by identity; equal values in distinct arrays stay distinct).

    Keys hold ids: they are meaningful while the objects they come from are alive (the caller keeps them)."""
    if isinstance(t, StoredTensor):
        loader = t.loader
        if type(loader) is BlobLoader:
            return ("blob", id(loader.reader), loader.index)
    return ("object", id(t))


def plan_apack(
    adapters: Sequence[Adapter],
    encode: BlobEncoder,
    *,
    validate: bool = True,
    compact: bool = True,
    zstd_index: bool | None = None,
) -> ApackPlan:
    """The index ``write_apack`` writes for ``adapters``: every distinct tensor through ``encode`` once, in file
    order, every record validated unless ``validate`` is False. Used by the writer and by size audits that need
    the exact file size without writing it.

    Slots holding the same tensor (:func:`blob_identity`: a blob of one open source file, or one array object)
    reference one blob (spec §2.1; a bank's U and V, spec/shared.md §2). File order: blobs referenced more than once
    first, in the order of their first reference (a bank's bases before its members' own blobs, as spec/shared.md
    asks), then every other blob in slot order (adapters, their records and slots, then their tensors).

    ``compact`` (1.3, spec §1.2–§1.3): in a file holding a compressed blob, compressed blobs are packed without
    alignment padding and the index is stored as a zstd frame where that is smaller; each sets its must-understand
    flag bit. A file of raw blobs only, or any file without ``compact``, has the layout and plain index of 1.2.
    ``zstd_index`` True stores the index as a zstd frame wherever that is smaller, raw blobs only or not; False
    never; None (default): as above, and also in a file holding a ``qsvd`` record (decoded on every load anyway)."""
    # pass 1: every slot's identity, in slot order (records validated before anything is decoded)
    firsts: dict[tuple[Any, ...], Any] = {}  # identity -> the first tensor holding it (keeps every id alive)
    refs: dict[tuple[Any, ...], int] = {}
    checkpointed: set[tuple[Any, ...]] = set()

    def see(t: Any, by_prefix: bool = False) -> tuple[Any, ...]:
        key = blob_identity(t)
        firsts.setdefault(key, t)
        refs[key] = refs.get(key, 0) + 1
        if by_prefix:
            checkpointed.add(key)
        return key

    slot_keys = []
    for a in adapters:
        mods = []
        for m in a.modules.values():
            if validate:
                get_encoding(m.encoding).validate(m)
            by_prefix = get_encoding(m.encoding).prefix_slots if is_known(m.encoding) else ()
            mods.append((m, {slot: see(t, slot in by_prefix) for slot, t in m.tensors.items()}))
        slot_keys.append((a, mods, [(n, see(t)) for n, t in a.tensors.items()]))

    # pass 2: each distinct tensor encoded once, shared ones first
    order = [k for k in firsts if refs[k] > 1] + [k for k in firsts if refs[k] == 1]
    number = {k: i for i, k in enumerate(order)}
    lengths: list[int] = []
    blob_objs: list[dict[str, Any]] = []
    for key in order:
        t = firsts[key]
        arr = as_array(t) if isinstance(t, StoredTensor) else np.asarray(t)
        n, cfg, crc = encode(arr)
        lengths.append(n)
        dt = dtypes.of_array(arr)
        obj = {"dtype": dt.name, "shape": list(arr.shape), "codec": cfg, "stored_length": n, "length": arr.nbytes, "crc32c": crc}
        if key in checkpointed and cfg["id"] == "raw" and prefix.count(arr.shape[0] if arr.ndim else 0):
            obj[prefix.KEY] = prefix.prefix_crcs(dtypes.as_bytes(np.asarray(arr, dtype=dt.numpy)), arr.shape[0])
        blob_objs.append(obj)
        del arr

    index_adapters = []
    for a, mods, tensors in slot_keys:
        entry: dict[str, Any] = {
            "name": a.name,
            "base_model": a.base_model,
            "base_architecture": a.base_architecture,
            "modules": [_module_entry(m, {slot: number[k] for slot, k in keys.items()}) for m, keys in mods],
            "tensors": [{"name": n, "blob": number[k]} for n, k in tensors],
        }
        if a.source:
            entry["source"] = a.source
        if a.metadata:
            entry["metadata"] = {str(k): str(v) for k, v in a.metadata.items()}
        index_adapters.append(entry)

    offsets, layout = plan_layout(blob_objs, compact)
    packed = bool(layout & FLAG_PACKED)
    for obj, off in zip(blob_objs, offsets, strict=True):
        obj["offset"] = off
    index = {"writer": _writer_id(), "adapters": index_adapters, "blobs": [_ordered(b) for b in blob_objs]}
    # raw blobs only: the index stays plain JSON, so opening a file meant for zero-copy loads decodes no frame
    # (its cost on an open is measured in BENCHMARKS.md); such a file has the 1.2 layout and flags 0
    if zstd_index is None:  # a qsvd record is dequantized on every load: its file gains nothing from a plain index
        zstd_index = packed or any(m.encoding == "qsvd" for a in adapters for m in a)
    stored, text, flags = store_index(index, zstd_index and compact)
    pre = Preamble(MAJOR, MINOR, flags | layout, len(stored), crc32c(stored))
    return ApackPlan(index, stored, pre, offsets, lengths, text)


def plan_layout(blobs: list[dict[str, Any]], compact: bool = True) -> tuple[list[int], int]:
    """(offsets, layout flag bits) of BLOB objects (``codec``, ``stored_length``) in file order (spec §1.1–§1.2): with
    ``compact`` and a compressed blob, compressed blobs packed (bit 1), and with no raw blob at all, the data section
    unaligned too (bit 3, since 1.5: nothing in the file is mapped); raw blobs only, or not ``compact``: the 1.2 layout,
    flags 0 (with raw blobs only, both layouts are the same, so no flag is needed)."""
    raw = [b["codec"]["id"] == "raw" for b in blobs]
    flags = 0 if not compact or all(raw) else FLAG_PACKED | (0 if any(raw) else FLAG_UNALIGNED)
    return plan_offsets([b["stored_length"] for b in blobs], raw if flags else None), flags


def store_index(index: dict[str, Any], compress: bool) -> tuple[bytes, bytes, int]:
    """(the index bytes to store after the preamble, the JSON text a reader will parse, their flag bits) for ``index``,
    whose BLOB objects hold every key (spec §1.3, §2.1).

    ``compress``: a zstd frame of the index with every BLOB ``offset`` and ``length`` left out (flag bits 0 and 2: a
    reader derives both, and cumulative offsets are what is left to compress in it; BENCHMARKS.md), where the frame
    is smaller than the plain text and expands at most :data:`MAX_INDEX_RATIO` times; else the plain text, flags 0.
    """
    text = dumps(index)
    if compress:
        short = dumps(index | {"blobs": [{k: v for k, v in b.items() if k not in IMPLIED_KEYS} for b in index["blobs"]]})
        # the limit is on the text a reader parses (spec §7): the short one here, however long the full one
        stored = compress_index(short) if len(short) <= MAX_INDEX_LENGTH else text
        if len(stored) < len(text) and len(short) <= MAX_INDEX_RATIO * len(stored):  # a reader refuses a frame expanding more
            return stored, short, FLAG_INDEX_ZSTD | FLAG_IMPLIED
    if len(text) > MAX_INDEX_LENGTH:
        raise IndexTooLargeError(f"index would be {len(text)} bytes, over the {MAX_INDEX_LENGTH}-byte limit")
    return text, text, 0


def write_apack(
    path: str | os.PathLike[str],
    adapters: Adapter | Sequence[Adapter],
    *,
    codec: str = codecs.DEFAULT_CODEC,
    level: int | None = None,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = True,
    compact: bool = True,
    zstd_index: bool | None = None,
    expected_size: int | None = None,
) -> WriteResult:
    """Write ``adapters`` to ``path`` atomically (``overwrite`` false: OutputExistsError if it exists).

    ``codec`` is applied to every blob where it makes the blob smaller (raw otherwise;
    byteplanes and pco fall back to zstd for 1-byte types); ``level`` None means the codec's default. ``progress`` is called
    with the decoded bytes of each blob as it is encoded. ``compact`` False writes the 1.2 layout with a plain JSON index
    (what a reader of 1.0–1.2 reads; see :func:`plan_apack`, also for ``zstd_index``). ``expected_size``: the file
    size a caller planned for (a budget); ConversionError, with nothing written, if the file would differ from it.
    """
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    codecs.get_codec(codec)  # raises UnknownCodecError naming it
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise DuplicateNameError(f"adapter names must be unique, got {names}")

    stored: list[bytes | memoryview] = []

    def encode(arr: np.ndarray) -> tuple[int, dict[str, Any], int]:
        data, cfg, crc = encode_blob(arr, codec, level)
        stored.append(data)
        if progress is not None:
            progress(arr.nbytes)
        return len(data), cfg, crc

    plan = plan_apack(adapters, encode, compact=compact, zstd_index=zstd_index)
    index_bytes, offsets, pre = plan.index_bytes, plan.offsets, plan.preamble
    blob_objs = plan.index["blobs"]
    if progress is not None:  # a blob several slots reference was encoded once: the other references are done too
        repeated = sum(blob_objs[i]["length"] for i in _references(plan.index)) - sum(b["length"] for b in blob_objs)
        if repeated:
            progress(repeated)
    data_start = pre.data_start
    end = plan.file_size
    try:
        text = index_text(index_bytes, pre.compressed_index)  # what a reader will parse, through the reader's own decoder
        if text != plan.index_text:
            raise AdapterpackError("the compressed index does not decode to its JSON text")
        check_index(text, data_start, end, pre.packed, pre.implied, pre.unaligned)
    except AdapterpackError as e:
        raise type(e)(f"cannot write {path}: {e}") from None
    if expected_size is not None and end != expected_size:
        raise ConversionError(f"cannot write {path}: the file would be {end:,} B, planned {expected_size:,} B; nothing written")
    padding = data_start - PREAMBLE_SIZE - len(index_bytes)
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(pre.pack())
        f.write(index_bytes)
        f.write(b"\0" * padding)
        pos = 0
        for s, off in zip(stored, offsets, strict=True):
            gap = off - pos
            f.write(b"\0" * gap)
            f.write(s)
            padding += gap
            pos = off + len(s)
        file_size = data_start + pos
    return WriteResult(
        path=Path(path),
        file_size=file_size,
        index_length=len(index_bytes),
        padding=padding,
        blobs=len(stored),
        decoded_bytes=sum(b["length"] for b in blob_objs),
        stored_bytes=sum(len(s) for s in stored),
        index_text_length=len(plan.index_text),
    )


def check_index(
    index_bytes: bytes, data_start: int, file_size: int, packed: bool = False, implied: bool = False, unaligned: bool = False
) -> None:
    """Refuse an index (its JSON text; ``packed``/``implied``/``unaligned``: of a file with that flag) the reader would refuse,
    with the reader's own checks and error classes.

    Runs on the bytes about to be written (so it sees exactly what JSON kept): the index
    schema, blob table and layout, references and names, and every record of every
    adapter (encodings validate from dtypes and shapes; no tensor is read).
    """
    index = parse_index(loads(index_bytes), data_start, file_size, packed, implied, unaligned)
    check_references(index)
    blobs = index.blobs

    def placeholder(i: int) -> StoredTensor:
        b = blobs[i]
        return StoredTensor(b.dtype, b.shape, b.stored_length, b.codec_id, _not_written_yet)

    for raw in index.adapters:
        build_adapter(raw, blobs, placeholder)


def _references(index: dict[str, Any]) -> list[int]:
    """The blob number of every record slot and tensor entry of ``index`` (a blob as often as it is referenced)."""
    out = []
    for a in index["adapters"]:
        for m in a["modules"]:
            out.extend(m["tensors"].values())
        out.extend(t["blob"] for t in a["tensors"])
    return out


def _not_written_yet() -> np.ndarray:
    raise AdapterpackError("the file is not written yet")


def _ordered(b: dict[str, Any]) -> dict[str, Any]:
    keys = ("dtype", "shape", "codec", "offset", "stored_length", "length", "crc32c", prefix.KEY)
    return {k: b[k] for k in keys if k in b}


__all__ = [
    "WriteResult",
    "align_up",
    "blob_alignment",
    "blob_identity",
    "check_index",
    "compress_index",
    "encode_blob",
    "plan_layout",
    "store_index",
    "write_apack",
]
