"""Re-measure issue 12's hostile inputs against the limits of spec §7: time, peak RSS and outcome of each.

Builds, in ``--work`` (default: a temporary folder, removed afterwards):

- ``redos``: the bundled example adapter with ``rank_pattern`` / ``alpha_pattern`` key ``([a-z_.0-9]+)+X``;
- ``nola-bomb.apack``: one rank-1 nola record on a [2^29-1, 2^29-1] weight (a few KiB);
- ``empty-1100000.safetensors`` / ``empty-200000.safetensors``: empty float32 tensors in kohya pairs
  (``N.lora_down.weight`` [1, 0], ``N.lora_up.weight`` [0, 1]), 84 MB and 15 MB;

then runs the CLI on each under ``/usr/bin/time -v`` with a timeout (``--timeout``, default 120 s),
from ``--repo`` (default: this checkout), so the same command measures another checkout, e.g. main.
Run from the repository root::

    python -m tools.hostile.limits_bombs
    python -m tools.hostile.limits_bombs --repo /work/main --timeout 60
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "adapterpack" / "examples" / "smollm2-pydoc-lora"
REDOS_KEY = r"([a-z_.0-9]+)+X"
BIG = 2**29 - 1

#: ΔW of every module of a file, in a child of ``--repo``: what ``delta()`` on the size bomb does.
DELTA = "import sys, adapterpack; [m.delta() for m in adapterpack.open(sys.argv[1])]; print('delta ok')"


def build_redos(work: Path) -> Path:
    folder = work / "redos"
    shutil.copytree(EXAMPLE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"], cfg["alpha_pattern"] = {REDOS_KEY: 4}, {REDOS_KEY: 3.0}
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def build_nola_bomb(work: Path) -> Path:
    """A valid small nola record written by this checkout, its base_shape then set to [2^29-1, 2^29-1] in the index."""
    import numpy as np

    import adapterpack
    from adapterpack.adapter import Adapter, Module
    from tests.apack_builders import split

    params = {"generator": "philox4x32-10", "generator_version": 1, "seed": 1, "stream": 0, "rank": 1, "k_A": 64, "k_B": 64}
    rng = np.random.default_rng(0)
    tensors = {"alpha": rng.standard_normal(64).astype(np.float32), "beta": rng.standard_normal(64).astype(np.float32)}
    module = Module("model.layers.0.self_attn.q_proj", "nola", (64, 64), params | {"scale": 1.0}, tensors)
    src = work / "nola-src.apack"
    adapterpack.save(Adapter(modules={module.name: module}), src, codec="raw")
    parts = split(src.read_bytes())
    parts.index["adapters"][0]["modules"][0]["base_shape"] = [BIG, BIG]
    path = work / "nola-bomb.apack"
    path.write_bytes(parts.build(minor=parts.minor))
    return path


def build_empty_tensors(work: Path, count: int) -> Path:
    """``count`` empty float32 tensors: kohya pairs ``N.lora_down.weight`` [1, 0] and ``N.lora_up.weight`` [0, 1]."""
    entry = '"{0}.lora_{1}.weight":{{"dtype":"F32","shape":{2},"data_offsets":[0,0]}}'
    pairs = (entry.format(i // 2, *(("down", [1, 0]), ("up", [0, 1]))[i % 2]).replace(" ", "") for i in range(count))
    header = ("{" + ",".join(pairs) + "}").encode()
    path = work / f"empty-{count}.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def measure(args: list[str], repo: Path, timeout: float) -> dict[str, object]:
    """Run ``python args...`` from ``repo`` under /usr/bin/time -v: exit status, seconds, peak RSS, last stderr line."""
    start = time.perf_counter()
    # a process group of its own, so that a timeout kills the measured Python too, not only /usr/bin/time
    cmd = ["/usr/bin/time", "-v", sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {
            "exit": "timeout",
            "seconds": round(time.perf_counter() - start, 1),
            "max_rss_mb": None,
            "said": f"killed after {timeout} s",
        }
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("\t", "Command exited"))]
    said = (lines[-1] if lines else res.stdout.strip().splitlines()[-1:] or [""])[:200]
    return {
        "exit": res.returncode,
        "seconds": round(time.perf_counter() - start, 2),
        "max_rss_mb": round(int(rss[1]) / 1024, 1) if rss else None,
        "said": said if res.returncode else (res.stdout.strip().splitlines() or [""])[-1][:200],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose adapterpack runs the commands")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per command")
    parser.add_argument("--work", type=Path, help="where to build the inputs (kept); default a temporary folder")
    parser.add_argument("--only", nargs="*", help="case names to run (redos, nola, empty)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="limits-bombs-"))
    work.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, list[str]]] = []
    only = set(args.only or ["redos", "nola", "empty"])
    if "redos" in only:
        folder = build_redos(work)
        cases += [
            ("redos inspect", ["-m", "adapterpack", "inspect", str(folder)]),
            ("redos convert", ["-m", "adapterpack", "convert", str(folder), str(work / "redos.apack"), "--force"]),
            ("redos check", ["-m", "adapterpack", "check", str(folder), "--target", "peft"]),
            ("redos audit", ["-m", "adapterpack", "audit", str(folder)]),
        ]
    if "nola" in only:
        bomb = build_nola_bomb(work)
        print(f"nola bomb: {bomb.stat().st_size} bytes")
        cases += [
            ("nola-bomb verify", ["-m", "adapterpack", "verify", str(bomb)]),
            ("nola-bomb check", ["-m", "adapterpack", "check", str(bomb), "--target", "peft"]),
            ("nola-bomb delta()", ["-c", DELTA, str(bomb)]),
        ]
    if "empty" in only:
        for count in (1_100_000, 200_000):
            path = build_empty_tensors(work, count)
            print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB")
            cases.append((f"empty-{count} inspect", ["-m", "adapterpack", "inspect", str(path)]))
    try:
        for name, cmd in cases:
            row = measure(cmd, args.repo, args.timeout)
            print(
                f"{name:24s} exit {row['exit']!s:8s} {row['seconds']:>7} s  {row['max_rss_mb']!s:>8} MB  {row['said']}", flush=True
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
