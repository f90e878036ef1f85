"""``adapterpack.torch.load``: any adapter → torch :class:`~adapterpack.factors.Factors` on a device, one route.

Every input takes the same three steps: open it as an :class:`~adapterpack.Adapter` (or take the one
passed in); stage the slots that live in an ``.apack`` file onto the device, all blobs of a file
together (:func:`adapterpack.torch.staging.stage_modules`); run each record's torch decoder
(:mod:`adapterpack.torch.decoders`). An ``.apack`` path is opened once, mapped copy-on-write for a
zero-copy CPU load, and its index validated by :class:`~adapterpack.container.ApackReader` exactly as
for numpy.
"""

from __future__ import annotations

import inspect
import os

import torch

from adapterpack.adapter import Adapter
from adapterpack.container.reader import ApackReader, RawCheck
from adapterpack.errors import ChecksumError, ConversionError
from adapterpack.factors import Factors
from adapterpack.ops.files import open as open_adapter
from adapterpack.torch.decoders import decode_all
from adapterpack.torch.staging import stage_modules
from adapterpack.torch.tensors import stored_shapes, torch_device, torch_dtype


def load(
    path: str | os.PathLike[str] | Adapter,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    adapter: str | None = None,
    *,
    rank: int | None = None,
    verify: bool = True,
    zero_copy: bool = True,
) -> dict[str, Factors]:
    """Every module of an adapter as torch :class:`Factors` on ``device``, keyed by base-model module name.

    ``path`` is anything :func:`adapterpack.open` accepts, or an :class:`Adapter`;
    ``adapter`` names one adapter of a multi-adapter ``.apack``; ``dtype`` casts the factors
    (None keeps the stored dtype, bit-exact); ``rank`` truncates progressive encodings
    (passed to ``adapterpack.open(path, rank=...)``); ``verify`` checks each ``.apack`` blob's
    CRC-32C as it is read; ``zero_copy=False`` copies raw blobs into memory the tensors own
    instead of mapping the file (CPU only; other devices always copy). Every record goes
    through its encoding's torch decoder (:mod:`adapterpack.torch.decoders`). A and B keep their
    stored shapes (a conv record's ``A [r, in, *k]``, ``B [out, r, 1, ...]``); ``magnitude`` is
    DoRA's vector. Pass-through tensors (PEFT ``modules_to_save``) are not LoRA factors and are
    not returned: read them with ``adapterpack.open(path).tensors`` and :func:`adapterpack.torch.tensor`.
    """
    dev = torch_device(device)
    want = None if dtype is None else torch_dtype(dtype)
    return _load(path, dev, want, adapter, rank, verify, zero_copy, None)


def load_apack(
    path: str | os.PathLike[str],
    device: torch.device,
    dtype: torch.dtype | None,
    adapter: str | None,
    verify: bool,
    *,
    zero_copy: bool = True,
    bounce: bool | None = None,
) -> dict[str, Factors]:
    """:func:`load` of a file, with ``bounce`` (tests: stream through host chunks as for a GPU, on the CPU)."""
    return _load(path, device, dtype, adapter, None, verify, zero_copy, bounce)


def _load(
    path: str | os.PathLike[str] | Adapter,
    dev: torch.device,
    want: torch.dtype | None,
    adapter: str | None,
    rank: int | None,
    verify: bool,
    zero_copy: bool,
    bounce: bool | None,
) -> dict[str, Factors]:
    if isinstance(path, Adapter):
        if rank is not None:
            raise ConversionError("rank= applies when opening a file; truncate an in-memory Adapter before loading it")
        return _decode(path, dev, want, zero_copy, bounce)
    src, checked = _open(path, adapter, verify, rank, copy_on_write=dev.type == "cpu" and zero_copy and not bounce)
    with src:
        return _decode(src, dev, want, zero_copy, bounce, checked=checked)


def _decode(
    ad: Adapter, dev: torch.device, want: torch.dtype | None, zero_copy: bool, bounce: bool | None, *, checked: bool = False
) -> dict[str, Factors]:
    """``checked``: the records come from a reader, which validated them (the decoders need not again)."""
    pending: list[RawCheck] = []  # CRC passes running while the views are built and decoded; waited for before returning
    try:
        modules = stage_modules(list(ad.modules.values()), dev, zero_copy=zero_copy, bounce=bounce, pending=pending)
        out = {name: stored_shapes(f) for name, f in decode_all(modules, dev, want, checked=checked).items()}
    except Exception as e:  # a decoder may have looked at bytes still being checked: a damaged blob is the cause to report
        try:
            for check in pending:
                check.wait()
        except ChecksumError as damaged:
            raise damaged from e
        finally:
            for check in pending:
                check.drain()
        raise
    except BaseException:
        for check in pending:
            check.drain()
        raise
    try:
        for check in pending:
            check.wait()
    finally:
        for check in pending:
            check.drain()  # the others, when one found a damaged blob (nothing left after a wait)
    return out


def _open(
    path: str | os.PathLike[str], adapter: str | None, verify: bool, rank: int | None, *, copy_on_write: bool
) -> tuple[Adapter, bool]:
    """The adapter at ``path``: an ``.apack`` opened once by its reader, anything else by ``adapterpack.open``
    (which also applies ``rank``, refused when ``open`` cannot truncate); and whether its records were built, and
    so validated, by the reader itself."""
    if rank is None:
        reader = ApackReader.open_if_apack(path, verify=verify, copy_on_write=copy_on_write)
        if reader is not None:
            try:
                return reader.adapter(adapter), True
            except BaseException:
                reader.close()
                raise
        return open_adapter(path, adapter=adapter, verify=verify), False
    if "rank" not in inspect.signature(open_adapter).parameters:
        raise ConversionError("rank= needs adapterpack.open(path, rank=...) (the svd encoding), which this version lacks")
    return open_adapter(path, adapter=adapter, verify=verify, rank=rank), False
