"""A real bank: 12 q/v r=8 LoRAs of SmolLM2-135M (tools/fixtures/train_bank.py) banked jointly.

Reports, per bank configuration (form, R):
- bytes per adapter: the bank file's size / N, against one PEFT adapter_model.safetensors;
- relative squared error ‖ΔW − UΣVᵀ‖²/‖ΔW‖² (mean and max over adapters × 60 modules), against
  per-adapter truncated SVD with the same bytes per adapter (rank k per module with (m+n+1)·k·4
  bytes at most equal to the bank's per-adapter share; error exact from the singular values);
- held-out quality of reconstructed adapters against the originals on pydoc held-out blocks:
  perplexity and KL(original ‖ reconstructed), for a few adapters (each pass is ~15–20 s).

    OMP_NUM_THREADS=1 nice -n 10 python -m tools.experiments.bank_smollm2 --json /tmp/bank_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapterpack.bank import build_bank
from adapterpack.bank.store import read_bank
from adapterpack.linalg.bank_grow import _lowrank_svd
from tools.fixtures import smollm2
from tools.fixtures.train_bank import adapter_dirs

CONFIGS = [("full", 8), ("full", 16), ("full", 32), ("full", 64), ("diagonal", 32)]


def _factors(d: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    import adapterpack

    with adapterpack.open(d) as a:
        return {m.name: (np.array(m.factors().A, np.float64), np.array(m.factors().B, np.float64), m.factors().scale) for m in a}


def svd_error_at_bytes(f: tuple[np.ndarray, np.ndarray, float], budget: float) -> tuple[int, float]:
    """Per-adapter SVD truncated to the rank whose fp32 bytes (m+n+1)·k·4 fit ``budget``: (k, rel squared error)."""
    a, b, s = f
    m, n = b.shape[0], a.shape[1]
    k = int(budget // ((m + n + 1) * 4))
    sv = _lowrank_svd(b, a, s)[1]
    total = float(np.sum(sv**2))
    k = min(k, sv.size)
    return k, float(np.sum(sv[k:] ** 2) / total) if total > 0 else 0.0


@torch.no_grad()
def _set_deltas(model: torch.nn.Module, base: dict[str, torch.Tensor], deltas: dict[str, np.ndarray] | None) -> None:
    params = dict(model.named_parameters())
    for name, w in base.items():
        d = None if deltas is None else deltas.get(name)
        params[name + ".weight"].copy_(w if d is None else w + torch.from_numpy(d.astype(np.float32)))


@torch.no_grad()
def evaluate(variants: dict[str, dict[str, np.ndarray] | None], reference: str, blocks: torch.Tensor, batch: int = 8) -> dict:
    """Perplexity of each variant (ΔW per module merged into W₀; None = base model) and KL(reference ‖ variant)."""
    model = smollm2.load_model()
    names = {m for v in variants.values() if v for m in v}
    base = {n: dict(model.named_parameters())[n + ".weight"].detach().clone() for n in names}
    nll = dict.fromkeys(variants, 0.0)
    kl = dict.fromkeys(variants, 0.0)
    top1 = dict.fromkeys(variants, 0)
    count = 0
    for i in range(0, blocks.shape[0], batch):
        ids = blocks[i : i + batch]
        tgt = ids[:, 1:].reshape(-1)
        logp = {}
        for key in [reference] + [k for k in variants if k != reference]:
            _set_deltas(model, base, variants[key])
            lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1).reshape(-1, model.config.vocab_size)
            nll[key] += float(-lp.gather(1, tgt[:, None]).sum())
            if key == reference:
                logp[key] = lp
            else:
                ref = logp[reference]
                kl[key] += float((ref.exp() * (ref - lp)).sum())
                top1[key] += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        count += tgt.numel()
    return {k: {"ppl": math.exp(nll[k] / count), "kl": kl[k] / count, "top1_agree": top1[k] / count if k != reference else 1.0}
            for k in variants}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--eval-adapters", type=int, nargs="*", default=[0, 7], help="adapters whose quality is evaluated")
    ap.add_argument("--eval-configs", nargs="*", default=["full:16", "full:32", "diagonal:32"])
    ap.add_argument("--blocks", type=int, default=32, help="held-out blocks per evaluation pass (of 61)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dirs = adapter_dirs(args.n)
    facs = [_factors(d) for d in dirs]
    peft_bytes = (dirs[0] / "adapter_model.safetensors").stat().st_size
    tmp = Path(tempfile.mkdtemp(prefix="bank_smollm2."))
    out: dict = {"n": args.n, "peft_bytes_per_adapter": peft_bytes, "configs": {}}
    recon: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for form, rank in CONFIGS:
        key = f"{form}:{rank}"
        path = tmp / f"{form}{rank}.apack"
        t0 = time.perf_counter()
        rep = build_bank(path, dirs, rank=rank, form=form, codec="raw")
        secs = time.perf_counter() - t0
        bank = read_bank(path)
        per_adapter = path.stat().st_size / args.n
        rel = []
        svd_rel, svd_k = [], []
        for i, mem in enumerate(bank.members):
            for name, S in mem.S.items():
                mod = bank.modules[name]
                share = (mod.U.nbytes + mod.V.nbytes) / args.n + S.nbytes  # this module's bytes per adapter
                k, e = svd_error_at_bytes(facs[i][name], share)
                svd_rel.append(e)
                svd_k.append(k)
        rel = [v for m in bank.members for v in [json.loads(m.metadata["bank.rel_error"])["mean"]]]
        out["configs"][key] = {
            "fit_seconds": secs, "iterations": rep.fit["iterations"], "converged": sum(rep.fit["converged"].values()),
            "bank_file_bytes": path.stat().st_size, "bytes_per_adapter": per_adapter,
            "vs_peft": peft_bytes / per_adapter,
            "rel_error_mean": rep.fit["rel_error"]["mean"], "rel_error_max": rep.fit["rel_error"]["max"],
            "rel_error_p90": rep.fit["rel_error"]["quantiles"]["0.9"],
            "member_means": rel,
            "svd_equal_bytes_rank_mean": float(np.mean(svd_k)), "svd_equal_bytes_rel_error_mean": float(np.mean(svd_rel)),
            "svd_equal_bytes_rel_error_max": float(np.max(svd_rel)),
        }
        brief = {k: v for k, v in out["configs"][key].items() if k not in ("member_means", "iterations")}
        print(json.dumps({key: brief}), flush=True)
        if key in args.eval_configs:
            recon[key] = {}
            import adapterpack

            for i in args.eval_adapters:
                with adapterpack.open(path, adapter=bank.members[i].name) as a:
                    recon[key][i] = {m.name: m.delta() for m in a}
    blocks = smollm2.pydoc_blocks("heldout")[: args.blocks]
    out["quality"] = {}
    for i in args.eval_adapters:
        variants: dict[str, dict[str, np.ndarray] | None] = {"base model": None}
        variants["original"] = {n: (f[2] * f[1] @ f[0]) for n, f in facs[i].items()}
        for key, per in recon.items():
            variants[f"bank {key}"] = per[i]
        t0 = time.perf_counter()
        q = evaluate(variants, "original", blocks)
        out["quality"][dirs[i].name] = q | {"seconds": time.perf_counter() - t0}
        print(json.dumps({dirs[i].name: q}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
