"""Relative ΔW error of `compress` against rank-only `rerank` (fp32, bf16) at the same whole-file bytes.

    python -m tools.experiments.compress_error [SRC] [--ratios 0.25,0.125,0.0625]

Budgets are fractions of the adapter's fp16 factor bytes; every file is the whole .apack (raw codec), index and
padding included. The error is the exact ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all modules stacked (no model needed: KL and
perplexity come from tools/experiments/compress_peers.py).
"""

from __future__ import annotations

import argparse
import time

import adapterpack
from adapterpack.errors import ConversionError
from adapterpack.examples import example_path
from adapterpack.ops.budget import apack_file_size
from adapterpack.ops.compress import compress, fp16_factor_bytes
from adapterpack.ops.rerank import RerankPolicy, rerank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=str(example_path()))
    ap.add_argument("--ratios", default="0.25,0.125,0.0625")
    args = ap.parse_args()
    ad = adapterpack.open(args.src)
    cache: dict = {}  # component tables computed once for every budget
    fp16 = fp16_factor_bytes(ad)
    print(f"{args.src}: {len(ad.modules)} modules, fp16 factors {fp16:,} B")
    print(f"{'budget':>10} {'method':<16} {'file B':>9} {'rel. error':>10} {'seconds':>8}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        budget = int(fp16 * ratio)
        for dtype in ("float32", "bf16"):
            t = time.perf_counter()
            try:
                _, rep = rerank(ad, RerankPolicy(budget=budget, dtype=dtype), file_size=lambda a: apack_file_size([a], "raw"))
                row = f"{rep.file_bytes:>9,} {rep.total['rel_error']:>10.4f}"
            except ConversionError:
                row = f"{'-':>9} {'(rank 1 everywhere does not fit)':>10}"
            print(f"{budget:>10,} {'rerank ' + dtype:<16} {row} {time.perf_counter() - t:>8.1f}")
        t = time.perf_counter()
        _, rep = compress(ad, budget, cache=cache)
        mean = rep.total["mean_bits"]
        print(
            f"{budget:>10,} {'compress':<16} {rep.file_bytes:>9,} {rep.total['rel_error']:>10.4f} {time.perf_counter() - t:>8.1f}"
            f"   (records {rep.total['record_bytes']:,} B, mean {mean:.2f} bits per kept component)"
        )


if __name__ == "__main__":
    main()
