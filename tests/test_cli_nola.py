"""``adapterpack convert --to nola``: fitted records, honest errors, option rules."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import adapterpack
from adapterpack.cli import main
from adapterpack.examples import example_path

EXAMPLE = example_path()


def test_convert_to_nola_reports_the_exact_error(tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["convert", str(EXAMPLE), str(tmp_path / "n.apack"), "--to", "nola", "--k", "96"])
    assert r.exit_code == 0, r.output
    m = re.search(r"error of ΔW mean ([\d.e-]+), worst ([\d.e-]+) \(([^)]+)\)", r.output)
    assert m, r.output
    worst_module = m.group(3)
    fitted = adapterpack.open(tmp_path / "n.apack")
    orig = adapterpack.open(EXAMPLE)
    assert {x.encoding for x in fitted} == {"nola"} and fitted.module(worst_module).params["k_A"] == 96
    errors = []
    for name in orig.modules:
        want = orig.delta(name).astype(np.float64)
        errors.append(np.linalg.norm(fitted.delta(name).astype(np.float64) - want) / np.linalg.norm(want))
    # the note prints 3 significant digits of the exact errors
    assert abs(max(errors) - float(m.group(2))) <= 5e-3 * max(errors)
    assert abs(np.mean(errors) - float(m.group(1))) <= 5e-3 * np.mean(errors)
    assert 0 < min(errors) and max(errors) < 1.0  # some fit, none perfect: a random basis of 96 per factor


def test_nola_option_rules(tmp_path: Path) -> None:
    run = CliRunner().invoke
    missing = str(tmp_path / "nope")  # click refuses before anything is read
    both = ["--to", "nola", "--k", "8", "--target-error", "0.5"]
    for args in (["--to", "nola"], both, ["--k", "8"], ["--to", "peft", "--k", "8"]):
        r = run(main, ["convert", missing, str(tmp_path / "o.apack"), *args])
        assert r.exit_code == 2, (args, r.output)
