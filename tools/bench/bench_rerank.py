"""Re-ranking against kohya-ss ``networks/resize_lora.py``, side by side, and against plain read+write.

Both tools get the same kohya ``.safetensors`` file and the same target rank; each runs as its
own process (``python resize_lora.py ...`` vs ``python -m adapterpack rerank ... --to kohya``) with
one BLAS/OpenMP thread, and the whole-process wall time (and the child's CPU time) is measured,
interleaved round-robin. Retained energy is checked for both outputs against a dense float64
reference: per module, ``1 − ‖ΔW − ΔW'‖²_F / ‖ΔW‖²_F`` of the written file against the fraction
the best rank-j approximation keeps (``np.linalg.svd`` of the dense float64 ΔW).

Inputs: the real r=64 SmolLM2 adapter (:mod:`tools.experiments.rerank_fixture`) and a SYNTHETIC
4096×4096 r=64 adapter with a decaying spectrum (σ_i = exp(−i/12), random orthonormal vectors).

kohya's script is never part of this repository: fetch sd-scripts and put ``networks/resize_lora.py``
in a folder outside it (default ``/tmp/kohya``, or ``$ADAPTERPACK_KOHYA_DIR``), e.g.::

    git -C SD_SCRIPTS_GIT_DIR show HEAD:networks/resize_lora.py > /tmp/kohya/networks/resize_lora.py
    git -C SD_SCRIPTS_GIT_DIR rev-parse HEAD > /tmp/kohya/COMMIT

or ``--kohya-git SD_SCRIPTS_GIT_DIR`` does that. It runs with ``tools/bench/kohya_shim`` (our stand-ins
for its three unrelated ``library`` helpers) first on ``PYTHONPATH``. Without it the kohya parts are
skipped with a message.

    nice -n 10 python -m tools.bench.bench_rerank --rank 8 --repeats 3 --json /tmp/bench_rerank.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.common import REPO, machine, machine_line, markdown_table, median

SHIM = REPO / "tools" / "bench" / "kohya_shim"
KOHYA_SCRIPT = Path("networks") / "resize_lora.py"
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


class KohyaMissing(RuntimeError):
    """kohya's resize_lora.py is not where the benchmark looks for it."""


def kohya_dir() -> Path:
    """The folder holding ``networks/resize_lora.py`` (``$ADAPTERPACK_KOHYA_DIR`` or ``/tmp/kohya``)."""
    return Path(os.environ.get("ADAPTERPACK_KOHYA_DIR", "/tmp/kohya"))


def kohya_commit() -> str:
    """The sd-scripts commit the script came from (``COMMIT`` file beside it), or 'unknown'."""
    p = kohya_dir() / "COMMIT"
    return p.read_text().strip() if p.is_file() else "unknown"


def extract_kohya(git_dir: Path) -> None:
    """Copy ``networks/resize_lora.py`` at HEAD of a sd-scripts git dir to :func:`kohya_dir` (outside the repo)."""
    dest = kohya_dir()
    if dest.resolve().is_relative_to(REPO):
        raise SystemExit(f"{dest} is inside the repository; kohya's code must stay outside it")
    (dest / "networks").mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(git_dir)]
    text = subprocess.run([*git, "show", "HEAD:networks/resize_lora.py"], check=True, capture_output=True).stdout
    (dest / KOHYA_SCRIPT).write_bytes(text)
    head = subprocess.run([*git, "log", "-1", "--format=%H %cs"], check=True, capture_output=True, text=True)
    (dest / "COMMIT").write_text(head.stdout.strip() + "\n")


def _env(extra_path: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ONE_THREAD)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in extra_path)
    env["HF_HUB_OFFLINE"] = "1"
    # imports use cached bytecode, as installed packages do (pip compiles them); a shell's
    # PYTHONDONTWRITEBYTECODE would make every run recompile our modules
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_kohya(src: Path, dst: Path, *, new_rank: int, sv_fro: float | None = None) -> tuple[float, float, str]:
    """kohya's resize_lora.py on ``src`` → ``dst`` (fixed rank, or sv_fro dynamic with ``new_rank`` as cap)."""
    script = kohya_dir() / KOHYA_SCRIPT
    if not script.is_file():
        raise KohyaMissing(
            f"{script} not found: fetch kohya-ss/sd-scripts and copy networks/resize_lora.py there "
            "(or run with --kohya-git SD_SCRIPTS_GIT_DIR, or set ADAPTERPACK_KOHYA_DIR)"
        )
    cmd = [sys.executable, str(script), "--model", str(src), "--save_to", str(dst), "--new_rank", str(new_rank), "--device", "cpu"]
    if sv_fro is not None:
        cmd += ["--dynamic_method", "sv_fro", "--dynamic_param", repr(float(sv_fro))]
    return _timed_child(cmd, _env([SHIM, kohya_dir()]), kohya_dir())


def _timed_child(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, proc.stdout + proc.stderr


def run_ours(args: list[str]) -> tuple[float, float, str]:
    """``python -m adapterpack ARGS`` as its own process (one thread), from the repository."""
    return _timed_child([sys.executable, "-m", "adapterpack", *args], _env([REPO]), REPO)


# --- inputs ------------------------------------------------------------------------------------------


def real_input(work: Path) -> Path:
    """The real r=64 fixture as a kohya file (alpha per module, so kohya sees the true scale)."""
    from adapterpack.ops.convert import convert
    from tools.experiments.rerank_fixture import ensure_fixture

    dst = work / "real_r64.safetensors"
    convert(ensure_fixture(), dst, to="kohya", force=True)
    return dst


def synthetic_input(work: Path, n_modules: int, dim: int = 4096, rank: int = 64, seed: int = 0) -> Path:
    """SYNTHETIC: ``n_modules`` dim×dim rank-``rank`` LoRA modules, σ_i = exp(−i/12), fp32, alpha = rank."""
    from adapterpack.adapter import Adapter, Module
    from adapterpack.formats.kohya import write_kohya

    rng = np.random.default_rng(seed)
    sigma = np.exp(-np.arange(rank) / 12.0)
    ad = Adapter(name="default")
    for i in range(n_modules):
        u, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
        root = np.sqrt(sigma)
        a = (root[:, None] * v.T).astype(np.float32)  # [r, in]
        b = (u * root[None, :]).astype(np.float32)  # [out, r]
        name = f"model.layers.{i}.mlp.proj"
        ad.modules[name] = Module(name, "lora", (dim, dim), {"rank": rank, "alpha": float(rank)}, {"A": a, "B": b})
    dst = work / f"synthetic_{dim}_r{rank}.safetensors"
    write_kohya(ad, dst)
    return dst


# --- energy agreement --------------------------------------------------------------------------------


def energy_agreement(src: Path, rank: int, outputs: dict[str, Path]) -> tuple[float, dict[str, dict[str, float]]]:
    """Dense float64 check, one module at a time: the optimal retained fraction (``np.linalg.svd`` of ΔW)
    and, per output file, ``1 − ‖ΔW − ΔW'‖²/‖ΔW‖²``; returns the mean optimal fraction and per output the
    max/mean |achieved − optimal| and mean achieved fraction."""
    import adapterpack

    def dense(m: Any) -> np.ndarray:
        f = m.factors()
        return float(f.scale) * (f.B.astype(np.float64) @ f.A.astype(np.float64))

    opened = {n: adapterpack.open(p) for n, p in outputs.items()}
    errs: dict[str, list[float]] = {n: [] for n in outputs}
    kept: dict[str, list[float]] = {n: [] for n in outputs}
    optimal = []
    try:
        with adapterpack.open(src) as ad:
            for m in ad:
                d = dense(m)
                e = np.linalg.svd(d, compute_uv=False) ** 2
                total = float(e.sum())
                best = float(e[:rank].sum() / total) if total > 0 else 1.0
                optimal.append(best)
                for n, out in opened.items():
                    got = 1.0 - float(np.sum((d - dense(out.module(m.name))) ** 2)) / total if total > 0 else 1.0
                    errs[n].append(abs(got - best))
                    kept[n].append(got)
    finally:
        for out in opened.values():
            out.close()
    return float(np.mean(optimal)), {
        n: {"max_abs_err": max(errs[n]), "mean_abs_err": float(np.mean(errs[n])), "mean_retained": float(np.mean(kept[n]))}
        for n in outputs
    }


# --- the benchmark -----------------------------------------------------------------------------------


def bench_pair(label: str, src: Path, work: Path, rank: int, repeats: int, kohya: bool) -> dict[str, Any]:
    """kohya vs adapterpack (kohya output, and .apack svd output) vs plain convert, on one input file."""
    size = src.stat().st_size
    outs = {
        "adapterpack rerank --to kohya": work / f"{label}_ours.safetensors",
        "adapterpack rerank (.apack svd)": work / f"{label}_ours.apack",
        "adapterpack convert (read+write, no rerank)": work / f"{label}_copy.safetensors",
        "kohya resize_lora.py": work / f"{label}_kohya.safetensors",
    }
    cmds = {
        "adapterpack rerank --to kohya": lambda: run_ours(
            ["rerank", str(src), str(outs["adapterpack rerank --to kohya"]), "--rank", str(rank), "--to", "kohya", "--force"]),
        "adapterpack rerank (.apack svd)": lambda: run_ours(
            ["rerank", str(src), str(outs["adapterpack rerank (.apack svd)"]), "--rank", str(rank), "--force"]),
        "adapterpack convert (read+write, no rerank)": lambda: run_ours(
            ["convert", str(src), str(outs["adapterpack convert (read+write, no rerank)"]), "--to", "kohya", "--force"]),
    }
    if kohya:
        cmds["kohya resize_lora.py"] = lambda: run_kohya(src, outs["kohya resize_lora.py"], new_rank=rank)
    names = list(cmds)
    for n in names:  # one discarded warm-up run each: bytecode caches written, page cache warm
        cmds[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            w, c, _ = cmds[n]()
            wall[n].append(w)
            cpu[n].append(c)
            print(f"   {label}: {n}: {w:.2f} s wall, {c:.2f} s CPU", file=sys.stderr)
    optimal, energy = energy_agreement(src, rank, {n: outs[n] for n in names if n != "adapterpack convert (read+write, no rerank)"})
    return {
        "input": label,
        "input_bytes": size,
        "modules": _count_modules(src),
        "rank": rank,
        "optimal_mean_retained": optimal,
        "wall_s": {n: sorted(v) for n, v in wall.items()},
        "cpu_s": {n: sorted(v) for n, v in cpu.items()},
        "energy": energy,
        "output_bytes": {n: outs[n].stat().st_size for n in names},
    }


def _count_modules(src: Path) -> int:
    import adapterpack

    with adapterpack.open(src) as ad:
        return len(ad)


def inprocess_io(src: Path, work: Path, rank: int, repeats: int) -> dict[str, Any]:
    """In one process: rerank_file (→ kohya) vs convert (→ kohya) of the same file, interleaved (no interpreter start-up)."""
    from adapterpack.ops.convert import convert
    from adapterpack.ops.rerank import RerankPolicy, rerank_file
    from tools.bench.common import interleaved

    policy = RerankPolicy(rank=rank, encoding="lora")
    fns = {
        "rerank_file --rank": lambda: rerank_file(src, work / "ip_rerank.safetensors", policy, to="kohya", force=True),
        "convert (read+write)": lambda: convert(src, work / "ip_copy.safetensors", to="kohya", force=True),
    }
    t = interleaved(fns, repeats=repeats)
    return {**{n: sorted(v) for n, v in t.items()}, "input_bytes": src.stat().st_size}


def inprocess_child(src: Path, rank: int, repeats: int) -> dict[str, Any]:
    """:func:`inprocess_io` in a fresh one-thread process (BLAS threads fighting a loaded machine distort it)."""
    cmd = [sys.executable, "-m", "tools.bench.bench_rerank", "--inprocess", str(src)]
    cmd += ["--rank", str(rank), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=_env([REPO]), cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"in-process timing failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict[str, Any]], io: dict[str, dict[str, Any]], m: dict[str, Any], cmdline: str) -> str:
    """Markdown for BENCHMARKS.md."""
    lines = [f"`{cmdline}` — {machine_line(m)}; kohya-ss/sd-scripts {kohya_commit()}", ""]
    rows = []
    for res in results:
        k = "kohya resize_lora.py"
        for n, w in res["wall_s"].items():
            c = res["cpu_s"][n]
            e = res["energy"].get(n)
            ratio_w = median(res["wall_s"][k]) / median(w) if k in res["wall_s"] else None
            ratio_c = median(res["cpu_s"][k]) / median(c) if k in res["cpu_s"] else None
            rows.append([
                f"{res['input']} (r=64→{res['rank']}, {res['modules']} modules, {res['input_bytes'] / 1e6:.1f} MB)", n,
                f"{median(w):.2f}", f"{median(c):.2f}",
                f"{ratio_w:.1f}×" if ratio_w else "—", f"{ratio_c:.1f}×" if ratio_c else "—",
                f"{e['max_abs_err']:.1e}" if e else "—",
            ])
    if rows:
        lines.append(markdown_table(
            ["input", "process", "wall s (median)", "CPU s (median)", "kohya wall ÷ this", "kohya CPU ÷ this",
             "max |retained − optimal|"],
            rows, "llrrrrr"))
    lines.append("")
    for label, t in io.items():
        r, c = median(t["rerank_file --rank"]), median(t["convert (read+write)"])
        mb = t["input_bytes"] / 1e6
        lines.append(f"In-process, one thread, {label} ({mb:.1f} MB): rerank_file {r * 1e3:.0f} ms ({mb / r:.0f} MB/s) vs "
                     f"convert, a plain read+write of the same file, {c * 1e3:.0f} ms ({mb / c:.0f} MB/s): "
                     f"re-ranking runs at {c / r:.0%} of read+write speed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m tools.bench.bench_rerank", description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8, help="target rank for both tools (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds on the real adapter (default: %(default)s)")
    ap.add_argument("--synthetic-modules", type=int, default=2,
                    help="4096x4096 modules in the synthetic file (0: skip; default %(default)s)")
    ap.add_argument("--synthetic-repeats", type=int, default=1, help="rounds on the synthetic file (default: %(default)s)")
    ap.add_argument("--kohya-git", type=Path,
                    help="a kohya-ss/sd-scripts git dir to copy resize_lora.py from (to $ADAPTERPACK_KOHYA_DIR or /tmp/kohya)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the markdown table here")
    ap.add_argument("--inprocess", type=Path, help=argparse.SUPPRESS)  # child mode of inprocess_child
    ap.add_argument("--only-inprocess", action="store_true",
                    help="only rerank vs convert in-process (no kohya, no processes timed)")
    args = ap.parse_args(argv)
    if args.inprocess:
        with tempfile.TemporaryDirectory(prefix="bench_rerank_ip.") as tmp:
            print(json.dumps(inprocess_io(args.inprocess, Path(tmp), args.rank, args.repeats)))
        return 0
    if args.kohya_git:
        extract_kohya(args.kohya_git)
    kohya = (kohya_dir() / KOHYA_SCRIPT).is_file()
    if not kohya:
        print(f"kohya's resize_lora.py is not at {kohya_dir() / KOHYA_SCRIPT}: skipping the kohya side "
              "(fetch kohya-ss/sd-scripts and pass --kohya-git DIR)", file=sys.stderr)
    results, io = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_rerank.") as tmp:
        work = Path(tmp)
        real = real_input(work)
        if not args.only_inprocess:
            results.append(bench_pair("real SmolLM2 r=64", real, work, args.rank, args.repeats, kohya))
        io["real SmolLM2 r=64"] = inprocess_child(real, args.rank, max(args.repeats, 5))
        if args.synthetic_modules:
            syn = synthetic_input(work, args.synthetic_modules)
            if not args.only_inprocess:
                results.append(bench_pair("SYNTHETIC 4096² r=64", syn, work, args.rank, args.synthetic_repeats, kohya))
            io["SYNTHETIC 4096² r=64"] = inprocess_child(syn, args.rank, max(args.repeats, 5))
    m = machine()
    cmdline = "python -m tools.bench.bench_rerank " + " ".join(argv if argv is not None else sys.argv[1:])
    md = report(results, io, m, cmdline)
    doc = {"command": cmdline, "machine": m, "kohya_commit": kohya_commit() if kohya else None, "results": results,
           "inprocess_s": io}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
