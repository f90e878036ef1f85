"""Start-up: wall time of whole ``adapterpack`` processes against ``python -c "import numpy"``, same run.

Each command is a fresh subprocess (``subprocess.run``, output discarded) timed from start to
exit; all commands of all checkouts run round-robin, ``--repeats`` rounds after one warm-up round
(which also writes the bytecode caches), and the table gives min and median seconds and their
ratios to the numpy baseline of the same run.

The CLI runs as ``python -m adapterpack ARGS`` with ``PYTHONPATH=<checkout>`` from an empty
working directory, so each checkout's own code runs (not the installed console script, which
may point elsewhere). ``--repo`` may be repeated to measure several checkouts in one run, e.g.
an untouched copy of main beside this worktree:

    mkdir -p /tmp/base && git archive main | tar -x -C /tmp/base
    python -m tools.bench.bench_startup --repo /tmp/base --repo .      # 20 rounds

Targets (issue 13): ``adapterpack --help`` ≤ 2× and ``adapterpack inspect ADAPTER`` ≤ 3× the
numpy baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import common

#: Ratio to ``import numpy`` each measured command must stay within (issue 13).
TARGETS = {"adapterpack --help": 2.0, "adapterpack inspect PEFT": 3.0, "adapterpack inspect .apack": 3.0}


def run_once(argv: list[str], env: dict[str, str], cwd: str) -> None:
    """One subprocess from start to exit (the caller times it); refuses a failing command."""
    r = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")


def make_apack(dst: Path) -> Path:
    """The bundled example as a bfloat16 byteplanes .apack (written by this checkout's code)."""
    from adapterpack.ops.convert import convert

    convert(common.example_dir(), dst, dtype="bf16", force=True)
    return dst


def bf16_casts(n: int, repeats: int) -> str:
    """ml_dtypes' casts against adapterpack.dtypes' numpy bit operations on ``n`` float32 values (ms, min of
    interleaved runs): what keeping ml_dtypes for materialized bfloat16 arrays costs or saves once it is loaded."""
    import ml_dtypes
    import numpy as np

    from adapterpack import dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    bits = x.astype(bf16).view(np.uint16)
    t = common.interleaved(
        {
            "round float32 → bf16: ml_dtypes astype": lambda: x.astype(bf16),
            "round float32 → bf16: dtypes.bf16_from_float32": lambda: dtypes.bf16_from_float32(x),
            "widen bf16 → float32: ml_dtypes astype": lambda: bits.view(bf16).astype(np.float32),
            "widen bf16 → float32: dtypes.bf16_to_float32": lambda: dtypes.bf16_to_float32(bits),
        },
        repeats=repeats,
    )
    rows = [[k, f"{min(v) * 1e3:.1f}"] for k, v in t.items()]
    return common.markdown_table([f"cast of {n:,} values", "min ms"], rows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", action="append", type=Path, help="checkout to measure (repeatable; default: this one)")
    ap.add_argument("--repeats", type=int, default=20, help="rounds after the warm-up round (default 20)")
    ap.add_argument("--cast-values", type=int, default=8_000_000, help="bf16 cast comparison size (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the timings to this file")
    args = ap.parse_args(argv)
    repos = [p.resolve() for p in (args.repo or [common.REPO])]
    labels = [str(p) for p in repos]
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        apack = make_apack(Path(tmp) / "example-bf16.apack")
        example = str(common.example_dir())
        base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        cmds: dict[tuple[str, str], tuple[list[str], dict[str, str]]] = {
            ("", "python -c pass"): ([py, "-c", "pass"], base_env),
            ("", "python -c 'import numpy'"): ([py, "-c", "import numpy"], base_env),
            ("", "python -c 'import numpy, ml_dtypes'"): ([py, "-c", "import numpy, ml_dtypes"], base_env),
        }
        for repo, label in zip(repos, labels, strict=True):
            if not (repo / "adapterpack" / "__init__.py").is_file():
                raise SystemExit(f"{repo}: no adapterpack package there")
            env = base_env | {"PYTHONPATH": str(repo)}
            cli = [py, "-m", "adapterpack"]
            cmds[(label, "python -c 'import adapterpack'")] = ([py, "-c", "import adapterpack"], env)
            cmds[(label, "adapterpack --help")] = ([*cli, "--help"], env)
            cmds[(label, "adapterpack inspect PEFT")] = ([*cli, "inspect", example], env)
            cmds[(label, "adapterpack inspect .apack")] = ([*cli, "inspect", str(apack)], env)
        # every checkout must really run its own code
        for repo, label in zip(repos, labels, strict=True):
            env = cmds[(label, "adapterpack --help")][1]
            where = subprocess.run(
                [py, "-c", "import adapterpack; print(adapterpack.__file__)"],
                env=env,
                cwd=tmp,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            if not Path(where).resolve().is_relative_to(repo):
                raise SystemExit(f"{label}: imported adapterpack from {where}, not from the checkout")
        fns = {key: (lambda a=argv_env: run_once(a[0], a[1], tmp)) for key, argv_env in cmds.items()}
        per = common.interleaved(fns, repeats=args.repeats)
    base_min = min(per[("", "python -c 'import numpy'")])
    base_med = common.median(per[("", "python -c 'import numpy'")])
    rows, verdicts = [], []
    for (label, what), ts in per.items():
        lo, med = min(ts), common.median(ts)
        target = TARGETS.get(what) if label else None
        rows.append(
            [
                label or "(baseline)",
                what,
                f"{lo:.3f}",
                f"{med:.3f}",
                f"{lo / base_min:.2f}×",
                f"{med / base_med:.2f}×",
                f"≤ {target:g}×" if target else "",
            ]
        )
        if target:
            verdicts.append(
                f"{label}: {what} {lo / base_min:.2f}× (median {med / base_med:.2f}×), target ≤ {target:g}×: "
                + ("met" if med / base_med <= target else "NOT met")
            )
    casts = bf16_casts(args.cast_values, 9) if args.cast_values else ""
    headers = ["checkout", "command", "min s", "median s", "min ratio", "median ratio", "target"]
    print(common.markdown_table(headers, rows, "llrrrrl"))
    print()
    print("\n".join(verdicts))
    if casts:
        print("\n" + casts)
    print(f"\n{args.repeats} rounds, ratios to python -c 'import numpy' of the same run; {common.machine_line(common.machine())}")
    if args.json:
        common.write_json(args.json, {f"{label}|{what}": ts for (label, what), ts in per.items()})


if __name__ == "__main__":
    main()
