"""The adapters a bank is built from: picklable sources, content hashes, and the compatibility check."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, StoredTensor, TensorLike, as_array, stored_bytes, tensor_info
from adapterpack.errors import BankError, BankMismatchError
from adapterpack.factors import Factors
from adapterpack.formats import open_adapters
from adapterpack.linalg.bank_fit import ModuleShape
from adapterpack.ops.files import open as open_adapter


@dataclass
class PathSource:
    """One adapter in a file (``.apack``, PEFT folder, kohya file), read each time it is loaded.

    ``modules`` limits what :meth:`load` returns. Picklable, so Dask workers open the file themselves.
    """

    name: str
    path: str
    adapter: str | None = None
    modules: tuple[str, ...] | None = None

    def load(self) -> dict[str, Factors]:
        """Module name → 2-D factors, copied out of the file (which is closed again)."""
        with open_adapter(self.path, adapter=self.adapter) as a:
            names = self.modules if self.modules is not None else tuple(a.modules)
            return {n: _copy(a.module(n).factors()) for n in names}

    def hash_tensors(self, factors: dict[str, Factors]) -> tuple[str, dict[str, StoredTensor]]:
        """The content hash of ``factors`` (this adapter's, from :meth:`load`) with its pass-through tensors, and a
        handle per tensor that reads it from the file again when loaded: each tensor is hashed as it is read and
        none is kept, so a bank's members do not hold theirs in memory until the bank is written."""
        with open_adapter(self.path, adapter=self.adapter) as a:
            handles = {k: _handle(t, functools.partial(self.load_tensor, k)) for k, t in a.tensors.items()}
            return content_hash(factors, a.tensors), handles

    def load_tensor(self, name: str) -> np.ndarray:
        """One pass-through tensor (PEFT ``modules_to_save``, unknown keys), bit for bit (a read-only view of a raw
        ``.apack`` blob keeps that file's mapping alive, not a copy)."""
        with open_adapter(self.path, adapter=self.adapter) as a:
            if name not in a.tensors:
                raise BankError(f"{self.path}: adapter {self.name!r} no longer has tensor {name!r} (changed since it was hashed)")
            return as_array(a.tensors[name])


def _handle(t: TensorLike, loader: Callable[[], np.ndarray]) -> StoredTensor:
    dtype, shape = tensor_info(t)
    return StoredTensor(dtype, shape, stored_bytes(t), t.codec if isinstance(t, StoredTensor) else "raw", loader)


def _copy(f: Factors) -> Factors:
    a, b = (np.array(x) for x in f.matrices())  # explicit 2-D sizes: a rank-0 record's (0, -1) reshape is ambiguous
    return Factors(A=a, B=b, scale=f.scale, base_shape=f.base_shape, transpose=f.transpose, layout=getattr(f, "layout", "linear"))


def content_hash(factors: dict[str, Factors], tensors: Mapping[str, TensorLike] | None = None) -> str:
    """sha256 over every module's name, base shape, layout, scale and factor bytes (sorted by name),
    then, only when there are any, the pass-through tensors' names and bytes (spec/shared.md §2).

    Two adapters with the same hash have the same ΔW on every module and the same pass-through
    tensors: adding one already in a bank is a no-op. An adapter without pass-through tensors
    hashes as it did before banks carried them.
    """
    h = hashlib.sha256()
    for name in sorted(factors):
        f = factors[name]
        h.update(name.encode() + b"\0" + repr((tuple(f.base_shape), bool(f.transpose), float(f.scale))).encode())
        _hash_arrays(h, (f.A, f.B))
    if tensors:
        h.update(b"\0tensors\0")
        for name in sorted(tensors):
            h.update(name.encode() + b"\0")
            _hash_arrays(h, (as_array(tensors[name]),))
    return h.hexdigest()


def _hash_arrays(h: Any, arrays: tuple[np.ndarray, ...]) -> None:
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(dtypes.as_bytes(arr))


@dataclass
class ModuleKey:
    """What must match for one module across a bank: m×n of B·A and the layout."""

    m: int
    n: int
    layout: str
    fan_in_fan_out: bool


def module_key(m: Module, adapter: str) -> ModuleKey:
    """The 2-D shape B·A has, and the layout, from the record alone (no tensor read); refuses, naming
    ``adapter`` and the module, what a shared record cannot hold (conv layouts, DoRA magnitudes)."""
    p = m.params
    layout = p.get("layout", "linear")
    fifo = bool(p.get("fan_in_fan_out", False))
    shape = tuple(m.base_shape)
    where = f"adapter {adapter!r} module {m.name!r}"
    if len(shape) != 2 or layout == "conv":
        raise BankMismatchError(f"{where}: only 2-D (linear or embedding) modules can be banked, base_shape {list(shape)}")
    if bool(p.get("dora", False)):
        raise BankMismatchError(f"{where}: DoRA records cannot be banked (the magnitude vector is not a ΔW)")
    transpose = layout == "embedding" or fifo
    return ModuleKey(shape[1], shape[0], layout, fifo) if transpose else ModuleKey(shape[0], shape[1], layout, fifo)


@dataclass
class Member:
    """An input adapter: its source, what the bank keeps of its header, per-module keys, handles to its
    pass-through tensors (made with its hash, read again when the bank is written) and what the reader
    skipped of it."""

    source: PathSource
    base_model: str | None
    base_architecture: str | None
    keys: dict[str, ModuleKey]
    adapter_source: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def expand_inputs(paths: list[str | os.PathLike[str]], names: list[str] | None = None) -> list[Member]:
    """Open each input (index only for .apack) and list its adapters; every adapter of a multi-adapter
    .apack becomes a member named after itself, any other input after its file or folder name."""
    if not paths:
        raise BankError("no adapters given: a bank needs at least one")
    if names is not None and len(names) != len(paths):
        raise BankError(f"{len(names)} names for {len(paths)} adapters")
    out: list[Member] = []
    for k, p in enumerate(paths):
        with open_adapters(p) as opened:
            many = len(opened.adapters) > 1
            if many and names is not None:
                raise BankError(f"{p}: holds {len(opened.adapters)} adapters; --name applies to single-adapter inputs")
            for a in opened.adapters:
                name = a.name if many else (names[k] if names is not None else _stem(Path(p)))
                out.append(_member(a, PathSource(name, str(p), a.name if many else None)))
    seen: set[str] = set()
    for m in out:
        if m.source.name in seen:
            raise BankError(f"two adapters would be named {m.source.name!r}; name them explicitly")
        seen.add(m.source.name)
    return out


def _stem(p: Path) -> str:
    return p.name[: -len(".apack")] if p.name.endswith(".apack") else (p.stem if p.is_file() else p.name)


def _member(a: Adapter, src: PathSource) -> Member:
    keys = {m.name: module_key(m, src.name) for m in a}
    skipped = [f"adapter {src.name!r}: {s}" for s in a.skipped]
    return Member(src, a.base_model, a.base_architecture, keys, dict(a.source), skipped=skipped)


def plan_modules(members: list[Member], partial: bool = False, reference: dict[str, ModuleKey] | None = None,
                 base_model: str | None = None) -> tuple[list[ModuleShape], dict[str, ModuleKey], list[str]]:
    """The modules every member shares with the same shape and layout.

    Refuses (naming the mismatch) members of another base model, and — unless ``partial`` — any
    difference in target modules or shapes; with ``partial`` those modules are left out and listed.
    ``reference`` (an existing bank's modules) fixes the set instead of the first member.
    """
    if not members:
        raise BankError("no adapters given: a bank needs at least one")
    first = members[0]
    ref_model = base_model if reference is not None else first.base_model
    for m in members:
        if m.base_model != ref_model:
            what = "the bank" if reference is not None else repr(first.source.name)
            raise BankMismatchError(
                f"adapter {m.source.name!r} is for base model {m.base_model!r}, {what} for {ref_model!r}")
    ref = dict(reference) if reference is not None else dict(first.keys)
    if not ref:
        raise BankError(f"adapter {first.source.name!r} has no modules to bank")
    hint = " (pass --partial to bank the matching modules only)"
    dropped: dict[str, str] = {}
    for m in members:
        for name, key in list(ref.items()):
            other = m.keys.get(name)
            if other == key:
                continue
            why = "lacks it" if other is None else f"has {other.m}x{other.n} {other.layout}, expected {key.m}x{key.n} {key.layout}"
            msg = f"module {name!r}: adapter {m.source.name!r} {why}"
            if not partial or reference is not None:
                raise BankMismatchError(msg + ("" if reference is not None else hint))
            dropped[name] = msg
            del ref[name]
        for name in sorted(set(m.keys) - set(ref) - set(dropped)):
            others = "the bank does not" if reference is not None else "others do not"
            msg = f"module {name!r}: adapter {m.source.name!r} has it, {others}"
            if not partial:
                raise BankMismatchError(msg + hint)
            dropped[name] = msg
    left_out = [dropped[k] for k in sorted(dropped)]
    if not ref:
        raise BankMismatchError("the adapters share no module of the same shape")
    shapes = [ModuleShape(n, k.m, k.n) for n, k in ref.items()]
    return shapes, ref, sorted(set(left_out))
