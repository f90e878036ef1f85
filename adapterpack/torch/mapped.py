"""``.apack`` → torch with zero copies: raw blobs as views of a private (copy-on-write) mapping.

The numpy reader maps the file read-only, so a tensor over its memory would crash on the
first in-place op. Here the file is mapped a second time with ``ACCESS_COPY`` (MAP_PRIVATE,
what ``safetensors.torch`` does): pages are shared with the page cache until written, and
a write gives the process its own copy, never touching the file. Raw blobs become views of
that mapping (no copy, and nothing is read until used); compressed blobs are decoded by the
reader into fresh buffers that the tensors adopt. The index is validated by
:class:`~adapterpack.container.ApackReader` exactly as for numpy, and with ``verify`` each
raw blob's CRC-32C is computed over the very bytes the tensor shows.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from ..checksum import crc32c
from ..container.reader import ApackReader
from ..errors import AdapterpackError, ChecksumError
from .tensors import TORCH_DTYPES, LoraTensors, module_tensors, place, tensor


class _Mapping:
    """The file mapped copy-on-write (created on first use); raw blobs as typed views of it."""

    def __init__(self, path: Path, fd: int, reader: ApackReader) -> None:
        self.path, self.fd = path, fd
        self.blobs, self.data_start = reader.blobs, reader.data_start
        self._mm: mmap.mmap | None = None
        self._storage: torch.UntypedStorage | None = None

    def view(self, i: int, verify: bool) -> torch.Tensor:
        b = self.blobs[i]
        if self._mm is None:
            self._mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)
            # torch.frombuffer keeps the mmap alive for as long as any tensor uses the storage
            self._storage = torch.frombuffer(self._mm, dtype=torch.uint8).untyped_storage()
        start = self.data_start + b.offset
        if verify and crc32c(memoryview(self._mm)[start : start + b.length]) != b.crc32c:
            raise ChecksumError(f"{self.path}: blob {i}: checksum mismatch (decoded bytes are corrupt)")
        dt = TORCH_DTYPES[b.dtype]
        # blob offsets are multiples of 8 (spec §1.2), so of every itemsize: the element offset is exact
        return torch.empty(0, dtype=dt).set_(self._storage, start // dt.itemsize, b.shape)


def load_apack(
    path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype | None, adapter: str | None, verify: bool
) -> dict[str, LoraTensors]:
    """Every module of one adapter in an ``.apack`` file as :class:`LoraTensors`."""
    path = Path(path)
    with open(path, "rb") as f, ApackReader(path, verify=verify) as reader:
        st = os.fstat(f.fileno())
        if st.st_size != reader.file_size or (st.st_ino, st.st_dev) != (os.stat(path).st_ino, os.stat(path).st_dev):
            raise AdapterpackError(f"{path}: file was replaced while being opened; try again")
        ad = reader.adapter(adapter)  # validates every record, as for numpy
        refs = {m["name"]: m["tensors"] for m in reader.index.adapters[reader.adapter_names.index(ad.name)]["modules"]}
        mapping = _Mapping(path, f.fileno(), reader)
        blobs = reader.blobs
        as_is = device.type == "cpu" and dtype is None

        def get(i: int) -> torch.Tensor:
            if blobs[i].codec_id == "raw":
                t = mapping.view(i, verify)
                return t if as_is else place(t, device, dtype)
            return tensor(reader.read_blob(i), device, dtype)  # decoded into a fresh writable buffer

        out = {}
        for name, m in ad.modules.items():
            ready = {slot: get(i) for slot, i in refs[name].items()} if m.encoding == "lora" else None
            out[name] = module_tensors(m, device, dtype, ready)
        return out
