"""Why the exact re-rank is fast and still exact: factor conditioning, the fast route, page faults.

On the real r=64 SmolLM2 adapter (:mod:`tools.experiments.rerank_fixture`):

1. κ(B) and κ(Aᵀ) of every module (``np.linalg.cond``): the fast route ``X·R⁻¹·c`` of
   :class:`adapterpack.linalg.lowrank._ThinQ` loses orthogonality by about ε·κ;
2. for ``vectors(8)`` of every module: the worst ``‖UᵀU − I‖_max`` / ``‖VVᵀ − I‖_max`` and how many
   factors fell back to the Householder reflectors;
3. a child process re-ranking the file to rank 8 (kohya output) through ``rerank_file``, without and
   with :func:`adapterpack.cli.process.keep_freed_memory` (what the CLI calls first): minor page
   faults, system and user CPU seconds (median of ``--repeats``).

    OMP_NUM_THREADS=1 python -m tools.bench.bench_lowrank --repeats 3
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tools.bench.common import REPO, machine, machine_line, median

CHILD = """
import sys
from adapterpack.cli.process import keep_freed_memory
from adapterpack.ops.rerank import RerankPolicy, rerank_file
if sys.argv[3] == "1":
    assert keep_freed_memory()
rerank_file(sys.argv[1], sys.argv[2], RerankPolicy(rank=8), to="kohya", force=True)
"""


def conditioning(src: Path) -> dict[str, float]:
    """κ of the factors, the worst orthogonality of the kept vectors and the fallbacks taken."""
    import adapterpack
    from adapterpack.linalg import lowrank

    fallbacks = []
    orig = lowrank._ThinQ._reflected

    def counted(self: lowrank._ThinQ, c: np.ndarray) -> np.ndarray:
        fallbacks.append(1)
        return orig(self, c)

    lowrank._ThinQ._reflected = counted  # type: ignore[method-assign]
    kb, ka, worst = [], [], 0.0
    try:
        with adapterpack.open(src) as ad:
            for m in ad:
                f = m.factors()
                kb.append(float(np.linalg.cond(f.B.astype(np.float64))))
                ka.append(float(np.linalg.cond(f.A.astype(np.float64).T)))
                u, vt = lowrank.factors_svd(f.A, f.B, f.scale).vectors(8)
                ortho = (np.abs(u.T @ u - np.eye(u.shape[1])).max(), np.abs(vt @ vt.T - np.eye(vt.shape[0])).max())
                worst = max(worst, *map(float, ortho))
    finally:
        lowrank._ThinQ._reflected = orig  # type: ignore[method-assign]
    return {"modules": len(kb), "kappa_B_max": max(kb), "kappa_B_median": float(np.median(kb)), "kappa_At_max": max(ka),
            "worst_orthogonality": worst, "fallbacks": len(fallbacks)}  # fmt: skip


def faults(src: Path, dst: Path, keep: bool) -> tuple[int, float, float]:
    """Minor faults, system and user seconds of one child re-rank."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), "1" if keep else "0"], check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from tools.bench.bench_rerank import real_input

    work = Path(tempfile.mkdtemp(prefix="bench_lowrank_"))
    src = real_input(work)
    c = conditioning(src)
    print(f"`python -m tools.bench.bench_lowrank --repeats {args.repeats}` — {machine_line(machine())}")
    print(f"\n{c['modules']} modules: κ(B) max {c['kappa_B_max']:.1f} (median {c['kappa_B_median']:.1f}), κ(Aᵀ) max "
          f"{c['kappa_At_max']:.2f}; vectors(8): worst |orthogonality − I| {c['worst_orthogonality']:.1e}, "
          f"{c['fallbacks']} of {2 * c['modules']} factors fell back to the reflectors\n")  # fmt: skip
    print("| child re-rank (r=64 → 8, kohya out) | minor page faults | system s | user s |")
    print("|---|---:|---:|---:|")
    for keep in (False, True):
        runs = [faults(src, work / "out.safetensors", keep) for _ in range(args.repeats)]
        label = "keep_freed_memory() (what the CLI does)" if keep else "glibc defaults"
        flt, sys_s, user_s = (median([r[i] for r in runs]) for i in range(3))
        print(f"| {label} | {flt:,.0f} | {sys_s:.2f} | {user_s:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
