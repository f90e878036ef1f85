"""File size of ``.apack`` (raw, zstd, byteplanes) vs PEFT's ``adapter_model.safetensors``, and codec speed.

Inputs, each in float32, float16 and bfloat16 (bf16 rounded to nearest even):

- the bundled real adapter (SmolLM2-135M, r=8, trained in fp32) cast to each dtype;
- the synthetic 7B-shaped adapter (random Gaussian factors, see :mod:`tools.bench.synthetic`).

Sizes are whole files: the PEFT safetensors file as safetensors writes it for those tensors,
and the ``.apack`` that ``adapterpack.save(adapterpack.open(peft_folder), codec=...)`` writes
(the writer stores a blob raw where a codec would not make it smaller). Speeds are decoded
megabytes (10^6 bytes) per second, median of ``--repeats``, one thread:

- encode / decode: the codec alone on every tensor of the adapter, in memory;
- load: ``adapterpack.open`` + every tensor decoded + CRC-32C verified + every page touched
  (page cache warm), i.e. what a reader pays end to end.

Run from the repository root::

    python -m tools.bench.bench_codecs            # the real run (BENCHMARKS.md)
    python -m tools.bench.bench_codecs --quick    # 4-layer synthetic, 2 repeats
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import adapterpack
from adapterpack import codecs, dtypes
from adapterpack.ops.convert import effective_level

from . import common, synthetic

CODECS = ("raw", "zstd", "byteplanes")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
ZIPNN_NOTE = (
    "For context (not measured here): ZipNN (Hershcovitch et al., 2024), which also separates the bytes of "
    "each float before entropy coding, reports about 1.5× on bf16 model weights; byteplanes is the same idea with zstd."
)


def codec_speed(arrs: list[np.ndarray], codec: str, level: int | None, repeats: int) -> tuple[float, float]:
    """(encode MB/s, decode MB/s) of one codec over all arrays, in memory."""
    c = codecs.get_codec({"id": codec} if level is None else {"id": codec, "level": level})
    items = [(dtypes.as_bytes(a), dtypes.of_array(a).itemsize) for a in arrs]
    total = sum(len(d) for d, _ in items)
    stored = [c.encode(d, k) for d, k in items]
    outs = [bytearray(len(d)) for d, _ in items]

    def encode() -> None:
        for d, k in items:
            c.encode(d, k)

    def decode() -> None:
        for s, (_, k), out in zip(stored, items, outs):
            c.decode(memoryview(s), memoryview(out), k)

    decode()
    if any(bytes(out) != bytes(d) for (d, _), out in zip(items, outs)):
        raise SystemExit(f"{codec} did not round-trip")
    t = common.interleaved({"encode": encode, "decode": decode}, repeats)
    return total / common.median(t["encode"]) / common.MB, total / common.median(t["decode"]) / common.MB


def load_speed(path: Path, repeats: int) -> float:
    """MB/s of adapterpack.open + decode + verify + touch, page cache warm."""
    common.warm_page_cache([path])
    total = adapterpack.open(path).decoded_bytes

    def load() -> object:
        arrs = common.decode_all(adapterpack.open(path, verify=True))
        common.touch(arrs)
        return arrs

    return total / common.median(common.interleaved({"load": load}, repeats)["load"]) / common.MB


def sources(work: Path, quick: bool) -> list[tuple[str, str, Path]]:
    """(source name, dtype, PEFT folder) for every input."""
    out = []
    ex = common.example_dir()
    layers = 4 if quick else 32
    for dt in DTYPE_NAMES:
        out.append(("bundled example (trained)", dt, common.cast_peft(ex, work / f"example-{dt}", dt)))
    for dt in DTYPE_NAMES:
        folder = synthetic.write_peft(synthetic.build_adapter(dt, layers=layers), work / f"synthetic-{dt}")
        out.append((f"synthetic 7B-shaped ({layers} layers)", dt, folder))
    return out


def run(work: Path, quick: bool, repeats: int, level: int | None) -> list[dict[str, Any]]:
    """Measure every (source, dtype, codec)."""
    rows = []
    for name, dt, folder in sources(work, quick):
        st_bytes = (folder / common.PEFT_WEIGHTS).stat().st_size
        ad = adapterpack.open(folder)
        arrs = common.decode_all(ad)
        decoded = sum(a.nbytes for a in arrs)
        for codec in CODECS:
            path = work / f"{folder.name}-{codec}.apack"
            adapterpack.save(ad, path, codec=codec, level=level)
            enc, dec = codec_speed(arrs, codec, level, repeats)
            rows.append(
                {
                    "source": name,
                    "dtype": dt,
                    "tensors": len(arrs),
                    "decoded_bytes": decoded,
                    "safetensors_bytes": st_bytes,
                    "codec": codec,
                    "level": effective_level(codec, level),
                    "apack_bytes": path.stat().st_size,
                    "ratio": st_bytes / path.stat().st_size,
                    "encode_mb_s": enc,
                    "decode_mb_s": dec,
                    "load_mb_s": load_speed(path, repeats),
                }
            )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown table."""

    def fmt(x: float) -> str:
        return f"{x:,.0f}"

    table = [
        [
            r["source"],
            r["dtype"],
            f"{r['safetensors_bytes']:,}",
            r["codec"],
            f"{r['apack_bytes']:,}",
            f"**{r['ratio']:.2f}×**",
            fmt(r["encode_mb_s"]),
            fmt(r["decode_mb_s"]),
            fmt(r["load_mb_s"]),
        ]
        for r in rows
    ]
    headers = [
        "adapter",
        "dtype",
        "safetensors bytes",
        "codec",
        ".apack bytes",
        "safetensors / apack",
        "encode MB/s",
        "decode MB/s",
        "load MB/s",
    ]
    return common.markdown_table(headers, table, "llrlrrrrr")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4-layer synthetic adapter, 2 repeats")
    ap.add_argument("--repeats", type=int, help="timed repeats (default 7, quick 2)")
    ap.add_argument("--level", type=int, default=None, help="zstd level (default: each codec's own, 3 and 1)")
    ap.add_argument("--workdir", type=Path, help="where to write the test files (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    with tempfile.TemporaryDirectory(prefix="apack-codecs-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run(work, args.quick, repeats, args.level)
    m = common.machine()
    print(f"Machine: {common.machine_line(m)}. Median of {repeats}; MB = 10^6 bytes.\n")
    print(synthetic.description("bf16", layers=4 if args.quick else 32).replace("bfloat16", "each dtype") + "\n")
    print(render(rows))
    print("\n" + ZIPNN_NOTE)
    if args.json:
        common.write_json(args.json, {"machine": m, "quick": args.quick, "repeats": repeats, "level": args.level, "rows": rows})


if __name__ == "__main__":
    main()
