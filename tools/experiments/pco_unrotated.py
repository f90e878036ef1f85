"""Pco on 16-bit floats with and without the sign rotation: payload bytes, and Pco's own decode speed (thread CPU).

The ``pco`` codec rotates the sign bit to the bottom before Pco codes the integers, and undoes it after decoding
(``unrotate_inplace``: three numpy passes, part of why 16-bit decode stays below 1 GB/s per core). This measures the
way out: Pco on the raw bit patterns, which needs no un-rotation. Run from the repository root::

    python -m tools.experiments.pco_unrotated               # 4 layers of the 7B-shaped adapter + the bundled one
"""

from __future__ import annotations

import time

import numpy as np
import pcodec

import adapterpack
from adapterpack import dtypes
from adapterpack.codecs import pco as P
from tools.bench import common, synthetic


def _parts(u: np.ndarray) -> list[bytes]:
    """Pco's wrapped header, chunk metadata and one page for the u16 numbers ``u`` (the codec's settings)."""
    fc = pcodec.wrapped.FileCompressor()
    cfg = pcodec.ChunkConfig(compression_level=P.DEFAULT_LEVEL, mode_spec=pcodec.ModeSpec.classic(),
                             delta_spec=pcodec.DeltaSpec.no_op(), paging_spec=pcodec.PagingSpec.exact_page_sizes([len(u)]))
    cc = fc.chunk_compressor(u, cfg)
    return [fc.write_header(), cc.write_meta(), cc.write_page(0)]


def _decode_mb_s(parts: list[list[bytes]], sizes: list[int], repeats: int = 7) -> float:
    """Median thread-CPU MB/s of Pco alone decoding every page (no un-rotation either way)."""
    outs = [np.empty(n, np.uint16) for n in sizes]
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        for (head, meta, page), out in zip(parts, outs):
            fd, _ = pcodec.wrapped.FileDecompressor.new(head)
            cd, _ = fd.chunk_decompressor(meta, "u16")
            cd.read_page_into(page, len(out), out)
        times.append(time.thread_time() - t)
    return sum(2 * n for n in sizes) / common.MB / common.median(times)


def main() -> None:
    ad = synthetic.build_adapter("bf16", layers=4)
    cases = {"7B-shaped, 4 layers, bf16": [np.asarray(t) for m in ad.modules.values() for t in m.tensors.values()]}
    with adapterpack.open(common.example_dir()) as ex:
        f32 = [np.asarray(m.array(s), np.float32) for m in ex for s in m.tensors]
    cases["bundled r=8, bf16"] = [dtypes.cast_array(a, "bf16")[0] for a in f32]
    cases["bundled r=8, fp16"] = [dtypes.cast_array(a, "fp16")[0] for a in f32]
    print("| input | rotated payload B | unrotated payload B | unrotated / rotated | Pco decode MB/s rotated | unrotated |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, arrs in cases.items():
        us = [np.frombuffer(dtypes.as_bytes(a), np.uint16) for a in arrs]
        rot = [_parts(P.rotate(u)) for u in us]
        plain = [_parts(u.copy()) for u in us]
        size_r, size_p = (sum(len(b) for p in ps for b in p) for ps in (rot, plain))
        sizes = [len(u) for u in us]
        print(f"| {name} | {size_r:,} | {size_p:,} | {size_p / size_r:.4f} | {_decode_mb_s(rot, sizes):,.0f} | "
              f"{_decode_mb_s(plain, sizes):,.0f} |")


if __name__ == "__main__":
    main()
