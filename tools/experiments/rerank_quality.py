"""Re-ranking quality on a real model: held-out perplexity, KL(full‖reranked) and top-1 agreement.

For each adapter (the cached r=64 fixture, :mod:`tools.experiments.rerank_fixture`, and the bundled
r=8 example) on SmolLM2-135M-Instruct and held-out pydoc blocks:

- uniform rank j for each j of ``--ranks`` (exact SVD truncation, :func:`adapterpack.ops.rerank.rerank`),
- a global byte budget equal to each uniform rank's bytes, with ``weighting`` absolute and relative,
- kohya-ss ``resize_lora.py --dynamic_method sv_fro`` at the threshold whose output bytes come
  closest to each uniform rank's bytes (kohya's own script, run as a subprocess; skipped with a
  message when it is not fetched, see :mod:`tools.bench.bench_rerank`), and our budget at exactly
  the bytes kohya's output has.

A variant is applied by adding its ΔW (``Module.delta()``, scale included, fp32) to each base weight;
the full adapter applied the same way is checked against PEFT's own forward once. Bytes are the
factors' bytes (rank·(out+in)·4 for fp32 LoRA factors), the same formula for every variant.

    nice -n 10 python -m tools.experiments.rerank_quality --blocks 32 --json /tmp/rerank_quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.examples import example_path
from adapterpack.linalg import allocate
from adapterpack.ops.rerank import RerankPolicy, rerank

KOHYA_GRID = tuple(np.round(np.arange(0.50, 0.9995, 0.0025), 4))


@dataclass
class Variant:
    """One way of cutting the adapter: its label, ΔW source and factor bytes."""

    label: str
    kind: str  # full | base | uniform | budget | kohya
    adapter: Adapter | None
    factor_bytes: int
    ranks: dict[str, int]
    note: str = ""


def factor_bytes(adapter: Adapter) -> tuple[int, dict[str, int]]:
    """Σ rank·(out+in)·itemsize over modules (what the kept factors cost) and each module's rank."""
    total, ranks = 0, {}
    for m in adapter:
        f = m.factors()
        r = int(np.count_nonzero(np.any(f.A != 0, axis=1) & np.any(f.B != 0, axis=0)))
        ranks[m.name] = r
        total += r * (f.A.shape[1] + f.B.shape[0]) * f.A.dtype.itemsize
    return total, ranks


def reranked(adapter: Adapter, label: str, kind: str, policy: RerankPolicy) -> Variant:
    """The adapter re-ranked under ``policy`` (lora output, so bytes compare with kohya's)."""
    out, _report = rerank(adapter, policy)
    b, ranks = factor_bytes(out)
    return Variant(label, kind, out, b, ranks)


def activation_weighted(adapter: Adapter, moments: dict[str, np.ndarray], budget: int, min_rank: int, label: str) -> Variant:
    """EXPERIMENT ONLY (not a library option): the budget DP on output-space energy instead of ‖ΔW‖².

    Cutting ΔW's SVD after rank j changes a layer's output by (ΔW − ΔW_j)·x; over inputs with second
    moment C = E[x xᵀ] that costs Σ_{l>j} σ_l² · v_lᵀ C v_l (the u_l are orthonormal, so no cross
    terms). Those per-component values replace σ_l² in the same exact knapsack; the truncation itself
    is unchanged. C comes from calibration blocks of the train split, not the held-out ones.
    """
    from adapterpack.encodings.lower import at_rank
    from adapterpack.linalg import allocate
    from adapterpack.ops.rerank import module_spectrum

    items = []
    for m in adapter:
        sp, f = module_spectrum(m)
        k = int(np.count_nonzero(sp.S > 0))
        c = moments[m.name]
        vt = sp.Vt[:k]
        gain = sp.S[:k] ** 2 * np.einsum("ij,jk,ik->i", vt, c, vt)
        items.append(allocate.Item(m.name, gain, (f.A.shape[1] + f.B.shape[0]) * 4, allocate.choices_for(k, min_rank=min_rank)))
    ranks = allocate.budget_dp(items, budget, "absolute")
    out = Adapter(name=adapter.name, modules={m.name: at_rank(m, ranks[m.name]) for m in adapter})
    b, got = factor_bytes(out)
    return Variant(label, "activation", out, b, got, note="experiment only: calibration inputs")


# --- kohya sv_fro ------------------------------------------------------------------------------------


def kohya_sv_fro_rank(s: np.ndarray, full_len: int, threshold: float, cap: int) -> int:
    """The rank kohya's sv_fro rule keeps for singular values ``s`` of a ΔW with ``full_len`` of them.

    Mirrors the behaviour documented in /work/shared/README.md (measured, not copied): the index of
    the first cumulative σ² fraction ≥ threshold², plus one, clamped to [1, len-1], plus one again
    (so it keeps one more value than the threshold needs, and never fewer than 2), capped at ``cap``.
    """
    e = s.astype(np.float64) ** 2
    total = e.sum()
    if s.size == 0 or s[0] <= 1e-6:
        return 1
    cum = np.cumsum(e) / total
    idx = int(np.searchsorted(cum, threshold**2, side="left")) + 1
    idx = max(1, min(idx, full_len - 1))
    return min(idx + 1, cap)


def kohya_threshold_for(adapter: Adapter, target_bytes: int, cap: int) -> tuple[float, int]:
    """The sv_fro threshold on :data:`KOHYA_GRID` whose predicted output bytes are nearest ``target_bytes``."""
    from adapterpack.ops.rerank import module_spectrum

    specs = []
    for m in adapter:
        sp, f = module_spectrum(m)
        out_, in_ = f.B.shape[0], f.A.shape[1]
        specs.append((sp.S, min(out_, in_), (out_ + in_) * 4))
    best = (0.0, -1)
    for t in KOHYA_GRID:
        b = sum(kohya_sv_fro_rank(s, n, float(t), cap) * c for s, n, c in specs)
        if best[1] < 0 or abs(b - target_bytes) < abs(best[1] - target_bytes):
            best = (float(t), b)
    return best


def kohya_variant(src_kohya: Path, work: Path, threshold: float, cap: int, label: str) -> Variant | None:
    """Run kohya's resize_lora.py (sv_fro at ``threshold``) and read its output; None when kohya is absent."""
    from tools.bench.bench_rerank import KohyaMissing, run_kohya

    dst = work / f"kohya_svfro_{threshold:.4f}.safetensors"
    try:
        run_kohya(src_kohya, dst, new_rank=cap, sv_fro=threshold)
    except KohyaMissing as e:
        print(f"[skip] kohya sv_fro: {e}", file=sys.stderr)
        return None
    ad = adapterpack.open(dst)
    b, ranks = factor_bytes(ad)
    return Variant(label, "kohya", ad, b, ranks, note=f"sv_fro {threshold}")


# --- evaluation --------------------------------------------------------------------------------------


class Evaluator:
    """The base model with swappable ΔW, the held-out blocks and the full adapter's log-probs."""

    def __init__(self, n_blocks: int, batch: int = 8, first: int = 0) -> None:
        import torch

        from tools.fixtures import smollm2

        self.torch = torch
        tok = smollm2.load_tokenizer()
        blocks = smollm2.pydoc_blocks("heldout", tokenizer=tok)
        self.total_blocks = int(blocks.shape[0])
        self.blocks = blocks[first : first + n_blocks]
        self.first = first
        self.batch = batch
        self.model = smollm2.load_model()
        self.base: dict[str, Any] = {}
        self.ref: list[Any] | None = None

    def _weight(self, name: str) -> Any:
        return self.model.get_submodule(name).weight

    def apply(self, adapter: Adapter | None) -> None:
        """Set every adapted weight to W0 + ΔW (W0 for modules the variant lacks, or all when None)."""
        torch = self.torch
        with torch.no_grad():
            for name, w0 in self.base.items():
                self._weight(name).copy_(w0)
            if adapter is None:
                return
            for m in adapter:
                w = self._weight(m.name)
                if m.name not in self.base:
                    self.base[m.name] = w.detach().clone()
                    w0 = self.base[m.name]
                else:
                    w0 = self.base[m.name]
                d = torch.from_numpy(np.ascontiguousarray(m.delta(), dtype=np.float32))
                if tuple(d.shape) != tuple(w.shape):
                    raise SystemExit(f"{m.name}: ΔW {tuple(d.shape)} does not fit weight {tuple(w.shape)}")
                w.copy_(w0 + d)

    def logprobs(self, ids: Any) -> Any:
        """Next-token log-probabilities [batch, block-1, vocab], float32."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[:, :-1].float()
            return torch.log_softmax(logits, dim=-1)

    def set_reference(self, adapter: Adapter) -> dict[str, float]:
        """Apply the full adapter, keep its log-probs; perplexity of the full adapter."""
        self.apply(adapter)
        self.ref = []
        nll, count = 0.0, 0
        for i in range(0, self.blocks.shape[0], self.batch):
            ids = self.blocks[i : i + self.batch]
            lp = self.logprobs(ids)
            self.ref.append(lp)
            nll -= lp.gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
        return {"ppl": math.exp(nll / count), "kl": 0.0, "top1": 1.0}

    def measure(self, adapter: Adapter | None) -> dict[str, float]:
        """Perplexity, mean token KL(full‖variant) in nats and top-1 agreement with the full adapter."""
        assert self.ref is not None
        self.apply(adapter)
        nll, kl, agree, count = 0.0, 0.0, 0, 0
        for j, i in enumerate(range(0, self.blocks.shape[0], self.batch)):
            ids = self.blocks[i : i + self.batch]
            lq = self.logprobs(ids)
            lp = self.ref[j]
            nll -= lq.gather(-1, ids[:, 1:, None]).sum().item()
            kl += (lp.exp() * (lp - lq)).sum().item()
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum().item())
            count += ids[:, 1:].numel()
        return {"ppl": math.exp(nll / count), "kl": kl / count, "top1": agree / count}

    def input_moments(self, adapter: Adapter, n_blocks: int = 8, skip_first: bool = False) -> dict[str, np.ndarray]:
        """E[x xᵀ] of each adapted module's input (float64) over ``n_blocks`` train blocks, full adapter applied
        (``skip_first``: leave out each block's first position, where LLMs put their massive activations)."""
        torch = self.torch
        from tools.fixtures import smollm2

        blocks = smollm2.pydoc_blocks("train", tokenizer=smollm2.load_tokenizer())[:: 97][:n_blocks]
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        hooks = []

        def hook(name: str) -> Any:
            def fn(_mod: Any, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                x = (x[:, 1:] if skip_first else x).reshape(-1, x.shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            return fn

        self.apply(adapter)
        for m in adapter:
            hooks.append(self.model.get_submodule(m.name).register_forward_pre_hook(hook(m.name)))
        try:
            with torch.no_grad():
                for i in range(0, blocks.shape[0], self.batch):
                    self.model(input_ids=blocks[i : i + self.batch])
        finally:
            for h in hooks:
                h.remove()
        return {n: (sums[n] / counts[n]).numpy() for n in sums}

    def check_against_peft(self, peft_dir: Path, adapter: Adapter) -> float:
        """Max |logit difference| between W+ΔW and PEFT's own forward on one block (scale check)."""
        torch = self.torch
        from peft import PeftModel

        ids = self.blocks[:1]
        self.apply(adapter)
        with torch.no_grad():
            ours = self.model(input_ids=ids).logits
        self.apply(None)
        peft = PeftModel.from_pretrained(self.model, str(peft_dir))
        peft.eval()
        with torch.no_grad():
            theirs = peft(input_ids=ids).logits
        self.model = peft.unload()
        return float((ours - theirs).abs().max().item())


# --- the experiment ----------------------------------------------------------------------------------


def run_adapter(
    ev: Evaluator,
    label: str,
    peft_dir: Path,
    ranks: list[int],
    kohya_targets: list[int],
    work: Path,
    kohya: bool,
    min_rank: int = 1,
    kinds: tuple[str, ...] = ("base", "uniform", "budget", "kohya"),
    weightings: tuple[str, ...] = ("absolute", "relative"),
) -> dict[str, Any]:
    """Every variant of one adapter, measured."""
    from adapterpack.ops.convert import convert

    full = adapterpack.open(peft_dir)
    full_bytes, full_ranks = factor_bytes(full)
    max_rank = max(full_ranks.values())
    print(f"== {label}: {len(full)} modules, rank {max_rank}, {full_bytes:,} B of factors", file=sys.stderr)
    diff = ev.check_against_peft(peft_dir, full)
    print(f"   W+ΔW vs PEFT forward: max |Δlogit| = {diff:.2e}", file=sys.stderr)
    ev.base.clear()
    ev.apply(full)  # records W0 for every module

    variants: list[Variant] = []
    uniform_bytes: dict[int, int] = {}
    moments = ev.input_moments(full) if "activation" in kinds else {}
    moments1 = ev.input_moments(full, skip_first=True) if "activation1" in kinds else {}
    for r in ranks:
        if r >= max_rank:
            continue
        v = reranked(full, f"uniform r={r}", "uniform", RerankPolicy(rank=r, encoding="lora"))
        uniform_bytes[r] = v.factor_bytes
        if "uniform" in kinds:
            variants.append(v)
        if "activation" in kinds:
            label_ = f"budget = r={r} bytes, activation-weighted"
            variants.append(activation_weighted(full, moments, v.factor_bytes, min_rank, label_))
        if "activation1" in kinds:
            label_ = f"budget = r={r} bytes, activation-weighted, position 0 left out"
            variants.append(activation_weighted(full, moments1, v.factor_bytes, min_rank, label_))
        for w in weightings if "budget" in kinds else ():
            policy = RerankPolicy(budget=v.factor_bytes, weighting=w, encoding="lora", min_rank=min_rank)
            variants.append(reranked(full, f"budget = r={r} bytes, {w}", "budget", policy))
    if kohya and "kohya" in kinds:
        kfile = work / f"{label}.safetensors"
        convert(peft_dir, kfile, to="kohya", force=True)
        for r in kohya_targets:
            if r not in uniform_bytes:
                continue
            t, predicted = kohya_threshold_for(full, uniform_bytes[r], cap=max_rank)
            kv = kohya_variant(kfile, work, t, max_rank, f"kohya sv_fro {t:g} (~r={r} bytes)")
            if kv is None:
                break
            if kv.factor_bytes != predicted:
                kv.note += f"; predicted {predicted:,} B"
            variants.append(kv)
            for w in weightings:
                variants.append(
                    reranked(
                        full,
                        f"budget = kohya {t:g} bytes, {w}",
                        "budget",
                        RerankPolicy(budget=kv.factor_bytes, weighting=w, encoding="lora", min_rank=min_rank),
                    )
                )

    rows = []
    t0 = time.perf_counter()
    ref = ev.set_reference(full)
    rows.append({"label": "full", "kind": "full", "bytes": full_bytes, **ref})
    print(f"   full: ppl {ref['ppl']:.4f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if "base" in kinds:
        base = ev.measure(None)
        rows.append({"label": "base model (no adapter)", "kind": "base", "bytes": 0, **base})
    for v in variants:
        t0 = time.perf_counter()
        res = ev.measure(v.adapter)
        rk = list(v.ranks.values())
        row = {
            "label": v.label, "kind": v.kind, "bytes": v.factor_bytes, **res,
            "rank_min": min(rk), "rank_max": max(rk), "rank_mean": float(np.mean(rk)), "note": v.note,
        }
        rows.append(row)
        print(
            f"   {v.label:40s} {v.factor_bytes:>11,} B  ppl {res['ppl']:.4f}  KL {res['kl']:.5f}  top1 {res['top1']:.4f}"
            f"  ranks {min(rk)}..{max(rk)} ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
    full.close()
    return {"adapter": label, "path": str(peft_dir), "modules": len(full), "rank": max_rank, "factor_bytes": full_bytes,
            "peft_check_max_abs_logit_diff": diff, "rows": rows}


def markdown(results: list[dict[str, Any]], n_blocks: int, total: int) -> str:
    """Tables for BENCHMARKS.md."""
    out = []
    for res in results:
        out.append(
            f"**{res['adapter']}** ({res['modules']} modules, rank {res['rank']}, "
            f"{res['factor_bytes'] / 1e6:.2f} MB of fp32 factors); "
            f"{n_blocks} of {total} held-out blocks × 127 predicted tokens\n"
        )
        out.append("| variant | factor bytes | ranks (min–max, mean) | perplexity | KL(full‖x) nats/token | top-1 agreement |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            rk = f"{r['rank_min']}–{r['rank_max']}, {r['rank_mean']:.2f}" if "rank_min" in r else "—"
            kl = f"{r['kl']:.5f}" if r["kind"] != "full" else "0"
            out.append(f"| {r['label']} | {r['bytes']:,} | {rk} | {r['ppl']:.3f} | {kl} | {r['top1'] * 100:.2f}% |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m tools.experiments.rerank_quality", description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="r64,example",
                    help="comma list of r64 (cached fixture), example, or PEFT folder paths (default: %(default)s)")
    ap.add_argument("--blocks", type=int, default=32, help="held-out blocks to evaluate (of 61; default %(default)s)")
    ap.add_argument("--first-block", type=int, default=0, help="index of the first held-out block used (default: %(default)s)")
    ap.add_argument("--ranks", default="8,4,2,1", help="uniform ranks (default: %(default)s)")
    ap.add_argument("--kohya-ranks", default="8,4,2",
                    help="uniform ranks whose bytes kohya sv_fro is matched to (default: %(default)s)")
    ap.add_argument("--min-rank", type=int, default=1,
                    help="min_rank of the budget allocations (default: %(default)s, the library default)")
    ap.add_argument("--weightings", default=",".join(allocate.WEIGHTINGS),
                    help="budget weightings to measure (default: %(default)s)")
    ap.add_argument("--no-kohya", action="store_true", help="skip kohya's sv_fro")
    ap.add_argument("--kinds", default="base,uniform,budget,kohya",
                    help="variants to measure: base, uniform, budget, kohya, activation / activation1 (experiment-only weighting "
                         "by calibration input moments; activation1 leaves out position 0) (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s; the machine is shared)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write markdown tables here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    ranks = [int(x) for x in args.ranks.split(",") if x]
    kranks = [int(x) for x in args.kohya_ranks.split(",") if x]
    ev = Evaluator(args.blocks, first=args.first_block)
    print(f"{ev.blocks.shape[0]} of {ev.total_blocks} held-out blocks, from block {args.first_block}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="rerank_quality.") as tmp:
        for name in [a for a in args.adapters.split(",") if a]:
            if name == "r64":
                from tools.experiments.rerank_fixture import ensure_fixture

                path, label = ensure_fixture(), "r64-all-linear"
            elif name == "example":
                path, label = example_path(), "bundled-r8-qkvo"
            elif Path(name).is_dir():
                path, label = Path(name), Path(name).name
            else:
                raise SystemExit(f"unknown adapter {name!r} (r64, example or a PEFT folder)")
            kinds = tuple(k for k in args.kinds.split(",") if k)
            weightings = tuple(w for w in args.weightings.split(",") if w)
            results.append(
                run_adapter(ev, label, path, ranks, kranks, Path(tmp), not args.no_kohya, args.min_rank, kinds, weightings)
            )
    doc = {"blocks": int(ev.blocks.shape[0]), "first_block": args.first_block, "heldout_blocks": ev.total_blocks,
           "threads": args.threads,
           "command": "python -m tools.experiments.rerank_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
           "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(results, doc["blocks"], ev.total_blocks)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
