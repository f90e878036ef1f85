"""Review of rerank/lower at their edges, on the bundled real adapter (spectra matter here)."""

from __future__ import annotations

import numpy as np
import pytest

import adapterpack
from adapterpack.examples import example_path
from adapterpack.ops.rerank import RerankPolicy, rerank


def test_rank0_lora_output_reports_the_rank1_zero_factors_it_writes() -> None:
    """LoRA has no rank 0: a module cut to rank 0 is written as rank-1 zero factors, but the report said stored rank 0
    and 0 bytes for it (a report whose bytes are meant to be exact)."""
    with adapterpack.open(example_path()) as ad:
        for policy in (RerankPolicy(rank=0, encoding="lora"), RerankPolicy(energy=0.5, max_rank=0, encoding="lora")):
            out, report = rerank(ad, policy)
            for p in report.modules:
                m = out.module(p.name)
                assert m.encoding == "lora" and m.params["rank"] == 1 and not np.any(m.delta())
                assert p.new_rank == 0 and p.stored_rank == 1
                assert p.bytes_after == sum(np.asarray(m.array(s)).nbytes for s in ("A", "B"))
            assert report.total["bytes_after"] == sum(m.decoded_bytes for m in out)


def test_a_budget_between_the_compressed_and_raw_floor_is_used() -> None:
    """With pco the all-rank-1 file of the bundled adapter is 397,171 B, its factors 461,280 B uncompressed. A budget
    between the two (461,000 B) returned the rank-1 file and left 14% of the budget unused: the allocation started
    below the floor and never grew into the room compression left. Now it does, and still fits."""
    from adapterpack.ops.budget import apack_file_size

    with adapterpack.open(example_path()) as ad:
        out, report = rerank(ad, RerankPolicy(budget=461_000), file_size=lambda a: apack_file_size([a], "pco"))
        assert 440_000 < report.file_bytes <= 461_000
        assert apack_file_size([out], "pco") == report.file_bytes
        assert max(p.new_rank for p in report.modules) >= 2


def test_round_to_outside_the_rank_limits_is_refused() -> None:
    """``--max-rank 4 --round-to 8,16`` wrote rank 8 everywhere (above the maximum it was given), ``--min-rank 6
    --round-to 2,4 --round-mode down`` rank 4: contradictory options are refused (OptionError, a usage error)."""
    from click.testing import CliRunner

    from adapterpack.cli import main
    from adapterpack.errors import OptionError

    bad = (RerankPolicy(rank=3, max_rank=4, round_to=(8, 16)), RerankPolicy(rank=3, min_rank=6, round_to=(2, 4), round_mode="down"),
           RerankPolicy(budget_ratio=0.5, max_rank=4, round_to=(8, 16)))
    with adapterpack.open(example_path()) as ad:
        for policy in bad:
            with pytest.raises(OptionError, match="round_to"):
                rerank(ad, policy)
        _, report = rerank(ad, RerankPolicy(rank=3, max_rank=8, round_to=(4, 8, 16)))
        assert {p.new_rank for p in report.modules} == {4}
        # rounding stays within the limits: up from 8 under max 8 is 4, not 16 (lora output padded to 16 before)
        _, report = rerank(ad, RerankPolicy(rank=8, max_rank=8, round_to=(4, 16), encoding="lora"))
        assert {p.stored_rank for p in report.modules} == {4}
        _, report = rerank(ad, RerankPolicy(rank=1, min_rank=3, round_to=(2, 4), round_mode="down"))
        assert {p.new_rank for p in report.modules} == {4}
    args = ["rerank", str(example_path()), "--dry-run", "--rank", "3", "--max-rank", "4", "--round-to", "8,16"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "round_to" in r.output
