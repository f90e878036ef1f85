"""Import checkpoints of the official NOLA code (UCDvision/NOLA) as ``lora`` records.

Their layers (``NOLALinear``) store, for each LoRA factor, a fixed ``weight`` (A0: kaiming-uniform;
B0: zeros), ``coefficients`` [k] and a ``seed``, and regenerate the bases in every forward with
``torch.manual_seed(seed)`` and ``uniform_(-1, 1)`` on the training device, scaled by 1/√k:

    factor = weight + Σᵢ coefficientsᵢ · Wᵢ / √k,   W = uniform_(-1, 1) of shape [k, out, in]

torch promises nothing about that stream across devices or versions (CUDA's depends on the GPU
model; CPU and CUDA differ), so the bases cannot be part of a portable file. This importer runs
their recipe on a device the caller names and stores the resulting factors as exact ``lora``
records (refit them to ``nola`` with :func:`adapterpack.encodings.nola_fit.fit_adapter` if you want
a seeded, portable file). The result is what that checkpoint means **on that device with this
torch**: materialize on the device family it was trained on; the adapter's metadata records
the device and torch version used.

Layouts understood (keys as ``lora_state_dict`` / PEFT save them):

- GPT-2 (``gpt/src/model_nola.py``): ``transformer.h.{i}.attn.nola_query`` / ``nola_value`` each
  with ``lora_A.{weight,coefficients,seed}`` and ``lora_B.{...}``; the query and value updates land
  in ``transformer.h.{i}.attn.c_attn`` (GPT-2 Conv1D, ``fan_in_fan_out``, outputs q|k|v), so both
  become one rank-2r record whose k rows are zero. ``alpha`` (their ``--lora_alpha``) is not in
  the checkpoint: pass it.
- LLaMA (their PEFT fork): ``base_model.model.<module>.lora_A.{weight,coefficients,seed}`` and
  ``lora_B``; ``alpha`` and ``r`` from the PEFT ``adapter_config.json`` (pass ``alpha``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from adapterpack.adapter import Adapter, Module
from adapterpack.errors import InputError

PEFT_PREFIX = "base_model.model."
_PART = re.compile(r"^(?P<prefix>.+)\.lora_(?P<side>[AB])\.(?P<what>weight|coefficients|seed)$")
_GPT2 = re.compile(r"^(?P<block>(?:.*\.)?h\.\d+\.attn)\.nola_(?P<which>query|value)$")


def _state_dict(src: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's tensors: a state dict given in memory, or a file read with ``weights_only=True``."""
    import torch  # torch: optional (the torch extra), needed only when a NOLA checkpoint is imported

    if isinstance(src, dict):
        sd = src
    else:
        path = Path(src)
        try:
            sd = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise InputError(
                f"{path}: cannot read a NOLA checkpoint with torch.load(weights_only=True): {type(e).__name__}: {e}"
            ) from None
        if isinstance(sd, dict) and "model_state_dict" in sd and isinstance(sd["model_state_dict"], dict):
            sd = sd["model_state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError("a NOLA checkpoint must be a state dict of named tensors")
    return sd


def materialize(weight: Any, coefficients: Any, seed: int, device: str) -> np.ndarray:
    """One NOLA factor by the official recipe, on ``device``: weight + einsum(c, uniform_(-1, 1)[k, out, in]) / √k.

    Runs under ``torch.random.fork_rng`` so the caller's random state is left as it was. float64 result.
    """
    import torch  # torch: optional (the torch extra), needed only when a NOLA checkpoint is imported

    dev = torch.device(device)
    coef = coefficients.to(dev)
    k = int(coef.shape[0])
    out_dim, in_dim = (int(d) for d in weight.shape)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        basis = torch.zeros(k, out_dim, in_dim, device=dev, dtype=coef.dtype)
        torch.nn.init.uniform_(basis, a=-1.0, b=1.0)
        basis = basis * (1.0 / math.sqrt(k))
        gen = torch.einsum("b,boi->oi", coef, basis)
    return (gen.to(torch.float64).cpu() + weight.to(torch.float64).cpu()).numpy()


def _factors(sd: dict[str, Any], prefix: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    parts = {}
    for side in "AB":
        for what in ("weight", "coefficients", "seed"):
            key = f"{prefix}.lora_{side}.{what}"
            if key not in sd:
                raise InputError(f"NOLA checkpoint: {key!r} is missing")
            parts[(side, what)] = sd[key]
    out = []
    for side in "AB":
        w, c, s = parts[(side, "weight")], parts[(side, "coefficients")], parts[(side, "seed")]
        if w.ndim != 2 or c.ndim != 1 or s.numel() != 1 or not bool(c.isfinite().all()):
            raise InputError(f"NOLA checkpoint: {prefix}.lora_{side} needs a 2-D weight, finite 1-D coefficients and one seed")
        out.append(materialize(w, c, int(s.reshape(-1)[0]), device))
    a, b = out
    if a.shape[0] != b.shape[1]:
        raise InputError(f"NOLA checkpoint: {prefix}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not multiply")
    return a, b


def read_nola_checkpoint(
    src: str | os.PathLike[str] | dict[str, Any],
    *,
    alpha: float,
    device: str = "cpu",
    name: str = "default",
    base_model: str | None = None,
) -> Adapter:
    """An official NOLA checkpoint (GPT-2 or LLaMA/PEFT layout) as ``lora`` records, bases generated
    by their recipe on ``device``. ``alpha`` is their LoRA alpha (scale = alpha / r)."""
    import torch  # torch: optional (the torch extra), needed only when a NOLA checkpoint is imported

    sd = _state_dict(src)
    prefixes = sorted({m.group("prefix") for k in sd if (m := _PART.match(k)) and m.group("what") == "coefficients"})
    if not prefixes:
        raise InputError("no NOLA layers found (expected keys ending in .lora_A.coefficients)")
    mods: dict[str, Module] = {}
    gpt2: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for p in prefixes:
        a, b = _factors(sd, p, device)
        g = _GPT2.match(p)
        if g:
            gpt2.setdefault(g.group("block") + ".c_attn", {})[g.group("which")] = (a, b)
            continue
        mname = p[len(PEFT_PREFIX) :] if p.startswith(PEFT_PREFIX) else p
        r = a.shape[0]
        mods[mname] = Module(
            mname,
            "lora",
            (b.shape[0], a.shape[1]),
            {"rank": r, "alpha": float(alpha)},
            {"A": a.astype(np.float32), "B": b.astype(np.float32)},
        )
    for mname, parts in gpt2.items():
        some_a, some_b = next(iter(parts.values()))
        zero = (np.zeros_like(some_a), np.zeros_like(some_b))  # a block with only one of query / value
        (aq, bq), (av, bv) = parts.get("query", zero), parts.get("value", zero)
        if aq.shape != av.shape or bq.shape != bv.shape:
            raise InputError(f"NOLA checkpoint: {mname}: query and value factors differ in shape")
        n = bq.shape[0]
        r = aq.shape[0]
        big_b = np.zeros((3 * n, 2 * r))
        big_b[:n, :r] = bq
        big_b[2 * n :, r:] = bv
        big_a = np.vstack([aq, av])
        # scale alpha/r in their layer; as a rank-2r record PEFT's alpha/(2r) needs alpha doubled
        params = {"rank": 2 * r, "alpha": 2.0 * float(alpha), "fan_in_fan_out": True}
        mods[mname] = Module(
            mname, "lora", (aq.shape[1], 3 * n), params, {"A": big_a.astype(np.float32), "B": big_b.astype(np.float32)}
        )
    meta = {"nola.materialized_on": f"{torch.device(device)} with torch {torch.__version__}"}
    return Adapter(name=name, base_model=base_model, modules=mods, source={"format": "nola-checkpoint"}, metadata=meta)
