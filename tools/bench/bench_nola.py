"""NOLA benchmarks: basis generator throughput, and decoding a 7B-shaped NOLA adapter to factors.

1. Generator: values/s of the spec's Philox4x32-10 basis generator in numpy and in torch (CPU),
   against numpy's own C ``np.random.Philox`` (4x64 variant, ``random_raw``: one uint64 per value,
   i.e. two 32-bit words) measured in the same run, interleaved; median of the repeats.
2. Decode: a 7B-shaped adapter (q_proj and v_proj of 32 layers, 4096×4096, rank 16, k = 1024
   per factor) from its records to ΔW factors on the CPU, numpy and torch decoders, with each
   module's own stream (64 × 2 distinct bases, each generated once) and with one shared basis
   (seed and stream equal: generated once, one product for all 64 modules).

    python -m tools.bench.bench_nola --json /tmp/bench_nola.json
    python -m tools.bench.bench_nola --unshared-layers 2    # without sharing, time 4 modules and extrapolate (linear)

Threads: numpy/BLAS and torch use what ``OMP_NUM_THREADS`` allows (set it for comparable runs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adapterpack.adapter import Module
from adapterpack.encodings.nola import decode_many as numpy_decode
from adapterpack.rng import basis
from adapterpack.torch import rng as torch_rng
from adapterpack.torch.decoders.nola import decode_many as torch_decode

from . import common


def generator_rows(n: int, repeats: int) -> tuple[list[list[Any]], dict[str, Any]]:
    """Values/s of numpy's Philox raw output, our numpy and our torch-CPU basis generator."""
    raw = np.random.Philox(0)
    fns = {
        "np.random.Philox.random_raw (C, 4x64)": lambda: raw.random_raw(n),
        "adapterpack.rng.basis (numpy)": lambda: basis(1, 0, 0, 0, 1, n),
        "adapterpack.torch.rng.basis (torch CPU)": lambda: torch_rng.basis(1, 0, 0, 0, 1, n),
    }
    times = common.interleaved(fns, repeats)
    base = n / common.median(times["np.random.Philox.random_raw (C, 4x64)"])
    rows, out = [], {}
    for name, ts in times.items():
        rate = n / common.median(ts)
        rows.append([name, f"{rate / 1e6:.1f}", f"{rate / base:.2f}×", f"{rate / (2 * base):.2f}×"])
        out[name] = {"values_per_s": rate, "vs_raw_uint64": rate / base, "vs_raw_32bit_words": rate / (2 * base)}
    return rows, out


def seven_b(layers: int, shared: bool, rank: int = 16, k: int = 1024, dim: int = 4096) -> list[Module]:
    """q/v nola records of a 7B-shaped model; coefficients from a fixed seed."""
    rng = np.random.default_rng(0)
    mods = []
    for i in range(layers):
        for j, t in enumerate(("q_proj", "v_proj")):
            p = {"generator": "philox4x32-10", "generator_version": 1, "seed": 42, "stream": 0 if shared else 2 * i + j}
            p |= {"rank": rank, "k_A": k, "k_B": k, "scale": 2.0}
            coef = {"alpha": rng.standard_normal(k).astype(np.float32), "beta": rng.standard_normal(k).astype(np.float32)}
            mods.append(Module(f"model.layers.{i}.self_attn.{t}", "nola", (dim, dim), p, coef))
    return mods


def decode_rows(layers: int, unshared_layers: int, repeats: int, threads: int) -> tuple[list[list[Any]], dict[str, Any]]:
    """Seconds to decode every module to factors, per decoder and basis sharing.

    Without sharing, each module's bases are separate work, so the time is linear in the number
    of modules: ``unshared_layers`` (< ``layers``) measures a subset and the table also gives the
    linear extrapolation to ``layers``, marked as such.
    """
    torch.set_num_threads(threads)
    rows, out = [], {}
    for shared in (True, False):
        n_layers = layers if shared else unshared_layers
        mods = seven_b(n_layers, shared)
        generated = (1 if shared else len(mods)) * 2 * 1024 * 16 * 4096
        for name, fn in (("numpy", lambda m=mods: numpy_decode(m)), ("torch CPU", lambda m=mods: torch_decode(m, "cpu"))):
            ts = []
            for _ in range(repeats if shared else 1):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            sec = common.median(ts)
            label = "one shared basis" if shared else "own stream per module"
            full = sec * layers / n_layers
            shown = f"{full:.1f}" if n_layers == layers else f"{full:.1f} (extrapolated from {len(mods)} modules: {sec:.1f} s)"
            rows.append([label, name, 2 * layers, f"{generated / sec / 1e6:.1f}", shown])
            out[f"{label} / {name}"] = {
                "modules_measured": len(mods),
                "values_generated": generated,
                "seconds_measured": sec,
                "seconds_for_all_layers": full,
                "extrapolated": n_layers != layers,
                "repeats": len(ts),
            }
    return rows, out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1 << 22, help="values per generator call (default 4 Mi)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--unshared-layers", type=int, default=32, help="layers measured without sharing (fewer: extrapolated)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-generator", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"args": vars(args)}
    if not args.skip_generator:
        rows, result["generator"] = generator_rows(args.n, args.repeats)
        print(f"Generator throughput, {args.n} values per call, median of {args.repeats}:\n")
        print(common.markdown_table(["generator", "M values/s", "vs raw uint64/s", "vs raw 32-bit words/s"], rows))
    if not args.skip_decode:
        unshared = min(args.layers, args.unshared_layers)
        rows, result["decode"] = decode_rows(args.layers, unshared, max(1, args.repeats // 2), args.threads)
        print(f"\nDecode of a 7B-shaped NOLA adapter ({args.layers} layers × q,v, 4096², r=16, k=1024) to factors, CPU:\n")
        headers = ["bases", "decoder", "modules", "M basis values generated/s", f"seconds for {2 * args.layers} modules"]
        print(common.markdown_table(headers, rows, "llrrr"))
    result["machine"] = common.machine()
    print("\n" + common.machine_line(result["machine"]))
    if args.json:
        common.write_json(args.json, result)


if __name__ == "__main__":
    main()
