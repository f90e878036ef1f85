"""Merge an adapter into a base model's safetensors weights: ``W ← round(W + ΔW)``, exactly and atomically.

Every adapted weight is widened to float64, ΔW = s·B·A is computed in float64 from the factors, the
sum is rounded once to the weight's own dtype (bfloat16 rounded directly from float64, not through
float32: :func:`adapterpack.dtypes.cast_array`), and written at the tensor's own byte range: the
output files have the base's headers, metadata, tensor order and dtypes, and every tensor the adapter
does not touch is copied byte for byte. DoRA records rescale ``W + ΔW`` per output by their magnitude
(spec §6.1). ``modules_to_save`` and other pass-through tensors replace the base tensor they name; the
copy of an adapted layer's own weight PEFT saves beside its factors (``<module>.base_layer.weight``, written
for embedding LoRAs) is that module's W, as PEFT loads it into the base layer before adding ΔW.

Everything is planned first: every module and tensor must name exactly one base tensor of the same
shape and a float dtype, or nothing is written (ConversionError listing each). The output folder is
built beside the destination and renamed into place (:func:`adapterpack.atomic.atomic_dir`): an error
part-way leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes, progress
from adapterpack.adapter import Adapter, Module, as_array, tensor_info
from adapterpack.atomic import atomic_dir
from adapterpack.errors import AdapterpackError, ConversionError, InputError
from adapterpack.formats.peft import conv1d_layout
from adapterpack.formats.safetensors_header import Header, read_header
from adapterpack.formats.source import refuse_alora, refuse_base_init
from adapterpack.ops.files import open as open_adapter

#: Index file of a sharded checkpoint (Hugging Face's name).
INDEX = "model.safetensors.index.json"
#: How many refusals a ConversionError lists before saying how many more.
SHOWN = 8
#: PEFT key wrappers around a pass-through tensor's module name.
_WRAPPERS = (".modules_to_save.default", ".original_module")
_PREFIXES = ("base_model.model.",)
#: PEFT's key for the weight of an adapted layer saved beside its factors (``save_embedding_layers``).
BASE_LAYER = ".base_layer.weight"


@dataclass
class MergePlan:
    """Where each module and pass-through tensor goes: base tensor key, its file and header entry."""

    modules: dict[str, str] = field(default_factory=dict)  # module name -> base key
    tensors: dict[str, str] = field(default_factory=dict)  # adapter tensor key -> base key
    files: dict[str, str] = field(default_factory=dict)  # base key -> file name (relative to the base folder)
    headers: dict[str, Header] = field(default_factory=dict)  # file name -> header
    dropped: list[str] = field(default_factory=list)
    base_layers: dict[str, str] = field(default_factory=dict)  # module name -> adapter tensor holding its base weight


@dataclass
class MergeResult:
    """What ``merge`` did: per module, the base tensor written; the files rewritten and copied."""

    src: Path
    base: Path
    dst: Path
    modules: list[dict[str, Any]]
    tensors: list[dict[str, Any]]
    rewritten: list[str]
    copied: list[str]
    notes: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "src": str(self.src),
            "base": str(self.base),
            "dst": str(self.dst),
            "modules": self.modules,
            "tensors": self.tensors,
            "total": {"module_count": len(self.modules), "tensors": len(self.tensors), "files": len(self.rewritten)},
            "rewritten": self.rewritten,
            "copied": self.copied,
            "notes": self.notes,
            "seconds": self.seconds,
        }


def base_files(base: Path) -> list[str]:
    """The safetensors files of a base model folder (the shards its index names, else every *.safetensors)."""
    if not base.is_dir():
        raise InputError(f"{base}: not a folder (the base model folder holds its *.safetensors weights)")
    index = base / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: not a safetensors index ({e})") from None
        if any(os.sep in f or f.startswith(".") for f in files):
            raise InputError(f"{index}: names files outside the folder")
        return files
    files = sorted(p.name for p in base.glob("*.safetensors") if p.is_file())
    if not files:
        raise InputError(f"{base}: no *.safetensors weights (merge writes safetensors checkpoints)")
    return files


def _resolve(name: str, keys: dict[str, str]) -> list[str]:
    """Base keys ``name`` can mean: ``name.weight`` (or ``name`` itself for a tensor key), else the same with
    leading components dropped from ``name``, else base keys that end with it."""
    parts = name.split(".")
    for i in range(len(parts)):
        tail = ".".join(parts[i:])
        hits = [k for k in (f"{tail}.weight", tail) if k in keys]
        if hits:
            return hits[:1]
    return [k for k in keys if k.endswith(f".{name}.weight") or k.endswith(f".{name}")]


def _architectures(base: Path) -> list[str]:
    """The model classes a base folder's config.json names (none when it has no readable one)."""
    try:
        archs = json.loads((base / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return []
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def _tensor_name(key: str) -> str:
    for p in _PREFIXES:
        key = key.removeprefix(p)
    for w in _WRAPPERS:
        key = key.replace(w, "")
    return key


def plan(adapter: Adapter, base: Path, *, drop_tensors: bool = False) -> MergePlan:
    """Map every module and pass-through tensor onto one base tensor, checking shapes and dtypes; raise
    ConversionError listing every module that cannot be merged (nothing has been written then)."""
    p = MergePlan()
    for f in base_files(base):
        path = base / f
        if not path.is_file():
            raise InputError(f"{path}: missing (named by {INDEX})")
        p.headers[f] = read_header(path)
        for k in p.headers[f].tensors:
            p.files[k] = f
    problems: list[str] = []

    def entry(key: str) -> Any:
        return p.headers[p.files[key]].tensors[key]

    def check(what: str, key: str, shape: tuple[int, ...]) -> bool:
        e = entry(key)
        if tuple(e.shape) != tuple(shape):
            problems.append(f"{what}: shape {list(shape)} but base tensor {key!r} is {list(e.shape)}")
            return False
        try:
            dt = dtypes.by_safetensors(e.dtype)
        except AdapterpackError:
            dt = None
        if dt is None or not dt.is_float:
            problems.append(f"{what}: base tensor {key!r} is {e.dtype}, not a float weight")
            return False
        return True

    for m in adapter:
        hits = _resolve(m.name, p.files)
        if len(hits) != 1:
            problems.append(f"module {m.name!r}: " + ("no base tensor of that name" if not hits else f"ambiguous ({hits[:3]})"))
        elif check(f"module {m.name!r}", hits[0], tuple(m.base_shape)):
            p.modules[m.name] = hits[0]
    used = dict.fromkeys(p.modules.values())
    for key, t in adapter.tensors.items():
        name = _tensor_name(key)
        if name.endswith(BASE_LAYER) and name[: -len(BASE_LAYER)] in p.modules:  # PEFT's copy of the layer's own W
            module = name[: -len(BASE_LAYER)]
            if check(f"tensor {key!r}", p.modules[module], tuple(tensor_info(t)[1])):
                p.base_layers[module] = key
            continue
        hits = _resolve(name, p.files)
        if len(hits) != 1 or hits[0] in used:
            if drop_tensors:
                p.dropped.append(key)
                continue
            why = "no base tensor of that name" if not hits else "also adapted by a module" if hits[0] in used else "ambiguous"
            problems.append(f"tensor {key!r}: {why} (--drop-tensors leaves such tensors out)")
        elif check(f"tensor {key!r}", hits[0], tuple(tensor_info(t)[1])):
            p.tensors[key] = hits[0]
    if problems:
        more = f" ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise ConversionError(f"cannot merge into {base}: " + "; ".join(problems[:SHOWN]) + more + " (nothing written)")
    return p


def merged_weight(m: Module, w: np.ndarray) -> np.ndarray:
    """``W + ΔW`` (DoRA: rescaled per output by the magnitude) in float64, ΔW from the factors in float64."""
    f = m.factors()
    f64 = replace(f, A=np.asarray(f.A, dtype=np.float64), B=np.asarray(f.B, dtype=np.float64))
    v = w.astype(np.float64) + f64.delta()
    if not m.params.get("dora"):
        return v
    mag = np.asarray(as_array(m.tensors["magnitude"]), dtype=np.float64)
    layout = m.params.get("layout", "linear")
    if layout == "embedding" or (layout == "linear" and m.params.get("fan_in_fan_out")):
        return v * (mag / np.linalg.norm(v, axis=0))[None, :]
    rows = v.reshape(v.shape[0], -1)
    return (rows * (mag / np.linalg.norm(rows, axis=1))[:, None]).reshape(v.shape)


def _read(path: Path, header: Header, key: str) -> np.ndarray:
    e = header.tensors[key]
    dt = dtypes.by_safetensors(e.dtype)
    with open(path, "rb") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start + e.begin)
        raw = f.read(e.end - e.begin)
    return np.frombuffer(raw, dtype=dt.numpy).reshape(e.shape)


def _write(path: Path, header: Header, key: str, arr: np.ndarray) -> None:
    e = header.tensors[key]
    data = dtypes.as_bytes(arr)
    if len(data) != e.end - e.begin:  # pragma: no cover - shapes and dtypes were checked by plan()
        raise ConversionError(f"{key}: {len(data)} bytes for a {e.end - e.begin}-byte slot")
    with open(path, "r+b") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start + e.begin)
        f.write(data)


def _rounded(x: np.ndarray, dtype_name: str, where: str) -> np.ndarray:
    out, _ = dtypes.cast_array(x, dtype_name, where)  # refuses values that overflow the base dtype
    return out


def merge(
    src: str | os.PathLike[str],
    base: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    adapter: str | None = None,
    force: bool = False,
    drop_tensors: bool = False,
) -> MergeResult:
    """Write ``dst``: the base model folder ``base`` with ``src``'s adapter merged into its safetensors weights.

    Refuses (before writing) modules or tensors that name no base tensor, or one of another shape or a
    non-float dtype; ``drop_tensors`` leaves out pass-through tensors that name none. ``dst`` must not
    exist unless ``force``; it is replaced whole.
    """
    start = time.perf_counter()
    src, base, dst = Path(src), Path(base), Path(dst)
    real_dst, real_base = Path(os.path.realpath(dst)), Path(os.path.realpath(base))
    if real_dst == real_base:
        raise ConversionError(f"{dst}: the output folder must not be the base model folder")
    if real_base in real_dst.parents or real_dst in real_base.parents:
        # the base's files are copied into dst: one inside the other would copy the output (and its temporary
        # folder) into itself, or replace the base while it is read
        raise ConversionError(f"{dst}: the output folder must not be inside the base model folder {base} (or hold it)")
    if dst.exists() and not force:
        from adapterpack.atomic import exists_error

        raise exists_error(dst)
    # a GGUF adapter's q/k rows are in llama.cpp's order: the base folder's config.json gives the head counts
    heads = base if (base / "config.json").is_file() else None
    with open_adapter(src, adapter=adapter, base=heads) as opened:
        refuse_alora(opened, "a merged model")
        refuse_base_init(opened, "merge")
        ad = conv1d_layout(opened, _architectures(base))  # PEFT's per-layer fan_in_fan_out, by the base's own class
        p = plan(ad, base, drop_tensors=drop_tensors)
        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, key in p.modules.items():
            by_file.setdefault(p.files[key], []).append(("module", name))
        for tkey, key in p.tensors.items():
            by_file.setdefault(p.files[key], []).append(("tensor", tkey))
        modules, tensors = [], []
        with atomic_dir(dst, overwrite=force) as tmp:
            for entry in sorted(os.listdir(base)):
                if (base / entry).is_dir():
                    shutil.copytree(base / entry, tmp / entry)
                elif entry not in by_file:
                    shutil.copy2(base / entry, tmp / entry)
            with progress.task("merging", total=len(p.modules) + len(p.tensors), unit="tensors") as bar:
                for f, items in sorted(by_file.items()):
                    shutil.copy2(base / f, tmp / f)
                    header = p.headers[f]
                    for kind, name in items:
                        if kind == "module":
                            key = p.modules[name]
                            w = _read(base / f, header, key)
                            own = p.base_layers.get(name)
                            v = w if own is None else np.asarray(as_array(ad.tensors[own]))
                            new = _rounded(merged_weight(ad.module(name), v), dtypes.of_array(w).name, f"module {name!r}")
                            if own is not None:
                                tensors.append({"name": own, "weight": key, "file": f, "dtype": dtypes.of_array(w).name})
                            modules.append({"name": name, "weight": key, "file": f, "dtype": dtypes.of_array(w).name,
                                            "dora": bool(ad.module(name).params.get("dora"))})  # fmt: skip
                        else:
                            key = p.tensors[name]
                            w = _read(base / f, header, key)
                            t = np.asarray(as_array(ad.tensors[name]))
                            new = _rounded(t.astype(np.float64), dtypes.of_array(w).name, f"tensor {name!r}")
                            tensors.append({"name": name, "weight": key, "file": f, "dtype": dtypes.of_array(w).name})
                        _write(tmp / f, header, key, new)
                        bar.advance(note=name)
    notes = [f"{len(p.dropped)} pass-through tensor(s) left out on request: {', '.join(p.dropped[:3])}"] if p.dropped else []
    untouched = sorted(e for e in os.listdir(base) if e not in by_file)
    return MergeResult(
        src=src, base=base, dst=dst, modules=modules, tensors=tensors, rewritten=sorted(by_file),
        copied=untouched, notes=notes, seconds=time.perf_counter() - start,
    )  # fmt: skip


__all__ = ["MergePlan", "MergeResult", "base_files", "merge", "merged_weight", "plan"]
