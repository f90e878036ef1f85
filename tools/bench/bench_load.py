"""Load time of a raw ``.apack`` vs the PEFT ``adapter_model.safetensors`` holding the same tensors.

Four loaders per side, timed in the same run, round-robin, the fastest (min) of ``--repeats`` rounds
(the median is reported beside it):

- numpy: ``adapterpack.open`` + decode every tensor, vs ``safetensors.numpy.load_file`` and
  ``safe_open(framework="np")`` + ``get_tensor`` per key;
- torch (CPU): ``adapterpack.torch.load``, vs ``safetensors.torch.load_file`` and
  ``safe_open(framework="pt")`` + ``get_tensor``;

each ``.apack`` loader with CRC-32C verification on (the default) and off. "Loaded" means the
same for every loader: the call returned every tensor and then one byte of each 4 KiB page of
every tensor was read (:func:`tools.bench.common.touch`), so lazy mmap loaders pay for their
page faults like copying loaders pay for their copies. The page cache is warm (every file is
read once first, and one untimed round runs before the timed ones).

The aims (issue 13), checked on the min ratios: into torch, ``adapterpack.torch.load`` / ``load_file``
<= 1.05 with CRC-32C off and <= 1.25 with it on; into numpy, ``adapterpack.open`` + every tensor /
``load_file`` <= 1.0 (CRC on and off), on both adapters.

Run from the repository root::

    python -m tools.bench.bench_load --breakdown     # the real run (BENCHMARKS.md)
    python -m tools.bench.bench_load --quick         # a few seconds: 4-layer synthetic, 5 repeats
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file as st_numpy_load
from safetensors.torch import load_file as st_torch_load

import adapterpack
import adapterpack.container
import adapterpack.torch as apt
from adapterpack.formats.peft import DEFAULT_PREFIX

from . import common, synthetic

#: (side, CRC) -> the largest apack / load_file ratio the issue accepts.
AIMS = {("numpy", "on"): 1.0, ("numpy", "off"): 1.0, ("torch CPU", "on"): 1.25, ("torch CPU", "off"): 1.05}


def apack_numpy(path: Path, verify: bool) -> list[np.ndarray]:
    """``adapterpack.open`` + every tensor decoded, touched."""
    ad = adapterpack.open(path, verify=verify)
    arrs = common.decode_all(ad)
    common.touch(arrs)
    return arrs


def apack_torch(path: Path, verify: bool) -> dict[str, apt.Factors]:
    """``adapterpack.torch.load`` on the CPU, touched."""
    out = apt.load(path, verify=verify)
    common.touch(t for lt in out.values() for t in (lt.A, lt.B, lt.magnitude) if t is not None)
    return out


def st_load_file(path: Path, framework: str) -> dict[str, Any]:
    """``safetensors.<framework>.load_file``, touched."""
    out = st_numpy_load(str(path)) if framework == "np" else st_torch_load(str(path))
    common.touch(out.values())
    return out


def st_safe_open(path: Path, framework: str) -> dict[str, Any]:
    """``safe_open`` + ``get_tensor`` for every key, touched."""
    with safe_open(str(path), framework=framework) as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
    common.touch(out.values())
    return out


def check_same_tensors(apack: Path, st: Path) -> int:
    """Refuse to time files that do not hold the same bytes; returns the tensor count."""
    ref = st_numpy_load(str(st))
    prefix = DEFAULT_PREFIX
    got = {f"{prefix}{m.name}.lora_{slot}.weight": m.array(slot) for m in adapterpack.open(apack) for slot in m.tensors}
    if set(got) != set(ref) or any(got[k].tobytes() != ref[k].tobytes() for k in ref):
        raise SystemExit(f"{apack} and {st} do not hold the same tensors")
    return len(ref)


def prepare(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The cases: the bundled example as shipped, and the synthetic 7B-shaped adapter in bf16."""
    cases = []
    ex = common.example_dir()
    ex_apack = work / "example-raw.apack"
    adapterpack.save(adapterpack.open(ex), ex_apack, codec="raw")
    cases.append({"name": "bundled example (SmolLM2-135M r=8, fp32)", "apack": ex_apack, "safetensors": ex / common.PEFT_WEIGHTS})
    layers = 4 if quick else 32
    ad = synthetic.build_adapter("bf16", layers=layers)
    synthetic.write_peft(ad, work / "synthetic-peft")
    adapterpack.save(ad, work / "synthetic-raw.apack", codec="raw")
    cases.append(
        {
            "name": f"synthetic 7B-shaped ({layers} layers, r=16, bf16)",
            "apack": work / "synthetic-raw.apack",
            "safetensors": work / "synthetic-peft" / common.PEFT_WEIGHTS,
            "note": synthetic.description("bf16", layers=layers),
        }
    )
    return cases


def run_case(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Time every loader on one case; min and median in ms and the apack/safetensors ratios of the mins."""
    ap, st = case["apack"], case["safetensors"]
    n_tensors = check_same_tensors(ap, st)
    common.warm_page_cache([ap, st])
    fns: dict[str, Callable[[], object]] = {
        "np apack verify": lambda: apack_numpy(ap, True),
        "np apack noverify": lambda: apack_numpy(ap, False),
        "np st load_file": lambda: st_load_file(st, "np"),
        "np st safe_open": lambda: st_safe_open(st, "np"),
        "pt apack verify": lambda: apack_torch(ap, True),
        "pt apack noverify": lambda: apack_torch(ap, False),
        "pt st load_file": lambda: st_load_file(st, "pt"),
        "pt st safe_open": lambda: st_safe_open(st, "pt"),
    }
    times = common.interleaved(fns, repeats)
    med = {k: common.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}
    rows = []
    for side, label in (("np", "numpy"), ("pt", "torch CPU")):
        for v, vlabel in (("verify", "on"), ("noverify", "off")):
            a, am = best[f"{side} apack {v}"], med[f"{side} apack {v}"]
            lf, so = best[f"{side} st load_file"], best[f"{side} st safe_open"]
            lfm = med[f"{side} st load_file"]
            aim = AIMS[(label, vlabel)]
            rows.append(
                {"side": label, "crc": vlabel, "apack_ms": a, "load_file_ms": lf, "ratio_load_file": a / lf}
                | {"safe_open_ms": so, "ratio_safe_open": a / so, "median_ratio_load_file": am / lfm}
                | {"aim": aim, "met": a / lf <= aim}
            )
    return {
        "case": case["name"],
        "note": case.get("note", ""),
        "tensors": n_tensors,
        "decoded_mb": adapterpack.open(ap).decoded_bytes / common.MB,
        "apack_bytes": ap.stat().st_size,
        "safetensors_bytes": st.stat().st_size,
        "repeats": repeats,
        "median_ms": med,
        "min_ms": best,
        "all_ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
        "rows": rows,
    }


def open_breakdown(path: Path, calls: int = 60) -> dict[str, float]:
    """Milliseconds (minimum of ``calls``) of each step of opening a raw file and loading it, no page touching."""
    from adapterpack.container import ApackReader
    from adapterpack.container import index as idx

    reader = ApackReader(path)
    stored = bytes(reader.buffer[adapterpack.container.PREAMBLE_SIZE : reader.data_start])[: reader.preamble.index_length]
    index_bytes = idx.index_text(stored, reader.preamble.compressed_index)  # the JSON text (1.3: decompressed)
    record = reader.index.records[0]
    ad = reader.adapter()

    def python_checks() -> object:
        pre = reader.preamble
        index = idx.parse_index(idx.loads(index_bytes), reader.data_start, reader.file_size, pre.packed, pre.implied, pre.unaligned)
        return idx.check_references(index)

    steps: dict[str, Callable[[], object]] = {
        "the index's zstd frame decoded (1.3 compressed index)": lambda: idx.index_text(stored, reader.preamble.compressed_index),
        "json.loads of the index, plain (no checks)": lambda: json.loads(index_bytes),
        "index checked in Python (duplicate keys, blob table, layout, references): the fallback": python_checks,
        "index checked by read_index (msgspec fast path)": lambda: idx.read_index(
            index_bytes, reader.data_start, reader.file_size, reader.preamble.packed, reader.preamble.implied,
            reader.preamble.unaligned
        ),
        "ApackReader() (open, map, preamble, index CRC, read_index)": lambda: ApackReader(path),
        "building the Adapter (records, lora validation)": lambda: reader._build(record),
        "reading every tensor (numpy views)": lambda: common.decode_all(ad),
        "adapterpack.open() in all": lambda: adapterpack.open(path),
        "adapterpack.torch load, CRC off, in all": lambda: apt.load(path, verify=False),
    }
    out = {}
    for name, fn in steps.items():
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = min(times) * 1e3
    reader.close()
    return out


def render(results: list[dict[str, Any]]) -> str:
    """The markdown report."""
    out = []
    for r in results:
        head = f"**{r['case']}**: {r['tensors']} tensors, {r['decoded_mb']:.1f} MB"
        out.append(f"{head}; fastest of {r['repeats']} interleaved rounds.")
        if r["note"]:
            out.append(f"_{r['note']}_")
        out.append("")
        rows = [
            [
                x["side"],
                x["crc"],
                f"{x['apack_ms']:.2f}",
                f"{x['load_file_ms']:.2f}",
                f"**{x['ratio_load_file']:.2f}**",
                f"≤ {x['aim']:.2f} {'met' if x['met'] else 'MISSED'}",
                f"{x['median_ratio_load_file']:.2f}",
                f"{x['safe_open_ms']:.2f}",
                f"{x['ratio_safe_open']:.2f}",
            ]
            for x in r["rows"]
        ]
        headers = ["into", "apack CRC", "apack ms", "load_file ms", "apack / load_file", "aim", "(medians)"]
        headers += ["safe_open ms", "apack / safe_open"]
        out.append(common.markdown_table(headers, rows, "llrrrlrrr"))
        out.append("")
        if r.get("breakdown"):
            out.append(
                f"Time per step (min of 60 calls, no page touching, {r['index_kb']:.1f} KB index as stored):"
            )
            out.append("")
            steps = [[k, f"{v:.2f}"] for k, v in r["breakdown"].items()]
            out.append(common.markdown_table(["step", "ms"], steps, "lr"))
            out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4-layer synthetic adapter, 5 repeats")
    ap.add_argument("--repeats", type=int, help="timed rounds (default 61, quick 5)")
    ap.add_argument("--workdir", type=Path, help="where to write the test files (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--breakdown", action="store_true", help="also time each step of adapterpack.open")
    ap.add_argument(
        "--crc-threads", type=int, help="threads of torch.load's CRC pass (default: every core, at most 4; staging.CRC_THREADS)"
    )
    args = ap.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 61)
    if args.crc_threads is not None:
        from adapterpack.torch import staging

        staging.CRC_THREADS = max(1, args.crc_threads)
    with tempfile.TemporaryDirectory(prefix="apack-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for case in prepare(work, args.quick):
            result = run_case(case, repeats)
            if args.breakdown:
                result["breakdown"] = open_breakdown(case["apack"])
                result["index_kb"] = adapterpack.container.ApackReader(case["apack"]).preamble.index_length / 1024
            results.append(result)
    m = common.machine()
    print(f"Machine: {common.machine_line(m)}. Page cache warm.\n")
    print(render(results))
    print("Aims (issue 13), on the fastest rounds: torch <= 1.05 with CRC-32C off, <= 1.25 on; numpy <= 1.0.")
    if args.json:
        aims = {f"{side} CRC {crc}": v for (side, crc), v in AIMS.items()}
        common.write_json(args.json, {"machine": m, "quick": args.quick, "aims": aims, "results": results})


if __name__ == "__main__":
    main()
