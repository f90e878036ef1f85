"""Which importance estimate makes the best byte budget? KL on held-out text, SmolLM2-135M.

One measurement pass (:func:`adapterpack.torch.fit.fisher.component_statistics`, sampled labels, on
``--calibration`` evenly spaced pydoc TRAIN blocks) gives, per module, k×k second moments of each
singular component's log-likelihood gradient. Each estimate below turns them into a cost curve
``cost_i(j)`` = the second-order KL of cutting module i to rank j,
``½·σ_{≥j}ᵀ M_{≥j,≥j} σ_{≥j}`` (a diagonal M makes it ``½·Σ_{l≥j} M_ll σ_l²``), and the exact budget DP
minimises ``Σ_i cost_i(j_i)`` at the bytes of each uniform rank:

- ``seq-diag``: M = diag E_seq[z zᵀ] (the Fisher diagonal: what ``adapterpack importance`` ships);
- ``seq-full``: M = E_seq[z zᵀ] (cross terms between a module's components);
- ``tok-diag`` / ``tok-full``: the same per token, E_t[w wᵀ] (cross-position terms dropped: 64× more
  samples per entry, biased where positions correlate);
- ``kfac``: M = E_t[(Uᵀg)(Uᵀg)ᵀ] ⊙ E_t[(Vᵀx)(Vᵀx)ᵀ] (Kronecker-factored).

Against uniform rank and the data-free ``balanced`` budget; every variant applied as W + ΔW and measured
on HELD-OUT blocks against the full adapter (:class:`tools.experiments.rerank_quality.Evaluator`).

    nice -n 10 python -m tools.experiments.rerank_estimators --adapters r64,example --blocks 32
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

import adapterpack
from adapterpack.ops.importance import Importance
from adapterpack.ops.rerank import RerankPolicy, rerank
from tools.experiments.rerank_fisher import adapter_path

ESTIMATES = ("seq-diag", "seq-full", "tok-diag", "tok-full", "kfac")


def matrix(stats: dict[str, np.ndarray], estimate: str) -> np.ndarray:
    """The curvature one estimate uses for one module: k×k, or its diagonal [k]."""
    if estimate == "kfac":
        return stats["grad"] * stats["input"]  # Schur product of two PSD matrices: PSD
    m = stats["sequence" if estimate.startswith("seq") else "token"]
    return np.diag(m).copy() if estimate.endswith("diag") else m


def run(label: str, ev: Any, ranks: list[int], n_cal: int) -> list[dict[str, Any]]:
    from adapterpack.torch.fit.fisher import STATISTICS, component_statistics
    from tools.experiments.rerank_quality import factor_bytes
    from tools.fixtures import smollm2

    full = adapterpack.open(adapter_path(label))
    ref = ev.set_reference(full)
    ev.apply(None)
    train = smollm2.pydoc_blocks("train", tokenizer=smollm2.load_tokenizer())
    cal = train[np.unique(np.linspace(0, train.shape[0] - 1, num=min(n_cal, train.shape[0])).round().astype(np.int64))]
    t0 = time.perf_counter()
    batches = [cal[i : i + 4] for i in range(0, cal.shape[0], 4)]
    stats, spectra, info = component_statistics(ev.model, full, batches, statistics=STATISTICS)
    print(f"{label}: statistics from {len(cal)} sequences in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    imps = {e: Importance({n: matrix(st, e) for n, st in stats.items()}, spectra, info) for e in ESTIMATES}
    rows = []
    for j in ranks:
        uniform, _ = rerank(full, RerankPolicy(rank=j, encoding="lora"))
        budget, _ = factor_bytes(uniform)
        variants = {"uniform": uniform, "balanced": rerank(full, RerankPolicy(budget=budget, encoding="lora"))[0]}
        for e, imp in imps.items():
            pol = RerankPolicy(budget=budget, encoding="lora", importance=imp, weighting="absolute")
            variants[e] = rerank(full, pol)[0]
        row: dict[str, Any] = {"adapter": label, "rank": j, "bytes": budget, "full_ppl": ref["ppl"], "variants": {}}
        for name, ad in variants.items():
            b, _ = factor_bytes(ad)
            res = ev.measure(ad) | {"bytes": b}
            row["variants"][name] = res
            print(f"{label} rank {j} {name}: KL×1e3 {res['kl'] * 1e3:.3f} bytes {b:,}", file=sys.stderr)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    from tools.experiments.rerank_fisher import evaluate, parser

    args = parser(__doc__, "8,4,2 for r64, 4,2 otherwise").parse_args(argv)
    return evaluate(args, {"r64": [8, 4, 2], "*": [4, 2]}, run)


if __name__ == "__main__":
    raise SystemExit(main())
