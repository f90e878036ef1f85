"""Budgets weighted by measured importance vs uniform rank and the data-free budget, on SmolLM2 (KL, ppl, top-1).

For each adapter (the cached r=64 fixture, the bundled r=8 example, or PEFT folders given by path):

1. ``adapterpack.torch.fit.fisher.component_fisher`` on ``--calibration`` blocks of the pydoc TRAIN split
   (evenly spaced, as ``adapterpack importance`` picks them; labels sampled from the adapted model,
   seed 0) → an :class:`~adapterpack.ops.importance.Importance`;
2. for each uniform rank j of ``--ranks``: the uniform re-rank, and at exactly its bytes the budget DP
   with the data-free weightings ``absolute`` (energy) and ``balanced`` (the default) and on
   importance-weighted energy (``RerankPolicy(importance=...)``),
   with min_rank 1 (the library default; at rank 1's bytes also 0), importance measured with sampled
   and with the text's own labels;
   with ``--kohya``, kohya's ``resize_lora.py --dynamic_method sv_fro`` at the threshold whose output
   comes nearest those bytes, and both budgets at exactly kohya's bytes;
3. every variant applied as W + ΔW and measured on HELD-OUT blocks against the full adapter
   (:class:`tools.experiments.rerank_quality.Evaluator`): KL(full‖variant), perplexity, top-1 agreement.

    nice -n 10 python -m tools.experiments.rerank_fisher --adapters r64,example --blocks 32 --calibration 64 --kohya
    nice -n 10 python -m tools.experiments.rerank_fisher --first-block 32 --blocks 29   # the other held-out blocks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack.examples import example_path
from adapterpack.ops.rerank import RerankPolicy, rerank

R64 = Path.home() / ".cache" / "adapterpack" / "rerank-r64"


def adapter_path(label: str) -> Path:
    """``r64`` (the cached fixture), ``example`` (bundled), or a PEFT folder's path."""
    if label == "r64":
        if not R64.is_dir():
            raise SystemExit(f"{R64} missing: build it with `python -m tools.experiments.rerank_fixture`")
        return R64
    return example_path() if label == "example" else Path(label)


def kohya_at(full: Any, src: Path, work: Path, target: int) -> tuple[Any, float] | None:
    """kohya's resize_lora.py --dynamic_method sv_fro at the threshold whose output bytes come nearest
    ``target`` (its own script, a subprocess; None when it is not set up, see tools/bench/bench_rerank.py)."""
    from tools.experiments.rerank_quality import kohya_threshold_for, kohya_variant

    cap = max(int(m.params.get("rank", 0)) for m in full)
    t, _predicted = kohya_threshold_for(full, target, cap=cap)
    v = kohya_variant(src, work, t, cap, f"kohya sv_fro {t:g}")
    return None if v is None else (v.adapter, t)


def run(
    label: str, ev: Any, ranks: list[int], n_cal: int, kohya: bool = False, labels: tuple[str, ...] = ("sample",)
) -> list[dict[str, Any]]:
    """Every variant of one adapter, measured (one row per uniform rank)."""
    import tempfile

    from adapterpack.ops.convert import convert
    from adapterpack.torch.fit.fisher import component_fisher
    from tools.experiments.rerank_quality import factor_bytes
    from tools.fixtures import smollm2

    full = adapterpack.open(adapter_path(label))
    ref = ev.set_reference(full)
    ev.apply(None)  # component_fisher applies the adapter itself, on the base weights
    train = smollm2.pydoc_blocks("train", tokenizer=smollm2.load_tokenizer())
    cal = train[np.unique(np.linspace(0, train.shape[0] - 1, num=min(n_cal, train.shape[0])).round().astype(np.int64))]
    batches = [cal[i : i + 4] for i in range(0, cal.shape[0], 4)]
    imps = {}
    for lab in labels:
        t0 = time.perf_counter()
        imps[lab] = component_fisher(ev.model, full, batches, labels=lab, seed=0)
        print(f"{label}: importance ({lab} labels) from {len(cal)} sequences in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    kohya_src: Path | None = None
    for j in ranks:
        uniform, _ = rerank(full, RerankPolicy(rank=j, encoding="lora"))
        budget, _ = factor_bytes(uniform)
        row: dict[str, Any] = {"adapter": label, "rank": j, "bytes": budget, "full_ppl": ref["ppl"], "variants": {}}
        variants = {"uniform": uniform}
        weights = [("absolute", None, "absolute"), ("balanced", None, "balanced")]
        weights += [(f"importance ({lab} labels)", imp, "absolute") for lab, imp in imps.items()]
        weights += [(f"importance ({lab} labels), balanced", imp, "balanced") for lab, imp in imps.items()]
        for min_rank in (1, 0) if j == 1 else (1,):  # min_rank 0 differs from 1 only where rank 1 is the floor
            for name, imp_, w in weights:
                pol = RerankPolicy(budget=budget, encoding="lora", min_rank=min_rank, importance=imp_, weighting=w)
                variants[f"budget {name}" + (", min_rank 0" if min_rank == 0 else "")] = rerank(full, pol)[0]
        if kohya and j > 1:
            if kohya_src is None:  # once per adapter: kohya's script reads a kohya file
                work = Path(tempfile.mkdtemp(prefix="rerank_fisher_"))
                kohya_src = work / f"{label}.safetensors"
                convert(adapter_path(label), kohya_src, to="kohya", force=True)
            got = kohya_at(full, kohya_src, work, budget)
            if got is not None:
                kad, thr = got
                kb, _ = factor_bytes(kad)
                variants[f"kohya sv_fro {thr:g} ({kb:,} B)"] = kad
                for name, imp_, w in weights:
                    pol = RerankPolicy(budget=kb, encoding="lora", importance=imp_, weighting=w)
                    variants[f"budget {name} at kohya's bytes"] = rerank(full, pol)[0]
        for name, ad in variants.items():
            b, _ = factor_bytes(ad)
            res = ev.measure(ad) | {"bytes": b}
            row["variants"][name] = res
            print(f"{label} rank {j} ({budget:,} B) {name}: KL×1e3 {res['kl'] * 1e3:.3f} ppl {res['ppl']:.3f} "
                  f"top1 {res['top1']:.4f} bytes {b:,}", file=sys.stderr)
        rows.append(row)
    return rows


def _cell(res: dict[str, float] | None) -> str:
    return "" if res is None else f"{res['kl'] * 1e3:.3f} ({res['ppl']:.3f})"


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per adapter: KL×10³ (ppl) per variant and rank."""
    out = []
    for label in dict.fromkeys(r["adapter"] for r in rows):
        mine = [r for r in rows if r["adapter"] == label]
        head = f"{label} (full adapter ppl {mine[0]['full_ppl']:.3f}); KL(full‖variant)×10³ (ppl) at the bytes of uniform rank j:"
        out.append(f"\n{head}\n")
        out.append("| variant | " + " | ".join(f"rank {r['rank']} bytes ({r['bytes'] / 1e6:.2f} MB)" for r in mine) + " |")
        out.append("|---|" + "---:|" * len(mine))
        for n in dict.fromkeys(k for r in mine for k in r["variants"]):
            cells = [_cell(r["variants"].get(n)) for r in mine]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def parser(doc: str, default_ranks: str) -> argparse.ArgumentParser:
    """The options every held-out KL experiment on SmolLM2 shares (this one's and rerank_estimators')."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--adapters", default="r64,example", help="r64, example or PEFT folders, comma-separated")
    ap.add_argument("--ranks", default=None, help=f"uniform ranks (default: {default_ranks})")
    ap.add_argument("--blocks", type=int, default=32, help="held-out blocks evaluated (of 61)")
    ap.add_argument("--first-block", type=int, default=0, help="first held-out block")
    ap.add_argument("--calibration", type=int, default=256, help="train blocks for the importance (evenly spaced)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here")
    return ap


def evaluate(args: argparse.Namespace, default_ranks: dict[str, list[int]], run_one: Any) -> int:
    """``run_one(label, evaluator, ranks, calibration)`` for each adapter; prints the tables, writes ``--json``."""
    import torch

    from tools.experiments.rerank_quality import Evaluator

    torch.set_num_threads(args.threads)
    ev = Evaluator(args.blocks, first=args.first_block)
    rows = []
    for label in args.adapters.split(","):
        ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else default_ranks.get(label, default_ranks["*"])
        rows += run_one(label, ev, ranks, args.calibration)
    print(f"held-out blocks {args.first_block}..{args.first_block + args.blocks - 1}, calibration {args.calibration} train blocks")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "8,4,2,1 for r64, 4,2,1 otherwise")
    ap.add_argument("--kohya", action="store_true", help="also kohya's sv_fro near each rank's bytes, and budgets at its bytes")
    ap.add_argument("--labels", default="sample,data", help="importance label modes to compare (sample, data)")
    args = ap.parse_args(argv)

    def run_one(label: str, ev: Any, ranks: list[int], n_cal: int) -> list[dict[str, Any]]:
        return run(label, ev, ranks, n_cal, kohya=args.kohya, labels=tuple(args.labels.split(",")))

    return evaluate(args, {"r64": [8, 4, 2, 1], "*": [4, 2, 1]}, run_one)


if __name__ == "__main__":
    raise SystemExit(main())
