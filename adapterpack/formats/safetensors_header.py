"""A safetensors file's header, checked against the limits of spec §7 before anything per tensor is built.

Every safetensors input (PEFT folders, kohya and diffusers files, importance files, the base
model's key names) goes through :func:`read_header` first: the header length, the tensor count,
each name's length, each shape against its dtype and byte range, and the byte ranges against
each other and the file (contiguous from 0 to the end, as the safetensors library requires).
The header is parsed one member at a time (each tensor's description alone), so a small file
listing a million empty tensors, a header of tiny JSON values, or a shape its bytes cannot hold
is refused after reading one bounded header, in memory proportional to it, before
``safetensors`` builds an object per tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterpack import dtypes
from adapterpack.errors import AdapterpackError, InputError, UnrecognizedInputError
from adapterpack.limits import (
    MAX_NDIM,
    MAX_SAFETENSORS_DESCRIPTION,
    MAX_SAFETENSORS_HEADER,
    MAX_SAFETENSORS_METADATA,
    MAX_SAFETENSORS_NAME,
    MAX_SAFETENSORS_TENSORS,
)

METADATA_KEY = "__metadata__"


@dataclass(frozen=True, slots=True)
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
    return TensorEntry(sys.intern(code), tuple(shape), offsets[0], offsets[1])


class _NotJson(Exception):
    """The header text is not the JSON a safetensors header is (the message says where)."""


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
_SPACES = frozenset(" \t\n\r")


def _skip(text: str, pos: int) -> int:
    if text[pos : pos + 1] not in _SPACES:  # compact JSON (every writer's): no call to the regex engine
        return pos
    m = _SPACE.match(text, pos)
    return m.end() if m else pos


def _string(text: str, pos: int) -> tuple[str, int]:
    if not text.startswith('"', pos):
        raise _NotJson(f"a string expected at character {pos}")
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except ValueError:
        raise _NotJson(f"an unterminated or invalid string at character {pos}") from None
    return str(value), end


def _members(text: str, pos: int, value: Callable[[str, int], int]) -> int:
    """The members of the JSON object at ``pos``, each name handed to ``value`` with the position of its value
    (``value`` parses it and returns where it ends); the position after the object."""
    if not text.startswith("{", pos):
        raise _NotJson(f"an object expected at character {pos}")
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        return pos + 1
    while True:
        name, pos = _string(text, pos)
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise _NotJson(f"':' expected at character {pos}")
        pos = _skip(text, value(name, _skip(text, pos + 1)))
        if text.startswith("}", pos):
            return pos + 1
        if not text.startswith(",", pos):
            raise _NotJson(f"',' or '}}' expected at character {pos}")
        pos = _skip(text, pos + 1)


def _parse(text: str, where: str) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    """The header's tensors and metadata, parsed one member at a time.

    ``json.loads`` of the whole header would build a Python object per JSON value first (tens of bytes
    for each few bytes of text) and only then let anything be checked. Here each tensor's description
    is a flat object of at most :data:`MAX_SAFETENSORS_DESCRIPTION` characters, parsed and checked
    alone, and each metadata value a string, so what is built is what is kept, and each count is
    checked before its next member is parsed.
    """
    tensors: dict[str, TensorEntry] = {}
    meta: dict[str, str] = {}
    has_meta = False

    def metadata_value(name: str, pos: int) -> int:
        if not text.startswith('"', pos):
            raise InputError(f"{where}: safetensors metadata must be an object of strings (key {name!r:.100})")
        if len(meta) == MAX_SAFETENSORS_METADATA:
            raise InputError(f"{where}: more than {MAX_SAFETENSORS_METADATA} metadata entries, over the limit")
        meta[name], pos = _string(text, pos)
        return pos

    def member(name: str, pos: int) -> int:
        nonlocal has_meta
        if name in tensors or (name == METADATA_KEY and has_meta):
            raise InputError(f"{where}: {name!r:.100} is named twice in the header")
        if name == METADATA_KEY:
            if not text.startswith("{", pos):
                raise InputError(f"{where}: safetensors metadata must be an object of strings")
            has_meta = True
            return _members(text, pos, metadata_value)
        if len(tensors) == MAX_SAFETENSORS_TENSORS:
            raise InputError(f"{where}: more than {MAX_SAFETENSORS_TENSORS} tensors, over the limit")
        end = text.find("}", pos, pos + MAX_SAFETENSORS_DESCRIPTION)
        if not text.startswith("{", pos) or end < 0:
            raise InputError(
                f"{where}: tensor {name!r:.100} is not described by an object of at most {MAX_SAFETENSORS_DESCRIPTION} characters"
            )
        try:
            value, stop = _DECODER.raw_decode(text[pos : end + 1])
        except ValueError:  # a '}' inside a string, or a nested object: not a tensor's description
            stop = -1
        if stop != end + 1 - pos:
            raise InputError(f"{where}: tensor {name!r:.100} is not described by a flat JSON object")
        tensors[name] = _entry(name, value, where)
        return end + 1

    end = _members(text, _skip(text, 0), member)
    if _skip(text, end) != len(text):
        raise _NotJson(f"trailing characters at {end}")
    return tensors, meta if has_meta else None


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
    try:
        tensors, meta = _parse(text.decode("utf-8"), str(path))
    except _NotJson as e:
        raise error(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a safetensors file (header is not UTF-8)") from None
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


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names in a safetensors file, read from its checked header only."""
    return list(read_header(path, UnrecognizedInputError).tensors)
