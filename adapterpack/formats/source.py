"""Typed reads of ``adapter.source``: provenance that may come from an untrusted ``.apack`` index.

An importer records how to rebuild its original file (``key_overrides``, ``kohya_names``,
``safetensors_metadata``, ...) in ``adapter.source``; the writer stores that dict verbatim and
the reader gives it back as any JSON object. Every consumer reads it through these accessors,
so a crafted value gives one clear :class:`~adapterpack.errors.ConversionError` naming the key
(a value of the wrong type: an export cannot be faithful to it) or is ignored (``notes``,
which are only shown, and per-module entries that no longer fit the module's real tensors,
which an edit of the adapter would also cause), never a Python ``TypeError`` or a huge
allocation.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter
from adapterpack.errors import AdapterpackError, ConversionError, InputError
from adapterpack.limits import MAX_NDIM

#: Invocation tokens an activated LoRA may list (a prompt's worth; the config's own size limit bounds it too).
MAX_ALORA_TOKENS = 4096


def json_metadata(meta: dict[str, str], key: str, path: Path) -> dict[str, Any]:
    """The JSON object a safetensors metadata ``key`` holds ({} when absent); InputError when it is not one."""
    if key not in meta:
        return {}
    try:
        obj = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise InputError(f"{path}: metadata {key!r} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: metadata {key!r} must be a JSON object")
    return obj


def common_float(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A module's two factors in one float dtype, exactly: PEFT, kohya and diffusers copy each factor into
    its layer's dtype, so a file may hold, say, a float16 A and a bfloat16 B; a record holds one dtype.

    Two floats of different dtypes become the narrowest dtype holding both exactly (float32, or float64
    beside a float64); anything else is returned as is, for the record's check to name."""
    if a.dtype == b.dtype:
        return a, b
    try:
        da, db = dtypes.of_array(a), dtypes.of_array(b)
    except AdapterpackError:
        return a, b
    if not (da.is_float and db.is_float):
        return a, b
    wide = np.float64 if max(a.dtype.itemsize, b.dtype.itemsize) == 8 else np.float32
    return a.astype(wide), b.astype(wide)


def mixed_dtype_note(names: list[str]) -> list[str]:
    """The note for modules whose factors :func:`common_float` widened (none when ``names`` is empty)."""
    if not names:
        return []
    more = ", ..." if len(names) > 3 else ""
    return [f"{len(names)} modules have factors of two float dtypes, both held in the wider float dtype (exact): "
            + ", ".join(names[:3]) + more]  # fmt: skip


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (JSON numbers a config or record may hold)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def provenance(adapter: Adapter, fmt: str) -> dict[str, Any]:
    """``adapter.source`` when it records an import from ``fmt`` (``"peft"``, ``"kohya"``), else ``{}``."""
    src = adapter.source
    return src if isinstance(src, dict) and src.get("format") == fmt else {}


def source_format(adapter: Adapter) -> str | None:
    """The format ``adapter`` was imported from, or None (also for a non-string value)."""
    src = adapter.source
    fmt = src.get("format") if isinstance(src, dict) else None
    return fmt if isinstance(fmt, str) else None


def notes(adapter: Adapter) -> list[str]:
    """The importer's notes; a value that is not a list of strings is replaced by a note saying so."""
    src = adapter.source
    value = src.get("notes", []) if isinstance(src, dict) else []
    if isinstance(value, list) and all(isinstance(n, str) for n in value):
        return list(value)
    return [f"source['notes'] ignored: not a list of strings ({value!r:.60})"]


def malformed(adapter: Adapter, key: str, what: str, value: Any) -> ConversionError:
    """The error for ``source[key]`` not being ``what``."""
    return ConversionError(
        f"adapter {adapter.name!r}: source[{key!r}] must be {what}, got {value!r:.80} "
        "(the provenance recorded in the file is malformed; a faithful export is not possible)"
    )


def typed_map(adapter: Adapter, src: dict[str, Any], key: str, value_type: type, what: str) -> dict[str, Any]:
    """``src[key]`` as an object whose values are all ``value_type`` (``{}`` when absent)."""
    value = src.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, value_type) for v in value.values()):
        raise malformed(adapter, key, what, value)
    return value


def str_map(adapter: Adapter, src: dict[str, Any], key: str) -> dict[str, str]:
    """``src[key]`` as a string → string map (``{}`` when absent)."""
    return typed_map(adapter, src, key, str, "an object of strings")


def str_list(adapter: Adapter, src: dict[str, Any], key: str) -> list[str]:
    """``src[key]`` as a list of strings (``[]`` when absent)."""
    value = src.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise malformed(adapter, key, "a list of strings", value)
    return value


def object_map(adapter: Adapter, src: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    """``src[key]`` as module name → object (``{}`` when absent); the objects' fields are the caller's to check."""
    return typed_map(adapter, src, key, dict, "an object of objects (module name → {...})")


def key_overrides(adapter: Adapter, src: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``src["key_overrides"]``: module name → slot → full tensor key."""
    value = object_map(adapter, src, "key_overrides")
    if not all(isinstance(k, str) and isinstance(v, str) for slots in value.values() for k, v in slots.items()):
        raise malformed(adapter, "key_overrides", "module name → {slot: key} with string keys", value)
    return value


def fitting_shape(value: Any, size: int) -> tuple[int, ...] | None:
    """``value`` as a shape when it is a list of at most :data:`MAX_NDIM` non-negative ints with ``size``
    elements, else None: a recorded shape is only used when it fits the real tensor."""
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max(size, 1) for d in value):
        return None
    return tuple(value) if math.prod(value) == size else None


def config(adapter: Adapter, src: dict[str, Any]) -> dict[str, Any] | None:
    """``src["config"]`` (a PEFT adapter_config.json dict) checked as :func:`~.peft.check_config` checks a file's."""
    if "config" not in src:
        return None
    value = src["config"]
    if not isinstance(value, dict):
        raise malformed(adapter, "config", "an adapter_config.json object", value)
    check_config(value, f"adapter {adapter.name!r}: source['config']", ConversionError)
    return value


#: PEFT's defaults when adapter_config.json omits r or lora_alpha.
DEFAULT_R = 8
DEFAULT_ALPHA = 8


def check_config(cfg: dict[str, Any], where: str, error: type[AdapterpackError] = InputError) -> None:
    """Refuse (as ``error``) a config that is not LoRA or has r / alpha / patterns / flags /
    target_modules of the wrong type: everything reading and writing looks at, so a config from
    a file or from an .apack's recorded source can then be used without further checks."""
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise error(f"{where}: peft_type is {peft_type!r:.40}; only LoRA adapters (peft_type LORA) can be read")
    r = cfg.get("r", DEFAULT_R)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise error(f"{where}: r must be a positive integer, got {r!r:.40}")
    _number(cfg.get("lora_alpha", DEFAULT_ALPHA), "lora_alpha", where, error)
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise error(f"{where}: {key} must be an object, got {pat!r:.80}")
        for k, v in pat.items():
            if key == "rank_pattern" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise error(f"{where}: rank_pattern[{k!r}] must be a positive integer, got {v!r:.40}")
            if key == "alpha_pattern":
                _number(v, f"alpha_pattern[{k!r}]", where, error)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):  # null: off, as PEFT tests the flag for truth
        if not isinstance(cfg.get(key, False), (bool, type(None))):
            raise error(f"{where}: {key} must be true or false, got {cfg[key]!r:.40}")
    if cfg.get("alora_invocation_tokens") is not None:
        alora_tokens(cfg["alora_invocation_tokens"], f"{where}: alora_invocation_tokens", error)
    for key in ("target_modules", "modules_to_save"):
        tm = cfg.get(key)
        if not (tm is None or isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(x, str) for x in tm))):
            raise error(f"{where}: {key} must be a string, a list of strings or null, got {tm!r:.80}")


def alora_tokens(value: Any, where: str, error: type[AdapterpackError] = InputError) -> list[int]:
    """An activated LoRA's invocation token ids (PEFT's ``alora_invocation_tokens``, llama.cpp's
    ``adapter.alora.invocation_tokens``): a non-empty list of integers in [0, 2^32)."""
    ok = isinstance(value, list) and value and len(value) <= MAX_ALORA_TOKENS
    if not ok or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in value):
        raise error(f"{where} must be a non-empty list of at most {MAX_ALORA_TOKENS} token ids (integers >= 0), got {value!r:.80}")
    return list(value)


def adapter_alora_tokens(adapter: Adapter) -> list[int] | None:
    """The invocation tokens of an activated LoRA (aLoRA: it applies only from that token sequence on), as its
    PEFT config or its GGUF file gave them; None for a plain LoRA."""
    src = adapter.source if isinstance(adapter.source, dict) else {}
    if "alora_invocation_tokens" in src:  # a GGUF import, or an export that rebuilt the adapter (vLLM's)
        value = src["alora_invocation_tokens"]
    else:
        cfg = config(adapter, provenance(adapter, "peft"))
        value = cfg.get("alora_invocation_tokens") if cfg else None
    if value is None:
        return None
    return alora_tokens(value, f"adapter {adapter.name!r}: recorded alora_invocation_tokens", ConversionError)


#: PEFT ``init_lora_weights`` values whose initialisation rewrites the base weights (W ← W − s·B₀A₀ and the like), which
#: PEFT replays on every load: for such an adapter saved without conversion, ΔW against the original base is not s·B·A.
BASE_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def base_init(adapter: Adapter) -> str | None:
    """The PEFT ``init_lora_weights`` of ``adapter`` when it is one that rewrites the base weights (:data:`BASE_INITS`),
    else None."""
    try:
        cfg = config(adapter, provenance(adapter, "peft"))
    except ConversionError:
        return None
    init = cfg.get("init_lora_weights") if cfg else None
    if isinstance(init, str) and init.lower().startswith(BASE_INITS):
        return init
    return None


def base_init_problem(adapter: Adapter) -> str | None:
    """Why ``adapter``'s factors alone are not its ΔW (:func:`base_init`), or None."""
    init = base_init(adapter)
    if init is None:
        return None
    return (
        f"adapter {adapter.name!r} was initialised with init_lora_weights={init!r:.40}, which rewrites the base weights "
        "(PEFT replays it on load), so its ΔW is not scale·B·A; convert it to a plain LoRA with PEFT first "
        "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
    )


def refuse_base_init(adapter: Adapter, target: str) -> None:
    """ConversionError for an adapter whose ΔW is not its factors' (:func:`base_init_problem`) going to ``target``."""
    why = base_init_problem(adapter)
    if why is not None:
        raise ConversionError(f"{why}; {target} would apply scale·B·A to the original weights instead")


def refuse_alora(adapter: Adapter, target: str) -> None:
    """ConversionError for an activated LoRA going to ``target``, which has no invocation tokens: there it would
    apply to every token, a different adapter."""
    if adapter_alora_tokens(adapter) is not None:
        raise ConversionError(
            f"adapter {adapter.name!r} is an activated LoRA (aLoRA: it applies only from its invocation tokens on); "
            f"{target} has no invocation tokens and would apply it to every token (PEFT and GGUF outputs keep them)"
        )


def _number(value: Any, what: str, where: str, error: type[AdapterpackError]) -> None:
    if not is_number(value):
        raise error(f"{where}: {what} must be a finite number, got {value!r:.40}")
