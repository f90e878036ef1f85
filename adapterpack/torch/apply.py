"""Patch an ``nn.Module`` with an adapter, by module name, and undo it exactly.

- ``merge=True``: each target weight is replaced by ``W + scale·s·ΔW`` (computed in float32, or
  float64 for float64 weights, then cast to the weight's dtype); the ORIGINAL weight tensor is
  kept untouched, and :meth:`Applied.unapply` puts it back, so the weights afterwards are the
  very tensors (bit-identical bytes) they were before. Nothing is ever subtracted. Memory: one
  extra weight per patched module while applied.
- ``merge=False``: a forward hook adds ``scale·s·(x·Aᵀ)·Bᵀ`` to the module's output (embeddings:
  ``scale·s·Aᵀ[ids]·Bᵀ``; convolutions: a conv with A then a 1×1 conv with B) without forming ΔW.
  The weights are not touched; ``unapply`` removes the hooks.

Module names are matched as PEFT does: the file holds base-model names
(``model.layers.0.self_attn.q_proj``); a model whose modules carry PEFT's ``base_model.model.``
prefix (a ``PeftModel``) matches too, and a PEFT LoRA layer is patched through its ``base_layer``.
Everything is checked before anything changes: a name with no module in the model, a module
kind that cannot take the update, or a weight whose shape differs from the record's base shape
is an :class:`~adapterpack.errors.ApplyError` and the model is left as it was; so are two records naming
one module (``x`` and ``base_model.model.x``) and, merged, a weight tied to another module (an LM head
sharing the input embedding's weight: merging would change the embedding too; hooks patch the head only).

A copy of an adapted layer's own weight saved beside its factors (PEFT's ``<module>.base_layer.weight``, written
for embedding LoRAs) is that layer's W, as PEFT loads it into the base layer (and as merge takes it): merged,
the weight becomes ``W_saved + scale·s·ΔW``; unmerged, the weight is set to ``W_saved`` (when it differs) and the
hook adds the update. ``unapply`` puts the original weight tensor back either way.

DoRA (``magnitude``) records are applied exactly, merged or not, for linear layers
(``nn.Linear`` and GPT-2's ``Conv1D``): ``W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖`` (norm per output
feature, as PEFT); unmerged, the row norms are computed from W, A and B without forming ΔW.
DoRA on embeddings or convolutions is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterpack import dtypes
from adapterpack.adapter import Adapter, as_array, tensor_info
from adapterpack.errors import ApplyError, ConversionError
from adapterpack.factors import Factors
from adapterpack.torch.tensors import as_2d, check_factors, stored_shapes, tensor

#: The prefix PEFT puts before base-model module names (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."
#: PEFT's key for the weight of an adapted layer saved beside its factors (``save_embedding_layers``).
BASE_LAYER = ".base_layer.weight"
_STACK = "_adapterpack_applied"


def _kind(mod: nn.Module) -> str:
    """``linear``, ``fifo`` (GPT-2 Conv1D: weight [in, out]), ``embedding`` or ``conv``; else ``""``."""
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and isinstance(getattr(mod, "weight", None), torch.Tensor):
        return "fifo"
    return ""


def find_module(named: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The module ``name`` the way PEFT resolves adapter keys: as is, under ``base_model.model.``, or
    with that prefix removed; a PEFT LoRA layer stands for its ``base_layer``."""
    for cand in (name, PEFT_PREFIX + name, name.removeprefix(PEFT_PREFIX)):
        mod = named.get(cand)
        if mod is not None:
            base = getattr(mod, "base_layer", None)
            return base if isinstance(base, nn.Module) else mod
    return None


def _expected_kind(lt: Factors) -> tuple[str, ...]:
    if lt.layout == "embedding":
        return ("embedding",)
    if lt.layout == "conv" or len(lt.base_shape) > 2:
        return ("conv",)
    return ("fifo",) if lt.transpose else ("linear",)


@dataclass
class _Patch:
    name: str
    module: nn.Module
    kind: str
    lora: Factors
    original: torch.Tensor | None = None  # the weight tensor as it was (merged, or replaced by a saved base weight)
    base: torch.Tensor | None = None  # the layer's W saved beside the factors (PEFT's base_layer.weight), if any
    hook: Any = None  # unmerged: the forward hook's handle


@dataclass
class Applied:
    """An adapter applied to a model; :meth:`unapply` undoes it (restoring the exact original weights)."""

    model: nn.Module
    merged: bool
    scale: float
    patches: list[_Patch] = field(default_factory=list)
    active: bool = True

    @property
    def modules(self) -> list[str]:
        """Names of the patched modules (as the adapter names them)."""
        return [p.name for p in self.patches]

    def unapply(self) -> None:
        """Put back every original weight tensor (merged) or remove the hooks (unmerged).

        Adapters patching one module are undone last-in first-out; undoing one that has another
        applied on top of it is refused (its weights include the later one's). The order is kept per
        patched module, so it also holds between applies to a model and to one of its submodules.
        """
        if not self.active:
            raise ApplyError("this adapter was already unapplied")
        stacks = [getattr(p.module, _STACK, []) for p in self.patches]
        if any(st and st[-1] is not self for st in stacks):
            raise ApplyError("another adapter was applied after this one; unapply that one first (last in, first out)")
        _undo(self.patches)
        for st in stacks:
            if st:
                st.pop()
        self.active = False


def _undo(patches: list[_Patch]) -> None:
    for p in reversed(patches):
        if p.hook is not None:
            p.hook.remove()
        if p.original is not None:
            now = p.module.weight.data
            # the model was moved or cast since (model.to / .half()): the original, moved and cast the same way
            same = now.device == p.original.device and now.dtype == p.original.dtype
            p.module.weight.data = p.original if same else p.original.to(now.device, now.dtype)


def unapply(applied: Applied) -> None:
    """Undo :func:`apply` (see :meth:`Applied.unapply`)."""
    applied.unapply()


def _load(
    source: str | os.PathLike[str] | Adapter | dict[str, Factors], device: torch.device, **kw: Any
) -> dict[str, Factors]:
    if isinstance(source, dict):
        return source
    from adapterpack.torch.mapped import load

    return load(source, device, **kw)


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id of every parameter → names of the distinct modules that hold it directly (tied weights: several)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules():
        for _, prm in mod.named_parameters(recurse=False):
            owners.setdefault(id(prm), []).append(mname)
    return owners


def _plan(model: nn.Module, loras: dict[str, Factors], merge: bool, bases: dict[str, torch.Tensor] | None = None) -> list[_Patch]:
    """Resolve every module and check kinds and shapes (saved base weights' too: ``bases``, by module name); raises
    before anything is changed."""
    named = dict(model.named_modules())
    missing = [n for n in loras if find_module(named, n) is None]
    if missing:
        some = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ApplyError(f"{len(missing)} module(s) of the adapter are not in the model: {some}")
    plan = []
    seen: dict[int, str] = {}
    for name, lt in loras.items():
        mod = find_module(named, name)
        assert mod is not None
        if id(mod) in seen:  # e.g. "x" and "base_model.model.x": merged, the second would silently drop the first
            raise ApplyError(f"modules {seen[id(mod)]!r} and {name!r} of the adapter are the same module of the model")
        seen[id(mod)] = name
        kind = _kind(mod)
        if kind not in _expected_kind(lt):
            what = type(mod).__name__
            raise ApplyError(f"module {name!r} is a {what}; a {lt.layout} record needs {' or '.join(_expected_kind(lt))}")
        shape = tuple(mod.weight.shape)
        if shape != tuple(lt.base_shape):
            raise ApplyError(f"module {name!r}: weight shape {list(shape)} differs from the adapter's {list(lt.base_shape)}")
        try:
            check_factors(lt, f"module {name!r}")
        except ConversionError as e:
            raise ApplyError(str(e)) from None
        if lt.magnitude is not None and kind not in ("linear", "fifo"):
            raise ApplyError(f"module {name!r}: DoRA is supported on linear layers only, not on a {kind} layer")
        if kind == "conv" and getattr(mod, "groups", 1) != 1:
            raise ApplyError(f"module {name!r}: grouped convolutions (groups={mod.groups}) are not supported")
        saved = (bases or {}).get(name)
        if saved is not None and tuple(saved.shape) != shape:
            raise ApplyError(f"module {name!r}: its saved base weight is {list(saved.shape)}, the model's {list(shape)}")
        plan.append(_Patch(name, mod, kind, lt, base=saved))
    for p in plan:  # unmerged, a saved base weight equal to the model's needs no replacing
        w = p.module.weight.data
        if p.base is not None and not merge and torch.equal(p.base.to(w.device, w.dtype), w):
            p.base = None
    changed = [p for p in plan if merge or p.base is not None]  # patches whose weight itself changes
    owners = _weight_owners(model) if changed else {}
    for p in changed:
        holders = owners.get(id(p.module.weight), [])
        if len(holders) > 1:  # tied weights (lm_head / embed_tokens): merging into one changes the others too
            others = ", ".join(repr(h) for h in holders if named.get(h) is not p.module)
            how = "merging" if merge else "loading its saved base weight (PEFT's base_layer.weight)"
            hint = " (use merge=False)" if merge and p.base is None else ""
            raise ApplyError(f"module {p.name!r}: its weight is tied to {others}; {how} would change those too{hint}")
    return plan


def _work(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _delta(lt: Factors, w: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·s·ΔW in the weight's layout, in the working dtype, on the weight's device."""
    work = _work(w)
    a, b = as_2d(lt.A.to(w.device, work), lt.B.to(w.device, work))
    prod = (b @ a).mul_(lt.scale * scale)
    return (prod.T if lt.transpose else prod).reshape(w.shape)


def _dora_rows(w: torch.Tensor, fifo: bool) -> torch.Tensor:
    """W as [out, in] (GPT-2 Conv1D stores [in, out])."""
    return w.T if fifo else w


def _merged_weight(p: _Patch, scale: float) -> torch.Tensor:
    w = p.module.weight.data
    work = _work(w)
    new = (w.to(work) if p.base is None else p.base.to(w.device, work)) + _delta(p.lora, w, scale)
    if p.lora.magnitude is not None:
        rows = _dora_rows(new, p.kind == "fifo")
        factor = p.lora.magnitude.to(w.device, work) / torch.linalg.norm(rows, dim=1)
        new = (rows * factor[:, None]).T if p.kind == "fifo" else rows * factor[:, None]
    return new.to(w.dtype).contiguous()


class _Placed:
    """Tensors on the weight's device in its dtype, placed again when the model is moved or cast after apply()
    (``model.to("cuda")``, ``.half()``), so that the hooks keep working."""

    def __init__(self, w: torch.Tensor, *tensors: torch.Tensor) -> None:
        self._src = tensors
        self._key = (w.device, w.dtype)
        self._now = tuple(t.to(w.device, w.dtype) for t in tensors)

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if (w.device, w.dtype) != self._key:
            self._key = (w.device, w.dtype)
            self._now = tuple(t.to(w.device, w.dtype) for t in self._src)
        return self._now


def _hook(p: _Patch, scale: float) -> Callable[..., torch.Tensor]:
    """The forward hook adding the low-rank update to the module's output."""
    mod, lt = p.module, p.lora
    w = mod.weight
    s = lt.scale * scale
    a, b = as_2d(lt.A.to(w.device, w.dtype), lt.B.to(w.device, w.dtype))
    if p.kind == "embedding":
        emb_factors = _Placed(w, a.T.contiguous(), b)

        def emb(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            at, bb = emb_factors(m.weight)
            e = F.embedding(args[0], at, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
            return out + (e @ bb.T) * s

        return emb
    if p.kind == "conv":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        kernels = stored_shapes(lt)  # A [r, in, *k], B [out, r, 1, ...] (2-D factors of a decoder reshaped)
        conv_factors = _Placed(w, kernels.A, kernels.B)

        def cnv(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            a_k, b_k = conv_factors(m.weight)
            # A convolves as the layer does (its stride, padding, dilation and padding mode: reflect, circular too), B is 1x1
            return out + conv(m._conv_forward(args[0], a_k, None), b_k) * s

        return cnv
    lin_factors = _Placed(w, a, b)
    if lt.magnitude is None:

        def lin(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            aa, bb = lin_factors(m.weight)
            return out + F.linear(F.linear(args[0], aa), bb) * s

        return lin
    # DoRA, unmerged: out' = m/‖W + sBA‖ ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias, the row norms from Gram terms (no ΔW)
    work = _work(w)
    w_rows = _dora_rows(w.detach().to(work), p.kind == "fifo")
    a_w, b_w = a.to(work), b.to(work)
    sq = (w_rows * w_rows).sum(1) + 2 * s * ((w_rows @ a_w.T) * b_w).sum(1) + s * s * ((b_w @ (a_w @ a_w.T)) * b_w).sum(1)
    factor = (lt.magnitude.to(w.device, work) / sq.clamp_min(0).sqrt()).to(w.dtype)
    bias = getattr(mod, "bias", None)
    dora_factor = _Placed(w, factor)

    def dora(m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        aa, bb = lin_factors(m.weight)
        (fac,) = dora_factor(m.weight)
        base = out if bias is None else out - bias
        y = fac * (base + F.linear(F.linear(args[0], aa), bb) * s)
        return y if bias is None else y + bias

    return dora


def _base_weights(source: object, adapter: str | None) -> dict[str, torch.Tensor]:
    """The saved base weights of ``source``'s modules (PEFT's ``<module>.base_layer.weight``), by module name, read
    into CPU tensors. apply() patches LoRA modules only: an adapter that also replaces other whole tensors (PEFT
    ``modules_to_save``) would be applied half, so it is refused (opening reads the index only); so is an activated
    LoRA (aLoRA), which a patched weight or a forward hook would apply to every token, and an adapter saved with a
    base-rewriting init (PiSSA and the like), whose ΔW is not scale·B·A."""
    if isinstance(source, dict):
        return {}
    from adapterpack.formats.source import adapter_alora_tokens, base_init_problem

    if isinstance(source, Adapter):
        return _checked_tensors(source, adapter_alora_tokens(source), base_init_problem(source))
    from adapterpack.formats import read_any

    with read_any(source, adapter=adapter) as ad:  # type: ignore[arg-type]
        return _checked_tensors(ad, adapter_alora_tokens(ad), base_init_problem(ad))


def _checked_tensors(ad: Adapter, alora: list[int] | None, init: str | None) -> dict[str, torch.Tensor]:
    if init is not None:
        raise ApplyError(f"{init}; apply() would add scale·B·A to the original weights instead")
    if alora is not None:
        raise ApplyError(
            "the adapter is an activated LoRA (aLoRA: it applies only from its invocation tokens on); apply() has no "
            "notion of tokens and would apply it to every token"
        )
    own: dict[str, str] = {}
    for key in ad.tensors:
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(BASE_LAYER) and name[: -len(BASE_LAYER)] in ad.modules:
            own[name[: -len(BASE_LAYER)]] = key
    tensors = [k for k in ad.tensors if k not in own.values()]
    if tensors:
        raise ApplyError(
            f"adapter holds {len(tensors)} full tensors besides LoRA factors (modules_to_save: {', '.join(tensors[:3])}); "
            "apply() patches LoRA modules only"
        )
    out = {}
    for module, key in own.items():
        dt = tensor_info(ad.tensors[key])[0]
        if not dtypes.by_name(dt).is_float:
            raise ApplyError(f"module {module!r}: its saved base weight {key!r} is {dt}, not a float weight")
        out[module] = tensor(as_array(ad.tensors[key])).clone()  # a copy: the file may be closed (and unmapped) next
    return out


def apply(
    model: nn.Module,
    path_or_adapter: str | os.PathLike[str] | Adapter | dict[str, Factors],
    scale: float = 1.0,
    merge: bool = True,
    *,
    adapter: str | None = None,
    rank: int | None = None,
    verify: bool = True,
) -> Applied:
    """Apply an adapter (any file :func:`adapterpack.open` reads, an :class:`Adapter`, or the output of
    :func:`adapterpack.torch.load`) to ``model`` by module name; ``scale`` multiplies the adapter's own
    scale. Returns an :class:`Applied`; ``.unapply()`` restores the model exactly. See the module
    docstring for merged vs unmerged, name matching, DoRA and what is refused."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ApplyError(f"scale must be a number, got {scale!r:.100}") from None
    if not math.isfinite(scale):  # every patched weight would become NaN / inf
        raise ApplyError(f"scale must be finite, got {scale}")
    bases = _base_weights(path_or_adapter, adapter)
    first = next((p for p in model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    kw: dict[str, Any] = {} if isinstance(path_or_adapter, (Adapter, dict)) else {"adapter": adapter, "verify": verify}
    if rank is not None:
        if isinstance(path_or_adapter, dict):
            raise ConversionError("rank= applies when opening a file; these factors are already loaded (load them with rank=)")
        kw["rank"] = rank
    loras = _load(path_or_adapter, device, **kw)
    if not loras:
        raise ApplyError("the adapter has no modules to apply")
    plan = _plan(model, loras, merge, bases)
    applied = Applied(model=model, merged=merge, scale=float(scale))
    try:
        if merge:
            new = [_merged_weight(p, scale) for p in plan]  # all computed before any weight changes
            for p, w in zip(plan, new, strict=True):
                p.original = p.module.weight.data
                p.module.weight.data = w
                applied.patches.append(p)
        else:
            # a saved base weight that differs from the model's replaces it first (PEFT loads it into the base layer)
            saved = [p.base.to(p.module.weight.device, p.module.weight.dtype) if p.base is not None else None for p in plan]
            for p, w in zip(plan, saved, strict=True):
                if w is not None:
                    p.original = p.module.weight.data
                    p.module.weight.data = w
                    applied.patches.append(p)
            hooks = [_hook(p, scale) for p in plan]
            for p, h in zip(plan, hooks, strict=True):
                p.hook = p.module.register_forward_hook(h)
                if p.original is None:
                    applied.patches.append(p)
    except BaseException:
        _undo(applied.patches)
        raise
    for p in plan:
        p.base = None  # in the weight now (its copy, or the merged sum): not kept for the life of the Applied
    for p in applied.patches:  # per patched module: an apply to a submodule and one to the whole model share it
        stack = getattr(p.module, _STACK, None)
        if stack is None:
            stack = []
            object.__setattr__(p.module, _STACK, stack)
        stack.append(applied)
    return applied
