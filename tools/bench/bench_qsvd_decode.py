"""qsvd decode: time and peak extra memory of ``to_factors`` (numpy) and the torch decoder (CPU).

Inputs: an existing qsvd ``.apack`` (``--file``, e.g. the bundled example compressed with
``python -m adapterpack compress adapterpack/examples/smollm2-pydoc-lora /tmp/q.apack --budget-ratio 0.125``)
and/or a synthetic record (``--synthetic N``: one [N, N] module, rank 8, random codes at widths
1–8 and float, group size 64). Reports the best of ``--repeat`` wall times per decoder and, for numpy,
tracemalloc's peak over the decoded factors' own bytes (torch allocations are invisible to tracemalloc).

    OMP_NUM_THREADS=1 nice -n 5 python -m tools.bench.bench_qsvd_decode --file /tmp/q.apack --synthetic 4096
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from adapterpack.adapter import Module

WIDTHS = [1, 2, 3, 4, 5, 6, 7, 8]


def synthetic(n: int, seed: int = 0) -> Module:
    """One [n, n] qsvd record of rank 9 (widths 1–8 and float) with random codes, scales and S."""
    from adapterpack.encodings import qsvd as q

    widths = [*WIDTHS, q.FLOAT]
    g = q.DEFAULT_GROUP_SIZE
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, q.stream_bytes(widths, n, n, g), dtype=np.uint8)
    for w, (s0, su, _sv, cu, _cv, end) in zip(widths, q.component_spans(widths, n, n, g), strict=True):
        data[s0:su] = np.frombuffer(np.float32(rng.uniform(0.5, 2.0)).tobytes(), np.uint8)
        scales = rng.uniform(1e-3, 1e-1, (cu - su) // 2).astype("<f2")
        data[su:cu] = np.frombuffer(scales.tobytes(), np.uint8)
        if w == q.FLOAT:
            data[cu:end] = np.frombuffer(rng.standard_normal((end - cu) // 2).astype("<f2").tobytes(), np.uint8)
    return Module("m", "qsvd", (n, n), {"rank": len(widths), "bits": widths, "group_size": g}, {"data": data})


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(label: str, modules: list[Module], repeat: int) -> None:
    """One line per decoder for ``modules``."""
    import torch

    from adapterpack.torch.decoders import decode

    for m in modules:
        m.array("data")  # decode the blob once, outside the timings
    sizes = [m.factors().A.nbytes + m.factors().B.nbytes for m in modules]
    factor_bytes, largest = sum(sizes), max(sizes)
    t_np = best(lambda: [m.factors() for m in modules], repeat)
    tracemalloc.start()
    for m in modules:
        f = m.factors()
        del f
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t_torch = best(lambda: [decode(m, torch.device("cpu"), None) for m in modules], repeat)
    print(
        f"{label}: {len(modules)} modules, factors {factor_bytes / 2**20:.2f} MiB | numpy {t_np * 1e3:.1f} ms, "
        f"peak {peak / 2**20:.2f} MiB, {(peak - largest) / 2**20:.2f} MiB over the largest module's factors | "
        f"torch cpu {t_torch * 1e3:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", help="a qsvd .apack")
    ap.add_argument("--synthetic", type=int, default=0, help="side N of a synthetic [N, N] record (0: none)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import adapterpack

    if args.file:
        with adapterpack.open(args.file) as ad:
            mods = [m for m in ad.modules.values() if m.encoding == "qsvd"]
            measure(args.file, mods, args.repeat)
    if args.synthetic:
        measure(f"synthetic [{args.synthetic}, {args.synthetic}] rank 9", [synthetic(args.synthetic)], args.repeat)


if __name__ == "__main__":
    main()
