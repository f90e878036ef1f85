"""File → tensors on a device: ``adapterpack.torch.load`` vs safetensors + ``.to(device)`` per tensor (PEFT's path).

Two measurements, every loader timed in the same process, round-robin (``common.interleaved``):

1. **one 7B-shaped adapter** (32 layers × q/k/v/o 4096×4096 and gate/up 11008×4096, down
   4096×11008, r=16, bf16; SYNTHETIC factors drawn like ``tools/bench/synthetic.py``): median time
   from file to device tensors for ``adapterpack.torch.load`` on a raw and a byteplanes ``.apack``
   and for ``safetensors.torch.load_file`` + ``t.to(device)`` per tensor, as ratios.
2. **many adapters**: 100 different files of the bundled example's shape (SmolLM2-135M r=8,
   q/k/v/o, fp32: each a copy of the bundled adapter with its own seed-perturbed B), loaded one
   after another; adapters per second.

"Loaded" means the same for every loader: on a GPU, every copy has finished
(``torch.cuda.synchronize``); on the CPU, one byte of each 4 KiB page of every tensor has been
read (``common.touch``), so the zero-copy mmap views pay their page faults like copying loaders
pay their copies. The page cache is warm for all files.

Run from the repository root::

    python -m tools.bench.bench_device_load             # the real run (BENCHMARKS.md)
    python -m tools.bench.bench_device_load --quick     # 4 layers, 10 adapters, 5 rounds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as st_load_file

import adapterpack
import adapterpack.torch as apt
from adapterpack.adapter import Adapter, Module
from adapterpack.formats import peft

from . import common, synthetic

HIDDEN, MLP = 4096, 11008
TARGETS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (MLP, HIDDEN),
    "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}
AIM = 0.7
SAFETENSORS = "safetensors load_file + .to(device) per tensor"


def build_7b(layers: int, rank: int = 16, seed: int = 0) -> Adapter:
    """The 7B-shaped adapter with all seven linear modules (bf16; synthetic, see the module docstring)."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    cfg = synthetic.peft_config(layers, rank, 2.0 * rank) | {"target_modules": sorted(t.split(".")[1] for t in TARGETS)}
    ad = Adapter(base_model=synthetic.BASE_MODEL, source={"format": "peft", "config": cfg, "key_prefix": peft.DEFAULT_PREFIX})
    for layer in range(layers):
        for target, (out, inp) in TARGETS.items():
            name = f"model.layers.{layer}.{target}"
            a = rng.standard_normal((rank, inp), dtype=np.float32) * np.float32(synthetic.a_std(inp))
            b = rng.standard_normal((out, rank), dtype=np.float32) * np.float32(synthetic.B_STD)
            ad.modules[name] = Module(
                name,
                "lora",
                (out, inp),
                {"rank": rank, "alpha": 2.0 * rank},
                {"A": a.astype(ml_dtypes.bfloat16), "B": b.astype(ml_dtypes.bfloat16)},
            )
    return ad


def finish(device: torch.device, tensors: Any) -> None:
    """The 'loaded' rule: copies done (GPU) or every page touched (CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:
        common.touch(tensors)


def apack_loader(path: Path, device: torch.device, **kw: Any) -> Callable[[], object]:
    def run() -> object:
        out = apt.load(path, device, **kw)
        finish(device, [t for lt in out.values() for t in (lt.A, lt.B)])
        return out

    return run


def st_loader(path: Path, device: torch.device) -> Callable[[], object]:
    def run() -> object:
        out = {k: v.to(device) for k, v in st_load_file(str(path)).items()}
        finish(device, list(out.values()))
        return out

    return run


def one_adapter(work: Path, device: torch.device, layers: int, repeats: int) -> dict[str, Any]:
    """Medians (ms) and ratios for the 7B-shaped adapter."""
    ad = build_7b(layers)
    paths = {"raw": work / "7b-raw.apack", "byteplanes": work / "7b-bp.apack"}
    for codec, p in paths.items():
        adapterpack.save(ad, p, codec=codec)
    st = peft.write_peft(ad, work / "7b-peft") / common.PEFT_WEIGHTS
    common.warm_page_cache([*paths.values(), st])
    fns = {
        "apack raw": apack_loader(paths["raw"], device),
        "apack raw, CRC off": apack_loader(paths["raw"], device, verify=False),
        "apack raw, copied (zero_copy=False)": apack_loader(paths["raw"], device, zero_copy=False),
        "apack byteplanes": apack_loader(paths["byteplanes"], device),
        SAFETENSORS: st_loader(st, device),
    }
    times = common.interleaved(fns, repeats)
    med = {k: common.median(v) * 1e3 for k, v in times.items()}
    base = med[SAFETENSORS]
    return {
        "layers": layers,
        "tensors": 2 * len(ad.modules),
        "decoded_mb": ad.decoded_bytes / common.MB,
        "file_mb": {k: p.stat().st_size / common.MB for k, p in paths.items()} | {"safetensors": st.stat().st_size / common.MB},
        "repeats": repeats,
        "median_ms": med,
        "ratio": {k: v / base for k, v in med.items()},
        "min_ratio": {k: min(v) / min(times[SAFETENSORS]) for k, v in times.items()},
        "spread_ms": {k: (min(v) * 1e3, max(v) * 1e3) for k, v in times.items()},
    }


def many_adapters(work: Path, device: torch.device, count: int, repeats: int) -> dict[str, Any]:
    """Adapters per second loading ``count`` different bundled-shape files one after another."""
    src = adapterpack.open(common.example_dir())
    rng = np.random.default_rng(1)
    dirs = {"raw": [], "byteplanes": [], "safetensors": []}
    for i in range(count):
        ad = Adapter(name=src.name, base_model=src.base_model, source=src.source)
        for m in src:
            b = m.array("B") * np.float32(1 + 0.01 * rng.standard_normal())  # a different adapter, same shapes
            ad.modules[m.name] = Module(m.name, m.encoding, m.base_shape, dict(m.params), {"A": m.array("A"), "B": b})
        for codec in ("raw", "byteplanes"):
            p = work / f"many-{codec}-{i:03d}.apack"
            adapterpack.save(ad, p, codec=codec)
            dirs[codec].append(p)
        dirs["safetensors"].append(peft.write_peft(ad, work / f"many-peft-{i:03d}") / common.PEFT_WEIGHTS)
    common.warm_page_cache([p for ps in dirs.values() for p in ps])

    def sweep(kind: str) -> Callable[[], object]:
        def run() -> object:
            for p in dirs[kind]:
                (st_loader(p, device) if kind == "safetensors" else apack_loader(p, device))()
            return None

        return run

    times = common.interleaved({k: sweep(k) for k in dirs}, repeats)
    return {
        "count": count,
        "repeats": repeats,
        "adapters_per_s": {k: count / common.median(v) for k, v in times.items()},
        "ms_per_adapter": {k: common.median(v) * 1e3 / count for k, v in times.items()},
        "best_adapters_per_s": {k: count / min(v) for k, v in times.items()},
    }


def render(one: dict[str, Any], many: dict[str, Any], device: torch.device) -> str:
    """The markdown tables."""
    rows = [
        [k, f"{v:.2f}", f"**{one['ratio'][k]:.2f}**", f"{one['spread_ms'][k][0]:.2f}", f"{one['min_ratio'][k]:.2f}"]
        for k, v in one["median_ms"].items()
    ]
    out = [
        f"**7B-shaped, {one['layers']} layers × 7 modules, r=16, bf16** ({one['tensors']} tensors, "
        f"{one['decoded_mb']:.1f} MB) → {device}; median of {one['repeats']}:",
        "",
        common.markdown_table(["loader", "median ms", "/ safetensors", "min ms", "min / min"], rows),
        "",
        f"**{many['count']} bundled-shape adapters one after another** → {device}; median of {many['repeats']} sweeps:",
        "",
        common.markdown_table(
            ["loader", "adapters/s (median sweep)", "ms per adapter", "adapters/s (fastest sweep)"],
            [
                [k, f"{v:.0f}", f"{many['ms_per_adapter'][k]:.2f}", f"{many['best_adapters_per_s'][k]:.0f}"]
                for k, v in many["adapters_per_s"].items()
            ],
        ),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, 10 adapters, 5 rounds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 21, quick 5)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 21)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="apack-devload-") as tmp:
        work = Path(tmp)
        one = one_adapter(work, device, 4 if args.quick else 32, repeats)
        many = many_adapters(work, device, 10 if args.quick else 100, max(3, repeats // 4))
    m = common.machine()
    print(f"Machine: {common.machine_line(m)}. Page cache warm. OMP threads 1; {os.cpu_count()} CPUs.\n")
    print(render(one, many, device))
    print(f"\nAim: apack raw <= {AIM} x the safetensors path. Took {time.perf_counter() - t0:.0f} s.")
    if args.json:
        common.write_json(args.json, {"machine": m, "device": str(device), "one": one, "many": many})


if __name__ == "__main__":
    main()
