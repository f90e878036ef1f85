"""Whole default ``.apack`` bytes of the bundled adapter truncated by its exact SVD to ranks 1, 2 and 4, in fp32, fp16, bf16.

The small-adapter rows of ``tools.bench.bench_codecs --sizes-only`` (where the index weighs most), as bare file sizes,
using only APIs older trees have too, so one script compares two writers (BENCHMARKS.md, "Why 1.5")::

    python -m tools.experiments.small_adapter_sizes                     # this tree
    mkdir /tmp/old && git archive 53c3bd9 | tar -x -C /tmp/old          # format 1.4's writer
    PYTHONPATH=/tmp/old python tools/experiments/small_adapter_sizes.py
    python -m tools.experiments.small_adapter_sizes --breakdown     # + where the rank-1 fp16 file's overhead goes

``--breakdown`` (this tree): the rank-1 fp16 file's index frame recompressed without the adapter's ``source``, then
also without the module records (what each part costs in the frame), and its payload at Pco levels 8, 10 and 12.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import adapterpack
from adapterpack.ops.convert import convert
from adapterpack.ops.rerank import RerankPolicy, rerank_file
from tools.bench import common


def breakdown(path: Path) -> None:
    """Where the bytes of ``path`` (a default .apack) go beyond its payload."""
    from adapterpack.codecs.pco import Pco
    from adapterpack.container import ApackReader
    from adapterpack.container.writer import compress_index

    with ApackReader(path) as r:
        index = json.loads(r.index._data)
        frame, start, payload = r.preamble.index_length, r.data_start, sum(b.stored_length for b in r.blobs)
    with adapterpack.open(path) as ad:
        arrs = [np.asarray(m.array(s)) for m in ad for s in m.tensors]

    def z(obj: object) -> int:
        return len(compress_index(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()))

    no_source = json.loads(json.dumps(index))
    for a in no_source["adapters"]:
        a.pop("source", None)
    no_modules = json.loads(json.dumps(no_source))
    for a in no_modules["adapters"]:
        a["modules"] = []
    print(f"{path.name}: file {path.stat().st_size:,} B = preamble 32 + index frame {frame:,} + padding {start - 32 - frame:,} "
          f"+ payload {payload:,}")
    print(f"  index frame {z(index):,} B; without source {z(no_source):,}; also without the module records {z(no_modules):,}")
    for level in (8, 10, 12):
        c = Pco(level)
        got = sum(len(c.encode(memoryview(np.ascontiguousarray(a).view(f"u{a.itemsize}").reshape(-1)), a.itemsize)) for a in arrs)
        print(f"  pco level {level} payload: {got:,} B")


def main() -> None:
    print(f"writer: {Path(adapterpack.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for k in (1, 2, 4):
            rerank_file(common.example_dir(), work / f"r{k}", RerankPolicy(rank=k), to="peft", force=True)
            for dt in ("fp32", "fp16", "bf16"):
                folder = common.cast_peft(work / f"r{k}", work / f"r{k}-{dt}", dt)
                out = work / f"r{k}-{dt}.apack"
                convert(folder, out, force=True)
                print(f"rank {k} {dt}: {out.stat().st_size:,} B")
                if k == 1 and dt == "fp16" and "--breakdown" in sys.argv[1:]:
                    breakdown(out)


if __name__ == "__main__":
    main()
