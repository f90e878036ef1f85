"""Golden vectors of the ``pco`` codec (spec/format.md §5.4, since 1.3): one readable file, and refusals.

The files start as ``raw`` ones written by :func:`tools.make_vectors.build` and have their blobs re-stored
as ``pco`` here (so no level needs pinning in make_vectors' table). Each refusal breaks blob 0 (the
float32 A of :func:`tools.make_vectors.small`, 12 elements) in one way; its CRC-32C stays the index's.
The stored bytes come from pcodec, whose version fixes them as libzstd's fixes the zstd vectors'.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterpack import codecs, dtypes
from tools.vectors.container import Edit, Parts, _edited

CONFIG = {"id": "pco", "level": 8}


def _pco(decoded: bytes, itemsize: int) -> bytes:
    return codecs.get_codec(CONFIG).encode(memoryview(decoded), itemsize)


def _all_pco(path: Path) -> None:
    """Every blob of 2-, 4- or 8-byte elements re-stored as pco (where it is smaller, as the writer would)."""
    p = Parts.read(path)
    p.minor = 3
    for i, b in enumerate(p.index["blobs"]):
        size = dtypes.by_name(b["dtype"]).itemsize
        if size in (2, 4, 8):
            stored = _pco(p.blobs[i], size)
            if len(stored) < len(p.blobs[i]):
                p.set_blob(i, stored, dict(CONFIG))
    path.write_bytes(p.pack())


def _blob0(make: Callable[[bytes], bytes]) -> Edit:
    """Blob 0 (float32 A, 48 bytes) stored as ``make(decoded bytes)`` with the pco codec object."""

    def edit(p: Parts) -> None:
        p.minor = 3
        p.set_blob(0, make(p.blobs[0]), dict(CONFIG))

    return edit


def _meta_mode(mode: int) -> Callable[[bytes], bytes]:
    def make(d: bytes) -> bytes:
        s = bytearray(_pco(d, 4))
        s[2] = (s[2] & 0xF0) | mode  # the chunk metadata's first 4 bits: the Pco mode
        return bytes(s)

    return make


def build(readable: Callable[..., Any], refused: Callable[..., Any]) -> None:
    """lora_pco (readable) and five refusals of a damaged pco blob."""
    from tools.make_vectors import basic, small

    readable(
        "lora_pco",
        "rank-2 q/k/v modules in float32/float16/bfloat16, codec pco (sign-rotated integers in Pco's wrapped format)",
        [basic()],
        "raw",
        craft=_all_pco,
    )

    def no(name: str, what: str, make: Callable[[bytes], bytes]) -> None:
        refused(name, what, [small()], "CodecError", _edited(_blob0(make)))

    no("pco_truncated", "a pco blob missing its last byte", lambda d: _pco(d, 4)[:-1])
    no("pco_trailing_data", "a pco blob followed by one more byte (every stored byte must be accounted for)",
       lambda d: _pco(d, 4) + b"\0")  # fmt: skip
    no("pco_count_lie", "a pco stream of 13 elements where the index says 12", lambda d: _pco(d + d[:4], 4))
    no("pco_unknown_version", "a pco blob whose Pco header names format version 255", lambda d: b"\xff" + _pco(d, 4)[1:])
    no("pco_reserved_mode", "a pco blob whose chunk metadata names reserved Pco mode 15", _meta_mode(15))
