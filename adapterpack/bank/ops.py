"""Bank operations: build from adapters, add adapters incrementally, refit, extract one member."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, as_array, decoded_bytes
from adapterpack.bank.lock import locked
from adapterpack.bank.sources import Member, ModuleKey, PathSource, expand_inputs, plan_modules
from adapterpack.bank.store import (
    META_ERROR,
    META_HASH,
    META_REFERENCE,
    Bank,
    BankMember,
    BankModule,
    check_bank_path,
    error_metadata,
    open_bank,
    validate_records,
    write_bank,
)
from adapterpack.codecs import DEFAULT_CODEC
from adapterpack.container.writer import write_apack
from adapterpack.encodings.lower import as_svd, lora_from_factors, svd_factors
from adapterpack.errors import BankError, ConversionError, OutputExistsError
from adapterpack.factors import Factors
from adapterpack.formats.peft import write_peft
from adapterpack.formats.serving import check
from adapterpack.formats.source import base_init_problem
from adapterpack.linalg.bank_fit import DaskExecutor, FitOptions, ModuleShape, SerialExecutor, fit_bank, sq_error, sq_norm
from adapterpack.linalg.bank_grow import pad, place
from adapterpack.linalg.finite import check_product
from adapterpack.linalg.lowrank import spectrum_of
from adapterpack.ops.diff import module_diff
from adapterpack.ops.files import open as open_adapter


def make_executor(scheduler: str | None) -> Any:
    """None or "serial": in-process; "threads": Dask local threads; anything else: a Dask scheduler address."""
    if scheduler in (None, "serial"):
        return SerialExecutor()
    return DaskExecutor(None if scheduler == "threads" else scheduler)


@dataclass
class BankReport:
    """What an operation did, for the CLI and for tests."""

    path: Path
    action: str
    adapters: int
    fit: dict[str, Any] = field(default_factory=dict)
    added: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    file_size: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _hash_members(members: list[Member], modules: Sequence[str], dtype: str) -> None:
    """Hash every member with its pass-through tensors (read one at a time, not kept: the write reads them
    again), refusing factors a fit cannot use (or whose Σᵢ would overflow ``dtype``) before any work."""
    for m in members:
        src = PathSource(m.source.name, m.source.path, m.source.adapter, tuple(modules))
        m.source = src
        facs = src.load()
        for name, f in facs.items():
            check_product(f.A, f.B, f.scale, where=f"adapter {src.name!r} module {name!r}", dtype=dtype)
        m.sha256, m.tensors = src.hash_tensors(facs)


def build_bank(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], *, names: list[str] | None = None,
               rank: int = 16, target_error: float | None = None, budget: int | None = None, form: str = "full",
               weights: str = "norm", dtype: str = "float32", partial: bool = False, max_iter: int = 50, tol: float = 1e-7,
               scheduler: str | None = None, codec: str = DEFAULT_CODEC,
               progress: Callable[[int, float], None] | None = None, overwrite: bool = True) -> BankReport:
    """Fit a bank on ``inputs`` and write it to ``out`` atomically (``overwrite`` false: an existing ``out`` is
    refused with OutputExistsError before any work, and again if one appears meanwhile)."""
    dtypes.by_name(dtype)
    _refuse_existing(out, overwrite)
    members = expand_inputs(inputs, names)
    _refuse_base_inits(members)
    shapes, keys, left_out = plan_modules(members, partial)
    left_out += [s for m in members for s in m.skipped]
    _hash_members(members, [s.name for s in shapes], dtype)
    seen: dict[str, str] = {}
    for m in members:
        if m.sha256 in seen:
            raise BankError(f"adapters {seen[m.sha256]!r} and {m.source.name!r} are identical (same content hash)")
        seen[m.sha256] = m.source.name
    opts = FitOptions(form=form, weights=weights, max_iter=max_iter, tol=tol)
    executor = make_executor(scheduler)
    try:
        res = fit_bank(shapes, [m.source for m in members], rank=rank, target_error=target_error, budget=budget, opts=opts,
                       dtype=dtype, executor=executor, progress=progress)
    finally:
        executor.close()
    bank = Bank(
        {s.name: BankModule(s.name, *res.bases[s.name], form, keys[s.name].layout, keys[s.name].fan_in_fan_out) for s in shapes},
        [_member_of(m, row, "original adapter", dtype) for m, row in zip(members, res.members)],
    )
    validate_records(bank)
    size = write_bank(out, bank, codec=codec, overwrite=overwrite)
    return BankReport(Path(out), "build", len(members), res.report(), left_out=left_out, file_size=size)


def _refuse_base_inits(members: list[Member]) -> None:
    """ConversionError for a member saved with a base-rewriting init (PiSSA and the like, unconverted): its factors
    are not its ΔW, so a bank would hold another adapter (as merge and the exporters refuse it)."""
    for m in members:
        why = base_init_problem(Adapter(name=m.source.name, source=m.adapter_source))
        if why is not None:
            raise ConversionError(f"{why}; a bank would hold scale·B·A, which is not its ΔW")


def _refuse_existing(out: str | os.PathLike[str], overwrite: bool) -> None:
    if not overwrite and os.path.lexists(out):
        raise OutputExistsError(f"{out} already exists (use --force to overwrite)")


def _member_of(m: Member, row: dict[str, Any], reference: str, dtype: str) -> BankMember:
    rel = {k: (v["sq_error"] / v["norm2"] if v["norm2"] > 0 else 0.0) for k, v in row["modules"].items()}
    meta = {META_HASH: m.sha256} | error_metadata(rel, reference, dtype)
    return BankMember(m.source.name, {k: v["S"] for k, v in row["modules"].items()}, m.base_model, m.base_architecture,
                      m.adapter_source, meta, m.tensors)


def _bank_keys(bank: Bank) -> dict[str, ModuleKey]:
    return {n: ModuleKey(m.U.shape[0], m.V.shape[0], m.layout, m.fan_in_fan_out) for n, m in bank.modules.items()}


def add_to_bank(path: str | os.PathLike[str], inputs: list[str | os.PathLike[str]], *, names: list[str] | None = None,
                threshold: float | None = 0.05, partial: bool = False, codec: str = DEFAULT_CODEC) -> BankReport:
    """Project new adapters onto the bank's bases; grow the bases where an adapter's relative squared
    error on a module exceeds ``threshold`` (None: never grow). Old members' S are zero-padded, so
    their reconstructions do not change by one bit. Same content hash as a member: skipped, said so.
    The bank is rewritten atomically: interrupted, the previous file stays as it was. Old members'
    pass-through tensors are read from the old file while the new one is written, one at a time.
    Concurrent adds and refits of one bank run one after the other (:func:`locked`), none lost."""
    check_bank_path(path)
    with locked(path), open_bank(path) as bank:
        _check_finite(bank, path)
        members = expand_inputs(inputs, names)
        _refuse_base_inits(members)
        first = bank.members[0]
        _, keys, left_out = plan_modules(members, partial, reference=_bank_keys(bank), base_model=first.base_model)
        left_out += [s for m in members for s in m.skipped]
        _hash_members(members, list(keys), dtypes.of_array(next(iter(bank.modules.values())).U).name)
        known = {m.sha256: m.name for m in bank.members}
        names_in = {m.name for m in bank.members}
        report = BankReport(Path(path), "add", 0, left_out=left_out)
        itemsize_dt = dtypes.by_name(dtypes.of_array(next(iter(bank.modules.values())).U).name).numpy
        for mem in members:
            if mem.sha256 in known:
                report.skipped.append(
                    f"{mem.source.name}: already in the bank as {known[mem.sha256]!r} (same content hash); nothing to do")
                continue
            if mem.source.name in names_in:
                raise BankError(
                    f"the bank already has an adapter named {mem.source.name!r} with different content; name it differently")
            facs = mem.source.load()
            S_new: dict[str, np.ndarray] = {}
            rel: dict[str, float] = {}
            grown: dict[str, int] = {}
            for name in keys:
                mod = bank.modules[name]
                U, V = mod.U.astype(np.float64), mod.V.astype(np.float64)
                pl = place(facs[name], U, V, mod.form, threshold)
                if pl.added:
                    old_r = mod.rank
                    mod.U = np.concatenate([mod.U, pl.U[:, old_r:].astype(itemsize_dt)], axis=1)
                    mod.V = np.concatenate([mod.V, pl.V[:, old_r:].astype(itemsize_dt)], axis=1)
                    for old in bank.members:
                        if name in old.S:
                            old.S[name] = pad(old.S[name], mod.rank)
                    grown[name] = pl.added
                    # re-place on the stored (rounded) bases so S and the reported error match the file
                    pl = place(facs[name], mod.U.astype(np.float64), mod.V.astype(np.float64), mod.form, None)
                S_new[name] = pl.S.astype(itemsize_dt)
                rel[name] = _stored_error(facs[name], mod, S_new[name])
            dtype = dtypes.of_array(next(iter(bank.modules.values())).U).name
            bank.members.append(_member_of(mem, {"modules": {}}, "original adapter", dtype))
            bank.members[-1].S = S_new
            bank.members[-1].metadata |= error_metadata(rel, "original adapter", dtype)
            known[mem.sha256] = mem.source.name
            names_in.add(mem.source.name)
            report.added.append({"name": mem.source.name, "rel_error_mean": float(np.mean(list(rel.values()))),
                                 "rel_error_max": float(np.max(list(rel.values()))), "grown": grown})
        report.adapters = len(bank.members)
        if report.added:
            validate_records(bank)
            report.file_size = write_bank(path, bank, codec=codec)
        return report


def _check_finite(bank: Bank, path: str | os.PathLike[str]) -> None:
    """Refuse a bank holding NaN or inf in its bases or any member's S: an add would carry them into the new file
    (spec/shared.md §2 forbids writing them) or fail inside numpy."""
    for name, mod in bank.modules.items():
        for slot, x in (("U", mod.U), ("V", mod.V)):
            if not np.all(np.isfinite(x)):
                raise ConversionError(f"{path}: module {name!r}: the shared {slot} holds non-finite values (NaN or inf)")
    for mem in bank.members:
        for name, S in mem.S.items():
            if not np.all(np.isfinite(S)):
                raise ConversionError(f"{path}: adapter {mem.name!r} module {name!r}: S holds non-finite values (NaN or inf)")


def _stored_error(f: Factors, mod: BankModule, S: np.ndarray) -> float:
    n2 = sq_norm(f)
    return sq_error(f, mod.U.astype(np.float64), mod.V.astype(np.float64), S.astype(np.float64), n2) / n2 if n2 > 0 else 0.0


def refit_bank(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None, rank: int | None = None,
               target_error: float | None = None, budget: int | None = None, form: str | None = None, weights: str = "norm",
               max_iter: int = 50, tol: float = 1e-7, scheduler: str | None = None, codec: str = DEFAULT_CODEC,
               overwrite: bool = True) -> BankReport:
    """Refit the bases from the bank's own members (their current reconstructions) and rewrite it
    (to ``out``, default in place, atomically; ``overwrite`` false refuses an existing ``out`` with
    OutputExistsError). Errors are then relative to those reconstructions.
    Pass-through tensors are read from the old file while the new one is written, one at a time;
    the bank is locked throughout (:func:`locked`), so a concurrent add is not lost."""
    keep = overwrite or out is None or Path(out).resolve() == Path(path).resolve()  # --out BANK: in place, as without --out
    if out is not None:
        _refuse_existing(out, keep)
    check_bank_path(path)
    with locked(path), open_bank(path) as bank:
        first = next(iter(bank.modules.values()))
        dtype = dtypes.of_array(first.U).name
        form = form or bank.form
        sources = [PathSource(m.name, str(path), m.name) for m in bank.members]
        shapes = [ModuleShape(n, m.U.shape[0], m.V.shape[0]) for n, m in bank.modules.items()]
        opts = FitOptions(form=form, weights=weights, max_iter=max_iter, tol=tol)
        executor = make_executor(scheduler)
        try:
            res = fit_bank(shapes, sources, rank=rank if rank is not None else {n: m.rank for n, m in bank.modules.items()},
                           target_error=target_error, budget=budget, opts=opts, dtype=dtype, executor=executor)
        finally:
            executor.close()
        new = Bank({s.name: BankModule(s.name, *res.bases[s.name], form, bank.modules[s.name].layout,
                                       bank.modules[s.name].fan_in_fan_out) for s in shapes}, [])
        for old, row in zip(bank.members, res.members):
            rel = {k: (v["sq_error"] / v["norm2"] if v["norm2"] > 0 else 0.0) for k, v in row["modules"].items()}
            meta = dict(old.metadata) | error_metadata(rel, "bank reconstruction before refit", dtype)
            new.members.append(BankMember(old.name, {k: v["S"] for k, v in row["modules"].items()}, old.base_model,
                                          old.base_architecture, old.source, meta, old.tensors))
        validate_records(new)
        size = write_bank(out or path, new, codec=codec, overwrite=keep)
        return BankReport(Path(out or path), "refit", len(new.members), res.report(), file_size=size)


def lora_module(m: Module, rtol: float | None = None, *, where: str | None = None) -> tuple[Module, float]:
    """A shared record as a standalone ``lora`` record of the adapter's own rank, and the exact relative
    squared error of that record, as written, against the member's ΔW. The record holds ΔW's exact SVD
    (balanced orthonormal directions, so the cast to S's dtype costs only its rounding even where a diagonal
    bank's U, V are far from orthogonal), less the singular values below ``rtol``·σ₁ (default R·eps of S's
    dtype). Non-finite values are refused first, naming ``where``."""
    where = where or f"module {m.name!r}"
    f = m.factors()
    check_product(f.A, f.B, f.scale, where=where)
    sp = spectrum_of(f, where=where)
    dt = dtypes.of_array(m.array("S"))
    rel = rtol if rtol is not None else int(m.params["rank"]) * float(np.finfo(dt.numpy).eps)
    tol = rel * (float(sp.S[0]) if sp.S.size else 0.0)
    k = max(int(np.count_nonzero(sp.S > tol)), 1)
    rec = lora_from_factors(m.name, svd_factors(f, where=where, rank=k), dtype=dt.name)
    d = module_diff(m.name, m, rec)
    err = (d.diff / d.norm_a) ** 2 if d.norm_a > 0 else 0.0
    return rec, err


def extract_member(path: str | os.PathLike[str], name: str) -> tuple[Adapter, dict[str, float]]:
    """One member as an ordinary adapter of ``lora`` records and its own pass-through tensors (reads
    only its S, its tensors and the shared bases), with the exact relative error of the extraction
    per module (~1e-14 from rounding)."""
    with open_adapter(path, adapter=name) as a:
        out = Adapter(name=a.name, base_model=a.base_model, base_architecture=a.base_architecture, source=dict(a.source),
                      metadata={k: v for k, v in a.metadata.items() if not k.startswith("bank.")},
                      tensors={k: np.array(as_array(t)) for k, t in a.tensors.items()})
        errs = {}
        for m in a:
            if m.encoding != "shared":
                raise BankError(f"{path}: adapter {name!r} module {m.name!r} is not a shared record")
            out.modules[m.name], errs[m.name] = lora_module(m, where=f"adapter {name!r} module {m.name!r}")
    return out, errs


def extract_drops(adapter: Adapter, to: str) -> list[str]:
    """The pass-through tensors a write of ``adapter`` to ``to`` cannot carry (PEFT output of tensors
    from another format, e.g. a kohya file's unknown keys): refused unless dropped on request."""
    if to != "peft":
        return []
    return [n for f in check(adapter, "peft") if "full tensors" in f.problem for n in f.modules]


def write_extracted(adapter: Adapter, out: str | os.PathLike[str], to: str = "apack", *, drop_tensors: bool = False,
                    codec: str | None = None, level: int | None = None, overwrite: bool = True) -> Path:
    """Write an extracted member as ``.apack`` of lora records (``to="apack"``), of svd records (``"svd"``,
    exact SVD of each record, so it can be loaded at any lower rank), or a PEFT folder (``"peft"``).
    Pass-through tensors go along; those PEFT cannot carry (:func:`extract_drops`) are refused
    unless ``drop_tensors``. ``overwrite`` false: OutputExistsError where ``out`` exists."""
    _refuse_existing(out, overwrite)
    if to == "svd":
        adapter = adapter.derived({k: as_svd(m) for k, m in adapter.modules.items()})
        to = "apack"
    if to == "peft":
        return write_peft(adapter, out, drop_tensors=drop_tensors, overwrite=overwrite)
    write_apack(out, adapter, codec=codec or DEFAULT_CODEC, level=level, overwrite=overwrite)
    return Path(out)


def _error_stats(text: Any) -> dict[str, Any]:
    """The mean, max and dtype a member's error metadata holds (:func:`~adapterpack.bank.store.error_metadata`'s JSON;
    banks written before the dtype was recorded hold none); metadata is free-form (spec §2), so a value that is not
    such an object (another writer's, or damaged) gives none."""
    try:
        err = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    if not isinstance(err, dict):
        return {}
    out: dict[str, Any] = {}
    for k in ("mean", "max"):
        v = err.get(k)
        if type(v) in (int, float):
            try:
                f = float(v)
            except OverflowError:  # an integer of hundreds of digits
                continue
            if math.isfinite(f):
                out[k] = f
    if isinstance(err.get("dtype"), str):
        out["dtype"] = err["dtype"]
    return out


def bank_listing(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Members (name, error metadata, hash, pass-through tensors) and modules (shape, rank, form) of a bank,
    bytes shared vs own (pass-through tensors counted from the index, not read)."""
    with open_bank(path) as bank:
        mods = [{"name": n, "m": m.U.shape[0], "n": m.V.shape[0], "rank": m.rank, "form": m.form} for n, m in bank.modules.items()]
        shared_bytes = sum(m.U.nbytes + m.V.nbytes for m in bank.modules.values())
        now = dtypes.of_array(next(iter(bank.modules.values())).U).name if bank.modules else None
        members = []
        for mem in bank.members:
            err = _error_stats(mem.metadata.get(META_ERROR))
            reference = mem.metadata.get(META_REFERENCE)
            if reference is not None and err.get("dtype") not in (None, now):  # cast since (convert --dtype): stale
                reference = f"{reference} (measured on the {err['dtype']} bank, cast to {now} since)"
            own = sum(s.nbytes for s in mem.S.values()) + sum(decoded_bytes(t) for t in mem.tensors.values())
            members.append({"name": mem.name, "sha256": mem.sha256[:12], "own_bytes": own, "tensors": list(mem.tensors)}
                           | {"rel_error_mean": err.get("mean"), "rel_error_max": err.get("max"), "error_reference": reference})
    return {"path": str(path), "form": bank.form, "adapters": len(bank.members), "modules": mods, "members": members,
            "shared_bytes": shared_bytes, "file_size": Path(path).stat().st_size}
