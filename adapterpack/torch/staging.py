"""``.apack`` blobs → torch tensors on a device in a few large copies.

:func:`stage_modules` is the loader's one step between opening and decoding: every record whose torch
decoder is registered ``staged`` gets its slots that live in an ``.apack`` file (stored tensors whose
loader is an :class:`~adapterpack.container.reader.BlobLoader`) as device tensors, all blobs of one
file read together by :func:`stage`; other slots (numpy arrays, truncated tensors) are left to the decoder.

Raw blobs:

- CPU target, ``zero_copy`` (the default), a reader opened ``copy_on_write``: views of the reader's
  private copy-on-write mapping of the file (as ``safetensors.torch`` does): no copy at all, pages
  are read when first used, a write gives the process its own page and never touches the file.
- any other target (or ``zero_copy=False``): all raw blobs of the load go into ONE destination
  buffer on the device, tensors are views of it. To a CPU buffer the bytes are copied straight
  from the mapping; to a GPU they stream through two pinned staging buffers of :data:`CHUNK`
  bytes, one large ``copy_(non_blocking=True)`` per chunk, double-buffered so the host fills one
  buffer while the other is in flight (not one synchronous copy per tensor).

Compressed blobs (zstd, byteplanes, pco) decode in a thread pool (zstd and pcodec release the GIL) while the raw
blobs are being copied; a decoded CPU tensor is adopted as is, on a GPU it joins the stream.

When the reader verifies, every blob's CRC-32C is checked over the bytes the tensor shows (raw:
the CRC is the first touch of those pages, one pass) or the decoded bytes (compressed) before any
tensor is returned.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from adapterpack.adapter import Module, StoredTensor
from adapterpack.container.index import BlobEntry
from adapterpack.container.reader import ApackReader, BlobLoader, RawCheck
from adapterpack.torch.decoders.base import is_staged
from adapterpack.torch.tensors import TORCH_DTYPES, tensor

#: Bytes per pinned staging buffer (two are used, alternately).
CHUNK = 32 << 20
#: Alignment of each blob inside the destination buffer (bytes; any dtype's itemsize divides it).
ALIGN = 256
#: Threads decoding compressed blobs.
WORKERS = max(1, min(4, os.cpu_count() or 1))
#: Threads checking the CRC-32C of the raw blobs of a large load (every core, at most 4): the pass reads every
#: byte, so it is bound by memory bandwidth, which more cores draw more of (BENCHMARKS.md "Load time").
CRC_THREADS = max(1, min(4, os.cpu_count() or 1))

_pinned_lock = threading.Lock()
#: Held by the one load that streams through the shared pinned buffers (loads in other threads wait).
_staging_lock = threading.Lock()
_pinned: dict[int, list[torch.Tensor]] = {}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pinned_buffers(size: int = CHUNK) -> list[torch.Tensor]:
    """Two page-locked host buffers of ``size`` bytes, allocated once per process and reused
    (``cudaHostAlloc`` costs milliseconds; paying it on every load would dominate small adapters)."""
    with _pinned_lock:
        bufs = _pinned.get(size)
        if bufs is None:
            bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            _pinned[size] = bufs
        return bufs


class _Views:
    """Raw blobs as typed views of a reader's copy-on-write mapping (one torch storage over the whole file)."""

    def __init__(self, reader: ApackReader) -> None:
        # torch.frombuffer keeps the mapping alive for as long as any tensor uses the storage
        self._storage = torch.frombuffer(reader.buffer, dtype=torch.uint8).untyped_storage()
        self._bases: dict[torch.dtype, torch.Tensor] = {}

    def view(self, start: int, b: BlobEntry) -> torch.Tensor:
        dt = TORCH_DTYPES[b.dtype]
        base = self._bases.get(dt)
        if base is None:
            base = self._bases[dt] = torch.empty(0, dtype=dt).set_(self._storage)
        strides, step = [], 1
        for d in reversed(b.shape):
            strides.append(step)
            step *= d
        # blob offsets are multiples of 8 (spec §1.2), so of every itemsize: the element offset is exact
        return base.as_strided(b.shape, strides[::-1], start // dt.itemsize)


@dataclass
class _Stream:
    """Bytes appended in order into one destination buffer on ``device``, through pinned chunks for a GPU."""

    device: torch.device
    total: int
    bounce: bool  # stage through host buffers (a GPU target; tests force it on the CPU)
    dest: torch.Tensor = field(init=False)
    pos: int = 0
    _bufs: list[torch.Tensor] = field(default_factory=list)
    _events: list[object | None] = field(default_factory=lambda: [None, None])
    _cur: int = 0
    _fill: int = 0
    _base: int = 0  # destination offset of the current chunk's first byte
    _locked: bool = False

    def __post_init__(self) -> None:
        self.dest = torch.empty(self.total, dtype=torch.uint8, device=self.device)
        if self.bounce:
            if self.device.type == "cuda":
                _staging_lock.acquire()
                try:
                    self._bufs = pinned_buffers()
                except BaseException:  # nobody would release it: the caller's try starts once this returns
                    _staging_lock.release()
                    raise
                self._locked = True
            else:  # CPU stand-in so the chunking logic runs in CI
                self._bufs = [torch.empty(CHUNK, dtype=torch.uint8) for _ in range(2)]

    def put(self, data: memoryview | np.ndarray) -> int:
        """Append ``data`` (bytes) at the next aligned offset; returns that offset."""
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        start = _align(self.pos)
        if not self.bounce:
            self.dest[start : start + src.size].numpy()[:] = src
            self.pos = start + src.size
            return start
        if start != self.pos:  # alignment gap: move the chunk's logical position
            self._skip(start - self.pos)
        done = 0
        while done < src.size:
            buf = self._bufs[self._cur]
            if self._fill == buf.numel():
                self._flush()
                continue
            n = min(src.size - done, buf.numel() - self._fill)
            buf[self._fill : self._fill + n].numpy()[:] = src[done : done + n]
            self._fill += n
            done += n
        self.pos = start + src.size
        return start

    def _skip(self, gap: int) -> None:
        buf = self._bufs[self._cur]
        if self._fill + gap <= buf.numel():
            self._fill += gap
        else:
            self._flush()
            self._base += gap
        self.pos += gap

    def _flush(self) -> None:
        if self._fill == 0:
            return
        buf = self._bufs[self._cur]
        self.dest[self._base : self._base + self._fill].copy_(buf[: self._fill], non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))  # the copy's stream: the target's, not the current device's
            self._events[self._cur] = ev
        self._base += self._fill
        self._fill = 0
        self._cur ^= 1
        ev = self._events[self._cur]  # the other buffer: wait until its copy has left it
        if ev is not None:
            ev.synchronize()  # type: ignore[attr-defined]
            self._events[self._cur] = None

    def finish(self) -> torch.Tensor:
        """Flush the last chunk and wait for every copy; the destination buffer."""
        if self.bounce:
            self._flush()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        self.release()
        return self.dest

    def release(self) -> None:
        """Let other loads use the pinned buffers (after the copies out of them have finished)."""
        if self._locked:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self._locked = False
            _staging_lock.release()

    def view(self, offset: int, b: BlobEntry) -> torch.Tensor:
        """Blob ``b`` at ``offset`` of the destination, typed and shaped."""
        n = b.length
        return self.dest[offset : offset + n].view(TORCH_DTYPES[b.dtype]).view(b.shape)


def stage(
    reader: ApackReader,
    indices: Iterable[int],
    device: torch.device,
    *,
    zero_copy: bool = True,
    bounce: bool | None = None,
    workers: int = WORKERS,
    pending: list[RawCheck] | None = None,
) -> dict[int, torch.Tensor]:
    """Blobs ``indices`` of ``reader``'s file as tensors on ``device`` in their stored dtype and shape.

    Raw blobs are views of the reader's mapping when it is ``copy_on_write``, the target the CPU and
    ``zero_copy`` set; else copied into one buffer. ``bounce`` (default: a non-CPU target) stages
    through host chunks; tests set it on the CPU. CRC-32Cs are checked when the reader verifies; with ``pending``, the
    CRC pass over the raw blobs viewed in place runs in threads and its :class:`RawCheck` is appended there instead of
    waited for: the caller must ``wait()`` for it before handing any tensor out (and ``drain()`` it on an error).
    """
    blobs = reader.blobs
    verify = reader.verify_checksums
    want = list(dict.fromkeys(indices))
    raw = [i for i in want if blobs[i].codec_id == "raw"]
    packed = [i for i in want if blobs[i].codec_id != "raw"]
    on_cpu = device.type == "cpu"
    bounce = (not on_cpu) if bounce is None else bounce
    out: dict[int, torch.Tensor] = {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="apack-decode") if len(packed) > 1 else None
    try:
        futures: dict[int, Future[np.ndarray]] = {}
        if pool is not None:
            try:
                futures = {i: pool.submit(reader.read_blob, i) for i in packed}  # decodes while raw blobs copy
            except RuntimeError:  # the interpreter is shutting down (a load from an atexit handler): decoded below, here
                futures = {}
        if raw and on_cpu and zero_copy and not bounce and reader.copy_on_write:
            if verify and pending is not None:  # in threads while the caller builds views and decodes (one call each)
                pending.append(reader.start_raw_check(raw, threads=CRC_THREADS))
            elif verify:  # one pass, the first touch of the very pages the views show, split between threads when large
                reader.check_raw_blobs(raw, threads=CRC_THREADS)
            views = _Views(reader)
            for i in raw:
                out[i] = views.view(reader.blob_offset(i), blobs[i])
        elif raw:
            stream = _Stream(device, sum(_align(blobs[i].length) for i in raw), bounce)
            offsets: dict[int, int] = {}
            try:
                for i in raw:
                    src = reader.blob_bytes(i)
                    if verify:  # checked right before it is copied, while its bytes are in the cache
                        reader.check_blob(i, src)
                    offsets[i] = stream.put(src)
                    del src
                stream.finish()
            finally:
                stream.release()
            for i in raw:
                out[i] = stream.view(offsets[i], blobs[i])
        decoded = {i: (futures[i].result() if i in futures else reader.read_blob(i)) for i in packed}
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if decoded:
        if on_cpu and not bounce:
            out.update({i: tensor(arr) for i, arr in decoded.items()})  # adopts a fresh writable buffer, copies a kept one
        else:
            s = _Stream(device, sum(_align(blobs[i].length) for i in decoded), bounce)
            try:
                offs = {i: s.put(arr) for i, arr in decoded.items()}
                s.finish()
            finally:
                s.release()
            out.update({i: s.view(offs[i], blobs[i]) for i in decoded})
    return {i: out[i] for i in want}


def _file_blob(t: object) -> BlobLoader | None:
    """The file and blob behind a stored tensor an ``.apack`` reader handed out, else None."""
    if type(t) is StoredTensor and type(t.loader) is BlobLoader:
        return t.loader
    return None


def stage_modules(
    modules: list[Module],
    device: torch.device,
    *,
    zero_copy: bool = True,
    bounce: bool | None = None,
    pending: list[RawCheck] | None = None,
) -> list[Module]:
    """``modules`` with every file-backed slot of a record whose decoder is ``staged`` replaced by a device tensor
    (see the module docstring); the blobs of each file are read by one :func:`stage` call (``pending``: see there)."""
    wanted: dict[ApackReader, list[int]] = {}
    staged: list[bool] = []
    for m in modules:
        on = is_staged(m.encoding)
        staged.append(on)
        if on:
            for t in m.tensors.values():
                ref = _file_blob(t)
                if ref is not None:
                    wanted.setdefault(ref.reader, []).append(ref.index)
    if not wanted:
        return modules
    got = {r: stage(r, idx, device, zero_copy=zero_copy, bounce=bounce, pending=pending) for r, idx in wanted.items()}
    out = []
    for m, on in zip(modules, staged):
        if on:
            tensors = {}
            for slot, t in m.tensors.items():
                ref = _file_blob(t)
                tensors[slot] = t if ref is None else got[ref.reader][ref.index]
            m = Module(m.name, m.encoding, m.base_shape, m.params, tensors, m.must_understand)
        out.append(m)
    return out
