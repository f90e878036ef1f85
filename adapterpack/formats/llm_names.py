"""kohya names of LLM modules → the base model's dotted module names, exactly or not at all.

A kohya name is ``<prefix>_<module path with "." replaced by "_">`` (``lora_te_model_layers_0_self_attn_q_proj``),
which cannot be undone by itself: ``self_attn`` and ``q_proj`` hold underscores too. PEFT matches adapter keys to
the model's module names, so a PEFT folder keeping kohya names attaches to nothing. We resolve a name

- from the base model's own module names (:func:`base_modules`: a model folder's ``*.safetensors`` headers, one
  ``.safetensors`` file, or a ``config.json`` expanded by its architecture's grammar), where it must match one; or
- by the module grammar of the architectures we know (:data:`GRAMMARS`: LLaMA-like, GPT-2, BERT), where exactly
  one split must fit.

Anything else is refused (ConversionError), naming the module. :func:`impossible_names` is the check's side: the
module names no base model of those grammars (or the given base model) can have.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from adapterpack.adapter import Adapter
from adapterpack.errors import ConversionError, InputError
from adapterpack.formats import source as src_
from adapterpack.formats.safetensors_header import safetensors_keys
from adapterpack.limits import MAX_MODEL_LAYERS

#: The prefixes kohya-style trainers put before a module path (longest first).
KOHYA_PREFIXES = ("lora_transformer_", "lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_")

_LLAMA_BLOCK = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
_GPT2_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
_BERT_BLOCK = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense"]  # fmt: skip

#: family → (prefix of the base model inside the task model, blocks path, per-block modules, other modules).
GRAMMARS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "llama": ("model.", "layers", _LLAMA_BLOCK, ["embed_tokens"]),
    "gpt2": ("transformer.", "h", _GPT2_BLOCK, ["wte", "wpe"]),
    "bert": ("bert.", "encoder.layer", _BERT_BLOCK, ["embeddings.word_embeddings", "pooler.dense"]),
}
#: Task heads outside the base model (the same in every family).
HEADS = ["lm_head"]
FAMILY_NAMES = {"llama": "LLaMA-like", "gpt2": "GPT-2", "bert": "BERT"}


#: Model types (``<type>ForCausalLM`` / ``<type>Model``) whose module names follow the LLaMA grammar.
LLAMA_LIKE = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Olmo", "Olmo2", "SmolLM3", "Granite")


def _family(architectures: list[str]) -> str | None:
    for a in architectures:
        if a.startswith("GPT2"):
            return "gpt2"
        if a.startswith("Bert"):
            return "bert"
        if a.removesuffix("ForCausalLM").removesuffix("Model") in LLAMA_LIKE:
            return "llama"
    return None


def _templates() -> list[tuple[str, str]]:
    """(family, dotted template with ``{N}``) for every module the grammars know, with and without the prefix."""
    out = []
    for fam, (prefix, blocks, block, other) in GRAMMARS.items():
        for p in (prefix, ""):
            out += [(fam, f"{p}{blocks}.{{N}}.{m}") for m in block] + [(fam, f"{p}{m}") for m in other]
        out += [(fam, h) for h in HEADS]
    return out


_FLAT = [(fam, t, re.compile(re.escape(t.replace(".", "_")).replace(r"\{N\}", r"(\d+)"))) for fam, t in _templates()]


def grammar_names(flat: str) -> list[str]:
    """The dotted module names whose underscore form is ``flat``, by the known grammars (sorted, distinct)."""
    hits = set()
    for _fam, template, rx in _FLAT:
        m = rx.fullmatch(flat)
        if m:
            hits.add(template.replace("{N}", m.group(1)) if m.groups() else template)
    return sorted(hits)


def strip_kohya(name: str) -> list[str]:
    """The module paths (underscored) ``name`` can hold after a kohya prefix; empty when it has none."""
    return [name[len(p) :] for p in KOHYA_PREFIXES if name.startswith(p) and len(name) > len(p)]


def is_kohya_name(name: str) -> bool:
    """A name without dots and with a kohya prefix: a kohya name, not a module path."""
    return "." not in name and bool(strip_kohya(name))


def modules_from_config(path: Path) -> list[str]:
    """The LoRA-able module names of a HF ``config.json``'s model, by its architecture's grammar and layer count."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the base model's config.json ({e})") from None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    fam = _family(archs)
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > MAX_MODEL_LAYERS:
        raise InputError(f"{path}: {layers} layers is over the {MAX_MODEL_LAYERS}-layer limit for a base model's config.json")
    if fam is None or not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise ConversionError(
            f"{path}: architectures {archs} with {layers!r} layers: module names are listed only for LLaMA-like, GPT-2 and "
            "BERT models; pass the model folder (its *.safetensors) instead"
        )
    prefix, blocks, block, other = GRAMMARS[fam]
    task = any(not a.endswith("Model") or a.endswith("LMHeadModel") for a in archs)
    p = prefix if task else ""
    names = [f"{p}{blocks}.{i}.{m}" for i in range(layers) for m in block] + [f"{p}{m}" for m in other]
    return names + (HEADS if task else [])


def base_modules(base: str | os.PathLike[str]) -> list[str]:
    """The module names of a base model: the ``<module>.weight`` keys of a model folder's ``*.safetensors`` (headers
    only) or of one ``.safetensors`` file; a ``config.json`` (or a folder with only that) by :func:`modules_from_config`."""
    p = Path(base)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix.lower() == ".safetensors" else []
    if files:
        names = [k[: -len(".weight")] for f in files for k in safetensors_keys(f) if k.endswith(".weight")]
        if not names:
            raise InputError(f"{p}: no <module>.weight tensors in {', '.join(f.name for f in files)}")
        cfg = p / "config.json"
        if p.is_dir() and cfg.is_file() and "lm_head" not in names:  # tied embeddings: lm_head is not saved
            try:
                archs = json.loads(cfg.read_text()).get("architectures") or []
            except (OSError, ValueError, AttributeError):
                archs = []
            if isinstance(archs, list) and any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
                names += HEADS
        return names
    cfg = p / "config.json" if p.is_dir() else p
    if cfg.name.endswith(".json") and cfg.is_file():
        return modules_from_config(cfg)
    raise InputError(f"{p}: not a base model folder, .safetensors file or config.json (the model's module names)")


class LlmNameResolver:
    """kohya names → module names: from ``modules`` (the base model's) when given, else by :data:`GRAMMARS`."""

    def __init__(self, modules: Iterable[str] | None = None) -> None:
        self.known: dict[str, list[str]] | None = None
        if modules is not None:
            self.known = {}
            for m in dict.fromkeys(modules):
                self.known.setdefault(m.replace(".", "_"), []).append(m)

    def candidates(self, name: str) -> list[str]:
        """Every module name ``name`` (a kohya name) can stand for."""
        hits: set[str] = set()
        for flat in strip_kohya(name):
            hits.update(self.known.get(flat, []) if self.known is not None else grammar_names(flat))
        return sorted(hits)

    def resolve(self, name: str) -> str:
        """The one module name of the kohya name ``name``; ConversionError when none or several fit."""
        hits = self.candidates(name)
        if len(hits) == 1:
            return hits[0]
        where = "none of the base model's modules" if self.known is not None else "no LLaMA-like, GPT-2 or BERT module path"
        if not hits:
            more = "" if self.known is not None else "; pass the base model (--base: its folder or config.json)"
            more += "; a Stable Diffusion LoRA converts to diffusers output (pytorch_lora_weights.safetensors)"
            raise ConversionError(f"module {name!r}: a kohya name that matches {where}{more}")
        raise ConversionError(f"module {name!r}: a kohya name matching several module names: {', '.join(hits[:3])}; pass --base")


def resolve_kohya_names(adapter: Adapter, modules: Iterable[str] | None = None) -> tuple[Adapter, list[str]]:
    """``adapter`` with every kohya-named module (:func:`is_kohya_name`) renamed to its module name, and a note;
    the adapter itself when there are none. ConversionError (naming every module that fails) otherwise."""
    todo = [n for n in adapter.modules if is_kohya_name(n)]
    if not todo:
        return adapter, []
    resolver = LlmNameResolver(modules)
    names, errors = {}, []
    for n in todo:
        try:
            names[n] = resolver.resolve(n)
        except ConversionError as e:
            errors.append(str(e))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConversionError(f"{len(errors)} kohya module name(s) cannot be turned into module names: {errors[0]}{more}")
    taken = {n for n in adapter.modules if n not in names}
    clash = sorted({v for v in names.values() if v in taken} | {v for v in names.values() if list(names.values()).count(v) > 1})
    if clash:
        raise ConversionError(f"kohya names resolve to module names the adapter already has: {', '.join(clash[:3])}")
    modules_out = {names.get(n, n): replace(m, name=names.get(n, n)) for n, m in adapter.modules.items()}
    source = adapter.source
    kohya = src_.provenance(adapter, "kohya")
    if kohya:  # a kohya export restores the original names
        recorded = dict(src_.str_map(adapter, kohya, "kohya_names"))
        recorded.update({new: old for old, new in names.items()})
        source = {**kohya, "kohya_names": recorded}
        for key in ("no_alpha",):
            if isinstance(kohya.get(key), list):
                source[key] = [names.get(n, n) for n in kohya[key]]
        if isinstance(kohya.get("alpha_tensors"), dict):
            source["alpha_tensors"] = {names.get(n, n): v for n, v in kohya["alpha_tensors"].items()}
    how = "the base model's module names" if modules is not None else "the LLaMA-like / GPT-2 / BERT module grammar"
    first = next(iter(names))
    note = f"{len(names)} kohya module names resolved by {how}, e.g. {first!r} -> {names[first]!r}"
    return replace(adapter, modules=modules_out, source=source, closer=None), [note]


def impossible_names(names: Iterable[str], modules: Iterable[str] | None = None) -> dict[str, str]:
    """The module names a model cannot have, each with why: with ``modules`` (the base model's), every name not
    among them; without, kohya names (no model's module path has a kohya prefix and no dot)."""
    out: dict[str, str] = {}
    known = set(modules) if modules is not None else None
    resolver = LlmNameResolver(known)
    for n in names:
        if known is not None and n in known:
            continue
        kohya = is_kohya_name(n)
        if known is None and not kohya:
            continue
        hits = resolver.candidates(n) if kohya else []
        if hits:
            out[n] = f"a kohya name (for {' or '.join(hits[:2])}), not a module path"
        elif kohya:
            out[n] = "a kohya name, not a module path"
        else:
            out[n] = "not a module of the base model"
    return out
