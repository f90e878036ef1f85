"""Throughput of a bank's batched apply (each row its own adapter) against one LoRA for the whole batch.

One linear layer ``y = x·W₀ᵀ + ΔW_{a(b)}·x_b`` of 4096×4096 (the base GEMM included: that is what a
serving step pays), a batch of ``--batch`` sequences × ``--tokens`` tokens. Compared in one run,
interleaved:

- ``base``: x·W₀ᵀ alone (no adapter);
- ``lora r=16, 1 adapter``: one LoRA for every row, x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ (the baseline);
- ``lora r=16, K distinct (gathered bmm)``: the usual multi-LoRA apply, each row its own A, B;
- ``bank R, K distinct``: :class:`adapterpack.torch.bank.TorchBank` with K = 1, 8, 64 adapters in the batch.

Bank values are random (speed does not depend on them); the bank file goes through the real writer
and loader. Example::

    OMP_NUM_THREADS=1 nice -n 10 python -m tools.bench.bench_bank_apply --threads 1 --json /tmp/apply.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from adapterpack.bank.store import Bank, BankMember, BankModule, write_bank
from adapterpack.torch.bank import TorchBank
from tools.bench.common import interleaved, machine, machine_line, markdown_table, median


def _bank_file(path: Path, dim: int, rank: int, n: int) -> Path:
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((dim, rank)))[0].astype(np.float32)
    v = np.linalg.qr(rng.standard_normal((dim, rank)))[0].astype(np.float32)
    mod = BankModule("layer", u, v, "full")
    members = [BankMember(f"a{i}", {"layer": rng.standard_normal((rank, rank)).astype(np.float32)}) for i in range(n)]
    write_bank(path, Bank({"layer": mod}, members), codec="raw")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64, help="sequences per batch (rows)")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per sequence")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--bank-rank", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--delta-only", action="store_true", help="skip the full-layer timings (the base GEMM dominates on CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    d, b, t, r = args.dim, args.batch, args.tokens, args.lora_rank
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, d, generator=gen).to(dev)
    w0 = (torch.randn(d, d, generator=gen) * 0.02).to(dev)
    lora_a = (torch.randn(64, r, d, generator=gen) * 0.02).to(dev)
    lora_b = (torch.randn(64, d, r, generator=gen) * 0.02).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            y = fn()
            sync()
            return y
        return run

    def lora_one() -> torch.Tensor:
        return torch.nn.functional.linear(x, w0) + 2.0 * ((x @ lora_a[0].T) @ lora_b[0].T)

    def lora_gathered(k: int):
        rows = torch.arange(b, device=dev) % k

        def run() -> torch.Tensor:
            h = torch.bmm(x, lora_a[rows].transpose(1, 2))
            return torch.nn.functional.linear(x, w0) + 2.0 * torch.bmm(h, lora_b[rows].transpose(1, 2))
        return run

    fns: dict = {}
    if not args.delta_only:
        fns = {"base (no adapter)": timed(lambda: torch.nn.functional.linear(x, w0)), f"lora r={r}, 1 adapter": timed(lora_one)}
    for k in () if args.delta_only else (8, 64):
        fns[f"lora r={r}, {k} distinct (gathered bmm)"] = timed(lora_gathered(k))
    tmp = Path(tempfile.mkdtemp(prefix="bench_bank_apply."))
    banks = []
    for rank in args.bank_rank:
        tb = TorchBank(_bank_file(tmp / f"bank{rank}.apack", d, rank, 64), device=dev)
        tb.use(tb.names)
        banks.append(tb)
        for k in () if args.delta_only else (1, 8, 64):
            rows = (torch.arange(b) % k).to(dev)
            fns[f"bank R={rank}, {k} distinct"] = timed(lambda tb=tb, rows=rows: tb.apply("layer", x, w0, rows))
    # the adapter part alone (no base GEMM): what the bank changes
    deltas = {f"delta: lora r={r}, 1 adapter": timed(lambda: 2.0 * ((x @ lora_a[0].T) @ lora_b[0].T))}
    for k in (8, 64):
        rows_k = torch.arange(b, device=dev) % k
        deltas[f"delta: lora r={r}, {k} distinct (gathered bmm)"] = timed(
            lambda rows_k=rows_k: 2.0 * torch.bmm(torch.bmm(x, lora_a[rows_k].transpose(1, 2)), lora_b[rows_k].transpose(1, 2)))
    for tb in banks:
        rank = tb.U["layer"].shape[1]
        for k in (1, 8, 64):
            rows_k = (torch.arange(b) % k).to(dev)
            deltas[f"delta: bank R={rank}, {k} distinct"] = timed(lambda tb=tb, rows_k=rows_k: tb.delta("layer", x, rows_k))
    result = {"machine": None, "args": vars(args), "results": {}}
    tokens = b * t
    groups = [("adapter part only", deltas, f"delta: lora r={r}, 1 adapter")]
    if not args.delta_only:
        groups.insert(0, ("layer (base GEMM + adapter)", fns, f"lora r={r}, 1 adapter"))
    for title, group, ref in groups:
        times = interleaved(group, args.repeats, warmup=2)
        base_t = median(times[ref])
        rows_out = []
        for name, ts in times.items():
            med = median(ts)
            result["results"][name] = {"median_s": med, "tokens_per_s": tokens / med, "vs_one_lora": base_t / med}
            rows_out.append((name, f"{1e3 * med:.2f}", f"{tokens / med:,.0f}", f"{base_t / med:.2f}"))
        print(markdown_table((f"{title}, {d}x{d}, {b}x{t} tokens", "median ms", "tokens/s", "throughput vs 1 LoRA"), rows_out))
        print()
    result["machine"] = machine()
    print(machine_line(result["machine"]))
    for tb in banks:
        tb.close()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
