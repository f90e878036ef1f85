"""``--to gguf``: a llama.cpp LoRA adapter (``general.type = adapter``, ``adapter.type = lora``), LLaMA family.

What llama.cpp expects (its ``convert_lora_to_gguf.py`` and ``llama-adapter.cpp``, read for the
conventions; nothing copied):

- one f32 ``adapter.lora.alpha`` for the whole file; each tensor's scale is ``alpha / rank`` with
  the rank read from that tensor pair, and alpha 0 means scale 1 (so an alpha beyond float32's range,
  rounding to 0, or 0 itself is refused). Modules whose own scale ``s`` differs from
  ``alpha / r`` get the difference baked into B (``B' = B · s·r/alpha``, rounded once from
  float64); alpha is chosen as the most common ``s·r`` so the usual uniform adapter keeps B
  bit-exact.
- tensors ``<gguf name>.weight.lora_a`` = A ``[r, in]`` and ``.lora_b`` = B ``[out, r]`` (numpy
  order; GGUF lists dimensions reversed), GGUF names from the ``gguf`` package's own map
  (``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q``); for ``token_embd`` lora_a is Aᵀ.
- llama.cpp's converter permutes the rows of LLaMA's q_proj / k_proj weights for its rotary
  layout (per head: interleaved halves); a LoRA of those layers must see the same permutation,
  which only touches B's rows. That needs the base model's head counts: pass the base model's
  GGUF file or HF ``config.json`` (``base=``), or the counts.

Refused, with the reason: DoRA (llama.cpp has no magnitude vectors), pass-through tensors
(``modules_to_save``) unless dropped, conv / fan_in_fan_out layouts, modules with no GGUF name.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module
from adapterpack.atomic import atomic_file
from adapterpack.encodings.lower import as_lora
from adapterpack.errors import ConversionError, InputError
from adapterpack.formats.export import DROP_HINT, check_module_names, float32_alpha, scaled

#: HF architecture → llama.cpp architecture name (the ones whose converter is LLaMA's, with the q/k permutation).
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
#: GGUF output dtypes.
DTYPES = tuple(str(dtypes.by_name(n).gguf) for n in dtypes.CAST_TARGETS)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class GgufBase:
    """What the export needs to know about the base model."""

    arch: str = "llama"
    n_head: int | None = None
    n_head_kv: int | None = None


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    part = f.parts[f.data[0]]
    return bytes(part).decode() if part.dtype == np.uint8 else int(part[0])


def base_from_gguf(path: str | os.PathLike[str] | Any) -> GgufBase:
    """Architecture and head counts from a base model's GGUF file (its metadata), or from an open
    ``gguf.GGUFReader`` (parsing a file's metadata takes seconds: its tokenizer is in there)."""
    import gguf  # gguf: optional (the gguf extra)

    if isinstance(path, gguf.GGUFReader):
        r = path
    else:
        try:
            r = gguf.GGUFReader(str(path))
        except Exception as e:  # the gguf package raises ValueError / struct errors on bad files
            raise InputError(f"{path}: not a readable GGUF file ({e})") from None
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"{path}: base architecture {arch!r}; the gguf export supports llama-family models only")
    return GgufBase(arch, _field(r, f"{arch}.attention.head_count"), _field(r, f"{arch}.attention.head_count_kv"))


def base_from_config(path: str | os.PathLike[str]) -> GgufBase:
    """Architecture and head counts from a HF ``config.json`` (or the folder holding it)."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read the base model's config.json ({e})") from None
    archs = cfg.get("architectures") or []
    arch = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if arch is None:
        raise ConversionError(f"{p}: architectures {archs}; the gguf export supports {', '.join(ARCHS)}")
    n_head = cfg.get("num_attention_heads")
    return GgufBase(arch, n_head, cfg.get("num_key_value_heads", n_head))


def base_info(path: str | os.PathLike[str]) -> GgufBase:
    """:func:`base_from_gguf` for a ``.gguf`` file, else :func:`base_from_config`."""
    return base_from_gguf(path) if str(path).lower().endswith(".gguf") else base_from_config(path)


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary reordering of a q/k projection's output rows (per head, the two halves interleaved)."""
    out = rows.shape[0]
    if n_head < 1 or out % (2 * n_head):
        raise ConversionError(f"cannot split {out} output rows into {n_head} heads of two rotary halves")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _heads(name: str, base: GgufBase) -> int | None:
    """Heads to permute by for this module (None: no permutation)."""
    if base.arch != "llama":
        return None
    if name.endswith("q_proj"):
        kind, n = "q_proj", base.n_head
    elif name.endswith("k_proj"):
        kind, n = "k_proj", base.n_head_kv or base.n_head
    else:
        return None
    if not n:
        raise ConversionError(
            f"module {name!r}: llama.cpp permutes {kind} rows per attention head; give the base model "
            "(--base BASE.gguf or its config.json) so the head counts are known"
        )
    return int(n)


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int) -> Any:
    import gguf  # gguf: optional (the gguf extra)

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, n_blocks)  # builds every block's names: tens of ms, so built once


def gguf_name(name: str, arch: str, n_blocks: int) -> str | None:
    """The GGUF base-tensor name (without ``.weight``) of a HF module name, or None."""
    return _name_map(arch, n_blocks).get_name(name)


@dataclass
class GgufPlan:
    """What :func:`gguf_tensors` produced: alpha, tensors by GGUF name, and what was changed."""

    alpha: float
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    baked: list[str] = field(default_factory=list)
    permuted: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # HF module name → GGUF name


def _out_dtype(dtype: str | None, m: Module) -> str:
    if dtype is None:
        dt = dtypes.of_array(m.array("B")).name
        return dtypes.by_name(dt).gguf or "f32"  # float64 → f32
    if dtype not in DTYPES:
        raise ConversionError(f"gguf output dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def _check(adapter: Adapter, drop_tensors: bool) -> list[Module]:
    if adapter.tensors and not drop_tensors:
        some = ", ".join(list(adapter.tensors)[:3])
        raise ConversionError(
            f"adapter holds {len(adapter.tensors)} full tensors ({some}); llama.cpp LoRA files cannot ({DROP_HINT})"
        )
    check_module_names(adapter)
    mods = [as_lora(m) for m in adapter]
    if not mods:
        raise ConversionError("adapter has no modules; a llama.cpp LoRA needs at least one")
    for m in mods:
        p = m.params
        if p.get("dora"):
            raise ConversionError(
                f"module {m.name!r} is DoRA; llama.cpp has no DoRA magnitude vectors (merge it into the model instead)"
            )
        if p.get("layout", "linear") == "conv" or p.get("fan_in_fan_out"):
            raise ConversionError(f"module {m.name!r}: {p.get('layout')} / fan_in_fan_out layers do not exist in llama.cpp models")
    return mods


def gguf_tensors(
    adapter: Adapter, base: GgufBase | None = None, *, dtype: str | None = None, drop_tensors: bool = False
) -> GgufPlan:
    """The llama.cpp tensors of ``adapter`` (numpy, float32/float16/bf16-bits) and the file's alpha."""
    base = base or GgufBase()
    mods = _check(adapter, drop_tensors)
    n_blocks = 1 + max((int(g.group(1)) for m in mods if (g := _LAYER.search(m.name))), default=0)
    products = {m.name: float(m.implementation.scale(m)) * int(m.params["rank"]) for m in mods}
    common = Counter(products.values()).most_common(1)[0][0]
    first = next(n for n, p in products.items() if p == common)
    where = f"adapter {adapter.name!r} module {first!r}"
    alpha = float32_alpha(common, where, "llama.cpp")
    if alpha == 0:
        raise ConversionError(f"{where}: alpha 0 (scale 0) cannot be written: llama.cpp reads adapter.lora.alpha 0 as scale 1")
    missing = [m.name for m in mods if gguf_name(m.name, base.arch, n_blocks) is None]
    if missing:
        some = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConversionError(f"{len(missing)} module(s) have no llama.cpp tensor name in the {base.arch} architecture: {some}")
    plan = GgufPlan(alpha=alpha)
    for m in mods:
        gname = gguf_name(m.name, base.arch, n_blocks)
        assert gname is not None
        out = _out_dtype(dtype, m)
        a, b = m.array("A"), m.array("B")
        factor = products[m.name] / alpha
        if factor != 1.0:  # kept in float64: _cast rounds it once, straight to the output dtype
            b = scaled(b, factor, f"adapter {adapter.name!r} module {m.name!r}")
            plan.baked.append(m.name)
        n = _heads(m.name, base)
        if n is not None:
            b = permute_rows(b, n)
            plan.permuted.append(m.name)
        if m.params.get("layout") == "embedding":
            a = a.T
        plan.names[m.name] = gname
        plan.tensors[f"{gname}.weight.lora_a"] = _cast(a, out, m.name)
        plan.tensors[f"{gname}.weight.lora_b"] = _cast(b, out, m.name)
    return plan


def _cast(arr: np.ndarray, out: str, where: str) -> np.ndarray:
    """``arr`` in the output dtype, rounded once to nearest-even (float64 input included)."""
    name = dtypes.by_gguf(out).name
    if out == "bf16" and arr.dtype == np.float64:
        arr = dtypes.round_bf16(arr)  # ml_dtypes casts float64 to bfloat16 through float32: two roundings
    return np.ascontiguousarray(dtypes.cast_array(arr, name, f"module {where!r}")[0])


@dataclass
class GgufResult:
    """What :func:`write_gguf` wrote."""

    path: Path
    alpha: float
    tensors: int
    baked: list[str]
    permuted: list[str]

    def notes(self) -> list[str]:
        """Lines for the CLI."""
        out = [f"llama.cpp adapter: adapter.lora.alpha = {self.alpha:g}, {self.tensors} tensors"]
        if self.baked:
            out.append(
                f"{len(self.baked)} module(s) have their own scale; baked into lora_b (llama.cpp uses alpha/rank per tensor)"
            )
        if self.permuted:
            out.append(f"{len(self.permuted)} q/k module(s): lora_b rows permuted to llama.cpp's rotary layout")
        return out


def write_gguf(
    adapter: Adapter,
    dst: str | os.PathLike[str],
    *,
    base: GgufBase | str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    drop_tensors: bool = False,
    overwrite: bool = True,
) -> GgufResult:
    """Write ``adapter`` as a llama.cpp LoRA GGUF at ``dst`` (atomically; ``overwrite`` false: OutputExistsError
    if it exists). ``base`` is a :class:`GgufBase` or the path of the base model's GGUF file / config.json
    (needed for q_proj / k_proj)."""
    import gguf  # gguf: optional (the gguf extra)

    info = base if isinstance(base, GgufBase) or base is None else base_info(base)
    plan = gguf_tensors(adapter, info, dtype=dtype, drop_tensors=drop_tensors)
    from gguf.gguf_writer import WriterState  # gguf: optional, as above

    dst = Path(dst)
    w = gguf.GGUFWriter(None, (info or GgufBase()).arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    if adapter.base_model:
        w.add_string("general.base_model.0.name", str(adapter.base_model))
    for name, arr in plan.tensors.items():
        if arr.dtype == dtypes.by_name("bfloat16").numpy:
            w.add_tensor(name, arr.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, arr)
    with atomic_file(dst, overwrite=overwrite) as f:  # the same mode, fsyncs and cleanup as every other writer
        # GGUFWriter opens the path it was given; given none, it writes to the (one-shard) file list it holds
        w.fout, w.state = [f], WriterState.EMPTY
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.fout = None  # atomic_file flushes, fsyncs and closes f (GGUFWriter.close would close it first)
    return GgufResult(dst, plan.alpha, len(plan.tensors), plan.baked, plan.permuted)
