"""kohya single-file LoRA (``.safetensors``) ↔ :class:`Adapter`.

Keys: ``<kohya name>.lora_down.weight`` (our A, ``[r, in]`` or conv ``[r, in, kh, kw]``),
``<kohya name>.lora_up.weight`` (our B, ``[out, r]`` or ``[out, r, 1, 1]``) and
``<kohya name>.alpha`` (a 0-d tensor). kohya's scale is ``alpha / rank``; a missing alpha, or
an alpha of 0, means ``alpha = rank`` (scale 1), as in kohya's ``networks/lora.py``. Such
modules are listed in ``source["no_alpha"]`` / ``source["notes"]``.

Names: a kohya name is ``<prefix>_<module path with "." replaced by "_">``, which cannot be
undone. On export we write the safetensors metadata key ``adapterpack.module_names`` (JSON,
kohya name → dotted module name) and use it on import; without it the module keeps its kohya
name (:class:`~.sd_names.NameResolver` turns kohya names into diffusers paths, exactly, for a
diffusers export; :mod:`.llm_names` turns an LLM's kohya names into module names for a PEFT / vLLM /
gguf export, from the base model or the LLaMA / GPT-2 / BERT grammar, or refuses). Export names: a
module name recorded from a kohya import keeps its original kohya name;
a name without dots is taken as a kohya name already; a diffusers module name gets
kohya's prefix for its component (``unet.…`` → ``lora_unet_…``, ``text_encoder.…`` → ``lora_te_…``,
or ``lora_te1_`` / ``lora_te2_`` when the adapter has a ``text_encoder_2``, ``transformer.…`` →
``lora_transformer_…``; :func:`~.sd_names.kohya_name_of`; ``sdxl_sgm=True``: an SDXL UNet by its
SGM paths, ``lora_unet_input_blocks_4_1_…``, as sd-scripts names SDXL LoRAs); any other (e.g. PEFT's
``model.layers.0.self_attn.q_proj``) becomes ``lora_unet_model_layers_0_self_attn_q_proj``
(``prefix`` argument, default ``lora_unet``). kohya's tools (``resize_lora.py``, the loaders)
only look at the ``lora_down`` / ``lora_up`` / ``alpha`` keys.

Alpha: kohya's ``alpha / rank`` equals our scale. For plain LoRA the kohya alpha is our alpha;
for rsLoRA (scale ``alpha / sqrt(r)``) it is ``alpha · sqrt(r)``. It is written in the factors'
dtype when that holds the value exactly, else as float32. kohya's loaders read alpha as float32
(``alpha.float()``) and alpha 0 as alpha = rank, so an alpha beyond float32's range, one that rounds
to 0, or 0 itself is refused on export (a wider tensor type would not help). Importing a kohya file keeps each
alpha tensor's dtype, shape and value, so kohya → Adapter → kohya is bit-exact.

Layouts kohya has no name for are converted losslessly: an embedding's or a ``fan_in_fan_out``
layer's ΔW is ``(s·B·A)ᵀ = s·Aᵀ·Bᵀ``, so ``lora_up = Aᵀ``, ``lora_down = Bᵀ`` is ΔW in the
base weight's own layout, which is what kohya loaders add. The metadata key
``adapterpack.module_params`` (JSON, kohya name → {layout, fan_in_fan_out, rslora, alpha})
lets an import undo the transposition and restore the rsLoRA alpha exactly; entries that no
longer fit the tensors (a file edited by another tool) are ignored with a note. DoRA is refused
on export: kohya/LyCORIS ``dora_scale`` normalises along a different axis than PEFT's magnitude.
Modules with ``dora_scale``, ``lora_mid`` or LyCORIS keys are carried as raw tensors on import.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, as_array
from adapterpack.atomic import atomic_file
from adapterpack.encodings import get_encoding
from adapterpack.errors import AdapterpackError, ConversionError, InputError, RecordError
from adapterpack.formats import source as src_
from adapterpack.formats.export import StateDict, float32_alpha, lora_records, pass_through
from adapterpack.formats.peft import read_safetensors
from adapterpack.formats.sd_names import kohya_name_of, numbered_text_encoders, sdxl_sgm_path

DEFAULT_PREFIX = "lora_unet"
META_NAMES = "adapterpack.module_names"
META_PARAMS = "adapterpack.module_params"
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
TRANSPOSED = ("embedding", "fan_in_fan_out")


def kohya_alpha(alpha: float, rank: int, rslora: bool) -> float:
    """The kohya alpha whose ``alpha / rank`` is our scale (binary64)."""
    return float(alpha) * math.sqrt(rank) if rslora else float(alpha)


def alpha_dtype(value: float, factor_dtype: np.dtype) -> np.dtype:
    """The factors' dtype if it holds ``value`` exactly, else float32."""
    with np.errstate(over="ignore"):
        exact = float(np.asarray(value, dtype=factor_dtype)) == value
    return factor_dtype if exact else np.dtype(np.float32)


def kohya_name(name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """kohya's name for a module: unchanged if it has no dots, else ``<prefix>_<path with _>``."""
    return name if "." not in name else f"{prefix}_{name.replace('.', '_')}"


# --- reading ---------------------------------------------------------------------------------


def read_kohya(path: str | os.PathLike[str]) -> Adapter:
    """Read a kohya LoRA ``.safetensors`` file into an :class:`Adapter`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such kohya LoRA file")
    tensors, meta = read_safetensors(path)
    meta = meta or {}
    names = src_.json_metadata(meta, META_NAMES, path)
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in names.items()):
        raise InputError(f"{path}: metadata {META_NAMES!r} must map kohya names to module names (strings)")
    mparams = src_.json_metadata(meta, META_PARAMS, path)

    stems: dict[str, dict[str, str]] = {}
    loose: list[str] = []
    for key in tensors:
        stem, dot, kind = key.partition(".")
        if dot:
            stems.setdefault(stem, {})[kind] = key
        else:
            loose.append(key)
    source: dict[str, Any] = {"format": "kohya"}
    if meta:
        source["safetensors_metadata"] = meta
    adapter = Adapter(name="default", source=source)
    kohya_names: dict[str, str] = {}
    no_alpha: list[str] = []
    alpha_tensors: dict[str, dict[str, Any]] = {}
    raw_modules: list[str] = []
    notes: list[str] = []
    raw: list[str] = list(loose)
    mixed: list[str] = []
    for stem, kinds in stems.items():
        if DOWN not in kinds and UP not in kinds:
            raw.extend(kinds.values())
            continue
        if DOWN not in kinds or UP not in kinds:
            have = ", ".join(kinds.values())
            raise InputError(f"{path}: module {stem!r} needs both lora_down and lora_up; found only {have}")
        if set(kinds) - {DOWN, UP, ALPHA}:
            raw_modules.append(stem)
            raw.extend(kinds.values())
            continue
        name = names.get(stem, stem)
        if name in adapter.modules:
            raise InputError(f"{path}: two kohya modules map to the module name {name!r}")
        mod, info, note = _module(path, stem, name, kinds, tensors, mparams.get(stem))
        adapter.modules[name] = mod
        if tensors[kinds[DOWN]].dtype != tensors[kinds[UP]].dtype:
            mixed.append(name)
        if name != stem:
            kohya_names[name] = stem
        if ALPHA not in kinds:
            no_alpha.append(name)
        if info is not None:
            alpha_tensors[name] = info
        if note:
            notes.append(note)
    if not adapter.modules:
        raise InputError(f"{path}: no kohya LoRA modules (<name>.lora_down.weight + <name>.lora_up.weight)")
    for key in raw:
        adapter.tensors[key] = tensors[key]
    if kohya_names:
        source["kohya_names"] = kohya_names
    if no_alpha:
        source["no_alpha"] = no_alpha
        notes.insert(
            0,
            f"{len(no_alpha)} modules have no alpha tensor; kohya then uses alpha = rank (scale 1): "
            + ", ".join(no_alpha[:3])
            + (", ..." if len(no_alpha) > 3 else ""),
        )
    zero = [n for n, i in alpha_tensors.items() if i["value"] == 0]
    if zero:
        notes.append(f"{len(zero)} modules have alpha 0, which kohya reads as alpha = rank (scale 1): " + ", ".join(zero[:3]))
    if alpha_tensors:
        source["alpha_tensors"] = alpha_tensors
    notes += src_.mixed_dtype_note(mixed)
    if raw_modules:
        notes.append(
            f"{len(raw_modules)} modules carry dora_scale, lora_mid or other extra keys and are kept as raw tensors, "
            "not LoRA records: " + ", ".join(raw_modules[:3])
        )
    other = len(raw) - sum(1 for k in raw if k.partition(".")[0] in raw_modules)
    if other:
        notes.append(f"{other} tensors that are not kohya LoRA keys are carried untouched")
    if notes:
        source["notes"] = notes
    return adapter


def _module(
    path: Path, stem: str, name: str, kinds: dict[str, str], tensors: dict[str, np.ndarray], extra: Any
) -> tuple[Module, dict[str, Any] | None, str | None]:
    """One kohya module as a lora record; the alpha tensor's facts when non-default; a note."""
    where = f"{path}: module {stem!r}"
    down, up = src_.common_float(tensors[kinds[DOWN]], tensors[kinds[UP]])
    if down.ndim < 2 or up.ndim < 2:
        raise InputError(f"{where}: lora_down {list(down.shape)} and lora_up {list(up.shape)} must be at least 2-D")
    rank = int(down.shape[0])
    if up.shape[1] != rank:
        raise InputError(f"{where}: lora_down {list(down.shape)} and lora_up {list(up.shape)} disagree on the rank")
    info = None
    if ALPHA in kinds:
        a = tensors[kinds[ALPHA]]
        if a.size != 1 or (not dtypes.of_array(a).is_float and a.dtype.kind not in "iu"):
            raise InputError(f"{where}: alpha must be a single number, got {a.dtype} {list(a.shape)}")
        value = float(a.reshape(-1)[0])
        if not math.isfinite(value):
            raise InputError(f"{where}: alpha is {value}")
        alpha = float(rank) if value == 0 else value
        if value == 0 or a.shape != () or a.dtype != down.dtype:
            info = {"dtype": dtypes.of_array(a).name, "shape": list(a.shape), "value": value}
    else:
        alpha = float(rank)
    layout = "conv" if down.ndim >= 3 else "linear"
    base_shape: tuple[int, ...] = (int(up.shape[0]), *(int(d) for d in down.shape[1:]))
    A, B, fifo, rslora, note = down, up, False, False, None
    if isinstance(extra, dict):
        want = extra.get("layout")
        if want in TRANSPOSED and layout == "linear":
            A, B = np.ascontiguousarray(up.T), np.ascontiguousarray(down.T)
            layout = "embedding" if want == "embedding" else "linear"
            fifo = want == "fan_in_fan_out"
        if extra.get("rslora") is True and ALPHA in kinds:
            orig = extra.get("alpha")
            ok = src_.is_number(orig)
            if ok:
                expect = kohya_alpha(orig, rank, True)
                dt = alpha_dtype(expect, down.dtype)
                with np.errstate(over="ignore"):  # a hostile alpha past the tensor's dtype is a mismatch, not a warning
                    ok = float(np.asarray(expect, dtype=dt)) == alpha
            if ok:
                alpha, rslora = orig, True
            else:
                note = f"module {name!r}: rsLoRA alpha in {META_PARAMS} no longer fits the alpha tensor; kept kohya's alpha"
    params = {"rank": rank, "alpha": alpha, "rslora": rslora, "layout": layout, "fan_in_fan_out": fifo, "dora": False}
    mod = Module(name=name, encoding="lora", base_shape=base_shape, params=params, tensors={"A": A, "B": B})
    try:
        get_encoding("lora").validate(mod)
    except RecordError as e:
        raise InputError(f"{path}: {e}") from None
    return mod, info, note


# --- writing ---------------------------------------------------------------------------------


def sgm_name(name: str) -> str | None:
    """kohya's SDXL name of a diffusers UNet module (``unet.down_blocks.1.attentions.0.proj_in`` →
    ``lora_unet_input_blocks_4_1_proj_in``); None for other components; ConversionError for a UNet
    path SDXL's layout does not have."""
    if not name.startswith("unet."):
        return None
    sgm = sdxl_sgm_path(name[len("unet.") :])
    if sgm is None:
        raise ConversionError(f"module {name!r} has no SDXL UNet (SGM) name; export without sdxl_sgm")
    return "lora_unet_" + sgm.replace(".", "_")


def _alpha_tensor(m: Module, no_alpha: list[str], recorded: dict[str, Any], a_dtype: np.dtype, where: str) -> np.ndarray | None:
    """The alpha tensor to write for ``m``; None to leave it out (kohya: alpha = rank).

    ``no_alpha`` / ``recorded`` come from a kohya import (``source["no_alpha"]`` / ``["alpha_tensors"]``);
    a recorded tensor is rebuilt only while it still holds the module's alpha and has one element.
    Refuses (naming ``where``) an alpha kohya's loaders would misread: they read it as float32
    (:func:`~.export.float32_alpha`) and alpha 0 as alpha = rank.
    """
    p = m.params
    rank, alpha, rslora = p["rank"], p["alpha"], bool(p.get("rslora", False))
    implied = not rslora and alpha == rank
    if m.name in no_alpha and implied:
        return None
    value = kohya_alpha(alpha, rank, rslora)
    if value == 0:
        raise ConversionError(f"{where}: alpha 0 (scale 0) cannot be written: kohya's loaders read alpha 0 as alpha = rank")
    float32_alpha(value, where, "kohya's loaders")
    info = recorded.get(m.name)
    if info is not None and not rslora:
        arr = _recorded_alpha(info, alpha, implied)
        if arr is not None:
            return arr
    return np.asarray(value, dtype=alpha_dtype(value, a_dtype))


def _recorded_alpha(info: dict[str, Any], alpha: float, implied: bool) -> np.ndarray | None:
    """The alpha tensor a kohya import recorded (dtype, shape, value), or None when it no longer fits."""
    value = info.get("value")
    if not src_.is_number(value) or not (value == alpha or (value == 0 and implied)):
        return None
    shape = src_.fitting_shape(info.get("shape"), 1)  # one element, as read_kohya requires
    name = info.get("dtype")
    if shape is None or not isinstance(name, str):
        return None
    try:
        row = dtypes.by_name(name)
    except AdapterpackError:
        return None
    if not (row.is_float or np.dtype(row.numpy).kind in "iu"):
        return None
    with np.errstate(all="ignore"):
        arr = np.full(shape, value, dtype=row.numpy)
    return arr if float(arr.reshape(-1)[0]) == value else None


def kohya_state(
    adapter: Adapter,
    *,
    prefix: str | None = None,
    dtype: str | None = None,
    drop_tensors: bool = False,
    sdxl_sgm: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata a kohya export writes (``sdxl_sgm``: see :func:`write_kohya`)."""
    state = StateDict(dtype, "kohya")
    src = src_.provenance(adapter, "kohya")
    recorded = src_.str_map(adapter, src, "kohya_names")
    no_alpha = src_.str_list(adapter, src, "no_alpha")
    alphas = src_.object_map(adapter, src, "alpha_tensors")
    meta = dict(src_.str_map(adapter, src, "safetensors_metadata"))
    prefix = prefix or DEFAULT_PREFIX
    names: dict[str, str] = {}
    mparams: dict[str, dict[str, Any]] = {}
    records = lora_records(adapter, "kohya")
    numbered = numbered_text_encoders(m.name for m in records)
    for m in records:
        p = m.params
        if p.get("dora", False):
            raise ConversionError(
                f"module {m.name!r} is DoRA; kohya/LyCORIS dora_scale normalises differently from PEFT's magnitude, "
                "so it cannot be exported faithfully"
            )
        k = recorded.get(m.name) or (sgm_name(m.name) if sdxl_sgm else None)
        k = k or kohya_name_of(m.name, numbered) or kohya_name(m.name, prefix)
        if "." in k:
            raise ConversionError(f"module {m.name!r:.80}: kohya name {k!r:.80} holds a '.', which ends a kohya module name")
        if k != m.name:
            names[k] = m.name
        a, b = state.cast(m.array("A"), f"module {m.name!r} tensor 'A'"), state.cast(m.array("B"), f"module {m.name!r} tensor 'B'")
        layout = p.get("layout", "linear")
        fifo = bool(p.get("fan_in_fan_out", False))
        if layout == "embedding" or fifo:
            down, up = b.T, a.T
            mparams[k] = {"layout": "embedding" if layout == "embedding" else "fan_in_fan_out"}
        else:
            down, up = a, b
        if p.get("rslora", False):
            mparams.setdefault(k, {}).update({"rslora": True, "alpha": p["alpha"]})
        state.put(f"{k}.{DOWN}", down, cast=False)
        state.put(f"{k}.{UP}", up, cast=False)
        alpha = _alpha_tensor(m, no_alpha, alphas, down.dtype, f"adapter {adapter.name!r} module {m.name!r}")
        if alpha is not None:
            state.put(f"{k}.{ALPHA}", alpha, cast=False)
    for key, t in pass_through(adapter, own=("kohya",), drop_tensors=drop_tensors, target="a kohya file").items():
        state.put(key, as_array(t))
    _set_json(meta, META_NAMES, names)
    _set_json(meta, META_PARAMS, mparams)
    return state.tensors, meta


def _set_json(meta: dict[str, str], key: str, value: dict[str, Any]) -> None:
    """Store ``value`` under ``key`` (dropping the key when empty), keeping an equal original string."""
    if not value:
        meta.pop(key, None)
        return
    if key in meta:
        try:
            if json.loads(meta[key]) == value:
                return
        except (ValueError, RecursionError):
            pass
    meta[key] = json.dumps(value, sort_keys=True, separators=(",", ":"))


def write_kohya(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    prefix: str | None = None,
    dtype: str | None = None,
    drop_tensors: bool = False,
    sdxl_sgm: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write ``adapter`` as a kohya LoRA ``.safetensors`` file, atomically (``overwrite`` false:
    OutputExistsError if it exists).

    ``prefix`` names dotted modules (default ``lora_unet``); ``dtype`` casts float tensors;
    ``drop_tensors`` leaves out pass-through tensors of a non-kohya origin (PEFT
    ``modules_to_save`` weights), which are refused otherwise. ``sdxl_sgm`` names an SDXL UNet's
    diffusers modules by the original SGM paths, as kohya's sd-scripts names SDXL LoRAs
    (``lora_unet_input_blocks_4_1_…``; default: the diffusers paths, ``lora_unet_down_blocks_1_…``,
    which ComfyUI and diffusers also read).
    """
    from safetensors.numpy import save  # safetensors: only writers import it

    tensors, meta = kohya_state(adapter, prefix=prefix, dtype=dtype, drop_tensors=drop_tensors, sdxl_sgm=sdxl_sgm)
    data = save(tensors, metadata=meta or None)
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(data)
    return Path(path)
