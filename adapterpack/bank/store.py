"""Bank files: an ``.apack`` whose adapters' ``shared`` records reference one U and one V blob per
module (spec/shared.md). Writing stores each shared tensor once; reading checks the sharing."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Module, TensorLike, as_array
from adapterpack.atomic import atomic_file
from adapterpack.checksum import crc32c
from adapterpack.codecs import DEFAULT_CODEC
from adapterpack.container import writer as _writer
from adapterpack.container.preamble import MAJOR, MINOR, Preamble
from adapterpack.container.reader import ApackReader
from adapterpack.container.writer import check_index, encode_blob, plan_layout, store_index
from adapterpack.encodings import get_encoding
from adapterpack.encodings.shared import shared_base_shape
from adapterpack.errors import AdapterpackError, BankError, OutputExistsError, UnrecognizedInputError

META_HASH = "bank.sha256"
META_ERROR = "bank.rel_error"
META_REFERENCE = "bank.error_reference"


@dataclass
class BankModule:
    """One banked module: shared bases and layout."""

    name: str
    U: np.ndarray  # [m, R]
    V: np.ndarray  # [n, R]
    form: str
    layout: str = "linear"
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def base_shape(self) -> tuple[int, int]:
        return shared_base_shape(self.U.shape[0], self.V.shape[0], self.layout, self.fan_in_fan_out)


@dataclass
class BankMember:
    """One adapter of a bank: its S per module, the header it keeps (base model, source, metadata) and
    its own pass-through tensors (PEFT ``modules_to_save`` and the like), stored for it alone: arrays, or
    handles (:class:`~adapterpack.adapter.StoredTensor`) read only when the bank is written."""

    name: str
    S: dict[str, np.ndarray]
    base_model: str | None = None
    base_architecture: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, TensorLike] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.metadata.get(META_HASH, "")


@dataclass
class Bank:
    """A whole bank: bases and every member's S in memory (small next to the adapters they replace), and
    its pass-through tensors (in memory from :func:`read_bank`, read on demand from :func:`open_bank`)."""

    modules: dict[str, BankModule]
    members: list[BankMember]

    @property
    def form(self) -> str:
        return next(iter(self.modules.values())).form if self.modules else "full"

    def member(self, name: str) -> BankMember:
        for m in self.members:
            if m.name == name:
                return m
        raise BankError(f"no adapter {name!r} in the bank (has {', '.join(m.name for m in self.members[:5])}, ...)")


def _record(mod: BankModule, refs: dict[str, int]) -> dict[str, Any]:
    params: dict[str, Any] = {"rank": mod.rank, "form": mod.form}
    if mod.layout != "linear":
        params["layout"] = mod.layout
    if mod.fan_in_fan_out:
        params["fan_in_fan_out"] = True
    return {"name": mod.name, "encoding": "shared", "base_shape": list(mod.base_shape), "params": params, "tensors": refs}


def write_bank(path: str | os.PathLike[str], bank: Bank, *, codec: str = DEFAULT_CODEC, level: int | None = None,
               overwrite: bool = True) -> int:
    """Write ``bank`` atomically (an interrupted write leaves any previous file intact); returns the file size.
    ``overwrite`` false: OutputExistsError where ``path`` exists (checked again as the file is put in place).

    Blob order: every module's U then V, then each member's S blobs followed by its pass-through
    tensors in member order, so the shared bases sit together at the front of the data section.
    Each blob is encoded into an unnamed spool file beside ``path`` as it comes and copied after the
    index, so one tensor at a time is in memory: pass-through tensors given as handles are read here.
    The layout and index are those :func:`~adapterpack.container.writer.write_apack` writes: with a compressed
    blob, compressed blobs packed and the index a zstd frame without blob offsets and lengths (spec §1.2–§1.3).
    """
    if not bank.members:
        raise BankError("a bank needs at least one adapter")
    dest = Path(path)
    if not overwrite and os.path.lexists(dest):
        raise OutputExistsError(f"{dest} already exists (use --force to overwrite)")
    with atomic_file(dest, overwrite=overwrite) as f, tempfile.TemporaryFile(dir=dest.parent) as spool:
        blobs: list[dict[str, Any]] = []

        def add(t: TensorLike) -> int:
            arr = as_array(t)
            data, cfg, crc = encode_blob(arr, codec, level)
            spool.write(data)  # back to back: the padding the layout asks for is added when copied
            blobs.append({"dtype": dtypes.of_array(arr).name, "shape": list(arr.shape), "codec": cfg,
                          "stored_length": len(data), "length": arr.nbytes, "crc32c": crc})
            return len(blobs) - 1

        adapters = _entries(bank, add)
        offsets, layout = plan_layout(blobs)
        lengths = [b["stored_length"] for b in blobs]
        # the key order write_apack writes (offset after codec)
        blobs = [{"dtype": b["dtype"], "shape": b["shape"], "codec": b["codec"], "offset": off} | b
                 for b, off in zip(blobs, offsets, strict=True)]
        stored, text, flags = store_index({"writer": _writer._writer_id(), "adapters": adapters, "blobs": blobs}, layout != 0)
        pre = Preamble(MAJOR, MINOR, flags | layout, len(stored), crc32c(stored))
        end = offsets[-1] + lengths[-1] if blobs else 0
        try:
            check_index(text, pre.data_start, pre.data_start + end, pre.packed, pre.implied, pre.unaligned)
        except AdapterpackError as e:
            raise type(e)(f"cannot write {path}: {e}") from None
        f.write(pre.pack())
        f.write(stored)
        f.write(b"\0" * (pre.data_start - len(pre.pack()) - len(stored)))
        spool.seek(0)
        pos = 0
        for off, n in zip(offsets, lengths, strict=True):
            f.write(b"\0" * (off - pos))
            _copy(spool, f, n)
            pos = off + n
    return pre.data_start + end


def _copy(src: BinaryIO, dst: BinaryIO, n: int, chunk: int = 1 << 20) -> None:
    """``n`` bytes from ``src`` to ``dst``, a chunk at a time."""
    while n:
        got = src.read(min(chunk, n))
        if not got:
            raise BankError("the bank's spool file ended early")
        dst.write(got)
        n -= len(got)


def _entries(bank: Bank, add: Callable[[TensorLike], int]) -> list[dict[str, Any]]:
    """The index's adapter entries, every tensor through ``add`` (which returns its blob number) in file order."""
    shared = {name: (add(m.U), add(m.V)) for name, m in bank.modules.items()}
    adapters = []
    for mem in bank.members:
        mods = []
        for name, mod in bank.modules.items():
            if name not in mem.S:
                continue
            u, v = shared[name]
            mods.append(_record(mod, {"U": u, "V": v, "S": add(mem.S[name])}))
        tensors = [{"name": k, "blob": add(t)} for k, t in mem.tensors.items()]
        entry: dict[str, Any] = {"name": mem.name, "base_model": mem.base_model, "base_architecture": mem.base_architecture,
                                 "modules": mods, "tensors": tensors}
        if mem.source:
            entry["source"] = mem.source
        if mem.metadata:
            entry["metadata"] = {str(k): str(v) for k, v in mem.metadata.items()}
        adapters.append(entry)
    return adapters


def check_bank_path(path: str | os.PathLike[str]) -> None:
    """Refuse a path that is not a file as the other readers do (UnrecognizedInputError), not with an OSError."""
    p = Path(path)
    if not p.is_file():
        raise UnrecognizedInputError(f"{p}: " + ("a folder, not a bank file" if p.is_dir() else "no such file or folder"))


@contextmanager
def open_bank(path: str | os.PathLike[str]) -> Iterator[Bank]:
    """A bank with its bases and every member's S in memory and its pass-through tensors as handles that
    read each one from the open file when loaded (valid inside the ``with``): a rewrite of the bank
    (add, refit) then holds one member's tensor at a time, not all of them. Refuses a file whose shared
    records do not reference one U and one V blob per module, or that mixes forms."""
    check_bank_path(path)
    with ApackReader(Path(path)) as reader:
        # every record through the reader's own checks before any raw param is used; tensors stay handles
        tensors = {raw["name"]: reader.adapter(raw["name"]).tensors for raw in reader.index.adapters}
        modules: dict[str, BankModule] = {}
        refs: dict[str, tuple[Any, ...]] = {}
        members = []
        for raw in reader.index.adapters:
            S = {}
            for m in raw["modules"]:
                name = m["name"]
                if m["encoding"] != "shared":
                    raise BankError(f"{path}: adapter {raw['name']!r} module {name!r} is {m['encoding']!r}, not a shared record")
                t = m["tensors"]
                p = m["params"]
                # spec/shared.md §2: one module's records agree on U, V, rank, form, layout, fan_in_fan_out, base_shape
                # (a record read with another's layout would be rewritten with its ΔW transposed)
                key = (t["U"], t["V"], p["form"], p.get("layout", "linear"), bool(p.get("fan_in_fan_out", False)),
                       tuple(m["base_shape"]))
                if name not in modules:
                    refs[name] = key
                    modules[name] = BankModule(name, np.array(reader.read_blob(t["U"])), np.array(reader.read_blob(t["V"])),
                                               p["form"], p.get("layout", "linear"), bool(p.get("fan_in_fan_out", False)))
                elif refs[name] != key:
                    raise BankError(f"{path}: adapter {raw['name']!r} module {name!r} does not share the bank's U, V, form, "
                                    f"layout and base_shape")
                S[name] = np.array(reader.read_blob(t["S"]))
            members.append(BankMember(raw["name"], S, raw.get("base_model"), raw.get("base_architecture"),
                                      dict(raw.get("source", {})), dict(raw.get("metadata", {})), dict(tensors[raw["name"]])))
        forms = {m.form for m in modules.values()}
        if len(forms) > 1:
            raise BankError(f"{path}: mixes forms {sorted(forms)}")
        yield Bank(modules, members)


def read_bank(path: str | os.PathLike[str]) -> Bank:
    """Read a whole bank into memory (bases once, every member's S and pass-through tensors), with the
    checks of :func:`open_bank`."""
    with open_bank(path) as bank:
        for mem in bank.members:
            mem.tensors = {k: np.array(as_array(t)) for k, t in mem.tensors.items()}
        return bank


def error_metadata(rel: dict[str, float], reference: str, dtype: str) -> dict[str, str]:
    """Per-member metadata: mean and max relative squared error over its modules, what it is measured against, and the
    dtype of the bank it was measured on (a later cast, ``convert --dtype``, changes the error; ``bank list`` says so)."""
    vals = list(rel.values()) or [0.0]
    err = {"mean": float(np.mean(vals)), "max": float(np.max(vals)), "dtype": dtype}
    return {META_ERROR: json.dumps(err), META_REFERENCE: reference}


def validate_records(bank: Bank) -> None:
    """Run the shared encoding's checks on every record of an in-memory bank (before any write)."""
    enc = get_encoding("shared")
    for mem in bank.members:
        for name, S in mem.S.items():
            mod = bank.modules[name]
            rec = _record(mod, {})
            enc.validate(Module(name, "shared", mod.base_shape, rec["params"], {"U": mod.U, "V": mod.V, "S": S}))
