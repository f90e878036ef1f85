"""NOLA vs LoRA on SmolLM2-135M (q_proj, v_proj) with pydoc text: held-out perplexity, trainable
parameters and file bytes, every run with the same batches and number of steps.

Run from the repository root (CPU, a few minutes per run on an idle 2-core machine)::

    nice -n 10 python -m tools.experiments.nola_smollm2 --out /tmp/nola_exp --steps 40 --batch 4

LoRA runs use ``tools/fixtures/train_lora.py`` (PEFT, AdamW at ``--lora-lr``, default 1e-3, alpha = 2r); NOLA runs use
``adapterpack.torch.fit.nola`` (rank 8, scale 2, A0 from the seed, shared basis, AdamW on α, β at
``--nola-lr``), drawing the same batches (``train_lora._batches`` with the same seed). Every
adapter is evaluated the same way: applied to a fresh model with ``adapterpack.torch.apply``
(merged) and scored on the held-out pydoc blocks (all 61, or the first ``--heldout-blocks``).
Results go to ``OUT/results.json`` after
each run (so a long sweep can be read while it runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import adapterpack
import adapterpack.torch as apt
from adapterpack.torch import nola as tn
from tools.fixtures import smollm2
from tools.fixtures.train_lora import _batches, train_lora

TARGETS = ["q_proj", "v_proj"]


def heldout_ppl(path: Path | None, heldout: torch.Tensor) -> float:
    """Perplexity of a fresh model with the adapter at ``path`` merged (None: the base model)."""
    model = smollm2.load_model()
    if path is not None:
        apt.apply(model, path, merge=True)
    return smollm2.perplexity(model, heldout)


def run_nola(out: Path, k: int, steps: int, batch: int, seed: int, lr: float, rank: int) -> dict[str, Any]:
    """Train q/v NOLA layers with k coefficients per factor; save to OUT/nola-k{k}.apack."""
    train = smollm2.pydoc_blocks("train")
    model = smollm2.load_model()
    torch.manual_seed(seed)
    tn.inject(model, TARGETS, rank=rank, k=k, seed=seed, alpha=2.0 * rank, shared_basis=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for idx in _batches(train.shape[0], batch, steps, seed):
        ids = train[idx]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    path = out / f"nola-k{k}.apack"
    res = tn.save(model, path, base_model=smollm2.HUB_ID)
    return {
        "kind": "nola",
        "k": k,
        "rank": rank,
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "file": str(path),
        "file_bytes": res.file_size,
        "train_seconds": seconds,
        "initial_loss": losses[0],
        "final_loss": losses[-1],
    }


def run_lora(out: Path, r: int, steps: int, batch: int, seed: int, lr: float = 1e-3) -> dict[str, Any]:
    """Train PEFT LoRA rank r (alpha 2r) with the fixture; also store it as .apack (raw) for bytes."""
    folder = out / f"lora-r{r}"
    log = train_lora(folder, TARGETS, r=r, alpha=2.0 * r, steps=steps, seed=seed, lr=lr, batch=batch, evaluate=False)
    apack = out / f"lora-r{r}.apack"
    with adapterpack.open(folder) as ad:
        res = adapterpack.save(ad, apack, codec="raw")
    return {
        "kind": "lora",
        "r": r,
        "lr": lr,
        "trainable_params": log["trainable_params"],
        "file": str(folder),
        "file_bytes": log["adapter_bytes"],
        "apack_raw_bytes": res.file_size,
        "train_seconds": log["train_seconds"],
        "initial_loss": log["initial_loss"],
        "final_loss": log["final_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", default="32,128,512", help="NOLA coefficients per factor, comma-separated")
    ap.add_argument("--ranks", default="1,8", help="LoRA ranks, comma-separated")
    ap.add_argument("--nola-lr", type=float, default=5e-3)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--nola-rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-base", action="store_true", help="skip the base model's evaluation (another run has it)")
    ap.add_argument("--heldout-blocks", type=int, default=61, help="evaluate on the first N held-out blocks (61: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = smollm2.pydoc_blocks("heldout")[: args.heldout_blocks]
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "heldout_blocks": int(heldout.shape[0]),
        "runs": [],
    }
    dump = args.out / "results.json"

    def record(entry: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        entry["heldout_ppl"] = heldout_ppl(Path(entry["file"]), heldout)
        entry["eval_seconds"] = time.perf_counter() - t0
        results["runs"].append(entry)
        dump.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(entry), flush=True)

    if not args.no_base:
        results["base_heldout_ppl"] = heldout_ppl(None, heldout)
        dump.write_text(json.dumps(results, indent=2) + "\n")
        print("base", results["base_heldout_ppl"], flush=True)
    ks = [int(x) for x in args.ks.split(",") if x]
    ranks = [int(x) for x in args.ranks.split(",") if x]
    plan = [("nola", k) for k in ks[:1]] + [("lora", r) for r in ranks[:1]]  # the two cheapest first
    plan += [("nola", k) for k in ks[1:]] + [("lora", r) for r in ranks[1:]]
    for kind, n in plan:
        if kind == "nola":
            record(run_nola(args.out, n, args.steps, args.batch, args.seed, args.nola_lr, args.nola_rank))
        else:
            record(run_lora(args.out, n, args.steps, args.batch, args.seed, args.lora_lr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
