"""What an adapter file holds, as plain dicts (no printing): the data behind ``adapterpack inspect``.

Everything comes from the index / headers (shapes, dtypes, stored lengths); no tensor is
decoded, so inspecting a large file is instant. The CLI renders these dicts as a table or
JSON; tests compare them with sums computed from the file.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from adapterpack.adapter import Adapter, Module, StoredTensor, TensorLike, decoded_bytes, stored_bytes, tensor_info
from adapterpack.formats import open_adapters
from adapterpack.formats.source import notes, provenance, source_format
from adapterpack.names import natural_key

#: Files of a PEFT folder that make up the adapter (what ``footprint`` counts).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def footprint(path: str | os.PathLike[str]) -> int:
    """Bytes an adapter occupies on disk: a file's size, or for a PEFT folder the sizes of
    ``adapter_config.json`` and ``adapter_model.*`` (not READMEs or logs beside them)."""
    p = Path(path)
    if p.is_dir():
        return sum((p / n).stat().st_size for n in PEFT_FILES if (p / n).is_file())
    return p.stat().st_size


def ratio(num: int | float, den: int | float) -> float | None:
    """num/den, or None when den is 0 (JSON has no infinity)."""
    return float(num) / float(den) if den else None


def _codec(t: TensorLike) -> str:
    return t.codec if isinstance(t, StoredTensor) else "memory"


def _tensor_row(t: TensorLike) -> dict[str, Any]:
    dtype, shape = tensor_info(t)
    return {
        "dtype": dtype,
        "shape": list(shape),
        "codec": _codec(t),
        "stored_bytes": stored_bytes(t),
        "decoded_bytes": decoded_bytes(t),
    }


def _join_unique(values: list[str]) -> str:
    return "/".join(dict.fromkeys(values))


def module_row(m: Module) -> dict[str, Any]:
    """One table row for an encoding record."""
    summary = m.summary()
    tensors = {slot: _tensor_row(t) for slot, t in m.tensors.items()}
    return {
        "module": m.name,
        "kind": "module",
        "encoding": m.encoding,
        "rank": summary.get("rank"),
        "alpha": summary.get("alpha"),
        "scale": summary.get("scale"),
        "rslora": bool(summary.get("rslora", False)),
        "summary": summary,
        "base_shape": list(m.base_shape),
        "dtype": _join_unique([r["dtype"] for r in tensors.values()]),
        "codecs": _join_unique([r["codec"] for r in tensors.values()]),
        "tensors": tensors,
        "parameters": m.num_params,
        "decoded_bytes": m.decoded_bytes,
        "stored_bytes": m.stored_bytes,
    }


def tensor_row(name: str, t: TensorLike) -> dict[str, Any]:
    """One table row for a pass-through tensor (PEFT modules_to_save and the like)."""
    info = _tensor_row(t)
    return {
        "module": name,
        "kind": "tensor",
        "encoding": None,
        "rank": None,
        "alpha": None,
        "scale": None,
        "rslora": False,
        "summary": {},
        "base_shape": info["shape"],
        "dtype": info["dtype"],
        "codecs": info["codec"],
        "tensors": {"tensor": info},
        "parameters": _numel(info["shape"]),
        "decoded_bytes": info["decoded_bytes"],
        "stored_bytes": info["stored_bytes"],
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def target_modules(adapter: Adapter) -> list[str] | str:
    """What the adapter targets: a PEFT config's ``target_modules`` as written (a list, or a regex string),
    else the distinct last name components of its modules (``q_proj``, ...; a name without dots as it is)."""
    cfg = provenance(adapter, "peft").get("config")
    tm = cfg.get("target_modules") if isinstance(cfg, dict) else None
    if isinstance(tm, str) or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm)):
        return sorted(tm) if isinstance(tm, list) else tm
    return sorted({m.name.rsplit(".", 1)[-1] for m in adapter}, key=natural_key)


def file_metadata(adapter: Adapter) -> dict[str, str]:
    """The input file's own metadata: a safetensors ``__metadata__`` (kohya's ``ss_*`` keys, PEFT's, diffusers')
    or a GGUF file's key-value pairs, as the importer recorded them (string values only)."""
    src = adapter.source if isinstance(adapter.source, dict) else {}
    for key in ("safetensors_metadata", "gguf_metadata"):
        meta = src.get(key)
        if isinstance(meta, dict):
            return {str(k): v for k, v in sorted(meta.items()) if isinstance(v, str)}
    return {}


def adapter_report(adapter: Adapter) -> dict[str, Any]:
    """Rows (modules, then pass-through tensors, each in natural name order), totals, skipped records and importer notes."""
    modules = sorted(adapter, key=lambda m: natural_key(m.name))
    tensors = sorted(adapter.tensors.items(), key=lambda kv: natural_key(kv[0]))
    rows = [module_row(m) for m in modules] + [tensor_row(n, t) for n, t in tensors]
    total_stored = sum(r["stored_bytes"] for r in rows)
    for r in rows:
        r["share"] = ratio(100 * r["stored_bytes"], total_stored) or 0.0
    decoded = sum(r["decoded_bytes"] for r in rows)
    return {
        "name": adapter.name,
        "base_model": adapter.base_model,
        "base_architecture": adapter.base_architecture,
        "source_format": source_format(adapter),
        "target_modules": target_modules(adapter),
        "file_metadata": file_metadata(adapter),
        "rows": rows,
        "totals": {
            "modules": len(adapter.modules),
            "tensors": len(adapter.tensors),
            "parameters": sum(r["parameters"] for r in rows),
            "decoded_bytes": decoded,
            "stored_bytes": total_stored,
            "compression_ratio": ratio(decoded, total_stored),
        },
        "skipped": list(adapter.skipped),
        "notes": notes(adapter),
        "metadata": dict(adapter.metadata),
    }


def apack_file_report(reader: Any) -> dict[str, Any]:
    """File-level facts of an open :class:`~adapterpack.container.ApackReader`."""
    blobs = reader.blobs
    blob_bytes = sum(b.stored_length for b in blobs)
    index_bytes = reader.preamble.index_length
    padding = reader.file_size - 32 - index_bytes - blob_bytes
    n = len(blobs)
    return {
        "file_size": reader.file_size,
        "format_version": reader.version,
        "writer": reader.index.raw.get("writer"),
        "index_bytes": index_bytes,  # as stored (spec §1.3: a zstd frame when index_compressed)
        "index_json_bytes": reader.index_text_length,
        "index_compressed": reader.preamble.compressed_index,
        "index_bytes_per_tensor": index_bytes / n if n else None,
        "data_start": reader.data_start,
        "blobs": n,
        "blob_bytes": blob_bytes,
        "padding_bytes": padding,
        "padding_bytes_per_tensor": padding / n if n else None,
        "packed": reader.preamble.packed,
        "codecs": dict(Counter(b.codec_id for b in blobs)),
    }


def _sum_totals(adapters: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("modules", "tensors", "parameters", "decoded_bytes", "stored_bytes")
    totals: dict[str, Any] = {k: sum(a["totals"][k] for a in adapters) for k in keys}
    totals["compression_ratio"] = ratio(totals["decoded_bytes"], totals["stored_bytes"])
    return totals


def inspect_path(
    path: str | os.PathLike[str],
    adapter: str | None = None,
    *,
    spectrum: bool = False,
    base: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Report on an .apack file (every adapter in it, or the one named), a PEFT folder or a kohya file.

    ``spectrum`` adds each adapter's per-module singular values (``"spectrum"``, see
    :func:`adapterpack.ops.spectrum.spectrum_report`); that reads the tensors (checksums verified). ``base``
    (GGUF input): the base model's GGUF file or config.json, for llama.cpp's q/k row order.
    """
    with open_adapters(path, adapter, verify=spectrum, base=base) as opened:
        report: dict[str, Any] = {"path": str(path), "format": opened.format}
        report["adapters"] = [adapter_report(a) for a in opened.adapters]
        if spectrum:
            from adapterpack.ops.spectrum import spectrum_report  # start-up: plain inspect does not import the spectrum code

            for entry, a in zip(report["adapters"], opened.adapters):
                entry["spectrum"] = spectrum_report(a)
        report["file"] = apack_file_report(opened.reader) if opened.reader is not None else {"file_size": footprint(path)}
        totals = _sum_totals(report["adapters"])
        if opened.reader is not None and adapter is None:
            totals |= _blob_totals(opened.reader)
    report["totals"] = totals
    return report


def _blob_totals(reader: Any) -> dict[str, Any]:
    """Bytes and parameters of a whole .apack from its blob table: a blob several records share
    (a bank's bases, spec/shared.md) counts once, where summing the adapters would count it per member."""
    blobs = reader.blobs
    decoded = sum(b.length for b in blobs)
    stored = sum(b.stored_length for b in blobs)
    params = sum(_numel(list(b.shape)) for b in blobs)
    return {"parameters": params, "decoded_bytes": decoded, "stored_bytes": stored, "compression_ratio": ratio(decoded, stored)}
