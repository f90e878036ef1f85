"""Bank fit time and peak memory against the number of adapters N, on SYNTHETIC adapters of 4096-dim shapes.

The adapters are synthetic (stated as such in every output): each is an r=16 LoRA on one 4096×4096
module whose B·A mixes a 48-dim subspace shared by the whole collection (12 directions) with its own
random directions (4), with singular values 0.8^k (k < 16) dealt to its directions in a random order. They are generated
from their seed when a pass loads them, so the fit streams them exactly as it streams files.

    OMP_NUM_THREADS=1 nice -n 10 python -m tools.bench.bench_bank_scale --n 100 300 1000 --json /tmp/scale.json

Each N runs in its own process (peak RSS is per process); fit iterations are fixed (tol 0) so time
per adapter-pass is comparable across N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from functools import lru_cache

import numpy as np

from adapterpack.factors import Factors
from adapterpack.linalg.bank_fit import FitOptions, ModuleShape, fit_bank

DIM = 4096
RANK = 16
SHARED_DIM = 48
SHARED_COLS = 12


@lru_cache(maxsize=1)
def _shared_space(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12345)
    return np.linalg.qr(rng.standard_normal((dim, SHARED_DIM)))[0], np.linalg.qr(rng.standard_normal((dim, SHARED_DIM)))[0]


class SyntheticSource:
    """SYNTHETIC adapter ``i``: shared-subspace part + per-task part, decaying spectrum (picklable)."""

    def __init__(self, i: int, dim: int = DIM) -> None:
        self.name = f"synthetic{i:04d}"
        self.i = i
        self.dim = dim

    def load(self) -> dict[str, Factors]:
        us, vs = _shared_space(self.dim)
        rng = np.random.default_rng(self.i)
        own = RANK - SHARED_COLS
        b = np.hstack([us @ rng.standard_normal((SHARED_DIM, SHARED_COLS)), rng.standard_normal((self.dim, own))])
        a = np.vstack([rng.standard_normal((SHARED_COLS, SHARED_DIM)) @ vs.T, rng.standard_normal((own, self.dim))])
        b = np.linalg.qr(b)[0] * rng.permutation(0.8 ** np.arange(RANK))[None, :]  # task directions get real weight
        a = np.linalg.qr(a.T)[0].T
        return {"q_proj": Factors(a.astype(np.float32), b.astype(np.float32), 1.0, (self.dim, self.dim))}


def run_one(n: int, rank: int, iters: int, dim: int) -> dict[str, object]:
    """Fit N synthetic adapters in this process; time, tracemalloc peak, max RSS, errors."""
    srcs = [SyntheticSource(i, dim) for i in range(n)]
    tracemalloc.start()
    t0 = time.perf_counter()
    res = fit_bank([ModuleShape("q_proj", dim, dim)], srcs, rank=rank, opts=FitOptions(max_iter=iters, tol=0.0), dtype="float32")
    secs = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rep = res.report()
    passes = 1 + iters + 1  # sketch, iterations, final members pass
    return {"n": n, "dim": dim, "rank": rank, "iterations": iters, "seconds": secs, "seconds_per_adapter_pass": secs / (n * passes),
            "tracemalloc_peak_mb": peak / 1e6, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
            "rel_error_mean": rep["rel_error"]["mean"], "rel_error_max": rep["rel_error"]["max"],
            "data": "synthetic (shared 48-dim subspace + per-task directions, spectrum 0.8^k)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.rank, args.iters, args.dim)))
        return 0
    rows = []
    for n in args.n:
        cmd = [sys.executable, "-m", "tools.bench.bench_bank_scale", "--one", str(n), "--rank", str(args.rank),
               "--iters", str(args.iters), "--dim", str(args.dim)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(rows[-1]), flush=True)
    print("| N (synthetic) | fit s | ms per adapter-pass | tracemalloc peak MB | max RSS MB | mean rel err | max rel err |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['seconds']:.1f} | {1e3 * r['seconds_per_adapter_pass']:.2f} | {r['tracemalloc_peak_mb']:.1f} | "
              f"{r['max_rss_mb']:.0f} | {r['rel_error_mean']:.4f} | {r['rel_error_max']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
