"""Bit flips in the rows a rank-j read uses, through every rank-j route: how many change ΔW silently?

Writes the example adapter as raw svd records (the layout progressive-rank reads use), then flips one
bit at a time, at random, inside the first ``j`` entries of S and the first ``j`` rows of Ut and Vt of
a random module, and reads the file at rank ``j`` through each route:

- ``open``: ``adapterpack.open(path, rank=j)`` and that module's ΔW;
- ``convert``: ``adapterpack.ops.convert.convert(path, out, rank=j)`` (what ``adapterpack convert --rank j``
  runs), then the written module's ΔW;
- ``torch``: ``adapterpack.torch.load`` with ``rank=j`` and ``materialize`` of that module (skipped
  without torch).

Each read is ``refused`` (an adapterpack error), ``same`` (ΔW bit-identical to the undamaged file's:
a flip that does not reach ΔW) or ``SILENT`` (exit 0 with a different ΔW). Run from the repository root::

    python -m tools.hostile.prefix_flips --flips 1500 --rank 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

import adapterpack
from adapterpack.adapter import Adapter
from adapterpack.container import ApackReader
from adapterpack.encodings.lower import as_svd
from adapterpack.errors import AdapterpackError
from adapterpack.examples import example_path
from adapterpack.ops.convert import convert

Route = Callable[[Path, str, int, Path], np.ndarray]


def _open(path: Path, name: str, rank: int, scratch: Path) -> np.ndarray:
    with adapterpack.open(path, rank=rank) as ad:
        return np.array(ad.delta(name))


def _convert(path: Path, name: str, rank: int, scratch: Path) -> np.ndarray:
    out = scratch / "converted.apack"
    convert(path, out, rank=rank, codec="raw", force=True)
    with adapterpack.open(out) as ad:
        return np.array(ad.delta(name))


def _torch(path: Path, name: str, rank: int, scratch: Path) -> np.ndarray:
    from adapterpack.torch import load, materialize

    return materialize(load(path, rank=rank)[name]).numpy()


def routes() -> dict[str, Route]:
    """Every route that reads an svd file at a rank (torch only when it is installed)."""
    out: dict[str, Route] = {"open": _open, "convert": _convert}
    try:
        import torch  # noqa: F401

        out["torch"] = _torch
    except ImportError:
        print("torch is not installed: the torch route is skipped", file=sys.stderr)
    return out


def svd_file(path: Path) -> None:
    """The example adapter as raw float32 svd records."""
    with adapterpack.open(example_path()) as lora:
        svd = Adapter(name=lora.name, base_model=lora.base_model, modules={m.name: as_svd(m, dtype="float32") for m in lora})
    adapterpack.save(svd, path, codec="raw")


def prefix_spans(path: Path, rank: int) -> list[tuple[str, int, int]]:
    """(module, absolute start, length) of the bytes a rank-``rank`` read of each raw svd slot uses."""
    spans = []
    with ApackReader(path) as reader:
        for mod in reader.index.adapters[0]["modules"]:
            for slot in ("S", "Ut", "Vt"):
                b = reader.blobs[mod["tensors"][slot]]
                row = b.length // b.shape[0]
                spans.append((mod["name"], reader.data_start + b.offset, min(rank, b.shape[0]) * row))
    return spans


def measure(path: Path, flips: int, rank: int, seed: int, scratch: Path) -> dict[str, dict[str, int]]:
    """Outcome counts per route for ``flips`` random single-bit flips in the rank-``rank`` prefixes of ``path``."""
    rng = np.random.default_rng(seed)
    spans = prefix_spans(path, rank)
    weights = np.array([n for _, _, n in spans], np.float64)
    chosen = rng.choice(len(spans), size=flips, p=weights / weights.sum())
    todo = routes()
    clean = {}
    for name in {spans[c][0] for c in chosen}:
        clean[name] = {r: fn(path, name, rank, scratch) for r, fn in todo.items()}
    tally = {r: {"refused": 0, "same": 0, "SILENT": 0} for r in todo}
    damaged = scratch / "damaged.apack"
    shutil.copyfile(path, damaged)
    for c in chosen:
        name, start, length = spans[c]
        pos, bit = start + int(rng.integers(length)), 1 << int(rng.integers(8))
        with open(damaged, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ bit]))
        for r, fn in todo.items():
            try:
                got = fn(damaged, name, rank, scratch)
            except AdapterpackError:
                tally[r]["refused"] += 1
                continue
            same = got.shape == clean[name][r].shape and got.tobytes() == clean[name][r].tobytes()
            tally[r]["same" if same else "SILENT"] += 1
        with open(damaged, "r+b") as f:
            f.seek(pos)
            f.write(bytes([byte]))
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=1500, help="bit flips (default 1500)")
    parser.add_argument("--rank", type=int, default=3, help="rank j of the reads (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file", type=Path, help="a raw svd .apack to damage (default: the example adapter as svd)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        scratch = Path(d)
        path = args.file or scratch / "svd.apack"
        if args.file is None:
            svd_file(path)
        tally = measure(path, args.flips, args.rank, args.seed, scratch)
    print(f"{args.flips} single-bit flips in the rank-{args.rank} prefixes (S, Ut, Vt) of {args.file or 'the example as raw svd'}:")
    for route, counts in tally.items():
        refused, same, silent = counts["refused"], counts["same"], counts["SILENT"]
        print(f"  {route:8s} refused {refused:5d}   ΔW unchanged {same:5d}   ΔW changed silently {silent:5d}")
    return 1 if any(c["SILENT"] for c in tally.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
