"""PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``) ↔ :class:`Adapter`.

PEFT saves one key per factor: ``<prefix><module>.lora_A.weight`` / ``.lora_B.weight`` for
linear and conv layers, ``<prefix><module>.lora_embedding_A`` / ``_B`` for embeddings and, with
DoRA, ``<prefix><module>.lora_magnitude_vector`` (PEFT 0.21; older releases wrote
``lora_magnitude_vector.weight``, also accepted). ``<prefix>`` is ``base_model.model.``; the
module name is the base model's (``model.layers.0.self_attn.q_proj``). Conv DoRA magnitudes are
saved as ``[1, out, 1, ...]`` and held as ``[out]``.

Reading keeps everything an export needs to rebuild the identical folder: the config verbatim,
the key prefix, any key that deviates from the default names, the safetensors metadata.
Everything that is not a LoRA factor (``modules_to_save`` weights, saved embedding layers,
unknown keys) is carried untouched in ``adapter.tensors`` under its full original key.

Per-module rank and alpha follow PEFT: ``rank_pattern`` / ``alpha_pattern`` (see
:mod:`.patterns`), ``use_rslora``, ``fan_in_fan_out``. The rank is read from the tensor shapes
and must agree with the config. PEFT decides ``fan_in_fan_out`` per layer type (GPT-2 ``Conv1D`` yes,
``nn.Linear`` no) whatever the config says, and saves the flag of the last layer it wrapped (a GPT-2
adapter with ``lm_head`` says false). For a base model known to be of GPT-2's family (the config's
``auto_mapping`` class or a GPT-2 hub id) we apply PEFT's rule by layer name (``c_attn``, ``q_attn``,
``c_proj``, ``c_fc`` are Conv1D); otherwise, without the base model, the config's flag to every linear module.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module, as_array
from adapterpack.atomic import PinnedFiles, atomic_dir, pinned_files
from adapterpack.encodings import get_encoding
from adapterpack.errors import AdapterpackError, ConversionError, InputError, RecordError, UnsafeInputError
from adapterpack.formats import source as src_
from adapterpack.formats.export import StateDict, lora_records, pass_through
from adapterpack.formats.patterns import build_patterns, most_common, resolve
from adapterpack.formats.safetensors_header import read_header
from adapterpack.formats.source import DEFAULT_ALPHA, DEFAULT_R, check_config
from adapterpack.limits import MAX_PEFT_CONFIG

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
#: The model card PEFT's save_pretrained writes beside the adapter; carried to folder outputs (source["model_card"]).
CARD_NAME = "README.md"
#: A larger model card is not carried (it would sit in every .apack index made from the folder).
MAX_MODEL_CARD = 256 * 1024
DEFAULT_PREFIX = "base_model.model."
#: PEFT's LoraConfig defaults for keys an old or hand-written config may lack.
#: Oldest torch whose ``torch.load(weights_only=True)`` cannot be made to run code (CVE-2025-32434).
MIN_SAFE_TORCH = (2, 6)

_KEY = re.compile(
    r"^(?P<stem>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?P<tail>\.weight)?$"
)
#: transformers classes (by name prefix) whose blocks use GPT-2's ``Conv1D`` (weight in × out), and those layers' names.
CONV1D_CLASSES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer")
CONV1D_LEAVES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
_CONV1D_IDS = re.compile(r"(?:^|/)(?:(?:distil)?gpt2(?:-(?:medium|large|xl))?|openai-gpt|imagegpt-(?:small|medium|large))$", re.I)
_SLOT = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B", "lora_magnitude_vector": "magnitude"}


def check_module_path(name: str, module: str) -> None:
    """Refuse ``name`` (module ``module``'s name in a PEFT-style key) unless it is a torch module path:
    dot-separated, no part empty, no part one of PEFT's own LoRA parameter names (PEFT would read the
    key as another module's factor)."""
    parts = name.split(".")
    if "" in parts or not _SLOT.keys().isdisjoint(parts):
        what = "an empty part" if "" in parts else f"the part {next(p for p in parts if p in _SLOT)!r}"
        raise ConversionError(f"module {module!r:.80}: {name!r:.80} is not a module path ({what}); PEFT keys could not name it")


def default_suffix(slot: str, layout: str) -> str:
    """The key suffix PEFT 0.21 writes for ``slot`` of a module with ``layout``."""
    if slot == "magnitude":
        return "lora_magnitude_vector"
    if layout == "embedding":
        return f"lora_embedding_{slot}"
    return f"lora_{slot}.weight"


def magnitude_shape(layout: str, out: int, ndim_a: int) -> tuple[int, ...]:
    """The shape PEFT gives a DoRA magnitude: ``[out]``, or ``[1, out, 1, ...]`` for convolutions."""
    if layout == "conv":
        return (1, out, *([1] * (ndim_a - 2)))
    return (out,)


# --- reading ---------------------------------------------------------------------------------


def _folder(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.is_file() and (p.name == CONFIG_NAME or p.name in (SAFETENSORS_NAME, BIN_NAME)):
        return p.parent
    if not p.exists():
        raise InputError(f"{p}: no such PEFT adapter folder")
    raise InputError(f"{p}: not a PEFT adapter folder (expected a folder with {CONFIG_NAME})")


def read_config(folder: Path, files: PinnedFiles) -> dict[str, Any]:
    """The adapter_config.json dict (of the folder's version ``files`` pins), checked by :func:`check_config`."""
    path = folder / CONFIG_NAME
    if CONFIG_NAME not in files:
        raise InputError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    with open(files.path(CONFIG_NAME), "rb") as f:
        data = f.read(MAX_PEFT_CONFIG + 1)
    if len(data) > MAX_PEFT_CONFIG:
        raise InputError(f"{path}: {CONFIG_NAME} is over the limit of {MAX_PEFT_CONFIG} bytes")
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    check_config(cfg, str(path))
    return cfg


def read_safetensors(path: Path, *, opened: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """All tensors of a safetensors file as numpy (bf16 as ml_dtypes.bfloat16) and its metadata; read from
    ``opened`` when given (a path to the same file, :meth:`~adapterpack.atomic.PinnedFiles.path`).

    The header is checked first (:func:`~.safetensors_header.read_header`: limits, shapes, byte ranges),
    so ``safetensors`` only ever builds objects for a bounded number of consistent tensors.
    """
    from safetensors import safe_open  # safetensors: only reading tensors needs it (name checks, headers do not)

    try:
        header = read_header(opened or path)
    except InputError as e:
        raise InputError(f"{path}: cannot read safetensors file ({str(e).removeprefix(f'{opened or path}: ')})") from None
    for k, t in header.tensors.items():  # before safetensors maps a dtype numpy lacks (F8_E4M3: "module 'numpy' has no attribute")
        try:
            dtypes.by_safetensors(t.dtype)
        except AdapterpackError:
            raise InputError(f"{path}: tensor {k!r:.200} has dtype {t.dtype}, which adapterpack cannot store") from None
    if any(t.dtype == "BF16" for t in header.tensors.values()):
        dtypes.by_name("bfloat16").numpy  # noqa: B018  (imports ml_dtypes, which registers the dtype safetensors asks numpy for)
    try:
        with safe_open(opened or path, framework="np") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError, OSError, TypeError for odd dtypes
        raise InputError(f"{path}: cannot read safetensors file ({e})") from None
    for k, arr in tensors.items():
        try:
            dtypes.of_array(arr)
        except AdapterpackError:
            raise InputError(f"{path}: tensor {k!r} has dtype {arr.dtype}, which adapterpack cannot store") from None
    return tensors, (dict(meta) if meta else None)


def read_torch_bin(path: Path, *, opened: str | None = None) -> dict[str, np.ndarray]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)`` (never a full unpickle); read from
    ``opened`` when given, as :func:`read_safetensors`."""
    try:
        import torch  # torch: optional, only .bin state dicts need it
    except ImportError:
        raise InputError(f"{path}: reading a .bin state dict needs torch (pip install adapterpack[torch])") from None
    if torch_version(torch.__version__) < MIN_SAFE_TORCH:
        raise UnsafeInputError(
            f"{path}: refusing to read a .bin file with torch {torch.__version__}: before 2.6, "
            "torch.load(weights_only=True) can be made to run code (CVE-2025-32434); upgrade torch to 2.6 or later, "
            "or convert the adapter to safetensors with a trusted tool"
        )
    try:
        sd = torch.load(opened or path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeInputError(f"{path}: refused by torch.load(weights_only=True), it holds more than tensors ({first})") from None
    except Exception as e:
        raise InputError(f"{path}: cannot read torch state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise InputError(f"{path}: expected a state dict (name → tensor), got {type(sd).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise InputError(f"{path}: entry {k!r} is not a named tensor")
        t = v.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            arr = t.view(torch.int16).numpy().view(dtypes.by_name("bfloat16").numpy)
        else:
            try:
                arr = t.numpy()
            except TypeError:
                raise InputError(f"{path}: tensor {k!r} has dtype {t.dtype}, which adapterpack cannot store") from None
        try:
            dtypes.of_array(arr)
        except AdapterpackError:
            raise InputError(f"{path}: tensor {k!r} has dtype {t.dtype}, which adapterpack cannot store") from None
        out[k] = arr.copy()
    return out


def torch_version(version: str) -> tuple[int, ...]:
    """``"2.6.0+cpu"`` → ``(2, 6, 0)``: the leading numbers of a version string (``(0,)`` if none)."""
    out = []
    for part in version.split("+")[0].split(".")[:3]:
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
    return tuple(out) or (0,)


def _group(tensors: dict[str, np.ndarray], where: Path) -> tuple[dict[str, dict[str, tuple[str, str]]], list[str]]:
    """LoRA keys by stem: stem → slot → (key, kind); and the keys that are not LoRA factors."""
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    other: list[str] = []
    for key in tensors:
        m = _KEY.match(key)
        if m is None:
            other.append(key)
            continue
        slot = _SLOT[m["kind"]]
        g = groups.setdefault(m["stem"], {})
        if slot in g:
            raise InputError(f"{where}: module {m['stem']!r} has two {slot} tensors: {g[slot][0]!r} and {key!r}")
        g[slot] = (key, m["kind"])
    return groups, other


def read_peft(path: str | os.PathLike[str]) -> Adapter:
    """Read a PEFT LoRA adapter folder (or a file inside one) into an :class:`Adapter`.

    The config and the weights are opened together (:func:`~adapterpack.atomic.pinned_files`), so they
    come from one version of a folder that a writer replaces meanwhile."""
    folder = _folder(path)
    meta = None
    with pinned_files(folder, (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, CARD_NAME), last=CONFIG_NAME) as files:
        cfg = read_config(folder, files)
        card, card_note = _model_card(files)
        if SAFETENSORS_NAME in files:
            tensors, meta = read_safetensors(folder / SAFETENSORS_NAME, opened=files.path(SAFETENSORS_NAME))
            weights = SAFETENSORS_NAME
        elif BIN_NAME in files:
            tensors = read_torch_bin(folder / BIN_NAME, opened=files.path(BIN_NAME))
            weights = BIN_NAME
        else:
            raise InputError(f"{folder}: no {SAFETENSORS_NAME} or {BIN_NAME} next to {CONFIG_NAME}")

    groups, other = _group(tensors, folder / weights)
    if not groups:
        raise InputError(f"{folder / weights}: no LoRA tensors (lora_A/lora_B or lora_embedding_A/B)")
    prefix = _prefix(groups, folder / weights)
    source: dict[str, Any] = {"format": "peft", "config": cfg, "key_prefix": prefix, "weights_file": weights}
    if meta is not None:
        source["safetensors_metadata"] = meta
    if card is not None:
        source["model_card"] = card
    overrides: dict[str, dict[str, str]] = {}
    mag_shapes: dict[str, list[int]] = {}
    mixed: list[str] = []

    adapter = Adapter(
        name="default",
        base_model=cfg.get("base_model_name_or_path") if isinstance(cfg.get("base_model_name_or_path"), str) else None,
        base_architecture=_architecture(cfg),
        source=source,
    )
    for stem, g in groups.items():
        name = stem[len(prefix) :]
        mod = _module(name, g, tensors, cfg, folder)
        for slot, (key, _) in g.items():
            if key != f"{prefix}{name}.{default_suffix(slot, mod.params['layout'])}":
                overrides.setdefault(name, {})[slot] = key
        if "magnitude" in g:
            raw, a, b = tensors[g["magnitude"][0]], tensors[g["A"][0]], tensors[g["B"][0]]
            if tuple(raw.shape) != magnitude_shape(mod.params["layout"], int(b.shape[0]), a.ndim):
                mag_shapes[name] = list(raw.shape)
        adapter.modules[name] = mod
        if tensors[g["A"][0]].dtype != tensors[g["B"][0]].dtype:
            mixed.append(name)
    for key in other:
        adapter.tensors[key] = tensors[key]
    if overrides:
        source["key_overrides"] = overrides
    if mag_shapes:
        source["magnitude_shapes"] = mag_shapes
    notes = _notes(cfg, adapter) + ([card_note] if card_note else []) + src_.mixed_dtype_note(mixed)
    if notes:
        source["notes"] = notes
    return adapter


def _model_card(files: PinnedFiles) -> tuple[str | None, str | None]:
    """The folder's README.md text (None when absent), or None and a note saying why it is not carried."""
    if CARD_NAME not in files:
        return None, None
    if os.path.getsize(files.path(CARD_NAME)) > MAX_MODEL_CARD:
        return None, f"{CARD_NAME} is larger than {MAX_MODEL_CARD:,} B: not carried to outputs"
    try:
        return files.read_bytes(CARD_NAME).decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"{CARD_NAME} is not UTF-8 text: not carried to outputs"


def model_card(adapter: Adapter) -> str | None:
    """The model card an import recorded (``source["model_card"]``, any format), or None (also for a non-string value)."""
    card = adapter.source.get("model_card") if isinstance(adapter.source, dict) else None
    return card if isinstance(card, str) else None


def _prefix(groups: dict[str, Any], where: Path) -> str:
    """PEFT's key prefix when every LoRA key has it, ``""`` when none has; a mix is refused, since
    folding ``base_model.model.`` into some module names would give names no base model has."""
    have = [s.startswith(DEFAULT_PREFIX) for s in groups]
    if all(have):
        return DEFAULT_PREFIX
    if any(have):
        with_p = next(s for s in groups if s.startswith(DEFAULT_PREFIX))
        without = next(s for s in groups if not s.startswith(DEFAULT_PREFIX))
        raise InputError(
            f"{where}: some LoRA keys start with {DEFAULT_PREFIX!r} and some do not (e.g. {with_p!r} and {without!r}); "
            "the module names are ambiguous"
        )
    return ""


def _architecture(cfg: dict[str, Any]) -> str | None:
    auto = cfg.get("auto_mapping")
    if isinstance(auto, dict) and isinstance(auto.get("base_model_class"), str):
        return auto["base_model_class"]
    return None


def conv1d_family(cfg: dict[str, Any]) -> bool:
    """Whether the config names a base model of GPT-2's family (its ``auto_mapping`` class, or else a GPT-2 hub id),
    whose ``c_attn`` / ``q_attn`` / ``c_proj`` / ``c_fc`` layers are ``Conv1D``."""
    cls = _architecture(cfg)
    if cls is not None:
        return cls.startswith(CONV1D_CLASSES)
    name = cfg.get("base_model_name_or_path")
    return isinstance(name, str) and _CONV1D_IDS.search(name.rstrip("/")) is not None


def fan_in_fan_out(cfg: dict[str, Any], name: str) -> bool:
    """The ``fan_in_fan_out`` PEFT gives linear module ``name``: by layer type in a GPT-2-family model (see
    :func:`conv1d_family`), else the config's flag."""
    if conv1d_family(cfg):
        return name.rsplit(".", 1)[-1] in CONV1D_LEAVES
    return bool(cfg.get("fan_in_fan_out", False))


def conv1d_layout(adapter: Adapter, architectures: list[str]) -> Adapter:
    """``adapter`` with PEFT's per-layer ``fan_in_fan_out`` when its base model is of GPT-2's family by
    ``architectures`` (a base model's config.json): for a PEFT import whose config did not say so (a local base
    path), which read the config's flag, saved by PEFT from the last layer it wrapped. Other adapters as they are."""
    if src_.source_format(adapter) != "peft" or not any(a.startswith(CONV1D_CLASSES) for a in architectures):
        return adapter
    flip = [
        m
        for m in adapter
        if m.encoding == "lora"
        and m.params.get("layout", "linear") == "linear"
        and bool(m.params.get("fan_in_fan_out")) != (m.name.rsplit(".", 1)[-1] in CONV1D_LEAVES)
    ]
    if not flip:
        return adapter
    modules = dict(adapter.modules)
    for m in flip:
        params = dict(m.params) | {"fan_in_fan_out": not m.params.get("fan_in_fan_out")}
        modules[m.name] = Module(m.name, m.encoding, tuple(m.base_shape)[::-1], params, dict(m.tensors))
    return adapter.derived(modules)


def _module(name: str, g: dict[str, tuple[str, str]], tensors: dict[str, np.ndarray], cfg: dict[str, Any], folder: Path) -> Module:
    where = f"{folder}: module {name!r}"
    if not name:
        raise InputError(f"{folder}: LoRA key {next(iter(g.values()))[0]!r} names no module")
    if "A" not in g or "B" not in g:
        have = ", ".join(k for k, _ in g.values())
        raise InputError(f"{where} needs both LoRA factors (A and B); found only {have}")
    kinds = {g["A"][1], g["B"][1]}
    if kinds not in ({"lora_A", "lora_B"}, {"lora_embedding_A", "lora_embedding_B"}):
        raise InputError(f"{where} mixes embedding and linear factor keys: {g['A'][0]!r}, {g['B'][0]!r}")
    a, b = src_.common_float(tensors[g["A"][0]], tensors[g["B"][0]])
    if a.ndim < 2 or b.ndim < 2:
        raise InputError(f"{where}: factors must have at least 2 dimensions, got A {list(a.shape)}, B {list(b.shape)}")
    rank = int(a.shape[0])
    if b.shape[1] != rank:
        if a.ndim >= 3 and b.shape[1] and rank % b.shape[1] == 0:
            raise InputError(
                f"{where}: conv factors A {list(a.shape)} and B {list(b.shape)} come from a grouped convolution "
                f"(groups = {rank // b.shape[1]}), which adapterpack does not support"
            )
        raise InputError(f"{where}: A {list(a.shape)} and B {list(b.shape)} disagree on the rank")
    r_cfg = resolve(cfg.get("rank_pattern"), cfg.get("r", DEFAULT_R), name)
    if r_cfg != rank:
        raise InputError(f"{where}: tensors have rank {rank} but adapter_config.json gives r={r_cfg} (r / rank_pattern)")
    alpha = resolve(cfg.get("alpha_pattern"), cfg.get("lora_alpha", DEFAULT_ALPHA), name)
    if "lora_embedding_A" in kinds:
        layout = "embedding"
        base_shape: tuple[int, ...] = (int(a.shape[1]), int(b.shape[0]))
    elif a.ndim >= 3:
        layout = "conv"
        base_shape = (int(b.shape[0]), *(int(d) for d in a.shape[1:]))
    else:
        layout = "linear"
        base_shape = (int(b.shape[0]), int(a.shape[1]))
    fifo = layout == "linear" and fan_in_fan_out(cfg, name)
    if fifo:
        base_shape = base_shape[::-1]
    use_dora = bool(cfg.get("use_dora", False))
    slots = {"A": a, "B": b}
    if "magnitude" in g:
        if not use_dora:
            raise InputError(f"{where} has a DoRA magnitude vector but adapter_config.json has use_dora false")
        mag = tensors[g["magnitude"][0]]
        if mag.size != b.shape[0]:
            raise InputError(f"{where}: DoRA magnitude {list(mag.shape)} does not have one entry per output ({b.shape[0]})")
        slots["magnitude"] = mag.reshape(-1)
    elif use_dora:
        raise InputError(f"{where} has no lora_magnitude_vector but adapter_config.json has use_dora true")
    params = {
        "rank": rank,
        "alpha": alpha,
        "rslora": bool(cfg.get("use_rslora", False)),
        "layout": layout,
        "fan_in_fan_out": fifo,
        "dora": "magnitude" in slots,
    }
    mod = Module(name=name, encoding="lora", base_shape=base_shape, params=params, tensors=slots)
    try:
        get_encoding("lora").validate(mod)
    except RecordError as e:
        raise InputError(f"{folder}: {e}") from None
    return mod


def _notes(cfg: dict[str, Any], adapter: Adapter) -> list[str]:
    notes = []
    if adapter.tensors:
        some = ", ".join(list(adapter.tensors)[:3])
        more = ", ..." if len(adapter.tensors) > 3 else ""
        notes.append(f"{len(adapter.tensors)} tensors carried untouched (modules_to_save or not LoRA factors): {some}{more}")
    bias = [k for k in adapter.tensors if k.endswith(".lora_B.bias")]
    if bias:
        notes.append(
            f"lora_bias: {len(bias)} lora_B.bias tensors are carried untouched (a PEFT export writes them back), but delta() "
            "covers the weight only; PEFT adds scale · lora_B.bias to the base layer's bias"
        )
    if (why := src_.base_init_problem(adapter)) is not None:
        notes.append(f"{why}: merge and outputs other than PEFT are refused")
    if cfg.get("alora_invocation_tokens") is not None:
        notes.append(
            f"activated LoRA (aLoRA): it applies only from its {len(cfg['alora_invocation_tokens'])} invocation token(s) on; "
            "PEFT and GGUF outputs keep them, other outputs and merge are refused"
        )
    if cfg.get("fan_in_fan_out") and not conv1d_family(cfg) and any(m.params["layout"] == "linear" for m in adapter):
        notes.append("fan_in_fan_out applied to every linear module (PEFT turns it off for nn.Linear layers)")
    return notes


# --- writing ---------------------------------------------------------------------------------


def _module_values(adapter: Adapter) -> dict[str, dict[str, Any]]:
    out = {}
    for m in lora_records(adapter, "PEFT LoRA"):
        p = m.params
        out[m.name] = {
            "rank": p["rank"],
            "alpha": p["alpha"],
            "rslora": bool(p.get("rslora", False)),
            "dora": bool(p.get("dora", False)),
            "fifo": bool(p.get("fan_in_fan_out", False)),
            "layout": p.get("layout", "linear"),
        }
    return out


def _consistent(cfg: dict[str, Any], values: dict[str, dict[str, Any]]) -> bool:
    """Would PEFT (and :func:`read_peft`) give every module the rank, alpha and flags it has?"""
    for name, v in values.items():
        if resolve(cfg.get("rank_pattern"), cfg.get("r", DEFAULT_R), name) != v["rank"]:
            return False
        alpha = resolve(cfg.get("alpha_pattern"), cfg.get("lora_alpha", DEFAULT_ALPHA), name)
        if alpha != v["alpha"]:
            return False
        if bool(cfg.get("use_rslora", False)) != v["rslora"] or bool(cfg.get("use_dora", False)) != v["dora"]:
            return False
        if v["layout"] == "linear" and fan_in_fan_out(cfg, name) != v["fifo"]:
            return False
    return True


def _one(values: dict[str, dict[str, Any]], key: str, what: str) -> bool:
    flags = {v[key] for v in values.values()}
    if len(flags) > 1:
        on = [n for n, v in values.items() if v[key]][:2]
        raise ConversionError(f"PEFT has one {what} switch per adapter, but only some modules use it (e.g. {on})")
    return flags.pop()


def _target_name(name: str) -> str:
    """The end of module ``name`` a rebuilt target_modules lists: its last component, with its parents while that is
    a number (``to_out.0``: a bare ``0`` would also name block ``layers.0``, which PEFT then refuses to wrap)."""
    parts = name.split(".")
    i = len(parts) - 1
    while i > 0 and parts[i].isdigit():
        i -= 1
    return ".".join(parts[i:])


def _targets(cfg: dict[str, Any], names: list[str]) -> Any:
    """target_modules covering ``names`` as PEFT matches them: kept when it already does, else
    extended (or replaced) by the last name components of the modules it misses (:func:`_target_name`)."""
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        try:
            if all(re.fullmatch(tm, n) for n in names):
                return tm
        except re.error:
            pass
        tm = None
    if not isinstance(tm, list):
        return sorted({_target_name(n) for n in names})
    missed = [n for n in names if not any(n == x or n.endswith("." + x) for x in tm)]
    return tm + sorted({_target_name(n) for n in missed})


def synthesize_config(adapter: Adapter, base: dict[str, Any] | None = None, *, rank: int | None = None) -> dict[str, Any]:
    """A LoraConfig dict under which PEFT builds every module with its rank, alpha and flags.

    ``base`` (an original config, checked by :func:`check_config`) keeps its other fields.
    ``r`` / ``lora_alpha`` are the most common values (``rank``: ``r`` is that rank, ``lora_alpha``
    the commonest alpha among the modules of that rank); modules that differ get
    ``rank_pattern`` / ``alpha_pattern`` entries.
    """
    values = _module_values(adapter)
    cfg: dict[str, Any] = dict(base) if base else _skeleton(adapter)
    names = list(values)
    r = most_common([v["rank"] for v in values.values()]) if rank is None else rank
    alphas = [v["alpha"] for v in values.values() if v["rank"] == r]
    alpha = most_common(alphas or [v["alpha"] for v in values.values()])
    cfg["r"] = r
    cfg["lora_alpha"] = alpha
    cfg["rank_pattern"] = build_patterns({n: v["rank"] for n, v in values.items()}, r)
    cfg["alpha_pattern"] = build_patterns({n: v["alpha"] for n, v in values.items()}, alpha)
    cfg["use_rslora"] = _one(values, "rslora", "use_rslora")
    cfg["use_dora"] = _one(values, "dora", "use_dora")
    cfg["fan_in_fan_out"] = any(v["fifo"] for v in values.values())
    cfg["target_modules"] = _targets(cfg, names)
    if adapter.base_model is not None:
        cfg["base_model_name_or_path"] = adapter.base_model
    return cfg


def _skeleton(adapter: Adapter) -> dict[str, Any]:
    arch = adapter.base_architecture or ""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        "base_model_name_or_path": adapter.base_model,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": None,
    }


def peft_config(adapter: Adapter, *, rank: int | None = None) -> dict[str, Any]:
    """The adapter_config.json dict an export writes: the original one when it still describes
    every module exactly (and has ``r == rank`` when ``rank`` is given), else one rebuilt (from the
    original's other fields, if any; ``rank``: see :func:`synthesize_config`)."""
    original = src_.config(adapter, src_.provenance(adapter, "peft"))
    if original is not None and _consistent(original, _module_values(adapter)) and rank in (None, original.get("r")):
        return dict(original)
    cfg = synthesize_config(adapter, original, rank=rank)
    alora = src_.adapter_alora_tokens(adapter)  # an activated LoRA read from a GGUF file
    if alora is not None and cfg.get("alora_invocation_tokens") is None:
        cfg["alora_invocation_tokens"] = alora
        if cfg.get("task_type") is None:  # llama.cpp adapters are causal LMs, the one task PEFT runs aLoRA for
            cfg["task_type"] = "CAUSAL_LM"
    return cfg


def peft_tensors(adapter: Adapter, *, dtype: str | None = None, drop_tensors: bool = False) -> dict[str, np.ndarray]:
    """The state dict an export writes: PEFT key → numpy array."""
    state = StateDict(dtype, "PEFT")
    src = src_.provenance(adapter, "peft")
    prefix = src.get("key_prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str):
        raise src_.malformed(adapter, "key_prefix", "a string", prefix)
    overrides = src_.key_overrides(adapter, src)
    mag_shapes = src_.typed_map(adapter, src, "magnitude_shapes", list, "an object of shapes (module name → list)")
    for m in lora_records(adapter, "PEFT LoRA"):
        check_module_path(m.name, m.name)
        layout = m.params.get("layout", "linear")
        for slot in m.tensors:
            key = overrides.get(m.name, {}).get(slot, f"{prefix}{m.name}.{default_suffix(slot, layout)}")
            arr = m.array(slot)
            if slot == "magnitude":
                ndim_a = len(m.base_shape) if layout == "conv" else 2
                shape = src_.fitting_shape(mag_shapes.get(m.name), arr.size)
                arr = arr.reshape(shape or magnitude_shape(layout, int(arr.shape[0]), ndim_a))
            state.put(key, arr)
    for key, t in pass_through(adapter, own=(None, "peft"), drop_tensors=drop_tensors, target="PEFT").items():
        state.put(key, as_array(t))
    return state.tensors


def pipeline_modules(adapter: Adapter) -> list[str]:
    """Modules of a diffusers / kohya (Stable Diffusion) import named under a pipeline component (``unet.…``,
    ``text_encoder.…``): a PEFT folder's keys are relative to the one model ``PeftModel`` wraps, so none of them
    attaches there (PEFT then loads the adapter as a no-op)."""
    if src_.source_format(adapter) not in ("diffusers", "kohya"):
        return []
    from adapterpack.formats.sd_names import COMPONENTS  # only for diffusers / kohya imports

    return [m.name for m in adapter if m.name.split(".", 1)[0] in COMPONENTS and "." in m.name]


def export_notes(adapter: Adapter) -> list[str]:
    """What a PEFT export of ``adapter`` cannot do, for the user to read (empty when nothing).

    A kohya import without ``adapterpack.module_names`` metadata keeps kohya's names
    (``lora_unet_down_blocks_0_...``), which cannot be turned back into the base model's dotted
    module names; PEFT matches keys to module names, so such a folder attaches to nothing. Nor does
    one whose names carry a diffusers pipeline component (:func:`pipeline_modules`).
    """
    piped = pipeline_modules(adapter)
    if piped:
        return [
            f"{len(piped)} modules are named under a diffusers pipeline component, e.g. {piped[0]!r}: a PEFT folder's keys "
            "are relative to the one model PeftModel loads onto, so PEFT attaches none of them (use --to diffusers)"
        ]
    src = src_.provenance(adapter, "kohya")
    if not src:
        return []
    mapped = src_.str_map(adapter, src, "kohya_names")
    bare = [m.name for m in adapter if "." not in m.name and m.name not in mapped]
    if not bare:
        return []
    return [
        f"{len(bare)} modules keep kohya names, e.g. {bare[0]!r} (the kohya file has no adapterpack.module_names metadata): "
        "PEFT matches adapter keys to the base model's module names, so it cannot attach these modules to a model"
    ]


def write_peft(
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    drop_tensors: bool = False,
    overwrite: bool = True,
    rank: int | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT folder (adapter_config.json + adapter_model.safetensors).

    ``dtype`` casts every float tensor (e.g. ``"bf16"``); ``drop_tensors`` leaves out pass-through
    tensors of a non-PEFT origin (a kohya file's unknown keys), which are refused otherwise.
    The folder appears, or replaces an old one, in one step (:func:`~adapterpack.atomic.atomic_dir`):
    readers see the old files or the new ones, never a mix; the old folder's other files (README,
    tokenizer, checkpoints) are carried over, and the input folder's model card (README.md, recorded
    on import) is written. ``overwrite`` false: OutputExistsError if it exists.
    A folder that cannot be swapped (a mount point, ``.``) is filled in place, the config renamed in last.
    ``rank``: the config's ``r`` (see :func:`synthesize_config`; default the commonest rank).
    """
    from safetensors.numpy import save  # safetensors: only writers import it

    cfg = peft_config(adapter, rank=rank)
    tensors = peft_tensors(adapter, dtype=dtype, drop_tensors=drop_tensors)
    meta = src_.str_map(adapter, src_.provenance(adapter, "peft"), "safetensors_metadata") or {"format": "pt"}
    data = save(tensors, metadata=dict(meta))
    text = (json.dumps(cfg, indent=2) + "\n").encode("utf-8")
    out = Path(out_dir)
    card = model_card(adapter)
    with atomic_dir(out, overwrite=overwrite, carry_over=True, last=CONFIG_NAME) as tmp:
        (tmp / SAFETENSORS_NAME).write_bytes(data)
        if card is not None:
            (tmp / CARD_NAME).write_text(card, encoding="utf-8")
        (tmp / CONFIG_NAME).write_bytes(text)
    return out
