"""Audit throughput: adapters per second of ``adapterpack audit`` over a folder of many real adapters.

Inputs: ``--n`` copies of the bundled example (real SmolLM2 LoRA, r=8, 120 modules) in a temp folder,
cycling through five forms — PEFT folder (fp32), kohya file (fp32), .apack byteplanes (fp32), .apack raw
(fp32) and .apack bf16 — so every reader and every size computation is exercised.

Baseline, measured in the same run over the same inputs: **read** = open every input and decode every
tensor (``adapterpack.open`` + ``m.array``), the floor any audit that looks at the values pays. The
audit itself does far more per input (encodes everything with zstd and byteplanes, casts to bf16 and
encodes, two exact-SVD re-ranks and their encodings), so the ratio says what that costs over a read.

    OMP_NUM_THREADS=1 nice -n 10 python -m tools.bench.bench_audit          # --n 200; --quick: --n 20
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.bench.common import example_dir, machine, machine_line, markdown_table, write_json

FORMS = ("peft", "kohya", "apack-byteplanes", "apack-raw", "apack-bf16")


def make_inputs(root: Path, n: int) -> list[Path]:
    """``n`` inputs under ``root``: the five forms of the example, copied round-robin."""
    from adapterpack.ops.convert import convert

    ex = example_dir()
    proto = root / "proto"
    proto.mkdir()
    convert(ex, proto / "k.safetensors")
    convert(ex, proto / "b.apack")
    convert(ex, proto / "r.apack", codec="raw")
    convert(ex, proto / "h.apack", dtype="bf16")
    sources = {"kohya": proto / "k.safetensors", "apack-byteplanes": proto / "b.apack", "apack-raw": proto / "r.apack"}
    sources["apack-bf16"] = proto / "h.apack"
    tree = root / "adapters"
    out = []
    for i in range(n):
        form = FORMS[i % len(FORMS)]
        d = tree / f"team{i % 7}" / f"run{i:04d}"
        d.mkdir(parents=True)
        if form == "peft":
            dst = d / "adapter"
            shutil.copytree(ex, dst)
        else:
            dst = d / ("lora.safetensors" if form == "kohya" else "lora.apack")
            shutil.copyfile(sources[form], dst)
        out.append(dst)
    return out


def read_all(inputs: list[Path]) -> int:
    """The baseline: open every input and decode every tensor; returns the tensors' bytes."""
    import adapterpack

    total = 0
    for p in inputs:
        with adapterpack.open(p) as a:
            for m in a:
                for slot in m.tensors:
                    total += m.array(slot).nbytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="number of adapters (default 200)")
    ap.add_argument("--quick", action="store_true", help="20 adapters")
    ap.add_argument("--jobs", type=int, nargs="*", default=None, help="worker counts to time (default: 1 and all CPUs)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args()
    n = 20 if args.quick else args.n

    from adapterpack.ops.audit import VARIANTS, audit_paths, default_jobs, find_inputs
    from adapterpack.ops.report import footprint

    jobs_list = args.jobs or sorted({1, default_jobs()})
    runs = [("all five", VARIANTS, j) for j in jobs_list]
    runs += [("zstd, byteplanes", ("zstd", "byteplanes"), 1), ("none (ranks only)", (), 1)]
    with tempfile.TemporaryDirectory(prefix="bench_audit.") as tmp:
        inputs = make_inputs(Path(tmp), n)
        found = find_inputs([Path(tmp) / "adapters"])
        assert len(found.inputs) == n, (len(found.inputs), n)
        disk = sum(footprint(p) for p in inputs)
        read_all(inputs[:5])  # warm the page cache and imports
        t0 = time.perf_counter()
        decoded = read_all(inputs)
        t_read = time.perf_counter() - t0
        results: dict[str, Any] = {"n": n, "disk_bytes": disk, "decoded_bytes": decoded, "read_s": t_read, "audit": []}

        def row(what: str, measured: str, jobs: int, dt: float) -> tuple[str, ...]:
            return (what, measured, str(jobs), f"{dt:.2f}", f"{n / dt:.2f}", f"{disk / dt / 1e6:.1f}", f"{dt / t_read:.1f}")

        rows = [row("read (open + decode every tensor)", "-", 1, t_read)]
        for label, measure, jobs in runs:
            t0 = time.perf_counter()
            report = audit_paths(found, jobs=jobs, measure=measure)
            dt = time.perf_counter() - t0
            t = report["totals"]
            assert t["failed"] == 0 and t["inputs"] == n, t
            results["audit"].append({"measure": list(measure), "jobs": jobs, "seconds": dt, "totals": t})
            rows.append(row("audit", label, jobs, dt))
    m = machine()
    results["machine"] = m
    headers = ("what", "alternatives sized", "workers", "seconds", "adapters/s", "MB/s (on disk)", "× read")
    print(f"{n} adapters ({', '.join(FORMS)} round-robin), {disk / 1e6:.1f} MB on disk, {decoded / 1e6:.1f} MB decoded")
    print(markdown_table(headers, rows, "llrrrrr"))
    t = results["audit"][0]["totals"]
    saved = ", ".join(f"{k} {v / disk:.1%}" for k, v in t["saved"].items())
    print(f"\nsaved over all {n}: {saved}")
    print(machine_line(m))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
