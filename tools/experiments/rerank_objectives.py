"""Which data-free budget objective tracks KL? Rank allocations from per-module value functions, measured.

Each objective turns a module's singular values (and its bytes per rank) into a value v_i(j) for
each allowed rank j; the exact knapsack (:func:`adapterpack.linalg.allocate.budget_dp`) then picks the
ranks maximising Σ v_i within the bytes of uniform rank r (for each r of ``--ranks``). A few rules
that are not knapsacks (``energyfit``: one kept-energy fraction for all modules, the largest that
fits; ``erank``: ranks proportional to the entropy effective rank) are fitted to the same bytes.
Objectives (``NAME@M``: min rank M, default 1; ``NAME@r-D``: min rank r−D; ``NAME@fF``: min rank ⌈F·r⌉):

- ``uniform``: rank r everywhere; ``abs``: Σ kept σ²; ``rel``: Σ kept σ²/‖ΔW_i‖²;
- ``powP``: Σ kept σ² / ‖ΔW_i‖^(2P) (P=0 is abs, P=1 rel);
- ``errQ``: −Σ rel_err_i^Q (Q=2 is rel; Q=1 the sum of relative errors; large Q → minimax);
- ``aerrQ``: −Σ ‖ΔW_i − ΔW_i,j‖_F^Q (absolute errors; Q=2 is abs; Q=1 the sum of error norms);
- ``sv1``: −Σ σ_{j+1} (the largest singular value cut);
- ``logkept``: Σ log(kept fraction_i) (needs min rank ≥ 1);
- ``nuc``: Σ kept σ (nuclear norm), ``nucrel``: that / Σ σ_i;
- ``lib:W``: the library's weighting W (``absolute``, ``relative``, ``balanced``) through ``allocate.budget_dp``;
- ``layers:A-B@r``: diagnostic, layers A..B at rank r, all others full;
- ``type:T@r``: diagnostic, modules whose name contains T at rank r, all others full (not byte-matched).

Variants are applied as W0 + ΔW like :mod:`tools.experiments.rerank_quality` (whose Evaluator this uses).

    OMP_NUM_THREADS=1 nice -n 10 python -m tools.experiments.rerank_objectives --adapters r64 --blocks 32 \\
        --objectives uniform,abs@0,abs,abs@2,pow0.5,rel,err1,logkept
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.encodings.lower import at_rank
from adapterpack.examples import example_path
from adapterpack.linalg import allocate
from adapterpack.ops.rerank import module_spectrum

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Mod:
    """One module's spectrum and bytes per rank (fp32 LoRA factors)."""

    name: str
    s: np.ndarray  # nonzero singular values, descending
    cost: int

    @property
    def k(self) -> int:
        return int(self.s.size)


def spectra(adapter: Adapter) -> list[Mod]:
    out = []
    for m in adapter:
        sp, f = module_spectrum(m)
        s = sp.S[sp.S > 0]
        out.append(Mod(m.name, s.astype(np.float64), (f.A.shape[1] + f.B.shape[0]) * 4))
    return out


def _values(obj: str, s: np.ndarray) -> np.ndarray:
    """v(j) for j = 0..k (may be -inf at j=0)."""
    e = s**2
    cum = np.concatenate([[0.0], np.cumsum(e)])
    total = cum[-1]
    frac = cum / total
    err = np.sqrt(np.clip(1.0 - frac, 0.0, None))
    if obj == "abs":
        return cum
    if obj == "rel":
        return frac
    if obj.startswith("pow"):
        return cum / total ** float(obj[3:])
    if obj.startswith("aerr"):
        return -(np.sqrt(np.clip(total - cum, 0.0, None)) ** float(obj[4:]))
    if obj == "sv1":
        return -np.concatenate([s, [0.0]])
    if obj.startswith("err"):
        return -(err ** float(obj[3:]))
    if obj == "logkept":
        with np.errstate(divide="ignore"):
            return np.log(frac)
    if obj == "nuc":
        return np.concatenate([[0.0], np.cumsum(s)])
    if obj == "nucrel":
        return np.concatenate([[0.0], np.cumsum(s)]) / s.sum()
    raise SystemExit(f"unknown objective {obj!r}")


TYPE_WEIGHTS: dict[str, float] = {}


def knapsack(mods: list[Mod], budget: int, obj: str, min_rank: int) -> dict[str, int]:
    """Exact DP on arbitrary per-rank values, through allocate.budget_dp: energies are the value steps.
    ``tw:OBJ`` multiplies each module's values by its type's weight (``--type-weights``; 1 when absent)."""
    items = []
    weighted = obj.startswith("tw:")
    obj = obj[3:] if weighted else obj
    for m in mods:
        v = _values(obj, m.s) * (TYPE_WEIGHTS.get(type_of(m.name), 1.0) if weighted else 1.0)
        lo = min(min_rank, m.k)
        steps = np.zeros(m.k)
        steps[lo:] = np.diff(v)[lo:]  # Σ steps[:j] = v(j) − v(lo) for j ≥ lo
        items.append(allocate.Item(m.name, steps, m.cost, allocate.choices_for(m.k, min_rank=min_rank)))
    return allocate.budget_dp(items, budget, "absolute")


def fit_rule(mods: list[Mod], budget: int, rank_of: Callable[[Mod, float], int], lo: float, hi: float) -> dict[str, int]:
    """Bisect a scalar t so the rule's ranks cost at most ``budget``, the largest t that fits."""
    def ranks(t: float) -> dict[str, int]:
        return {m.name: rank_of(m, t) for m in mods}

    def cost(r: dict[str, int]) -> int:
        return sum(r[m.name] * m.cost for m in mods)

    for _ in range(60):
        mid = (lo + hi) / 2
        if cost(ranks(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks(lo)


BUDGET_SCALE = 1.0


def allocation(mods: list[Mod], r: int, spec: str) -> dict[str, int]:
    budget = int(BUDGET_SCALE * sum(min(r, m.k) * m.cost for m in mods))
    if spec.startswith("lib:"):  # the library's own weighting, min rank 1 as rerank's budgets
        items = [allocate.Item(m.name, m.s**2, m.cost, allocate.choices_for(m.k, min_rank=1)) for m in mods]
        return allocate.budget_dp(items, budget, spec[4:])
    obj, _, mr = spec.partition("@")
    if mr.startswith("r-"):  # NAME@r-D: floor D below the uniform rank r
        min_rank = max(r - int(mr[2:]), 0)
    elif mr.startswith("f"):  # NAME@fF: floor ⌈F·r⌉
        min_rank = min(r, int(np.ceil(float(mr[1:]) * r - 1e-9)))
    else:
        min_rank = min(int(mr) if mr else 1, r)  # a floor above r cannot fit r's bytes
    if obj == "uniform":
        return {m.name: min(r, m.k) for m in mods}
    if obj == "energyfit":
        def by_energy(m: Mod, t: float) -> int:
            cum = np.cumsum(m.s**2) / np.sum(m.s**2)
            return max(min(min_rank, m.k), int(min(np.searchsorted(cum, t * (1 - 1e-12)) + 1, m.k)))
        return fit_rule(mods, budget, by_energy, 0.0, 1.0)
    if obj == "erank":
        def by_erank(m: Mod, t: float) -> int:
            p = m.s**2 / np.sum(m.s**2)
            er = float(np.exp(-np.sum(p * np.log(np.where(p > 0, p, 1.0)))))
            return max(min(min_rank, m.k), min(m.k, int(t * er)))
        return fit_rule(mods, budget, by_erank, 0.0, 64.0)
    return knapsack(mods, budget, obj, min_rank)


def type_of(name: str) -> str:
    return next((t for t in TYPES if t in name), "other")


def layer_of(name: str) -> int:
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layers" and b.isdigit():
            return int(b)
    return -1


def describe(mods: list[Mod], ranks: dict[str, int]) -> str:
    """Mean rank per module type and per layer third."""
    by: dict[str, list[int]] = {}
    for m in mods:
        by.setdefault(type_of(m.name), []).append(ranks[m.name])
    layers = sorted({layer_of(m.name) for m in mods})
    thirds = np.array_split(np.array(layers), 3)
    lay = []
    for th in thirds:
        rs = [ranks[m.name] for m in mods if layer_of(m.name) in set(th.tolist())]
        lay.append(f"L{th[0]}-{th[-1]}:{np.mean(rs):.1f}")
    return " ".join(f"{t[:-5]}:{np.mean(v):.1f}" for t, v in by.items()) + " | " + " ".join(lay)


def load(name: str) -> tuple[Path, str]:
    if name == "r64":
        from tools.experiments.rerank_fixture import ensure_fixture

        return ensure_fixture(), "r64-all-linear"
    if name == "example":
        return example_path(), "bundled-r8-qkvo"
    if name.startswith("bank"):
        from tools.fixtures import smollm2

        d = smollm2.cache_root() / "bank-loras" / f"lora{int(name[4:]):02d}"
        return d, f"bank-lora{int(name[4:]):02d}-r8-qv"
    return Path(name), Path(name).name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.experiments.rerank_objectives", description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="r64", help="comma list: r64, example, bankNN (bank-loras/loraNN) or a path")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--first-block", type=int, default=0)
    ap.add_argument("--ranks", default="8,4,2")
    ap.add_argument("--objectives", default="uniform,abs@0,abs,rel")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="budgets are this × uniform rank r's bytes (uniform itself stays rank r; default %(default)s)")
    ap.add_argument("--type-weights", default="", help="T=w,... multipliers for tw:OBJ objectives (diagnostic)")
    ap.add_argument("--dry-run", action="store_true", help="only print the allocations (no model)")
    ap.add_argument("--json", help="append results (JSON lines) here")
    args = ap.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",") if x]
    objs = [o for o in args.objectives.split(",") if o]
    global BUDGET_SCALE
    BUDGET_SCALE = args.budget_scale
    for kv in [x for x in args.type_weights.split(",") if x]:
        t, _, w = kv.partition("=")
        TYPE_WEIGHTS[t] = float(w)

    ev = None
    if not args.dry_run:
        import torch

        from tools.experiments.rerank_quality import Evaluator

        torch.set_num_threads(1)
        ev = Evaluator(args.blocks, first=args.first_block)
        print(f"{ev.blocks.shape[0]} of {ev.total_blocks} held-out blocks from {args.first_block}", file=sys.stderr)
    for name in [a for a in args.adapters.split(",") if a]:
        path, label = load(name)
        full = adapterpack.open(path)
        mods = spectra(full)
        kmax = max(m.k for m in mods)
        print(f"== {label}: {len(mods)} modules, rank ≤ {kmax}", file=sys.stderr)
        ref = None
        if ev is not None:
            ev.apply(None)  # undo the previous adapter's modules before recording this one's W0
            ev.base.clear()
            ev.apply(full)
            ref = ev.set_reference(full)
            print(f"   full ppl {ref['ppl']:.4f}", file=sys.stderr)
        for spec in objs:
            if spec.startswith("type:"):
                t, _, rr = spec[5:].partition("@")
                plan = [(int(rr), {m.name: (min(int(rr), m.k) if t in m.name else m.k) for m in mods})]
            elif spec.startswith("layers:"):  # layers:A-B@r: layers A..B at rank r, the rest full
                span, _, rr = spec[7:].partition("@")
                a, b = (int(x) for x in span.split("-"))
                plan = [(int(rr), {m.name: (min(int(rr), m.k) if a <= layer_of(m.name) <= b else m.k) for m in mods})]
            else:
                plan = [(r, allocation(mods, r, spec)) for r in ranks if r < kmax]
            for r, rk in plan:
                nbytes = sum(rk[m.name] * m.cost for m in mods)
                ubytes = sum(min(r, m.k) * m.cost for m in mods)
                line = f"   r={r} {spec:14s} {nbytes:>10,} B ({nbytes / ubytes:.3f}×)  {describe(mods, rk)}"
                row: dict[str, Any] = {"adapter": label, "first_block": args.first_block, "blocks": args.blocks,
                                       "r": r, "objective": spec, "bytes": nbytes, "uniform_bytes": ubytes}
                if ev is not None:
                    t0 = time.perf_counter()
                    variant = full.derived({m.name: at_rank(m, rk[m.name]) for m in full})
                    res = ev.measure(variant)
                    row.update(res)
                    took = time.perf_counter() - t0
                    line += f"  KL×1e3 {res['kl'] * 1e3:7.3f} ppl {res['ppl']:.3f} top1 {res['top1']:.4f} ({took:.0f}s)"
                print(line, file=sys.stderr, flush=True)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
        full.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
