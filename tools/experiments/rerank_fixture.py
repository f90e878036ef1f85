"""The real r=64 adapter the re-ranking experiment and benchmark use, built once and cached.

LoRA r=64, alpha=64 (scale 1) on all seven linear modules of SmolLM2-135M-Instruct (210 modules),
40 steps of pydoc text, seed 0, one torch thread. Cached under ``<cache root>/rerank-r64`` (the
cache root is ``$ADAPTERPACK_CACHE`` or ``~/.cache/adapterpack``); never part of the repository.

    nice -n 10 python -m tools.experiments.rerank_fixture      # ~5-8 min on one core, once
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from tools.fixtures import smollm2

NAME = "rerank-r64"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARGS = {"r": 64, "alpha": 64, "steps": 40, "seed": 0}


def fixture_dir() -> Path:
    """Where the cached PEFT folder lives (it may not exist yet)."""
    return smollm2.cache_root() / NAME


def ensure_fixture(*, evaluate: bool = False) -> Path:
    """The cached r=64 PEFT folder, trained first when missing (single-threaded, minutes)."""
    target = fixture_dir()
    if (target / "adapter_model.safetensors").is_file():
        return target
    import torch

    from tools.fixtures.train_lora import train_lora

    torch.set_num_threads(1)
    tmp = target.with_name(f".{NAME}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        train_lora(tmp, list(TARGETS), evaluate=evaluate, **ARGS)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> int:
    """Build (or find) the fixture and print its training summary."""
    ap = argparse.ArgumentParser(prog="python -m tools.experiments.rerank_fixture", description=__doc__.splitlines()[0])
    ap.add_argument("--eval", action="store_true", help="also measure held-out perplexity while training (slower)")
    args = ap.parse_args()
    path = ensure_fixture(evaluate=args.eval)
    log = json.loads((path / "train_log.json").read_text())
    print(path)
    print(json.dumps({k: v for k, v in log.items() if k not in ("losses",)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
