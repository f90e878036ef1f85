"""``adapterpack verify FILE``: decode every blob, check every checksum and padding byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.container.reader import ApackReader
from adapterpack.errors import UnrecognizedInputError


def verify_lines(r: dict[str, Any]) -> list[str]:
    """Summary of a VerifyReport (as_dict form): ok, or each problem on its own line."""
    if r["ok"]:
        lines = [f"{r['path']}: ok (format {r['version']}, {r['blobs']} blobs, {out.size(r['bytes_checked'])} checked)"]
    else:
        n = len(r["problems"])
        lines = [f"{r['path']}: {n} problem{'s' if n != 1 else ''}", *(f"  {p}" for p in r["problems"])]
    return lines + [f"  skipped: {s}" for s in r["skipped"]]


@click.command("verify", short_help="Check every checksum of an .apack file.")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, file: Path, as_json: bool) -> None:
    """Check an .apack FILE end to end; exit status 0 when sound, 1 otherwise."""
    if not file.exists():  # the error (and wording) every other command gives for a missing input, not an OSError
        raise UnrecognizedInputError(f"{file}: no such file or folder")
    with ApackReader(file, verify=True) as reader:
        report = reader.verify().as_dict()
    if as_json:
        out.echo_json(report)
    else:
        out.echo_lines(verify_lines(report))
    ctx.exit(0 if report["ok"] else 1)
