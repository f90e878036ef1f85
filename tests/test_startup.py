"""Start-up stays light: what ``import adapterpack`` and the CLI import (sys.modules in a fresh process), and
the lazy command table against the commands. Timings are tools/bench/bench_startup.py's job, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("ml_dtypes", "scipy", "torch", "transformers", "matplotlib", "dask", "safetensors", "pandas")


def _loaded_after(code: str) -> set[str]:
    """Top-level packages in sys.modules of a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_import_adapterpack_imports_nothing_heavy() -> None:
    loaded = _loaded_after("import adapterpack")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert "numpy" not in loaded  # the public names load on first use


def test_the_public_names_still_import() -> None:
    loaded = _loaded_after(
        "import adapterpack\nfrom adapterpack import Adapter, AdapterpackError, Module, StoredTensor, open, save\n"
        "assert adapterpack.open is open and adapterpack.Adapter is Adapter\n"
        "assert set(adapterpack.__all__) <= set(dir(adapterpack))"
    )
    assert "numpy" in loaded and not loaded & set(HEAVY)


def test_unknown_attribute_is_an_attribute_error() -> None:
    import adapterpack

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapterpack.nope  # noqa: B018


def test_help_imports_no_command_and_no_numpy() -> None:
    loaded = _loaded_after(
        "import sys\nfrom adapterpack.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert not [m for m in sys.modules if m.endswith('_cmd')], 'a command module was imported'"
    )
    assert "numpy" not in loaded and not loaded & set(HEAVY)


@pytest.mark.parametrize("kind", ["peft", "apack-bf16"])
def test_inspect_imports_nothing_heavy(kind: str, tmp_path: Path) -> None:
    from adapterpack.examples import example_path
    from adapterpack.ops.convert import convert

    path = example_path()
    if kind == "apack-bf16":
        path = tmp_path / "bf16.apack"
        convert(example_path(), path, dtype="bf16")
    loaded = _loaded_after(
        "from adapterpack.cli import main\n"
        f"try:\n    main(['inspect', {str(path)!r}])\nexcept SystemExit as e:\n    assert e.code == 0\n"
    )
    assert not loaded & (set(HEAVY) - {"safetensors"}), loaded & set(HEAVY)


def test_command_table_matches_the_commands() -> None:
    """Every command in the lazy table loads, under its name, with the short help the table shows for it."""
    from adapterpack.cli import COMMANDS, main

    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name, (_, short_help) in COMMANDS.items():
        cmd = main.get_command(ctx, name)
        assert cmd is not None and cmd.name == name
        assert cmd.get_short_help_str(limit=1000) == short_help
    assert main.get_command(ctx, "nope") is None
