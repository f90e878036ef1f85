"""Small in-memory adapters for tests: LLaMA-style q/v projections with seeded random factors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from adapterpack.adapter import Adapter, Module
from adapterpack.examples import example_path


def qv_modules(
    rng: np.random.Generator,
    *,
    layers: int,
    rank: int,
    in_features: int,
    q_out: int,
    v_out: int,
    b_scale: float,
    b_grid: type | None = None,
) -> dict[str, Module]:
    """``model.layers.{i}.self_attn.{q,v}_proj`` lora modules (alpha = 2·rank), float32 factors.

    A ~ N(0, 1); B ~ N(0, b_scale), rounded to ``b_grid``'s values first when given (e.g.
    float16, for values that survive a cast to it). Draws A then B, module by module.
    """
    mods = {}
    for i in range(layers):
        for proj, out in (("q_proj", q_out), ("v_proj", v_out)):
            name = f"model.layers.{i}.self_attn.{proj}"
            a = rng.standard_normal((rank, in_features)).astype(np.float32)
            b = rng.standard_normal((out, rank)) * b_scale
            b = (b.astype(b_grid) if b_grid is not None else b).astype(np.float32)
            params = {"rank": rank, "alpha": 2.0 * rank}
            mods[name] = Module(name, "lora", (out, in_features), params, {"A": a, "B": b})
    return mods


def qv_adapter(seed: int = 0, name: str = "default", **shape: object) -> Adapter:
    """An :class:`Adapter` of :func:`qv_modules` for base model ``toy/base``."""
    mods = qv_modules(np.random.default_rng(seed), **shape)  # type: ignore[arg-type]
    return Adapter(name=name, base_model="toy/base", modules=mods)


def example_with_alpha(tmp: Path, alpha: float) -> Path:
    """A copy of the bundled real PEFT adapter under ``tmp/big`` whose ``lora_alpha`` is ``alpha``."""
    peft = tmp / "big"
    shutil.copytree(example_path(), peft)
    cfg = json.loads((peft / "adapter_config.json").read_text())
    cfg["lora_alpha"] = alpha
    (peft / "adapter_config.json").write_text(json.dumps(cfg))
    return peft
