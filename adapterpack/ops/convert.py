"""Converting adapters: any format to any format, optionally casting the dtype, and checking results.

- :func:`cast_adapter` casts the LoRA factors (A, B, DoRA magnitude) and float pass-through
  tensors, and measures what the cast cost: the largest change of a stored value and the
  relative Frobenius error of every ΔW, computed exactly from the factors (:func:`delta_error`)
  without ever forming an out×in matrix.
- :func:`convert` reads an .apack file, PEFT folder or kohya file and writes any of the three.
- :func:`adapter_differences` / :func:`safetensors_differences` compare two adapters (files)
  bit for bit, for round-trip checks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, TensorLike, as_array, tensor_info
from adapterpack.atomic import exists_error
from adapterpack.codecs import DEFAULT_CODEC, get_codec
from adapterpack.container.writer import blob_identity
from adapterpack.encodings.lower import as_lora, at_rank
from adapterpack.errors import ConversionError, OptionError
from adapterpack.formats import Opened, open_adapters
from adapterpack.formats.source import notes as source_notes
from adapterpack.formats.write import (
    BASE_FORMATS,
    FORMATS,
    SAFETENSORS_FORMATS,
    SERVING_STACKS,
    ProgressFactory,
    check_write_options,
    infer_format,
    write_adapters,
)
from adapterpack.linalg.cast import CastReport, ModuleCast, cast_adapter, delta_error  # noqa: F401  (their home before 0.2)
from adapterpack.ops.report import footprint

#: What ``convert --to`` writes: a file format, or ``nola`` (an .apack with every module fitted as a nola record).
TARGETS = (*FORMATS, "nola")
#: Targets written as one .safetensors file (the suffix alone cannot tell them apart).
SAFETENSORS_TARGETS = SAFETENSORS_FORMATS
#: Targets written as .apack files.
APACK_TARGETS = ("apack", "nola")
#: Serving stacks ``serve_for`` shapes a PEFT export for.
SERVE_TARGETS = SERVING_STACKS
#: The output format a destination's name implies (``convert`` without ``--to``).
infer_target = infer_format
DTYPE_CHOICES = ("keep", *dtypes.CAST_CHOICES)



# --- reading and writing any format ---------------------------------------------------------------


def target_conflict(dst: str | os.PathLike[str], to: str) -> str | None:
    """Why ``to`` contradicts the destination's name (``out.apack`` with ``to="kohya"``), or None."""
    inferred = infer_target(dst)
    if (inferred == "apack" and to in APACK_TARGETS) or (inferred in SAFETENSORS_TARGETS and to in SAFETENSORS_TARGETS):
        return None
    if inferred != "peft" and inferred != to:
        kind = {"apack": "an .apack file", "gguf": "a llama.cpp .gguf file"}.get(inferred, "a kohya or diffusers .safetensors file")
        return f"{Path(dst).name!r} names {kind}, but the output format is {to}"
    return None


def check_options(
    target: str,
    dst: str | os.PathLike[str],
    *,
    codec: str | None = None,
    level: int | None = None,
    drop_tensors: bool = False,
    serve_for: str | None = None,
    component: str | None = None,
    nola_k: int | None = None,
    nola_target_error: float | None = None,
    base: str | os.PathLike[str] | None = None,
    src: str | os.PathLike[str] | None = None,
) -> None:
    """Every rule on which convert's options go together (OptionError naming the option as the CLI spells
    it): ``adapterpack convert`` reports it as a usage error before reading anything, :func:`convert`
    refuses the same requests the same way. The rules of a format's writer are stated once, in
    :func:`adapterpack.formats.write.check_write_options`."""
    if target not in TARGETS:
        raise OptionError(f"unknown output format {target!r} (one of {', '.join(TARGETS)})")
    if target not in APACK_TARGETS and (codec is not None or level is not None):
        raise OptionError(f"--codec and --level apply to .apack output only, not {target}")
    if target == "nola" and (nola_k is None) == (nola_target_error is None):
        raise OptionError("--to nola needs exactly one of --k and --target-error")
    if target != "nola" and (nola_k is not None or nola_target_error is not None):
        raise OptionError("--k and --target-error apply to --to nola only")
    if target in APACK_TARGETS and drop_tensors:
        raise OptionError("--drop-tensors applies to PEFT and kohya output only; .apack keeps every tensor")
    fmt = "apack" if target in APACK_TARGETS else target
    check_write_options(fmt, dst, drop_tensors=drop_tensors, serve_for=serve_for, component=component, base=base, src=src)


def check_destination(src: Path, dst: Path, target: str, force: bool) -> None:
    """Refuse to overwrite without ``force``, to write onto the source, or to replace a non-adapter folder."""
    if dst.exists() or dst.is_symlink():
        if src.exists() and dst.exists() and src.resolve() == dst.resolve():
            raise ConversionError(f"{dst}: output is the same path as the input")
        if not force:
            raise exists_error(dst)
        if target == "peft":
            if not dst.is_dir():
                raise ConversionError(f"{dst} exists and is not a folder; a PEFT adapter is written as a folder")
            # the weights alone: a write in place was stopped between its renames (adapterpack.atomic)
            if any(dst.iterdir()) and not any((dst / n).is_file() for n in ("adapter_config.json", "adapter_model.safetensors")):
                raise ConversionError(f"{dst} is a folder that holds no PEFT adapter; not replacing it")
        elif dst.is_dir():
            raise ConversionError(f"{dst} is a folder; a {target} adapter is written as a single file")


#: What :func:`load_source` returns: the adapters of one input and how to release its file.
Source = Opened


def load_source(
    src: str | os.PathLike[str], adapter: str | None = None, *, verify: bool = True, base: str | os.PathLike[str] | None = None
) -> Opened:
    """Open ``src`` (any format): all adapters of an .apack file, or the one named ``adapter``
    (:func:`adapterpack.formats.open_adapters`, the one implementation every reader shares)."""
    return open_adapters(src, adapter, verify=verify, base=base)


def effective_level(codec: str, level: int | None) -> int | None:
    """The compression level a codec uses for ``level`` (None: the codec's default; raw: None)."""
    cfg = get_codec({"id": codec} if level is None else {"id": codec, "level": level}).get_config()
    return cfg.get("level")


@dataclass
class ConvertResult:
    """What :func:`convert` did: formats, sizes, notes from the importer, cast errors."""

    src: Path
    dst: Path
    src_format: str
    dst_format: str
    adapters: list[str]
    src_bytes: int
    dst_bytes: int
    codec: str | None
    level: int | None
    dtype: str
    casts: list[CastReport]
    notes: list[str]
    skipped: list[str]
    seconds: float

    @property
    def ratio(self) -> float | None:
        """Input bytes / output bytes on disk."""
        return self.src_bytes / self.dst_bytes if self.dst_bytes else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = {k: v for k, v in self.__dict__.items() if k != "casts"}
        return d | {"src": str(self.src), "dst": str(self.dst), "ratio": self.ratio, "casts": [c.as_dict() for c in self.casts]}


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    codec: str | None = None,
    level: int | None = None,
    dtype: str = "keep",
    force: bool = False,
    adapter: str | None = None,
    progress: ProgressFactory | None = None,
    drop_tensors: bool = False,
    rank: int | None = None,
    serve_for: str | None = None,
    max_lora_rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
    nola_k: int | None = None,
    nola_target_error: float | None = None,
    component: str | None = None,
    nola_k_max: int | None = None,
    nola_max_seconds: float | None = None,
) -> ConvertResult:
    """Read ``src`` (.apack, PEFT folder, kohya or diffusers file) and write it to ``dst`` as ``to`` (inferred from
    ``dst`` when None), casting float tensors to ``dtype`` unless ``"keep"``. Lossless otherwise;
    ``drop_tensors`` leaves out pass-through tensors a PEFT / kohya output cannot carry; ``rank``
    caps every module at its best approximation of that rank (svd records: a prefix; others: an
    exact SVD, see :func:`adapterpack.encodings.lower.at_rank`). ``to="nola"`` writes an .apack of
    nola records fitted with ``nola_k`` coefficients per factor or to ``nola_target_error``
    (:func:`adapterpack.encodings.nola_fit.fit_adapter`; lossy, the achieved errors are in the notes); a
    target-error search is bounded by ``nola_k_max`` coefficients per factor and ``nola_max_seconds``."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    target = to or infer_target(dst)
    check_options(
        target,
        dst,
        codec=codec,
        level=level,
        drop_tensors=drop_tensors,
        serve_for=serve_for,
        component=component,
        nola_k=nola_k,
        nola_target_error=nola_target_error,
        base=base,
        src=src,
    )
    if dtype not in DTYPE_CHOICES:
        dtypes.by_name(dtype)  # raises UnknownDTypeError naming it
    check_destination(src, dst, target, force)
    source = load_source(src, adapter, base=base)
    try:
        adapters, casts = source.adapters, []
        if rank is not None:
            adapters = [replace(a, modules={n: at_rank(m, rank) for n, m in a.modules.items()}, closer=None) for a in adapters]
        if dtype != "keep":
            if target not in APACK_TARGETS:  # the output holds LoRA factors: a qsvd / nola / shared record has none to cast
                adapters = [replace(a, modules={n: as_lora(m) for n, m in a.modules.items()}, closer=None) for a in adapters]
            adapters, casts = _cast_sharing(adapters, dtype)
        fitted: list[str] = []
        if target == "nola":
            adapters, fitted = _fit_nola(adapters, nola_k, nola_target_error, k_max=nola_k_max, max_seconds=nola_max_seconds)
        export = write_adapters(
            adapters,
            dst,
            "apack" if target in APACK_TARGETS else target,
            codec=codec,
            level=level,
            progress=progress,
            drop_tensors=drop_tensors,
            serve_for=serve_for,
            max_lora_rank=max_lora_rank,
            base=base if target in BASE_FORMATS else None,  # else it was for reading a .gguf input
            component=component,
            overwrite=force,
        )
        many = len(adapters) > 1
        notes = [f"{a.name}: {n}" if many else n for a in source.adapters for n in source_notes(a)] + fitted + export
        skipped = [f"{a.name}: {s}" if many else s for a in source.adapters for s in a.skipped]
    finally:
        source.close()
    return ConvertResult(
        src=src,
        dst=dst,
        src_format=source.format,
        dst_format=target,
        adapters=[a.name for a in adapters],
        src_bytes=footprint(src),
        dst_bytes=footprint(dst),
        codec=(codec or DEFAULT_CODEC) if target in APACK_TARGETS else None,
        level=effective_level(codec or DEFAULT_CODEC, level) if target in APACK_TARGETS else None,
        dtype="keep" if dtype == "keep" else dtypes.by_name(dtype).name,
        casts=casts,
        notes=notes,
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )


def _cast_sharing(adapters: list[Adapter], dtype: str) -> tuple[list[Adapter], list[CastReport]]:
    """Every adapter cast to ``dtype`` (:func:`cast_adapter`), with the slots that held one blob of the source (a
    bank's U and V in every member, :func:`~adapterpack.container.writer.blob_identity`) holding one cast array
    again, so the writer stores it once. A cast is a function of the bits: every cast of one blob has the same bits
    (compared before they are joined). Each adapter's duplicates are dropped as soon as it is cast."""
    first: dict[tuple[Any, ...], TensorLike] = {}
    out, reports = [], []

    def join(key: tuple[Any, ...], arr: TensorLike) -> TensorLike:
        kept = first.setdefault(key, arr)
        return kept if kept is not arr and _same_bits(as_array(kept), as_array(arr)) else arr

    for a in adapters:
        cast, report = cast_adapter(a, dtype)
        for m in a:
            tensors = cast.modules[m.name].tensors
            for slot, t in m.tensors.items():
                tensors[slot] = join(blob_identity(t), tensors[slot])
        cast.tensors = {k: join(blob_identity(a.tensors[k]), t) for k, t in cast.tensors.items()}
        out.append(cast)
        reports.append(report)
    return out, reports


def _fit_nola(
    adapters: list[Adapter], k: int | None, target_error: float | None, *, k_max: int | None = None,
    max_seconds: float | None = None,
) -> tuple[list[Adapter], list[str]]:  # fmt: skip
    """Every adapter fitted as nola records, and the lines that say how well (per adapter: the
    coefficient counts, mean and worst relative Frobenius error of ΔW, the worst module)."""
    from adapterpack.encodings.nola_fit import fit_adapter  # scipy: only --to nola fits

    out, lines = [], []
    for a in adapters:
        fitted, fits = fit_adapter(a, k=k, target_error=target_error, k_max=k_max, max_seconds=max_seconds)
        out.append(fitted)
        if not fits:
            continue
        errors = {n: f.error for n, f in fits.items()}
        worst = max(errors, key=errors.__getitem__)
        ks = sorted({f.num_params // 2 for f in fits.values()})
        lines.append(
            f"nola {a.name!r}: {len(fits)} modules, k {ks[0]}"
            + (f"–{ks[-1]}" if len(ks) > 1 else "")
            + f" per factor, {sum(f.num_params for f in fits.values()):,} coefficients; relative Frobenius error of ΔW"
            f" mean {sum(errors.values()) / len(errors):.3g}, worst {errors[worst]:.3g} ({worst})"
        )
        if target_error is not None and errors[worst] > target_error:
            missed = sum(e > target_error for e in errors.values())
            lines.append(f"nola {a.name!r}: {missed} modules miss the target {target_error:g} at the largest k tried")
        stopped = [n for n, f in fits.items() if f.stopped]
        if stopped:
            lines.append(
                f"nola {a.name!r}: stopped by the time bound ({max_seconds:g} s): {len(stopped)} modules keep the best error "
                f"reached (from {stopped[0]}); raise --max-seconds or --k-max, or give --k"
            )
    lines.append("nola: a random basis cannot represent a trained LoRA with few coefficients; the errors above are exact")
    return out, lines


# --- bit-exact comparisons ----------------------------------------------------------------------


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and dtypes.as_bytes(a) == dtypes.as_bytes(b)


def _tensor_differences(where: str, a: dict[str, TensorLike], b: dict[str, TensorLike]) -> list[str]:
    out = []
    if set(a) != set(b):
        out.append(f"{where}: tensors {sorted(a)} vs {sorted(b)}")
    for k in sorted(set(a) & set(b)):
        (da, sa), (db, sb) = tensor_info(a[k]), tensor_info(b[k])
        if (da, sa) != (db, sb):
            out.append(f"{where} {k!r}: {da} {list(sa)} vs {db} {list(sb)}")
        elif not _same_bits(as_array(a[k]), as_array(b[k])):
            out.append(f"{where} {k!r}: values differ")
    return out


#: lora params a record may leave out, and the value they then have (spec: encodings/lora).
LORA_DEFAULTS = {"rslora": False, "layout": "linear", "fan_in_fan_out": False, "dora": False}


def record_facts(m: Module) -> dict[str, Any]:
    """Everything about a record except its tensors: encoding, base shape, must_understand and
    params (lora params with their defaults filled in, so an omitted flag equals an explicit false)."""
    params = dict(m.params)
    if m.encoding == "lora":
        params = LORA_DEFAULTS | params
    return {
        "encoding": m.encoding,
        "base_shape": [int(d) for d in m.base_shape],
        "must_understand": bool(m.must_understand),
        "params": params,
    }


def adapter_differences(a: Adapter, b: Adapter) -> list[str]:
    """How two adapters differ in modules, records and tensor bits (empty when identical)."""
    out = []
    if set(a.modules) != set(b.modules):
        only_a, only_b = sorted(set(a.modules) - set(b.modules)), sorted(set(b.modules) - set(a.modules))
        out.append(f"modules only in the first: {only_a[:3]}, only in the second: {only_b[:3]}")
    for name in [n for n in a.modules if n in b.modules]:
        ma, mb = a.modules[name], b.modules[name]
        ra, rb = record_facts(ma), record_facts(mb)
        if ra != rb:
            out.append(f"module {name!r}: " + ", ".join(f"{k} {ra[k]!r} vs {rb[k]!r}" for k in ra if ra[k] != rb[k]))
        out.extend(_tensor_differences(f"module {name!r} tensor", ma.tensors, mb.tensors))
    out.extend(_tensor_differences("tensor", a.tensors, b.tensors))
    return out


def safetensors_differences(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """How the tensors of two safetensors files differ in names, dtypes, shapes or bits (metadata ignored)."""
    from safetensors import safe_open  # safetensors: only this comparison (demo) needs it

    with safe_open(str(a), framework="numpy") as fa, safe_open(str(b), framework="numpy") as fb:
        ta = {k: fa.get_tensor(k) for k in fa.keys()}
        tb = {k: fb.get_tensor(k) for k in fb.keys()}
    return _tensor_differences("tensor", ta, tb)
