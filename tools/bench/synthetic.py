"""A 7B-shaped synthetic LoRA adapter, for benchmarks at realistic tensor sizes.

Shape of Llama-2-7B: 32 decoder layers, q/k/v/o projections of 4096×4096 each, rank 16,
alpha 32 → 128 A/B pairs, 16.8 M parameters (33.6 MB in bf16).

The numbers are SYNTHETIC, not trained:

- A ~ Normal(0, σ_A), σ_A = 1/sqrt(3·in_features) = 0.00902: the standard deviation of PEFT's
  own init of A (``kaiming_uniform_(a=sqrt(5))``, i.e. Uniform(±1/sqrt(in_features))), drawn
  Gaussian instead of uniform.
- B ~ Normal(0, 0.01): PEFT starts B at zero; a trained B is small and dense. 0.01 is about
  the spread of B in the bundled trained example (std 0.012 after 60 steps), not a fit.

Gaussian floats are close to the worst case for compression (their mantissa bits are
random), so codec ratios on this adapter say little about trained adapters; sizes and
load times are what it is for. Generated with numpy's PCG64 from a fixed seed in float32,
then cast (bf16 rounds to nearest even via ml_dtypes): deterministic bytes.

Run::

    python -m tools.bench.synthetic --out /tmp/synth --dtype bf16   # PEFT folder + .apack files
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import adapterpack
from adapterpack import dtypes
from adapterpack.adapter import Adapter, Module
from adapterpack.formats import peft

BASE_MODEL = "meta-llama/Llama-2-7b-hf"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
B_STD = 0.01
DESCRIPTION = (
    "SYNTHETIC adapter (random factors, not trained): Llama-2-7B shapes, {layers} layers × q/k/v/o "
    "{hidden}×{hidden}, r={rank}, alpha={alpha}, {dtype}; A ~ N(0, 1/sqrt(3·in)) (PEFT's kaiming-uniform "
    "init variance), B ~ N(0, {b_std}); seed {seed}."
)


def a_std(in_features: int) -> float:
    """Standard deviation of PEFT's LoRA A init, Uniform(±1/sqrt(in_features))."""
    return 1.0 / math.sqrt(3.0 * in_features)


def peft_config(layers: int, rank: int, alpha: float) -> dict[str, object]:
    """An adapter_config.json as PEFT writes it for these settings."""
    return {
        "base_model_name_or_path": BASE_MODEL,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": list(TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def build_adapter(
    dtype: str = "bf16", *, layers: int = 32, hidden: int = 4096, rank: int = 16, alpha: float = 32.0, seed: int = 0
) -> Adapter:
    """The synthetic adapter in memory (numpy factors of ``dtype``)."""
    np_dtype = dtypes.by_name(dtype).numpy
    rng = np.random.default_rng(seed)
    cfg = peft_config(layers, rank, alpha)
    desc = description(dtype, layers=layers, hidden=hidden, rank=rank, alpha=alpha, seed=seed)
    ad = Adapter(
        name="default",
        base_model=BASE_MODEL,
        base_architecture="LlamaForCausalLM",
        source={
            "format": "peft",
            "config": cfg,
            "key_prefix": peft.DEFAULT_PREFIX,
            "safetensors_metadata": {"format": "pt", "synthetic": desc},
        },
        metadata={"synthetic": "true", "description": desc},
    )
    for layer in range(layers):
        for target in TARGETS:
            name = f"model.layers.{layer}.self_attn.{target}"
            a = rng.standard_normal((rank, hidden), dtype=np.float32) * np.float32(a_std(hidden))
            b = rng.standard_normal((hidden, rank), dtype=np.float32) * np.float32(B_STD)
            ad.modules[name] = Module(
                name=name,
                encoding="lora",
                base_shape=(hidden, hidden),
                params={"rank": rank, "alpha": float(alpha)},
                tensors={"A": a.astype(np_dtype), "B": b.astype(np_dtype)},
            )
    return ad


def description(
    dtype: str = "bf16", *, layers: int = 32, hidden: int = 4096, rank: int = 16, alpha: float = 32.0, seed: int = 0
) -> str:
    """The one-line 'this is synthetic' statement (also stored in the adapter's metadata)."""
    name = dtypes.by_name(dtype).name
    return DESCRIPTION.format(layers=layers, hidden=hidden, rank=rank, alpha=alpha, dtype=name, b_std=B_STD, seed=seed)


def write_peft(ad: Adapter, folder: str | Path) -> Path:
    """Write ``ad`` as a PEFT adapter folder with the project's PEFT writer.

    The safetensors metadata carries the 'synthetic' statement too (PEFT ignores extra keys).
    """
    return peft.write_peft(ad, folder)


def write_all(out: str | Path, dtype: str = "bf16", codecs: Sequence[str] = ("raw",), seed: int = 0) -> dict[str, Path]:
    """Build the adapter and write ``out/peft`` and ``out/synthetic-<codec>.apack``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ad = build_adapter(dtype, seed=seed)
    paths = {"peft": write_peft(ad, out / "peft")}
    for codec in codecs:
        p = out / f"synthetic-{codec}.apack"
        adapterpack.save(ad, p, codec=codec)
        paths[codec] = p
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--codec", action="append", choices=["raw", "zstd", "byteplanes"], help="codecs to write (default raw)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_all(args.out, args.dtype, args.codec or ["raw"], args.seed)
    print(description(args.dtype, seed=args.seed))
    for what, p in paths.items():
        print(f"{what}: {p}")


if __name__ == "__main__":
    main()
