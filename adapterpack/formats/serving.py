"""What each serving stack would refuse or misread in an adapter, and the fix the converter applies.

:func:`check` lists :class:`Finding` s for one target:

- ``vllm``: refuses DoRA, ``modules_to_save`` (full tensors) and ranks above ``--max-lora-rank``
  (one of :data:`VLLM_RANKS`); reads ONE ``r`` / ``lora_alpha`` from adapter_config.json and
  ignores ``rank_pattern`` / ``alpha_pattern``, so per-module ranks or alphas get the wrong scale.
  Fix (:func:`to_vllm`): every module padded with zero rows of A / zero columns of B up to one
  allowed rank R (exact: the padded product is the same), each module's own scale baked into B,
  ``lora_alpha`` chosen so most modules keep B bit-exact; above the allowed maximum, the
  module is re-ranked down by truncated SVD (lossy, the relative ΔW error is reported).
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
from adapterpack.errors import ConversionError
from adapterpack.formats import read_any
from adapterpack.formats.export import DROP_HINT, check_key, scaled
from adapterpack.formats.gguf import _LAYER, GgufBase, _name_map, base_info
from adapterpack.formats.peft import check_module_path, model_card, write_peft
from adapterpack.linalg.cast import delta_error
from adapterpack.names import check_name

TARGETS = ("vllm", "peft", "llama.cpp", "kohya")
#: The values vLLM accepts for ``--max-lora-rank``.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
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
    scales = {n: f[1] * f[0] for n, f in facts.items()}  # s·r: what alpha would have to be under one r
    if len(set(ranks.values())) > 1 or len(set(scales.values())) > 1:
        want = next_vllm_rank(min(max(ranks.values(), default=1), limit)) or limit
        r0, p0 = Counter(ranks.values()).most_common(1)[0][0], Counter(scales.values()).most_common(1)[0][0]
        out.append(
            Finding(
                t,
                "misread",
                "per-module ranks or alphas: vLLM reads one r and lora_alpha and ignores rank_pattern / alpha_pattern, "
                "so these modules would get the wrong scale",
                f"padded with zeros to one rank r={want}, each module's scale baked into lora_B (exact)",
                sorted(n for n in facts if ranks[n] != r0 or scales[n] != p0),
            )
        )
    elif ranks:
        r = next(iter(ranks.values()))
        if r not in VLLM_RANKS and r <= limit:
            out.append(
                Finding(
                    t,
                    "note",
                    f"rank {r} is not in vLLM's max_lora_rank set; the server needs --max-lora-rank {next_vllm_rank(r)}",
                    f"padded to r={next_vllm_rank(r)} with zeros (exact) by --target vllm",
                    [],
                )
            )
    return out


def _check_peft(adapter: Adapter) -> list[Finding]:
    t = "peft"
    out = _common(adapter, t, own=(None, "peft"))
    bare = [m.name for m in adapter if "." not in m.name]
    if bare:
        out.append(
            Finding(
                t,
                "misread",
                "module names without dots (kohya names): PEFT matches keys to the base model's "
                "module names, so these attach to nothing",
                "none: import the kohya file with its adapterpack.module_names metadata, or rename",
                bare,
            )
        )
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
    info = base if isinstance(base, GgufBase) else GgufBase()
    n_blocks = 1 + max((int(g.group(1)) for n in facts if (g := _LAYER.search(n))), default=0)
    names = _name_map(info.arch, n_blocks)
    unnamed = [n for n in facts if names.get_name(n) is None]
    if unnamed:
        out.append(Finding(t, "refuse", f"no llama.cpp tensor name for these modules ({info.arch})", "none", unnamed))
    prods = {n: f[1] * f[0] for n, f in facts.items()}
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


def _check_kohya(adapter: Adapter) -> list[Finding]:
    t = "kohya"
    out = _common(adapter, t, own=("kohya",))
    facts = {m.name: _lora_facts(m) for m in adapter}
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


def check(adapter: Adapter, target: str, *, max_lora_rank: int | None = None, base: Any = None) -> list[Finding]:
    """Everything ``target`` would refuse or misread in ``adapter``, with the converter's fix (empty: loads as is).

    ``base`` (llama.cpp): a :class:`~adapterpack.formats.gguf.GgufBase` with the head counts.
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
    if not adapter.modules:
        found.insert(0, Finding(target, "refuse", "the adapter has no modules", "none", []))
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))


# --- the vLLM export ---------------------------------------------------------------------------


@dataclass
class VllmPlan:
    """What :func:`to_vllm` did: the single rank, alpha, and the modules it changed."""

    rank: int
    alpha: float
    padded: list[str]
    baked: list[str]
    reranked: dict[str, float]  # module → relative Frobenius error of ΔW from re-ranking down

    def notes(self) -> list[str]:
        """Lines for the CLI."""
        out = [f"vLLM: one rank r={self.rank}, lora_alpha={self.alpha:g} (serve with --max-lora-rank >= {self.rank})"]
        if self.padded:
            out.append(f"{len(self.padded)} module(s) padded with zeros to r={self.rank} (exact)")
        if self.baked:
            out.append(f"{len(self.baked)} module(s) have their own scale; baked into lora_B (vLLM ignores alpha_pattern)")
        if self.reranked:
            worst = max(self.reranked, key=self.reranked.__getitem__)
            out.append(
                f"{len(self.reranked)} module(s) above rank {self.rank} re-ranked down by truncated SVD (lossy): "
                f"worst relative ΔW error {self.reranked[worst]:.3g} ({worst})"
            )
        return out


def to_vllm(adapter: Adapter, *, max_lora_rank: int | None = None, drop_tensors: bool = False) -> tuple[Adapter, VllmPlan]:
    """``adapter`` as a single-rank plain-LoRA adapter vLLM reads correctly (see the module docstring)."""
    refusals = [
        f for f in check(adapter, "vllm", max_lora_rank=max_lora_rank) if f.severity == "refuse" and "rank above" not in f.problem
    ]
    for f in refusals:
        if "full tensors" in f.problem and drop_tensors:
            continue
        raise ConversionError(f"vLLM would refuse this adapter: {f.problem} ({_some(f.modules)}); fix: {f.fix}")
    limit = max_lora_rank or VLLM_RANKS[-1]
    mods = {n: as_lora(m) for n, m in adapter.modules.items()}
    reranked: dict[str, float] = {}
    for n, m in list(mods.items()):
        if int(m.params["rank"]) > limit:
            low = as_lora(at_rank(m, limit), dtype=main_dtype(m))
            err, norm = delta_error(m.factors(), low.factors())
            reranked[n] = err / norm if norm else 0.0
            mods[n] = low
    rank = next_vllm_rank(max(int(m.params["rank"]) for m in mods.values())) or limit
    products = {n: float(m.implementation.scale(m)) * rank for n, m in mods.items()}
    # the commonest nonzero scale (a zero one could not be baked into the others' B), zero only when all are
    alpha = Counter(v for v in products.values() if v != 0.0).most_common(1)[0][0] if any(products.values()) else 0.0
    if not math.isfinite(alpha):  # JSON has no infinity
        first = next(n for n, p in products.items() if p == alpha)
        raise ConversionError(f"adapter {adapter.name!r} module {first!r}: lora_alpha = scale × rank {rank} is beyond binary64")
    scale = alpha / rank
    out = Adapter(
        name=adapter.name,
        base_model=adapter.base_model,
        base_architecture=adapter.base_architecture,
        metadata=dict(adapter.metadata),
    )
    padded, baked = [], []
    for n, m in mods.items():
        a, b = m.array("A"), m.array("B")
        r = a.shape[0]
        s = float(m.implementation.scale(m))
        if s != scale:
            where = f"adapter {adapter.name!r} module {n!r}"
            b = dtypes.cast_array(scaled(b, s / scale, where), dtypes.of_array(b).name, where)[0]
            baked.append(n)
        if r < rank:
            a = np.concatenate([a, np.zeros((rank - r, *a.shape[1:]), a.dtype)], axis=0)
            b = np.concatenate([b, np.zeros((b.shape[0], rank - r, *b.shape[2:]), b.dtype)], axis=1)
            padded.append(n)
        params = {k: v for k, v in m.params.items() if k not in ("rslora",)} | {"rank": rank, "alpha": alpha}
        out.modules[n] = Module(
            n, "lora", tuple(m.base_shape), params, {"A": np.ascontiguousarray(a), "B": np.ascontiguousarray(b)}
        )
        out.modules[n].implementation.validate(out.modules[n])
    return out, VllmPlan(rank, alpha, padded, baked, reranked)


def write_vllm(
    adapter: Adapter,
    dst: str | os.PathLike[str],
    *,
    max_lora_rank: int | None = None,
    drop_tensors: bool = False,
    overwrite: bool = True,
) -> VllmPlan:
    """Write ``adapter`` as a PEFT folder that vLLM loads with the right scale everywhere (atomic, see :func:`to_vllm`;
    ``overwrite``: as :func:`~.peft.write_peft`)."""
    single, plan = to_vllm(adapter, max_lora_rank=max_lora_rank, drop_tensors=drop_tensors)
    if (card := model_card(adapter)) is not None:  # the model card goes with the folder (its config is rebuilt)
        single.source["model_card"] = card
    write_peft(single, Path(dst), overwrite=overwrite)
    return plan


def vllm_scale(config: dict[str, Any]) -> float:
    """The scale vLLM applies to every module of a PEFT folder with this adapter_config.json (its PEFTHelper rule)."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_path(
    path: str | os.PathLike[str],
    target: str,
    *,
    adapter: str | None = None,
    max_lora_rank: int | None = None,
    base: str | os.PathLike[str] | None = None,
) -> list[Finding]:
    """:func:`check` on a file or folder (any format adapterpack reads); ``base`` is the base model's GGUF or config.json."""
    info = base_info(base) if base is not None else None
    with read_any(path, adapter=adapter) as ad:
        return check(ad, target, max_lora_rank=max_lora_rank, base=info)
