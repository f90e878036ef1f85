"""Checksum throughput: CRC-32C (the spec's, via the ``crc32c`` package) vs zlib's CRC-32 vs a memcpy.

Why the project depends on ``crc32c``: at memory speed, verifying every blob on every read
costs about what touching the bytes costs.

    python -m tools.bench.bench_checksum            # 64 MiB buffer, best of 9
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from adapterpack.checksum import crc32c

from . import common


def best_gb_s(fn: Callable[[], object], nbytes: int, repeats: int) -> float:
    """GB/s (10^9 bytes) of the fastest of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64, help="buffer size in MiB (default 64)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    buf = np.random.default_rng(0).integers(0, 256, args.mib << 20, dtype=np.uint8)
    view = memoryview(buf)
    rows = [
        ["CRC-32C (crc32c package)", best_gb_s(lambda: crc32c(view), buf.nbytes, args.repeats)],
        ["CRC-32 (zlib)", best_gb_s(lambda: zlib.crc32(view), buf.nbytes, args.repeats)],
        ["memcpy (numpy copy)", best_gb_s(buf.copy, buf.nbytes, args.repeats)],
    ]
    print(f"Machine: {common.machine_line(common.machine())}. {args.mib} MiB, best of {args.repeats}.\n")
    print(common.markdown_table(["what", "GB/s"], [[n, f"{v:.2f}"] for n, v in rows], "lr"))


if __name__ == "__main__":
    main()
