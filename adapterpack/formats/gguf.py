"""llama.cpp LoRA adapters (``general.type = adapter``, ``adapter.type = lora``), LLaMA family: written
(``--to gguf``, :func:`write_gguf`) and read (:func:`read_gguf`; ours and llama.cpp's converter's).

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

Header: ``general.name`` and ``general.base_model.count`` / ``general.base_model.0.*`` (name,
organization, version, repo_url) as llama.cpp's converter derives them from a Hugging Face id (with
the gguf package's own helpers), and, where q/k rows were permuted, the head counts under
``adapterpack.attention.*`` so our files read back without the base model.

Reading maps GGUF names back to HF module names for ``llama`` (the inverse of the writer's map),
one lora record per ``lora_a``/``lora_b`` pair with the rank read from the pair and alpha from
``adapter.lora.alpha`` (0 or missing: scale 1, as llama.cpp reads it); q/k rows are put back in
HF order when the head counts are known (``base=`` or our metadata), else reading those B factors
raises ConversionError (shapes, ranks and scales are still there for ``inspect``).

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
from adapterpack.adapter import Adapter, Module, StoredTensor
from adapterpack.atomic import atomic_file
from adapterpack.encodings.lower import as_lora
from adapterpack.errors import AdapterpackError, ConversionError, InputError, MissingDependencyError
from adapterpack.formats import source as src_
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
    #: The base GGUF's tensors (name → numpy-order shape), when known: llama.cpp refuses a LoRA pair of any other
    #: tensor or shape ("does not exist in base model" / "has incorrect shape").
    tensors: dict[str, tuple[int, ...]] | None = field(default=None, compare=False, repr=False)
    #: Tensors the base is known to lack (``output.weight`` of a config with tied embeddings).
    absent: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


def base_tensor_problem(gname: str, shape: tuple[int, ...], base: GgufBase | None) -> str | None:
    """Why llama.cpp's loader would refuse a LoRA of base tensor ``gname`` (without ``.weight``) whose ΔW has
    ``shape`` (the base weight's numpy-order shape; for ``token_embd`` vocab × embedding), or None (also when
    the base's tensors are unknown)."""
    if base is None:
        return None
    key = f"{gname}.weight"
    if key in base.absent or (base.tensors is not None and key not in base.tensors):
        tied = " (its embeddings are tied: the output layer is token_embd)" if key == "output.weight" else ""
        return f"the base model has no tensor {key!r}{tied}; llama.cpp refuses a LoRA of it"
    have = base.tensors.get(key) if base.tensors is not None else None
    if have is not None and tuple(have) != tuple(shape):
        return f"{key!r} is {list(have)} in the base model but the LoRA's ΔW is {list(shape)}; llama.cpp refuses it"
    return None


def _checked_heads(arch: str, n: Any, kv: Any, where: str) -> GgufBase:
    """A base's head counts, each absent (None) or a positive integer (not a bool); InputError otherwise."""
    for x in (n, kv):
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 1):
            raise InputError(f"{where}: attention head counts must be positive integers, got {n!r:.40} / {kv!r:.40}")
    return GgufBase(arch, n, kv)


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
    where = Path("base GGUF") if r is path else Path(path)
    arch = _value(r, "general.architecture", where)
    if arch != "llama":
        raise ConversionError(f"{where}: base architecture {arch!r:.40}; the gguf export supports llama-family models only")
    heads = (_value(r, f"{arch}.attention.{k}", where) for k in ("head_count", "head_count_kv"))
    out = _checked_heads(arch, *heads, str(where))
    out.tensors = {str(t.name): tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}  # GGUF lists dims reversed
    return out


def base_from_config(path: str | os.PathLike[str]) -> GgufBase:
    """Architecture and head counts from a HF ``config.json`` (or the folder holding it)."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: cannot read the base model's config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: a config.json must hold a JSON object, not {type(cfg).__name__}")
    archs = cfg.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    arch = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if arch is None:
        raise ConversionError(f"{p}: architectures {archs!r:.200}; the gguf export supports {', '.join(ARCHS)}")
    n_head = cfg.get("num_attention_heads")
    out = _checked_heads(arch, n_head, cfg.get("num_key_value_heads", n_head), str(p))
    if cfg.get("tie_word_embeddings") is True:  # llama.cpp's converter writes no output.weight then
        out.absent = frozenset({"output.weight"})
    return out


#: HF model class prefixes whose models llama.cpp's converter writes under the ``llama`` architecture.
_LLAMA_FAMILY = ("Llama", "Mistral", "Mixtral")


def architecture_problem(adapter: Adapter) -> str | None:
    """Why the export cannot write ``adapter`` without ``base=``: the base model class it records (a PEFT config's
    ``auto_mapping``) is not of the LLaMA family, and llama.cpp refuses a LoRA whose ``general.architecture`` is not
    its model's ("model arch and LoRA arch mismatch"). None when it is, or nothing is recorded."""
    cls = adapter.base_architecture
    if not isinstance(cls, str) or not cls or cls in ARCHS or cls.startswith(_LLAMA_FAMILY):
        return None
    return (
        f"the adapter's base model is a {cls!r:.80}; the gguf export writes LLaMA-family adapters only "
        "(llama.cpp refuses a LoRA whose architecture is not its model's)"
    )


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
def _name_map(arch: str) -> Any:
    """gguf-py's HF → GGUF name map of ``arch`` for block 0 only: other blocks are named by substituting the index
    (:func:`gguf_name`), so a hostile block index in a name costs nothing (gguf-py builds every block's names)."""
    import gguf  # gguf: optional (the gguf extra)

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, 1)


def _block(m: re.Match[str]) -> str | None:
    """The block index a name's match holds, if written the canonical way (``7``, not ``07``)."""
    i = m.group(1)
    return i if i == str(int(i)) else None


def gguf_name(name: str, arch: str) -> str | None:
    """The GGUF base-tensor name (without ``.weight``) of a HF module name, or None."""
    m = _LAYER.search(name)
    if m is None:
        return _name_map(arch).get_name(name)
    i = _block(m)
    g = _name_map(arch).get_name(f"{name[: m.start(1)]}0{name[m.end(1) :]}") if i is not None else None
    return f"blk.{i}.{g[len('blk.0.') :]}" if g is not None and g.startswith("blk.0.") else None


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
            what = "a conv layer" if p.get("layout") == "conv" else "a fan_in_fan_out (Conv1D) layer"
            raise ConversionError(f"module {m.name!r} is {what}; such layers do not exist in llama.cpp models")
    return mods


def gguf_tensors(
    adapter: Adapter, base: GgufBase | None = None, *, dtype: str | None = None, drop_tensors: bool = False
) -> GgufPlan:
    """The llama.cpp tensors of ``adapter`` (numpy, float32/float16/bf16-bits) and the file's alpha."""
    base = base or GgufBase()
    mods = _check(adapter, drop_tensors)
    products = {m.name: float(m.implementation.scale(m)) * int(m.params["rank"]) for m in mods}
    common = Counter(products.values()).most_common(1)[0][0]
    first = next(n for n, p in products.items() if p == common)
    where = f"adapter {adapter.name!r} module {first!r}"
    alpha = float32_alpha(common, where, "llama.cpp")
    if alpha == 0:
        raise ConversionError(f"{where}: alpha 0 (scale 0) cannot be written: llama.cpp reads adapter.lora.alpha 0 as scale 1")
    missing = [m.name for m in mods if gguf_name(m.name, base.arch) is None]
    if missing:
        some = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConversionError(f"{len(missing)} module(s) have no llama.cpp tensor name in the {base.arch} architecture: {some}")
    for m in mods:
        problem = base_tensor_problem(str(gguf_name(m.name, base.arch)), tuple(m.base_shape), base)
        if problem is not None:
            raise ConversionError(f"module {m.name!r}: {problem}")
    plan = GgufPlan(alpha=alpha)
    for m in mods:
        gname = gguf_name(m.name, base.arch)
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


HF_URL = "https://huggingface.co/"
#: Our head counts (written when q/k rows were permuted): the reader puts the rows back without the base model.
HEAD_COUNT, HEAD_COUNT_KV = "adapterpack.attention.head_count", "adapterpack.attention.head_count_kv"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_fields(base_model: str) -> dict[str, str]:
    """``general.base_model.0.*`` for ``base_model`` as llama.cpp's converter derives them from a model card's
    ``base_model``: for a Hugging Face id its name, organization and version in the gguf package's
    title form and the repo URL; any other string is written as the name."""
    pre = "general.base_model.0."
    try:
        from gguf.metadata import Metadata  # gguf: optional (the gguf extra); its helpers since gguf 0.10

        parts = Metadata.get_model_id_components(base_model) if _HF_ID.match(base_model) else None
    except (ImportError, AttributeError):
        parts = None
    if parts is None:
        return {pre + "name": base_model}
    name, org, _basename, _finetune, version, _size = parts
    out = {}
    if name is not None:
        out[pre + "name"] = Metadata.id_to_title(name)
    if org is not None:
        out[pre + "organization"] = Metadata.id_to_title(org)
    if version is not None:
        out[pre + "version"] = version
    out[pre + "repo_url"] = HF_URL + base_model
    return out


def header_fields(adapter: Adapter, dst: Path, heads: GgufBase | None) -> dict[str, str | int]:
    """The metadata written beside the adapter keys: ``general.name`` (the adapter's name, or the output
    file's stem for an unnamed ``default`` one), the base model, and our head counts when given."""
    out: dict[str, str | int] = {"general.name": adapter.name if adapter.name != "default" else dst.stem}
    if adapter.base_model:
        out["general.base_model.count"] = 1
        out |= base_model_fields(str(adapter.base_model))
    if heads is not None and heads.n_head:
        out[HEAD_COUNT] = int(heads.n_head)
        out[HEAD_COUNT_KV] = int(heads.n_head_kv or heads.n_head)
    return out


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
    if info is None:
        info = recorded_heads(adapter) or recorded_arch(adapter)
    if info is None and (problem := architecture_problem(adapter)) is not None:
        raise ConversionError(f"{problem}; --base BASE.gguf or config.json names a LLaMA-family base")
    plan = gguf_tensors(adapter, info, dtype=dtype, drop_tensors=drop_tensors)
    from gguf.gguf_writer import WriterState  # gguf: optional, as above

    dst = Path(dst)
    w = gguf.GGUFWriter(None, (info or GgufBase()).arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    for key, value in header_fields(adapter, dst, info if plan.permuted else None).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    alora = src_.adapter_alora_tokens(adapter)
    if alora is not None:  # as llama.cpp's converter writes PEFT's alora_invocation_tokens
        w.add_key_value(ALORA_KEY, alora, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter writes it
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


# --- reading ---------------------------------------------------------------------------------

#: HF module paths of a LLaMA block and of the model around the blocks (mapped through the gguf package's name map).
_LLAMA_BLOCK = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)
_LLAMA_TOP = ("model.embed_tokens", "lm_head", "model.norm")
_BLK = re.compile(r"^blk\.(\d+)\.")
_LORA_SUFFIXES = (".lora_a", ".lora_b")
#: GGML tensor types read as they are (numpy dtype name); quantized types are dequantized with a note.
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: llama.cpp's activated-LoRA invocation tokens (gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS).
ALORA_KEY = "adapter.alora.invocation_tokens"


@functools.lru_cache(maxsize=8)
def _hf_block0(arch: str) -> dict[str, str]:
    """GGUF base-tensor name → HF module name for block 0 and the tensors outside blocks (``llama`` only)."""
    if arch != "llama":
        return {}
    hf = [*_LLAMA_TOP, *(f"model.layers.0.{m}" for m in _LLAMA_BLOCK)]
    return {g: h for h in hf if (g := gguf_name(h, arch)) is not None}


def hf_name(gname: str, arch: str) -> str | None:
    """The HF module name of a GGUF base-tensor name (``llama`` only; None if unknown): the inverse of
    :func:`gguf_name` over LLaMA's modules, one lookup per name whatever its block index."""
    m = _BLK.match(gname)
    if m is None:
        return _hf_block0(arch).get(gname)
    i = _block(m)
    h = _hf_block0(arch).get(f"blk.0.{gname[m.end() :]}") if i is not None else None
    return f"model.layers.{i}.{h[len('model.layers.0.') :]}" if h is not None and h.startswith("model.layers.0.") else None


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`: llama.cpp's rotary row order back to HF's."""
    out = rows.shape[0]
    if n_head < 1 or out % (2 * n_head):
        raise ConversionError(f"cannot split {out} output rows into {n_head} heads of two rotary halves")
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _value(reader: Any, key: str, path: Path) -> Any:
    """A scalar or string metadata value (None when absent); InputError for an array or an undecodable string."""
    f = reader.fields.get(key)
    if f is None:
        return None
    if len(f.types) != 1 or not f.data:
        raise InputError(f"{path}: metadata {key!r} must be a single value, not an array")
    part = f.parts[f.data[0]]
    if f.types[0].name == "STRING":
        try:
            return bytes(part).decode()
        except UnicodeDecodeError:
            raise InputError(f"{path}: metadata {key!r} is not valid UTF-8") from None
    if f.types[0].name == "BOOL":
        return bool(part[0])
    return part[0].item()


def _alora_tokens(reader: Any, path: Path) -> list[int] | None:
    """``adapter.alora.invocation_tokens`` (an array of integers), or None when absent."""
    f = reader.fields.get(ALORA_KEY)
    if f is None:
        return None
    if len(f.types) != 2 or f.types[0].name != "ARRAY" or not f.types[1].name.startswith(("UINT", "INT")):
        raise InputError(f"{path}: metadata {ALORA_KEY!r} must be an array of integer token ids")
    return src_.alora_tokens([int(f.parts[i][0]) for i in f.data], f"{path}: metadata {ALORA_KEY!r}")


def _metadata(reader: Any) -> dict[str, str]:
    """Every scalar / string key-value pair of the file as text (arrays summarised), for ``inspect``."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            if len(f.types) == 1 and f.data:
                part = f.parts[f.data[0]]
                out[key] = bytes(part).decode(errors="replace") if f.types[0].name == "STRING" else str(part[0].item())
            else:
                out[key] = f"[array of {len(f.data)}]"
        except (IndexError, ValueError):
            out[key] = "(unreadable)"
    return out


def _heads_of(reader: Any, path: Path, base: GgufBase | str | os.PathLike[str] | None) -> GgufBase | None:
    if base is not None:
        return base if isinstance(base, GgufBase) else base_info(base)
    n, kv = _value(reader, HEAD_COUNT, path), _value(reader, HEAD_COUNT_KV, path)
    if n is None:
        return None
    if kv is None:
        raise InputError(f"{path}: {HEAD_COUNT} / {HEAD_COUNT_KV} must be positive integers, got {n!r:.40} / None")
    return _checked_heads("llama", n, kv, str(path))


def _array(t: Any, path: Path, notes: list[str]) -> np.ndarray:
    """A tensor's data in numpy order: float32/float16/bfloat16 as stored, quantized types dequantized to float32."""
    import gguf  # gguf: optional (the gguf extra)

    kind = gguf.GGMLQuantizationType(t.tensor_type).name
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    if kind in _PLAIN:
        data = np.asarray(t.data)
        if kind == "BF16":
            data = data.view(dtypes.by_name("bfloat16").numpy)
        return np.array(data.reshape(shape))  # a copy: the adapter does not hold the file's memory map
    try:
        out = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
    except Exception as e:  # the gguf package raises NotImplementedError / ValueError for types or sizes it cannot decode
        raise InputError(f"{path}: tensor {t.name!r} of type {kind} cannot be decoded ({type(e).__name__}: {e})") from None
    notes.append(f"{kind} tensors dequantized to float32 (llama.cpp's values, not the trained factors bit for bit)")
    return out


def read_gguf(path: str | os.PathLike[str], *, base: GgufBase | str | os.PathLike[str] | None = None) -> Adapter:
    """Read a llama.cpp LoRA GGUF (ours or llama.cpp's converter's) into an :class:`Adapter`.

    ``base`` (a :class:`GgufBase`, or the base model's GGUF file / config.json) gives the head counts that
    put q/k rows back in HF order; our own files record them. Anything that is not a readable llama.cpp
    LoRA adapter is an InputError naming what is wrong.
    """
    try:
        import gguf  # gguf: optional (the gguf extra)
    except ImportError:
        raise MissingDependencyError("reading .gguf adapters needs the gguf package: pip install 'adapterpack[gguf]'") from None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = list(reader.tensors)
    except Exception as e:  # the gguf package raises ValueError / struct / index errors on damaged files
        raise InputError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    gtype = _value(reader, "general.type", path)
    if gtype != "adapter":
        raise InputError(f"{path}: a GGUF {gtype or 'model'} file, not a llama.cpp adapter (general.type {gtype!r})")
    atype = _value(reader, "adapter.type", path)
    if atype != "lora":
        raise InputError(f"{path}: a llama.cpp {atype!r} adapter, not a LoRA (adapter.type must be 'lora')")
    arch = _value(reader, "general.architecture", path)
    if not isinstance(arch, str) or not arch:
        raise InputError(f"{path}: general.architecture is missing or not a string")
    alpha = _value(reader, "adapter.lora.alpha", path)
    alpha = 0.0 if alpha is None else alpha
    if isinstance(alpha, (bool, str)) or not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"{path}: adapter.lora.alpha must be a finite number >= 0, got {alpha!r:.40}")
    heads = _heads_of(reader, path, base) if arch == "llama" else None
    alora = _alora_tokens(reader, path)

    notes: list[str] = []
    pairs: dict[str, dict[str, Any]] = {}
    plain: dict[str, Any] = {}
    for t in tensors:
        stem, suffix = (t.name[:-7], t.name[-7:]) if t.name.endswith(_LORA_SUFFIXES) else (t.name, "")
        if not suffix:
            plain[t.name] = t
            continue
        if not stem.endswith(".weight"):
            raise InputError(f"{path}: LoRA tensor {t.name!r} does not name a base weight (<name>.weight.lora_a / .lora_b)")
        pairs.setdefault(stem[: -len(".weight")], {})[suffix] = t
    if not pairs:
        raise InputError(f"{path}: no LoRA tensors (<name>.weight.lora_a + <name>.weight.lora_b)")
    kept_gguf: list[str] = []
    mixed: list[str] = []
    adapter = Adapter(name="default")
    for gname in sorted(pairs):
        ab = pairs[gname]
        if len(ab) != 2:
            raise InputError(f"{path}: LoRA tensor pair for {gname!r} is missing {'lora_b' if '.lora_a' in ab else 'lora_a'}")
        a, b = _array(ab[".lora_a"], path, notes), _array(ab[".lora_b"], path, notes)
        if a.dtype != b.dtype:  # llama.cpp's q8_0 output keeps lora_b (rank-wide rows, not whole blocks) in F16
            mixed.append(gname)
            a, b = src_.common_float(a, b)
        if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype:
            raise InputError(
                f"{path}: {gname}: lora_a {list(a.shape)} {a.dtype} and lora_b {list(b.shape)} {b.dtype} "
                "must be 2-D tensors of one dtype"
            )
        name = hf_name(gname, arch)
        if name is None:
            name = gname
            kept_gguf.append(gname)
        embedding = gname == "token_embd"
        if embedding:
            a = np.ascontiguousarray(a.T)  # llama.cpp stores token_embd's lora_a transposed
        rank = int(a.shape[0])
        if rank < 1 or b.shape[1] != rank:
            raise InputError(f"{path}: {gname}: lora_a {list(a.shape)} and lora_b {list(b.shape)} disagree on the rank")
        base_shape = (int(a.shape[1]), int(b.shape[0])) if embedding else (int(b.shape[0]), int(a.shape[1]))
        B: Any = b
        n = _heads(name, heads) if heads is not None else None
        if n is not None:
            B = unpermute_rows(b, n)
        elif name.endswith(("q_proj", "k_proj")) and arch == "llama":
            B = _needs_base(b, name, path)
        params = {
            "rank": rank,
            "alpha": float(alpha) if alpha else float(rank),  # llama.cpp: alpha 0 means scale 1
            "rslora": False,
            "layout": "embedding" if embedding else "linear",
            "fan_in_fan_out": False,
            "dora": False,
        }
        mod = Module(name, "lora", base_shape, params, {"A": a, "B": B})
        try:
            mod.implementation.validate(mod)
        except AdapterpackError as e:
            raise InputError(f"{path}: {e}") from None
        if name in adapter.modules:
            raise InputError(f"{path}: two GGUF tensors map to the module {name!r}")
        adapter.modules[name] = mod
    for gname, t in plain.items():
        stem = gname[: -len(".weight")] if gname.endswith(".weight") else gname
        hf = hf_name(stem, arch)
        adapter.tensors[f"{hf}.weight" if hf else gname] = _array(t, path, notes)
    meta = _metadata(reader)
    adapter.base_model = _base_model(reader, path)
    if base is not None and not isinstance(base, GgufBase) and not str(base).lower().endswith(".gguf"):
        archs = _config_archs(base)
        adapter.base_architecture = archs[0] if archs else None
    if not alpha:
        notes.append("adapter.lora.alpha is 0 or missing: llama.cpp then uses scale 1 (alpha = rank per module)")
    notes += src_.mixed_dtype_note(mixed)
    if kept_gguf:
        why = f"architecture {arch!r}: only llama names map back" if arch != "llama" else "not a LLaMA module"
        notes.append(f"{len(kept_gguf)} module(s) keep llama.cpp's tensor names ({why}): " + ", ".join(kept_gguf[:3]))
    if arch == "llama" and heads is None and any(n.endswith(("q_proj", "k_proj")) for n in adapter.modules):
        notes.append(
            "q_proj / k_proj rows are in llama.cpp's rotary order and the head counts are unknown: "
            "give the base model (--base BASE.gguf or its config.json) to read those factors"
        )
    adapter.source = {"format": "gguf", "architecture": arch, "gguf_metadata": meta}
    if alora is not None:
        adapter.source["alora_invocation_tokens"] = alora
        notes.append(
            f"activated LoRA (aLoRA): it applies only from its {len(alora)} invocation token(s) on; PEFT and GGUF outputs keep "
            "them, other outputs and merge are refused"
        )
    if heads is not None and heads.n_head:
        adapter.source["head_counts"] = [int(heads.n_head), int(heads.n_head_kv or heads.n_head)]
    if notes:
        adapter.source["notes"] = list(dict.fromkeys(notes))
    return adapter


def recorded_heads(adapter: Adapter) -> GgufBase | None:
    """The head counts a GGUF import recorded (``source["head_counts"]``), so a GGUF read back writes again
    without the base model; None when absent or not two positive integers (then ``--base`` is needed)."""
    src = adapter.source if isinstance(adapter.source, dict) else {}
    hc = src.get("head_counts") if src.get("format") == "gguf" else None
    if isinstance(hc, list) and len(hc) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in hc):
        return GgufBase("llama", hc[0], hc[1])
    return None


def recorded_arch(adapter: Adapter) -> GgufBase | None:
    """The architecture of a GGUF import of another family than llama (``source["architecture"]``; its modules
    keep llama.cpp's tensor names), so that it is written back under it: llama.cpp refuses a LoRA whose
    architecture differs from the model's. None for llama, other sources, or a name the gguf package lacks."""
    import gguf  # gguf: optional (the gguf extra); write_gguf has imported it

    src = adapter.source if isinstance(adapter.source, dict) else {}
    arch = src.get("architecture") if src.get("format") == "gguf" else None
    if not isinstance(arch, str) or arch == "llama" or arch not in gguf.MODEL_ARCH_NAMES.values():
        return None
    return GgufBase(arch)


def _needs_base(b: np.ndarray, name: str, path: Path) -> StoredTensor:
    """B of a q/k module whose rotary row order cannot be undone: shape and dtype known, reading it refused."""

    def refuse() -> np.ndarray:
        raise ConversionError(
            f"{path}: module {name!r}: llama.cpp permuted its rows per attention head; give the base model "
            "(--base BASE.gguf or its config.json) so the head counts are known"
        )

    return StoredTensor(dtypes.of_array(b).name, tuple(b.shape), int(b.nbytes), "raw", refuse)


def _base_model(reader: Any, path: Path) -> str | None:
    """The base model's id: the Hugging Face id of ``general.base_model.0.repo_url``, else its name."""
    url = _value(reader, "general.base_model.0.repo_url", path)
    if isinstance(url, str) and url.startswith(HF_URL) and _HF_ID.match(url[len(HF_URL) :]):
        return url[len(HF_URL) :]
    name = _value(reader, "general.base_model.0.name", path)
    return name if isinstance(name, str) and name else None


def _config_archs(base: str | os.PathLike[str]) -> list[str]:
    p = Path(base)
    p = p / "config.json" if p.is_dir() else p
    try:
        archs = json.loads(p.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
