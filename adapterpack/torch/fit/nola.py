"""Train NOLA adapters in torch and save them straight to ``.apack`` (spec/nola.md).

:func:`inject` wraps the target ``nn.Linear`` modules (PEFT-style: a module matches a target
name when its name equals it or ends with ``"." + target``) in :class:`NolaLinear`:

    y = W·x + s·B·(A·x),   A = A0 + Σᵢ αᵢ·Aᵢ/√k_A,   B = Σⱼ βⱼ·Bⱼ/√k_B

with A0 generated from the seed (``u/√in``, PEFT's kaiming-uniform bound), B0 = 0 and α = β = 0
at the start, so ΔW starts at 0 and β gets gradients from the first step. Only α and β train.
Bases come from the spec's Philox layout on the parameters' device, either cached in memory
(``cache_bases=True``: ``4·(k_A·r·in + k_B·out·r)`` bytes per distinct basis, shared between
modules with the same seed, stream and size) or regenerated in forward and backward in chunks
(``False``: memory bounded by the budget, at the cost of generating every basis twice a step).
Bases are never saved: :func:`save` writes α, β and a few integers per module.

For inference, :func:`adapterpack.torch.apply` applies a saved file merged or unmerged (the
``nola`` torch decoder regenerates the bases); :func:`load` re-injects trainable layers.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapterpack.adapter import Adapter, Module
from adapterpack.encodings.nola import coefficients
from adapterpack.errors import ApplyError
from adapterpack.ops.files import open as open_adapter
from adapterpack.ops.files import save as save_adapter
from adapterpack.rng.basis import DEFAULT_BUDGET, GENERATOR_ID, GENERATOR_VERSION, KIND_A, KIND_A0, KIND_B, chunk_bases
from adapterpack.torch import rng as torch_rng
from adapterpack.torch.decoders.nola import combine


class _Combine(torch.autograd.Function):
    """``c @ basis`` for one kind's k bases, regenerated chunk by chunk in forward and again in backward
    (nothing of size k·n is kept between them)."""

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, seed: int, stream: int, kind: int, n: int, budget: int) -> torch.Tensor:  # type: ignore[override]
        ctx.args = (int(c.shape[0]), seed, stream, kind, n, budget)
        return combine(seed, stream, kind, c.detach().to(torch.float32)[None], n, budget)[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        k, seed, stream, kind, n, budget = ctx.args
        g = torch.empty(k, dtype=torch.float32, device=grad.device)
        step = chunk_bases(n, budget)
        for i0 in range(0, k, step):
            i1 = min(k, i0 + step)
            g[i0:i1] = torch_rng.basis(seed, stream, kind, i0, i1, n, grad.device) @ grad.to(torch.float32)
        return g, None, None, None, None, None


class BasisCache:
    """Generated bases by (seed, stream, kind, k, n, device), shared by every layer that asks for the same."""

    def __init__(self) -> None:
        self._store: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, seed: int, stream: int, kind: int, k: int, n: int, device: torch.device) -> torch.Tensor:
        """float32 ``[k, n]`` on ``device`` (generated on first use)."""
        key = (seed, stream, kind, k, n, str(device))
        if key not in self._store:
            self._store[key] = torch_rng.basis(seed, stream, kind, 0, k, n, device)
        return self._store[key]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in self._store.values())


class NolaLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a NOLA update ``s·B·(A·x)`` whose only trainable numbers are α and β."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        k_A: int,
        k_B: int,
        seed: int,
        stream: int,
        scale: float,
        cache: BasisCache | None,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        super().__init__()
        self.base = base
        self.out_features, self.in_features = int(base.weight.shape[0]), int(base.weight.shape[1])
        self.rank, self.k_A, self.k_B = int(rank), int(k_A), int(k_B)
        self.seed, self.stream, self.scale = int(seed), int(stream), float(scale)
        self.cache, self.budget = cache, int(budget)
        dev = base.weight.device
        self.alpha = nn.Parameter(torch.zeros(self.k_A, device=dev))
        self.beta = nn.Parameter(torch.zeros(self.k_B, device=dev))
        a0 = torch_rng.basis(self.seed, self.stream, KIND_A0, 0, 1, self.rank * self.in_features, dev)
        self.register_buffer(
            "A0", (a0.double() / math.sqrt(self.in_features)).float().reshape(self.rank, self.in_features), persistent=False
        )

    def _sum(self, coef: torch.Tensor, kind: int, n: int) -> torch.Tensor:
        k = coef.shape[0]
        if k == 0:
            return torch.zeros(n, device=coef.device)
        c = coef / math.sqrt(k)
        if self.cache is not None:
            return c @ self.cache.get(self.seed, self.stream, kind, k, n, coef.device)
        return _Combine.apply(c, self.seed, self.stream, kind, n, self.budget)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A ``[r, in]``, B ``[out, r]``) from the current coefficients (differentiable)."""
        r, n_in, n_out = self.rank, self.in_features, self.out_features
        a = self.A0 + self._sum(self.alpha, KIND_A, r * n_in).reshape(r, n_in)
        b = self._sum(self.beta, KIND_B, n_out * r).reshape(n_out, r)
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return self.base(x) + self.scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def record(self, name: str) -> Module:
        """This layer as a ``nola`` record (α, β as float32 copies on the CPU)."""
        params = {"generator": GENERATOR_ID, "generator_version": GENERATOR_VERSION, "seed": self.seed, "stream": self.stream}
        params |= {"rank": self.rank, "k_A": self.k_A, "k_B": self.k_B, "scale": self.scale, "A0": "generated", "B0": "zero"}
        tensors = {
            "alpha": self.alpha.detach().to("cpu", torch.float32).numpy().copy(),
            "beta": self.beta.detach().to("cpu", torch.float32).numpy().copy(),
        }
        return Module(name, "nola", (self.out_features, self.in_features), params, tensors)


def matches(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module name equals one or ends with ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(
    model: nn.Module,
    targets: list[str] | tuple[str, ...],
    *,
    rank: int = 8,
    k: int = 1024,
    k_B: int | None = None,
    seed: int = 0,
    alpha: float | None = None,
    shared_basis: bool = False,
    cache_bases: bool = True,
    budget: int = DEFAULT_BUDGET,
) -> dict[str, NolaLinear]:
    """Wrap every ``nn.Linear`` of ``model`` matching ``targets`` in a :class:`NolaLinear`; freeze the rest.

    ``k`` bases for A (``k_B`` for B, default ``k``), LoRA-style ``alpha`` (scale ``alpha/rank``,
    default ``rank``: scale 1). Streams number the layers 0, 1, … in module order (independent
    bases) unless ``shared_basis`` (stream 0: one basis per matrix size, as NOLA's GPT-2 runs).
    Returns the new layers by module name. Refuses targets that match nothing or a non-Linear.
    """
    named = [(n, m) for n, m in model.named_modules() if n and matches(n, targets)]
    if not named:
        raise ApplyError(f"no module of the model matches target names {list(targets)}")
    bad = [n for n, m in named if not isinstance(m, nn.Linear)]
    if bad:
        raise ApplyError(f"NOLA layers wrap nn.Linear only; {bad[0]!r} is a {type(dict(named)[bad[0]]).__name__}")
    k_b = k if k_B is None else k_B
    for what, v, lo in (("rank", rank, 1), ("k", k, 0), ("k_B", k_b, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ApplyError(f"{what} must be an integer >= {lo}, got {v!r:.100}")
    too_small = [n for n, m in named if rank > min(m.weight.shape)]
    if too_small:
        raise ApplyError(f"rank {rank} exceeds min(out, in) of {too_small[0]!r} {list(dict(named)[too_small[0]].weight.shape)}")
    cache = BasisCache() if cache_bases else None
    scale = float(alpha if alpha is not None else rank) / rank
    layers: dict[str, NolaLinear] = {}
    for stream, (name, mod) in enumerate(named):  # every layer built (bases generated) before the model changes
        layers[name] = NolaLinear(
            mod,
            rank=rank,
            k_A=k,
            k_B=k_b,
            seed=seed,
            stream=0 if shared_basis else stream,
            scale=scale,
            cache=cache,
            budget=budget,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    _swap_in(model, layers)
    return layers


def _swap_in(model: nn.Module, layers: dict[str, NolaLinear]) -> None:
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _layers(model: nn.Module) -> dict[str, NolaLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NolaLinear)}


def to_adapter(model: nn.Module, *, name: str = "default", base_model: str | None = None, strip: str = "") -> Adapter:
    """The model's NOLA layers as an :class:`Adapter` of ``nola`` records (module names without the
    ``.base`` wrapper; ``strip`` removes a leading prefix such as ``"base_model.model."``)."""
    layers = _layers(model)
    if not layers:
        raise ApplyError("the model has no NOLA layers (call inject first)")
    mods = {}
    for n, layer in layers.items():
        key = n[len(strip) :] if strip and n.startswith(strip) else n
        mods[key] = layer.record(key)
    arch = type(model).__name__ if model.__class__.__module__.startswith("transformers") else None
    return Adapter(name=name, base_model=base_model, base_architecture=arch, modules=mods)


def save(model: nn.Module, path: str | os.PathLike[str], *, base_model: str | None = None, codec: str = "raw") -> Any:
    """Write the model's NOLA layers to ``path`` (``.apack``, atomically): α, β and the record params;
    returns the writer's result (file size and more). Coefficients are few, so ``raw`` is the default."""
    return save_adapter(to_adapter(model, base_model=base_model), path, codec=codec)


def merged_from_layers(model: nn.Module) -> None:
    """Replace every :class:`NolaLinear` by its base ``nn.Linear`` with ΔW merged into the weight (inference)."""
    for name, layer in _layers(model).items():
        with torch.no_grad():
            a, b = layer.factors()
            w = layer.base.weight
            w += (layer.scale * (b.double() @ a.double())).to(w.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)


def load(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    cache_bases: bool = True,
    budget: int = DEFAULT_BUDGET,
    trainable: bool = True,
) -> dict[str, NolaLinear]:
    """Re-inject NOLA layers from a saved file (to continue training, or to run unmerged with the
    same layers); every record must be a ``nola`` record with A0 generated and B0 zero, as
    :func:`save` writes. For plain inference use :func:`adapterpack.torch.apply` (merged or not)."""
    with open_adapter(path) as ad:
        recs = list(ad)
        for m in recs:
            m.implementation.validate(m)
            if m.encoding != "nola" or m.params.get("A0", "generated") != "generated" or m.params.get("B0", "zero") != "zero":
                raise ApplyError(f"module {m.name!r}: load() re-injects nola records with generated A0 and zero B0 only")
            if m.params.get("fan_in_fan_out", False):  # a NolaLinear is [out, in]: a square weight would take ΔWᵀ silently
                raise ApplyError(f"module {m.name!r}: load() re-injects into nn.Linear layers; the record is fan_in_fan_out")
        named = dict(model.named_modules())
        missing = [m.name for m in recs if not isinstance(named.get(m.name), nn.Linear)]
        if missing:
            raise ApplyError(f"module {missing[0]!r} of the file is not an nn.Linear of the model")
        cache = BasisCache() if cache_bases else None
        layers = {}
        for m in recs:  # every record checked, read and built before the model changes (no half-loaded model)
            p = m.params
            base = named[m.name]
            if tuple(base.weight.shape) != tuple(m.base_shape):
                raise ApplyError(f"module {m.name!r}: weight {list(base.weight.shape)} but the record is for {list(m.base_shape)}")
            layer = NolaLinear(
                base,
                rank=p["rank"],
                k_A=p["k_A"],
                k_B=p["k_B"],
                seed=p["seed"],
                stream=p["stream"],
                scale=p["scale"],
                cache=cache,
                budget=budget,
            )
            with torch.no_grad():
                layer.alpha.copy_(torch.tensor(np.asarray(coefficients(m, "alpha"), np.float32)))
                layer.beta.copy_(torch.tensor(np.asarray(coefficients(m, "beta"), np.float32)))
            layer.alpha.requires_grad_(trainable)
            layer.beta.requires_grad_(trainable)
            layers[m.name] = layer
    _swap_in(model, layers)
    return layers


def trainable_parameters(model: nn.Module) -> int:
    """Numbers that train (α and β of every NOLA layer, plus anything else left trainable)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
