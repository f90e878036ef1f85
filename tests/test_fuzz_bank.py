"""The bank commands' fuzzer (tools/fuzz_bank.py), a short seeded run: every damaged or edited bank is listed, extracted,
refit, inspected, converted and added to, or refused with a message and an exit status; an exception the CLI does not
turn into one fails this test."""

from __future__ import annotations

import random
from pathlib import Path

from tools import fuzz_bank


def test_damaged_banks_are_used_or_refused_cleanly(tmp_path: Path) -> None:
    seed, files = fuzz_bank.seed_bank(tmp_path)
    rnd = random.Random(20261207)
    tally: dict[str, int] = {}
    for _ in range(60):
        for outcome in fuzz_bank.exercise(fuzz_bank.mutate(seed, rnd), tmp_path, files[2]):
            tally[outcome] = tally.get(outcome, 0) + 1
    assert all(tally.get(f"{c} ok", 0) >= 3 and tally.get(f"{c} exit 1", 0) >= 3 for c in ("list", "extract", "add")), tally
