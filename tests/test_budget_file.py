"""Whole-file budgets: `rerank --budget` (and `compress`) write files that fit, index and padding included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterpack.cli import main
from adapterpack.examples import example_path
from adapterpack.ops.report import footprint
from adapterpack.ops.rerank import RerankPolicy, rerank_file

EXAMPLE = example_path()
BUDGET = 600_000  # the bundled adapter (120 modules, fp32) holds 3.7 MB of factors; rank 1 everywhere is 461 KB


@pytest.mark.parametrize(
    ("name", "to", "codec"), [("r.apack", None, "raw"), ("r.apack", None, "byteplanes"), ("peft", "peft", None)]
)
def test_rerank_budget_is_the_whole_file(tmp_path: Path, name: str, to: str | None, codec: str | None) -> None:
    dst = tmp_path / name
    res = rerank_file(EXAMPLE, dst, RerankPolicy(budget=BUDGET, encoding="svd" if to is None else "lora"), to=to,
                      codec=codec or "byteplanes")  # fmt: skip
    size = footprint(dst)
    assert size == res.dst_bytes == res.report.file_bytes <= BUDGET
    # the budget is used: the factors got all but the file's own overhead (the report says how much that was)
    assert res.report.total["bytes_after"] <= res.report.allocation_budget
    assert BUDGET - size < 0.1 * BUDGET
    assert any("whole file" in n for n in res.report.notes)


def test_rerank_cli_budget_ratio_and_dry_run_fit_the_file(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["rerank", str(EXAMPLE), str(tmp_path / "o.apack"), "--budget-ratio", "0.2", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert footprint(tmp_path / "o.apack") == doc["dst_bytes"] == doc["file_bytes"] <= doc["budget"]
    assert doc["budget"] == int(0.2 * doc["total"]["bytes_before"])
    r = CliRunner().invoke(main, ["rerank", str(EXAMPLE), "--budget", "600KB", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["file_bytes"] <= 600_000
