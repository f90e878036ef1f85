"""``adapterpack merge ADAPTER BASE_DIR OUT_DIR``: bake an adapter into a base model's safetensors weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterpack.cli import output as out
from adapterpack.ops.merge import merge as run


def merge_lines(r: dict[str, Any]) -> list[str]:
    """Summary of a :class:`~adapterpack.ops.merge.MergeResult` (as_dict form)."""
    dora = sum(m["dora"] for m in r["modules"])
    lines = [
        f"wrote    {r['dst']} from {r['base']} + {r['src']} in {r['seconds']:.2f} s",
        f"merged   {len(r['modules'])} modules"
        + (f" ({dora} DoRA)" if dora else "")
        + (f", {len(r['tensors'])} pass-through tensors replaced" if r["tensors"] else "")
        + f" into {len(r['rewritten'])} file(s): {', '.join(r['rewritten'])}; float64 sums rounded once to each weight's dtype",
        f"copied   {len(r['copied'])} other file(s) unchanged",
    ]
    return lines + [f"note     {n}" for n in r["notes"]]


@click.command("merge", short_help="Bake an adapter into a base model's safetensors weights.")
@click.argument("src", metavar="ADAPTER", type=click.Path(exists=True, path_type=Path))
@click.argument("base", metavar="BASE_DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT_DIR", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_name", metavar="NAME", help="Which adapter of a multi-adapter .apack file.")
@click.option("--drop-tensors", is_flag=True, help="Leave out pass-through tensors that name no base tensor (else refused).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@out.progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(src: Path, base: Path, dst: Path, adapter_name: str | None, drop_tensors: bool, force: bool, as_json: bool) -> None:
    """Write OUT_DIR: BASE_DIR (a model folder of *.safetensors, sharded or not) with ADAPTER merged into its
    weights, W + ΔW accumulated in float64 and rounded once to each weight's dtype (DoRA rescaled by its
    magnitude). Every module must name one base weight of its shape, or nothing is written; other files
    and tensors are copied byte for byte. OUT_DIR appears whole or not at all."""
    r = run(src, base, dst, adapter=adapter_name, force=force, drop_tensors=drop_tensors).as_dict()
    out.echo_json(r) if as_json else out.echo_lines(merge_lines(r))
