"""diffusers LoRA files (``pytorch_lora_weights.safetensors``) ↔ :class:`Adapter`.

Keys: current diffusers writes PEFT's names behind a pipeline component,
``<component>.<module path>.lora_A.weight`` (our A, ``[r, in]`` or conv ``[r, in, kh, kw]``) and
``….lora_B.weight`` (our B, ``[out, r]`` / ``[out, r, 1, 1]``), component one of
:data:`~.sd_names.COMPONENTS`. Older files are read too: ``….lora.down.weight`` / ``.lora.up.weight``,
``….lora_linear_layer.down/up.weight`` and the attention-processor form
``…attn1.processor.to_q_lora.down.weight`` (UNet: ``to_out_lora`` is ``to_out.0``; text encoder:
``to_q_lora`` is ``q_proj``, ``to_out_lora`` is ``out_proj``), as diffusers' own
``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft`` map them.

Alpha (diffusers 0.42, ``loaders/lora_base.py``, ``utils/peft_utils.py``): the file's safetensors
metadata ``lora_adapter_metadata`` (JSON) holds, per component, the ``LoraConfig`` keyword arguments
with the component as prefix (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``,
``unet.alpha_pattern``, ``unet.use_rslora``, ``unet.target_modules``, ...); diffusers builds the
LoraConfig from it as is, so PEFT's scale ``lora_alpha / r`` (pattern-resolved per module) is exact.
Without that metadata diffusers uses scale 1 (alpha = rank for every module; ``.alpha`` tensors are
only read from kohya-named files). We read the metadata with PEFT's pattern rule
(:mod:`.patterns`); without it, an ``<stem>.alpha`` tensor (kohya's convention, alpha 0 = rank) or
else alpha = rank, with a note where diffusers would read the file differently.

Writing: PEFT-style keys, and the metadata with ``r`` / ``lora_alpha`` the most common values and
``rank_pattern`` / ``alpha_pattern`` entries ``^<escaped path>`` for every other module (exact
per-module ranks and scales; the anchor needs PEFT >= 0.15, as diffusers' own rank patterns do),
``target_modules`` a regular expression matching exactly the adapted modules. rsLoRA is exact
when a whole component is rsLoRA (``use_rslora``); in a mixed component an rsLoRA module gets the
plain alpha whose ``alpha / r`` equals its scale when one exists (else the nearest, noted).
An adapter read from a diffusers file is written back with its own keys, ``.alpha`` tensors and
metadata while they still describe it, so diffusers → .apack → diffusers is bit-exact.

Names: a module named ``unet.…``, ``text_encoder.…`` etc. is used as is; a kohya name
(``lora_unet_down_blocks_0_…``) is resolved by :class:`~.sd_names.NameResolver` (from the base
model's module names when given, else by diffusers' naming grammar, refusing what does not parse
uniquely); any other dotted name needs ``component=`` (e.g. ``transformer``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, as_array
from adapterpack.atomic import atomic_file
from adapterpack.encodings import get_encoding
from adapterpack.errors import ConversionError, InputError, RecordError
from adapterpack.formats import source as src_
from adapterpack.formats.export import StateDict, lora_records, pass_through
from adapterpack.formats.kohya import _recorded_alpha
from adapterpack.formats.patterns import most_common, resolve
from adapterpack.formats.peft import check_module_path, read_safetensors
from adapterpack.formats.regex_match import Budget, UnsupportedPattern, compile_fullmatch, fullmatches
from adapterpack.formats.sd_names import COMPONENTS, NameResolver, pattern, pipeline_modules, split_component

FILE_NAME = "pytorch_lora_weights.safetensors"
META_KEY = "lora_adapter_metadata"
#: Key endings of one LoRA factor: (suffix, slot), current form first.
_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
)
_PROC = re.compile(r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$")
_PROC_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROC_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def parse_key(key: str) -> tuple[str, str, str] | None:
    """(module name, slot, stem) of a diffusers LoRA factor key, else None. ``stem`` + ``.alpha`` is
    where that module's alpha tensor would be."""
    parts = split_component(key)
    if parts is None:
        return None
    component = parts[0]
    for suffix, slot in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            stem = key[: -len(suffix)]
            return (stem, slot, stem) if split_component(stem) else None
    m = _PROC.match(key)
    if m is None:
        return None
    proj = (_PROC_TEXT if component.startswith("text_encoder") else _PROC_UNET)[m["proj"]]
    stem = key[: -len(f".{m['kind']}.weight")]
    return f"{m['parent']}.{proj}", "A" if m["kind"] == "down" else "B", stem


def looks_like_diffusers(keys: Iterable[str]) -> bool:
    """True when some key is a diffusers LoRA factor key (component prefix + LoRA suffix)."""
    return any(parse_key(k) is not None for k in keys)


# --- reading ---------------------------------------------------------------------------------


def _metadata(meta: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """``lora_adapter_metadata`` split per component: {component: LoraConfig kwargs}."""
    obj = src_.json_metadata(meta, META_KEY, path)
    out: dict[str, dict[str, Any]] = {}
    for key, value in obj.items():
        component, dot, field = key.partition(".")
        if dot:
            out.setdefault(component, {})[field] = value
    for component, cfg in out.items():
        where = f"{path}: {META_KEY} for {component!r}"
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or not src_.is_number(alpha):
            raise InputError(f"{where}: r must be an integer >= 1 and lora_alpha a number, got {r!r}, {alpha!r}")
        ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        if not isinstance(ranks, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ranks.values()
        ):
            raise InputError(f"{where}: rank_pattern must map patterns to integers >= 1")
        if not isinstance(alphas, dict) or not all(src_.is_number(v) for v in alphas.values()):
            raise InputError(f"{where}: alpha_pattern must map patterns to numbers")
        if not isinstance(cfg.get("use_rslora", False), bool) or not isinstance(cfg.get("use_dora", False), bool):
            raise InputError(f"{where}: use_rslora / use_dora must be true or false")
        targets = cfg.get("target_modules")
        listed = isinstance(targets, list) and all(isinstance(x, str) for x in targets)
        if not (targets is None or isinstance(targets, str) or listed):
            raise InputError(f"{where}: target_modules must be a string or a list of strings")
    return out


def _config_values(cfg: dict[str, Any], path: str, where: str) -> tuple[int, float, bool]:
    """(rank, alpha, rslora) PEFT builds for the module ``path`` of a component from its LoraConfig kwargs."""
    try:
        rank = resolve(cfg.get("rank_pattern"), cfg.get("r", 8), path)
        alpha = resolve(cfg.get("alpha_pattern"), cfg.get("lora_alpha", 8), path)
    except InputError as e:
        raise InputError(f"{where}: {str(e).replace('adapter_config.json: ', '')}") from None
    return int(rank), alpha, bool(cfg.get("use_rslora", False))


def _targeted(cfg: dict[str, Any], path: str, budget: Budget) -> bool:
    """Whether PEFT's target_modules rule selects ``path`` (True when the config names none).

    A string is PEFT's ``re.fullmatch``, matched without backtracking (:mod:`.regex_match`) under ``budget``,
    one for the whole file: a hostile pattern is refused naming it, never a hang.
    """
    targets = cfg.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        try:
            return fullmatches(compile_fullmatch(targets), path, budget)
        except re.error:
            return False
        except UnsupportedPattern as e:
            raise InputError(f"target_modules {targets!r:.200} {e}") from None
    if not isinstance(targets, list):
        return False
    flat = path[len("text_model.") :] if path.startswith("text_model.") else None
    return any(path == t or path.endswith("." + t) or (flat is not None and (flat == t or flat.endswith("." + t))) for t in targets)


def read_diffusers(path: str | os.PathLike[str]) -> Adapter:
    """Read a diffusers LoRA ``.safetensors`` file (current or older key forms) into an :class:`Adapter`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such diffusers LoRA file")
    tensors, meta = read_safetensors(path)
    meta = meta or {}
    configs = _metadata(meta, path)
    groups: dict[str, dict[str, str]] = {}
    stems: dict[str, str] = {}
    other: list[str] = []
    for key in tensors:
        parsed = parse_key(key)
        if parsed is None:
            other.append(key)
            continue
        name, slot, stem = parsed
        g = groups.setdefault(name, {})
        if slot in g:
            raise InputError(f"{path}: module {name!r} has two {slot} tensors ({g[slot]!r}, {key!r})")
        g[slot] = key
        if stems.setdefault(name, stem) != stem:
            raise InputError(f"{path}: module {name!r} is stored under two key forms ({stems[name]!r}, {stem!r})")
    alpha_keys = {f"{stems[n]}.alpha": n for n in groups}
    # anything else under a module's stem (DoRA magnitude, lora_B.bias): the whole module is carried raw
    by_stem = {s: n for n, s in stems.items()}
    extra: set[str] = set()
    for k in other:
        if k not in alpha_keys:
            owners = [s for s in by_stem if k.startswith(s + ".")]
            if owners:
                extra.add(by_stem[max(owners, key=len)])
    source: dict[str, Any] = {"format": "diffusers"}
    if meta:
        source["safetensors_metadata"] = meta
    adapter = Adapter(name="default", source=source)
    key_forms: dict[str, dict[str, str]] = {}
    alpha_tensors: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    raw = [k for k in other if alpha_keys.get(k) is None or alpha_keys[k] in extra]
    unscaled, conflicts, untargeted, mixed = [], [], [], []
    budget = Budget()
    for name, g in groups.items():
        if name in extra:
            raw.extend(g.values())
            continue
        if set(g) != {"A", "B"}:
            raise InputError(
                f"{path}: module {name!r} needs both lora_A (down) and lora_B (up); found only {', '.join(g.values())}"
            )
        akey = f"{stems[name]}.alpha"
        mod, alpha_info = _module(path, name, tensors[g["A"]], tensors[g["B"]], tensors.get(akey), configs)
        if (g["A"], g["B"]) != (f"{name}.lora_A.weight", f"{name}.lora_B.weight") or alpha_info is not None:
            key_forms[name] = {"A": g["A"], "B": g["B"]}
        if alpha_info is not None:
            alpha_tensors[name] = alpha_info
            key_forms[name]["alpha"] = akey
        component, sub = split_component(name) or ("", "")
        cfg = configs.get(component)
        if cfg is None and mod.params["alpha"] != mod.params["rank"]:
            unscaled.append(name)
        if cfg is not None and alpha_info is not None and float(alpha_info["value"]) != float(mod.params["alpha"]):
            conflicts.append(name)
        if cfg is not None and not _targeted(cfg, sub, budget):
            untargeted.append(name)
        adapter.modules[name] = mod
        if tensors[g["A"]].dtype != tensors[g["B"]].dtype:
            mixed.append(name)
    if not adapter.modules:
        raise InputError(f"{path}: no diffusers LoRA modules (<component>.<module>.lora_A.weight + .lora_B.weight)")
    for key in raw:
        adapter.tensors[key] = tensors[key]
    if key_forms:
        source["key_forms"] = key_forms
    if alpha_tensors:
        source["alpha_tensors"] = alpha_tensors
    extra_note = f"{len(extra)} modules carry extra tensors (DoRA magnitude, lora bias) and are kept as raw tensors"
    for cond, line in (
        (
            unscaled,
            "modules take their alpha from .alpha tensors (kohya's convention); diffusers reads .alpha only from "
            "kohya-named files and would use scale 1 for them",
        ),
        (conflicts, f"modules have an .alpha tensor that disagrees with {META_KEY}; the metadata wins, as in diffusers"),
        (untargeted, f"modules are not selected by target_modules in {META_KEY}; diffusers would not load them"),
    ):
        if cond:
            notes.append(f"{len(cond)} {line}: " + ", ".join(cond[:3]) + (", ..." if len(cond) > 3 else ""))
    if extra:
        notes.append(extra_note + ": " + ", ".join(sorted(extra)[:3]))
    notes += src_.mixed_dtype_note(mixed)
    leftover = len(raw) - sum(1 for k in raw if any(k.startswith(stems[n] + ".") for n in extra))
    if leftover:
        notes.append(f"{leftover} tensors that are not diffusers LoRA factors are carried untouched")
    if notes:
        source["notes"] = notes
    return adapter


def _module(
    path: Path, name: str, down: np.ndarray, up: np.ndarray, alpha_t: np.ndarray | None, configs: dict[str, dict[str, Any]]
) -> tuple[Module, dict[str, Any] | None]:
    """One module as a lora record, and its alpha tensor's facts (dtype, shape, value) when it has one."""
    where = f"{path}: module {name!r}"
    down, up = src_.common_float(down, up)
    if down.ndim < 2 or up.ndim < 2 or down.ndim != up.ndim:
        raise InputError(f"{where}: lora_A {list(down.shape)} and lora_B {list(up.shape)} must both be 2-D or both conv")
    rank = int(down.shape[0])
    if up.shape[1] != rank:
        raise InputError(f"{where}: lora_A {list(down.shape)} and lora_B {list(up.shape)} disagree on the rank")
    alpha: float = float(rank)
    rslora = False
    info = None
    if alpha_t is not None:
        if alpha_t.size != 1 or (not dtypes.of_array(alpha_t).is_float and alpha_t.dtype.kind not in "iu"):
            raise InputError(f"{where}: alpha must be a single number, got {alpha_t.dtype} {list(alpha_t.shape)}")
        value = float(alpha_t.reshape(-1)[0])
        if not math.isfinite(value):
            raise InputError(f"{where}: alpha is {value}")
        alpha = float(rank) if value == 0 else value
        info = {"dtype": dtypes.of_array(alpha_t).name, "shape": list(alpha_t.shape), "value": value}
    component, sub = split_component(name) or ("", "")
    cfg = configs.get(component)
    if cfg is not None:
        r_cfg, alpha, rslora = _config_values(cfg, sub, f"{path}: {META_KEY} for {component!r}")
        if r_cfg != rank:
            raise InputError(f"{where}: {META_KEY} gives rank {r_cfg}, the tensors have rank {rank}")
    layout = "conv" if down.ndim >= 3 else "linear"
    base_shape = (int(up.shape[0]), *(int(d) for d in down.shape[1:]))
    params = {"rank": rank, "alpha": alpha, "rslora": rslora, "layout": layout, "fan_in_fan_out": False, "dora": False}
    mod = Module(name=name, encoding="lora", base_shape=base_shape, params=params, tensors={"A": down, "B": up})
    try:
        get_encoding("lora").validate(mod)
    except RecordError as e:
        raise InputError(f"{path}: {e}") from None
    return mod, info


# --- writing ---------------------------------------------------------------------------------


def exact_alpha(scale: float, rank: int) -> float:
    """A plain alpha with ``alpha / rank == scale`` in binary64 when one exists (``scale · rank`` or a
    neighbour), else ``scale · rank``."""
    guess = scale * rank
    for cand in (guess, math.nextafter(guess, math.inf), math.nextafter(guess, -math.inf)):
        if cand / rank == scale:
            return cand
    return guess


def _names(modules: list[Module], resolver: NameResolver | None, component: str | None) -> tuple[dict[str, str], int]:
    """Every module's diffusers name (``component.path``), refusing names that would collide; how many
    kohya names the naming grammar resolved (no base model given)."""
    out: dict[str, str] = {}
    taken: dict[str, str] = {}
    by_grammar = 0
    for m in modules:
        if split_component(m.name) is not None:
            name = m.name
        elif "." not in m.name:
            name = (resolver or NameResolver()).resolve(m.name)
            by_grammar += resolver is None
        elif component is not None:
            if component not in COMPONENTS:
                raise ConversionError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}")
            name = f"{component}.{m.name}"
        else:
            raise ConversionError(
                f"module {m.name!r} names no diffusers component ({', '.join(COMPONENTS)}); "
                "pass component= (e.g. 'transformer') to put the adapter's modules under one"
            )
        if name in taken:
            raise ConversionError(f"modules {taken[name]!r} and {m.name!r} both map to the diffusers module {name!r}")
        taken[name] = m.name
        out[m.name] = name
    return out, by_grammar


def _form(form: Any, name: str) -> dict[str, str]:
    """The recorded keys of a module read from a diffusers file, when they still parse back to it."""
    if not isinstance(form, dict) or not all(isinstance(form.get(s), str) for s in ("A", "B")):
        return {}
    a, b = parse_key(form["A"]), parse_key(form["B"])
    if a is None or b is None or (a[0], a[1], b[0], b[1]) != (name, "A", name, "B"):
        return {}
    out = {"A": form["A"], "B": form["B"]}
    if form.get("alpha") == f"{a[2]}.alpha":
        out["alpha"] = form["alpha"]
    return out


def _component_config(values: dict[str, tuple[int, float, bool]]) -> tuple[dict[str, Any], list[str]]:
    """LoraConfig kwargs under which PEFT gives every module path its (rank, alpha, rslora); notes."""
    notes: list[str] = []
    all_rs = all(v[2] for v in values.values())
    plain: dict[str, tuple[int, float]] = {}
    for p, (rank, alpha, rs) in values.items():
        if rs and not all_rs:
            scale = float(alpha) / math.sqrt(rank)
            alpha = exact_alpha(scale, rank)
            if not math.isfinite(alpha):  # JSON has no infinity
                raise ConversionError(f"module {p!r}: rsLoRA scale {scale!r} × rank {rank} is beyond binary64 (no plain alpha)")
            if alpha / rank != scale:
                notes.append(f"{p}: rsLoRA scale {scale!r} written as alpha {alpha!r}, which PEFT reads as {alpha / rank!r}")
        plain[p] = (rank, alpha)
    r = most_common([v[0] for v in plain.values()])
    lora_alpha = most_common([v[1] for v in plain.values()])
    cfg: dict[str, Any] = {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {pattern(p): v[0] for p, v in plain.items() if v[0] != r},
        "alpha_pattern": {pattern(p): v[1] for p, v in plain.items() if v[1] != lora_alpha},
        "target_modules": "(?:" + "|".join(pattern(p) for p in plain) + ")",
        "use_rslora": all_rs,
        "use_dora": False,
        "lora_bias": False,
    }
    return cfg, notes


def _describes(cfg: dict[str, Any], values: dict[str, tuple[int, float, bool]]) -> bool:
    """Whether recorded LoraConfig kwargs still give every module exactly its (rank, alpha, rslora)."""
    try:
        budget = Budget()
        return all(_targeted(cfg, p, budget) and _config_values(cfg, p, "") == v for p, v in values.items())
    except (InputError, TypeError, ValueError):
        return False


def diffusers_state(
    adapter: Adapter,
    *,
    modules: Iterable[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    component: str | None = None,
    dtype: str | None = None,
    drop_tensors: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """The tensors, metadata and notes a diffusers export writes (see the module docstring).

    ``modules`` (module names such as ``unet.conv_in``) or ``base`` (a diffusers pipeline folder)
    resolve kohya names exactly; ``component`` puts dotted names without a component under one.
    """
    if modules is not None and base is not None:
        raise ConversionError("give the base model's module names or its pipeline folder, not both")
    resolver = NameResolver(pipeline_modules(base) if base is not None else modules) if (modules or base) else None
    records = lora_records(adapter, "diffusers")
    names, by_grammar = _names(records, resolver, component)
    src = src_.provenance(adapter, "diffusers")
    forms = src_.object_map(adapter, src, "key_forms")
    alphas = src_.object_map(adapter, src, "alpha_tensors")
    meta = dict(src_.str_map(adapter, src, "safetensors_metadata"))
    state = StateDict(dtype, "diffusers")
    values: dict[str, dict[str, tuple[int, float, bool]]] = {}
    implied_ok = True  # every module reads back right without metadata
    notes: list[str] = []
    for m in records:
        p = m.params
        if p.get("dora", False):
            raise ConversionError(f"module {m.name!r} is DoRA; the diffusers export writes plain LoRA only")
        if p.get("layout", "linear") == "embedding" or p.get("fan_in_fan_out", False):
            raise ConversionError(
                f"module {m.name!r} is an embedding or fan_in_fan_out layer; diffusers LoRA files hold Linear and Conv layers only"
            )
        name = names[m.name]
        check_module_path(name, m.name)
        comp, sub = split_component(name)  # type: ignore[misc]
        form = _form(forms.get(m.name), name) if m.name == name else {}
        keys = {s: form.get(s, f"{name}.lora_{s}.weight") for s in ("A", "B")}
        state.put(keys["A"], state.cast(m.array("A"), f"module {m.name!r} tensor 'A'"), cast=False)
        state.put(keys["B"], state.cast(m.array("B"), f"module {m.name!r} tensor 'B'"), cast=False)
        a = p["alpha"]  # a record built in memory may hold a numpy scalar: JSON needs a Python number
        rank, alpha, rs = int(p["rank"]), (int(a) if isinstance(a, (int, np.integer)) else float(a)), bool(p.get("rslora", False))
        implied = float(rank)
        info, akey = alphas.get(m.name), form.get("alpha")
        if info is not None and akey is not None and not rs:
            arr = _recorded_alpha(info, alpha, alpha == rank)
            if arr is not None:
                state.put(akey, arr, cast=False)
                implied = alpha
        implied_ok &= not rs and alpha == implied
        values.setdefault(comp, {})[sub] = (rank, alpha, rs)
    for key, t in pass_through(adapter, own=("diffusers",), drop_tensors=drop_tensors, target="a diffusers file").items():
        state.put(key, as_array(t))
    try:
        recorded = _metadata(meta, Path("source"))
    except InputError:
        recorded = {}  # malformed: replaced below
    keep = bool(recorded) and set(recorded) >= set(values) and all(_describes(recorded[c], v) for c, v in values.items())
    if not keep and (not src or not implied_ok or META_KEY in meta):
        packed: dict[str, Any] = {}
        for comp, vals in values.items():
            cfg, cnotes = _component_config(vals)
            notes += [f"{comp}.{n}" for n in cnotes]
            packed.update({f"{comp}.{k}": v for k, v in cfg.items()})
        meta[META_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        meta.setdefault("format", "pt")
    if by_grammar:
        notes.append(
            f"{by_grammar} kohya module names were split into diffusers paths by diffusers' naming rules "
            "(no base model given; names that do not split uniquely are refused)"
        )
    return state.tensors, meta, notes


def write_diffusers(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    modules: Iterable[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    component: str | None = None,
    dtype: str | None = None,
    drop_tensors: bool = False,
    overwrite: bool = True,
) -> list[str]:
    """Write ``adapter`` as a diffusers LoRA ``.safetensors`` file, atomically (``overwrite`` false:
    OutputExistsError if it exists); the export's notes.

    ``modules`` / ``base`` / ``component``: see :func:`diffusers_state`; ``dtype`` casts float tensors;
    ``drop_tensors`` leaves out pass-through tensors of another origin (refused otherwise).
    """
    from safetensors.numpy import save  # safetensors: only writers import it

    tensors, meta, notes = diffusers_state(
        adapter, modules=modules, base=base, component=component, dtype=dtype, drop_tensors=drop_tensors
    )
    data = save(tensors, metadata=meta or None)
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(data)
    return notes


__all__ = ["FILE_NAME", "META_KEY", "diffusers_state", "looks_like_diffusers", "read_diffusers", "write_diffusers"]
