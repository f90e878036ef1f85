"""Stable Diffusion / Flux module names: diffusers paths ↔ kohya names.

A diffusers LoRA file names a module by its pipeline component and its path inside it
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``, ``text_encoder.text_model.
encoder.layers.0.self_attn.q_proj``). kohya's ``networks/lora.py`` writes ``<prefix>_<path with
"." replaced by "_">`` with the prefix naming the component: ``lora_unet`` (the UNet),
``lora_te`` (the only text encoder, SD 1.x/2.x) or ``lora_te1`` / ``lora_te2`` (SDXL's two),
``lora_te3`` (SD3's T5); ComfyUI reads ``lora_transformer`` for diffusers-named DiT
transformers (SD3, Flux). The underscores make the kohya name lossy: ``to_q`` and ``down_blocks``
contain underscores themselves.

:class:`NameResolver` undoes it without guessing. Given the base model's module names (a diffusers
pipeline folder's weights, or any list), a kohya name resolves only to the one module whose kohya
name it is. Without them, the path is split by a grammar: every segment must be an index or a
module attribute name diffusers' UNet2DConditionModel / CLIP text model / SD3-Flux transformer
uses (:data:`VOCAB`), and the split must be unique. kohya's SDXL files name the UNet by the original
SGM model's paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); those are split
by the SGM names and mapped through SDXL's fixed block layout (:data:`SDXL_SGM`, the layout
sd-scripts' ``library/sdxl_model_util.py`` converts by). Anything else (Flux's BFL names
``double_blocks_…``; T5) is a :class:`~adapterpack.errors.ConversionError` naming the module,
never a wrong key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from adapterpack.errors import ConversionError, InputError
from adapterpack.formats.safetensors_header import safetensors_keys

#: diffusers pipeline components a LoRA file can address, as prefixes of its keys.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
#: kohya prefix → component (longest prefixes first when matching).
KOHYA_COMPONENT = {
    "lora_unet": "unet",
    "lora_transformer": "transformer",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
_KOHYA_PREFIXES = sorted(KOHYA_COMPONENT, key=len, reverse=True)

_UNET = """down_blocks mid_block up_blocks attentions resnets transformer_blocks attn1 attn2 to_q to_k to_v to_out
ff net proj proj_in proj_out norm norm1 norm2 norm3 conv1 conv2 conv_shortcut time_emb_proj downsamplers upsamplers
conv conv_in conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding encoder_hid_proj class_embedding"""
_CLIP = """text_model embeddings token_embedding position_embedding encoder layers self_attn q_proj k_proj v_proj
out_proj layer_norm1 layer_norm2 mlp fc1 fc2 final_layer_norm text_projection"""
_TRANSFORMER = """transformer_blocks single_transformer_blocks attn to_q to_k to_v to_out add_q_proj add_k_proj
add_v_proj to_add_out ff ff_context net proj proj_mlp proj_out norm norm1 norm1_context linear x_embedder
context_embedder time_text_embed timestep_embedder guidance_embedder text_embedder linear_1 linear_2 norm_out pos_embed"""
#: Module attribute names per component: the grammar a kohya path must split into.
VOCAB: dict[str, frozenset[str]] = {
    "unet": frozenset(_UNET.split()),
    "text_encoder": frozenset(_CLIP.split()),
    "text_encoder_2": frozenset(_CLIP.split()),
    "transformer": frozenset(_TRANSFORMER.split()),
}
_SGM = """input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection op time_embed label_emb
out conv transformer_blocks attn1 attn2 to_q to_k to_v to_out ff net proj proj_in proj_out norm norm1 norm2 norm3"""
#: Module names of the original (SGM/LDM) SDXL UNet that kohya's sd-scripts trains SDXL LoRAs on.
SGM_VOCAB = frozenset(_SGM.split())
#: CLIP text models that transformers now builds without the ``text_model`` wrapper start like this;
#: kohya's names always carry ``text_model_``.
_FLAT_CLIP = ("encoder.layers.", "embeddings.", "final_layer_norm")


def split_component(name: str) -> tuple[str, str] | None:
    """``("unet", "down_blocks.0…")`` for a diffusers module name with a component prefix, else None."""
    component, dot, path = name.partition(".")
    return (component, path) if dot and path and component in COMPONENTS else None


def kohya_prefix(component: str, numbered: bool) -> str:
    """kohya's prefix for a component; ``numbered``: the adapter has a second text encoder (SDXL: te1/te2)."""
    if component == "text_encoder":
        return "lora_te1" if numbered else "lora_te"
    return {"unet": "lora_unet", "transformer": "lora_transformer", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}[
        component
    ]


def in_grammar(component: str, path: str) -> bool:
    """Whether every segment of ``path`` is an index or a :data:`VOCAB` name of ``component``."""
    vocab = VOCAB.get(component, frozenset())
    return all(seg.isdigit() or seg in vocab for seg in path.split("."))


def kohya_name_of(name: str, numbered: bool, *, any_transformer: bool = False) -> str | None:
    """kohya's name for a diffusers module name (``unet.down_blocks.0…`` → ``lora_unet_down_blocks_0…``),
    or None when ``name`` has no component prefix. A flattened CLIP path gets kohya's ``text_model_``.
    ``transformer.…`` counts as a diffusers DiT only when its path is in the grammar (GPT-2's PEFT
    names also start with ``transformer.``), unless ``any_transformer``."""
    parts = split_component(name)
    if parts is None:
        return None
    component, path = parts
    if component == "transformer" and not any_transformer and not in_grammar(component, path):
        return None
    if component.startswith("text_encoder") and path.startswith(_FLAT_CLIP):
        path = "text_model." + path
    return f"{kohya_prefix(component, numbered)}_{path.replace('.', '_')}"


def numbered_text_encoders(names: Iterable[str]) -> bool:
    """True when the names address a second or third text encoder (then kohya writes te1/te2/te3)."""
    return any((p := split_component(n)) is not None and p[0] in ("text_encoder_2", "text_encoder_3") for n in names)


def split_kohya(name: str) -> tuple[str, str] | None:
    """(component, underscored path) of a kohya name, or None when it has no known prefix."""
    for prefix in _KOHYA_PREFIXES:
        if name.startswith(prefix + "_") and len(name) > len(prefix) + 1:
            return KOHYA_COMPONENT[prefix], name[len(prefix) + 1 :]
    return None


def grammar_paths(flat: str, vocab: frozenset[str], limit: int = 2) -> list[str]:
    """Every way (up to ``limit``) to split ``flat`` at underscores into indices and ``vocab`` names."""
    tokens = flat.split("_")
    n = len(tokens)
    # a segment spans at most as many tokens as the longest vocabulary name: linear in the name's length
    longest = max((v.count("_") + 1 for v in vocab), default=1)
    # ways[i]: splits of tokens[i:], each a list of segments (at most `limit` kept)
    ways: list[list[list[str]]] = [[] for _ in range(n)] + [[[]]]
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, min(n, i + longest) + 1):
            seg = "_".join(tokens[i:j])
            if not (seg.isdigit() and j == i + 1) and seg not in vocab:
                continue
            for rest in ways[j]:
                ways[i].append([seg, *rest])
                if len(ways[i]) >= limit:
                    break
            if len(ways[i]) >= limit:
                break
    return [".".join(w) for w in ways[0]]


def _sdxl_table() -> dict[str, str]:
    """SGM module path prefix → diffusers prefix for SDXL's UNet (3 levels, 2 resnets per down level and 3 per
    up level; attention in down levels 1-2 and up levels 0-1; the resnet and embedding renames)."""
    resnet = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
              "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}  # fmt: skip
    blocks: dict[str, str] = {"middle_block.1": "mid_block.attentions.0"}
    for level in range(3):
        for j in range(2):
            blocks[f"input_blocks.{3 * level + j + 1}.0"] = f"down_blocks.{level}.resnets.{j}"
            if level > 0:
                blocks[f"input_blocks.{3 * level + j + 1}.1"] = f"down_blocks.{level}.attentions.{j}"
        for j in range(3):
            blocks[f"output_blocks.{3 * level + j}.0"] = f"up_blocks.{level}.resnets.{j}"
            if level < 2:
                blocks[f"output_blocks.{3 * level + j}.1"] = f"up_blocks.{level}.attentions.{j}"
        if level < 2:
            blocks[f"input_blocks.{3 * level + 3}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            blocks[f"output_blocks.{3 * level + 2}.2.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    for j in range(2):
        blocks[f"middle_block.{2 * j}"] = f"mid_block.resnets.{j}"
    table = {}
    for sgm, hf in blocks.items():
        if ".resnets." in hf:
            table.update({f"{sgm}.{a}": f"{hf}.{b}" for a, b in resnet.items()})
        else:
            table[sgm] = hf
    table.update({"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"})
    table.update({"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"})
    table.update({"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"})
    return table


#: SDXL's UNet: SGM path prefix → diffusers path prefix, and back.
SDXL_SGM = _sdxl_table()
SDXL_DIFFUSERS = {hf: sgm for sgm, hf in SDXL_SGM.items()}


def _swap_prefix(path: str, table: dict[str, str]) -> str | None:
    """``path`` with its longest prefix (whole segments) found in ``table`` replaced, or None."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def sdxl_diffusers_path(sgm: str) -> str | None:
    """The diffusers UNet path of an SDXL SGM path (``input_blocks.4.1.proj_in`` → ``down_blocks.1.attentions.0.proj_in``)."""
    hf = _swap_prefix(sgm, SDXL_SGM)
    return hf if hf is not None and in_grammar("unet", hf) else None


def sdxl_sgm_path(path: str) -> str | None:
    """The SGM path of an SDXL diffusers UNet path, or None when it has none."""
    return _swap_prefix(path, SDXL_DIFFUSERS)


class NameResolver:
    """kohya names → diffusers module names (``component.path``), exactly or not at all.

    ``modules``: the base model's module names with component prefixes (``unet.conv_in``, ...);
    when given, they are the only answers. Otherwise :func:`grammar_paths` must give one split.
    """

    def __init__(self, modules: Iterable[str] | None = None) -> None:
        self.known: dict[str, list[str]] | None = None
        if modules is not None:
            names = [m for m in modules if split_component(m) is not None]
            numbered = numbered_text_encoders(names)
            self.known = {}
            for m in names:
                k = kohya_name_of(m, numbered, any_transformer=True)
                assert k is not None
                self.known.setdefault(k, []).append(m)
                sgm = sdxl_sgm_path(m[len("unet.") :]) if m.startswith("unet.") else None
                if sgm is not None:  # kohya's SDXL files name the UNet's modules by its SGM paths
                    self.known.setdefault(f"lora_unet_{sgm.replace('.', '_')}", []).append(m)
                if k.startswith("lora_te1_"):  # SD 1.x files say lora_te_ for the same encoder
                    self.known.setdefault("lora_te_" + k[len("lora_te1_") :], []).append(m)
                elif k.startswith("lora_te_"):
                    self.known.setdefault("lora_te1_" + k[len("lora_te_") :], []).append(m)

    def resolve(self, kohya: str) -> str:
        """The diffusers module name of ``kohya``; ConversionError when none or several fit."""
        parts = split_kohya(kohya)
        if parts is None:
            raise ConversionError(
                f"module {kohya!r}: not a kohya Stable Diffusion name (prefix lora_unet_, lora_te_, lora_te1_/2_/3_ "
                "or lora_transformer_); no diffusers name for it"
            )
        component, flat = parts
        if self.known is not None:
            hits = sorted(set(self.known.get(kohya, [])))
            if len(hits) == 1:
                return hits[0]
            if not hits:
                raise ConversionError(f"module {kohya!r}: the base model has no module with this kohya name")
            raise ConversionError(f"module {kohya!r}: several base model modules have this kohya name: {', '.join(hits[:3])}")
        vocab = VOCAB.get(component)
        if vocab is None:
            raise ConversionError(
                f"module {kohya!r}: {component} names (T5) are not mapped without the base model's module names (--base)"
            )
        paths = grammar_paths(flat, vocab)
        if not paths and component == "unet":  # kohya's SDXL: SGM names, mapped by SDXL's fixed layout
            paths = sorted({p for g in grammar_paths(flat, SGM_VOCAB, limit=8) if (p := sdxl_diffusers_path(g)) is not None})
        if len(paths) == 1:
            return f"{component}.{paths[0]}"
        if not paths:
            raise ConversionError(
                f"module {kohya!r}: {flat!r} is not a diffusers {component} module path nor an SDXL UNet one (Flux's "
                "original names are not mapped); pass the base model (--base) to resolve names"
            )
        raise ConversionError(f"module {kohya!r}: ambiguous, {paths[0]!r} or {paths[1]!r}; pass the base model (--base)")


def pipeline_modules(base: str | os.PathLike[str]) -> list[str]:
    """Module names (``component.path``) of a diffusers pipeline folder, from its components'
    ``*.safetensors`` headers (``<path>.weight`` keys); nothing else is read."""
    root = Path(base)
    if not root.is_dir() or not (root / "model_index.json").is_file():
        raise InputError(f"{root}: not a diffusers pipeline folder (no model_index.json)")
    names: list[str] = []
    for component in COMPONENTS:
        for f in sorted((root / component).glob("*.safetensors")) if (root / component).is_dir() else []:
            names += [f"{component}.{k[: -len('.weight')]}" for k in safetensors_keys(f) if k.endswith(".weight")]
    if not names:
        raise InputError(f"{root}: no component weights (*.safetensors under {', '.join(COMPONENTS)})")
    return names


def pattern(path: str) -> str:
    """A PEFT rank/alpha pattern that matches exactly the module ``path`` of a component (the ``^``
    anchor, PEFT >= 0.15, as diffusers writes them); a CLIP path's ``text_model.`` is optional
    because recent transformers build CLIP text models without that wrapper."""
    if path.startswith("text_model."):
        return r"^(?:text_model\.)?" + re.escape(path[len("text_model.") :])
    return "^" + re.escape(path)
