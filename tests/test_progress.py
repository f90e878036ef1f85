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
