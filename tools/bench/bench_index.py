"""What the compact container (format 1.3; 1.5's leaner index and data start) changes: index and padding bytes per
tensor, and the cost of opening a raw file.

For each adapter and codec, the same tensors are written twice by this tree's writer: ``compact=False`` (the 1.2
layout: plain JSON index, every blob aligned) and the default 1.3 file (with compressed blobs: the index one zstd
frame, compressed blobs packed; raw blobs only: the plain index and 1.2 layout). Reported: file, index and padding
bytes (total and per tensor) of each. Then the raw file as written (plain index) and the same file with its index
compressed (what the writer does not do for raw-only files): ``adapterpack.open`` + every tensor, and
``ApackReader`` alone, timed round-robin in the same run beside ``safetensors.numpy.load_file`` of the PEFT file, as
the fastest of ``--repeats`` rounds.

Inputs: the bundled example (SmolLM2-135M r=8) cast to bf16 and, as shipped, fp32; the synthetic 7B-shaped adapter
(bf16, 32 layers). Run from the repository root::

    python -m tools.bench.bench_index             # BENCHMARKS.md
    python -m tools.bench.bench_index --quick     # 4-layer synthetic, 11 rounds
    python -m tools.bench.bench_index --real      # bytes only, the real adapters of ~/.cache/adapterpack in 3 dtypes
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file as st_numpy_load

import adapterpack
from adapterpack.container import ApackReader
from adapterpack.container.writer import write_apack

from . import common, synthetic


def sizes(path: Path) -> dict[str, Any]:
    """File, stored index and padding bytes of an .apack, and per tensor."""
    with ApackReader(path) as r:
        n = len(r.blobs)
        blob_bytes = sum(b.stored_length for b in r.blobs)
        index = r.preamble.index_length
        padding = r.file_size - 32 - index - blob_bytes
        return {"tensors": n, "file": r.file_size, "index": index, "index_json": r.index_text_length, "padding": padding,
                "index_per_tensor": index / n, "padding_per_tensor": padding / n, "flags": r.preamble.flags}  # fmt: skip


def schema_options(path: Path) -> list[list[str]]:
    """Index bytes, JSON and zstd-compressed (the writer's levels), of the file's index and of shorter schemas derived
    from it, each step on top of the previous one: what a schema change would add to compression (measured only; the
    writer writes the third step since 1.5)."""
    import copy

    from adapterpack.container.index import dumps, fill_implied
    from adapterpack.container.writer import compress_index

    with ApackReader(path) as r:
        index = copy.deepcopy(r.index.raw)
        fill_implied(index["blobs"], r.preamble.packed)  # every key, as a 1.3–1.4 index holds them
        n = len(r.blobs)

    def no_level(i: dict[str, Any]) -> None:
        for b in i["blobs"]:
            b["codec"].pop("level", None)

    def no_offset(i: dict[str, Any]) -> None:
        for b in i["blobs"]:
            b.pop("offset")
            b.pop("length")

    def no_default_params(i: dict[str, Any]) -> None:
        for a in i["adapters"]:
            for m in a["modules"]:
                m["params"] = {k: v for k, v in m["params"].items() if v not in (False, "linear")}

    def positional(i: dict[str, Any]) -> None:
        i["blobs"] = [[b["dtype"], b["shape"], b["codec"]["id"], b["stored_length"], b["crc32c"]] for b in i["blobs"]]

    steps: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("the 1.3–1.4 index (every BLOB key)", lambda i: None),
        ("codec `level` omitted (informational)", no_level),
        ("`offset` and `length` omitted (the layout rule and the shape give them; 1.5 writes this, with `level`)", no_offset),
        ("lora params at their defaults omitted", no_default_params),
        ("blobs as positional arrays", positional),
    ]
    rows, cur = [], copy.deepcopy(index)
    for label, change in steps:
        change(cur)
        text = dumps(cur)
        z = len(compress_index(text))
        rows.append([label, f"{len(text):,}", f"{z:,}", f"{z / n:.1f}"])
    return rows


def with_compressed_index(src: Path, dst: Path) -> None:
    """``src`` (a raw-only file, plain index) rewritten with its index as a zstd frame (flag bit 0), blobs unchanged:
    the variant the writer does not write for raw-only files, timed against the plain one."""
    import struct

    from adapterpack.checksum import crc32c
    from adapterpack.container.preamble import FLAG_INDEX_ZSTD, PREAMBLE_SIZE, align_up
    from adapterpack.container.writer import compress_index

    raw = src.read_bytes()
    flags, length = struct.unpack_from("<IQ", raw, 12)
    assert not flags, "a raw-only file with a plain index"
    text = raw[PREAMBLE_SIZE : PREAMBLE_SIZE + length]
    data = raw[align_up(PREAMBLE_SIZE + length, 256) :]
    frame = compress_index(text)
    head = raw[:12] + struct.pack("<IQI", FLAG_INDEX_ZSTD, len(frame), crc32c(frame)) + raw[28:32]
    pad = align_up(PREAMBLE_SIZE + len(frame), 256) - PREAMBLE_SIZE - len(frame)
    dst.write_bytes(head + frame + b"\0" * pad + data)


def open_all(path: Path) -> object:
    """``adapterpack.open`` + every tensor decoded and touched (CRC-32C on, the default)."""
    ad = adapterpack.open(path)
    arrs = common.decode_all(ad)
    common.touch(arrs)
    return arrs


REAL = Path.home() / ".cache" / "adapterpack"


def real_adapters(work: Path) -> None:
    """File, index and padding bytes, 1.2 layout vs 1.3, of every real adapter found (byteplanes; bf16, fp16, fp32)."""
    sources = [("bundled r=8", common.example_dir()), ("rerank r=64", REAL / "rerank-r64")]
    sources += [(f"bank {p.name}", p) for p in sorted((REAL / "bank-loras").glob("lora*"))]
    rows = []
    for label, src in sources:
        if not (src / common.PEFT_WEIGHTS).is_file():
            print(f"(skipped {label}: no {src / common.PEFT_WEIGHTS})")
            continue
        for dt in ("bf16", "fp16", "fp32"):
            ad = adapterpack.open(common.cast_peft(src, work / f"{src.name}-{dt}", dt))
            old = write_apack(work / "old.apack", ad, codec="byteplanes", compact=False)
            new = write_apack(work / "new.apack", ad, codec="byteplanes")
            rows.append([label, dt, old.blobs, f"{old.file_size:,}", f"{new.file_size:,}", f"{old.file_size - new.file_size:,}",
                         f"{old.index_length / old.blobs:.1f}", f"{new.index_length / new.blobs:.1f}", f"{old.padding:,}",
                         f"{new.padding:,}"])  # fmt: skip
    headers = ["adapter", "dtype", "tensors", "file 1.2", "file 1.3", "saved", "index B/tensor 1.2", "1.3", "padding 1.2", "1.3"]
    print(common.markdown_table(headers, rows, "ll" + "r" * 8))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4-layer synthetic adapter, 11 rounds")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 61, quick 11)")
    ap.add_argument("--real", action="store_true", help="only the bytes of the real adapters (byteplanes, 3 dtypes)")
    args = ap.parse_args(argv)
    if args.real:
        with tempfile.TemporaryDirectory(prefix="apack-index-") as tmp:
            real_adapters(Path(tmp))
        return
    repeats = args.repeats or (11 if args.quick else 61)
    layers = 4 if args.quick else 32
    with tempfile.TemporaryDirectory(prefix="apack-index-") as tmp:
        work = Path(tmp)
        ex = common.example_dir()
        sources: list[tuple[str, Any, Path]] = [
            ("bundled r=8, bf16", adapterpack.open(common.cast_peft(ex, work / "ex-bf16", "bf16")), work / "ex-bf16"),
            ("bundled r=8, fp32", adapterpack.open(ex), ex),
        ]
        syn = synthetic.build_adapter("bf16", layers=layers)
        synthetic.write_peft(syn, work / "syn")
        sources.append((f"synthetic 7B-shaped, {layers} layers, bf16", syn, work / "syn"))

        rows = []
        timing: dict[str, Callable[[], object]] = {}
        for label, ad, peft in sources:
            for codec in ("byteplanes", "raw"):
                got = {}
                for version, compact in (("1.2 layout", False), ("1.3", True)):
                    path = work / f"{len(rows)}-{codec}-{compact}.apack"
                    write_apack(path, ad, codec=codec, compact=compact)
                    got[version] = sizes(path)
                    if codec == "raw" and compact:  # the writer's raw file (plain index), and the same with a frame
                        zpath = path.with_suffix(".zindex.apack")
                        with_compressed_index(path, zpath)
                        for variant, p in (("plain index", path), ("compressed index", zpath)):
                            timing[f"{label} | {variant} open+read"] = lambda p=p: open_all(p)
                            timing[f"{label} | {variant} ApackReader"] = lambda p=p: ApackReader(p).close()
                old, new = got["1.2 layout"], got["1.3"]
                rows.append([label, codec, old["tensors"], f"{old['file']:,}", f"{new['file']:,}", f"{old['index']:,}",
                             f"{new['index']:,}", f"{old['index_per_tensor']:.1f}", f"{new['index_per_tensor']:.1f}",
                             f"{old['padding']:,}", f"{new['padding']:,}", f"{new['file'] / old['file']:.4f}"])  # fmt: skip
            st = peft / common.PEFT_WEIGHTS
            timing[f"{label} | safetensors load_file"] = lambda s=st: common.touch(st_numpy_load(str(s)).values())
        print(f"Machine: {common.machine_line(common.machine())}\n")
        print("Bytes (the same tensors written by this tree with compact=False and with the 1.3 default):\n")
        headers = ["adapter", "codec", "tensors", "file 1.2", "file 1.3", "index 1.2", "index 1.3", "index B/tensor 1.2",
                   "1.3", "padding 1.2", "padding 1.3", "file 1.3 / 1.2"]  # fmt: skip
        print(common.markdown_table(headers, rows, "ll" + "r" * 10))
        print(f"\nShorter schemas on top of compression ({sources[0][0]}, byteplanes; measured, not written):\n")
        schemas = schema_options(work / "0-byteplanes-True.apack")
        print(common.markdown_table(["index", "JSON bytes", "zstd bytes", "zstd B/tensor"], schemas))
        print()
        common.warm_page_cache(work.glob("*.apack"))
        times = common.interleaved(timing, repeats)
        best = {k: min(v) * 1e3 for k, v in times.items()}
        out = []
        for label, _, _ in sources:
            st = best[f"{label} | safetensors load_file"]
            for what in ("open+read", "ApackReader"):
                old, new = best[f"{label} | plain index {what}"], best[f"{label} | compressed index {what}"]
                out.append([label, what, f"{old:.3f}", f"{new:.3f}", f"**{new / old:.3f}**", f"{old / st:.3f}", f"{new / st:.3f}"])
        print(f"Raw-only files as written (plain index) and with a compressed index, fastest of {repeats} interleaved rounds")
        print("(ms; CRC-32C on; load_file = safetensors.numpy):\n")
        headers = ["adapter", "step", "plain ms", "compressed ms", "compressed / plain", "plain / load_file", "compr. / load_file"]
        print(common.markdown_table(headers, out, "llrrrrr"))
        print(f"\n1-min load average at the end: {common.machine()['loadavg_1min']}")


if __name__ == "__main__":
    main()
