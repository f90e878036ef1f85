"""Candidate float codecs on a real adapter: which entropy coder and which transform the ``pco`` codec uses.

Payload bytes (sum over tensors, each coded on its own, no container) of, per dtype (fp32/fp16/bf16):

- ``H0 planes`` / ``H0 rotated planes``: order-0 entropy of each byte plane per tensor, without and
  with the sign bit rotated to the bottom (a bound for any per-tensor byte-plane coder, tables free);
- ``H(exp)``, ``H(exp | line)``, ``H(exp - median(line))``: entropy of the top byte of the rotated
  value (the exponent) per tensor, conditioned on its row of A (r×in) / column of B (out×r) (a bound:
  one free table per line), or with the line's median exponent subtracted — what per-row/column
  exponent statistics could save at most;
- ``zstd planes L1``/``L19``: each rotated plane its own zstd frame (today's ``byteplanes`` + rotation);
- ``pcodec standalone``: ``simple_compress`` on the values (bf16 as uint16) and on rotated integers;
- ``pco Ln``: adapterpack's ``pco`` codec (rotated integers, Pco wrapped format) at level n;
- ``pco L8, metadata shared per (module kind, slot)``: NOT a codec yet — one Pco chunk metadata for all
  layers' tensors of the same kind and slot (e.g. every ``q_proj`` A), each tensor one page of it, so a
  tensor still decodes alone given that small shared part (what a format change could save per blob).

    python -m tools.experiments.float_codec_candidates                   # the bundled example
    python -m tools.experiments.float_codec_candidates --adapter ~/.cache/adapterpack/rerank-r64
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pcodec
import zstandard

import adapterpack
from adapterpack.codecs.pco import Pco, rotate
from tools.bench import common

UINT = {2: np.uint16, 4: np.uint32}


def entropy_bytes(x: np.ndarray) -> float:
    """Order-0 entropy of ``x``'s values, in bytes for all of them."""
    _, c = np.unique(x, return_counts=True)
    return float(-(c * np.log2(c / c.sum())).sum() / 8)


def measure(arrs: list[tuple[str, np.ndarray]]) -> dict[str, float]:
    tot: dict[str, float] = {}

    def add(k: str, v: float) -> None:
        tot[k] = tot.get(k, 0.0) + v

    for name, a in arrs:
        k = a.itemsize
        bits = 8 * k
        x = np.ascontiguousarray(a).view(UINT[k])
        r = rotate(x)
        planes = np.ascontiguousarray(x.reshape(-1)).view(np.uint8).reshape(-1, k)
        rplanes = np.ascontiguousarray(r.reshape(-1)).view(np.uint8).reshape(-1, k)
        add("H0 planes", sum(entropy_bytes(planes[:, j]) for j in range(k)))
        add("H0 rotated planes", sum(entropy_bytes(rplanes[:, j]) for j in range(k)))
        hi = (r >> (bits - 8)).astype(np.int64).reshape(a.shape)
        add("H(exp)", entropy_bytes(hi))
        axis = 1 if name.endswith(".A") else 0  # A (r×in): per row; B (out×r) and others: per column
        lines = hi if axis == 1 else hi.T
        add("H(exp | line)", sum(entropy_bytes(line) for line in lines))
        med = np.median(hi, axis=axis, keepdims=True).astype(np.int64)
        add("H(exp - median(line)) + 1 B/line", entropy_bytes((hi - med) % 256) + med.size)
        for lvl in (1, 19):
            c = zstandard.ZstdCompressor(level=lvl, write_content_size=True)
            add(f"zstd planes L{lvl}", sum(min(len(c.compress(rplanes[:, j].tobytes())), len(rplanes)) for j in range(k)))
        vals = x.reshape(-1) if a.dtype.name == "bfloat16" else np.ascontiguousarray(a).reshape(-1)
        add("pcodec standalone", len(pcodec.standalone.simple_compress(vals, pcodec.ChunkConfig())))
        add("pcodec standalone, rotated", len(pcodec.standalone.simple_compress(r.reshape(-1), pcodec.ChunkConfig())))
        for lvl in (4, 8, 12):
            add(f"pco L{lvl}", len(Pco(lvl).encode(memoryview(np.ascontiguousarray(a).tobytes()), k)))
    return tot


def shared_metadata(arrs: list[tuple[str, np.ndarray]], level: int = 8) -> int:
    """Bytes with one Pco header + chunk metadata per (module kind, slot) group and one page per tensor."""
    groups: dict[str, list[np.ndarray]] = {}
    for name, a in arrs:
        groups.setdefault(re.sub(r"layers\.\d+\.", "", name), []).append(a)
    total = 0
    for members in groups.values():
        rs = [rotate(np.ascontiguousarray(a).reshape(-1).view(UINT[a.itemsize])) for a in members]
        cfg = pcodec.ChunkConfig(
            compression_level=level,
            delta_spec=pcodec.DeltaSpec.no_op(),
            mode_spec=pcodec.ModeSpec.classic(),
            paging_spec=pcodec.PagingSpec.exact_page_sizes([len(r) for r in rs]),
        )
        fc = pcodec.wrapped.FileCompressor()
        cc = fc.chunk_compressor(np.concatenate(rs), cfg)
        total += len(fc.write_header()) + len(cc.write_meta()) + sum(len(cc.write_page(i)) for i in range(len(rs)))
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", type=Path, default=None, help="a PEFT folder (default: the bundled example)")
    args = ap.parse_args(argv)
    src = args.adapter or common.example_dir()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dt in ("fp32", "fp16", "bf16"):
            ad = adapterpack.open(common.cast_peft(src, Path(tmp) / dt, dt))
            arrs = [(f"{m.name}.{slot}", m.array(slot)) for m in ad for slot in m.tensors]
            rows[dt] = measure(arrs)
            rows[dt]["pco L8, metadata shared per (module kind, slot)"] = shared_metadata(arrs)
    keys = list(rows["bf16"])
    table = [[k, *(f"{rows[d][k]:,.0f}" for d in rows)] for k in keys]
    print(common.markdown_table(["candidate", "fp32", "fp16", "bf16"], table, "lrrr"))


if __name__ == "__main__":
    main()
