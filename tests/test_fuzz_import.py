"""The importers' fuzzer (tools/fuzz_import.py), a short seeded run: every edited PEFT folder, kohya, GGUF and diffusers
file is either read, saved and converted, or refused with an adapterpack error; nothing else escapes (a numpy, json or safetensors
traceback fails this test). Every sixth input also goes through inspect, audit, check, rerank and compress."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from tools import fuzz_import


@pytest.mark.parametrize("kind", ["peft", "kohya", "gguf", "diffusers"])
def test_edited_inputs_are_read_or_refused_with_an_adapterpack_error(tmp_path: Path, kind: str) -> None:
    seed = fuzz_import.seeds(tmp_path)[kind]
    rnd = random.Random(20261207)
    outcomes: dict[str, int] = {}
    cli: dict[str, int] = {}
    for i in range(120):
        target = tmp_path / (f"case{i}" if kind == "peft" else f"case{i}.gguf" if kind == "gguf" else f"case{i}.safetensors")
        out = tmp_path / f"out{i}"
        out.mkdir()
        fuzz_import.mutate(kind, seed, target, rnd)
        outcome = fuzz_import.exercise(target, out)  # raises whatever is not an AdapterpackError
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if i % 6 == 0:  # the CLI commands too: an exception they do not turn into a message escapes here
            for result in fuzz_import.exercise_cli(target, out):
                cli[result] = cli.get(result, 0) + 1
        shutil.rmtree(out)
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    # the run reaches both ends: inputs that load and convert, and several kinds of refusal
    assert outcomes.get("ok", 0) >= 5, outcomes
    assert len(set(outcomes) - {"ok"}) >= 2, outcomes
    assert cli.get("ok", 0) >= 5 and cli.get("exit 1", 0) >= 5, cli


def test_merge_diff_and_check_with_edited_adapters_or_base_models_refuse_cleanly(tmp_path: Path) -> None:
    """merge, diff and check --base with an edited PEFT folder or an edited or damaged base model: each ends with a
    message and an exit status, never an unhandled exception."""
    seed = fuzz_import.seeds(tmp_path)["peft"]
    model = fuzz_import.base_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rnd = random.Random(7)
    tally: dict[str, int] = {}
    for _ in range(60):
        adapter, base = fuzz_import.mutate_merge(seed, model, tmp_path, rnd)
        for outcome in fuzz_import.exercise_merge(adapter, base, seed, out):
            tally[outcome] = tally.get(outcome, 0) + 1
    assert all(tally.get(f"{c} ok", 0) >= 3 and tally.get(f"{c} exit 1", 0) >= 3 for c in ("merge", "check")), tally
