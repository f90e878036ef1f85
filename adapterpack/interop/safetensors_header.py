"""A safetensors file's header, checked against the limits of spec §7 before anything per tensor is built.

Every safetensors input (PEFT folders, kohya and diffusers files, importance files, the base
model's key names) goes through :func:`read_header` first: the header length, the tensor count,
each name's length, each shape against its dtype and byte range, and the byte ranges against
each other and the file (contiguous from 0 to the end, as the safetensors library requires).
So a small file listing a million empty tensors, or a shape its bytes cannot hold, is refused
after reading one bounded header, before ``safetensors`` builds an object per tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import dtypes
from ..errors import AdapterpackError, InputError
from ..limits import MAX_NDIM, MAX_SAFETENSORS_HEADER, MAX_SAFETENSORS_NAME, MAX_SAFETENSORS_TENSORS

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it: dtype code (``BF16``), shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """The checked header: tensors in file order of their names, and the string metadata (None when absent)."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None


class _TooManyObjects(Exception):
    """The header holds more JSON objects than a header of the most tensors allowed can."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, value: Any, where: str) -> TensorEntry:
    if len(name) > MAX_SAFETENSORS_NAME:
        raise InputError(f"{where}: a tensor name of {len(name)} characters exceeds the limit of {MAX_SAFETENSORS_NAME}")
    if not isinstance(value, dict):
        raise InputError(f"{where}: tensor {name!r:.100} is not described by an object")
    code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(code, str):
        raise InputError(f"{where}: tensor {name!r:.100} has no dtype")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_int(d) for d in shape):
        raise InputError(f"{where}: tensor {name!r:.100} shape must be at most {MAX_NDIM} non-negative integers, got {shape!r:.80}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets) or offsets[0] > offsets[1]:
        raise InputError(f"{where}: tensor {name!r:.100} data_offsets must be [begin, end], 0 <= begin <= end, got {offsets!r:.60}")
    try:
        itemsize: int | None = dtypes.by_safetensors(code).itemsize
    except AdapterpackError:
        itemsize = None  # a dtype adapterpack does not store: whoever reads the tensor refuses it, a key listing does not
    if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        raise InputError(
            f"{where}: tensor {name!r:.100} of shape {shape} {code} needs {math.prod(shape) * itemsize} bytes, "
            f"its data_offsets give {offsets[1] - offsets[0]}"
        )
    return TensorEntry(code, tuple(shape), offsets[0], offsets[1])


def read_header(path: str | os.PathLike[str], error: type[InputError] = InputError) -> Header:
    """The checked header of the safetensors file at ``path``.

    ``error`` (an InputError class) for a file that is not safetensors at all; InputError for one
    beyond the limits or whose header disagrees with itself or with the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise error(f"{path}: not a safetensors file (header length {n})")
        if n > MAX_SAFETENSORS_HEADER:
            raise InputError(f"{path}: safetensors header of {n} bytes exceeds the limit of {MAX_SAFETENSORS_HEADER}")
        text = f.read(n)
    objects = 0

    def count_objects(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """Each JSON object as it is parsed: one per tensor, the header and its metadata; stop past the limit."""
        nonlocal objects
        objects += 1
        if objects > MAX_SAFETENSORS_TENSORS + 2:
            raise _TooManyObjects
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=count_objects)
    except _TooManyObjects:
        raise InputError(f"{path}: more than {MAX_SAFETENSORS_TENSORS} tensors, over the limit") from None
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise error(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop(METADATA_KEY, None)
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise InputError(f"{path}: safetensors metadata must be an object of strings")
    if len(header) > MAX_SAFETENSORS_TENSORS:
        raise InputError(f"{path}: {len(header)} tensors exceed the limit of {MAX_SAFETENSORS_TENSORS}")
    tensors = {name: _entry(name, value, str(path)) for name, value in header.items()}
    data = size - 8 - n
    at = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != at:
            what = "overlaps another tensor" if t.begin < at else "leaves a gap"
            raise InputError(f"{path}: tensor {name!r:.100} data_offsets {[t.begin, t.end]} {what} (expected to begin at {at})")
        at = t.end
    if at != data:
        raise InputError(f"{path}: tensors cover {at} bytes of data, the file holds {data} (truncated or trailing bytes)")
    return Header(tensors, meta)
