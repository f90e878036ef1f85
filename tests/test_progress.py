"""adapterpack.progress: stderr only, shown on a terminal or when asked, never in --json output (issue 16 item 5)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterpack import progress
from adapterpack.cli import main
from adapterpack.examples import example_path

EXAMPLE = example_path()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_task_lines_when_on() -> None:
    buf = io.StringIO()
    with progress.mode("on", stream=buf, interval=0), progress.task("fitting", total=4, unit="modules") as t:
        for i in range(4):
            t.advance(note=f"module {i}")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("fitting: 1/4 modules (25%)") and lines[0].endswith("module 0")
    assert "left" in lines[0]
    assert lines[-1].startswith("fitting: 4/4 modules (100%)") and ", done" in lines[-1]
    assert len(lines) == 5  # four updates and the closing line


def test_off_and_auto_without_terminal_write_nothing() -> None:
    for m in ("off", "auto"):
        buf = io.StringIO()
        with progress.mode(m, stream=buf, interval=0), progress.task("x", total=3) as t:
            t.advance(3)
        assert buf.getvalue() == ""


def test_auto_on_terminal_redraws_one_line() -> None:
    buf = _Tty()
    with progress.mode("auto", stream=buf, interval=0), progress.task("bank", total=2, unit="iterations") as t:
        t.advance()
        t.advance()
    text = buf.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") == 3


def test_escapes_names_from_files() -> None:
    buf = io.StringIO()
    with progress.mode("on", stream=buf, interval=0), progress.task("x") as t:
        t.note("evil\x1b[2Jname")
    assert "\x1b" not in buf.getvalue()


def test_failed_task_keeps_the_error() -> None:
    buf = io.StringIO()
    with pytest.raises(RuntimeError), progress.mode("on", stream=buf, interval=0), progress.task("x", total=2) as t:
        t.advance()
        raise RuntimeError("boom")
    assert "done" not in buf.getvalue()


def test_track_counts_items() -> None:
    buf = io.StringIO()
    with progress.mode("on", stream=buf, interval=0):
        assert list(progress.track(range(3), "items")) == [0, 1, 2]
    assert buf.getvalue().splitlines()[-1].startswith("items: 3/3 (100%)")


def _audit(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapterpack", "audit", str(EXAMPLE), "--jobs", "1", "--measure", "zstd", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_cli_progress_only_when_asked_and_never_on_stdout() -> None:
    plain = _audit([])
    assert plain.returncode == 0 and "auditing" not in plain.stderr  # stderr is not a terminal
    asked = _audit(["--progress"])
    assert asked.returncode == 0 and "auditing: 1/1 inputs (100%)" in asked.stderr
    assert "auditing" not in asked.stdout
    as_json = _audit(["--json", "--progress"])
    json.loads(as_json.stdout)  # stdout is one JSON document, progress or not
    assert "auditing" in as_json.stderr


def test_cli_json_turns_the_default_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERPACK_PROGRESS", "1")
    res = CliRunner().invoke(main, ["audit", str(EXAMPLE), "--jobs", "1", "--measure", "zstd", "--json"])
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)
    assert "auditing" not in res.stderr
    res = CliRunner().invoke(main, ["audit", str(EXAMPLE), "--jobs", "1", "--measure", "zstd"])
    assert "auditing: 1/1 inputs" in res.stderr


# --- uses: NOLA fits (bounded), rerank, bank build ---------------------------------------------------------


def test_nola_target_error_stops_at_the_time_bound() -> None:
    from adapterpack.encodings.nola_fit import fit_adapter
    from tests.factories import qv_adapter

    ad = qv_adapter(0, layers=2, rank=4, in_features=32, q_out=32, v_out=16, b_scale=0.05)
    _, fits = fit_adapter(ad, target_error=1e-9, max_seconds=0)  # unreachable target, no time: one k per module
    assert all(f.stopped and f.module.params["k_A"] == 16 for f in fits.values())
    _, fits = fit_adapter(ad, target_error=1e-9, k_max=32)
    assert not any(f.stopped for f in fits.values()) and {f.module.params["k_A"] for f in fits.values()} == {32}


def test_nola_solve_leaks_no_linalg_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """scipy warns (LinAlgWarning) when a Gram's condition passes 1/eps, which the ridge allows from k ≈ 4500 on
    (a 29-minute fit leaked it): the warning is caught and the system solved by least squares instead."""
    import warnings

    import numpy as np
    import scipy.linalg

    from adapterpack.encodings import nola_fit

    solve = scipy.linalg.solve

    def warning_solve(*args: object, **kw: object) -> object:
        warnings.warn("Ill-conditioned matrix (rcond=1e-17): result may not be accurate.", scipy.linalg.LinAlgWarning, stacklevel=2)
        return solve(*args, **kw)

    monkeypatch.setattr(nola_fit.scipy.linalg, "solve", warning_solve)
    v = np.linspace(1, 2, 6)
    gram = np.outer(v, v) + np.diag(np.linspace(1, 2, 6))
    rhs = gram @ np.arange(6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = nola_fit._solve(gram, rhs)
    assert np.allclose(x, np.arange(6.0), rtol=1e-9)


def test_cli_nola_bound_note_and_progress(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        ["convert", str(EXAMPLE), str(tmp_path / "n.apack"), "--to", "nola", "--target-error", "0.01", "--max-seconds", "0",
         "--progress", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert any("stopped by the time bound (0 s): 120 modules keep the best error reached" in n for n in doc["notes"])
    assert "nola fit: 120/120 modules (100%)" in res.stderr and "writing" in res.stderr


def test_cli_rerank_and_bank_progress(tmp_path: Path) -> None:
    r4 = tmp_path / "r4.apack"
    res = CliRunner().invoke(main, ["rerank", str(EXAMPLE), str(r4), "--rank", "4", "--progress"])
    assert res.exit_code == 0 and "re-ranking: 120/120 modules (100%)" in res.stderr
    assert "re-ranking" not in res.stdout
    res = CliRunner().invoke(main, ["bank", "build", str(tmp_path / "b.apack"), str(EXAMPLE), str(r4), "--rank", "2",
                                    "--max-iter", "3", "--progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "bank fit: " in res.stderr and "iterations" in res.stderr
