"""Rate-distortion of LoRA → NOLA fits on a real trained adapter, against SVD truncation at equal numbers.

For a few modules of the bundled SmolLM2 adapter (r = 8, q/k/v/o), fit NOLA records with k
coefficients per factor (``adapterpack.encodings.nola_fit``) and report the relative Frobenius error
of the stored record, next to the error of the best LoRA with at most as many stored numbers
(rank ``j = floor(2k / (in + out))`` by SVD truncation; Eckart–Young: no rank-j LoRA does better).

    nice -n 10 python -m tools.experiments.nola_fit_curve --json /tmp/nola_fit_curve.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import adapterpack
from adapterpack.encodings.nola_fit import fit_nola
from adapterpack.linalg.lowrank import spectrum_of
from tools.bench.common import example_dir, markdown_table

MODULES = ("model.layers.15.self_attn.q_proj", "model.layers.15.self_attn.v_proj")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="16,64,256,1024,2048")
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.ks.split(",")]
    rows, out = [], []
    with adapterpack.open(example_dir()) as ad:
        for name in args.modules.split(","):
            f = ad.module(name).factors()
            spec = spectrum_of(f)
            n_in, n_out = f.A.shape[1], f.B.shape[0]
            lora_params = f.rank * (n_in + n_out)
            for k in ks:
                t0 = time.perf_counter()
                fit = fit_nola(f, k_A=k, k_B=k, iterations=args.iterations, seed=0)
                sec = time.perf_counter() - t0
                j = min(f.rank, (2 * k) // (n_in + n_out))
                svd_err = spec.rel_error(j)
                entry = {
                    "module": name,
                    "k": k,
                    "nola_params": 2 * k,
                    "nola_rel_error": fit.error,
                    "iterations": fit.iterations,
                    "equal_numbers_svd_rank": j,
                    "svd_rel_error": svd_err,
                    "lora_r8_params": lora_params,
                    "seconds": sec,
                }
                out.append(entry)
                rows.append([name.split("layers.")[1], k, 2 * k, f"{fit.error:.4f}", j, f"{svd_err:.4f}", f"{sec:.1f}"])
                print(json.dumps(entry), flush=True)
    headers = ["module", "k per factor", "NOLA numbers", "NOLA rel. error", "SVD rank ≤ same numbers", "SVD rel. error", "fit s"]
    print(markdown_table(headers, rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
