"""Bank files: an ``.apack`` whose adapters' ``shared`` records reference one U and one V blob per
module (spec/shared.md). Writing stores each shared tensor once; reading checks the sharing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import dtypes
from ..atomic import atomic_file
from ..checksum import crc32c
from ..container import writer as _writer
from ..container.index import dumps, plan_offsets
from ..container.preamble import MAJOR, MAX_INDEX_LENGTH, MINOR, Preamble
from ..container.writer import check_index, encode_blob
from ..encodings import get_encoding
from ..encodings.shared import shared_base_shape
from ..errors import AdapterpackError, BankError, IndexTooLargeError

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
    its own pass-through tensors (PEFT ``modules_to_save`` and the like), stored for it alone."""

    name: str
    S: dict[str, np.ndarray]
    base_model: str | None = None
    base_architecture: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return self.metadata.get(META_HASH, "")


@dataclass
class Bank:
    """A whole bank in memory: bases, every member's S (small next to the adapters it replaces) and
    pass-through tensors."""

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


def write_bank(path: str | os.PathLike[str], bank: Bank, *, codec: str = "byteplanes", level: int | None = None) -> int:
    """Write ``bank`` atomically (an interrupted write leaves any previous file intact); returns the file size.

    Blob order: every module's U then V, then each member's S blobs followed by its pass-through
    tensors in member order, so the shared bases sit together at the front of the data section.
    """
    if not bank.members:
        raise BankError("a bank needs at least one adapter")
    stored: list[bytes | memoryview] = []
    blobs: list[dict[str, Any]] = []

    def add(arr: np.ndarray) -> int:
        data, cfg, crc = encode_blob(arr, codec, level)
        dt = dtypes.of_array(arr)
        stored.append(data)
        blobs.append({"dtype": dt.name, "shape": list(arr.shape), "codec": cfg, "offset": 0,
                      "stored_length": len(data), "length": arr.nbytes, "crc32c": crc})
        return len(stored) - 1

    shared = {name: (add(m.U), add(m.V)) for name, m in bank.modules.items()}
    adapters = []
    for mem in bank.members:
        mods = []
        for name, mod in bank.modules.items():
            if name not in mem.S:
                continue
            u, v = shared[name]
            rec = _record(mod, {"U": u, "V": v, "S": add(mem.S[name])})
            mods.append(rec)
        tensors = [{"name": k, "blob": add(t)} for k, t in mem.tensors.items()]
        entry: dict[str, Any] = {"name": mem.name, "base_model": mem.base_model, "base_architecture": mem.base_architecture,
                                 "modules": mods, "tensors": tensors}
        if mem.source:
            entry["source"] = mem.source
        if mem.metadata:
            entry["metadata"] = {str(k): str(v) for k, v in mem.metadata.items()}
        adapters.append(entry)
    for obj, off in zip(blobs, plan_offsets([len(s) for s in stored]), strict=True):
        obj["offset"] = off
    index_bytes = dumps({"writer": _writer._writer_id(), "adapters": adapters, "blobs": blobs})
    if len(index_bytes) > MAX_INDEX_LENGTH:
        raise IndexTooLargeError(f"bank index would be {len(index_bytes)} bytes, over the {MAX_INDEX_LENGTH}-byte limit")
    pre = Preamble(MAJOR, MINOR, 0, len(index_bytes), crc32c(index_bytes))
    end = pre.data_start + (blobs[-1]["offset"] + len(stored[-1]) if stored else 0)
    try:
        check_index(index_bytes, pre.data_start, end)
    except AdapterpackError as e:
        raise type(e)(f"cannot write {path}: {e}") from None
    with atomic_file(path) as f:
        f.write(pre.pack())
        f.write(index_bytes)
        f.write(b"\0" * (pre.data_start - len(pre.pack()) - len(index_bytes)))
        pos = 0
        for s, b in zip(stored, blobs, strict=True):
            f.write(b"\0" * (b["offset"] - pos))
            f.write(s)
            pos = b["offset"] + len(s)
    return end


def read_bank(path: str | os.PathLike[str]) -> Bank:
    """Read a whole bank (bases once, every member's S and pass-through tensors), refusing a file whose
    shared records do not reference one U and one V blob per module, or that mixes forms."""
    from ..container.reader import ApackReader

    with ApackReader(Path(path)) as reader:
        for raw in reader.index.adapters:  # every record through the reader's own checks before any raw param is used
            reader.adapter(raw["name"])
        modules: dict[str, BankModule] = {}
        refs: dict[str, tuple[int, int]] = {}
        members = []
        for raw in reader.index.adapters:
            S = {}
            for m in raw["modules"]:
                name = m["name"]
                if m["encoding"] != "shared":
                    raise BankError(f"{path}: adapter {raw['name']!r} module {name!r} is {m['encoding']!r}, not a shared record")
                t = m["tensors"]
                p = m["params"]
                if name not in modules:
                    refs[name] = (t["U"], t["V"])
                    modules[name] = BankModule(name, np.array(reader.read_blob(t["U"])), np.array(reader.read_blob(t["V"])),
                                               p["form"], p.get("layout", "linear"), bool(p.get("fan_in_fan_out", False)))
                elif refs[name] != (t["U"], t["V"]) or modules[name].form != p["form"]:
                    raise BankError(f"{path}: adapter {raw['name']!r} module {name!r} does not share the bank's U, V and form")
                S[name] = np.array(reader.read_blob(t["S"]))
            tensors = {t["name"]: np.array(reader.read_blob(t["blob"])) for t in raw.get("tensors", [])}
            members.append(BankMember(raw["name"], S, raw.get("base_model"), raw.get("base_architecture"),
                                      dict(raw.get("source", {})), dict(raw.get("metadata", {})), tensors))
        forms = {m.form for m in modules.values()}
        if len(forms) > 1:
            raise BankError(f"{path}: mixes forms {sorted(forms)}")
    return Bank(modules, members)


def error_metadata(rel: dict[str, float], reference: str) -> dict[str, str]:
    """Per-member metadata: mean and max relative squared error over its modules, and what it is measured against."""
    vals = list(rel.values()) or [0.0]
    return {META_ERROR: json.dumps({"mean": float(np.mean(vals)), "max": float(np.max(vals))}), META_REFERENCE: reference}


def validate_records(bank: Bank) -> None:
    """Run the shared encoding's checks on every record of an in-memory bank (before any write)."""
    from ..adapter import Module

    enc = get_encoding("shared")
    for mem in bank.members:
        for name, S in mem.S.items():
            mod = bank.modules[name]
            rec = _record(mod, {})
            enc.validate(Module(name, "shared", mod.base_shape, rec["params"], {"U": mod.U, "V": mod.V, "S": S}))
