"""Reading .apack files: mmap, validate the index up front, decode blobs lazily.

Opening reads the preamble and index only. Raw blobs come back as zero-copy read-only
numpy views of the mmap; compressed blobs decode into a buffer sized by the validated
index. Each blob's CRC-32C is checked the first time it is read (``verify=True``).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import codecs, dtypes
from ..adapter import Adapter, Module, StoredTensor
from ..checksum import crc32c
from ..encodings import get_encoding, is_known
from ..errors import (
    AdapterNotFoundError,
    AdapterpackError,
    ChecksumError,
    DuplicateNameError,
    IndexFormatError,
    UnknownEncodingError,
)
from .index import BlobEntry, Index, get, get_name, get_shape, loads, parse_index
from .preamble import PREAMBLE_SIZE, Preamble, parse_preamble


@dataclass
class VerifyReport:
    """What ``verify`` found: problems (empty when the file is sound) and totals."""

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes_checked: int = 0
    skipped: list[str] = field(default_factory=list)
    version: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


class ApackReader:
    """An open .apack file. Use :meth:`adapter` to get an :class:`Adapter`."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify_checksums = verify
        self._verified: set[int] = set()
        self._mm: mmap.mmap | None = None
        try:
            self._open()
        except AdapterpackError as e:
            self.close()
            raise type(e)(f"{self.path}: {e}") from None

    def _open(self) -> None:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(PREAMBLE_SIZE)
            self.preamble: Preamble = parse_preamble(head, size)
            if size:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_size = size
        pre = self.preamble
        index_bytes = self._mm[PREAMBLE_SIZE : PREAMBLE_SIZE + pre.index_length]
        if crc32c(index_bytes) != pre.index_crc32c:
            raise ChecksumError("index checksum mismatch (file corrupt or edited)")
        self.index: Index = parse_index(loads(index_bytes), pre.data_start, size)
        self.data_start = pre.data_start
        self.version = f"{pre.major}.{pre.minor}"
        self._check_references()

    # --- index-level checks ----------------------------------------------------------------------

    def _blob_ref(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(self.index.blobs):
            raise IndexFormatError(f"{where}: blob reference {value!r} is not a blob index")
        return value

    def _check_references(self) -> None:
        used: set[int] = set()
        for a in self.index.adapters:
            aw = f"adapter {a['name']!r}"
            mods = get(a, "modules", list, aw)
            seen: set[str] = set()
            for k, m in enumerate(mods):
                if not isinstance(m, dict):
                    raise IndexFormatError(f"{aw} module {k}: must be an object")
                name = get_name(m, "name", f"{aw} module {k}")
                if name in seen:
                    raise DuplicateNameError(f"{aw}: two modules are named {name!r}")
                seen.add(name)
                for slot, ref in get(m, "tensors", dict, f"{aw} module {name!r}").items():
                    used.add(self._blob_ref(ref, f"{aw} module {name!r} tensor {slot!r}"))
            tseen: set[str] = set()
            for k, t in enumerate(get(a, "tensors", list, aw, [])):
                if not isinstance(t, dict):
                    raise IndexFormatError(f"{aw} tensor {k}: must be an object")
                name = get_name(t, "name", f"{aw} tensor {k}")
                if name in tseen:
                    raise DuplicateNameError(f"{aw}: two tensors are named {name!r}")
                tseen.add(name)
                used.add(self._blob_ref(t.get("blob"), f"{aw} tensor {name!r}"))
        unused = set(range(len(self.index.blobs))) - used
        if unused:
            raise IndexFormatError(f"blob {min(unused)} is not referenced by any record ({len(unused)} unreferenced)")

    # --- blobs ----------------------------------------------------------------------------------

    @property
    def blobs(self) -> list[BlobEntry]:
        """The validated blob table."""
        return self.index.blobs

    def _stored(self, b: BlobEntry) -> memoryview:
        start = self.data_start + b.offset
        return memoryview(self._mm)[start : start + b.stored_length]

    def read_blob(self, i: int) -> np.ndarray:
        """Blob ``i`` decoded as a numpy array (read-only view for raw blobs)."""
        if self._mm is None:
            raise AdapterpackError(f"{self.path}: file is closed")
        b = self.index.blobs[i]
        dt = dtypes.by_name(b.dtype)
        try:
            if b.codec_id == "raw":
                arr = np.frombuffer(self._mm, dtype=dt.numpy, count=b.length // dt.itemsize, offset=self.data_start + b.offset)
                data = dtypes.as_bytes(arr)
            else:
                buf = bytearray(b.length)
                data = memoryview(buf)
                codecs.get_codec(b.codec).decode(self._stored(b), data, dt.itemsize)
                arr = np.frombuffer(buf, dtype=dt.numpy)
            if self.verify_checksums and i not in self._verified:
                if crc32c(data) != b.crc32c:
                    raise ChecksumError("checksum mismatch (decoded bytes are corrupt)")
                self._verified.add(i)
        except AdapterpackError as e:
            raise type(e)(f"{self.path}: blob {i}: {e}") from None
        return arr.reshape(b.shape)

    def _stored_tensor(self, i: int) -> StoredTensor:
        b = self.index.blobs[i]
        return StoredTensor(b.dtype, b.shape, b.stored_length, b.codec_id, lambda: self.read_blob(i))

    # --- adapters -------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters in the file, in order."""
        return [a["name"] for a in self.index.adapters]

    def adapter(self, name: str | None = None) -> Adapter:
        """Build the :class:`Adapter` called ``name`` (the only one when ``None``)."""
        names = self.adapter_names
        if name is None:
            if len(names) != 1:
                raise AdapterNotFoundError(f"{self.path}: holds {len(names)} adapters ({', '.join(names)}); name one")
            name = names[0]
        if name not in names:
            raise AdapterNotFoundError(f"{self.path}: no adapter {name!r} (has {', '.join(names)})")
        raw = self.index.adapters[names.index(name)]
        try:
            return self._build(raw)
        except AdapterpackError as e:
            raise type(e)(f"{self.path}: {e}") from None

    def _build(self, raw: dict[str, Any]) -> Adapter:
        aw = f"adapter {raw['name']!r}"
        base_model = get(raw, "base_model", (str, type(None)), aw, None)
        arch = get(raw, "base_architecture", (str, type(None)), aw, None)
        source = get(raw, "source", dict, aw, {})
        metadata = get(raw, "metadata", dict, aw, {})
        if not all(isinstance(v, str) for v in metadata.values()):
            raise IndexFormatError(f"{aw}: metadata values must be strings")
        adapter = Adapter(name=raw["name"], base_model=base_model, base_architecture=arch, source=source, metadata=metadata)
        blobs = self.index.blobs
        for m in raw["modules"]:
            mw = f"{aw} module {m['name']!r}"
            enc_id = get(m, "encoding", str, mw)
            must = get(m, "must_understand", bool, mw, True)
            refs = m["tensors"]
            unreadable = [blobs[r].codec_id for r in refs.values() if not blobs[r].known_codec]
            if not is_known(enc_id) or unreadable:
                what = f"encoding {enc_id!r}" if not is_known(enc_id) else f"codec {unreadable[0]!r}"
                if must and not is_known(enc_id):
                    raise UnknownEncodingError(f"{mw}: unknown encoding {enc_id!r} marked must_understand")
                adapter.skipped.append(f"module {m['name']!r}: {what} not understood, skipped")
                continue
            module = Module(
                name=m["name"],
                encoding=enc_id,
                base_shape=get_shape(m, "base_shape", mw),
                params=get(m, "params", dict, mw),
                tensors={slot: self._stored_tensor(r) for slot, r in refs.items()},
                must_understand=must,
            )
            get_encoding(enc_id).validate(module)
            adapter.modules[module.name] = module
        for t in raw.get("tensors", []):
            b = blobs[t["blob"]]
            if not b.known_codec:
                adapter.skipped.append(f"tensor {t['name']!r}: codec {b.codec_id!r} not understood, skipped")
                continue
            adapter.tensors[t["name"]] = self._stored_tensor(t["blob"])
        adapter.closer = self.close
        return adapter

    # --- whole-file checks ----------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Decode every blob and check its CRC-32C, and check that all padding is zero."""
        report = VerifyReport(path=str(self.path), ok=True, blobs=len(self.blobs), version=self.version)
        mm = self._mm
        if mm is None:
            raise AdapterpackError(f"{self.path}: file is closed")
        pad_start = PREAMBLE_SIZE + self.preamble.index_length
        if any(mm[pad_start : self.data_start]):
            report.problems.append("padding after the index is not zero")
        prev_end = 0
        for i, b in enumerate(self.blobs):
            if any(mm[self.data_start + prev_end : self.data_start + b.offset]):
                report.problems.append(f"padding before blob {i} is not zero")
            prev_end = b.offset + b.stored_length
            if not b.known_codec:
                report.skipped.append(f"blob {i}: codec {b.codec_id!r} not understood, not checked")
                continue
            self._verified.discard(i)
            saved, self.verify_checksums = self.verify_checksums, True
            try:
                self.read_blob(i)
                report.bytes_checked += b.length
            except AdapterpackError as e:
                report.problems.append(str(e).removeprefix(f"{self.path}: "))
            finally:
                self.verify_checksums = saved
        for name in self.adapter_names:
            try:
                report.skipped.extend(self.adapter(name).skipped)
            except AdapterpackError as e:
                report.problems.append(str(e).removeprefix(f"{self.path}: "))
        report.ok = not report.problems
        return report

    def close(self) -> None:
        """Release the mmap (views still held keep it alive until they go)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still point into it; it is freed with them

    def __enter__(self) -> ApackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
