"""Whole default ``.apack`` bytes of the bundled adapter truncated by its exact SVD to ranks 1, 2 and 4, in fp32, fp16, bf16.

The small-adapter rows of ``tools.bench.bench_codecs --sizes-only`` (where the index weighs most), as bare file sizes,
using only APIs older trees have too, so one script compares two writers (BENCHMARKS.md, "Why 1.5")::

    python -m tools.experiments.small_adapter_sizes                     # this tree
    mkdir /tmp/old && git archive 53c3bd9 | tar -x -C /tmp/old          # format 1.4's writer
    PYTHONPATH=/tmp/old python tools/experiments/small_adapter_sizes.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import adapterpack
from adapterpack.ops.convert import convert
from adapterpack.ops.rerank import RerankPolicy, rerank_file
from tools.bench import common


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


if __name__ == "__main__":
    main()
