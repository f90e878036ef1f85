"""What each serving stack would refuse or misread in an adapter, and the fix the converter applies.

:func:`check` lists :class:`Finding` s for one target:

- ``vllm``: refuses DoRA, ``modules_to_save`` (full tensors), architectures it serves without LoRA
  (:mod:`.vllm_models`) and ranks above ``--max-lora-rank`` (one of :data:`VLLM_RANKS`, default
  :data:`VLLM_DEFAULT_MAX_RANK`); reads ONE ``r`` / ``lora_alpha`` from adapter_config.json and ignores
  ``rank_pattern`` / ``alpha_pattern``, so per-module alphas (or ranks under one alpha) get the wrong scale.
  What vLLM's loader does (vllm/lora): ``PEFTHelper`` (peft_helper.py) computes one
  ``vllm_lora_scaling_factor = lora_alpha / r`` (``/ sqrt(r)`` with use_rslora) and ``validate_legal``
  compares only the config's ``r`` with ``max_lora_rank``; ``LoRALayerWeights.from_config`` gives every
  module that factor and ``optimize()`` multiplies it into ``lora_b`` (lora_weights.py); each layer's
  ``set_lora`` (layers/base_linear.py, column_parallel_linear.py) zeroes its ``max_lora_rank`` slot and copies
  the tensors in by their own shape (``lora_a_stacked[...][:, :lora_a.shape[0], :lora_a.shape[1]]``), so a
  module keeps its own rank. Fix (:func:`to_vllm`): each module's own scale baked into B where it differs
  from the one ``lora_alpha / r``, ranks kept (no padding), ``r`` = the largest rank (vLLM's own check then
  speaks for every module), ``rank_pattern`` / ``alpha_pattern`` kept for PEFT with the same scale; above
  the allowed maximum, the module is re-ranked down by truncated SVD (lossy, the relative ΔW error is reported).
- ``peft``: loads everything adapterpack writes (``rank_pattern`` / ``alpha_pattern``); non-lora
  records are lowered to lora exactly, full tensors of a non-PEFT origin need dropping, modules
  that keep kohya names attach to nothing.
- ``llama.cpp``: see :mod:`adapterpack.formats.gguf` (one alpha per file, q/k row permutation, no DoRA).
- ``kohya``: per-module alpha (exact), no rsLoRA (alpha rescaled exactly), no DoRA, embeddings
  and fan_in_fan_out layers stored transposed.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module
from adapterpack.encodings.lower import as_lora, at_rank, main_dtype
from adapterpack.errors import AdapterpackError, ConversionError
from adapterpack.formats import read_any
from adapterpack.formats import source as src_
from adapterpack.formats.export import DROP_HINT, check_key, float32_alpha, scaled
from adapterpack.formats.gguf import (
    GgufBase,
    architecture_problem,
    base_info,
    base_tensor_problem,
    gguf_name,
    recorded_arch,
    recorded_heads,
)
from adapterpack.formats.kohya import kohya_alpha
from adapterpack.formats.llm_names import base_modules, impossible_names, is_kohya_name
from adapterpack.formats.peft import check_module_path, model_card, peft_config, pipeline_modules, write_peft
from adapterpack.formats.vllm_models import vllm_lora_support
from adapterpack.linalg.cast import delta_error
from adapterpack.names import check_name

TARGETS = ("vllm", "peft", "llama.cpp", "kohya")
#: The values vLLM accepts for ``--max-lora-rank``.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM's default ``--max-lora-rank`` (``LoRAConfig.max_lora_rank``).
VLLM_DEFAULT_MAX_RANK = 16
#: ``refuse``: the stack raises; ``misread``: it loads and computes something else; ``note``: handled, worth knowing.
SEVERITIES = ("refuse", "misread", "note")


@dataclass
class Finding:
    """One thing a stack would refuse or misread (or a note), the modules concerned, and the fix."""

    target: str
    severity: str
    problem: str
    fix: str
    modules: list[str]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def _lora_facts(m: Module) -> tuple[int, float, bool, str, bool]:
    """(rank, scale, dora, layout, fan_in_fan_out) of any record (lowered view for non-lora)."""
    if m.encoding == "lora":
        p = m.params
        return (
            int(p["rank"]),
            float(m.implementation.scale(m)),
            bool(p.get("dora")),
            p.get("layout", "linear"),
            bool(p.get("fan_in_fan_out")),
        )
    s = m.summary()
    return (
        int(s.get("rank", 0)),
        float(s.get("scale", 1.0)),
        False,
        m.params.get("layout", "linear"),
        bool(m.params.get("fan_in_fan_out")),
    )


def next_vllm_rank(rank: int) -> int | None:
    """The smallest rank vLLM accepts that is >= ``rank`` (None above 512)."""
    return next((r for r in VLLM_RANKS if r >= rank), None)


def _common(adapter: Adapter, target: str, own: tuple[str | None, ...]) -> list[Finding]:
    out = []
    lowered = [m.name for m in adapter if m.encoding != "lora"]
    if lowered:
        encs = sorted({adapter.modules[n].encoding for n in lowered})
        out.append(
            Finding(
                target,
                "note",
                f"records of encoding {', '.join(encs)}: the stack knows only LoRA factors",
                "lowered to equivalent lora factors (exact up to the output dtype's rounding)",
                lowered,
            )
        )
    fmt = adapter.source.get("format") if isinstance(adapter.source, dict) else None
    if adapter.tensors and fmt not in own:
        out.append(
            Finding(
                target,
                "refuse",
                f"{len(adapter.tensors)} full tensors besides LoRA factors (modules_to_save / unknown keys)",
                f"dropped on request ({DROP_HINT}); the behaviour they carried is lost",
                list(adapter.tensors),
            )
        )
    return out


def _dora(out: list[Finding], target: str, facts: dict[str, tuple[Any, ...]], why: str, fix: str) -> None:
    """Add the refusal of DoRA modules (``facts`` from :func:`_lora_facts`) when there are any."""
    dora = [n for n, f in facts.items() if f[2]]
    if dora:
        out.append(Finding(target, "refuse", f"DoRA: {why}", fix, dora))


#: The adapter_config.json keys vLLM's PEFTHelper refuses a folder without.
VLLM_REQUIRED = ("r", "lora_alpha", "target_modules")
#: The problem line of a finding about those keys starts so (to_vllm rebuilds the config: it writes them).
LACKS = "adapter_config.json lacks"


def _check_vllm(adapter: Adapter, max_lora_rank: int | None) -> list[Finding]:
    t = "vllm"
    out = _common(adapter, t, own=())
    facts = {m.name: _lora_facts(m) for m in adapter}
    _dora(
        out,
        t,
        facts,
        "vLLM does not support the magnitude vector",
        "none lossless: merge the adapter into the base weights (adapterpack.torch.apply, merge=True)",
    )
    conv = [n for n, f in facts.items() if f[3] == "conv"]
    if conv:
        out.append(Finding(t, "refuse", "convolution layers: vLLM has no conv LoRA", "none", conv))
    try:
        own = src_.config(adapter, src_.provenance(adapter, "peft"))
    except AdapterpackError:
        own = None
    lacks = [k for k in VLLM_REQUIRED if own is not None and k not in own]
    if lacks:
        out.append(
            Finding(
                t,
                "refuse",
                f"{LACKS} {', '.join(lacks)}: vLLM's PEFTHelper requires {', '.join(VLLM_REQUIRED)}",
                "adapterpack convert SRC DST --to peft --target vllm (the config is rebuilt with every field)",
                [],
            )
        )
    ranks = {n: f[0] for n, f in facts.items()}
    limit = max_lora_rank or VLLM_RANKS[-1]
    if max_lora_rank is not None and max_lora_rank not in VLLM_RANKS:
        out.append(
            Finding(
                t,
                "refuse",
                f"--max-lora-rank {max_lora_rank} is not one vLLM accepts ({VLLM_RANKS})",
                f"use {next_vllm_rank(max_lora_rank) or VLLM_RANKS[-1]}",
                [],
            )
        )
    big = [n for n, r in ranks.items() if r > limit]
    if big:
        out.append(
            Finding(
                t,
                "refuse",
                f"rank above max_lora_rank {limit} (largest {max(ranks.values())})",
                f"re-ranked down to {limit} by truncated SVD (lossy; the export reports each module's ΔW error)",
                big,
            )
        )
    top = max(ranks.values(), default=0)
    if max_lora_rank is None and VLLM_DEFAULT_MAX_RANK < top <= limit:
        out.append(
            Finding(
                t,
                "note",
                f"rank {top} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}",
                f"serve with --max-lora-rank {next_vllm_rank(top)}",
                [],
            )
        )
    wrong = _vllm_misscaled(adapter, facts)
    if wrong:
        out.append(
            Finding(
                t,
                "misread",
                "per-module scales: vLLM applies one lora_alpha / r to every module and ignores rank_pattern / alpha_pattern, "
                "so these modules would get the wrong scale",
                "each module's scale baked into lora_B (exact up to the factors' rounding); ranks kept",
                wrong,
            )
        )
    support = vllm_lora_support(adapter.base_architecture)
    if support is False:
        why = f"vLLM runs {adapter.base_architecture} without LoRA support"
        out.append(Finding(t, "refuse", why, "none: merge the adapter into the base weights", []))
    elif support is None and adapter.base_architecture:
        out.append(
            Finding(
                t,
                "note",
                f"{adapter.base_architecture} is not in vLLM's model table",
                "it may run through vLLM's Transformers backend; try it",
                [],
            )
        )
    return out


def _vllm_misscaled(adapter: Adapter, facts: dict[str, tuple[Any, ...]]) -> list[str]:
    """The modules whose scale differs from the one scale vLLM would apply to the PEFT folder this adapter
    is (or exports to): ``lora_alpha / r`` of its adapter_config.json (``/ sqrt(r)`` with use_rslora).
    Without such a config (mixed rsLoRA), the modules off the commonest scale."""
    try:
        common = vllm_scale(peft_config(adapter))
    except AdapterpackError:
        common = Counter(f[1] for f in facts.values()).most_common(1)[0][0] if facts else 0.0
    return sorted(n for n, f in facts.items() if not math.isclose(f[1], common, rel_tol=1e-12, abs_tol=0.0))


def _check_peft(adapter: Adapter) -> list[Finding]:
    t = "peft"
    out = _common(adapter, t, own=(None, "peft"))
    facts = {m.name: _lora_facts(m) for m in adapter}
    rs = [m.name for m in adapter if m.encoding == "lora" and m.params.get("rslora")]
    if rs and len(rs) < len(adapter.modules):
        out.append(
            Finding(
                t,
                "refuse",
                "some modules use rsLoRA and some do not: PEFT has one use_rslora switch per adapter",
                "none in the PEFT export; --target vllm bakes every module's scale into B instead",
                rs,
            )
        )
    piped = pipeline_modules(adapter)
    if piped:
        out.append(
            Finding(
                t,
                "misread",
                "module names carry a diffusers pipeline component (unet., text_encoder., ...): PEFT keys are relative to "
                "the one model PeftModel loads onto, so no key attaches and the adapter loads as a no-op",
                "none in the PEFT export; --to diffusers writes what pipe.load_lora_weights loads",
                piped,
            )
        )
    dora = [n for n, f in facts.items() if f[2]]
    if dora and len(dora) < len(facts):
        out.append(
            Finding(
                t,
                "refuse",
                "some modules use DoRA and some do not: PEFT has one use_dora switch per adapter",
                "none in the PEFT export; merge the adapter into the base weights instead",
                dora,
            )
        )
    if len({f[0] for f in facts.values()}) > 1 or len({f[1] for f in facts.values()}) > 1:
        out.append(
            Finding(t, "note", "per-module ranks or alphas", "written as rank_pattern / alpha_pattern, which PEFT reads", [])
        )
    return out


def _check_llama_cpp(adapter: Adapter, base: Any) -> list[Finding]:
    t = "llama.cpp"
    out = _common(adapter, t, own=())
    facts = {m.name: _lora_facts(m) for m in adapter}
    _dora(out, t, facts, "llama.cpp LoRA files have no magnitude vectors", "none lossless: merge into the base model instead")
    odd = [n for n, f in facts.items() if f[3] == "conv" or f[4]]
    if odd:
        out.append(Finding(t, "refuse", "conv / fan_in_fan_out layers do not exist in llama.cpp models", "none", odd))
    info = base if isinstance(base, GgufBase) else (recorded_heads(adapter) or recorded_arch(adapter))
    if info is None and (problem := architecture_problem(adapter)) is not None:
        out.append(Finding(t, "refuse", problem, "none: llama.cpp runs this model under another architecture", []))
    info = info or GgufBase()
    unnamed = [n for n in facts if gguf_name(n, info.arch) is None]
    if unnamed:
        out.append(Finding(t, "refuse", f"no llama.cpp tensor name for these modules ({info.arch})", "none", unnamed))
    shapes = {m.name: tuple(m.base_shape) for m in adapter}
    named = [n for n in facts if n not in unnamed]
    wrong = {n: p for n in named if (p := base_tensor_problem(str(gguf_name(n, info.arch)), shapes[n], info)) is not None}
    if wrong:
        first = next(iter(wrong.values()))
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        out.append(Finding(t, "refuse", f"{first}{more}", "none: a LoRA of this base model's tensors only", list(wrong)))
    prods = {n: f[1] * f[0] for n, f in facts.items()}
    if prods:  # the file's one alpha, as the writer picks it (gguf_tensors)
        common = Counter(prods.values()).most_common(1)[0][0]
        first = next(n for n, p in prods.items() if p == common)
        why = _alpha_problem(common, "llama.cpp", "llama.cpp reads adapter.lora.alpha 0 as scale 1")
        if why is not None:
            out.append(Finding(t, "refuse", f"the file's one alpha (scale × rank of most modules): {why}", "none", [first]))
    if len(set(prods.values())) > 1:
        common = Counter(prods.values()).most_common(1)[0][0]
        out.append(
            Finding(
                t,
                "misread",
                "one adapter.lora.alpha per file: llama.cpp scales every tensor by alpha/rank, so "
                "modules with their own rank/alpha would get the wrong scale",
                f"alpha = {common:g}; the other modules' scale baked into lora_b (exact up to float32 rounding)",
                sorted(n for n, p in prods.items() if p != common),
            )
        )
    qk = [n for n in facts if n.endswith(("q_proj", "k_proj"))]
    if qk:
        have = info.n_head is not None
        out.append(
            Finding(
                t,
                "note" if have else "misread",
                "q_proj / k_proj: llama.cpp stores these rows permuted for its rotary layout (unpermuted factors are misread)",
                "lora_b rows permuted the same way" + ("" if have else "; needs the base model's head counts (--base)"),
                qk,
            )
        )
    return out


def _alpha_problem(value: float, reader: str, zero: str) -> str | None:
    """Why an export refuses ``value`` as an alpha ``reader`` reads as float32 (:func:`~.export.float32_alpha`, and
    0 that it reads as "no alpha": ``zero`` says what it does then), or None."""
    if value == 0:
        return f"alpha 0 (scale 0) cannot be written: {zero}"
    try:
        float32_alpha(value, "alpha", reader)
    except ConversionError as e:
        return str(e).removeprefix("alpha: ")
    return None


def _check_kohya(adapter: Adapter) -> list[Finding]:
    t = "kohya"
    out = _common(adapter, t, own=("kohya",))
    facts = {m.name: _lora_facts(m) for m in adapter}
    bad: dict[str, str] = {}
    for m in adapter:
        if m.encoding == "lora":  # other encodings are lowered to alpha = rank
            p = m.params
            value = kohya_alpha(p["alpha"], int(p["rank"]), bool(p.get("rslora", False)))
            if (why := _alpha_problem(value, "kohya's loaders", "kohya's loaders read alpha 0 as alpha = rank")) is not None:
                bad[m.name] = why
    if bad:
        first = next(iter(bad.values()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        out.append(Finding(t, "refuse", f"{first}{more}", "none", list(bad)))
    _dora(out, t, facts, "kohya/LyCORIS dora_scale normalises along another axis than PEFT's magnitude", "none")
    rs = [m.name for m in adapter if m.encoding == "lora" and m.params.get("rslora")]
    if rs:
        out.append(
            Finding(t, "note", "rsLoRA: kohya scales by alpha/r, not alpha/sqrt(r)", "alpha written as alpha·sqrt(r) (exact)", rs)
        )
    tr = [n for n, f in facts.items() if f[3] == "embedding" or f[4]]
    if tr:
        out.append(
            Finding(
                t,
                "note",
                "embedding / fan_in_fan_out layers: kohya adds lora_up·lora_down in the weight's layout",
                "lora_up = Aᵀ, lora_down = Bᵀ (exact); metadata records it for the way back",
                tr,
            )
        )
    attn = [n for n in facts if n.startswith(("unet.", "text_encoder")) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    if attn and len({round(f[1] * f[0], 12) for f in facts.values()}) > 1:
        out.append(
            Finding(
                t,
                "note",
                "diffusers' own kohya loader (pipe.load_lora_weights on this file, diffusers 0.42) misnames the alphas of "
                "attention layers and gives them the commonest alpha when the alphas differ",
                "kohya's loaders read them right; for diffusers write --to diffusers (every module's scale exact)",
                attn,
            )
        )
    return out


def _names(adapter: Adapter, target: str) -> list[Finding]:
    """The module and tensor names the PEFT (vLLM) or kohya writer refuses, by the writer's own checks
    (:func:`~adapterpack.names.check_name`, :func:`~.export.check_key`, PEFT's :func:`~.peft.check_module_path`),
    applied to the names alone: no tensor is read."""
    def refusal(name: str, what: str) -> str | None:
        try:
            check_name(name, what, ConversionError)
            check_key(name, f"{what} name")
            if target != "kohya" and what == "module":
                check_module_path(name, name)
        except ConversionError as e:
            return str(e)
        return None

    found = {n: p for n in adapter.modules if (p := refusal(n, "module")) is not None}
    found |= {n: p for n in adapter.tensors if (p := refusal(n, "tensor")) is not None}
    if not found:
        return []
    first = next(iter(found.values()))
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return [Finding(target, "refuse", f"names the export refuses: {first}{more}", "none: rename them", list(found))]


#: The problem line of a modules_to_save finding starts so (to_vllm leaves modules_to_save out of its config).
SAVED = "modules_to_save"


def saved_modules(adapter: Adapter) -> tuple[list[str], list[str]]:
    """(``modules_to_save`` of the adapter's PEFT config, those of them no tensor of the adapter belongs to).

    A tensor ``<prefix><module path>.<param>`` belongs to a listed name when the module path is that name or ends
    with ``.`` + it. PEFT's ``set_peft_model_state_dict`` looks up ``<prefix><path>.<param>`` for every parameter of
    each wrapped module, so a listed module without its tensors is a KeyError on load."""
    src = src_.provenance(adapter, "peft")
    try:
        cfg = src_.config(adapter, src)
    except ConversionError:
        return [], []
    listed = (cfg or {}).get("modules_to_save") or []
    listed = [listed] if isinstance(listed, str) else [n for n in listed if isinstance(n, str)]
    prefix = src.get("key_prefix", "base_model.model.")
    prefix = prefix if isinstance(prefix, str) else ""
    paths = {k.removeprefix(prefix).rpartition(".")[0] for k in adapter.tensors}
    missing = [n for n in listed if not any(p == n or p.endswith("." + n) for p in paths)]
    return listed, missing


def _check_saved(adapter: Adapter, target: str) -> list[Finding]:
    listed, missing = saved_modules(adapter)
    if target == "vllm" and listed:
        return [
            Finding(
                target,
                "refuse",
                f"{SAVED} {listed} in adapter_config.json: vLLM refuses any (PEFTHelper._validate_features)",
                "--target vllm writes a config without it; the modules' trained weights are not served",
                listed,
            )
        ]
    if target == "peft" and missing:
        return [
            Finding(
                target,
                "refuse",
                f"{SAVED} lists {missing} but the adapter holds none of their tensors: PEFT's load raises KeyError",
                "none: add the saved weights, or remove these names from modules_to_save (the base weights are then used)",
                missing,
            )
        ]
    return []


def _module_names(adapter: Adapter, target: str, modules: list[str] | None) -> list[Finding]:
    """Module names the model cannot have (:func:`~.llm_names.impossible_names`: kohya names, names outside the
    known grammars' top level, or outside ``modules``, the base model's): PEFT attaches such keys to nothing and
    raises, vLLM refuses modules it does not expect."""
    bad = impossible_names(adapter.modules, modules)
    if not bad:
        return []
    first = next(iter(bad))
    kohya = [n for n in bad if is_kohya_name(n)]
    fix = "none: rename them" if len(kohya) < len(bad) else "convert resolves kohya names (by --base MODEL or the module grammar)"
    return [Finding(target, "refuse", f"module names the model cannot have: {first!r} is {bad[first]}", fix, list(bad))]


def check(adapter: Adapter, target: str, *, max_lora_rank: int | None = None, base: Any = None) -> list[Finding]:
    """Everything ``target`` would refuse or misread in ``adapter``, with the converter's fix (empty: loads as is).

    ``base`` (llama.cpp): a :class:`~adapterpack.formats.gguf.GgufBase` with the head counts; (peft, vllm): the
    base model's module names (:func:`~.llm_names.base_modules`), which every module name must be one of.
    """
    if target == "vllm":
        found = _check_vllm(adapter, max_lora_rank)
    elif target == "peft":
        found = _check_peft(adapter)
    elif target == "llama.cpp":
        found = _check_llama_cpp(adapter, base)
    elif target == "kohya":
        found = _check_kohya(adapter)
    else:
        raise ConversionError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    if target in ("vllm", "peft", "kohya"):
        found = _names(adapter, target) + found
    if target in ("vllm", "peft"):
        found = _check_saved(adapter, target) + _module_names(adapter, target, base if isinstance(base, list) else None) + found
    if target == "kohya" and src_.adapter_alora_tokens(adapter) is not None:
        found.append(
            Finding(
                target, "refuse", "an activated LoRA (aLoRA): kohya has no invocation tokens and would apply it to every token",
                "none: keep it as PEFT or GGUF", [],
            )
        )  # fmt: skip
    if target != "peft" and (why := src_.base_init_problem(adapter)) is not None:
        found.append(Finding(target, "refuse", why, "none: convert it with PEFT first", []))
    if not adapter.modules:
        found.insert(0, Finding(target, "refuse", "the adapter has no modules", "none", []))
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


# --- the vLLM export ---------------------------------------------------------------------------


@dataclass
class VllmPlan:
    """What :func:`to_vllm` did: the config's rank and alpha, and the modules it changed."""

    rank: int
    alpha: float
    baked: list[str]
    reranked: dict[str, float]  # module → relative Frobenius error of ΔW from re-ranking down

    def notes(self) -> list[str]:
        """Lines for the CLI."""
        serve = next_vllm_rank(self.rank) or self.rank
        need = (
            f"vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK} loads it"
            if self.rank <= VLLM_DEFAULT_MAX_RANK
            else f"serve with --max-lora-rank {serve} or more"
        )
        out = [f"vLLM: r={self.rank} (the largest module rank; ranks kept), lora_alpha={self.alpha:g}; {need}"]
        if self.baked:
            out.append(f"{len(self.baked)} module(s) have their own scale; baked into lora_B (vLLM ignores alpha_pattern)")
        if self.reranked:
            worst = max(self.reranked, key=self.reranked.__getitem__)
            out.append(
                f"{len(self.reranked)} module(s) above rank {self.rank} re-ranked down by truncated SVD (lossy): "
                f"worst relative ΔW error {self.reranked[worst]:.3g} ({worst})"
            )
        return out


def _alpha_for(scale: float, rank: int) -> float:
    """An alpha whose ``alpha / rank`` is ``scale`` in binary64 where a neighbour of ``scale · rank`` gives it."""
    x = scale * rank
    for c in (x, math.nextafter(x, math.inf), math.nextafter(x, -math.inf)):
        if c / rank == scale:
            return c
    return x


def to_vllm(adapter: Adapter, *, max_lora_rank: int | None = None, drop_tensors: bool = False) -> tuple[Adapter, VllmPlan]:
    """``adapter`` as plain-LoRA modules that vLLM scales right (see the module docstring): ranks kept,
    one scale ``alpha / rank`` with ``rank`` the largest module rank, other scales baked into B."""
    refusals = [
        f
        for f in check(adapter, "vllm", max_lora_rank=max_lora_rank)
        if f.severity == "refuse" and "rank above" not in f.problem and not f.problem.startswith((SAVED, LACKS))
    ]
    for f in refusals:
        if "full tensors" in f.problem and drop_tensors:
            continue
        where = f" ({_some(f.modules)})" if f.modules else ""  # a finding about the whole adapter names no module
        raise ConversionError(f"vLLM would refuse this adapter: {f.problem}{where}; fix: {f.fix}")
    limit = max_lora_rank or VLLM_RANKS[-1]
    mods = {n: as_lora(m) for n, m in adapter.modules.items()}
    reranked: dict[str, float] = {}
    for n, m in list(mods.items()):
        if int(m.params["rank"]) > limit:
            low = as_lora(at_rank(m, limit), dtype=main_dtype(m))
            err, norm = delta_error(m.factors(), low.factors())
            reranked[n] = err / norm if norm else 0.0
            mods[n] = low
    rank = max(int(m.params["rank"]) for m in mods.values())
    products = {n: float(m.implementation.scale(m)) * rank for n, m in mods.items()}
    # the commonest nonzero scale (a zero one could not be baked into the others' B), zero only when all are
    alpha = Counter(v for v in products.values() if v != 0.0).most_common(1)[0][0] if any(products.values()) else 0.0
    if not math.isfinite(alpha):  # JSON has no infinity
        first = next(n for n, p in products.items() if p == alpha)
        raise ConversionError(f"adapter {adapter.name!r} module {first!r}: lora_alpha = scale × rank {rank} is beyond binary64")
    scale = alpha / rank  # vLLM's PEFTHelper: lora_alpha / r
    out = Adapter(
        name=adapter.name,
        base_model=adapter.base_model,
        base_architecture=adapter.base_architecture,
        metadata=dict(adapter.metadata),
    )
    baked = []
    for n, m in mods.items():
        a, b = m.array("A"), m.array("B")
        r = int(m.params["rank"])
        s = float(m.implementation.scale(m))
        if s != scale:
            where = f"adapter {adapter.name!r} module {n!r}"
            b = dtypes.cast_array(scaled(b, s / scale, where), dtypes.of_array(b).name, where)[0]
            baked.append(n)
        # PEFT reads rank_pattern / alpha_pattern: the same scale there as vLLM's one lora_alpha / r
        params = {k: v for k, v in m.params.items() if k != "rslora"} | {"alpha": alpha if r == rank else _alpha_for(scale, r)}
        tensors = {"A": np.ascontiguousarray(a), "B": np.ascontiguousarray(b)}
        out.modules[n] = Module(n, "lora", tuple(m.base_shape), params, tensors)
        out.modules[n].implementation.validate(out.modules[n])
    return out, VllmPlan(rank, alpha, baked, reranked)


def write_vllm(
    adapter: Adapter,
    dst: str | os.PathLike[str],
    *,
    max_lora_rank: int | None = None,
    drop_tensors: bool = False,
    overwrite: bool = True,
) -> VllmPlan:
    """Write ``adapter`` as a PEFT folder that vLLM loads with the right scale everywhere (atomic, see :func:`to_vllm`;
    ``overwrite``: as :func:`~.peft.write_peft`); its ``r`` is the largest module rank."""
    single, plan = to_vllm(adapter, max_lora_rank=max_lora_rank, drop_tensors=drop_tensors)
    if (card := model_card(adapter)) is not None:  # the model card goes with the folder (its config is rebuilt)
        single.source["model_card"] = card
    if (alora := src_.adapter_alora_tokens(adapter)) is not None:  # an activated LoRA stays one
        single.source["alora_invocation_tokens"] = alora
    write_peft(single, Path(dst), overwrite=overwrite, rank=plan.rank)
    return plan


def vllm_scale(config: dict[str, Any]) -> float:
    """The scale vLLM applies to every module of a PEFT folder with this adapter_config.json (its PEFTHelper rule; a
    config lacking ``r`` or ``lora_alpha``, which vLLM refuses, with PEFT's defaults)."""
    r, alpha = config.get("r", src_.DEFAULT_R), config.get("lora_alpha", src_.DEFAULT_ALPHA)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_path(
    path: str | os.PathLike[str],
    target: str,
    *,
    adapter: str | None = None,
    max_lora_rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
) -> list[Finding]:
    """:func:`check` on a file or folder (any format adapterpack reads); ``base``: for llama.cpp the base model's GGUF
    or config.json, for peft / vllm the base model's folder, .safetensors file or config.json (its module names)."""
    info: Any = None
    if base is not None:
        info = base_modules(base) if target in ("peft", "vllm") else base_info(base)
    with read_any(path, adapter=adapter) as ad:
        return check(ad, target, max_lora_rank=max_lora_rank, base=info)
