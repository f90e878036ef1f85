"""The bank commands' fuzzer (tools/fuzz_bank.py), a short seeded run: every damaged or edited bank is listed, extracted,
refit, inspected, converted and added to, or refused with a message and an exit status; an exception the CLI does not
turn into one fails this test."""

from __future__ import annotations

import json
import random
from pathlib import Path

from click.testing import CliRunner

from tests.apack_builders import split, write
from tools import fuzz_bank


def test_damaged_banks_are_used_or_refused_cleanly(tmp_path: Path) -> None:
    seed, files = fuzz_bank.seed_bank(tmp_path)
    rnd = random.Random(20261207)
    tally: dict[str, int] = {}
    for _ in range(60):
        for outcome in fuzz_bank.exercise(fuzz_bank.mutate(seed, rnd), tmp_path, files[2]):
            tally[outcome] = tally.get(outcome, 0) + 1
    assert all(tally.get(f"{c} ok", 0) >= 3 and tally.get(f"{c} exit 1", 0) >= 3 for c in ("list", "extract", "add")), tally



def test_a_member_error_metadata_that_is_not_ours_lists_as_unknown(tmp_path: Path) -> None:
    """Found by the fuzzer (``--n 600 --seed 31``): a member's ``bank.rel_error`` metadata that is not the JSON object the
    bank writer stores (metadata is free-form) ended ``bank list`` in a JSONDecodeError. Now its error shows as unknown."""
    seed, _ = fuzz_bank.seed_bank(tmp_path)
    parts = split(seed)
    assert parts.index["adapters"][1]["name"] == "b"
    for value in ["raw", "[1, 2]", '{"mean": "x", "max": null}', '{"mean": NaN}', ""]:
        edited = parts.copy()
        edited.index["adapters"][1]["metadata"]["bank.rel_error"] = value
        bank = write(tmp_path / "edited.apack", edited.build())
        result = CliRunner().invoke(fuzz_bank.cli, ["bank", "list", str(bank), "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        listed = {m["name"]: m for m in json.loads(result.output)["members"]}
        assert listed["b"]["rel_error_mean"] is None and listed["b"]["rel_error_max"] is None, value
        assert listed["a"]["rel_error_mean"] is not None
